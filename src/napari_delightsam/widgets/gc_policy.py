"""Short garbage collections in the napari process: what is long-lived is frozen.

In a napari process with torch and a model loaded, one full (generation-2) pass of Python's
cyclic garbage collector walks about 600,000 objects -- 330-400 ms on a two-core CPU -- and
runs on whichever thread's allocation triggers it, holding the GIL: a result's new layers
(vispy visuals, Qt widgets, events) used to trigger one right as the result arrived, and the
window froze for a third of a second. ``gc.freeze()`` moves every object alive into a permanent
generation that later passes skip (a constant-time list splice), so the passes after it walk
only what was made since.

The policy (process-wide, as the collector is):

* :func:`freeze_long_lived` runs when a widget starts work in a worker (a segmentation, an
  image of the annotate panel, a box or click, a fine-tune), and again once a segmentation's
  model is loaded: the young generations are collected first (milliseconds), then everything
  alive is frozen -- modules, the model, the layers.
* A frozen object is never collected until it is unfrozen, and napari layers hold reference
  cycles: when a layer is about to be removed from a viewer whose widget froze, everything is
  unfrozen (closing a viewer removes its layers first), so napari's own full collection on a
  removal (its canvas frees the layer's OpenGL objects that way) runs as it would without the
  policy; one more full collection follows 0.2 s later (once for several removals) and frees
  the removed layers themselves, which the collector would otherwise keep until its next full
  pass. The next work a widget starts freezes again.
* Closing a widget unfreezes (:func:`release`): the collector is back to its defaults.
* ``DELIGHTSAM_GC_FREEZE=0`` in the environment turns the policy off.
"""

from __future__ import annotations

import gc
import os
from typing import Any

ENV_VAR = "DELIGHTSAM_GC_FREEZE"
COLLECT_DELAY_MS = 200  # after a removal: napari's own references to the layer are gone by then

_collect_pending = False


def enabled() -> bool:
    """The policy is on unless ``DELIGHTSAM_GC_FREEZE`` is 0 / false / off / no."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in {"0", "false", "off", "no"}


def freeze_long_lived(viewer: Any = None) -> bool:
    """Collect the young generations, then freeze every object alive; with a ``viewer``, also
    collect what its removed layers leave (see the module). Returns whether it froze."""
    if not enabled():
        return False
    if viewer is not None:
        watch_viewer(viewer)
    gc.collect(1)  # young cyclic garbage is freed now rather than kept frozen
    gc.freeze()
    return True


def watch_viewer(viewer: Any) -> None:
    """Unfreeze when a layer is about to be removed from ``viewer`` and collect once shortly
    after (connected once)."""
    viewer.layers.events.removing.connect(_on_layer_removing)  # napari ignores a second connect


def _on_layer_removing(event: Any = None) -> None:
    """Unfreeze before napari removes the layer (and runs its own collection), and collect a
    moment later, once for several removals -- also when nothing is frozen right now: the removed
    layer must not be frozen as garbage by the next work's freeze."""
    global _collect_pending
    gc.unfreeze()
    if _collect_pending:
        return
    from qtpy.QtCore import QTimer

    _collect_pending = True
    QTimer.singleShot(COLLECT_DELAY_MS, collect_after_removal)


def collect_after_removal() -> int:
    """Unfreeze (if a widget froze since the removal) and run one full collection; the next work
    a widget starts freezes again. Returns the number of objects collected."""
    global _collect_pending
    _collect_pending = False
    gc.unfreeze()
    return gc.collect()


def release() -> None:
    """Unfreeze everything: the collector scans all objects again (a widget closed)."""
    gc.unfreeze()
