"""The annotation session core (``napari_delightsam.annotate``): no napari, no model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_delightsam.annotate import (
    DRAFTS_DIR,
    STATE_FILE,
    AnnotationSession,
    MaskExistsError,
    list_images,
)
from napari_delightsam.widgets.export import ExportError, read_labels, sidecar_path


def _folder(tmp_path, n=4):
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(src / f"img{i}.png")
    return src


def _mask(value=1):
    m = np.zeros((20, 30), dtype=np.uint8 if value <= 255 else np.uint16)
    m[5:10, 5:15] = value
    return m


def test_lists_readable_images_sorted_and_unreadable_ones_with_a_reason(tmp_path):
    src = _folder(tmp_path, 3)
    (src / "notes.txt").write_text("not an image")  # not an image extension: not listed
    (src / "broken.png").write_bytes(b"this is no png")
    (src / "empty.jpg").write_bytes(b"")
    (src / ".hidden.png").write_bytes(b"x")
    (src / "sub").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "sub" / "inner.png")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(src / "A_upper.TIF")

    assert [p.name for p in list_images(src)] == ["A_upper.TIF", "broken.png", "empty.jpg",
                                                  "img0.png", "img1.png", "img2.png"]
    s = AnnotationSession(src, tmp_path / "masks")
    assert s.total == 6 and s.readable_count == 4
    assert set(s.unreadable) == {"broken.png", "empty.jpg"}
    assert "not a recognised image" in s.unreadable["broken.png"]
    assert "empty" in s.unreadable["empty.jpg"]
    assert s.index == 0 and s.name(s.index) == "A_upper.TIF"
    assert s.summary() == "0 of 4 done (2 unreadable)"
    # navigation skips unreadable files
    assert s.step(1) == 3
    with pytest.raises(ValueError, match="cannot be read"):
        s.go(1)


def test_a_file_that_fails_to_decode_is_listed_when_opened_not_fatal(tmp_path):
    src = _folder(tmp_path, 2)
    good = (src / "img1.png").read_bytes()
    (src / "img1.png").write_bytes(good[: len(good) // 2])  # header fine, pixels truncated
    s = AnnotationSession(src, tmp_path / "masks")
    assert s.load_image(0).shape == (20, 30, 3)
    assert s.load_image(1) is None
    assert "truncated" in s.unreadable["img1.png"] or "corrupt" in s.unreadable["img1.png"]
    assert s.next_todo(0) == 0  # only img0 is left to do
    # remembered across sessions
    assert "img1.png" in AnnotationSession(src, tmp_path / "masks").unreadable


def test_save_writes_mask_and_sidecar_and_moves_on_skipping_done(tmp_path):
    src = _folder(tmp_path, 4)
    out = tmp_path / "masks"
    Image.fromarray(_mask(255)).save(out.mkdir() or out / "img1.png")  # done before the session
    s = AnnotationSession(src, out)
    assert s.is_done(1) and not s.is_done(0)
    assert s.summary() == "1 of 4 done"
    assert s.index == 0
    written = s.save(0, _mask(), provenance={"modality": "dermoscopy", "model_file": "m.safetensors"})
    assert written == [out / "img0.png", out / "img0.png.json"]
    np.testing.assert_array_equal(read_labels(out / "img0.png"), _mask())
    assert np.asarray(Image.open(out / "img0.png")).max() == 255  # binary masks as 0/255
    side = json.loads(sidecar_path(out / "img0.png").read_text())
    assert side["modality"] == "dermoscopy" and side["model_file"] == "m.safetensors"
    assert side["segmentation"]["image_file"] == str(src / "img0.png")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic: no temporary files left
    assert s.summary() == "2 of 4 done"
    assert s.next_todo() == 2  # img1 is done: skipped
    assert s.step(1) == 2 and s.step(1, skip_done=False) == 1
    s.go(2)
    s.save(2, _mask())
    s.go(3)
    s.save(3, _mask())
    assert s.next_todo() is None and s.summary() == "4 of 4 done"


def test_never_overwrites_a_mask_it_did_not_open_without_the_flag(tmp_path):
    src = _folder(tmp_path, 2)
    out = tmp_path / "masks"
    out.mkdir()
    mine = _mask(255)
    mine[0, 0] = 255
    Image.fromarray(mine).save(out / "img0.png")
    before = (out / "img0.png").read_bytes()
    s = AnnotationSession(src, out)
    with pytest.raises(MaskExistsError):
        s.save(0, _mask())
    assert (out / "img0.png").read_bytes() == before
    # opening it (reopen on request) allows replacing it
    opened = s.load_mask(0)
    assert opened[0, 0] == 1
    s.save(0, _mask())
    np.testing.assert_array_equal(read_labels(out / "img0.png"), _mask())
    # a new session has not opened it: refused again, unless overwrite=True
    s2 = AnnotationSession(src, out)
    with pytest.raises(MaskExistsError):
        s2.save(0, _mask(2))
    s2.save(0, _mask(2), overwrite=True)
    np.testing.assert_array_equal(read_labels(out / "img0.png"), _mask(2))


def test_tiff_format_and_png_refusing_large_ids(tmp_path):
    src = _folder(tmp_path, 2)
    s = AnnotationSession(src, tmp_path / "masks")
    with pytest.raises(ExportError, match="TIFF"):
        s.save(0, _mask(300))
    assert not s.is_done(0)
    t = AnnotationSession(src, tmp_path / "masks", mask_format="tiff")
    t.save(0, _mask(300))
    assert t.existing_mask(0).name == "img0.tif"
    np.testing.assert_array_equal(read_labels(t.existing_mask(0)), _mask(300))


def test_resume_after_a_new_session_on_the_same_folders(tmp_path):
    src = _folder(tmp_path, 4)
    out = tmp_path / "masks"
    s = AnnotationSession(src, out)
    s.save(0, _mask())
    s.go(s.next_todo())
    assert s.index == 1
    s.set_setting("modality", "ultrasound")
    s.save_draft(1, _mask(7))  # work in progress on img1, not saved
    state = json.loads((out / STATE_FILE).read_text())
    assert state["current"] == "img1.png" and state["saved"]["img0.png"]["mask"] == "img0.png"
    del s  # the window closed (or napari crashed)

    r = AnnotationSession(src, out)
    assert r.index == 1 and r.settings["modality"] == "ultrasound"
    assert r.summary() == "1 of 4 done"
    np.testing.assert_array_equal(r.load_draft(1), _mask(7))
    r.save(1, r.load_draft(1))
    assert r.load_draft(1) is None and not (out / DRAFTS_DIR / "img1.tif").exists()
    # a current image that got done elsewhere is not resumed on
    r.go(2)
    Image.fromarray(_mask(255)).save(out / "img2.png")
    assert AnnotationSession(src, out).index == 3


def test_explicit_list_duplicate_stems_and_refused_output_folder(tmp_path):
    src = _folder(tmp_path, 1)
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(src / "img0.jpg")
    s = AnnotationSession([src / "img0.png", src / "img0.jpg"], tmp_path / "out")
    assert [e.name for e in s.entries] == ["img0.png", "img0.jpg"]
    assert s.mask_path(0).name == "img0.png.png" and s.mask_path(1).name == "img0.jpg.png"
    with pytest.raises(ValueError, match="input folder"):
        AnnotationSession(src, src)
    with pytest.raises(FileNotFoundError):
        AnnotationSession(tmp_path / "missing", tmp_path / "out2")


def test_folders_given_relative_stay_readable_after_a_change_of_directory(tmp_path, monkeypatch):
    _folder(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    s = AnnotationSession("images", "masks")
    assert all(e.path.is_absolute() for e in s.entries)
    monkeypatch.chdir(tmp_path.parent)  # napari's console, another plugin or a script moved on
    assert s.load_image(0) is not None and not s.unreadable
    written = s.save(0, _mask())
    assert written[0] == tmp_path / "masks" / "img0.png" and read_labels(written[0]).sum() == 50
