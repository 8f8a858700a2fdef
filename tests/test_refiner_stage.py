"""The recipe's "refiner" stage: one modality's MaskRefiner trained alone on its recorded inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from napari_delightsam.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from napari_delightsam.config import tiny_config
from napari_delightsam.data import discover, make_splits, save_splits, select
from napari_delightsam.data.synthetic import make_synthetic_dataset
from napari_delightsam.model import DeLightSAM
from napari_delightsam.training import TrainConfig
from napari_delightsam.training.stages.recipe import Recipe, run_recipe
from napari_delightsam.training.stages.refiner_stage import (
    record_refiner_inputs,
    refiner_loss,
    refiner_validation,
    train_refiner,
)

pytestmark = pytest.mark.usefixtures("one_thread", "single_process_env")

STAGE = {"modalities": ["fundus"], "epochs": 2, "steps_per_epoch": 3, "batch_size": 2, "lr": 0.01}


def tiny_recipe(stage: dict, refined: list[str] | None = None) -> dict:
    return {
        "name": "tiny-refiner-stage",
        "img_size": 64,
        "views": [0],
        "model": {"decoder_skips": ["image"], "mask_stride": 2},
        "common": {
            "model_preset": "tiny",
            "init": "none",
            "batch_size": 2,
            "num_workers": 0,
            "log_every": 1,
            "val_at_start": True,
            "amp_cpu": False,
        },
        "stages": [
            {"name": "heads", "kind": "heads", "config": {"epochs": 1, "steps_per_epoch": 2}},
            {
                "name": "vessels",
                "kind": "refiner",
                "config": {
                    "init": "previous",
                    "model": {"refiner_modalities": refined or ["fundus", "xray"]},
                    **stage,
                },
            },
        ],
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refiner-stage") / "data"
    make_synthetic_dataset(
        root, {"fundus": ["drive_a", "stare_b"], "xray": ["xr_a"]}, n_per_dataset=6, size=(40, 52)
    )
    return root


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modalities": None}, "set 'modalities' to one name"),
        ({"modalities": ["fundus", "xray"]}, "set 'modalities' to one name"),
        ({"modalities": ["dermoscopy"]}, "needs it in the model's refiner_modalities"),
        ({"steps_per_epoch": None}, "needs 'steps_per_epoch'"),
    ],
)
def test_a_refiner_stage_that_cannot_run_is_refused_before_anything_runs(change: dict, message: str):
    with pytest.raises(ValueError, match=rf"recipe stage 'vessels': .*{message}"):
        Recipe.from_dict(tiny_recipe({**STAGE, **change}))
    with pytest.raises(ValueError, match="kind must be one of heads, train, refiner"):
        Recipe.from_dict({**tiny_recipe(STAGE), "stages": [{"name": "x", "kind": "refine", "config": {}}]})


def test_the_stage_trains_only_its_modalitys_refiner_from_a_fresh_start(data: Path, tmp_path: Path):
    out = tmp_path / "run"
    events: list[dict] = []
    exported = run_recipe(
        Recipe.from_dict(tiny_recipe(STAGE)),
        data,
        out,
        device="cpu",
        show_progress=False,
        progress=events.append,
    )
    recorded = [e for e in events if e["event"] == "record"]
    assert {"train", "val"} <= {e["split"] for e in recorded}  # (this split has no unseen images)
    last_train = [e for e in recorded if e["split"] == "train"][-1]
    assert last_train["done"] == last_train["total"] > 0
    before = load_checkpoint(out / "heads" / "best.safetensors").state_dict()
    after = load_checkpoint(out / "vessels" / "last.safetensors").state_dict()
    changed = {k for k, t in after.items() if k not in before or not torch.equal(before[k], t)}
    assert changed and all(k.startswith("decoder.refiners.") for k in changed)
    fundus = {k for k in changed if k.startswith("decoder.refiners.fundus.")}
    assert any(k.startswith("decoder.refiners.fundus.out.") for k in fundus)
    # the xray refiner the override added is new (its output conv zero) and never trained
    assert all(float(after[k].abs().sum()) == 0 for k in after if k.startswith("decoder.refiners.xray.out."))
    rows = [json.loads(line) for line in (out / "vessels" / "metrics.jsonl").read_text().splitlines()]
    initial = next(r for r in rows if r["type"] == "initial")
    assert set(initial["val_dice_per_dataset"]) <= {"fundus/drive_a", "fundus/stare_b"}
    assert [r["epoch"] for r in rows if r["type"] == "epoch"] == [0, 1]
    # one-cycle: the learning rate moves within an epoch (the scheduler steps with the optimizer)
    lrs = [r["lr"] for r in rows if r["type"] == "step" and r["epoch"] == 0]
    assert len(set(lrs)) == 3
    assert json.loads((out / "vessels" / "refiner.json").read_text())["modality"] == "fundus"
    cfg, meta = read_checkpoint_info(exported)
    assert cfg.refiner_modalities == ("fundus", "xray")
    assert "vessels" in json.loads(meta["recipe_stages"])


def test_recorded_inputs_are_what_the_refiner_receives_before_it_changes_anything(data: Path, tmp_path: Path):
    torch.manual_seed(0)
    model = DeLightSAM(
        tiny_config(img_size=64, mask_stride=2, decoder_skips=("image",), refiner_modalities=("fundus",))
    )
    plain = DeLightSAM(tiny_config(img_size=64, mask_stride=2, decoder_skips=("image",)))
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for p in model.decoder.refiners["fundus"].parameters():
            p.add_(0.1)  # a refiner that changes the masks: the recorded logits must be those before it
    records = [r for r in discover(data) if r.modality == "fundus"][:3]
    rows = record_refiner_inputs(model.eval(), "fundus", records, torch.device("cpu"), train=True)
    assert rows.image.shape == (3, 3, 64, 64) and rows.logits.shape == (3, 1, 32, 32)
    assert rows.truth.shape == (3, 1, 64, 64) and 0 <= float(rows.truth.min()) <= float(rows.truth.max()) <= 1
    from napari_delightsam.data import load_pair
    from napari_delightsam.preprocess import prepare_array, to_model_tensor

    arr, _ = prepare_array(load_pair(records[0])[0])
    with torch.no_grad():
        expected = plain.eval()(
            to_model_tensor(arr, 64), torch.tensor([plain.config.modalities.index("fundus")])
        )
        refined = model(to_model_tensor(arr, 64), torch.tensor([model.config.modalities.index("fundus")]))
    torch.testing.assert_close(rows.logits[0], expected.mask_logits[0])
    assert not torch.allclose(rows.logits[0], refined.mask_logits[0])
    # validation at the original size: the identity refiner scores the recorded logits' own Dice
    val = record_refiner_inputs(model, "fundus", records, torch.device("cpu"), train=False)
    assert [tuple(t.shape) for t in val.truth] == [(40, 52)] * 3
    fresh = type(model.decoder.refiners["fundus"])(*model.decoder.refiners["fundus"].sizes)
    scores = refiner_validation(fresh, val, "val")
    from napari_delightsam.preprocess import to_input_size
    from napari_delightsam.training.evaluation.metrics import dice_from_counts

    dices = []
    for logits, gt in zip(val.logits, val.truth, strict=True):
        pred = to_input_size(logits[0], tuple(gt.shape)) > 0
        dices.append(dice_from_counts(int((pred & gt).sum()), int(pred.sum()), int(gt.sum())))
    assert scores["val_dice"] == pytest.approx(sum(dices) / 3)
    assert refiner_validation(
        fresh, record_refiner_inputs(model, "fundus", [], torch.device("cpu"), train=False), "x"
    ) == {"x_dice": None, "x_dice_per_dataset": {}}


def test_the_loss_rewards_the_right_mask_at_the_input_size():
    truth = torch.zeros(2, 1, 16, 16)
    truth[:, :, 4:12, 4:12] = 1
    right = (truth[:, :, ::2, ::2] * 2 - 1) * 10  # logits at half the size
    total_right, dice_right = refiner_loss(right, truth)
    total_wrong, dice_wrong = refiner_loss(-right, truth)
    assert float(dice_right) < 0.1 < 0.9 < float(dice_wrong)
    assert float(total_right) < float(total_wrong)


class StopAfter:
    """A stop flag that is set after ``n`` checks (the loop checks it before every step)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def is_set(self) -> bool:
        self.n -= 1
        return self.n < 0


