"""Label export: PNG / TIFF plus a ``<file>.json`` provenance sidecar (napari- and Qt-free).

Formats
    * ``.png``: one 2D plane, uint8. A binary mask (values {0, 1}) is written as 0/255 -- the
      dataset layout's mask convention, so an export can feed ``delightsam train`` directly;
      other label ids up to 255 are written as they are. Ids above 255 or negative ids are
      refused with a message pointing to TIFF.
    * ``.tif`` / ``.tiff``: any shape, the smallest unsigned dtype that holds the largest id
      (uint8/16/32/64; Fiji reads all of them), zlib-compressed with tifffile.

The sidecar records how the file was made: model file + SHA-256, the modality asked for (maybe
``auto``) and the one the model used, threshold, input layer name and shape, time, package
version, the boxes used to correct it (De-LightSAM refine), and how the pixel values are
encoded, so
:func:`read_labels` gives back exactly the exported array. Nothing is overwritten unless the
caller says so, and every file is written atomically (``atomic_files.atomic_write``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .core import METADATA_KEY, fingerprint, utc_now

PNG_EXTENSIONS = (".png",)
TIFF_EXTENSIONS = (".tif", ".tiff")
SIDECAR_FORMAT = "napari-delightsam labels export v1"


class ExportError(ValueError):
    """Labels that cannot be written in the requested format (the message says what to do)."""


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``mask.png`` -> ``mask.png.json``."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def _as_label_array(data: Any) -> np.ndarray:
    arr = np.asarray(data)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind not in "ui":
        raise ExportError(f"labels must hold integer ids, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ExportError(f"labels layer is empty (shape {arr.shape})")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ExportError(f"labels contain negative ids (min {int(arr.min())}); only ids >= 0 can be exported")
    return arr


def encode_png(data: Any) -> tuple[np.ndarray, str]:
    """(uint8 array to write, encoding name) or ``ExportError``."""
    arr = _as_label_array(data)
    if arr.ndim != 2:
        raise ExportError(
            f"a PNG holds one 2D plane, but these labels have shape {arr.shape}; export as TIFF (.tif) instead"
        )
    top = int(arr.max())
    if top > 255:
        raise ExportError(
            f"label ids go up to {top}, which does not fit an 8-bit PNG (ids 0-255); export as TIFF (.tif) instead"
        )
    if top <= 1:
        return (arr.astype(np.uint8) * 255), "binary-0-255"
    return arr.astype(np.uint8), "label-ids"


def encode_tiff(data: Any) -> tuple[np.ndarray, str]:
    """(array in the smallest unsigned dtype, encoding name) or ``ExportError``."""
    arr = _as_label_array(data)
    top = int(arr.max())
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if top <= np.iinfo(dtype).max:
            return arr.astype(dtype, copy=False), "label-ids"
    raise ExportError(f"label id {top} does not fit 64 bits")  # pragma: no cover - unreachable for ints


def provenance_from_metadata(metadata: dict[str, Any] | None, data: Any = None) -> dict[str, Any]:
    """The segment widget's record in ``layer.metadata``, for the sidecar.

    The internal edit fingerprint is replaced by ``edited_after_segmentation`` (True when the
    labels were painted on after the widget wrote them; needs ``data``).
    """
    record = dict((metadata or {}).get(METADATA_KEY, {}) or {})
    written = record.pop("fingerprint", None)
    if record and data is not None and written:
        record["edited_after_segmentation"] = fingerprint(data) != written
    return record


def build_sidecar(
    path: Path, written: np.ndarray, encoding: str, layer_name: str | None, provenance: dict[str, Any] | None
) -> dict[str, Any]:
    from .. import __version__

    prov = dict(provenance or {})
    return {
        "format": SIDECAR_FORMAT,
        "file": path.name,
        "encoding": encoding,
        "dtype": str(written.dtype),
        "shape": list(written.shape),
        "max_label": int(written.max()) if written.size else 0,
        "layer": layer_name,
        "exported": utc_now(),
        "package_version": __version__,
        # how the mask was made (absent for labels drawn by hand)
        "model_file": prov.pop("model_file", None),
        "model_sha256": prov.pop("model_sha256", None),
        "modality": prov.pop("modality", None),  # as asked: one of the six, or "auto"
        "modality_used": prov.pop("modality_used", None),  # what the model ran (auto's choice)
        "threshold": prov.pop("threshold", None),
        "input_layer": prov.pop("input_layer", None),
        "input_shape": prov.pop("input_shape", None),
        "segmented": prov.pop("time", None),
        "edited_after_segmentation": prov.pop("edited_after_segmentation", None),
        # boxes drawn in "De-LightSAM refine" (order applied, pixel edges x0, y0, x1, y1; a "Refine all"
        # entry lists every object's box as object_boxes) and its model
        "boxes": prov.pop("boxes", None),
        "box_model": prov.pop("box_model", None),
        "segmentation": prov,  # everything else the widget recorded (device, instances, ...)
    }


def export_labels(
    path: str | os.PathLike[str],
    data: Any,
    *,
    layer_name: str | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``data`` to ``path`` (.png/.tif/.tiff) and ``path + '.json'``; returns both paths.

    Raises ``FileExistsError`` when either file exists and ``overwrite`` is False (ask the user,
    then call again with ``overwrite=True``), ``ExportError`` when the labels do not fit the format.
    """
    from ..atomic_files import atomic_write

    target = Path(path).expanduser()
    ext = target.suffix.lower()
    if ext in PNG_EXTENSIONS:
        written, encoding = encode_png(data)
    elif ext in TIFF_EXTENSIONS:
        written, encoding = encode_tiff(data)
    else:
        raise ExportError(f"unsupported extension {target.suffix!r}; use .png, .tif or .tiff")
    side = sidecar_path(target)
    if not overwrite:
        existing = [p for p in (target, side) if p.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(str(p) for p in existing)} already exist(s); not overwritten")
    if not target.parent.is_dir():
        raise ExportError(f"folder {target.parent} does not exist")

    if ext in PNG_EXTENSIONS:
        from PIL import Image

        def write(tmp: Path) -> None:
            Image.fromarray(written).save(tmp, format="PNG")
    else:
        import tifffile

        def write(tmp: Path) -> None:
            tifffile.imwrite(tmp, written, compression="zlib")

    record = build_sidecar(target, written, encoding, layer_name, provenance)
    atomic_write(target, write)
    text = json.dumps(record, indent=2, sort_keys=False) + "\n"
    atomic_write(side, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return [target, side]


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an exported file back as the label array that was exported.

    A PNG whose sidecar says ``binary-0-255`` comes back as {0, 1}; without a sidecar a PNG
    holding only 0 and 255 is read the same way.
    """
    target = Path(path)
    ext = target.suffix.lower()
    if ext in TIFF_EXTENSIONS:
        import tifffile

        return tifffile.imread(target)
    if ext not in PNG_EXTENSIONS:
        raise ExportError(f"unsupported extension {target.suffix!r}")
    from PIL import Image

    with Image.open(target) as im:
        arr = np.asarray(im).copy()
    encoding = None
    side = sidecar_path(target)
    if side.is_file():
        encoding = json.loads(side.read_text(encoding="utf-8")).get("encoding")
    if encoding == "binary-0-255" or (encoding is None and set(np.unique(arr).tolist()) <= {0, 255}):
        return (arr > 0).astype(np.uint8)
    return arr
