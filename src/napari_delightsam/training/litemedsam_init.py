"""Our DC-Encoder from LiteMedSAM's TinyViT (initialisation) and LiteMedSAM as a frozen teacher.

Key mapping (LiteMedSAM ``image_encoder.*`` -> our ``encoder.*``):

=========================================  =========================================
LiteMedSAM (``_vendor/tiny_vit_sam.py``)    De-LightSAM (``model/encoder.py``, timm)
=========================================  =========================================
``patch_embed.seq.0`` / ``.seq.2``          ``stem.conv1`` / ``stem.conv2``
``layers.N.blocks.M...``                    ``stages.N.blocks.M...``
``layers.N.downsample...``                  ``stages.N.downsample...``
``<Conv2d_BN>.c.weight``                    ``<ConvNorm>.conv.weight`` (``.bn.*`` unchanged)
``neck.0..3``                               ``neck.0..3``
=========================================  =========================================

Attention (``attn.norm/qkv/proj/attention_biases``) and MLP (``mlp.norm/fc1/fc2``) names are
the same. The modality controllers (``.attn.prompt.*``, ``.controller_ffn.*``) are ours and stay
at their initialisation.

Two deliberate conversions:

* **Stem.** LiteMedSAM feeds a 256² image to two 1×1 stride-1 convs; our stem (TinyViT /
  MobileSAM) takes 1024² through two 3×3 stride-2 convs. Each 1×1 kernel ``w`` becomes a 3×3
  box-filter kernel, i.e. the 1×1 conv applied after a local average, so that two stride-2
  convs see the 1024² image through box averages: the stem's output approximates LiteMedSAM's
  stem on the 4×-area-downsampled 256² image — the grid LiteMedSAM was trained on — and every
  later layer sees the feature statistics it was trained with. Two box layouts (``stem=``):
  ``"box2"`` (default) puts ``w/4`` on the four taps that cover exactly the non-overlapping 2×2
  block under a stride-2/padding-1 window, so the two convs together average exact 4×4 blocks
  (= area downsampling, apart from the GELU between them); ``"box3"`` spreads ``w/9`` over all
  nine taps (overlapping windows, a blurrier 7×7 footprint). Measured on 12 real images
  (2 per modality; our encoder at 1024², controllers off, vs LiteMedSAM at 256²), the cosine
  similarity of the 256×64×64 embeddings is mean 0.981 (min 0.845) with ``box2`` and mean 0.937
  (min 0.824) with ``box3`` (``tests/test_litemedsam.py`` checks one image).
* **Input normalisation.** LiteMedSAM was trained on images min-max scaled to [0, 1]; our model
  takes SAM-normalised input ``x = (img - mean) / std`` with ``img`` in [0, 255]. With
  ``fold_normalisation=True`` (default) the affine change ``img / 255 = (x·std + mean) / 255`` is
  folded into the first conv (weights × std/255 per input channel) and its BatchNorm running mean
  (minus ``W · mean/255``), so the initialised encoder sees the same thing as LiteMedSAM for an
  8-bit image spanning 0..255 (zero padding at the image border differs slightly).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import PIXEL_MEAN, PIXEL_STD
from ..model.litemedsam import (
    LITEMEDSAM_IMAGE_SIZE,
    build_litemedsam,
    litemedsam_checkpoint_path,
    litemedsam_state_dict,
    minmax_scale,
    resize_area,
)

__all__ = ["STEM_MODES", "LiteMedSAMTeacher", "init_encoder_from_litemedsam", "map_litemedsam_encoder"]

_PREFIX = "image_encoder."

# -- key mapping ----------------------------------------------------------------------------------


def _map_key(key: str) -> str | None:
    """LiteMedSAM encoder key (without ``image_encoder.``) -> our encoder key (without ``encoder.``)."""
    parts = key.split(".")
    if parts[0] == "patch_embed":
        if len(parts) < 4 or parts[1] != "seq" or parts[2] not in ("0", "2"):
            return None
        parts = ["stem", "conv1" if parts[2] == "0" else "conv2", *parts[3:]]
    elif parts[0] == "layers":
        parts = ["stages", *parts[1:]]
    elif parts[0] != "neck":
        return None
    return ".".join("conv" if p == "c" else p for p in parts)


#: how a 1×1 LiteMedSAM stem kernel becomes one of our 3×3 stride-2 (padding 1) kernels
STEM_MODES = ("box3", "box2")


def _stem_kernel(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """(O,I,1,1) kernel -> (O,I,3,3).

    ``box3``: w/9 in every tap (a 3×3 box filter, overlapping windows at stride 2).
    ``box2``: w/4 in the four taps centre, right, below, below-right: at stride 2 with padding 1
    these are exactly the non-overlapping 2×2 blocks, so two such convs average 4×4 blocks —
    LiteMedSAM's 256² grid from a 1024² image — up to the GELU between them.
    """
    o, i = weight.shape[:2]
    if mode == "box3":
        return (weight.expand(-1, -1, 3, 3) / 9.0).contiguous()
    if mode == "box2":
        out = weight.new_zeros(o, i, 3, 3)
        out[:, :, 1:, 1:] = weight / 4.0
        return out
    raise ValueError(f"stem mode must be one of {STEM_MODES}, got {mode!r}")


def map_litemedsam_encoder(
    state: dict[str, torch.Tensor], fold_normalisation: bool = True, stem: str = "box2"
) -> dict[str, torch.Tensor]:
    """Map LiteMedSAM image-encoder tensors to our ``encoder.*`` keys.

    ``state`` may be the full LiteMedSAM state dict (only ``image_encoder.*`` is used) or the
    encoder's own state dict. Keys that have no counterpart are left out (see
    ``init_encoder_from_litemedsam`` for a report). See the module docstring for the stem and
    normalisation conversions.
    """
    has_prefix = any(k.startswith(_PREFIX) for k in state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if has_prefix:
            if not key.startswith(_PREFIX):
                continue
            key = key[len(_PREFIX) :]
        ours = _map_key(key)
        if ours is None:
            continue
        value = value.detach().clone()
        if ours in ("stem.conv1.conv.weight", "stem.conv2.conv.weight") and value.shape[-2:] == (1, 1):
            value = _stem_kernel(value, stem)
        out[f"encoder.{ours}"] = value
    if fold_normalisation:
        _fold_input_normalisation(out)
    return out


def _fold_input_normalisation(mapped: dict[str, torch.Tensor]) -> None:
    """Make the stem accept SAM-normalised input instead of [0, 1] images (in place).

    conv(img/255) = conv(x·std/255 + mean/255) = conv'(x) + c, with conv' = conv scaled by
    std/255 per input channel and c = Σ W · mean/255 (per output channel), absorbed by the
    BatchNorm running mean (the conv has no bias).
    """
    w_key, rm_key = "encoder.stem.conv1.conv.weight", "encoder.stem.conv1.bn.running_mean"
    if w_key not in mapped or rm_key not in mapped or mapped[w_key].shape[1] != 3:
        return
    w = mapped[w_key].double()
    std = torch.tensor(PIXEL_STD, dtype=torch.float64) / 255.0
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float64) / 255.0
    c = (w.sum(dim=(2, 3)) * mean).sum(dim=1)  # (O,)
    mapped[w_key] = (w * std.view(1, 3, 1, 1)).to(mapped[w_key].dtype)
    mapped[rm_key] = (mapped[rm_key].double() - c).to(mapped[rm_key].dtype)


def _is_controller_key(key: str) -> bool:
    return ".attn.prompt." in key or ".controller_ffn." in key


def init_encoder_from_litemedsam(
    model: nn.Module,
    state: dict[str, torch.Tensor] | None = None,
    *,
    strict: bool = True,
    fold_normalisation: bool = True,
    stem: str = "box2",
) -> dict[str, Any]:
    """Load LiteMedSAM's TinyViT weights into ``model.encoder`` (a ``DeLightSAM``).

    Returns a report: ``loaded`` (tensor count), ``loaded_parameters`` (elements),
    ``skipped`` (LiteMedSAM encoder keys not used, with the reason), ``not_initialised`` (our
    encoder keys left as they were: the modality controllers, which are new). With
    ``strict=True`` a config whose backbone differs from TinyViT-5M raises ``ValueError``
    listing the mismatches instead of loading a partial backbone.
    """
    if state is None:
        state = litemedsam_state_dict()
    source_keys = [k for k in state if k.startswith(_PREFIX)] or list(state)
    mapped = map_litemedsam_encoder(state, fold_normalisation=fold_normalisation, stem=stem)
    target = model.state_dict()
    loadable: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    inverse = {}
    for src in source_keys:
        bare = src[len(_PREFIX) :] if src.startswith(_PREFIX) else src
        ours = _map_key(bare)
        if ours is None:
            skipped.append(f"{src}: no counterpart")
            continue
        inverse[f"encoder.{ours}"] = src
    for key, value in mapped.items():
        if key not in target:
            skipped.append(f"{inverse.get(key, key)}: {key} not in this model")
        elif tuple(target[key].shape) != tuple(value.shape):
            skipped.append(
                f"{inverse.get(key, key)}: shape {tuple(value.shape)} vs {key} {tuple(target[key].shape)}"
            )
        else:
            loadable[key] = value.to(target[key].dtype)
    encoder_keys = [k for k in target if k.startswith("encoder.")]
    not_loaded = [k for k in encoder_keys if k not in loadable]
    backbone_missing = [k for k in not_loaded if not _is_controller_key(k)]
    if strict and (skipped or backbone_missing):
        detail = "; ".join((skipped + [f"{k}: not in LiteMedSAM" for k in backbone_missing])[:5])
        raise ValueError(
            f"LiteMedSAM's TinyViT-5M weights do not fit this encoder ({len(skipped)} LiteMedSAM tensors unused, "
            f"{len(backbone_missing)} backbone tensors not covered): {detail}"
        )
    missing, unexpected = model.load_state_dict(loadable, strict=False)
    assert not unexpected, unexpected
    return {
        "source": str(litemedsam_checkpoint_path() or "<given state dict>"),
        "loaded": len(loadable),
        "loaded_parameters": int(sum(v.numel() for v in loadable.values())),
        "skipped": skipped,
        "not_initialised": not_loaded,
        "stem": stem,
        "normalisation_folded": bool(fold_normalisation),
    }


# -- LiteMedSAM as a distillation teacher -------------------------------------------------------------


class LiteMedSAMTeacher(nn.Module):
    """Frozen LiteMedSAM image encoder as a distillation teacher.

    Input: our normalised batch (B,3,S,S) (SAM mean/std). It is mapped back to pixel values,
    resized to 256² (area average) and min-max scaled to [0, 1] per image as LiteMedSAM expects,
    then encoded -> (B,256,64,64), the same grid as our embedding at any S.
    """

    def __init__(self, state: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        net = build_litemedsam(state)
        self.encoder = net.image_encoder
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LiteMedSAMTeacher:  # noqa: ARG002 - always frozen
        return super().train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B,3,S,S) normalised images, got {tuple(x.shape)}")
        pixels = x.float() * self.pixel_std + self.pixel_mean
        small = resize_area(pixels, (LITEMEDSAM_IMAGE_SIZE, LITEMEDSAM_IMAGE_SIZE))
        return minmax_scale(small)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.preprocess(x))
