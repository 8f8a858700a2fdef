"""The "De-LightSAM annotate" widget end to end in a real napari viewer (pytest-qt, Xvfb), with a
tiny model: open, segment, correct, Save & next (button and Shift+S), close, reopen, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_delightsam.widgets.core import METADATA_KEY
from napari_delightsam.widgets.export import read_labels, sidecar_path

pytestmark = pytest.mark.gui

WAIT_MS = 60_000


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny De-LightSAM checkpoint, made before any viewer exists (see widgets/_llvm.py)."""
    import torch

    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.model import DeLightSAM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, DeLightSAM(tiny_config()).eval())
    return path


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DELIGHTSAM_CONFIG_DIR", str(tmp_path / "config"))
    from napari.utils.notifications import notification_manager

    notification_manager.records.clear()


def _errors() -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records if str(n.severity).lower() == "error"]


def _folder(tmp_path: Path) -> Path:
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        image = rng.integers(0, 60, (40, 56, 3), dtype=np.uint8)
        image[10:25, 15:35] += 150  # a bright "lesion"
        Image.fromarray(image).save(src / f"case{i}.png")
    (src / "broken.jpg").write_bytes(b"not a jpeg at all")
    return src


def _open(viewer, tiny_checkpoint):
    dock, widget = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM annotate")
    assert widget.use_checkpoint(tiny_checkpoint)
    widget.device_combo.setCurrentText("cpu")
    widget.modality_combo.setCurrentText("dermoscopy")
    return dock, widget


def _wait_for(qtbot, widget, name):
    qtbot.waitUntil(lambda: not widget.busy and widget._labels() is not None
                    and widget._labels().name == f"{name}_delightsam_mask", timeout=WAIT_MS)
    return widget._labels()


def _paint(labels, rows, cols, value=1):
    rr, cc = np.mgrid[rows, cols]
    labels.data_setitem((rr.ravel(), cc.ravel()), value)  # as a brush stroke: one undo step, paint event


def _press_save_next(viewer):
    """Shift+S as napari dispatches it to the viewer's key bindings."""
    from app_model.types import KeyBinding

    wanted = KeyBinding.from_str("Shift+S")
    for key, func in viewer.keymap.items():
        if KeyBinding.validate(key) == wanted:
            func(viewer)
            return
    raise AssertionError("Shift+S is not bound on the viewer")


