"""The appearance stages of recipes v2.1 (``microscopy-appearance``) and v2.2
(``fundus-appearance``) on a tiny model: run from a calibrated model file (``recipe v2.2
--start-at fundus-appearance --init FILE``), each changes its own modality's weights only (the
controller where the stage trains it, and the refiner), and the export keeps ``auto``'s
calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread", "single_process_env")


@pytest.mark.parametrize(
    ("recipe_name", "stage_name", "modality", "trains_controller"),
    [("v2.1", "microscopy-appearance", "microscopy", True), ("v2.2", "fundus-appearance", "fundus", False)],
)
def test_an_appearance_stage_changes_its_modalitys_own_weights_only_and_keeps_the_calibration(
    tmp_path: Path, recipe_name: str, stage_name: str, modality: str, trains_controller: bool
):
    from safetensors.torch import load_file

    from napari_delightsam.checkpoint import read_checkpoint_info, save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.data import discover, make_splits, save_splits
    from napari_delightsam.data.synthetic import make_synthetic_dataset
    from napari_delightsam.model import DeLightSAM
    from napari_delightsam.training.stages.recipe import Recipe, load_recipe, run_recipe

    data = make_synthetic_dataset(tmp_path / "data", {modality: [f"{modality}_a"], "dermoscopy": ["derm_a"]},
                                  n_per_dataset=8, size=(64, 80))
    splits = tmp_path / "splits.json"
    save_splits(splits, make_splits(discover(data), seed=0))
    torch.manual_seed(0)
    cfg = tiny_config(img_size=64, modality_head_kind="appearance", mask_stride=2,
                      refiner_modalities=("fundus", "microscopy"), decoder_skips=("image",))
    calibration = {"modality_head_trained": "true", "auto_confidence_threshold": "0.91", "appearance_head": "{}"}
    init = save_checkpoint(tmp_path / "v2.safetensors", DeLightSAM(cfg).eval(), calibration)

    recipe = load_recipe(recipe_name)
    stage = recipe.stages[-1]
    assert stage.name == stage_name and stage.config["select_on"] == "val"
    assert stage.config["modalities"] == [modality] and stage.config["augment_overrides"][modality]
    data_dict = recipe.to_dict()
    data_dict["img_size"] = 64
    data_dict["model"] = {}
    data_dict["common"] = {**data_dict["common"], "num_workers": 0, "log_every": 0}
    data_dict["stages"][-1]["config"] = {**stage.config, "epochs": 1, "steps_per_epoch": 2, "batch_size": 2,
                                         "lr": 1e-2, "amp_cpu": False}
    exported = run_recipe(Recipe.from_dict(data_dict), data, tmp_path / "run", splits_file=splits, device="cpu",
                          start_at=stage_name, init=init, show_progress=False)

    _, meta = read_checkpoint_info(exported)
    assert {k: meta[k] for k in calibration} == calibration
    before, after = load_file(str(init)), load_file(str(exported))
    assert set(before) == set(after)
    own = cfg.modalities.index(modality)
    others = [i for i in range(cfg.num_modalities) if i != own]
    changed_elsewhere, controller_changed, refiner_changed = [], [], []
    for key, old in before.items():
        new, old = after[key].float(), old.half().float()  # the export is fp16
        if key.startswith(f"decoder.refiners.{modality}."):
            refiner_changed.append(not torch.equal(new, old))
        elif ".attn.prompt." in key or ".controller_ffn." in key:  # a stack of one controller per modality
            assert old.shape[0] == cfg.num_modalities, key
            controller_changed.append(not torch.equal(new[own], old[own]))
            if not torch.equal(new[others], old[others]):
                changed_elsewhere.append(key)
        elif not torch.equal(new, old):
            changed_elsewhere.append(key)
    assert not changed_elsewhere  # shared weights, other modalities' controllers and refiners, the head
    assert any(refiner_changed)  # the modality's refiner trained
    assert any(controller_changed) == trains_controller  # and its controller where the stage trains it
