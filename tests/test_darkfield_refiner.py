"""The dark-field refiner (``ModelConfig.darkfield_refiners``, ``model/image_rules.py``): the rule
that tells a dark-field image, the routing of a batch's images between a modality's two
refiners, the graft that fills the second one from another model, the recipe stage that runs
it, and tiled inference deciding once per image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_delightsam.checkpoint import read_checkpoint_info, save_checkpoint
from napari_delightsam.config import darkfield_refiner_name, tiny_config
from napari_delightsam.data.loader import normalise
from napari_delightsam.inference import Segmenter
from napari_delightsam.model import DeLightSAM
from napari_delightsam.model.image_rules import DARKFIELD_MEDIAN, darkfield_rows
from napari_delightsam.training.stages.graft import GraftConfig, graft

pytestmark = pytest.mark.usefixtures("one_thread")

COPY = {"decoder.refiners.microscopy.": "decoder.refiners.microscopy_darkfield."}


def _net(pixels: np.ndarray) -> torch.Tensor:
    """(H,W,3) 0-255 -> the (1,3,H,W) normalised network input."""
    return normalise(torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None])


def _fluorescence(size: int = 64, seed: int = 0) -> np.ndarray:
    """Bright blobs on a black field, equal channels."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float32)
    for _ in range(6):
        y, x = rng.integers(8, size - 8, 2)
        img[y - 4 : y + 4, x - 4 : x + 4] = rng.uniform(150, 255)
    return np.repeat(img[..., None], 3, axis=2)


