"""Pay napari's first-layer costs in a worker thread instead of on the GUI thread.

The first Labels layer of a napari session imports pandas (for the layer's feature table),
scikit-image's colour module and SciPy's linear algebra (for its label colormap), and fills
vispy's dash-pattern cache (for its polygon overlay). On a two-core CPU that is about half a
second, and it used to land on the GUI thread at the worst moment: when the first mask arrived.
None of it creates a Qt or OpenGL object, so the segment and annotate widgets call
:func:`warm_layer_machinery` from their worker thread while the network runs; by the time the
result handler adds the layers, only the per-layer work is left.

Best effort by design: a module that a napari or vispy version no longer has is skipped, and
nothing here changes what the layers look like.
"""

from __future__ import annotations

import importlib
import threading

#: Modules napari imports lazily when it creates its first Labels layer (napari 0.5–0.9).
FIRST_LABELS_IMPORTS: tuple[str, ...] = (
    "pandas",
    "scipy.linalg",
    "skimage.color.colorconv",
    "vispy.visuals.line.dash_atlas",
    "napari._vispy.overlays.labels_polygon",
)

_lock = threading.Lock()
_warmed: list[str] = []


def warm_layer_machinery() -> list[str]:
    """Import what napari's first Labels layer needs and fill vispy's dash-pattern cache, once
    per process (later calls return at once). Returns the modules now imported."""
    with _lock:
        if _warmed:
            return list(_warmed)
        for name in FIRST_LABELS_IMPORTS:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - an optional speed-up must never fail a run
                continue
            _warmed.append(name)
        try:
            from vispy.visuals.line.dash_atlas import DashAtlas

            DashAtlas()  # its patterns are lru-cached module-wide: the first atlas pays for all
        except Exception:  # noqa: BLE001
            pass
        if not _warmed:
            _warmed.append("")  # nothing importable: do not try again
        return [name for name in _warmed if name]


def start_layer_warmup() -> threading.Thread | None:
    """Run :func:`warm_layer_machinery` in a daemon thread (the caller, a worker, goes on with
    the network); None when it already ran in this process."""
    if _warmed:
        return None
    thread = threading.Thread(target=warm_layer_machinery, name="delightsam-layer-warmup", daemon=True)
    thread.start()
    return thread
