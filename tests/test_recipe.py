"""Training recipes: the shipped v1 recipe is valid; a tiny recipe runs end to end, resumes, exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from napari_delightsam.checkpoint import load_checkpoint, read_checkpoint_info
from napari_delightsam.cli import main
from napari_delightsam.data.synthetic import make_synthetic_dataset
from napari_delightsam.training import TrainingError
from napari_delightsam.training.stages.recipe import RECIPES, Recipe, load_recipe, run_recipe

pytestmark = pytest.mark.usefixtures("one_thread", "single_process_env")

TINY_RECIPE = {
    "name": "tiny",
    "description": "test",
    "img_size": 64,
    "holdout": "none",
    "seed": 0,
    "views": [0, 1],
    "common": {
        "model_preset": "tiny",
        "init": "none",
        "batch_size": 4,
        "num_workers": 0,
        "log_every": 0,
        "val_at_start": False,
        "amp_cpu": False,
    },
    "stages": [
        {"name": "heads", "kind": "heads", "config": {"epochs": 2, "steps_per_epoch": 4, "lr": 2e-3}},
        {
            "name": "controllers",
            "kind": "train",
            "config": {"init": "previous", "epochs": 1, "steps_per_epoch": 2, "freeze": ["backbone"]},
        },
    ],
}


def test_shipped_recipes_are_valid():
    from napari_delightsam.training.stages.appearance_head import HeadStageConfig
    from napari_delightsam.training.stages.graft import GraftConfig

    for name in RECIPES:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.stages
        for stage in recipe.stages:
            if stage.kind == "appearance-head":  # its own settings, not a TrainConfig
                assert HeadStageConfig.from_dict(stage.config).steps > 0
                continue
            if stage.kind == "graft":  # copies an earlier stage's part: that stage is in the chain
                assert GraftConfig.from_dict(stage.config).source_stage in [s.name for s in recipe.stages]
                continue
            cfg = recipe.stage_config(stage)
            assert cfg.img_size == recipe.img_size
    with pytest.raises(FileNotFoundError, match="no recipe"):
        load_recipe("v999")
    bad = dict(TINY_RECIPE, stages=[{"name": "x", "kind": "magic", "config": {}}])
    with pytest.raises(ValueError, match="kind"):
        Recipe.from_dict(bad)
    with pytest.raises(ValueError, match="unknown training config"):
        Recipe.from_dict(dict(TINY_RECIPE, common={"epochz": 1}))
    for reserved in ("dtype", "recipe", "train_config"):
        with pytest.raises(ValueError, match=f"may not set '{reserved}'"):
            Recipe.from_dict(dict(TINY_RECIPE, export_metadata={reserved: "x"}))
    with pytest.raises(ValueError, match="text to text"):
        Recipe.from_dict(dict(TINY_RECIPE, export_metadata={"inference_precision": 32}))


def test_a_recipe_that_extends_another_runs_the_parents_stages_then_its_own(tmp_path: Path):
    parents = {"v2": "v1", "v2.1": "v2", "v2.2": "v2.1", "v2.3": "v2.2", "v2.4": "v2.3"}
    for name, parent_name in parents.items():
        recipe, parent = load_recipe(name), load_recipe(parent_name)
        assert recipe.stages[: len(parent.stages)] == parent.stages and len(recipe.stages) > len(parent.stages)
        assert (recipe.img_size, recipe.holdout, recipe.seed, recipe.views, recipe.common, recipe.model) == (
            parent.img_size, parent.holdout, parent.seed, parent.views, parent.common, parent.model
        )
        assert recipe.description.endswith(parent.description) and recipe.description != parent.description
    child = tmp_path / "mine.json"
    stage = {"name": "more", "kind": "train", "config": {"init": "previous", "epochs": 1}}
    child.write_text(json.dumps({"name": "mine", "description": "Mine.", "extends": "v2.1", "stages": [stage]}))
    mine = load_recipe(child)
    assert mine.name == "mine" and mine.stages[-1].name == "more" and mine.description.startswith("Mine. ")
    assert mine.stages[:-1] == load_recipe("v2.1").stages
    child.write_text(json.dumps({"name": "mine", "extends": "v2.1", "img_size": 256, "stages": [stage]}))
    with pytest.raises(ValueError, match="may set only.*not img_size"):
        load_recipe(child)
    child.write_text(json.dumps({"name": "mine", "extends": "v0", "stages": [stage]}))
    with pytest.raises(ValueError, match="extends 'v0'"):
        load_recipe(child)
    child.write_text(json.dumps({"name": "mine", "extends": "v2.1", "stages": [dict(stage, name="fine")]}))
    with pytest.raises(ValueError, match="distinct names"):  # a stage of the parent's name
        load_recipe(child)


def test_a_stage_may_set_its_own_seed_and_the_others_keep_the_recipes():
    stages = [dict(TINY_RECIPE["stages"][0]), dict(TINY_RECIPE["stages"][1])]
    stages[1]["config"] = dict(stages[1]["config"], seed=5)
    recipe = Recipe.from_dict(dict(TINY_RECIPE, seed=3, stages=stages))
    assert [recipe.stage_config(s).seed for s in recipe.stages] == [3, 5]


def test_a_stage_may_choose_what_selects_its_best_over_the_runs_default():
    stages = [dict(TINY_RECIPE["stages"][0]), dict(TINY_RECIPE["stages"][1])]
    stages[1]["config"] = dict(stages[1]["config"], select_on="val")
    recipe = Recipe.from_dict(dict(TINY_RECIPE, stages=stages))
    # the recipe runner asks for val+unseen where the split has unseen images; the stage's own wins
    assert [recipe.stage_config(s, select_on="val+unseen").select_on for s in recipe.stages] == ["val+unseen", "val"]


def test_tiny_recipe_runs_end_to_end_and_a_second_run_skips_finished_stages(tmp_path: Path, capsys):
    root = make_synthetic_dataset(tmp_path / "data", n_per_dataset=8, size=(40, 52))
    recipe = Recipe.from_dict(TINY_RECIPE)
    out = tmp_path / "run"
    events: list[dict] = []
    exported = run_recipe(recipe, root, out, device="cpu", progress=events.append, show_progress=False)
    assert exported == out / "model.safetensors"
    statuses = [(e["stage"], e["status"]) for e in events if e.get("event") == "recipe"]
    assert ("heads", "done") in statuses and ("controllers", "done") in statuses
    assert {p.name.split("__")[0] for p in (out / "cache").iterdir()} == {"train", "val"}  # no unseen part here
    # the exported model: fp16 storage, the controllers stage's best weights, the recipe inside
    cfg, meta = read_checkpoint_info(exported)
    assert cfg.img_size == 64 and meta["dtype"] == "float16"
    assert json.loads(meta["recipe"])["name"] == "tiny"
    assert set(json.loads(meta["recipe_stages"])) == {"heads", "controllers"}
    best = load_checkpoint(out / "controllers" / "best.safetensors").state_dict()
    got = load_checkpoint(exported).state_dict()
    assert all(torch.equal(got[k], best[k].half().float() if best[k].is_floating_point() else best[k]) for k in best)
    # the controllers stage started from the heads stage and kept the backbone frozen
    heads = load_checkpoint(out / "heads" / "best.safetensors").state_dict()
    assert torch.equal(best["encoder.stem.conv1.conv.weight"], heads["encoder.stem.conv1.conv.weight"])

    stamp = (out / "heads" / "best.safetensors").stat().st_mtime_ns
    again: list[dict] = []
    run_recipe(recipe, root, out, device="cpu", progress=again.append, show_progress=False)
    assert ("heads", "skipped (done)") in [(e["stage"], e["status"]) for e in again if e.get("event") == "recipe"]
    assert (out / "heads" / "best.safetensors").stat().st_mtime_ns == stamp

    other = Recipe.from_dict(dict(TINY_RECIPE, seed=1))
    with pytest.raises(TrainingError, match="another recipe"):
        run_recipe(other, root, out, device="cpu", show_progress=False)


def test_recipe_command(tmp_path: Path, capsys):
    assert main(["recipe", "v1", "--show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "v1"
    assert main(["recipe", "v1"]) == 2
    assert "--data ROOT and --out RUN_DIR are required" in capsys.readouterr().err
    assert main(["recipe", str(tmp_path / "missing.json"), "--show"]) == 2


def test_recipe_until_a_stage_exports_it_and_the_full_run_continues_from_there(tmp_path: Path, capsys):
    root = make_synthetic_dataset(tmp_path / "data", n_per_dataset=8, size=(40, 52))
    # the recipe's export metadata describes the finished model: only the full export carries it
    recipe = Recipe.from_dict(dict(TINY_RECIPE, export_metadata={"inference_precision": "fp32"}))
    out = tmp_path / "run"
    exported = run_recipe(recipe, root, out, device="cpu", show_progress=False, until="heads")
    assert exported == out / "model-heads.safetensors"
    assert not (out / "controllers").exists() and not (out / "model.safetensors").exists()
    _, meta = read_checkpoint_info(exported)
    assert set(json.loads(meta["recipe_stages"])) == {"heads"}
    assert "inference_precision" not in meta
    heads = load_checkpoint(out / "heads" / "best.safetensors").state_dict()
    got = load_checkpoint(exported).state_dict()
    assert all(torch.equal(got[k], heads[k].half().float() if heads[k].is_floating_point() else heads[k]) for k in heads)

    events: list[dict] = []
    full = run_recipe(recipe, root, out, device="cpu", progress=events.append, show_progress=False)
    statuses = [(e["stage"], e["status"]) for e in events if e.get("event") == "recipe"]
    assert ("heads", "skipped (done)") in statuses and ("controllers", "done") in statuses
    _, meta = read_checkpoint_info(full)
    assert meta["inference_precision"] == "fp32"
    assert json.loads(meta["recipe"])["export_metadata"] == {"inference_precision": "fp32"}
    assert full == out / "model.safetensors"

    with pytest.raises(ValueError, match="no stage 'nope'"):
        run_recipe(recipe, root, out, device="cpu", show_progress=False, until="nope")
    assert main(["recipe", "v1", "--data", str(root), "--out", str(tmp_path / "x"), "--until", "nope"]) == 2
    assert "has no stage 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
