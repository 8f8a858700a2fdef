"""Label export (PNG/TIFF + provenance sidecar): formats, read-back, no silent overwrite, atomicity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_delightsam import __version__
from napari_delightsam._writer import write_labels_png, write_labels_tiff
from napari_delightsam.widgets import core
from napari_delightsam.widgets.export import (
    ExportError,
    export_labels,
    provenance_from_metadata,
    read_labels,
    sidecar_path,
)

PROVENANCE = {
    "model_file": "/models/best.safetensors",
    "model_sha256": "ab" * 32,
    "modality": "auto",
    "modality_used": "dermoscopy",
    "threshold": 0.42,
    "input_layer": "lesion 1",
    "input_shape": [32, 40, 3],
    "time": "2025-01-01T00:00:00+00:00",
    "device": "cpu",
}


def _binary():
    mask = np.zeros((32, 40), dtype=np.uint8)
    mask[5:20, 8:30] = 1
    return mask


def test_png_binary_is_0_255_and_reads_back_identical(tmp_path):
    mask = _binary()
    png, side = export_labels(tmp_path / "m.png", mask, layer_name="m", provenance=PROVENANCE)
    raw = np.asarray(Image.open(png))
    assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 255}
    np.testing.assert_array_equal(raw > 0, mask > 0)
    np.testing.assert_array_equal(read_labels(png), mask)
    record = json.loads(side.read_text())
    assert side == sidecar_path(png) and side.name == "m.png.json"
    assert record["encoding"] == "binary-0-255"
    assert record["model_file"] == PROVENANCE["model_file"]
    assert record["model_sha256"] == PROVENANCE["model_sha256"]
    assert record["modality"] == "auto" and record["modality_used"] == "dermoscopy"
    assert record["threshold"] == 0.42
    assert record["input_layer"] == "lesion 1" and record["input_shape"] == [32, 40, 3]
    assert record["package_version"] == __version__
    assert record["shape"] == [32, 40] and record["segmentation"]["device"] == "cpu"
    assert record["exported"]


def test_png_label_ids_up_to_255_and_refuses_larger_pointing_to_tiff(tmp_path):
    labels = np.zeros((16, 16), dtype=np.int32)
    labels[1:4, 1:4] = 2
    labels[6:9, 6:9] = 255
    (png, _) = export_labels(tmp_path / "ids.png", labels)
    assert np.asarray(Image.open(png)).max() == 255
    back = read_labels(png)
    np.testing.assert_array_equal(back, labels)
    labels[0, 0] = 256
    with pytest.raises(ExportError, match="TIFF"):
        export_labels(tmp_path / "big.png", labels)
    assert not (tmp_path / "big.png").exists()
    with pytest.raises(ExportError, match="TIFF"):
        export_labels(tmp_path / "stack.png", np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(ExportError, match="negative"):
        export_labels(tmp_path / "neg.png", -np.ones((4, 4), dtype=np.int8))
    with pytest.raises(ExportError, match="extension"):
        export_labels(tmp_path / "x.jpg", labels)


@pytest.mark.parametrize(
    ("top", "dtype"), [(1, np.uint8), (255, np.uint8), (256, np.uint16), (70000, np.uint32), (2**40, np.uint64)]
)
def test_tiff_smallest_unsigned_dtype_reads_back_identical(tmp_path, top, dtype):
    labels = np.zeros((3, 10, 12), dtype=np.int64)
    labels[1, 2:5, 3:7] = top
    labels[2, 0, 0] = 1
    tif, side = export_labels(tmp_path / "l.tif", labels)
    raw = tifffile.imread(tif)
    assert raw.dtype == dtype
    np.testing.assert_array_equal(read_labels(tif), labels)
    assert json.loads(side.read_text())["dtype"] == np.dtype(dtype).name


def test_never_overwrites_without_permission(tmp_path):
    target = tmp_path / "m.png"
    export_labels(target, _binary())
    before = target.read_bytes(), sidecar_path(target).read_bytes()
    other = np.ones((32, 40), dtype=np.uint8)
    with pytest.raises(FileExistsError):
        export_labels(target, other)
    assert (target.read_bytes(), sidecar_path(target).read_bytes()) == before
    # only the sidecar present still counts
    lone = tmp_path / "n.tif"
    sidecar_path(lone).write_text("{}")
    with pytest.raises(FileExistsError):
        export_labels(lone, other)
    assert not lone.exists()
    export_labels(target, other, overwrite=True)
    np.testing.assert_array_equal(read_labels(target), other)


def test_a_failing_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "m.tif"
    export_labels(target, _binary())
    before = target.read_bytes()

    def boom(path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", boom)
    with pytest.raises(OSError, match="disk full"):
        export_labels(target, np.ones((32, 40), dtype=np.uint8), overwrite=True)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif", "m.tif.json"]


def test_provenance_from_metadata_reports_edits():
    mask = _binary()
    meta = {core.METADATA_KEY: {**PROVENANCE, "fingerprint": core.fingerprint(mask)}}
    record = provenance_from_metadata(meta, mask)
    assert "fingerprint" not in record
    assert record["edited_after_segmentation"] is False
    painted = mask.copy()
    painted[0, 0] = 1
    assert provenance_from_metadata(meta, painted)["edited_after_segmentation"] is True
    assert provenance_from_metadata({}, mask) == {}


def test_npe2_writers_write_file_and_sidecar(tmp_path):
    mask = _binary()
    meta = {"name": "lesion_delightsam_mask", "metadata": {core.METADATA_KEY: dict(PROVENANCE)}}
    out = write_labels_png(str(tmp_path / "a.png"), mask, meta)
    assert out == [str(tmp_path / "a.png"), str(tmp_path / "a.png.json")]
    np.testing.assert_array_equal(read_labels(out[0]), mask)
    assert json.loads((tmp_path / "a.png.json").read_text())["layer"] == "lesion_delightsam_mask"
    out = write_labels_tiff(str(tmp_path / "a.tiff"), mask * 7, {"name": "hand drawn", "metadata": {}})
    np.testing.assert_array_equal(read_labels(out[0]), mask * 7)
    record = json.loads((tmp_path / "a.tiff.json").read_text())
    assert record["model_file"] is None and record["layer"] == "hand drawn"
