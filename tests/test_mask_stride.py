"""The QM-Decoder's stride-2 stage (``ModelConfig.mask_stride = 2``, ``model/detail.FineUpscale``):
shapes, its zero start, training and freezing it, adding it to a stride-4 checkpoint, the
embedding cache at its mask size, inference at the input's size, and a recipe stage that adds it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_delightsam.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from napari_delightsam.config import ModelConfig, tiny_config
from napari_delightsam.data import discover, make_splits, select
from napari_delightsam.data.synthetic import make_synthetic_dataset
from napari_delightsam.inference import Segmenter
from napari_delightsam.model import DeLightSAM, delightsam_loss
from napari_delightsam.training import TrainConfig, TrainingError
from napari_delightsam.training.caches.embedding_cache import build_cache_folder, load_embeddings
from napari_delightsam.training.loop.optim import apply_freeze, named_parameter_groups
from napari_delightsam.training.model_setup import build_model
from napari_delightsam.training.stages.heads import train_heads
from napari_delightsam.training.stages.recipe import Recipe, run_recipe

pytestmark = pytest.mark.usefixtures("one_thread", "single_process_env")


def make(stride: int, seed: int = 0, skips: tuple[str, ...] = ("image",)) -> DeLightSAM:
    torch.manual_seed(seed)
    return DeLightSAM(tiny_config(mask_stride=stride, decoder_skips=skips)).eval()


def stride_two_from(four: DeLightSAM) -> DeLightSAM:
    two = DeLightSAM(four.config.replace(mask_stride=2)).eval()
    missing, unexpected = two.load_state_dict(four.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.fine.") for k in missing)
    return two


def test_mask_stride_is_four_or_two():
    assert ModelConfig().mask_stride == 4 and ModelConfig().mask_size == 256
    assert ModelConfig(img_size=512, mask_stride=2).mask_size == 256
    for bad in (1, 3, 8):
        with pytest.raises(ValueError, match="mask_stride"):
            ModelConfig(mask_stride=bad)
    assert make(4).decoder.fine is None
    assert not any(n.startswith("decoder.fine.") for n, _ in make(4).named_parameters())


@pytest.mark.parametrize("skips", [(), ("image",)])
def test_the_stride_two_stage_starts_as_a_bilinear_doubling_of_the_stride_four_logits(skips):
    four = make(4, skips=skips)
    two = stride_two_from(four)
    x = torch.randn(2, 3, 128, 128)
    modality = torch.tensor([1, 4])
    with torch.no_grad():
        low, high = four(x, modality), two(x, modality)
    assert low.mask_logits.shape == (2, 1, 32, 32) and high.mask_logits.shape == (2, 1, 64, 64)
    doubled = F.interpolate(low.mask_logits, scale_factor=2.0, mode="bilinear", align_corners=False)
    torch.testing.assert_close(high.mask_logits, doubled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(high.patch_logits, low.patch_logits)


def test_the_stride_two_stage_learns_and_changes_the_mask():
    model = make(2).train()
    x = torch.randn(2, 3, 128, 128)
    modality = torch.tensor([0, 2])
    target = (torch.rand(2, 1, 128, 128) > 0.5).float()
    fine = model.decoder.fine
    opt = torch.optim.SGD(fine.parameters(), lr=0.5)
    for step in range(2):
        opt.zero_grad()
        out = model(x, modality)
        delightsam_loss(out.mask_logits, out.patch_logits, target).total.backward()
        # the zero-initialised output conv gets a gradient first; the rest once it is non-zero
        assert float(fine.out.weight.grad.abs().sum()) > 0
        if step == 1:
            assert all(float(p.grad.abs().sum()) > 0 for p in fine.parameters())
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model(x, modality).mask_logits
        model.decoder.fine.out.weight.zero_()
        model.decoder.fine.out.bias.zero_()
        assert not torch.allclose(model(x, modality).mask_logits, after)


def test_the_stride_two_decoder_needs_the_image():
    model = make(2, skips=())
    with pytest.raises(ValueError, match="stride-2 stage: pass the normalised image"):
        model.decoder(torch.randn(1, 32, 8, 8), torch.tensor([0]))
    assert model.decoder.needs_image and make(2, skips=("image",)).decoder.needs_image
    assert not make(4, skips=()).decoder.needs_image


def test_the_stage_is_its_own_parameter_group_and_can_be_frozen():
    model = make(2)
    groups = named_parameter_groups(model)
    fine = {n for n, _ in groups["fine_upscale"]}
    assert fine == {n for n, _ in model.named_parameters() if n.startswith("decoder.fine.")} and fine
    assert not any(n.startswith("decoder.fine.") for n, _ in groups["decoder"])
    trainable = {n for n, _ in apply_freeze(model, ("encoder", "decoder", "prompt_generator"), False)}
    assert trainable == fine
    assert not ({n for n, _ in apply_freeze(model, ("fine_upscale",))} & fine)
    with pytest.raises(ValueError, match="unknown freeze"):
        TrainConfig(freeze=("fine",))
    assert TrainConfig(lr_scale={"fine_upscale": 2.0}).lr_scale == {"fine_upscale": 2.0}


def test_a_stride_four_checkpoint_takes_the_stage_through_a_model_override(tmp_path: Path):
    four = make(4)
    path = save_checkpoint(tmp_path / "four.safetensors", four, {})
    base = dict(model_preset="tiny", img_size=128, init=str(path), device="cpu")
    model, report = build_model(TrainConfig(**base, model={"mask_stride": 2}))
    assert model.config.mask_stride == 2 and report["added_tensors"] == len(list(model.decoder.fine.state_dict()))
    x, m = torch.randn(1, 3, 128, 128), torch.tensor([3])
    with torch.no_grad():
        doubled = F.interpolate(four(x, m).mask_logits, scale_factor=2.0, mode="bilinear", align_corners=False)
        torch.testing.assert_close(model.eval()(x, m).mask_logits, doubled, rtol=1e-5, atol=1e-5)
    # a plain continuation adds nothing; another architecture change is still refused
    assert build_model(TrainConfig(**base))[1]["added_tensors"] == 0
    with pytest.raises(TrainingError, match="change the architecture"):
        build_model(TrainConfig(**base, model={"decoder_skips": ["stage0", "image"]}))
    # and a stride-2 checkpoint round-trips with its stage
    saved = save_checkpoint(tmp_path / "two.safetensors", model, {})
    cfg, _ = read_checkpoint_info(saved)
    back = load_checkpoint(saved).eval()
    assert cfg.mask_stride == 2
    torch.testing.assert_close(back(x, m).mask_logits, model(x, m).mask_logits)


def test_a_wider_stage_image_branch_is_a_setting_and_still_starts_as_the_doubling(tmp_path: Path):
    four = make(4)
    path = save_checkpoint(tmp_path / "four.safetensors", four, {})
    base = dict(model_preset="tiny", img_size=128, init=str(path), device="cpu")
    narrow, _ = build_model(TrainConfig(**base, model={"mask_stride": 2}))
    wide, report = build_model(TrainConfig(**base, model={"mask_stride": 2, "fine_hidden": 32}))
    assert wide.decoder.fine.image_conv.out_channels == 32 and narrow.decoder.fine.image_conv.out_channels == 16
    assert sum(p.numel() for p in wide.decoder.fine.parameters()) > sum(p.numel() for p in narrow.decoder.fine.parameters())
    assert report["added_tensors"] == len(list(wide.decoder.fine.state_dict()))
    x, m = torch.randn(1, 3, 128, 128), torch.tensor([2])
    with torch.no_grad():
        torch.testing.assert_close(wide.eval()(x, m).mask_logits, narrow.eval()(x, m).mask_logits, rtol=1e-5, atol=1e-5)
    back_cfg, _ = read_checkpoint_info(save_checkpoint(tmp_path / "wide.safetensors", wide, {}))
    assert back_cfg.fine_hidden == 32
    # a stride-2 checkpoint's stage cannot change width by an override (its tensors would not fit)
    with pytest.raises(TrainingError, match="change the architecture"):
        build_model(TrainConfig(**{**base, "init": str(tmp_path / "wide.safetensors")}, model={"fine_hidden": 16}))
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="fine_hidden"):
            ModelConfig(fine_hidden=bad)


def test_segmenter_returns_masks_at_the_input_size_and_its_fast_path_agrees(tmp_path: Path):
    model = make(2)
    with torch.no_grad():  # a non-zero stage, so the check covers its convolutions
        for p in model.decoder.fine.parameters():
            p.normal_(0, 0.05)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(90, 140, 3), dtype=np.uint8)
    exact = Segmenter.from_model(model, "cpu", precision="fp32").segment(image, "fundus")
    assert exact.mask.shape == (90, 140) and exact.probability.shape == (90, 140)
    fast = Segmenter.from_model(load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model, {})), "cpu")
    got = fast.segment(image, "fundus")
    np.testing.assert_allclose(got.probability, exact.probability, atol=2e-2)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, list, object]:
    root = make_synthetic_dataset(tmp_path_factory.mktemp("stride") / "data", n_per_dataset=8, size=(40, 52))
    records = discover(root)
    return root, records, make_splits(records, seed=0, ratios=(0.6, 0.2, 0.2))


TINY = dict(img_size=64, model_preset="tiny", num_workers=0, device="cpu", log_every=0, batch_size=4, amp_cpu=False)


def test_the_cache_holds_masks_at_the_decoders_output_size(synthetic, tmp_path: Path):
    _, records, splits = synthetic
    train = select(records, splits, "train")
    four, _ = build_model(TrainConfig(**TINY))
    two = DeLightSAM(four.config.replace(mask_stride=2))
    two.load_state_dict(four.state_dict(), strict=False)
    folder = tmp_path / "cache"
    files = build_cache_folder(four.eval(), train, folder, "train", keep_skip=True)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert load_embeddings(files[0]).mask.shape[-1] == 16
    # same encoder, other decoder output size: every file is made again, at 32²
    again = build_cache_folder(two.eval(), train, folder, "train", keep_skip=True)
    assert all(f.stat().st_mtime_ns != stamps[f] for f in again)
    data = load_embeddings(again[0])
    assert data.mask.shape[-1] == 32 and data.meta["mask_size"] == "32"
    # a stride-4 model refuses to train on it
    source = save_checkpoint(tmp_path / "four.safetensors", four, {})
    with pytest.raises(TrainingError, match="rebuild the cache"):
        train_heads(TrainConfig(**TINY, init=str(source), epochs=1, steps_per_epoch=1), folder, tmp_path / "h")
    # the stride-2 model trains on it, only its stage and the decoder moving
    cfg = TrainConfig(**TINY, init=str(source), model={"mask_stride": 2}, epochs=1, steps_per_epoch=3,
                      freeze=("prompt_generator", "modality_head"), train_modality_head=False, lr=1e-2)
    result = train_heads(cfg, folder, tmp_path / "h2", show_progress=False)
    trained = load_checkpoint(result.last_checkpoint)
    before, after = two.state_dict(), trained.state_dict()
    assert trained.config.mask_stride == 2
    assert not torch.equal(after["decoder.fine.out.weight"], before["decoder.fine.out.weight"])
    for name in ("encoder.stem.conv1.conv.weight", "prompt_generator.prompt_encoder.0.weight"):
        assert torch.equal(after[name], before[name])


def test_a_later_recipe_stage_adds_the_stage_on_its_own_cache(synthetic, tmp_path: Path):
    root, _, _ = synthetic
    recipe = Recipe.from_dict(
        {
            "name": "tiny-fine",
            "img_size": 64,
            "views": [0],
            "common": {"model_preset": "tiny", "init": "none", "batch_size": 4, "num_workers": 0,
                       "log_every": 0, "val_at_start": False, "amp_cpu": False},
            "stages": [
                {"name": "heads", "kind": "heads", "config": {"epochs": 1, "steps_per_epoch": 2}},
                {"name": "controllers", "kind": "train",
                 "config": {"init": "previous", "epochs": 1, "steps_per_epoch": 1, "freeze": ["backbone"]}},
                {"name": "fine", "kind": "heads",
                 "config": {"init": "previous", "epochs": 1, "steps_per_epoch": 2, "model": {"mask_stride": 2},
                            "max_per_dataset": 2, "freeze": ["modality_head"], "train_modality_head": False}},
            ],
        }
    )
    events: list[dict] = []
    out = tmp_path / "run"
    exported = run_recipe(recipe, root, out, device="cpu", progress=events.append, show_progress=False)
    statuses = [(e["stage"], e["status"]) for e in events if e.get("event") == "recipe"]
    assert statuses.index(("cache-fine", "done")) < statuses.index(("fine", "start"))
    assert statuses.index(("controllers", "done")) < statuses.index(("cache-fine", "start"))
    first = [load_embeddings(f) for f in sorted((out / "cache").glob("train__*"))]
    later = [load_embeddings(f) for f in sorted((out / "cache-fine").glob("train__*"))]
    assert all(d.mask.shape[-1] == 16 for d in first) and all(d.mask.shape[-1] == 32 for d in later)
    # the later cache is the controllers stage's encoder, capped at max_per_dataset training images
    controllers = load_checkpoint(out / "controllers" / "best.safetensors")
    from napari_delightsam.training.caches.embedding_cache import encoder_fingerprint

    assert {d.meta["encoder_sha256"] for d in later} == {encoder_fingerprint(controllers)}
    assert all(len(d.keys) <= 2 for d in later) and any(len(d.keys) > 2 for d in first)
    cfg, _ = read_checkpoint_info(exported)
    assert cfg.mask_stride == 2
