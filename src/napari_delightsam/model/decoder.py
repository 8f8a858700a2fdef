"""QM-Decoder (paper §III-D, Eq. 5-7): one learnable query per modality, SAM's two-way transformer.

    queries q^1..q^K (K,256) + (h + p_dense) (B,256,64,64) with random-Fourier PE
      -> TwoWayTransformer (depth 2) -> tokens (B,K,256), h' (B,4096,256)
    h' -> 2×2 transposed conv 256->64, LN2d, GELU, 2×2 transposed conv 64->32, GELU -> (B,32,256,256)
    mask_k = MLP_k(token_k) · upscaled  -> low-res logits (B,1,256,256) for each sample's modality

No IoU token. Hypernetworks are one per modality (paper) or one shared (authors' code).
With ``cfg.decoder_skips`` (beyond the paper, ``detail.py``) the upscaling path also adds the
stage-0 features after the first transposed conv and an image detail branch after the second;
with ``cfg.mask_stride = 2`` a ``FineUpscale`` stage doubles the upscaled features once more
(logits at S/2 instead of S/4); with ``cfg.refiner_modalities`` a ``MaskRefiner`` per listed modality
corrects that modality's logits from the image, the stride-2 features and the logits themselves.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from ..config import ModelConfig, darkfield_refiner_name
from .controller import single_modality
from .detail import FineUpscale, ImageDetail, MaskRefiner, Stage0Detail
from .image_rules import darkfield_rows


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
        skips = set(cfg.decoder_skips)
        self.stage0_detail = Stage0Detail(cfg.embed_dims[1], dim // 4) if "stage0" in skips else None
        self.image_detail = ImageDetail(dim // 8) if "image" in skips else None
        self.fine = FineUpscale(dim // 8, cfg.fine_hidden) if cfg.mask_stride == 2 else None
        n_hyper = cfg.num_modalities if cfg.per_modality_hypernetworks else 1
        self.hypernetworks = nn.ModuleList([MLP(dim, dim, dim // 8, 3) for _ in range(n_hyper)])
        #: one refiner per listed modality, keyed by its name (``decoder.refiners.<modality>.*``),
        #: and a second one for the dark-field images of a modality in ``cfg.darkfield_refiners``
        #: (``decoder.refiners.<modality>_darkfield.*``, ``image_rules.darkfield_rows``)
        names = [*cfg.refiner_modalities, *(darkfield_refiner_name(m) for m in cfg.darkfield_refiners)]
        self.refiners = nn.ModuleDict({n: MaskRefiner(dim // 8, cfg.refiner_width, cfg.refiner_levels) for n in names})
        self._refiner_index = {cfg.modalities.index(m): m for m in cfg.refiner_modalities}
        self._darkfield_index = {cfg.modalities.index(m): darkfield_refiner_name(m) for m in cfg.darkfield_refiners}

    def forward(
        self,
        h: torch.Tensor,
        modality: torch.Tensor,
        stage0: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        darkfield: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h (B,C,g,g) already fused with the dense prompt; modality (B,) -> logits (B,1,4g,4g),
        or (B,1,8g,8g) with ``mask_stride = 2``.

        ``stage0`` (B,C0,2g,2g) and ``image`` (B,3,16g,16g, normalised) feed the detail skips
        and the fine stage of a decoder built with them (and are ignored otherwise); ``darkfield``
        (B,) bool picks the dark-field refiner where the modality has one (None: ``image`` decides).
        """
        b, c, g, _ = h.shape
        pe = self.pe_layer((g, g)).unsqueeze(0).to(h.dtype)
        tokens = self.queries.weight.unsqueeze(0).expand(b, -1, -1).to(h.dtype)
        hs, src = self.transformer(h, pe, tokens)
        up = self._upscale(src.transpose(1, 2).reshape(b, c, g, g), stage0, image)
        if self.fine is not None:
            if image is None:
                raise ValueError("this decoder has a stride-2 stage: pass the normalised image")
            up = self.fine(up, image)
        weights = self._hyper_weights(hs, modality)  # (B, c/8)
        logits = torch.bmm(weights.unsqueeze(1), up.flatten(2)).view(b, 1, up.shape[-2], up.shape[-1])
        if self.refiners:
            logits = self._refine(logits, up, image, modality, darkfield)
        return logits

    def _refine(
        self,
        logits: torch.Tensor,
        up: torch.Tensor,
        image: torch.Tensor | None,
        modality: torch.Tensor,
        darkfield: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The rows of each refined modality through its refiner (a dark-field row of a modality
        with a dark-field refiner through that one); the other rows unchanged."""
        assert image is not None  # a refiner needs the stride-2 stage, which already required it
        single = single_modality(modality)
        if single is not None and single not in self._darkfield_index:
            name = self._refiner_index.get(single)
            return logits if name is None else self.refiners[name](image, up, logits)
        for k, name in self._refiner_index.items():
            rows = torch.nonzero(modality == k).flatten()
            if not rows.numel():
                continue
            groups = [(rows, name)]
            if k in self._darkfield_index:
                dark = darkfield_rows(image[rows]) if darkfield is None else darkfield.to(rows.device)[rows].bool()
                groups = [(rows[~dark], name), (rows[dark], self._darkfield_index[k])]
            for part, refiner in groups:
                if part.numel() == logits.shape[0]:  # the whole batch: no gather / scatter
                    return self.refiners[refiner](image, up, logits)
                if part.numel():
                    refined = self.refiners[refiner](image[part], up[part], logits[part])
                    logits = logits.index_copy(0, part, refined.to(logits.dtype))
        return logits

    def _upscale(
        self, x: torch.Tensor, stage0: torch.Tensor | None, image: torch.Tensor | None
    ) -> torch.Tensor:
        """(B,C,g,g) -> (B,C/8,4g,4g), with the detail skips this decoder was built with."""
        if self.stage0_detail is None and self.image_detail is None:
            return self.upscale(x)
        conv1, norm1, act1, conv2, act2 = self.upscale
        x = norm1(conv1(x))
        if self.stage0_detail is not None:
            if stage0 is None:
                raise ValueError("this decoder has a stage-0 skip: pass the stage-0 features")
            x = x + self.stage0_detail(stage0.to(x.dtype))
        x = conv2(act1(x))
        if self.image_detail is not None:
            if image is None:
                raise ValueError("this decoder has an image detail branch: pass the normalised image")
            x = x + self.image_detail(image.to(x.dtype))
        return act2(x)

    @property
    def needs_image(self) -> bool:
        """Whether ``forward`` reads the normalised image (image detail branch or fine stage)."""
        return self.image_detail is not None or self.fine is not None

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
