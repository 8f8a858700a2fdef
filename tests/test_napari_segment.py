"""The "De-LightSAM segment" widget in a real napari viewer (pytest-qt, run under Xvfb)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_delightsam.atomic_files import sha256_file
from napari_delightsam.widgets import core
from napari_delightsam.widgets.model_cache import MODEL_CACHE

pytestmark = pytest.mark.gui

WAIT_MS = 60_000


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny De-LightSAM (img_size 128) saved as a real checkpoint file: fast on CPU."""
    import torch

    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.model import DeLightSAM

    torch.manual_seed(0)
    model = DeLightSAM(tiny_config()).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, model)
    return path


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DELIGHTSAM_CONFIG_DIR", str(tmp_path / "config"))
    from napari.utils.notifications import notification_manager

    notification_manager.records.clear()
    yield
    monkeypatch.setattr(MODEL_CACHE, "loader", MODEL_CACHE.loader)


def _messages(severity: str | None = None) -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records
            if severity is None or str(n.severity).lower() == severity]


def _open(viewer, tiny_checkpoint):
    _, widget = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM segment")
    assert widget.use_checkpoint(tiny_checkpoint)
    widget.device_combo.setCurrentText("cpu")
    widget.modality_combo.setCurrentText("dermoscopy")
    return widget


def _run_and_wait(qtbot, widget, **kwargs):
    worker = widget.run(**kwargs)
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    return worker


def _sample_rgb():
    from napari_delightsam.sample_data import load_sample

    return load_sample("synthetic_dermoscopy")[0]


class _Spy:
    """Wraps a Segmenter: counts segment() calls, optionally slows them down."""

    def __init__(self, inner, delay=0.0):
        self.inner, self.delay, self.calls = inner, delay, 0
        self.checkpoint_path, self.checkpoint_sha256 = inner.checkpoint_path, inner.checkpoint_sha256
        self.device = inner.device
        self.release = threading.Event()

    def segment(self, image, modality="auto", threshold=0.5):
        self.calls += 1
        if self.delay:
            self.release.wait(self.delay)
        return self.inner.segment(image, modality=modality, threshold=threshold)


def _install_spy(monkeypatch, delay=0.0) -> _Spy:
    from napari_delightsam.widgets.model_cache import default_loader

    holder = {}

    def loader(spec, device):
        holder["spy"] = _Spy(default_loader(spec, device), delay)
        return holder["spy"]

    MODEL_CACHE.clear()
    monkeypatch.setattr(MODEL_CACHE, "loader", loader)
    return holder


