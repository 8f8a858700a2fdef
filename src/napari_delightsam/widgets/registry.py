"""Which segment widget belongs to which viewer, so the fine-tune widget can hand it a new model."""

from __future__ import annotations

import weakref
from typing import Any

from .notify import alive

_SEGMENT_WIDGETS: list[tuple[weakref.ref, weakref.ref]] = []


def register_segment_widget(viewer: Any, widget: Any) -> None:
    _SEGMENT_WIDGETS.append((weakref.ref(viewer), weakref.ref(widget)))


def segment_widget_for(viewer: Any) -> Any | None:
    """The most recently opened, still existing segment widget of ``viewer`` (or None)."""
    found = None
    keep = []
    for vref, wref in _SEGMENT_WIDGETS:
        v, w = vref(), wref()
        if v is None or w is None or not alive(w):
            continue
        keep.append((vref, wref))
        if v is viewer:
            found = w
    _SEGMENT_WIDGETS[:] = keep
    return found
