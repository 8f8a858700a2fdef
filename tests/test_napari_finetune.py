"""The "De-LightSAM fine-tune" widget: pairs from layers, a child-process run, stop, hand-over."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_delightsam.sample_data import load_sample
from napari_delightsam.widgets import finetune_job

pytestmark = pytest.mark.gui

WAIT_MS = 240_000


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
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


def _messages(severity=None):
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records
            if severity is None or str(n.severity).lower() == severity]


def _viewer_with_pairs(make_napari_viewer):
    viewer = make_napari_viewer()
    image, mask = load_sample("synthetic_dermoscopy")
    viewer.add_image(image, name="lesion", rgb=True)
    viewer.add_labels((mask > 0).astype(np.uint8), name="lesion_corrected")
    viewer.add_image(image[:, ::-1].copy(), name="lesion flipped", rgb=True)
    viewer.add_labels((mask[:, ::-1] > 0).astype(np.uint8), name="lesion flipped_corrected")
    return viewer


def _open_both(viewer, tiny_checkpoint, out_dir):
    _, seg = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM segment")
    assert seg.use_checkpoint(tiny_checkpoint)
    seg.device_combo.setCurrentText("cpu")
    seg.modality_combo.setCurrentText("dermoscopy")
    _, ft = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM fine-tune")
    assert ft.add_pair("lesion", "lesion_corrected", "dermoscopy")
    assert ft.add_pair("lesion flipped", "lesion flipped_corrected", "dermoscopy")
    assert ft.pairs_table.rowCount() == 2
    ft.device_combo.setCurrentText("cpu")
    ft.img_size_combo.setCurrentText("128")
    ft.batch_spin.setValue(2)
    ft.out_edit.setText(str(out_dir))
    return seg, ft


@pytest.mark.slow
def test_finetune_runs_in_a_child_stops_cleanly_and_hands_over(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    viewer = _viewer_with_pairs(make_napari_viewer)
    out = tmp_path / "run"
    seg, ft = _open_both(viewer, tiny_checkpoint, out)
    assert str(tiny_checkpoint.resolve()) in ft.init_label.text() or "tiny.safetensors" in ft.init_label.text()
    ft.epochs_spin.setValue(50)
    ft.steps_spin.setValue(2)
    worker = ft.start()
    assert worker is not None and ft.busy
    assert ft.start() is None  # a second start while running is refused with a message
    # let it finish one epoch (validation -> best checkpoint), then press Stop
    qtbot.waitUntil(lambda: "epoch 1:" in ft.log.toPlainText() or not ft.busy, timeout=WAIT_MS)
    assert ft.busy, ft.log.toPlainText()
    assert (out / "best.safetensors").is_file()
    job = ft._holder["job"]
    assert job.running
    ft.stop_button.click()
    qtbot.waitUntil(lambda: not ft.busy, timeout=WAIT_MS)
    assert not job.running
    log = ft.log.toPlainText()
    assert "before training: val Dice" in log and "epoch 1:" in log, log
    assert ft.last_summary["end"]["status"] == "stopped", log  # a clean stop, reported by the trainer
    assert ft.last_summary["returncode"] == 0
    assert len(ft.plot.loss) >= 2 and len(ft.plot.dice) >= 2
    best = out / "best.safetensors"
    assert ft.best_checkpoint == str(best)
    # the segment widget switched to the new model; the old one is still selectable
    assert seg.current_model() == str(best.resolve())
    items = [seg.model_combo.itemData(i) for i in range(seg.model_combo.count())]
    assert str(tiny_checkpoint.resolve()) in items
    # the responsiveness probe ticked on the GUI thread during the whole run
    assert ft.tick_stats["ticks"] > 10
    assert "GUI responsiveness" in log
    # and the new model segments
    seg.image_combo.value = viewer.layers["lesion"]
    seg.run()
    qtbot.waitUntil(lambda: not seg.busy, timeout=WAIT_MS)
    mask = viewer.layers["lesion_delightsam_mask"]
    assert mask.metadata["delightsam"]["model_file"] == str(best.resolve())
    assert not _messages("error")


@pytest.mark.slow
def test_finetune_completes_a_short_run(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    viewer = _viewer_with_pairs(make_napari_viewer)
    out = tmp_path / "short"
    seg, ft = _open_both(viewer, tiny_checkpoint, out)
    ft.epochs_spin.setValue(1)
    ft.steps_spin.setValue(1)
    worker = ft.start()
    done = []
    worker.finished.connect(lambda: done.append(True))
    qtbot.waitUntil(lambda: bool(done), timeout=WAIT_MS)
    summary = ft.last_summary
    assert summary is not None and summary["returncode"] == 0, summary
    assert summary["end"]["status"] == "finished"
    assert summary["counts"] == {"dermoscopy": 2}
    assert ft.progress_bar.value() == 1
    assert seg.current_model() == str((out / "best.safetensors").resolve())
    # the temporary dataset folder is gone
    assert not Path(ft._holder["tmp"]).exists()


FAKE_TRAINER = textwrap.dedent(
    """
    import json, time, sys
    print(json.dumps({"event": "start", "epochs": 1000, "steps_per_epoch": 1, "n_train": 1, "n_val": 1,
                      "device": "cpu"}), flush=True)
    for step in range(1, 100000):
        print(json.dumps({"event": "step", "epoch": 0, "step": 1, "steps": 1, "global_step": step,
                          "loss": 1.0}), flush=True)
        time.sleep(0.05)
    """
)


def test_closing_the_viewer_stops_the_training_child(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(finetune_job, "build_train_command", lambda *a, **k: [sys.executable, str(script)])
    viewer = _viewer_with_pairs(make_napari_viewer)
    _, ft = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM fine-tune")
    assert ft.add_pair("lesion", "lesion_corrected", "ultrasound")
    ft.out_edit.setText(str(tmp_path / "out"))
    worker = ft.start()
    done = []
    worker.finished.connect(lambda: done.append(True))
    qtbot.waitUntil(lambda: len(ft.plot.loss) >= 3, timeout=WAIT_MS)
    job = ft._holder["job"]
    assert job.running
    viewer.close()
    deadline = time.monotonic() + 60
    while job.running and time.monotonic() < deadline:
        qtbot.wait(50)
    assert not job.running
    qtbot.waitUntil(lambda: bool(done), timeout=WAIT_MS)


def test_bad_fine_tune_inputs_are_notifications(make_napari_viewer, qtbot, tmp_path):
    from napari_delightsam.widgets.core import package_dir

    viewer = _viewer_with_pairs(make_napari_viewer)
    viewer.add_labels(np.zeros((10, 10), dtype=np.uint8), name="small")
    _, ft = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM fine-tune")
    assert ft.start() is None
    assert any("add at least one" in m for m in _messages("warning"))
    assert not ft.add_pair("lesion", "small", "dermoscopy")
    assert any("'small'" in m and "shape" in m for m in _messages("error"))
    assert ft.add_pair("lesion", "lesion_corrected", "dermoscopy")
    assert not ft.add_pair("lesion", "lesion_corrected", "dermoscopy")  # no duplicates
    ft.out_edit.setText(str(package_dir() / "weights"))
    assert ft.start() is None
    assert any("installed package" in m for m in _messages("error"))
    # a pair whose layer was deleted
    ft.out_edit.setText(str(tmp_path / "o"))
    viewer.layers.remove("lesion_corrected")
    assert ft.start() is None
    assert any("is gone" in m for m in _messages("error"))
    ft.pairs_table.selectRow(0)
    ft.remove_selected_pairs()
    assert ft.pairs == [] and ft.pairs_table.rowCount() == 0
    assert not ft.busy


def test_pair_suggestions_follow_the_segment_widget_naming(make_napari_viewer):
    viewer = make_napari_viewer()
    image, mask = load_sample("synthetic_microscopy")
    layers = viewer.open_sample("napari-delightsam", "synthetic_microscopy")
    assert layers
    viewer.add_labels((mask > 0).astype(np.uint8), name="synthetic_microscopy_delightsam_mask")
    _, ft = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM fine-tune")
    ft.image_combo.value = viewer.layers["synthetic_microscopy"]
    ft._suggest_labels("synthetic_microscopy")
    assert ft.labels_combo.value is viewer.layers["synthetic_microscopy_delightsam_mask"]
    assert ft.pair_modality_combo.currentText() == "microscopy"
    assert ft.add_pair_from_combos()
    assert ft.pairs == [{"image": "synthetic_microscopy", "labels": "synthetic_microscopy_delightsam_mask",
                         "modality": "microscopy"}]


OOM_TRAINER = textwrap.dedent(
    """
    import json, sys
    print(json.dumps({"event": "start", "epochs": 1, "steps_per_epoch": 1}), flush=True)
    msg = "out of memory on cuda:0 at batch size 8, image size 1024: reduce --batch-size or --img-size"
    print(json.dumps({"event": "error", "message": msg}), flush=True)
    print("delightsam train: error: " + msg, file=sys.stderr, flush=True)
    sys.exit(2)
    """
)


def test_training_failure_such_as_out_of_memory_is_a_notification(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    script = tmp_path / "oom.py"
    script.write_text(OOM_TRAINER)
    monkeypatch.setattr(finetune_job, "build_train_command", lambda *a, **k: [sys.executable, str(script)])
    viewer = _viewer_with_pairs(make_napari_viewer)
    _, ft = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM fine-tune")
    assert ft.add_pair("lesion", "lesion_corrected", "dermoscopy")
    ft.out_edit.setText(str(tmp_path / "out"))
    ft.start()
    qtbot.waitUntil(lambda: not ft.busy, timeout=WAIT_MS)
    errors = _messages("error")
    assert any("out of memory" in m and "smaller image size" in m for m in errors), errors
    assert "Training failed" in ft.status_label.text()
    assert ft.best_checkpoint is None
    assert ft.start_button.isEnabled()


def test_a_run_that_got_worse_is_handed_over_with_a_warning(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path,
                                                             monkeypatch):
    import shutil

    best = tmp_path / "fake_run" / "best.safetensors"
    best.parent.mkdir()
    shutil.copy(tiny_checkpoint, best)
    script = tmp_path / "worse.py"
    script.write_text(textwrap.dedent(f"""
        import json
        for e in ({{"event": "start", "epochs": 1, "steps_per_epoch": 1}},
                  {{"event": "initial", "val_dice": 0.8}},
                  {{"event": "step", "epoch": 0, "step": 1, "steps": 1, "global_step": 1, "loss": 0.9}},
                  {{"event": "epoch", "epoch": 0, "global_step": 1, "train_loss": 0.9, "val_dice": 0.1,
                    "best_val_dice": 0.1, "improved": True}},
                  {{"event": "end", "status": "finished", "best_checkpoint": {str(best)!r},
                    "best_val_dice": 0.1, "best_epoch": 0}}):
            print(json.dumps(e), flush=True)
    """))
    monkeypatch.setattr(finetune_job, "build_train_command", lambda *a, **k: [sys.executable, str(script)])
    viewer = _viewer_with_pairs(make_napari_viewer)
    seg, ft = _open_both(viewer, tiny_checkpoint, tmp_path / "out")
    seg.model_combo.setCurrentIndex(seg.model_combo.findData("untrained"))
    ft.start()
    qtbot.waitUntil(lambda: not ft.busy, timeout=WAIT_MS)
    assert ft.initial_dice == 0.8
    assert seg.current_model() == str(best.resolve())  # handed over as the issue asks ...
    assert seg.model_combo.findData("untrained") >= 0  # ... the previous model stays selectable
    warnings = _messages("warning")
    assert any("did not improve" in m and "0.800" in m and "0.100" in m for m in warnings), warnings
    assert "best val Dice 0.1000 (epoch 1)" in ft.log.toPlainText()


def test_image_size_defaults_to_the_starting_models_own_size(make_napari_viewer, tiny_checkpoint, tmp_path):
    import torch

    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.model import DeLightSAM

    torch.manual_seed(0)
    big = save_checkpoint(tmp_path / "big.safetensors", DeLightSAM(tiny_config().replace(img_size=1024)).eval())
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM segment")
    assert seg.use_checkpoint(tiny_checkpoint)
    _, ft = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM fine-tune")
    ft.device_combo.setCurrentText("cpu")
    assert ft.img_size_combo.currentText() == "128"  # the tiny model was trained at 128²
    assert seg.use_checkpoint(big)
    ft._update_init_label()
    assert ft.img_size_combo.currentText() == "512"  # a 1024² model, capped on a CPU
    ft.img_size_combo.setCurrentText("256")
    ft.img_size_combo.activated.emit(ft.img_size_combo.currentIndex())  # the user's own choice sticks
    assert seg.use_checkpoint(tiny_checkpoint)
    ft._update_init_label()
    assert ft.img_size_combo.currentText() == "256"


def test_what_trains_defaults_to_a_fixed_backbone_and_mask_decoder(make_napari_viewer, tiny_checkpoint):
    from napari_delightsam.widgets.finetune_widget import (
        TRAINS_ALL,
        TRAINS_CONTROLLERS,
        TRAINS_CONTROLLERS_PROMPTS,
    )

    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM segment")
    assert seg.use_checkpoint(tiny_checkpoint)
    _, ft = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM fine-tune")
    assert ft.trains_combo.currentText() == TRAINS_CONTROLLERS_PROMPTS
    settings = ft.current_settings()
    assert settings.freeze_backbone and settings.freeze_decoder
    ft.trains_combo.setCurrentText(TRAINS_CONTROLLERS)
    settings = ft.current_settings()
    assert settings.freeze_backbone and not settings.freeze_decoder
    ft.trains_combo.setCurrentText(TRAINS_ALL)
    assert not ft.current_settings().freeze_backbone


def test_the_log_says_which_layers_train_as_tiles(make_napari_viewer):
    viewer = make_napari_viewer()
    _, ft = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM fine-tune")
    ft._on_event({"event": "data", "counts": {"microscopy": 49, "dermoscopy": 1}, "tiled": ["field"]})
    ft._on_event({"event": "data", "counts": {"dermoscopy": 1}, "tiled": []})
    lines = ft.log.toPlainText().splitlines()
    assert lines[-2] == ("training images: 1 dermoscopy, 49 microscopy "
                         "('field' as the tiles the new model will segment it in)")
    assert lines[-1] == "training images: 1 dermoscopy"
