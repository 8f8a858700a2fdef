"""QM-Decoder detail skips (model/detail.py): built only when configured, fed, trained, stored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from napari_delightsam.checkpoint import load_checkpoint, save_checkpoint
from napari_delightsam.config import ModelConfig, tiny_config
from napari_delightsam.model import DeLightSAM, delightsam_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def make(skips: tuple[str, ...], seed: int = 0) -> DeLightSAM:
    torch.manual_seed(seed)
    return DeLightSAM(tiny_config(decoder_skips=skips)).eval()


def test_without_skips_the_decoder_is_the_papers():
    plain = make(())
    assert plain.decoder.stage0_detail is None and plain.decoder.image_detail is None
    names = {n for n, _ in plain.decoder.named_parameters()}
    assert not any("detail" in n for n in names)


@pytest.mark.parametrize("skips", [("stage0",), ("image",), ("stage0", "image")])
def test_each_skip_changes_the_mask_and_receives_gradient(skips):
    model = make(skips)
    x = torch.randn(2, 3, 128, 128)
    modality = torch.tensor([0, 3])
    out = model(x, modality)
    assert out.mask_logits.shape == (2, 1, 32, 32)
    # the same weights with the detail branches' outputs zeroed give another mask
    for part in (model.decoder.stage0_detail, model.decoder.image_detail):
        if part is not None:
            torch.nn.init.zeros_(part.norm.weight)
            torch.nn.init.zeros_(part.norm.bias)
    assert not torch.allclose(model(x, modality).mask_logits, out.mask_logits)
    model = make(skips).train()
    out = model(x, modality)
    delightsam_loss(out.mask_logits, out.patch_logits, (torch.rand(2, 1, 128, 128) > 0.5).float()).total.backward()
    for part in (model.decoder.stage0_detail, model.decoder.image_detail):
        if part is not None:
            grads = [p.grad for p in part.parameters()]
            assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_a_skip_decoder_needs_its_inputs():
    model = make(("stage0", "image"))
    h = torch.randn(1, 32, 8, 8)
    with pytest.raises(ValueError, match="stage-0"):
        model.decoder(h, torch.tensor([0]))
    with pytest.raises(ValueError, match="image"):
        model.decoder(h, torch.tensor([0]), stage0=torch.randn(1, 32, 16, 16))


def test_unknown_or_repeated_skip_names_are_refused():
    with pytest.raises(ValueError, match="decoder_skips"):
        ModelConfig(decoder_skips=("stem",))
    with pytest.raises(ValueError, match="decoder_skips"):
        ModelConfig(decoder_skips=("image", "image"))


def test_skips_survive_a_checkpoint_round_trip(tmp_path: Path):
    model = make(("stage0", "image"))
    path = save_checkpoint(tmp_path / "skip.safetensors", model, {})
    back = load_checkpoint(path).eval()
    assert back.config.decoder_skips == ("stage0", "image")
    x = torch.randn(1, 3, 128, 128)
    m = torch.tensor([2])
    torch.testing.assert_close(back(x, m).mask_logits, model(x, m).mask_logits)