def test_run_adds_mask_heatmap_probability_with_input_shape_and_scale(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    image = _sample_rgb()
    viewer.add_image(image, name="lesion", rgb=True, scale=(0.5, 0.25), translate=(10.0, -3.0))
    widget = _open(viewer, tiny_checkpoint)
    widget.image_combo.value = viewer.layers["lesion"]
    _run_and_wait(qtbot, widget)

    names = core.output_names("lesion")
    mask, heat, prob = (viewer.layers[names[k]] for k in ("mask", "heatmap", "probability"))
    for layer in (mask, heat, prob):
        assert layer.data.shape == image.shape[:2]
        np.testing.assert_allclose(layer.scale, (0.5, 0.25))
        np.testing.assert_allclose(layer.translate, (10.0, -3.0))
    assert type(mask).__name__ == "Labels" and mask.data.dtype == np.uint8
    assert heat.colormap.name == "inferno" and heat.opacity == pytest.approx(0.5) and heat.visible
    assert not prob.visible
    assert prob.data.dtype == np.float32 and 0.0 <= prob.data.min() <= prob.data.max() <= 1.0
    np.testing.assert_array_equal(mask.data, (prob.data > 0.5).astype(np.uint8))
    record = mask.metadata[core.METADATA_KEY]
    assert record["model_file"] == str(tiny_checkpoint)
    assert record["model_sha256"] == sha256_file(tiny_checkpoint)
    assert record["modality"] == "dermoscopy" and record["threshold"] == 0.5
    assert record["input_layer"] == "lesion" and record["input_shape"] == list(image.shape)
    # the heatmap toggle
    widget.heatmap_check.setChecked(False)
    assert not heat.visible
    assert not _messages("error")


def test_output_layers_arrive_one_per_event_loop_turn_mask_first_and_on_top(make_napari_viewer, qtbot,
                                                                             tiny_checkpoint, monkeypatch):
    """A new napari layer costs 100-250 ms of GUI thread on a small CPU: the result handler adds
    the mask only; the heatmap and the probability map follow in later turns, under the mask."""
    viewer = make_napari_viewer()
    viewer.add_image(_sample_rgb(), name="lesion", rgb=True)
    widget = _open(viewer, tiny_checkpoint)
    names = core.output_names("lesion")
    seen_in_handler: list[list[str]] = []
    handler = widget._on_returned

    def spying(payload):
        handler(payload)
        seen_in_handler.append([layer.name for layer in viewer.layers] + [f"busy={widget.busy}"])

    monkeypatch.setattr(widget, "_on_returned", spying)
    _run_and_wait(qtbot, widget)
    assert seen_in_handler == [["lesion", names["mask"], "busy=True"]]  # a new run waits for the layers
    order = [layer.name for layer in viewer.layers]
    assert order == ["lesion", names["probability"], names["heatmap"], names["mask"]]
    assert viewer.layers.selection.active is viewer.layers[names["mask"]]  # ready to paint on
    assert widget._last.heatmap_layer() is viewer.layers[names["heatmap"]]
    assert widget._last.probability_layer() is viewer.layers[names["probability"]]
    # a second run updates the three layers in place: same objects, same order
    before = [id(layer) for layer in viewer.layers]
    _run_and_wait(qtbot, widget)
    assert [id(layer) for layer in viewer.layers] == before


def test_a_failing_output_layer_does_not_leave_the_widget_busy(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                 monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(_sample_rgb(), name="lesion", rgb=True)
    widget = _open(viewer, tiny_checkpoint)
    names = core.output_names("lesion")
    real = widget._upsert_image

    def failing(name, data, kind, *args, **kwargs):
        if kind == "heatmap":
            raise RuntimeError("napari refused the layer")
        return real(name, data, kind, *args, **kwargs)

    monkeypatch.setattr(widget, "_upsert_image", failing)
    with qtbot.capture_exceptions() as exceptions:
        _run_and_wait(qtbot, widget)
        assert names["mask"] in viewer.layers and names["probability"] in viewer.layers
        assert names["heatmap"] not in viewer.layers and not widget.busy
        _run_and_wait(qtbot, widget)  # the next run starts and ends
    assert [str(exc) for _, exc, _ in exceptions] == ["napari refused the layer"] * 2


def test_layer_warmup_imports_naparis_first_labels_modules_once():
    from napari_delightsam.widgets import layer_warmup

    warmed = layer_warmup.warm_layer_machinery()
    assert "pandas" in warmed and "skimage.color.colorconv" in warmed
    assert all(name in sys.modules for name in warmed)
    assert layer_warmup.warm_layer_machinery() == warmed
    assert layer_warmup.start_layer_warmup() is None  # already done: no thread


@pytest.mark.data
def test_real_dermoscopy_image(make_napari_viewer, qtbot, tiny_checkpoint, shared_data_dir):
    from napari_delightsam.image_files import read_image

    files = sorted((shared_data_dir / "dermoscopy").glob("*/images/*"))
    if not files:
        pytest.skip("no dermoscopy images in the data folder")
    image = read_image(files[0])
    viewer = make_napari_viewer()
    viewer.add_image(image, name="real", rgb=image.ndim == 3, scale=(2.0, 2.0))
    widget = _open(viewer, tiny_checkpoint)
    widget.image_combo.value = viewer.layers["real"]
    _run_and_wait(qtbot, widget)
    for kind in ("mask", "heatmap", "probability"):
        layer = viewer.layers[core.output_names("real")[kind]]
        assert layer.data.shape == image.shape[:2]
        np.testing.assert_allclose(layer.scale, (2.0, 2.0))


def test_rethreshold_and_instances_without_a_model_call(make_napari_viewer, qtbot, tiny_checkpoint, monkeypatch):
    holder = _install_spy(monkeypatch)
    viewer = make_napari_viewer()
    viewer.add_image(_sample_rgb(), name="lesion", rgb=True)
    widget = _open(viewer, tiny_checkpoint)
    _run_and_wait(qtbot, widget)
    spy = holder["spy"]
    assert spy.calls == 1
    loads = MODEL_CACHE.loads
    mask = viewer.layers["lesion_delightsam_mask"]
    prob = viewer.layers["lesion_delightsam_probability"].data
    for t in (0.1, 0.35, 0.5, 0.62, 0.9):
        widget.threshold_slider.setValue(t)
        np.testing.assert_array_equal(mask.data, (prob > t).astype(np.uint8))
        assert mask.metadata[core.METADATA_KEY]["threshold"] == pytest.approx(t)
    widget.threshold_slider.setValue(float(np.median(prob)))
    widget.instances_check.setChecked(True)
    from skimage.measure import label

    expected = label(prob > widget.threshold_slider.value(), connectivity=2)
    np.testing.assert_array_equal(mask.data, expected)
    assert spy.calls == 1  # no network call for any of it
    assert MODEL_CACHE.loads == loads
    # the same rule as the Segmenter's own re-threshold
    from napari_delightsam.inference import threshold_probability

    widget.instances_check.setChecked(False)
    np.testing.assert_array_equal(mask.data > 0, threshold_probability(prob, widget.threshold_slider.value()))
    # a second run reuses the loaded model
    _run_and_wait(qtbot, widget)
    assert MODEL_CACHE.loads == loads and spy.calls == 2


def test_edited_mask_is_never_overwritten(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    viewer.add_image(_sample_rgb(), name="lesion", rgb=True)
    widget = _open(viewer, tiny_checkpoint)
    _run_and_wait(qtbot, widget)
    mask = viewer.layers["lesion_delightsam_mask"]
    # an unedited mask is updated in place by a new run
    _run_and_wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers].count("lesion_delightsam_mask") == 1
    assert "lesion_delightsam_mask [2]" not in viewer.layers
    # the user paints a correction
    mask.paint((100, 100), 2)
    painted = mask.data.copy()
    _run_and_wait(qtbot, widget)
    assert "lesion_delightsam_mask [2]" in viewer.layers
    np.testing.assert_array_equal(mask.data, painted)
    assert any("kept your edited layer" in m for m in _messages())
    # re-thresholding now drives the new layer; the painted one stays untouched
    widget.threshold_slider.setValue(0.3)
    np.testing.assert_array_equal(mask.data, painted)
    new = viewer.layers["lesion_delightsam_mask [2]"]
    prob = viewer.layers["lesion_delightsam_probability"].data
    np.testing.assert_array_equal(new.data, (prob > 0.3).astype(np.uint8))
    # painting on the new layer, then moving the threshold -> a third layer, not a repaint
    new.paint((10, 10), 3)
    painted_new = new.data.copy()
    widget.threshold_slider.setValue(0.7)
    np.testing.assert_array_equal(new.data, painted_new)
    assert "lesion_delightsam_mask [3]" in viewer.layers


def test_stack_slice_by_slice_and_cancel(make_napari_viewer, qtbot, tiny_checkpoint, monkeypatch):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 255, (4, 48, 40), dtype=np.uint8)
    viewer.add_image(stack, name="stack", scale=(3.0, 1.0, 1.0))
    widget = _open(viewer, tiny_checkpoint)
    widget.image_combo.value = viewer.layers["stack"]
    _run_and_wait(qtbot, widget)
    mask = viewer.layers["stack_delightsam_mask"]
    assert mask.data.shape == (4, 48, 40)
    np.testing.assert_allclose(mask.scale, (3.0, 1.0, 1.0))
    assert widget.progress_bar.value() == 4

    # cancel: slow slices, cancel after the first one -> no layer changes
    holder = _install_spy(monkeypatch, delay=0.5)
    viewer.layers.remove("stack_delightsam_mask")
    before = [layer.name for layer in viewer.layers]
    worker = widget.run()
    qtbot.waitUntil(lambda: "spy" in holder and holder["spy"].calls >= 1, timeout=WAIT_MS)
    widget.cancel()
    holder["spy"].release.set()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert worker.abort_requested
    assert holder["spy"].calls < 4
    assert [layer.name for layer in viewer.layers] == before
    assert "Cancelled" in widget.status_label.text()


def test_bad_inputs_give_notifications_not_exceptions(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _open(viewer, tiny_checkpoint)
    # no image layer at all
    assert widget.run() is None
    assert any("no image layer" in m for m in _messages("warning"))
    # 3D + channels (not RGB)
    viewer.add_image(np.zeros((2, 3, 16, 16), dtype=np.float32), name="zc")
    widget.image_combo.value = viewer.layers["zc"]
    assert widget.run() is None
    assert any("'zc'" in m and "dimensions" in m for m in _messages("error"))
    # a layer whose data napari holds but the model refuses (NaN) -> the worker's error, notified
    nan = np.ones((32, 32), dtype=np.float32)
    nan[3, 3] = np.nan
    viewer.add_image(nan, name="nan")
    widget.image_combo.value = viewer.layers["nan"]
    _run_and_wait(qtbot, widget)
    assert any("NaN" in m or "nan" in m for m in _messages("error"))
    assert "nan_delightsam_mask" not in viewer.layers
    # empty / complex data cannot be added to napari, but a plugin-made layer could hold them
    for data, words in ((np.zeros((0, 16)), "empty"), (np.zeros((8, 8), np.complex64), "complex64")):
        fake = SimpleNamespace(name="odd", data=data, rgb=False, multiscale=False, scale=(1, 1), translate=(0, 0))
        widget.image_combo.set_choice("odd", fake)
        widget.image_combo.value = fake
        assert widget.run() is None
        assert any("'odd'" in m and words in m for m in _messages("error"))
    assert not widget.busy


def test_device_error_offers_retry_on_cpu(make_napari_viewer, qtbot, tiny_checkpoint, monkeypatch):
    from napari_delightsam.widgets.model_cache import default_loader

    def loader(spec, device):
        if device != "cpu":
            raise RuntimeError("CUDA error: out of memory (simulated)")
        return default_loader(spec, device)

    MODEL_CACHE.clear()
    monkeypatch.setattr(MODEL_CACHE, "loader", loader)
    viewer = make_napari_viewer()
    viewer.add_image(_sample_rgb(), name="lesion", rgb=True)
    widget = _open(viewer, tiny_checkpoint)
    _run_and_wait(qtbot, widget, device="cuda")
    from napari.utils.notifications import notification_manager

    offer = [n for n in notification_manager.records if n.actions]
    assert offer and "out of memory" in str(offer[-1].message)
    (label, callback), = offer[-1].actions
    assert label == "Retry on CPU"
    assert "lesion_delightsam_mask" not in viewer.layers
    callback(None)
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert "lesion_delightsam_mask" in viewer.layers
    assert widget.device_combo.currentText() == "cpu"


def test_runs_freeze_the_collector_and_removed_layers_are_still_freed(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                        monkeypatch):
    """gc_policy: a run freezes what is alive (full collections then skip it), a second run frees
    the first one's result without a full collection of the frozen objects, and layers removed
    from the viewer are freed although they were frozen."""
    import gc
    import weakref

    from napari_delightsam.widgets import gc_policy

    viewer = make_napari_viewer()
    viewer.add_image(_sample_rgb(), name="lesion", rgb=True)
    widget = _open(viewer, tiny_checkpoint)
    widget.image_combo.value = viewer.layers["lesion"]
    gc.unfreeze()
    _run_and_wait(qtbot, widget)
    assert gc.get_freeze_count() > 1000
    first_run = weakref.ref(widget._last.run)
    widget.threshold_slider.setValue(0.3)  # the same layers, updated in place
    _run_and_wait(qtbot, widget)
    gc.collect()
    assert first_run() is None  # nothing frozen holds a finished run's result
    layers = [weakref.ref(layer) for layer in viewer.layers]
    assert len(layers) == 4
    frozen_at_collections = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: (frozen_at_collections.append(gc.get_freeze_count()), real_collect(*a))[1])
    viewer.layers.remove(viewer.layers[-1])  # one at a time: clear() collects once, at the end
    monkeypatch.setattr(gc, "collect", real_collect)
    # napari collects on every removal (its canvas frees OpenGL objects so): nothing frozen by then
    assert frozen_at_collections and set(frozen_at_collections) == {0}
    qtbot.waitUntil(lambda: layers[-1]() is None, timeout=5_000)  # the policy's collection
    # removed while nothing is frozen, then work starts at once: the layer is not frozen as garbage
    viewer.layers.remove(viewer.layers[-1])
    gc_policy.freeze_long_lived()
    qtbot.waitUntil(lambda: layers[-2]() is None, timeout=5_000)
    viewer.layers.clear()
    qtbot.waitUntil(lambda: all(ref() is None for ref in layers), timeout=5_000)


def test_run_twice_and_delete_input_mid_run(make_napari_viewer, qtbot, tiny_checkpoint, monkeypatch):
    holder = _install_spy(monkeypatch, delay=5.0)
    viewer = make_napari_viewer()
    viewer.add_image(_sample_rgb(), name="lesion", rgb=True)
    widget = _open(viewer, tiny_checkpoint)
    first = widget.run()
    assert first is not None
    assert widget.run() is None  # second press while running: told, not started
    widget.run_button.click()  # the button is disabled while running
    assert any("already running" in m for m in _messages("info"))
    qtbot.waitUntil(lambda: "spy" in holder and holder["spy"].calls == 1, timeout=WAIT_MS)
    viewer.layers.remove("lesion")
    holder["spy"].release.set()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert holder["spy"].calls == 1
    assert [layer.name for layer in viewer.layers] == []
    assert any("was removed during the run" in m for m in _messages("warning"))


def test_closing_the_viewer_during_a_run(make_napari_viewer, qtbot, tiny_checkpoint, monkeypatch):
    holder = _install_spy(monkeypatch, delay=5.0)
    viewer = make_napari_viewer()
    stack = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    viewer.add_image(stack, name="stack")
    widget = _open(viewer, tiny_checkpoint)
    widget.image_combo.value = viewer.layers["stack"]
    worker = widget.run()
    done = []
    worker.finished.connect(lambda: done.append(True))
    qtbot.waitUntil(lambda: "spy" in holder and holder["spy"].calls == 1, timeout=WAIT_MS)
    viewer.close()
    holder["spy"].release.set()
    qtbot.waitUntil(lambda: bool(done), timeout=WAIT_MS)
    assert holder["spy"].calls < 3  # the worker stopped instead of finishing the stack
    time.sleep(0.1)


def test_export_button_writes_files_that_read_back_and_asks_before_overwriting(
    make_napari_viewer, qtbot, tiny_checkpoint, tmp_path, monkeypatch
):
    import json

    from napari_delightsam.widgets.export import read_labels

    viewer = make_napari_viewer()
    viewer.add_image(_sample_rgb(), name="lesion", rgb=True)
    widget = _open(viewer, tiny_checkpoint)
    widget.threshold_slider.setValue(0.45)
    _run_and_wait(qtbot, widget)
    mask = viewer.layers["lesion_delightsam_mask"]
    mask.paint((50, 50), 2)  # a correction: exported as is
    target = tmp_path / "out" / "lesion mask.png"
    target.parent.mkdir()
    monkeypatch.setattr(widget, "_ask_save_path", lambda suggested: str(target))
    asked = []
    monkeypatch.setattr(widget, "_confirm_overwrite", lambda paths: asked.append(paths) or False)

    written = widget.export()
    assert written == [target, target.with_name("lesion mask.png.json")]
    np.testing.assert_array_equal(read_labels(target), mask.data)
    record = json.loads(written[1].read_text())
    assert record["model_sha256"] == sha256_file(tiny_checkpoint)
    assert record["threshold"] == pytest.approx(0.45) and record["modality"] == "dermoscopy"
    assert record["modality_used"] == "dermoscopy"
    assert record["input_layer"] == "lesion" and record["edited_after_segmentation"] is True

    # exists -> asked; "No" keeps the file
    before = target.read_bytes()
    mask.paint((120, 120), 1)
    assert widget.export() == []
    assert len(asked) == 1 and target.read_bytes() == before
    # "Yes" replaces it
    monkeypatch.setattr(widget, "_confirm_overwrite", lambda paths: True)
    assert widget.export()
    np.testing.assert_array_equal(read_labels(target), mask.data)

    # TIFF through the same button, instance ids
    widget.instances_check.setChecked(True)
    tif = tmp_path / "out" / "ids.tif"
    # (the painted layer is kept; the instances went to a new layer, which is selected)
    assert viewer.layers.selection.active.name == "lesion_delightsam_mask [2]"
    assert widget.export(tif)
    np.testing.assert_array_equal(read_labels(tif), viewer.layers["lesion_delightsam_mask [2]"].data)


def test_model_choice_is_remembered(make_napari_viewer, tiny_checkpoint):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM segment")
    labels = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    assert "untrained (random weights, for testing)" in labels and labels[-1] == "choose checkpoint file…"
    assert widget.use_checkpoint(tiny_checkpoint)
    viewer2 = make_napari_viewer()
    _, again = viewer2.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM segment")
    assert again.current_model() == str(tiny_checkpoint.resolve())
    # untrained chosen by the user is remembered too
    index = again.model_combo.findData("untrained")
    again.model_combo.setCurrentIndex(index)
    again.model_combo.on_activated(index)
    viewer3 = make_napari_viewer()
    _, third = viewer3.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM segment")
    assert third.current_model() == "untrained"
    # a file that is not a checkpoint is refused with a message, the selection stays
    bad = Path(third.current_model() if False else tiny_checkpoint).with_name("bad.safetensors")
    bad.write_bytes(b"not a checkpoint")
    assert not third.use_checkpoint(bad)
    assert third.current_model() == "untrained"
    assert any("cannot use checkpoint" in m for m in _messages("error"))
    # the annotate widget has the same menu, and the choice made in one is the other's default
    _, annotate = viewer3.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM annotate")
    entries = [annotate.model_combo.itemData(i) for i in range(annotate.model_combo.count())]
    assert entries == [third.model_combo.itemData(i) for i in range(third.model_combo.count())]
    assert annotate.current_model() == "untrained"
    index = annotate.model_combo.findData(str(tiny_checkpoint.resolve()))
    annotate.model_combo.setCurrentIndex(index)
    annotate.model_combo.on_activated(index)
    viewer4 = make_napari_viewer()
    _, fourth = viewer4.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM segment")
    assert fourth.current_model() == str(tiny_checkpoint.resolve())


def test_changing_layers_during_a_run_uses_the_snapshot(make_napari_viewer, qtbot, tiny_checkpoint, monkeypatch):
    holder = _install_spy(monkeypatch, delay=5.0)
    viewer = make_napari_viewer()
    image = _sample_rgb()
    layer = viewer.add_image(image, name="lesion", rgb=True, scale=(2.0, 2.0))
    viewer.add_image(np.zeros((20, 20), dtype=np.uint8), name="other")
    widget = _open(viewer, tiny_checkpoint)
    widget.image_combo.value = viewer.layers["lesion"]
    widget.run()
    qtbot.waitUntil(lambda: "spy" in holder and holder["spy"].calls == 1, timeout=WAIT_MS)
    # the user edits the input, rescales it and picks another layer while the worker runs
    layer.data = np.zeros((64, 64, 3), dtype=np.uint8)
    layer.scale = (5.0, 5.0)
    widget.image_combo.value = viewer.layers["other"]
    holder["spy"].release.set()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    mask = viewer.layers["lesion_delightsam_mask"]
    assert mask.data.shape == image.shape[:2]  # what was segmented: the snapshot
    np.testing.assert_allclose(mask.scale, (2.0, 2.0))
    assert "other_delightsam_mask" not in viewer.layers
    assert not _messages("error")


@pytest.mark.slow
def test_hundred_runs_do_not_leak_layers_or_threads(make_napari_viewer, qtbot, tiny_checkpoint):
    from qtpy.QtCore import QThreadPool

    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), name="small")
    widget = _open(viewer, tiny_checkpoint)
    widget.image_combo.value = viewer.layers["small"]
    _run_and_wait(qtbot, widget)
    threads = threading.active_count()
    for i in range(100):
        widget.threshold_slider.setValue(0.3 + 0.004 * i)
        _run_and_wait(qtbot, widget)
    assert len(viewer.layers) == 4
    qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0, timeout=WAIT_MS)
    assert threading.active_count() <= threads + 1
    assert not _messages("error")


