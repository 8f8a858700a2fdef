"""The appearance-head stage end to end: ``delightsam train-appearance-head`` and the recipe's
``appearance-head`` stage (``recipe v2 --start-at appearance-head --init FILE``), on a tiny model
and a small synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from napari_delightsam.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.data import discover, make_splits, save_splits
    from napari_delightsam.data.synthetic import make_synthetic_dataset
    from napari_delightsam.model import DeLightSAM

    root = tmp_path_factory.mktemp("stage")
    data = make_synthetic_dataset(root / "data", {"dermoscopy": ["derm_a"], "xray": ["xr_a"]}, n_per_dataset=10)
    splits = root / "splits.json"
    save_splits(splits, make_splits(discover(data), seed=0))
    torch.manual_seed(0)
    init = save_checkpoint(root / "tiny.safetensors", DeLightSAM(tiny_config()).eval(), {"note": "kept"})
    return {"data": data, "splits": splits, "init": init, "root": root}


def test_command_trains_calibrates_and_writes_a_model_with_auto(setup, tmp_path, capsys):
    from napari_delightsam.checkpoint import read_checkpoint_info
    from napari_delightsam.inference import load_model

    out = tmp_path / "run"
    rc = main(["train-appearance-head", "--init", str(setup["init"]), "--data", str(setup["data"]),
               "--splits", str(setup["splits"]), "--out", str(out), "--steps", "4", "--eval-every", "2",
               "--batch-size", "4"])
    assert rc == 0, capsys.readouterr().err
    cfg, meta = read_checkpoint_info(out / "model.safetensors")
    assert cfg.modality_head_kind == "appearance"
    assert meta["modality_head_trained"] == "true" and meta["note"] == "kept"
    threshold = float(meta["auto_confidence_threshold"])
    report = json.loads((out / "summary.json").read_text())
    assert report["calibration"]["auto_confidence_threshold"] == pytest.approx(threshold, abs=0.005)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["type"] == "initial" and any(r.get("type") == "epoch" for r in rows)
    seg = load_model(out / "model.safetensors", "cpu")
    assert seg.auto_available and seg.auto_confidence_threshold == pytest.approx(threshold)
    head = seg.model.modality_head
    assert float(head.temperature) == pytest.approx(report["calibration"]["temperature"], rel=1e-2)


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--steps", "5", "--eval-every", "2"], "multiple"), (["--lr", "0"], "positive"),
     (["--bgr-share", "2"], "bgr-share"), (["--greyscale-p", "1.5"], "greyscale-p"), (["--order-weight", "-1"], "order-weight"), (["--select", "hue"], "select"),
     (["--mix-by-modality", "{not json"], "not JSON"), (["--mix-by-modality", '{"xray": {"hue": 1}}'], "unknown")],
)
def test_command_refuses_bad_settings(setup, tmp_path, capsys, extra, message):
    rc = main(["train-appearance-head", "--init", str(setup["init"]), "--data", str(setup["data"]),
               "--splits", str(setup["splits"]), "--out", str(tmp_path / "run"), *extra])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_command_refuses_a_used_out_folder(setup, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    rc = main(["train-appearance-head", "--init", str(setup["init"]), "--data", str(setup["data"]),
               "--splits", str(setup["splits"]), "--out", str(tmp_path / "run")])
    assert rc == 2 and "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def test_recipe_v2_runs_its_last_stage_from_a_model_file(setup, tmp_path):
    from napari_delightsam.checkpoint import read_checkpoint_info
    from napari_delightsam.training.stages.recipe import Recipe, load_recipe, run_recipe

    v2 = load_recipe("v2")
    heads = [s.name for s in v2.stages if s.kind == "appearance-head"]
    assert heads[0] == "appearance-head" and len(heads) >= 2  # the head, then its continuations
    assert [s.name for s in v2.stages[-len(heads):]] == heads  # the last stages
    data = v2.to_dict()
    for stage in data["stages"][-len(heads):]:  # each stage's own settings, at a tiny size
        stage["config"] = {**stage["config"], "steps": 2, "eval_every": 2, "batch_size": 4}
    recipe = Recipe.from_dict(data)
    exported = run_recipe(recipe, setup["data"], tmp_path / "run", splits_file=setup["splits"], device="cpu",
                          start_at="appearance-head", init=setup["init"], show_progress=False)
    cfg, meta = read_checkpoint_info(exported)
    assert cfg.modality_head_kind == "appearance" and "auto_confidence_threshold" in meta
    assert meta["inference_precision"] == "fp32"  # the recipe's export metadata
    assert not (tmp_path / "run" / "heads").exists()  # the stages before were not run
    for name in heads:
        assert (tmp_path / "run" / name / "stage.done").is_file()
    with pytest.raises(ValueError, match="together"):
        run_recipe(recipe, setup["data"], tmp_path / "run2", start_at="appearance-head")


def test_recipe_v2_3_retrains_the_head_alone_with_wide_field_fundus(setup, tmp_path):
    """v2.3's stage continues the head of the model it starts from: every other tensor is that
    model's, bit for bit, and the export carries a new calibration and the v2.3 recipe."""
    from safetensors.torch import load_file

    from napari_delightsam.checkpoint import read_checkpoint_info
    from napari_delightsam.training.stages.recipe import Recipe, load_recipe, run_recipe

    v23 = load_recipe("v2.3")
    stage = v23.stages[-1]
    assert stage.name == "appearance-head-wide-field" and stage.kind == "appearance-head"
    assert stage.config["mix_by_modality"] == {"fundus": {"wide_field_p": 0.4}}
    tiny = {"steps": 2, "eval_every": 2, "batch_size": 4}
    # the model it starts from has an appearance head already (v2's first head stage, tiny)
    v2 = load_recipe("v2").to_dict()
    v2["stages"] = [{**s, "config": {**s["config"], **tiny}} for s in v2["stages"] if s["name"] == "appearance-head"]
    first = run_recipe(Recipe.from_dict(v2), setup["data"], tmp_path / "v2", splits_file=setup["splits"],
                       device="cpu", start_at="appearance-head", init=setup["init"], show_progress=False)
    data = v23.to_dict()
    data["stages"][-1]["config"] = {**stage.config, **tiny}
    exported = run_recipe(Recipe.from_dict(data), setup["data"], tmp_path / "run", splits_file=setup["splits"],
                          device="cpu", start_at="appearance-head-wide-field", init=first, show_progress=False)
    before, after = load_file(str(first)), load_file(str(exported))
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("modality_head.") for k in changed)
    _, meta = read_checkpoint_info(exported)
    assert json.loads(meta["recipe"])["name"] == "v2.3" and "auto_confidence_threshold" in meta
    assert json.loads(meta["appearance_head"])["calibration"]["n_views"] > 0