def _brightfield(size: int = 64, seed: int = 1) -> np.ndarray:
    """Dark purple blobs on a pale pink field (H&E-like colours)."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (235, 200, 220)
    for _ in range(6):
        y, x = rng.integers(8, size - 8, 2)
        img[y - 4 : y + 4, x - 4 : x + 4] = (90, 40, 140)
    return img


def _model(darkfield: tuple[str, ...] = ("microscopy",), seed: int = 0) -> DeLightSAM:
    torch.manual_seed(seed)
    cfg = tiny_config(img_size=64, mask_stride=2, decoder_skips=("image",), refiner_modalities=("fundus", "microscopy"),
                      darkfield_refiners=darkfield)
    model = DeLightSAM(cfg).eval()
    with torch.no_grad():  # refiners start as the identity: make each one a different function
        for refiner in model.decoder.refiners.values():
            for p in refiner.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    return model


def test_the_rule_takes_grey_images_with_a_dark_median_only():
    fluo, bright = _fluorescence(), _brightfield()
    grey_he = np.repeat(bright.mean(2, keepdims=True), 3, axis=2)  # an H&E field in greyscale: bright
    dark_colour = fluo.copy()
    dark_colour[..., 0] *= 0.3  # a dark image in colour (e.g. a stained fluorescence overlay)
    flat = np.full((64, 64, 3), DARKFIELD_MEDIAN - 1, np.float32)
    just_above = np.full((64, 64, 3), DARKFIELD_MEDIAN + 1, np.float32)
    got = darkfield_rows(torch.cat([_net(x) for x in (fluo, bright, grey_he, dark_colour, flat, just_above)]))
    assert got.tolist() == [True, False, False, False, True, False]


def test_darkfield_refiners_must_name_refined_modalities():
    with pytest.raises(ValueError, match="darkfield_refiners must be distinct names from refiner_modalities"):
        tiny_config(mask_stride=2, refiner_modalities=("fundus",), darkfield_refiners=("microscopy",))
    with pytest.raises(ValueError, match="darkfield_refiners must be distinct"):
        tiny_config(mask_stride=2, refiner_modalities=("microscopy",), darkfield_refiners=("microscopy", "microscopy"))
    model = _model()
    assert set(model.decoder.refiners) == {"fundus", "microscopy", darkfield_refiner_name("microscopy")}


def test_each_image_goes_through_its_own_refiner_alone_or_in_a_mixed_batch():
    model = _model()
    micro = model.config.modality_index("microscopy")
    fundus = model.config.modality_index("fundus")
    x = torch.cat([_net(_fluorescence()), _net(_brightfield()), _net(_fluorescence(seed=3))])
    with torch.inference_mode():
        mixed = model(x, torch.tensor([micro, micro, fundus]), correct_colour=False).mask_logits
        alone = [model(x[i : i + 1], torch.tensor([m]), correct_colour=False).mask_logits
                 for i, m in enumerate([micro, micro, fundus])]
        # the same network without the dark-field refiner: the bright-field image and the fundus
        # image (fundus has no dark-field refiner) are unchanged, the fluorescence image is not
        plain = DeLightSAM(model.config.replace(darkfield_refiners=())).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "_darkfield." not in k})
        without = plain(x, torch.tensor([micro, micro, fundus]), correct_colour=False).mask_logits
        # the caller may decide instead of the pixels (tiled inference decides once per image)
        forced = model(x[:1], torch.tensor([micro]), correct_colour=False, darkfield=torch.tensor([False])).mask_logits
    for i in range(3):
        torch.testing.assert_close(mixed[i : i + 1], alone[i], atol=2e-3, rtol=1e-3)  # batched convs round differently
    torch.testing.assert_close(mixed[1:], without[1:], atol=2e-3, rtol=1e-3)
    assert (mixed[0] - without[0]).abs().max() > 0.1
    torch.testing.assert_close(forced, without[:1], atol=2e-3, rtol=1e-3)


def test_graft_fills_the_new_refiner_from_the_source_and_keeps_everything_else(tmp_path: Path):
    from safetensors.torch import load_file

    init_model, source_model = _model(darkfield=(), seed=0), _model(darkfield=(), seed=1)
    init = save_checkpoint(tmp_path / "init.safetensors", init_model, {"auto_confidence_threshold": "0.5"})
    source = save_checkpoint(tmp_path / "source.safetensors", source_model)
    cfg = GraftConfig.from_dict({"source_stage": "nuclei-refiner", "copy": COPY,
                                 "model": {"darkfield_refiners": ["microscopy"]}})
    out = graft(init, source, tmp_path / "out.safetensors", cfg)

    config, meta = read_checkpoint_info(out)
    assert config.darkfield_refiners == ("microscopy",) and meta["auto_confidence_threshold"] == "0.5"
    record = json.loads(meta["training"])
    assert record["kind"] == "graft" and record["source_stage"] == "nuclei-refiner" and record["tensors"] > 0
    before, after, src = load_file(str(init)), load_file(str(out)), load_file(str(source))
    new = set(after) - set(before)
    assert new and all(k.startswith("decoder.refiners.microscopy_darkfield.") for k in new)
    for key in new:
        torch.testing.assert_close(after[key], src[key.replace("microscopy_darkfield", "microscopy")], rtol=0, atol=0)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)


def test_graft_refuses_what_it_cannot_fill(tmp_path: Path):
    init = save_checkpoint(tmp_path / "init.safetensors", _model(darkfield=()))
    no_refiner = DeLightSAM(tiny_config(img_size=64, mask_stride=2, decoder_skips=("image",))).eval()
    source = save_checkpoint(tmp_path / "source.safetensors", no_refiner)
    cfg = GraftConfig.from_dict({"source_stage": "s", "copy": COPY, "model": {"darkfield_refiners": ["microscopy"]}})
    with pytest.raises(ValueError, match="has no tensors under 'decoder.refiners.microscopy.'"):
        graft(init, source, tmp_path / "out.safetensors", cfg)
    unfilled = GraftConfig.from_dict({"source_stage": "s", "copy": {"decoder.refiners.fundus.": "decoder.refiners.fundus."},
                                      "model": {"darkfield_refiners": ["microscopy"]}})
    with pytest.raises(ValueError, match="add tensors the copy does not fill"):
        graft(init, init, tmp_path / "out.safetensors", unfilled)
    assert not (tmp_path / "out.safetensors").exists()
    for bad, match in (({"copy": COPY}, "needs 'source_stage'"), ({"source_stage": "s"}, "needs 'copy'"),
                       ({"source_stage": "s", "copy": {"a": "b"}}, "prefixes ending in '.'"),
                       ({"source_stage": "s", "copy": COPY, "steps": 3}, "unknown graft settings")):
        with pytest.raises(ValueError, match=match):
            GraftConfig.from_dict(bad)


@pytest.mark.usefixtures("single_process_env")
def test_recipe_v2_4_grafts_the_earlier_stages_refiner_and_exports_it(tmp_path: Path):
    from safetensors.torch import load_file

    from napari_delightsam.data import discover, make_splits, save_splits
    from napari_delightsam.data.synthetic import make_synthetic_dataset
    from napari_delightsam.training import TrainingError
    from napari_delightsam.training.stages.recipe import load_recipe, run_recipe

    data = make_synthetic_dataset(tmp_path / "data", {"microscopy": ["m"]}, n_per_dataset=4, size=(64, 64))
    splits = tmp_path / "splits.json"
    save_splits(splits, make_splits(discover(data), seed=0))
    recipe = load_recipe("v2.4")
    stage = recipe.stages[-1]
    assert (stage.name, stage.kind) == ("darkfield-refiner", "graft")
    assert stage.config["source_stage"] in [s.name for s in recipe.stages[:-1]]
    init = save_checkpoint(tmp_path / "v2.3.safetensors", _model(darkfield=(), seed=0))
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="best checkpoint .* is missing"):
        run_recipe(recipe, data, run, splits_file=splits, device="cpu", start_at=stage.name, init=init,
                   show_progress=False)
    (run / "nuclei-refiner").mkdir(parents=True)
    save_checkpoint(run / "nuclei-refiner" / "best.safetensors", _model(darkfield=(), seed=1))
    exported = run_recipe(recipe, data, run, splits_file=splits, device="cpu", start_at=stage.name, init=init,
                          show_progress=False)
    config, meta = read_checkpoint_info(exported)
    assert config.darkfield_refiners == ("microscopy",)
    assert json.loads(meta["recipe_stages"])["darkfield-refiner"]["kind"] == "graft"
    after, src = load_file(str(exported)), load_file(str(run / "nuclei-refiner" / "best.safetensors"))
    key = next(k for k in after if k.startswith("decoder.refiners.microscopy_darkfield."))
    torch.testing.assert_close(after[key].float(), src[key.replace("_darkfield", "")].half().float())


def test_tiles_take_the_whole_images_darkfield_decision(monkeypatch):
    seg = Segmenter(_model(), device="cpu", fast=False)
    img = _fluorescence(size=200).astype(np.uint8)
    img[:100, :100] = 200  # a quarter of the image is bright: its tiles alone are not dark-field
    seen: list[object] = []
    real_run = seg._run

    def spy(batch, modality, **kwargs):
        seen.append(kwargs.get("darkfield"))
        return real_run(batch, modality, **kwargs)

    monkeypatch.setattr(seg, "_run", spy)
    res = seg.segment(img, "microscopy", tiling="on", tile_scale=1.0, tile_overlap=16)
    assert res.tiling["tiles"] > 1 and seen and all(d is True for d in seen)
    assert res.refiner == "microscopy_darkfield"


def test_each_result_names_the_refiner_that_corrected_it():
    seg = Segmenter(_model(), device="cpu", fast=False)
    fluo, bright = _fluorescence().astype(np.uint8), _brightfield().astype(np.uint8)
    results = seg.segment_batch([fluo, bright, fluo, bright], ["microscopy", "microscopy", "fundus", "dermoscopy"])
    assert [r.refiner for r in results] == ["microscopy_darkfield", "microscopy", "fundus", None]
    assert seg.segment(fluo[..., 0], "microscopy").refiner == "microscopy_darkfield"  # a 2D grey image
    plain = Segmenter(_model(darkfield=()), device="cpu", fast=False)
    assert plain.segment(fluo, "microscopy").refiner == "microscopy"


def test_a_refiner_stage_records_only_the_images_its_refiner_receives(tmp_path: Path):
    from PIL import Image

    from napari_delightsam.data import discover
    from napari_delightsam.training.stages.refiner_stage import record_refiner_inputs

    folder = tmp_path / "data" / "microscopy" / "m"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for name, img in (("bright", _brightfield()), ("dark", _fluorescence()), ("bright2", _brightfield(seed=4))):
        Image.fromarray(img.astype(np.uint8)).save(folder / "images" / f"{name}.png")
        Image.fromarray(((img.mean(2) > 128) * 255).astype(np.uint8)).save(folder / "masks" / f"{name}.png")
    records = sorted(discover(tmp_path / "data"), key=lambda r: r.sample_id)
    model = _model()
    rows = record_refiner_inputs(model, "microscopy", records, torch.device("cpu"), train=True)
    assert [r.sample_id for r in rows.records] == ["bright", "bright2"] and rows.image.shape[0] == 2
    plain = record_refiner_inputs(_model(darkfield=()), "microscopy", records, torch.device("cpu"), train=True)
    assert len(plain) == 3


def test_a_recipe_with_a_bad_graft_stage_is_refused_before_anything_runs():
    from napari_delightsam.training.stages.recipe import Recipe, load_recipe

    data = load_recipe("v2.4").to_dict()
    data["stages"][-1]["config"] = {"source_stage": "nuclei-refiner"}  # no 'copy'
    with pytest.raises(ValueError, match="recipe stage 'darkfield-refiner': a graft stage needs 'copy'"):
        Recipe.from_dict(data)
