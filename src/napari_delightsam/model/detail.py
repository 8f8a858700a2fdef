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
"""

from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

__all__ = ["DETAIL_SKIPS", "ImageDetail", "Stage0Detail"]

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
