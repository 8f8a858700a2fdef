"""De-LightSAM network: shapes through every module, modality routing, controller isolation."""

from __future__ import annotations

import pytest
import torch

from napari_delightsam.config import ModelConfig, tiny_config
from napari_delightsam.model import DeLightSAM
from napari_delightsam.model.controller import ModalityFFN, ModalityPromptTokens


def _images(cfg: ModelConfig, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=g)


def _randomise_controllers(model: DeLightSAM, seed: int = 1) -> None:
    """Controllers start near-neutral (w_down = 0); make every modality's set distinct."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.encoder.controller_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _controller_modules(model: DeLightSAM) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (ModalityFFN, ModalityPromptTokens))]


# -- shapes ---------------------------------------------------------------------------------------


def test_tiny_shapes_through_every_module(tiny_model: DeLightSAM) -> None:
    cfg = tiny_model.config
    enc = tiny_model.encoder
    b, s = 2, cfg.img_size
    x = _images(cfg, b)
    mod = torch.tensor([1, 3])
    d = cfg.embed_dims
    with torch.no_grad():
        stem = enc.stem(x)
        assert stem.shape == (b, d[0], s // 4, s // 4)
        conv = enc.stages[0](stem)
        assert conv.shape == (b, d[1], s // 8, s // 8)
        assert torch.equal(enc.forward_conv(x), conv)
        h1 = enc.stages[1](conv, mod)
        assert h1.shape == (b, d[2], s // 16, s // 16)
        h2 = enc.stages[2](h1, mod)
        assert h2.shape == (b, d[3], s // 16, s // 16)  # stride-1 merge once at stride 16
        h3 = enc.stages[3](h2, mod)
        assert h3.shape == (b, d[3], s // 16, s // 16)
        h = enc.neck(h3)
        assert h.shape == (b, cfg.embed_dim, cfg.embedding_size, cfg.embedding_size)
        assert torch.equal(enc(x, mod), h)
        patch_logits, dense = tiny_model.prompt_generator(h)
        assert patch_logits.shape == (b, 1, cfg.patch_grid, cfg.patch_grid)
        assert dense.shape == h.shape
        masks = tiny_model.decoder(h + dense, mod)
        assert masks.shape == (b, 1, s // 4, s // 4)
        out = tiny_model(x, mod)
    assert out.mask_logits.shape == (b, 1, s // 4, s // 4)
    assert out.patch_logits.shape == (b, 1, cfg.patch_grid, cfg.patch_grid)
    assert out.embedding.shape == (b, cfg.embed_dim, s // 16, s // 16)
    assert out.modality_logits.shape == (b, cfg.num_modalities)
    assert out.modality.tolist() == [1, 3]
    assert torch.equal(out.mask_logits, masks)
    assert torch.isfinite(out.mask_logits).all()


def test_default_widths_at_small_input() -> None:
    """The real TinyViT-5M widths at 256²: the 16² grid needs window padding (7 -> 21, 14 -> 28)."""
    img_size = 256
    torch.manual_seed(0)
    cfg = ModelConfig(img_size=img_size)
    model = DeLightSAM(cfg).eval()
    g = img_size // 16
    x = _images(cfg, 2)
    with torch.no_grad():
        stem = model.encoder.stem(x)
        assert stem.shape == (2, 64, img_size // 4, img_size // 4)
        conv = model.encoder.forward_conv(x)
        assert conv.shape == (2, 128, img_size // 8, img_size // 8)
        vit_shapes = []
        h = conv
        for stage in model.encoder.stages[1:]:
            h = stage(h, torch.tensor([0, 5]))
            vit_shapes.append(tuple(h.shape[1:]))
        assert vit_shapes == [(160, g, g), (320, g, g), (320, g, g)]
        out = model(x, torch.tensor([0, 5]))
    assert out.embedding.shape == (2, 256, g, g)
    assert out.mask_logits.shape == (2, 1, img_size // 4, img_size // 4)
    assert out.patch_logits.shape == (2, 1, img_size // 32, img_size // 32)
    assert torch.isfinite(out.mask_logits).all()


def test_rejects_bad_input(tiny_model: DeLightSAM) -> None:
    cfg = tiny_model.config
    with pytest.raises(ValueError, match=r"\(B,3,S,S\)"):
        tiny_model(torch.zeros(1, 1, cfg.img_size, cfg.img_size), torch.tensor([0]))
    with pytest.raises(ValueError, match="modality must have shape"):
        tiny_model(_images(cfg, 2), torch.tensor([0]))


# -- routing --------------------------------------------------------------------------------------


def test_mixed_batch_equals_per_sample_runs(tiny_model: DeLightSAM) -> None:
    _randomise_controllers(tiny_model)
    cfg = tiny_model.config
    mods = torch.tensor([2, 0, 2, 5, 1, 0, 4, 3])
    x = _images(cfg, len(mods))
    with torch.no_grad():
        batch = tiny_model(x, mods)
        for i, m in enumerate(mods.tolist()):
            single = tiny_model(x[i : i + 1], torch.tensor([m]))
            for name in ("mask_logits", "patch_logits", "embedding"):
                torch.testing.assert_close(
                    getattr(batch, name)[i : i + 1], getattr(single, name), atol=1e-5, rtol=1e-5, msg=name
                )
        # the routing matters: the same image under another modality gives another mask
        other = tiny_model(x[:1], torch.tensor([3]))
    assert (other.mask_logits - batch.mask_logits[:1]).abs().max() > 1e-3
    assert (other.embedding - batch.embedding[:1]).abs().max() > 1e-3


def test_single_modality_batch_matches_mixed_path(tiny_model: DeLightSAM) -> None:
    """A one-modality batch takes the fast path; it must equal the gathered (mixed) path."""
    _randomise_controllers(tiny_model)
    cfg = tiny_model.config
    x = _images(cfg, 3)
    with torch.no_grad():
        same = tiny_model(x, torch.tensor([4, 4, 4]))
        mixed = tiny_model(torch.cat([x, x[:1]]), torch.tensor([4, 4, 4, 0]))
    torch.testing.assert_close(same.mask_logits, mixed.mask_logits[:3], atol=1e-5, rtol=1e-5)


def test_controller_k_affects_only_samples_routed_to_k(tiny_model: DeLightSAM) -> None:
    _randomise_controllers(tiny_model)
    cfg = tiny_model.config
    mods = torch.tensor([0, 2, 0, 2])
    x = _images(cfg, 4)
    with torch.no_grad():
        before = tiny_model(x, mods)
        g = torch.Generator().manual_seed(5)
        for module in _controller_modules(tiny_model):
            for p in module.parameters():
                p[2] += torch.randn(p[2].shape, generator=g) * 0.5
        after = tiny_model(x, mods)
    zero, two = mods == 0, mods == 2
    assert torch.equal(before.embedding[zero], after.embedding[zero])
    assert torch.equal(before.mask_logits[zero], after.mask_logits[zero])
    assert (before.embedding[two] - after.embedding[two]).abs().max() > 1e-3
    assert (before.mask_logits[two] - after.mask_logits[two]).abs().max() > 1e-4


def test_use_controller_false_ignores_controllers(tiny_model: DeLightSAM) -> None:
    cfg = tiny_model.config
    x = _images(cfg, 2)
    mods = torch.tensor([1, 4])
    with torch.no_grad():
        off = tiny_model(x, mods, use_controller=False)
        _randomise_controllers(tiny_model, seed=7)
        off_again = tiny_model(x, mods, use_controller=False)
        on = tiny_model(x, mods)
        plain = tiny_model.encoder(x, None)
    assert torch.equal(off.embedding, off_again.embedding)
    assert torch.equal(off.mask_logits, off_again.mask_logits)
    assert torch.equal(off.embedding, plain)
    assert (on.embedding - off.embedding).abs().max() > 1e-3
    assert off.modality.tolist() == [1, 4]  # the decoder still uses each sample's query


def test_neutralised_controllers_leave_the_backbone_features(tiny_model: DeLightSAM) -> None:
    """After ``neutralise_controllers`` every controller adds nothing (FFN and prompt values zero):
    the embedding with a modality's controller on is the controller-off embedding, up to the
    prompt tokens' small share of each attention softmax."""
    _randomise_controllers(tiny_model, seed=3)
    cfg = tiny_model.config
    x = _images(cfg, 4)
    mods = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        off = tiny_model.encoder(x, None)
        assert (tiny_model.encoder(x, mods) - off).abs().max() > 1e-2  # randomised: they act
        tiny_model.encoder.neutralise_controllers()
        on = tiny_model.encoder(x, mods)
    for module in _controller_modules(tiny_model):
        for name, p in module.named_parameters():
            if name.startswith(("down_", "value", "logit_bias")):
                assert not p.any(), name
    cos = torch.nn.functional.cosine_similarity(on.flatten(1), off.flatten(1))
    assert cos.min() > 0.999


