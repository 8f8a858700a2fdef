"""QM-Decoder (paper §III-D, Eq. 5-7): one learnable query per modality, SAM's two-way transformer.

    queries q^1..q^K (K,256) + (h + p_dense) (B,256,64,64) with random-Fourier PE
      -> TwoWayTransformer (depth 2) -> tokens (B,K,256), h' (B,4096,256)
    h' -> 2×2 transposed conv 256->64, LN2d, GELU, 2×2 transposed conv 64->32, GELU -> (B,32,256,256)
    mask_k = MLP_k(token_k) · upscaled  -> low-res logits (B,1,256,256) for each sample's modality

No IoU token. Hypernetworks are one per modality (paper) or one shared (authors' code).
"""

from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from ..config import ModelConfig
from .controller import single_modality


class QMDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.num_modalities = cfg.num_modalities
        self.queries = nn.Embedding(cfg.num_modalities, dim)
        self.transformer = TwoWayTransformer(
            depth=cfg.decoder_depth, embedding_dim=dim, num_heads=cfg.decoder_heads, mlp_dim=cfg.decoder_mlp_dim
        )
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.upscale = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2),
            nn.GELU(),
        )
        n_hyper = cfg.num_modalities if cfg.per_modality_hypernetworks else 1
        self.hypernetworks = nn.ModuleList([MLP(dim, dim, dim // 8, 3) for _ in range(n_hyper)])

    def forward(self, h: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """h (B,C,g,g) already fused with the dense prompt; modality (B,) -> logits (B,1,4g,4g)."""
        b, c, g, _ = h.shape
        pe = self.pe_layer((g, g)).unsqueeze(0).to(h.dtype)
        tokens = self.queries.weight.unsqueeze(0).expand(b, -1, -1).to(h.dtype)
        hs, src = self.transformer(h, pe, tokens)
        up = self.upscale(src.transpose(1, 2).reshape(b, c, g, g))
        weights = self._hyper_weights(hs, modality)  # (B, c/8)
        return torch.bmm(weights.unsqueeze(1), up.flatten(2)).view(b, 1, up.shape[-2], up.shape[-1])

    def _hyper_weights(self, hs: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        b = hs.shape[0]
        rows = torch.arange(b, device=hs.device)
        if len(self.hypernetworks) == 1:
            return self.hypernetworks[0](hs[rows, modality])
        single = single_modality(modality)
        if single is not None:
            return self.hypernetworks[single](hs[:, single])
        all_k = torch.stack([mlp(hs[:, k]) for k, mlp in enumerate(self.hypernetworks)], dim=1)
        return all_k[rows, modality]
