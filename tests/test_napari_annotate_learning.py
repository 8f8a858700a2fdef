"""Learning as you go in the "De-LightSAM annotate" widget (pytest-qt, Xvfb): a round every K
saved images in the background, the widget naming the model of the mask on screen, and a closed
widget stopping a round without adopting anything. The training child is a stand-in that writes a
chosen tiny model (the real trainer is exercised in test_annotate_learning.py)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.gui

WAIT_MS = 60_000

STAND_IN = textwrap.dedent(
    """
    import json, shutil, sys, time
    from pathlib import Path
    run, source = Path(sys.argv[1]), sys.argv[2]
    run.mkdir(parents=True)
    print(json.dumps({"event": "start", "epochs": 1, "steps_per_epoch": 1}), flush=True)
    if source == "forever":
        while True:
            time.sleep(0.05)
    shutil.copy(source, run / "best.safetensors")
    print(json.dumps({"event": "end", "status": "finished"}), flush=True)
    """
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[int, Path]:
    """Two tiny checkpoints (different seeds), made before any viewer exists (widgets/_llvm.py)."""
    import torch

    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.model import DeLightSAM

    folder = tmp_path_factory.mktemp("ckpt")
    out = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        out[seed] = Path(save_checkpoint(folder / f"tiny{seed}.safetensors", DeLightSAM(tiny_config()).eval()))
    return out


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DELIGHTSAM_CONFIG_DIR", str(tmp_path / "config"))


def _stand_in(tmp_path: Path, monkeypatch, result: Path | str) -> None:
    import napari_delightsam.annotate_learning as al

    script = tmp_path / "stand_in_trainer.py"
    script.write_text(STAND_IN)
    monkeypatch.setattr(al, "_train_command",
                        lambda settings, data, run_dir, splits: [sys.executable, str(script), str(run_dir), str(result)])


def _folder(tmp_path: Path, n: int) -> Path:
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(5)
    for i in range(n):
        image = rng.integers(0, 60, (40, 56, 3), dtype=np.uint8)
        image[10:25, 12 + i:32 + i] += 150
        Image.fromarray(image).save(src / f"case{i:02d}.png")
    return src


def _open(viewer, checkpoint: Path):
    dock, widget = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM annotate")
    assert widget.use_checkpoint(checkpoint)
    widget.device_combo.setCurrentText("cpu")
    widget.modality_combo.setCurrentText("dermoscopy")
    return dock, widget


def _wait_for(qtbot, widget, name):
    qtbot.waitUntil(lambda: not widget.busy and widget._labels() is not None
                    and widget._labels().name == f"{name}_delightsam_mask", timeout=WAIT_MS)
    return widget._labels()


def test_a_round_every_k_saved_images_and_the_widget_names_the_model(make_napari_viewer, qtbot, tmp_path, tiny,
                                                                     monkeypatch):
    from napari_delightsam.cli import main

    src, out = _folder(tmp_path, 8), tmp_path / "masks"
    # five masks saved before (by model 1, headless): the images the rounds learn from
    for name in ("case05", "case06", "case07"):
        (src / f"{name}.png").rename(tmp_path / f"{name}.png")
    assert main(["annotate", "-i", str(src), "-o", str(out), "-m", "dermoscopy", "--checkpoint", str(tiny[1]),
                 "--device", "cpu"]) == 0
    for name in ("case05", "case06", "case07"):
        (tmp_path / f"{name}.png").rename(src / f"{name}.png")
    _stand_in(tmp_path, monkeypatch, tiny[1])  # a "fine-tuned" model that segments like model 1

    viewer = make_napari_viewer()
    _, widget = _open(viewer, tiny[0])
    widget.every_spin.setValue(6)
    assert widget.start(src, out) is not None
    _wait_for(qtbot, widget, "case05")
    assert "tiny0.safetensors" in widget.model_label.text()
    assert not widget.learning and widget.learner.config.every == 6

    widget.save_and_next()  # the 6th saved mask: a round starts in the background
    assert widget.learning
    _wait_for(qtbot, widget, "case06")
    qtbot.waitUntil(lambda: widget.last_round is not None and not widget.learning, timeout=WAIT_MS)
    result = widget.last_round
    # held out: saved images 0 and 4 (case00, case04), masks of model 1: the new model wins
    assert result.status == "accepted", result
    assert result.holdout == ["case00.png", "case04.png"] and result.dice_candidate == pytest.approx(1.0)
    assert "Round 1: adopted" in widget.learn_label.text()
    adopted = (out / ".delightsam" / "finetune" / "round-001" / "train" / "best.safetensors").resolve()
    assert widget.current_model() == str(adopted)

    widget.save_and_next()  # case06 was opened before the round ended; case07 uses the new model
    labels = _wait_for(qtbot, widget, "case07")
    assert "fine-tuned round 1" in widget.model_label.text()
    assert "fine-tuned round 1" in widget.status_label.text()
    assert labels.metadata["delightsam"]["model_file"] == str(adopted)
    assert json.loads((out / "case06.png.json").read_text())["model_file"] == str(tiny[0].resolve())

    # closing and reopening the panel resumes with the adopted model, named as such
    widget.close()
    _, again = _open(viewer, tiny[0])
    again.start(src, out)
    _wait_for(qtbot, again, "case07")
    assert again.current_model() == str(adopted)
    assert "fine-tuned round 1" in again.model_label.text()
    assert again.every_spin.value() == 6 and again.learner.config.every == 6  # K is the session's


def test_closing_the_widget_mid_round_stops_the_child_and_adopts_nothing(make_napari_viewer, qtbot, tmp_path, tiny,
                                                                         monkeypatch):
    from napari_delightsam.cli import main

    src, out = _folder(tmp_path, 4), tmp_path / "masks"
    (src / "case03.png").rename(tmp_path / "case03.png")
    assert main(["annotate", "-i", str(src), "-o", str(out), "-m", "dermoscopy", "--checkpoint", str(tiny[0]),
                 "--device", "cpu"]) == 0
    (tmp_path / "case03.png").rename(src / "case03.png")
    _stand_in(tmp_path, monkeypatch, "forever")
    viewer = make_napari_viewer()
    dock, widget = _open(viewer, tiny[0])
    widget.start(src, out)
    _wait_for(qtbot, widget, "case03")
    assert widget.finetune_now() is not None
    qtbot.waitUntil(lambda: widget._learn_holder.get("job") is not None and widget._learn_holder["job"].running,
                    timeout=WAIT_MS)
    job = widget._learn_holder["job"]
    viewer.window.remove_dock_widget(dock)
    widget.close()
    qtbot.waitUntil(lambda: not job.running, timeout=WAIT_MS)
    learning = out / ".delightsam" / "finetune" / "learning.json"
    record = json.loads(learning.read_text()) if learning.exists() else {"current": None, "rounds": []}
    assert record["current"] is None
    assert all(r["status"] != "accepted" for r in record["rounds"])