def test_layer_pickers_follow_the_viewer(make_napari_viewer):
    """magicgui's layer combo boxes, refilled by napari through the widgets' reset_choices."""
    viewer = make_napari_viewer()
    a = viewer.add_image(np.zeros((16, 16), dtype=np.uint8), name="a")
    _, seg = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM segment")
    _, ft = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM fine-tune")

    def names(combo):
        return [layer.name for layer in combo.choices]

    assert names(seg.image_combo) == ["a"] and names(ft.image_combo) == ["a"] and names(ft.labels_combo) == []
    b = viewer.add_image(np.zeros((16, 16), dtype=np.uint8), name="b")
    viewer.add_labels(np.zeros((16, 16), dtype=np.uint8), name="b_corrected")
    assert sorted(names(seg.image_combo)) == ["a", "b"] and sorted(names(ft.image_combo)) == ["a", "b"]
    assert names(ft.labels_combo) == ["b_corrected"]
    # the chosen layer stays chosen when renamed or moved
    seg.image_combo.value = b
    b.name = "b renamed"
    assert seg.image_combo.value is b and seg.image_combo.current_choice == "b renamed"
    viewer.layers.move(viewer.layers.index(b), 0)
    assert seg.image_combo.value is b
    # the widget's own heatmap / probability outputs are not offered as inputs
    viewer.add_image(np.zeros((16, 16), dtype=np.float32), name="a_delightsam_heatmap",
                     metadata={core.METADATA_KEY: {"kind": "heatmap"}})
    assert "a_delightsam_heatmap" not in names(seg.image_combo) + names(ft.image_combo)
    # a removed layer leaves every combo
    viewer.layers.remove(b)
    assert names(seg.image_combo) == ["a"] and seg.image_combo.value is a
    assert names(ft.image_combo) == ["a"]
    viewer.layers.remove("b_corrected")
    assert names(ft.labels_combo) == [] and ft.labels_combo.value is None


