"""One loaded Segmenter per (checkpoint file version, device), shared by every widget.

A model is loaded the first time a run needs it (inside the worker thread) and reused after;
a checkpoint file that changes on disk (same path, new mtime/size, e.g. a fine-tune's
``best`` file) is a new key. At most ``max_entries`` models stay in memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .settings import BUNDLED, UNTRAINED


def default_loader(spec: str, device: str) -> Any:
    """Load a Segmenter for a model choice (``bundled``, ``untrained`` or a checkpoint path)."""
    from ..inference import load_model
    from ._llvm import avoid_triton_llvm_clash

    avoid_triton_llvm_clash()

    if spec == BUNDLED:
        return load_model(None, device=device)
    if spec == UNTRAINED:
        return load_model("untrained", device=device)
    return load_model(spec, device=device)


def cache_key(spec: str, device: str) -> tuple[Any, ...]:
    if spec in (BUNDLED, UNTRAINED):
        return (spec, device)
    path = Path(spec).expanduser()
    try:
        stat = path.stat()
        return (str(path.resolve()), stat.st_mtime_ns, stat.st_size, device)
    except OSError:
        return (str(path), None, None, device)


class ModelCache:
    """Thread-safe LRU of loaded Segmenters; ``loads`` counts real loads (for tests)."""

    def __init__(self, max_entries: int = 2, loader: Callable[[str, str], Any] | None = None) -> None:
        self.max_entries = max_entries
        self.loader = loader or default_loader
        self.loads = 0
        self._items: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    def is_loaded(self, spec: str, device: str) -> bool:
        with self._lock:
            return cache_key(spec, device) in self._items

    def get(self, spec: str, device: str) -> Any:
        key = cache_key(spec, device)
        with self._lock:  # held while loading: two widgets never load the same model twice
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            segmenter = self.loader(spec, device)
            self.loads += 1
            self._items[key] = segmenter
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
            return segmenter

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


#: The process-wide cache used by the segment widgets.
MODEL_CACHE = ModelCache()
