"""Conv-BN folding of the inference fast path: exact, complete, and never saved as a checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from napari_delightsam.checkpoint import save_checkpoint
from napari_delightsam.config import tiny_config
from napari_delightsam.inference import load_model
from napari_delightsam.model.fusion import fuse_conv_bn, is_fused


def _randomise_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def test_fused_network_matches_the_original(tiny_model):
    _randomise_bn(tiny_model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in tiny_model.modules())
    fused = copy.deepcopy(tiny_model)
    count = fuse_conv_bn(fused)
    assert count > 0 and is_fused(fused) and not is_fused(tiny_model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) and n_bn >= count
    x = torch.randn(2, 3, tiny_model.config.img_size, tiny_model.config.img_size)
    mod = torch.tensor([0, 1])
    with torch.inference_mode():
        a, b = tiny_model(x, mod), fused(x, mod)
    torch.testing.assert_close(b.mask_logits, a.mask_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.patch_logits, a.patch_logits, rtol=1e-4, atol=1e-4)


def test_fusion_refuses_a_training_model(tiny_model):
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_bn(tiny_model.train())


def test_a_fused_model_is_not_saved_as_a_checkpoint(tiny_model, tmp_path):
    fuse_conv_bn(tiny_model)
    with pytest.raises(ValueError, match="BatchNorm folded"):
        save_checkpoint(tmp_path / "fused.safetensors", tiny_model)
    assert not (tmp_path / "fused.safetensors").exists()


def test_load_model_fuses_only_on_the_fast_path(tiny_model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model)
    fast = load_model(path, "cpu")
    slow = load_model(path, "cpu", fast=False)
    assert is_fused(fast.model) and "conv-BN fused" in fast.fast_path_description()
    assert not is_fused(slow.model) and any(isinstance(m, nn.BatchNorm2d) for m in slow.model.modules())
    assert is_fused(load_model("untrained", "cpu", config=tiny_config()).model)