# -- tiled inference and multiscale layers ---------------------------------------------------------


class _TileSpy(_Spy):
    """A Segmenter wrapper that also offers ``segment_steps``; counts tile batches and can wait
    after the first one (so a test can cancel between tiles)."""

    def __init__(self, inner, delay=0.0):
        super().__init__(inner, delay)
        self.batches = 0

    def segment_steps(self, image, modality="auto", threshold=0.5, **kwargs):
        gen = self.inner.segment_steps(image, modality, threshold, tile_batch_size=1, **kwargs)
        while True:
            try:
                item = next(gen)
            except StopIteration as stop:
                return stop.value
            self.batches += 1
            if self.delay:
                self.release.wait(self.delay)
            yield item


def _install_tile_spy(monkeypatch, delay=0.0):
    from napari_delightsam.widgets.model_cache import default_loader

    holder = {}

    def loader(spec, device):
        holder["spy"] = _TileSpy(default_loader(spec, device), delay)
        return holder["spy"]

    MODEL_CACHE.clear()
    monkeypatch.setattr(MODEL_CACHE, "loader", loader)
    return holder


def test_large_microscopy_image_is_tiled_with_progress_and_provenance(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                      monkeypatch):
    holder = _install_tile_spy(monkeypatch)
    viewer = make_napari_viewer()
    image = np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8)  # > 1.5 x 128
    viewer.add_image(image, name="field", rgb=True)
    widget = _open(viewer, tiny_checkpoint)
    widget.modality_combo.setCurrentText("microscopy")
    assert widget.tiling_combo.currentText() == "auto"
    _run_and_wait(qtbot, widget)
    mask = viewer.layers["field_delightsam_mask"]
    assert mask.data.shape == (300, 260)
    record = mask.metadata[core.METADATA_KEY]
    assert record["tiling"] == "auto" and record["tiles"]["tiles"] == holder["spy"].batches > 1
    assert record["refiner"] is None  # the tiny test model has no refiner (the bundled one names its own)
    assert widget.progress_bar.value() == widget.progress_bar.maximum() == 1  # the plane is done

    widget.tiling_combo.setCurrentText("off")
    _run_and_wait(qtbot, widget)
    record = viewer.layers["field_delightsam_mask"].metadata[core.METADATA_KEY]
    assert record["tiling"] == "off" and record["tiles"] is None


