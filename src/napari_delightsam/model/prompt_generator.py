"""SP-Generator (paper §III-C, Eq. 3-4): self-patch prompts from the image embedding.

    h (B,256,64,64) -> [2×2 conv s2, LayerNorm2d, GELU] × L2 -> 1×1 conv -> patch logits (B,1,32,32)
    sigmoid -> interpolate to 64×64 -> 1×1 conv 1->256, LayerNorm2d, GELU -> p_dense (B,256,64,64)

One patch-logit cell covers ``patch_size``×``patch_size`` input pixels (32×32 at 1024²); its
target is the max-pooled ground truth. The sigmoid map is the heatmap the plugin shows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from ..config import ModelConfig


class SPGenerator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        units = int(round(math.log2(cfg.patch_size / 16)))
        if 16 * 2**units != cfg.patch_size:
            raise ValueError(f"patch_size must be 16·2^n, got {cfg.patch_size}")
        layers: list[nn.Module] = []
        ch = cfg.embed_dim
        for _ in range(units):
            layers += [nn.Conv2d(ch, cfg.patch_hidden, 2, stride=2), LayerNorm2d(cfg.patch_hidden), nn.GELU()]
            ch = cfg.patch_hidden
        layers.append(nn.Conv2d(ch, 1, 1))
        self.patch_generator = nn.Sequential(*layers)
        self.prompt_encoder = nn.Sequential(nn.Conv2d(1, cfg.embed_dim, 1), LayerNorm2d(cfg.embed_dim), nn.GELU())
        self.detach = cfg.prompt_detach
        self.hard_threshold = cfg.prompt_hard_threshold

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B,C,g,g) -> (patch logits (B,1,g/2^L2,·), dense prompt (B,C,g,g))."""
        logits = self.patch_generator(h)
        prob = torch.sigmoid(logits)
        if self.detach:
            prob = prob.detach()
        if self.hard_threshold:
            prob = (prob > 0.5).to(prob.dtype)
        prob = F.interpolate(prob, size=h.shape[-2:], mode="bilinear", align_corners=False)
        return logits, self.prompt_encoder(prob)
