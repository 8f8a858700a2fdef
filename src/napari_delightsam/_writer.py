"""npe2 writer contributions: Labels -> PNG or TIFF, each with a ``<file>.json`` provenance sidecar.

napari's own labels writer has no ``.png`` and up-casts to uint32; these write what other
tools expect (see ``widgets/export.py`` for the formats). napari's Save dialog has already
asked before replacing an existing file, so these writers replace (atomically).
"""

from __future__ import annotations

from typing import Any

from .widgets.export import export_labels, provenance_from_metadata


def _write(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    metadata = meta.get("metadata") or {}
    written = export_labels(
        path,
        data,
        layer_name=meta.get("name"),
        provenance=provenance_from_metadata(metadata, data),
        overwrite=True,
    )
    return [str(p) for p in written]


def write_labels_png(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Labels layer -> PNG (uint8; binary as 0/255, ids <= 255) + JSON sidecar."""
    return _write(path, data, meta)


def write_labels_tiff(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Labels layer -> TIFF (smallest unsigned dtype, zlib) + JSON sidecar."""
    return _write(path, data, meta)
