"""Per-modality mask refiners (``ModelConfig.refiner_modalities``, ``model/detail.MaskRefiner``):
the setting's rules, the zero start, that only the listed modalities run one, training and
freezing them, adding one to a checkpoint, inference, and a recipe stage on one modality's cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_delightsam.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from napari_delightsam.config import ModelConfig, tiny_config
from napari_delightsam.data.synthetic import make_synthetic_dataset
from napari_delightsam.inference import Segmenter
from napari_delightsam.model import DeLightSAM, delightsam_loss
from napari_delightsam.model.detail import MaskRefiner
from napari_delightsam.training import TrainConfig, TrainingError
from napari_delightsam.training.caches.embedding_cache import load_embeddings
from napari_delightsam.training.loop.optim import apply_freeze, named_parameter_groups
from napari_delightsam.training.model_setup import build_model
from napari_delightsam.training.stages.recipe import Recipe, run_recipe

pytestmark = pytest.mark.usefixtures("one_thread", "single_process_env")

FUNDUS = tiny_config().modalities.index("fundus")


def make(refined: tuple[str, ...] = ("fundus",), seed: int = 0, **kw) -> DeLightSAM:
    torch.manual_seed(seed)
    return DeLightSAM(tiny_config(mask_stride=2, decoder_skips=("image",), refiner_modalities=refined, **kw)).eval()


def perturb(refiner: torch.nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in refiner.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_refiner_modalities_must_be_known_distinct_and_need_the_stride_two_stage():
    assert ModelConfig().refiner_modalities == ()
    with pytest.raises(ValueError, match="refiner_modalities must be distinct names"):
        tiny_config(mask_stride=2, refiner_modalities=("retina",))
    with pytest.raises(ValueError, match="refiner_modalities must be distinct names"):
        tiny_config(mask_stride=2, refiner_modalities=("fundus", "fundus"))
    with pytest.raises(ValueError, match="need mask_stride 2"):
        tiny_config(mask_stride=4, refiner_modalities=("fundus",))
    for name, bad in (("refiner_width", 0), ("refiner_levels", 0), ("refiner_width", 2.5)):
        with pytest.raises(ValueError, match=name):
            tiny_config(mask_stride=2, refiner_modalities=("fundus",), **{name: bad})
    assert set(make(("fundus", "microscopy")).decoder.refiners) == {"fundus", "microscopy"}


def test_a_new_refiner_starts_as_the_identity_and_then_changes_only_its_modality():
    plain = make(())
    refined = make()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.refiners.fundus.") for k in missing)
    x = torch.randn(3, 3, 128, 128)
    modality = torch.tensor([FUNDUS, 0, FUNDUS])
    with torch.no_grad():
        before = plain(x, modality).mask_logits
        torch.testing.assert_close(refined(x, modality).mask_logits, before)
        perturb(refined.decoder.refiners["fundus"])
        after = refined(x, modality).mask_logits
        # a mixed batch: the fundus rows change, the other row is untouched and each row is what
        # the same image gives alone
        assert float((after[0] - before[0]).abs().max()) > 1e-3 and float((after[2] - before[2]).abs().max()) > 1e-3
        torch.testing.assert_close(after[1], before[1])
        for i in range(3):
            torch.testing.assert_close(refined(x[i : i + 1], modality[i : i + 1]).mask_logits[0], after[i], rtol=1e-4, atol=1e-5)


def test_the_refiner_learns_and_is_its_own_parameter_group():
    model = make().train()
    groups = named_parameter_groups(model)
    refiners = {n for n, _ in groups["refiners"]}
    assert refiners == {n for n, _ in model.named_parameters() if n.startswith("decoder.refiners.")} and refiners
    assert not any(n.startswith("decoder.refiners.") for n, _ in groups["decoder"])
    frozen = ("encoder", "decoder", "fine_upscale", "prompt_generator")
    assert {n for n, _ in apply_freeze(model, frozen, False)} == refiners
    assert not ({n for n, _ in apply_freeze(model, ("refiners",))} & refiners)
    assert TrainConfig(freeze=("refiners",)).freeze == ("refiners",)
    assert TrainConfig(lr_scale={"refiners": 2.0}).lr_scale == {"refiners": 2.0}

    apply_freeze(model, frozen, False)
    refiner = model.decoder.refiners["fundus"]
    opt = torch.optim.SGD(refiner.parameters(), lr=0.5)
    x = torch.randn(2, 3, 128, 128)
    modality = torch.tensor([FUNDUS, FUNDUS])
    target = (torch.rand(2, 1, 128, 128) > 0.5).float()
    for step in range(2):
        opt.zero_grad()
        out = model(x, modality)
        delightsam_loss(out.mask_logits, out.patch_logits, target).total.backward()
        assert float(refiner.out.weight.grad.abs().sum()) > 0
        if step == 1:  # the zero-initialised output conv lets the rest learn once it moved
            assert all(float(p.grad.abs().sum()) > 0 for p in refiner.parameters())
        opt.step()
    # a batch without fundus never runs the refiner: with the rest frozen, nothing is in the graph
    assert model(x, modality).mask_logits.requires_grad
    assert not model(x, torch.tensor([0, 1])).mask_logits.requires_grad


def test_parameter_counts_keep_refiners_apart():
    plain, refined = make(()), make()
    size = sum(p.numel() for p in refined.decoder.refiners.parameters())
    counts, before = refined.parameter_counts(), plain.parameter_counts()
    assert counts["refiners"] == size and "refiners" not in before
    assert counts["total"] == before["total"] + size
    assert counts["shared"] == before["shared"] and counts["per_modality"] == before["per_modality"]
    assert counts["active"] == before["active"] + size
    assert counts["total"] == counts["shared"] + refined.config.num_modalities * counts["per_modality"] + size


def test_a_stride_two_checkpoint_takes_a_refiner_through_a_model_override(tmp_path: Path):
    plain = make(())
    path = save_checkpoint(tmp_path / "plain.safetensors", plain, {})
    base = dict(model_preset="tiny", img_size=128, init=str(path), device="cpu")
    model, report = build_model(TrainConfig(**base, model={"refiner_modalities": ["fundus"]}))
    assert report["added_tensors"] == len(model.decoder.refiners["fundus"].state_dict())
    x, m = torch.randn(1, 3, 128, 128), torch.tensor([FUNDUS])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, m).mask_logits, plain(x, m).mask_logits)
    perturb(model.decoder.refiners["fundus"])
    saved = save_checkpoint(tmp_path / "refined.safetensors", model, {})
    cfg, _ = read_checkpoint_info(saved)
    assert cfg.refiner_modalities == ("fundus",)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(saved).eval()(x, m).mask_logits, model(x, m).mask_logits)
    # a second modality is added on top; a refiner of another width would not fit the stored one
    more, report = build_model(TrainConfig(**{**base, "init": str(saved)}, model={"refiner_modalities": ["fundus", "xray"]}))
    assert report["added_tensors"] == len(more.decoder.refiners["xray"].state_dict())
    with pytest.raises(TrainingError, match="change the architecture"):
        build_model(TrainConfig(**{**base, "init": str(saved)}, model={"refiner_width": 8}))
    with pytest.raises(TrainingError, match="invalid model settings"):
        build_model(TrainConfig(**base, model={"refiner_modalities": ["fundus"], "mask_stride": 4}))


def test_the_refiner_rejects_inputs_of_other_sizes():
    refiner = MaskRefiner(8, width=4, levels=2)
    with pytest.raises(ValueError, match="refiner inputs disagree"):
        refiner(torch.randn(1, 3, 64, 64), torch.randn(1, 8, 16, 16), torch.randn(1, 1, 16, 16))
    out = refiner(torch.randn(1, 3, 64, 64), torch.randn(1, 8, 32, 32), torch.randn(1, 1, 32, 32))
    assert out.shape == (1, 1, 32, 32)


def test_segmenter_runs_the_refiner_for_its_modality_and_the_fast_path_agrees(tmp_path: Path):
    model = make()
    perturb(model.decoder.refiners["fundus"], 0.1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(90, 140, 3), dtype=np.uint8)
    exact = Segmenter.from_model(model, "cpu", precision="fp32")
    refined = exact.segment(image, "fundus")
    assert refined.mask.shape == (90, 140)
    without = make(())
    without.load_state_dict(model.state_dict(), strict=False)
    plain = Segmenter.from_model(without, "cpu", precision="fp32")
    assert not np.allclose(refined.probability, plain.segment(image, "fundus").probability, atol=1e-3)
    np.testing.assert_allclose(exact.segment(image, "xray").probability, plain.segment(image, "xray").probability, atol=1e-5)
    fast = Segmenter.from_model(load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model, {})), "cpu")
    np.testing.assert_allclose(fast.segment(image, "fundus").probability, refined.probability, atol=2e-2)


def test_a_recipe_stage_trains_a_refiner_on_its_modalitys_cache_only(tmp_path: Path):
    root = make_synthetic_dataset(tmp_path / "data", {"fundus": ["drive_a"], "xray": ["xr_a"]}, n_per_dataset=6, size=(40, 52))
    recipe = Recipe.from_dict(
        {
            "name": "tiny-refiner",
            "img_size": 64,
            "views": [0],
            "model": {"decoder_skips": ["image"], "mask_stride": 2},
            "common": {"model_preset": "tiny", "init": "none", "batch_size": 2, "num_workers": 0,
                       "log_every": 0, "val_at_start": True, "amp_cpu": False},
            "stages": [
                {"name": "heads", "kind": "heads", "config": {"epochs": 1, "steps_per_epoch": 2}},
                {"name": "refiner", "kind": "heads",
                 "config": {"init": "previous", "epochs": 1, "steps_per_epoch": 2, "lr": 0.01,
                            "model": {"refiner_modalities": ["fundus"]}, "modalities": ["fundus"],
                            "freeze": ["modality_head", "decoder", "prompt_generator", "fine_upscale"],
                            "train_modality_head": False}},
            ],
        }
    )
    out = tmp_path / "run"
    exported = run_recipe(recipe, root, out, device="cpu", show_progress=False)
    assert {f.name.split("__")[1] for f in (out / "cache").glob("*.safetensors")} == {"fundus", "xray"}
    later = sorted((out / "cache-refiner").glob("*.safetensors"))
    assert later and {f.name.split("__")[1] for f in later} == {"fundus"}
    assert all(set(load_embeddings(f).keys) for f in later)
    cfg, _ = read_checkpoint_info(exported)
    assert cfg.refiner_modalities == ("fundus",)
    before = load_checkpoint(out / "heads" / "best.safetensors").state_dict()
    after = load_checkpoint(out / "refiner" / "last.safetensors").state_dict()
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in after.items() if k.startswith("decoder.refiners.fundus.out."))
    assert all(torch.equal(after[k], t) for k, t in before.items())


def test_checkpoint_speed_times_every_checkpoint_and_modality(load_script, tmp_path: Path, capsys):
    speed = load_script("benchmarks/checkpoint_speed.py")
    model = make()
    path = save_checkpoint(tmp_path / "refined.safetensors", model, {})
    plain = save_checkpoint(tmp_path / "plain.safetensors", make(()), {})
    out = tmp_path / "speed.json"
    argv = ["--checkpoint", f"a={path}", "--checkpoint", f"b={plain}", "--modality", "fundus", "xray",
            "--rounds", "2", "--size", "48", "--threads", "1", "--json", str(out)]
    assert speed.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["checkpoint"], r["modality"]) for r in rows] == [("a", "fundus"), ("a", "xray"), ("b", "fundus"), ("b", "xray")]
    assert all(r["median_ms"] >= r["min_ms"] > 0 for r in rows)
    assert "| a | fundus |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        speed.main(["--checkpoint", str(path)])


def test_info_reports_the_refiners_parameters_and_the_refined_modalitys_flops(tmp_path: Path, capsys):
    from napari_delightsam.cli import main

    model = make()
    path = save_checkpoint(tmp_path / "refined.safetensors", model, {})
    assert main(["info", "--checkpoint", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["refiner_modalities"] == ["fundus"]
    assert info["parameters"]["refiners"] == sum(p.numel() for p in model.decoder.refiners.parameters())
    refined = info["flops_refined_modalities"]["fundus"]
    # modality 0 (the headline figure) does not run the refiner; fundus runs it on top
    assert model.config.modalities[0] != "fundus" and refined["flops"] > info["flops"]["flops"]
    assert refined["by_component_gflops"]["decoder"] > info["flops"]["by_component_gflops"]["decoder"]
    assert main(["info", "--checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "refiners" in out and "fundus (runs its refiner)" in out
    plain = save_checkpoint(tmp_path / "plain.safetensors", make(()), {})
    assert main(["info", "--checkpoint", str(plain), "--json"]) == 0
    assert "flops_refined_modalities" not in json.loads(capsys.readouterr().out)


def test_the_feature_cache_ablation_runs_the_refiner_stage_on_any_checkpoint(load_script, tmp_path: Path, capsys):
    from napari_delightsam.data import discover, make_splits, save_splits

    script = load_script("benchmarks/refiner_feature_cache.py")
    root = make_synthetic_dataset(tmp_path / "data", {"fundus": ["drive_a"], "xray": ["xr_a"]}, n_per_dataset=8, size=(40, 52))
    splits = save_splits(tmp_path / "splits.json", make_splits(discover(root), seed=0, ratios=(0.6, 0.2, 0.2)))
    ckpt = save_checkpoint(tmp_path / "m.safetensors", make((), img_size=64), {})
    out = tmp_path / "run"
    argv = ["--data", str(root), "--splits", str(splits), "--modality", "fundus", "--out", str(out),
            "--checkpoint", str(ckpt), "--width", "4", "--levels", "2", "--steps", "4", "--eval-every", "2",
            "--batch", "2", "--threads", "1"]
    assert script.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.get("step") for r in lines] == [0, 2, 4, None]
    assert set(lines[0]["val_dice_per_dataset"]) == {"fundus/drive_a"}
    model = load_checkpoint(out / "last.safetensors")
    assert model.config.refiner_modalities == ("fundus",) and model.config.refiner_width == 4
    assert float(model.decoder.refiners["fundus"].out.weight.detach().abs().sum()) > 0  # it trained
    assert script.main(argv) == 0  # a finished run folder is continued: nothing left to do
    with pytest.raises(SystemExit):
        script.main([*argv[:-6], "--steps", "3", "--eval-every", "2"])
