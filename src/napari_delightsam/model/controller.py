"""Modality controller (paper §III-B, Eq. 1-2): per-modality parameters inside each ViT layer.

Two parts, one set per modality k:

* ``ModalityPromptTokens`` — learnable tokens joined to the keys and values of the windowed
  self-attention, plus a learned logit bias on their column (the authors' code form of
  ``w_bias^k``).
* ``ModalityFFN`` — a parallel FFN ``f(w_up^k · LN(x)) · w_down^k`` added beside the block MLP
  (Eq. 2). ``w_down`` starts at zero so a pretrained backbone is unchanged at initialisation.

Routing takes a ``(B,)`` tensor of modality indices. A batch of one modality uses that
modality's weights directly; a mixed batch gathers per-sample weights and uses batched matmuls
(no Python loop over samples).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def single_modality(modality: torch.Tensor) -> int | None:
    """Return the modality index if every sample uses the same one, else None."""
    if modality.numel() == 0:
        return None
    first = modality[0]
    if bool((modality == first).all()):
        return int(first)
    return None


class ModalityFFN(nn.Module):
    """Per-modality parallel FFN: ``GELU(LN_k(x) W_up^k + b_up^k) W_down^k + b_down^k``.

    x: (B, N, C) -> (B, N, C). ``modality``: (B,) long.
    """

    def __init__(self, num_modalities: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.num_modalities = num_modalities
        self.dim = dim
        self.hidden = hidden
        self.norm_weight = nn.Parameter(torch.ones(num_modalities, dim))
        self.norm_bias = nn.Parameter(torch.zeros(num_modalities, dim))
        self.up_weight = nn.Parameter(torch.empty(num_modalities, dim, hidden))
        self.up_bias = nn.Parameter(torch.zeros(num_modalities, hidden))
        self.down_weight = nn.Parameter(torch.zeros(num_modalities, hidden, dim))
        self.down_bias = nn.Parameter(torch.zeros(num_modalities, dim))
        nn.init.trunc_normal_(self.up_weight, std=0.02)

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        single = single_modality(modality)
        if single is not None:
            k = single
            h = F.layer_norm(x, (self.dim,), self.norm_weight[k], self.norm_bias[k])
            h = F.gelu(torch.addmm(self.up_bias[k], h.reshape(-1, self.dim), self.up_weight[k]))
            out = torch.addmm(self.down_bias[k], h, self.down_weight[k])
            return out.view_as(x)
        # Mixed batch: per-sample weights gathered once, batched matmuls.
        h = F.layer_norm(x, (self.dim,))
        h = h * self.norm_weight[modality][:, None, :] + self.norm_bias[modality][:, None, :]
        h = torch.baddbmm(self.up_bias[modality][:, None, :], h, self.up_weight[modality])
        h = F.gelu(h)
        return torch.baddbmm(self.down_bias[modality][:, None, :], h, self.down_weight[modality])


class ModalityPromptTokens(nn.Module):
    """Per-modality key/value prompt tokens for windowed attention (Eq. 1, authors' K/V form).

    Produces, for attention rows that belong to samples with the given modalities, the extra
    keys/values ``(R, heads, T, head_dim)`` and the logit bias ``(R or 1, heads, 1, T)``.
    """

    def __init__(self, num_modalities: int, num_heads: int, head_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        bound = math.sqrt(6.0 / (num_heads * head_dim + num_heads * head_dim * num_tokens))
        self.key = nn.Parameter(torch.empty(num_modalities, num_heads, num_tokens, head_dim).uniform_(-bound, bound))
        self.value = nn.Parameter(torch.empty(num_modalities, num_heads, num_tokens, head_dim).uniform_(-bound, bound))
        # One learned logit bias per modality and head; 0 = no preference at initialisation.
        self.logit_bias = nn.Parameter(torch.zeros(num_modalities, num_heads))

    def forward(
        self, modality: torch.Tensor, rows_per_sample: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """modality (B,) -> key, value (B*rows, H, T, D) [expanded views] and bias (B*rows|1, H, 1, T)."""
        single = single_modality(modality)
        rows = modality.shape[0] * rows_per_sample
        if single is not None:
            key = self.key[single].unsqueeze(0).expand(rows, -1, -1, -1)
            value = self.value[single].unsqueeze(0).expand(rows, -1, -1, -1)
            bias = self.logit_bias[single].view(1, -1, 1, 1).expand(1, -1, 1, self.num_tokens)
            return key, value, bias
        per_row = modality.repeat_interleave(rows_per_sample)
        key = self.key[per_row]
        value = self.value[per_row]
        bias = self.logit_bias[per_row][:, :, None, None].expand(-1, -1, 1, self.num_tokens)
        return key, value, bias