def test_validation_sees_greyscale_views_only_when_asked(setup):
    from napari_delightsam.checkpoint import load_checkpoint
    from napari_delightsam.data import discover, load_splits, select
    from napari_delightsam.training.stages.appearance_head import (
        HeadStageConfig,
        load_head_images,
        validation_views,
        with_appearance_head,
    )

    model = with_appearance_head(load_checkpoint(setup["init"]))
    records = select(discover(setup["data"]), load_splits(setup["splits"]), "val", None)
    images = load_head_images(records, list(model.config.modalities))
    plain = validation_views(model, images, model.config.img_size)
    grey = validation_views(model, images, model.config.img_size, grey_view=True)
    colour = sum(1 for im in images if im.colour and im.dataset.startswith("dermoscopy"))
    assert colour > 0 and "greyscale" not in plain.view
    assert grey.view.count("greyscale") == colour and len(grey.view) == len(plain.view) + colour
    idx = [i for i, v in enumerate(grey.view) if v == "greyscale"]
    assert not grey.colour[idx].any() and (grey.order[idx] == 0).all()
    # the other views are the same images, drawn with the same seed
    same = [i for i, v in enumerate(grey.view) if v != "greyscale"]
    assert torch.equal(grey.feats[same], plain.feats)
    cfg = HeadStageConfig.from_dict({"greyscale_p": 0.4, "val_greyscale": True, "mix_by_modality": {"fundus": {"canvas_p": 0.1}}})
    assert cfg.mix.default.greyscale_p == 0.4 and cfg.mix.for_modality("fundus").greyscale_p == 0.4
    with pytest.raises(ValueError, match="greyscale_p"):
        HeadStageConfig.from_dict({"greyscale_p": 2.0})


def test_recipe_refuses_bad_appearance_head_settings():
    from napari_delightsam.training.stages.recipe import Recipe, load_recipe

    data = load_recipe("v2").to_dict()
    data["stages"][-1]["config"] = {"steps": 3, "eval_every": 2}
    with pytest.raises(ValueError, match="appearance-head.*multiple"):
        Recipe.from_dict(data)
    data["stages"][-1]["config"] = {"epochs": 3}
    with pytest.raises(ValueError, match="unknown appearance-head settings"):
        Recipe.from_dict(data)
