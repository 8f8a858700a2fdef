"""Detail skips for the QM-Decoder's upscaling path (beyond the paper; cf. HQ-SAM's early-layer
fusion and U-Net skips).

The QM-Decoder upsamples the stride-16 embedding ×4 with two transposed convolutions. Thin
vessels and small nuclei are a few pixels wide, finer than a stride-16 token, and a frozen
backbone cannot learn to keep them in its last stage. Two optional inputs bring detail back
where the decoder's resolution matches:

* ``stage0``: the DC-Encoder's stage-0 features (stride 8, before the first modality
  controller), 1×1 conv + LayerNorm2d, added after the first transposed conv (B, C/4, 2g, 2g);
* ``image``: a two-layer conv branch on the normalised image (stride 4), added after the second
  transposed conv (B, C/8, 4g, 4g).

Both cost little (≈0.1 GMAC at 512²) and are trained with the decoder.

A third part raises the decoder's output resolution (``ModelConfig.mask_stride = 2``): at
stride 4 a 512² input gives a 128² logit map, and a vessel one or two pixels wide cannot be
drawn on it — even the ground truth, area-resized to 128² and bilinearly brought back, keeps
only 70 % Dice on DRIVE (56 % on STARE, 74 % on IDRiD); at 256² it keeps 86–94 %
(``benchmarks/logit_resolution_bound.py``).

* ``FineUpscale``: the stride-4 features are bilinearly doubled and a residual conv block reads
  them together with a stride-2 conv branch of the image. Its last conv starts at zero, so a
  model given this stage starts out with the masks it had (its logits bilinearly doubled) and
  the stage learns only the detail (≈1.1 GMAC at 512²).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

__all__ = ["DETAIL_SKIPS", "FineUpscale", "ImageDetail", "Stage0Detail"]

#: names ``ModelConfig.decoder_skips`` may hold
DETAIL_SKIPS = ("stage0", "image")


class Stage0Detail(nn.Module):
    """(B, C0, 2g, 2g) stage-0 features -> (B, out, 2g, 2g)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, 1)
        self.norm = LayerNorm2d(out_chs)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(feats))


class ImageDetail(nn.Module):
    """(B, 3, S, S) normalised image -> (B, out, S/4, S/4): two 3×3 stride-2 convs."""

    def __init__(self, out_chs: int, hidden: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, hidden, 3, stride=2, padding=1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(hidden, out_chs, 3, stride=2, padding=1)
        self.norm = LayerNorm2d(out_chs)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.act(self.conv1(image))))


class FineUpscale(nn.Module):
    """(B, C, S/4, S/4) decoder features + (B, 3, S, S) normalised image -> (B, C, S/2, S/2).

    ``up = bilinear ×2 (features)``; ``out = up + conv1×1(GELU(conv3×3([up, image branch])))``
    with the image branch two 3×3 convs (the first of stride 2); the 1×1 conv is zero-initialised
    (``out = up`` at the start).
    """

    def __init__(self, chs: int, hidden: int = 16) -> None:
        super().__init__()
        self.image_conv = nn.Conv2d(3, hidden, 3, stride=2, padding=1)
        self.image_conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.mix = nn.Conv2d(chs + hidden, chs, 3, padding=1)
        self.act = nn.GELU()
        self.out = nn.Conv2d(chs, chs, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feats: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(feats, scale_factor=2.0, mode="bilinear", align_corners=False)
        img = self.act(self.image_conv2(self.act(self.image_conv(image.to(feats.dtype)))))
        if img.shape[-2:] != up.shape[-2:]:
            raise ValueError(f"image of {tuple(image.shape[-2:])} does not match features of {tuple(feats.shape[-2:])}")
        return up + self.out(self.act(self.mix(torch.cat([up, img], dim=1))))
