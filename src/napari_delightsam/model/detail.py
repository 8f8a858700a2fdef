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

A fourth part is per modality (``ModelConfig.refiner_modalities``): the one-layer stride-2 stage
sees ±2 pixels around each output pixel, too little to tell a vessel from the edge of the optic
disc or a haemorrhage. A ``MaskRefiner`` — a small residual U-Net over [an image branch, the
stride-2 features, the logits] at S/2, three levels (S/2, S/4, S/8) — corrects the logits of the
modalities it is built for; the others never run it. Its output conv starts at zero, so a model
given a refiner starts out with the masks it had (``benchmarks/results/v1/vessel-refiner.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

__all__ = ["DETAIL_SKIPS", "FineUpscale", "ImageDetail", "MaskRefiner", "Stage0Detail"]

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


def _conv_gelu(in_chs: int, out_chs: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1), nn.GELU())


class MaskRefiner(nn.Module):
    """(B,3,S,S) normalised image + (B,C,S/2,S/2) stride-2 features + (B,1,S/2,S/2) logits ->
    corrected logits (B,1,S/2,S/2).

    ``h = conv1×1([GELU(conv3×3 s2 (image)), logits, features])`` at width ``w``; encoder level
    ``l`` (0..levels-1) at S/2^(l+1) with width w·2^l (a stride-2 conv then a conv from level 1
    on); decoder: 1×1 lateral to the finer level's width, bilinear ×2, add the skip, conv3×3;
    ``out = logits + conv1×1(h)`` with the 1×1 conv zero-initialised.
    """

    def __init__(self, feat_chs: int, width: int = 16, levels: int = 3, image_hidden: int = 16) -> None:
        super().__init__()
        if levels < 1 or width < 1:
            raise ValueError(f"MaskRefiner needs width >= 1 and levels >= 1, got {width}, {levels}")
        #: the constructor's arguments: ``MaskRefiner(*r.sizes)`` is a fresh refiner of the same shape
        self.sizes = (feat_chs, width, levels, image_hidden)
        widths = [width * 2**level for level in range(levels)]
        self.image = _conv_gelu(3, image_hidden, stride=2)
        self.merge = nn.Conv2d(image_hidden + 1 + feat_chs, width, 1)
        self.down = nn.ModuleList(
            [_conv_gelu(width, width)]
            + [nn.Sequential(_conv_gelu(widths[i - 1], widths[i], 2), _conv_gelu(widths[i], widths[i])) for i in range(1, levels)]
        )
        self.lateral = nn.ModuleList([nn.Conv2d(widths[i], widths[i - 1], 1) for i in range(1, levels)])
        self.up = nn.ModuleList([_conv_gelu(widths[i - 1], widths[i - 1]) for i in range(1, levels)])
        self.out = nn.Conv2d(width, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, image: torch.Tensor, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        img = self.image(image.to(feats.dtype))
        if img.shape[-2:] != feats.shape[-2:] or logits.shape[-2:] != feats.shape[-2:]:
            raise ValueError(
                f"refiner inputs disagree: image branch {tuple(img.shape[-2:])}, features "
                f"{tuple(feats.shape[-2:])}, logits {tuple(logits.shape[-2:])}"
            )
        h = self.merge(torch.cat([img, logits.to(feats.dtype), feats], dim=1))
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
        for i in range(len(self.down) - 1, 0, -1):
            h = self.lateral[i - 1](h)
            h = F.interpolate(h, size=skips[i - 1].shape[-2:], mode="bilinear", align_corners=False)
            h = self.up[i - 1](h + skips[i - 1])
        return logits + self.out(h).to(logits.dtype)
