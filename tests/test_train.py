"""Training: run folder, checkpoints, resume equivalence, stop, freeze, OOM, CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_delightsam.checkpoint import load_checkpoint, read_checkpoint_info
from napari_delightsam.data.synthetic import make_synthetic_dataset, synthetic_pair
from napari_delightsam.training import TrainConfig, TrainingError, train
from napari_delightsam.training.loop.optim import named_parameter_groups
from napari_delightsam.training.stages import trainer as trainer_mod

TINY = dict(
    img_size=64,
    batch_size=2,
    steps_per_epoch=2,
    model_preset="tiny",
    num_workers=0,
    device="cpu",
    log_every=1,
    val_at_start=False,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_data") / "data"
    return make_synthetic_dataset(root, n_per_dataset=6, size=(40, 52))


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_validation_and_json_round_trip(tmp_path: Path):
    cfg = TrainConfig(epochs=3, freeze=["backbone"], modalities=["xray"])
    assert cfg.freeze == ("backbone",) and cfg.modalities == ("xray",)
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert TrainConfig.from_json_file(tmp_path / "c.json") == cfg
    assert (TrainConfig().lr, TrainConfig().gamma, TrainConfig().batch_size, TrainConfig().patch_weight) == (
        1e-4,
        0.98,
        4,
        0.7,
    )
    with pytest.raises(ValueError, match="freeze"):
        TrainConfig(freeze=("everything",))
    with pytest.raises(ValueError, match="multiple of 64"):
        TrainConfig(img_size=100)
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainConfig(time_budget_s=0).validate()
    with pytest.raises(ValueError, match="unknown training config"):
        TrainConfig.from_dict({"epochz": 3})


def test_training_run_writes_a_complete_run_folder(tmp_path: Path, data_root: Path):
    events: list[dict] = []
    cfg = TrainConfig(epochs=2, **{**TINY, "val_at_start": True, "save_init": True})
    result = train(cfg, tmp_path / "run", data_root=data_root, progress=events.append, show_progress=False)
    run = tmp_path / "run"
    for name in (
        "run.json",
        "splits.json",
        "last.safetensors",
        "last_state.safetensors",
        "best.safetensors",
        "init.safetensors",
        "metrics.jsonl",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    assert result.epochs_completed == 2 and not result.stopped
    assert result.best_checkpoint == run / "best.safetensors"
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[1] == "initial" and kinds[-1] == "end"
    assert kinds.count("step") == 4 and kinds.count("epoch") == 2
    info = json.loads((run / "run.json").read_text())
    assert "modality-balanced" in info["sampling_rule"] and info["train_config"]["epochs"] == 2
    assert set(info["datasets"]) == {"dermoscopy/derm_a", "xray/xr_a"}
    _, meta = read_checkpoint_info(run / "best.safetensors")
    assert meta["modality_head_trained"] == "true"
    training = json.loads(meta["training"])
    assert training["img_size"] == 64 and set(training["val_dice_per_modality"]) == {"dermoscopy", "xray"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows].count("epoch") == 2 and rows[0]["type"] == "initial"
    epoch_rows = [r for r in rows if r["type"] == "epoch"]
    assert epoch_rows[1]["lr"] == pytest.approx(1e-4 * 0.98**2)  # ExponentialLR stepped per epoch
    assert result.best_val_dice == max(r["val_dice"] for r in epoch_rows)
    # the training state is safetensors (never a pickle) and the model is a valid checkpoint
    assert (run / "last_state.safetensors").read_bytes()[8:9] == b"{"
    model = load_checkpoint(run / "last.safetensors")
    assert states_equal(model.state_dict(), {k: v.cpu() for k, v in result.model.state_dict().items()})


def test_resume_continues_bit_for_bit(tmp_path: Path, data_root: Path):
    straight = train(TrainConfig(epochs=2, **TINY), tmp_path / "a", data_root=data_root, show_progress=False)
    train(TrainConfig(epochs=1, **TINY), tmp_path / "b", data_root=data_root, show_progress=False)
    resumed = train(
        TrainConfig(epochs=2, **TINY), tmp_path / "b", data_root=data_root, show_progress=False, resume=True
    )
    a = load_checkpoint(tmp_path / "a" / "last.safetensors").state_dict()
    b = load_checkpoint(tmp_path / "b" / "last.safetensors").state_dict()
    assert states_equal(a, b)
    assert resumed.history[-1]["train_loss"] == straight.history[-1]["train_loss"]
    rows = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows if '"epoch"' in r and '"type": "epoch"' in r] == [0, 1]
    # settings that would change the schedule are refused on resume
    with pytest.raises(TrainingError, match="lr"):
        train(TrainConfig(epochs=3, **{**TINY, "lr": 1e-3}), tmp_path / "b", data_root=data_root, resume=True)


def test_refuses_a_non_empty_run_folder(tmp_path: Path, data_root: Path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="not empty"):
        train(TrainConfig(epochs=1, **TINY), out, data_root=data_root)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(TrainingError, match="cannot resume"):
        train(TrainConfig(epochs=1, **TINY), tmp_path / "fresh", data_root=data_root, resume=True)
    with pytest.raises(TrainingError, match="no training data"):
        train(TrainConfig(epochs=1, **TINY), tmp_path / "none")


def test_stop_event_ends_cleanly_and_keeps_a_best_checkpoint(tmp_path: Path, data_root: Path):
    stop = threading.Event()

    def progress(event: dict) -> None:
        if event["event"] == "step":
            stop.set()

    result = train(
        TrainConfig(epochs=5, **TINY),
        tmp_path / "run",
        data_root=data_root,
        progress=progress,
        stop_event=stop,
        show_progress=False,
    )
    assert result.stopped and result.epochs_completed == 0
    assert result.best_checkpoint is not None and result.best_checkpoint.is_file()
    assert result.last_checkpoint is None  # no epoch finished: nothing to resume from
    load_checkpoint(result.best_checkpoint)


def test_in_memory_items_train_and_the_loss_goes_down(tmp_path: Path):
    rng = np.random.default_rng(0)
    items = [(*synthetic_pair(rng, (48, 48)), "dermoscopy") for _ in range(3)]
    items = [(img, mask > 0, mod) for img, mask, mod in items]  # napari Labels-like
    cfg = TrainConfig(epochs=1, **{**TINY, "steps_per_epoch": 25, "lr": 2e-3, "augment": False})
    result = train(cfg, tmp_path / "run", items=items, show_progress=False)
    losses = [r["loss"] for r in result.history if r["type"] == "step"]
    assert len(losses) == 25
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert set(splits["datasets"]) == {"dermoscopy/user"}


def test_freeze_keeps_parts_fixed(tmp_path: Path, data_root: Path):
    cfg = TrainConfig(epochs=1, **{**TINY, "freeze": ("backbone", "modality_head")})
    torch.manual_seed(cfg.seed)
    model0, _ = trainer_mod.build_model(cfg)
    before = {k: v.clone() for k, v in model0.state_dict().items()}
    result = train(cfg, tmp_path / "run", data_root=data_root, show_progress=False)
    after = {k: v.cpu() for k, v in result.model.state_dict().items()}
    controller_ids = {id(p) for p in model0.encoder.controller_parameters()}
    backbone = [
        n for n, p in model0.named_parameters() if n.startswith("encoder.") and id(p) not in controller_ids
    ]
    assert backbone and all(torch.equal(before[n], after[n]) for n in backbone)
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("modality_head."))
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("decoder."))
    _, meta = read_checkpoint_info(result.last_checkpoint)
    assert meta["modality_head_trained"] == "false"


def test_out_of_memory_becomes_a_clean_error(tmp_path: Path, data_root: Path, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer_mod, "_forward_loss", boom)
    with pytest.raises(TrainingError, match="out of memory.*batch size 2"):
        train(TrainConfig(epochs=1, **TINY), tmp_path / "run", data_root=data_root, show_progress=False)


def test_bad_files_are_skipped_and_recorded(tmp_path: Path):
    root = make_synthetic_dataset(tmp_path / "data", {"dermoscopy": ["d"]}, n_per_dataset=6, size=(40, 40))
    bad = root / "dermoscopy" / "d" / "images" / "img_000.png"
    bad.write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="img_000"):
        result = train(TrainConfig(epochs=1, **TINY), tmp_path / "run", data_root=root, show_progress=False)
    assert any("img_000" in s for s in result.skipped)
    assert any("img_000" in s for s in json.loads((tmp_path / "run" / "run.json").read_text())["skipped"])


def test_cli_train_progress_jsonl_and_refusal(tmp_path: Path, data_root: Path, capsys):
    from napari_delightsam.cli import main

    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(data_root),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--steps-per-epoch",
        "1",
        "--img-size",
        "64",
        "--batch-size",
        "2",
        "--model-preset",
        "tiny",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--progress-jsonl",
    ]
    assert main(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "end"
    assert main(args) == 2  # the folder is no longer empty
    assert "not empty" in capsys.readouterr().err
    assert main([*args[:5], "--resume", "--epochs", "2", "--progress-jsonl"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["epochs_completed"] == 2


def test_cli_time_budget_ends_the_run_as_finished_and_a_resume_continues(tmp_path: Path, data_root: Path, capsys):
    from napari_delightsam.cli import main

    out = tmp_path / "run"
    base = ["train", "--data", str(data_root), "--out", str(out)]
    tiny = ["--steps-per-epoch", "1", "--img-size", "64", "--batch-size", "2", "--model-preset", "tiny",
            "--device", "cpu", "--num-workers", "0", "--progress-jsonl"]
    assert main([*base, "--epochs", "4", "--time-budget", "1e-6", *tiny]) == 0
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "budget"] == [0]
    assert events[-1]["status"] == "finished" and events[-1]["epochs_completed"] == 1
    assert json.loads((out / "run.json").read_text())["train_config"]["time_budget_s"] == 1e-6
    # a resume with a longer budget runs the remaining epochs of the same schedule
    assert main([*base, "--resume", "--time-budget", "3600", "--progress-jsonl"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["epochs_completed"] == 4


def test_channels_last_training_matches_contiguous_and_may_change_on_resume(tmp_path: Path, data_root: Path):
    # the memory format is a layout, not a different computation: same run, same weights (to rounding);
    # fp32 on every host (amp_cpu defaults to bf16 where the CPU has it natively)
    cl = train(TrainConfig(epochs=1, amp_cpu=False, **TINY), tmp_path / "cl", data_root=data_root, show_progress=False)
    assert cl.model is not None
    assert cl.model.encoder.stem.conv1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = train(
        TrainConfig(epochs=1, channels_last=False, amp_cpu=False, **TINY), tmp_path / "plain", data_root=data_root,
        show_progress=False,
    )
    assert plain.model is not None
    assert not plain.model.encoder.stem.conv1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    a = load_checkpoint(tmp_path / "cl" / "last.safetensors").state_dict()
    b = load_checkpoint(tmp_path / "plain" / "last.safetensors").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    # numerics settings may change when a run moves to another machine
    resumed = train(
        TrainConfig(epochs=2, channels_last=False, amp_cpu=True, **TINY),
        tmp_path / "cl",
        data_root=data_root,
        show_progress=False,
        resume=True,
    )
    assert resumed.epochs_completed == 2


def test_a_given_splits_file_is_used_and_copied(tmp_path: Path, data_root: Path):
    from napari_delightsam.data import discover
    from napari_delightsam.data.splits import load_splits, make_splits, save_splits

    records = discover(data_root)
    other = make_splits(records, seed=7)  # not the run's own seed-0 split
    assert other.to_dict() != make_splits(records, seed=0).to_dict()
    path = save_splits(tmp_path / "other_splits.json", other)
    result = train(
        TrainConfig(epochs=1, splits_file=str(path), **TINY), tmp_path / "run", data_root=data_root, show_progress=False
    )
    assert load_splits(tmp_path / "run" / "splits.json").to_dict() == other.to_dict()
    assert result.epochs_completed == 1
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TrainingError, match="splits file"):
        train(TrainConfig(epochs=1, splits_file=str(tmp_path / "bad.json"), **TINY), tmp_path / "run2", data_root=data_root)


def test_lr_scale_is_validated_and_survives_json(tmp_path: Path):
    cfg = TrainConfig(lr_scale={"backbone": 0.1, "decoder": 2})
    assert cfg.lr_scale == {"backbone": 0.1, "decoder": 2.0}
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert TrainConfig.from_json_file(tmp_path / "c.json") == cfg
    assert TrainConfig().lr_scale == {}
    with pytest.raises(ValueError, match="unknown lr_scale group.*backbone"):
        TrainConfig(lr_scale={"encoder": 0.1})
    for bad in (0, -1.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="lr_scale"):
            TrainConfig(lr_scale={"decoder": bad})


def test_lr_scale_gives_each_part_its_own_learning_rate(tmp_path: Path, data_root: Path):
    scale = {"backbone": 0.5, "decoder": 4.0}
    cfg = TrainConfig(epochs=1, lr_scale=scale, **{**TINY, "steps_per_epoch": 1})
    start, _ = trainer_mod.build_model(cfg)
    result = train(cfg, tmp_path / "run", data_root=data_root, show_progress=False)
    before = {n: p.detach() for n, p in start.named_parameters()}
    groups = named_parameter_groups(result.model)
    # Adam's first step moves every parameter with a gradient by about its learning rate
    for group, factor in {**scale, "prompt_generator": 1.0, "modality_head": 1.0}.items():
        moved = max(float((p.detach().cpu() - before[n]).abs().max()) for n, p in groups[group])
        assert moved == pytest.approx(1e-4 * factor, rel=0.02), group
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train_config"]["lr_scale"] == scale
    epoch_row = [r for r in result.history if r["type"] == "epoch"][-1]
    assert epoch_row["lr"] == pytest.approx(1e-4 * 0.98)  # the schedule's base rate
    with pytest.raises(TrainingError, match="lr_scale"):
        train(
            TrainConfig(epochs=2, lr_scale={"backbone": 0.5}, **{**TINY, "steps_per_epoch": 1}),
            tmp_path / "run",
            data_root=data_root,
            resume=True,
        )
    resumed = train(
        TrainConfig(epochs=2, lr_scale=scale, **{**TINY, "steps_per_epoch": 1}),
        tmp_path / "run",
        data_root=data_root,
        resume=True,
        show_progress=False,
    )
    assert resumed.epochs_completed == 2


def test_cli_lr_scale_flag_builds_the_mapping():
    from napari_delightsam.cli import CommandError, build_parser
    from napari_delightsam.commands.train import build_config

    parse = build_parser().parse_args
    assert build_config(parse(["train", "--lr-scale", "backbone=0.1", "decoder=2"])).lr_scale == {
        "backbone": 0.1,
        "decoder": 2.0,
    }
    with pytest.raises(CommandError, match="GROUP=FACTOR"):
        build_config(parse(["train", "--lr-scale", "backbone"]))
    with pytest.raises(CommandError, match="unknown lr_scale group"):
        build_config(parse(["train", "--lr-scale", "encoder=0.1"]))


def test_unseen_domain_validation_is_reported_and_can_pick_best(tmp_path: Path):
    """A split with an unseen part: both validations in every epoch row; "val+unseen" keeps the
    checkpoint of the best mean, "val" the best in-domain Dice; no unseen part: refused."""
    from napari_delightsam.data import discover, make_splits, save_splits
    from napari_delightsam.data.holdout import HoldoutRule, HoldoutSet

    root = make_synthetic_dataset(tmp_path / "data", n_per_dataset=8, size=(40, 52))
    records = discover(root)
    held = sorted({r.key for r in records})[0]
    splits = make_splits(records, seed=0, holdout=HoldoutSet("t", (HoldoutRule(held),)))
    split_file = save_splits(tmp_path / "splits.json", splits)
    cfg = TrainConfig(**TINY, epochs=2, select_on="val+unseen", splits_file=str(split_file))
    result = train(cfg, tmp_path / "run", data_root=root, show_progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["type"] == "epoch"]
    for r in epochs:
        assert held.split("/")[0] in r["unseen_dice_per_modality"]
        assert r["select_dice"] == pytest.approx((r["val_dice"] + r["unseen_dice"]) / 2)
    assert result.best_val_dice == pytest.approx(max(r["select_dice"] for r in epochs))
    _, meta = read_checkpoint_info(result.best_checkpoint)
    assert json.loads(meta["training"])["select_dice"] == pytest.approx(result.best_val_dice)

    # resuming it: the unseen images belong to the split, so no sample is "left out"
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*left out of this resumed run")
        train(
            TrainConfig(**TINY, epochs=3, select_on="val+unseen", splits_file=str(split_file)),
            tmp_path / "run", data_root=root, resume=True, show_progress=False,
        )
    # a sample the split does not know is
    extra = root / held / "images"
    first = sorted(extra.iterdir())[0]
    (extra / ("zz_new" + first.suffix)).write_bytes(first.read_bytes())
    masks = root / held / "masks"
    mfirst = sorted(masks.iterdir())[0]
    (masks / ("zz_new" + mfirst.suffix)).write_bytes(mfirst.read_bytes())
    with pytest.warns(UserWarning, match="1 sample\\(s\\) not in .* left out of this resumed run"):
        train(
            TrainConfig(**TINY, epochs=4, select_on="val+unseen", splits_file=str(split_file)),
            tmp_path / "run", data_root=root, resume=True, show_progress=False,
        )
    for d in (extra, masks):
        (d / next(p.name for p in d.iterdir() if p.name.startswith("zz_new"))).unlink()

    plain = train(
        TrainConfig(**TINY, epochs=2, splits_file=str(split_file)), tmp_path / "run2", data_root=root, show_progress=False
    )
    rows = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert all("unseen_dice" in r for r in epochs)  # reported, not used for the choice
    assert plain.best_val_dice == pytest.approx(max(r["val_dice"] for r in epochs))

    with pytest.raises(TrainingError, match="unseen-domain images"):
        train(TrainConfig(**TINY, epochs=1, select_on="val+unseen"), tmp_path / "run3", data_root=root)
    with pytest.raises(ValueError, match="select_on"):
        TrainConfig(select_on="test")