def test_annotate_a_folder_save_next_close_reopen_resume(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    src, out = _folder(tmp_path), tmp_path / "masks"
    viewer = make_napari_viewer()
    dock, widget = _open(viewer, tiny_checkpoint)
    session = widget.start(src, out)
    assert session is not None
    # the broken file is listed with its reason, not fatal
    assert "broken.jpg" in session.unreadable and "broken.jpg" in widget.unreadable_label.text()
    assert widget.progress_label.text().startswith("0 of 3 done (1 unreadable)")

    labels = _wait_for(qtbot, widget, "case0")
    # meanwhile the next image is segmented in the background
    qtbot.waitUntil(lambda: widget._prefetch.get("result") is not None, timeout=WAIT_MS)
    names = {layer.name for layer in viewer.layers}
    assert {"case0", "case0_delightsam_heatmap", "case0_delightsam_mask"} <= names
    assert labels.data.shape == (40, 56)
    assert labels.metadata[METADATA_KEY]["model_file"] == str(tiny_checkpoint)
    assert labels.metadata[METADATA_KEY]["modality"] == "dermoscopy"
    # correct it: erase everything, paint the lesion
    _paint(labels, slice(0, 40), slice(0, 56), 0)
    _paint(labels, slice(10, 25), slice(15, 35), 1)
    expected0 = np.array(labels.data)

    written = widget.save_and_next()
    assert written == [out / "case0.png", out / "case0.png.json"]
    np.testing.assert_array_equal(read_labels(out / "case0.png"), expected0)
    side = json.loads(sidecar_path(out / "case0.png").read_text())
    assert side["edited_after_segmentation"] is True and side["model_file"] == str(tiny_checkpoint)
    assert side["modality"] == "dermoscopy"

    # the next image is on screen at once (segmented in the background); the viewer's Shift+S saves it too
    assert widget._labels().name == "case1_delightsam_mask" and widget.prefetch_hits == 1
    first_labels = labels
    labels = _wait_for(qtbot, widget, "case1")
    assert "case0" not in {layer.name for layer in viewer.layers}  # the previous image was closed
    assert labels is first_labels  # its layers reused, with the new image's data
    before = np.array(labels.data)
    labels.undo()  # the undo history of the previous image is gone
    np.testing.assert_array_equal(labels.data, before)
    assert widget.progress_label.text().startswith("1 of 3 done")
    _paint(labels, slice(0, 40), slice(0, 56), 0)
    _paint(labels, slice(5, 9), slice(5, 9), 1)
    _press_save_next(viewer)
    assert read_labels(out / "case1.png").sum() == 16

    # case2: a correction in progress, then the window closes without saving
    labels = _wait_for(qtbot, widget, "case2")
    _paint(labels, slice(0, 40), slice(0, 56), 0)
    _paint(labels, slice(30, 35), slice(40, 50), 1)
    draft = np.array(labels.data)
    widget.close()
    viewer.window.remove_dock_widget(dock)
    assert not (out / "case2.png").exists()

    # reopen: it resumes on case2 with the unsaved correction; done images are skipped
    dock, widget2 = _open(viewer, tiny_checkpoint)
    resumed = widget2.start(src, out)
    assert resumed.index == resumed.index_of("case2.png")
    labels = _wait_for(qtbot, widget2, "case2")
    np.testing.assert_array_equal(labels.data, draft)
    assert widget2.progress_label.text().startswith("2 of 3 done")
    assert widget2.next() is None  # nothing after it without a mask
    widget2.save_and_next()
    np.testing.assert_array_equal(read_labels(out / "case2.png"), draft)
    side = json.loads(sidecar_path(out / "case2.png").read_text())  # the draft kept how the mask was made
    assert side["model_file"] == str(tiny_checkpoint) and side["edited_after_segmentation"] is True
    assert "All 3 images are done" in widget2.status_label.text()
    assert not list((out / ".delightsam-drafts").glob("*.tif"))

    # reopen a done image on request: its saved mask, which Save may replace
    widget2.jump(resumed.index_of("case0.png"))
    labels = _wait_for(qtbot, widget2, "case0")
    np.testing.assert_array_equal(labels.data, expected0)
    _paint(labels, slice(0, 2), slice(0, 2), 1)
    widget2.save_and_next()
    assert read_labels(out / "case0.png")[0, 0] == 1
    assert not _errors(), _errors()


def test_an_image_without_a_heatmap_hides_the_heatmap_layer_instead_of_removing_it(make_napari_viewer, qtbot,
                                                                                   tiny_checkpoint, tmp_path):
    """A saved image has no heatmap: the layer stays (removing one costs napari a full garbage
    collection), emptied and hidden, and the next segmented image shows it again as the user had it."""
    import shutil

    src, out = _folder(tmp_path), tmp_path / "masks"
    shutil.copy(src / "case2.png", src / "case3.png")
    viewer = make_napari_viewer()
    _, widget = _open(viewer, tiny_checkpoint)
    session = widget.start(src, out)
    _wait_for(qtbot, widget, "case0")
    heat = viewer.layers["case0_delightsam_heatmap"]
    assert heat.visible and np.asarray(heat.data).any()
    widget.save_and_next()
    _wait_for(qtbot, widget, "case1")
    for visible, segmented in ((True, "case2"), (False, "case3")):  # the user's choice survives
        heat.visible = visible
        widget.jump(session.index_of("case0.png"))  # saved: its mask, no heatmap
        _wait_for(qtbot, widget, "case0")
        assert heat in viewer.layers and heat.name == "case0_delightsam_heatmap (none)"
        assert not heat.visible and not np.asarray(heat.data).any()
        widget.jump(session.index_of(f"{segmented}.png"))  # not opened before: segmented
        _wait_for(qtbot, widget, segmented)
        assert heat in viewer.layers and heat.name == f"{segmented}_delightsam_heatmap" and heat.visible is visible
        assert np.asarray(heat.data).any()
    assert not _errors(), _errors()


def test_a_mask_that_appears_meanwhile_is_not_replaced_without_asking(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                      tmp_path, monkeypatch):
    src, out = _folder(tmp_path), tmp_path / "masks"
    viewer = make_napari_viewer()
    _, widget = _open(viewer, tiny_checkpoint)
    widget.start(src, out)
    _wait_for(qtbot, widget, "case0")
    theirs = np.full((40, 56), 255, dtype=np.uint8)
    Image.fromarray(theirs).save(out / "case0.png")  # e.g. another annotator's file
    asked = []
    monkeypatch.setattr(widget, "_confirm_overwrite", lambda path: asked.append(path) or False)
    assert widget.save_and_next() == []
    assert asked == [out / "case0.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "case0.png")), theirs)


def labels_modality(widget):
    record = widget._labels().metadata[METADATA_KEY]
    return record.get("modality"), record.get("modality_used")


class _UnsureSegmenter:
    """The tiny Segmenter, reporting modality probabilities and an unsure ``auto`` decision."""

    def __init__(self, inner):
        self.inner = inner
        self.checkpoint_path, self.checkpoint_sha256, self.device = (
            inner.checkpoint_path, inner.checkpoint_sha256, inner.device)
        self.auto_available = True
        self.modalities_run: list[str] = []

    def segment(self, image, modality="auto", threshold=0.5):
        import dataclasses

        used = "dermoscopy" if modality == "auto" else modality
        self.modalities_run.append(modality)
        result = self.inner.segment(image, modality=used, threshold=threshold)
        probs = {"dermoscopy": 0.45, "ultrasound": 0.40, "colonoscopy": 0.15} if modality == "auto" else None
        return dataclasses.replace(result, modality_probabilities=probs)

    def auto_decision(self, result):
        from napari_delightsam.inference import AutoDecision

        return AutoDecision("dermoscopy", 0.45, "ultrasound", 0.40, 0.6, True)


def test_auto_asks_once_and_the_answer_is_the_sessions_modality(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                 tmp_path, monkeypatch):
    from napari_delightsam.widgets.model_cache import MODEL_CACHE, default_loader

    made = {}

    def loader(spec, device):
        made["seg"] = _UnsureSegmenter(default_loader(spec, device))
        return made["seg"]

    MODEL_CACHE.clear()
    monkeypatch.setattr(MODEL_CACHE, "loader", loader)
    try:
        src, out = _folder(tmp_path), tmp_path / "masks"
        viewer = make_napari_viewer()
        _, widget = _open(viewer, tiny_checkpoint)
        widget.modality_combo.setCurrentText("auto")
        widget.start(src, out)
        _wait_for(qtbot, widget, "case0")
        assert not widget.ask_box.isHidden()
        assert [b.property("modality") for b in widget.ask_buttons] == ["dermoscopy", "ultrasound"]
        assert labels_modality(widget) == ("auto", "dermoscopy")
        widget.choose_modality("ultrasound")  # not edited yet: segmented again as ultrasound
        qtbot.waitUntil(lambda: not widget.busy and labels_modality(widget)[0] == "ultrasound", timeout=WAIT_MS)
        assert labels_modality(widget) == ("ultrasound", "ultrasound")
        assert "ultrasound" in made["seg"].modalities_run
        assert widget.ask_box.isHidden() and widget.modality_combo.currentText() == "ultrasound"
        widget.save_and_next()
        _wait_for(qtbot, widget, "case1")
        assert labels_modality(widget) == ("ultrasound", "ultrasound")  # kept for the session: no question
        assert widget.ask_box.isHidden()
        assert json.loads((out / "case0.png.json").read_text())["modality"] == "ultrasound"
        assert json.loads((out / "delightsam-annotate.json").read_text())["settings"]["modality"] == "ultrasound"
    finally:
        MODEL_CACHE.clear()


class _BrightRefiner:
    """A stand-in for LiteMedSAM: the object in a box is its bright pixels."""

    def __init__(self, device):
        import threading

        self.device, self.precision, self.weights = device, "fp32", {"model": "bright pixels", "sha256": None}
        self.lock, self.image_id, self.image = threading.RLock(), None, None

    def set_image(self, image, image_id=None):
        self.image, self.image_id = np.asarray(image), image_id

    @property
    def image_size(self):
        return None if self.image is None else self.image.shape[:2]

    def segment_box(self, box):
        from napari_delightsam.refine import box_pixels

        grey = self.image if self.image.ndim == 2 else self.image.mean(axis=-1)
        out = np.zeros(grey.shape, dtype=bool)
        rows, cols = box_pixels(box, grey.shape)
        out[rows, cols] = grey[rows, cols] > 128
        return out

    def segment_clicks(self, points, labels, box=None, existing=None):
        """The bright pixels in the box, or in a 21-px square around the first click."""
        if box is None or np.ndim(box) == 2 and not len(box):
            x, y = points[0]
            box = np.array([x - 10, y - 10, x + 10, y + 10])
        box = np.asarray(box, dtype=float).reshape(-1, 4)[0]
        return self.segment_box(box), 1.0, box


def test_correct_with_a_box_of_the_refine_widget_then_save_and_next(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                    tmp_path, monkeypatch):
    from napari_delightsam.widgets import refine_widget as rw

    rw.REFINER_CACHE.clear()
    monkeypatch.setattr(rw.REFINER_CACHE, "loader", lambda spec, device: _BrightRefiner(device))
    try:
        src, out = _folder(tmp_path), tmp_path / "masks"
        viewer = make_napari_viewer()
        _, widget = _open(viewer, tiny_checkpoint)
        _, refine = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM refine")
        refine.device_combo.value = "cpu"
        widget.start(src, out)
        labels = _wait_for(qtbot, widget, "case0")
        # the refine widget follows the image on screen and its mask
        assert refine.image_picker.value is viewer.layers["case0"] and refine.labels_picker.value is labels
        _paint(labels, slice(0, 40), slice(0, 56), 0)
        shapes = refine.start_boxes()
        shapes.add_rectangles([np.array([[5, 10], [5, 40], [30, 40], [30, 10]], dtype=float)])
        qtbot.waitUntil(lambda: refine.pending == 0, timeout=WAIT_MS)
        assert refine.refinements == 1 and labels.data[10:25, 15:35].all()
        widget.save_and_next()
        saved = read_labels(out / "case0.png")
        assert saved[10:25, 15:35].all() and saved.sum() == 15 * 20
        assert json.loads((out / "case0.png.json").read_text())["boxes"][0]["box"] == [10.5, 5.5, 40.5, 30.5]
        labels = _wait_for(qtbot, widget, "case1")
        # the boxes layer is the next image's now, emptied (removing a layer costs napari a full
        # garbage collection), and a box drawn on it refines the next image
        assert "case0_delightsam_boxes" not in [layer.name for layer in viewer.layers]
        assert shapes in viewer.layers and shapes.name == "case1_delightsam_boxes" and shapes.nshapes == 0
        assert refine.image_picker.value is viewer.layers["case1"] and refine.labels_picker.value is labels
        _paint(labels, slice(0, 40), slice(0, 56), 0)
        done = refine.refinements
        shapes.add_rectangles([np.array([[5, 10], [5, 40], [30, 40], [30, 10]], dtype=float)])
        qtbot.waitUntil(lambda: refine.pending == 0 and refine.refinements > done, timeout=WAIT_MS)
        assert labels.data[10:25, 15:35].all() and labels.metadata["delightsam"]["boxes"][-1]["box"] == [
            10.5, 5.5, 40.5, 30.5]
        refine.new_object()  # the clicks below describe an object of their own, not added to this box
        # a click on the next image is not added to the box drawn on the previous one (the panel
        # shows it in the same image layer)
        points = refine.start_clicks()
        qtbot.waitUntil(lambda: refine.pending == 0, timeout=WAIT_MS)
        points.add(np.array([[20.0, 25.0]]))
        qtbot.waitUntil(lambda: refine.pending == 0 and len(refine.click_seconds) == 1, timeout=WAIT_MS)
        click = labels.metadata["delightsam"]["boxes"][-1]
        assert click["clicks"] == [[25.5, 20.5, 1]] and click["box"] is None
    finally:
        rw.REFINER_CACHE.clear()