def test_an_interrupted_stage_resumes_to_the_weights_of_a_straight_run(data: Path, tmp_path: Path):
    torch.manual_seed(0)
    model = DeLightSAM(tiny_config(img_size=64, mask_stride=2, decoder_skips=("image",)))
    init = save_checkpoint(tmp_path / "init.safetensors", model, {})
    splits = save_splits(
        tmp_path / "splits.json", make_splits(discover(data), seed=0, ratios=(0.6, 0.2, 0.2))
    )
    assert select(discover(data), make_splits(discover(data), seed=0, ratios=(0.6, 0.2, 0.2)), "val")
    cfg = TrainConfig(
        model_preset="tiny",
        img_size=64,
        init=str(init),
        device="cpu",
        splits_file=str(splits),
        model={"refiner_modalities": ["fundus"]},
        modalities=("fundus",),
        epochs=3,
        steps_per_epoch=2,
        batch_size=2,
        lr=0.01,
        num_workers=0,
        amp_cpu=False,
    )
    straight = train_refiner(cfg, tmp_path / "straight", data_root=data, show_progress=False)
    stopped = train_refiner(
        cfg, tmp_path / "resumed", data_root=data, show_progress=False, stop_event=StopAfter(3)
    )
    assert stopped.stopped and stopped.epochs_completed == 1
    resumed = train_refiner(cfg, tmp_path / "resumed", data_root=data, show_progress=False, resume=True)
    assert not resumed.stopped and resumed.epochs_completed == 3
    a = load_checkpoint(tmp_path / "straight" / "last.safetensors").state_dict()
    b = load_checkpoint(tmp_path / "resumed" / "last.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.best_val_dice is not None


def test_a_network_without_the_modalitys_refiner_is_refused(data: Path, tmp_path: Path):
    from napari_delightsam.training import TrainingError

    torch.manual_seed(0)
    init = save_checkpoint(
        tmp_path / "init.safetensors",
        DeLightSAM(tiny_config(img_size=64, mask_stride=2, decoder_skips=("image",))),
        {},
    )
    splits = save_splits(tmp_path / "splits.json", make_splits(discover(data), seed=0))
    cfg = TrainConfig(
        model_preset="tiny",
        img_size=64,
        init=str(init),
        device="cpu",
        splits_file=str(splits),
        modalities=("fundus",),
        epochs=1,
        steps_per_epoch=1,
        batch_size=2,
        amp_cpu=False,
    )
    with pytest.raises(TrainingError, match="no refiner for fundus"):
        train_refiner(cfg, tmp_path / "run", data_root=data, show_progress=False)
    with pytest.raises(TrainingError, match="needs a splits file"):
        train_refiner(cfg.replace(splits_file=None), tmp_path / "run2", data_root=data, show_progress=False)
