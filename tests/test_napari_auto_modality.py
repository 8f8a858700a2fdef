"""The segment widget when ``auto`` is unsure (it asks: two buttons, one click), one modality per
stack, and the modality remembered for a layer's source folder (pytest-qt, under Xvfb)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_delightsam.widgets import settings
from napari_delightsam.widgets.model_cache import MODEL_CACHE

pytestmark = pytest.mark.gui

WAIT_MS = 60_000


def _checkpoint(folder: Path, threshold: str) -> Path:
    """A tiny appearance-head model marked trained, asking below ``threshold``."""
    import torch

    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.inference import AUTO_CONFIDENCE_KEY, MODALITY_HEAD_TRAINED_KEY
    from napari_delightsam.model import DeLightSAM

    torch.manual_seed(0)
    model = DeLightSAM(tiny_config(modality_head_kind="appearance")).eval()
    path = folder / f"tiny-auto-{threshold}.safetensors"
    save_checkpoint(path, model, {MODALITY_HEAD_TRAINED_KEY: "true", AUTO_CONFIDENCE_KEY: threshold})
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    """Made before any viewer: importing the model after napari's OpenGL canvas loaded Mesa's LLVM
    must go through the widgets (``widgets/_llvm.py``)."""
    folder = tmp_path_factory.mktemp("ckpt")
    return {t: _checkpoint(folder, t) for t in ("0.0", "1.0")}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DELIGHTSAM_CONFIG_DIR", str(tmp_path / "config"))
    yield
    monkeypatch.setattr(MODEL_CACHE, "loader", MODEL_CACHE.loader)


def _open(viewer, checkpoint: Path):
    _, widget = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM segment")
    assert widget.use_checkpoint(checkpoint)
    widget.device_combo.setCurrentText("cpu")
    widget.modality_combo.setCurrentText("auto")
    return widget


def _wait(qtbot, widget, worker):
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (96, 96, 3)).astype(np.uint8)


def test_unsure_auto_asks_and_a_click_segments_with_the_runner_up(ckpt, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _open(viewer, ckpt["1.0"])  # always unsure
    viewer.add_image(_rgb(), name="img", rgb=True)
    _wait(qtbot, widget, widget.run())
    assert widget.ask_box.isVisibleTo(widget)
    first, second = (b.property("modality") for b in widget.ask_buttons)
    assert first != second and "unsure" in widget.status_label.text()
    assert "is below this model's 1.00" in widget.ask_label.text()  # why it asks
    mask = viewer.layers["img_delightsam_mask"]
    assert mask.metadata["delightsam"]["modality_used"] == first
    assert mask.metadata["delightsam"]["modality_unsure"] is True
    worker = widget.choose_modality(second)  # one click: segment again as the runner-up
    _wait(qtbot, widget, worker)
    assert widget.modality_combo.currentText() == second
    assert viewer.layers["img_delightsam_mask"].metadata["delightsam"]["modality_used"] == second
    assert not widget.ask_box.isVisibleTo(widget)


def test_sure_auto_does_not_ask_and_confirming_keeps_the_mask(ckpt, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _open(viewer, ckpt["0.0"])  # never unsure
    viewer.add_image(_rgb(1), name="img", rgb=True)
    _wait(qtbot, widget, widget.run())
    assert not widget.ask_box.isVisibleTo(widget)
    shown = viewer.layers["img_delightsam_mask"].metadata["delightsam"]["modality_used"]
    assert widget.choose_modality(shown) is None  # confirming what is shown runs nothing
    assert widget.modality_combo.currentText() == shown


def test_a_stack_gets_one_modality(ckpt, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _open(viewer, ckpt["0.0"])
    stack = np.stack([_rgb(k)[..., 0] * (k % 2) for k in range(5)])
    viewer.add_image(stack, name="stack")
    _wait(qtbot, widget, widget.run())
    assert len(set(widget._last.run.modalities)) == 1
    decision = widget._last.run.auto_decision
    assert decision is not None
    # a grey stack taken for a colour-only modality is asked about, however confident
    from napari_delightsam.inference import COLOUR_ONLY_MODALITIES

    assert decision.asks == (decision.modality in COLOUR_ONLY_MODALITIES) == widget.ask_box.isVisibleTo(widget)
    if decision.asks:
        assert "greyscale" in widget.ask_label.text()


def test_the_modality_is_remembered_for_the_source_folder(ckpt, make_napari_viewer, qtbot, tmp_path):
    from PIL import Image

    folder = tmp_path / "polyps"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(_rgb()).save(folder / name)
    viewer = make_napari_viewer()
    widget = _open(viewer, ckpt["0.0"])
    viewer.open(str(folder / "a.png"), plugin="napari")
    widget.modality_combo.setCurrentText("colonoscopy")
    _wait(qtbot, widget, widget.run())
    assert settings.remembered_modality(folder) == "colonoscopy"
    widget.modality_combo.setCurrentText("auto")
    viewer.open(str(folder / "b.png"), plugin="napari")
    widget.image_combo.value = viewer.layers["b"]
    assert widget.modality_combo.currentText() == "colonoscopy"
    assert settings.remembered_modality(tmp_path) is None


def test_remembered_folders_are_bounded_and_survive_a_corrupt_file(tmp_path):
    for k in range(settings.MAX_FOLDERS + 5):
        settings.remember_modality(tmp_path / f"f{k}", "xray")
    table = settings.load_settings()["modality_by_folder"]
    assert len(table) == settings.MAX_FOLDERS
    assert settings.remembered_modality(tmp_path / f"f{settings.MAX_FOLDERS + 4}") == "xray"
    assert settings.remembered_modality(tmp_path / "f0") is None  # the oldest went
    settings.settings_file().write_text("{not json", encoding="utf-8")
    assert settings.remembered_modality(tmp_path / "f1") is None
    assert settings.remember_modality(tmp_path / "f1", "fundus")
    assert settings.remembered_modality(tmp_path / "f1") == "fundus"