def test_auto_modality_uses_argmax_of_head(tiny_model: DeLightSAM) -> None:
    _randomise_controllers(tiny_model)
    cfg = tiny_model.config
    x = _images(cfg, 4)
    with torch.no_grad():
        auto = tiny_model(x, None)
        assert torch.equal(auto.modality, auto.modality_logits.argmax(dim=1))
        explicit = tiny_model(x, auto.modality)
        torch.testing.assert_close(auto.mask_logits, explicit.mask_logits)
        # force the head's decision: a large bias on class 4
        last = tiny_model.modality_head.mlp[-1]
        last.bias.zero_()
        last.bias[4] = 1e4
        forced = tiny_model(x, None)
    assert forced.modality.tolist() == [4, 4, 4, 4]
    torch.testing.assert_close(forced.mask_logits, tiny_model(x, torch.full((4,), 4)).mask_logits)


def test_auto_without_head_is_an_error() -> None:
    model = DeLightSAM(tiny_config(modality_head=False)).eval()
    cfg = model.config
    with pytest.raises(ValueError, match="no modality head"):
        model(_images(cfg, 1), None)
    out = model(_images(cfg, 1), torch.tensor([2]))
    assert out.modality_logits is None


def test_shared_hypernetwork_variant_routes_too() -> None:
    torch.manual_seed(0)
    model = DeLightSAM(tiny_config(per_modality_hypernetworks=False, controller_attention="none")).eval()
    _randomise_controllers(model)
    cfg = model.config
    mods = torch.tensor([3, 1])
    x = _images(cfg, 2)
    with torch.no_grad():
        batch = model(x, mods)
        for i in range(2):
            torch.testing.assert_close(
                batch.mask_logits[i : i + 1],
                model(x[i : i + 1], mods[i : i + 1]).mask_logits,
                atol=1e-5,
                rtol=1e-5,
            )


# -- parameter groups -----------------------------------------------------------------------------


def test_parameter_counts_are_consistent(tiny_model: DeLightSAM) -> None:
    cfg = tiny_model.config
    k = cfg.num_modalities
    counts = tiny_model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in tiny_model.parameters())
    controller = sum(p.numel() for p in tiny_model.encoder.controller_parameters())
    per = (
        controller // k
        + cfg.embed_dim
        + sum(p.numel() for p in tiny_model.decoder.hypernetworks[0].parameters())
    )
    assert counts["per_modality"] == per
    assert counts["total"] == counts["shared"] + k * counts["per_modality"]
    assert counts["active"] == counts["shared"] + counts["per_modality"]
    # every controller tensor holds one slice per modality
    for p in tiny_model.encoder.controller_parameters():
        assert p.shape[0] == k


def test_default_parameter_counts() -> None:
    """Default variant: active params near the paper's 12.74 M (see `delightsam info`)."""
    model = DeLightSAM(ModelConfig())
    counts = model.parameter_counts()
    assert abs(counts["active"] - 12.74e6) / 12.74e6 < 0.15
    assert counts["total"] > counts["active"] > counts["shared"]