def test_cancel_between_tiles(make_napari_viewer, qtbot, tiny_checkpoint, monkeypatch):
    holder = _install_tile_spy(monkeypatch, delay=0.5)
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(1).integers(0, 255, (400, 400), dtype=np.uint8), name="big")
    widget = _open(viewer, tiny_checkpoint)
    widget.modality_combo.setCurrentText("fundus")
    widget.tiling_combo.setCurrentText("on")
    before = [layer.name for layer in viewer.layers]
    worker = widget.run()
    qtbot.waitUntil(lambda: "spy" in holder and holder["spy"].batches >= 1, timeout=WAIT_MS)
    assert "tile" in widget.status_label.text() or "Segmenting" in widget.status_label.text()
    widget.cancel()
    holder["spy"].release.set()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert worker.abort_requested
    assert holder["spy"].batches < 16  # stopped long before the 4 x 4 = 16 tiles
    assert [layer.name for layer in viewer.layers] == before


def test_multiscale_layer_at_full_resolution_or_a_chosen_level(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    base = np.random.default_rng(2).integers(0, 255, (256, 192), dtype=np.uint8)
    viewer.add_image([base, base[::2, ::2], base[::4, ::4]], name="pyr", multiscale=True, scale=(0.5, 0.5))
    widget = _open(viewer, tiny_checkpoint)
    widget.modality_combo.setCurrentText("colonoscopy")
    widget.image_combo.value = viewer.layers["pyr"]
    _run_and_wait(qtbot, widget)
    mask = viewer.layers["pyr_delightsam_mask"]
    assert mask.data.shape == (256, 192)
    np.testing.assert_allclose(mask.scale, (0.5, 0.5))
    widget.level_spin.setValue(1)
    _run_and_wait(qtbot, widget)
    mask = viewer.layers["pyr_delightsam_mask"]
    assert mask.data.shape == (128, 96)
    np.testing.assert_allclose(mask.scale, (1.0, 1.0))  # the same physical extent
    assert mask.metadata[core.METADATA_KEY]["pyramid_level"] == 1
    widget.level_spin.setValue(7)  # more than the layer has: its coarsest level
    _run_and_wait(qtbot, widget)
    assert viewer.layers["pyr_delightsam_mask"].data.shape == (64, 48)
