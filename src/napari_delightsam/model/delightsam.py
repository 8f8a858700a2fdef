"""De-LightSAM assembly (paper Fig. 2): DC-Encoder -> SP-Generator -> QM-Decoder.

Input is a normalised batch (B,3,S,S) at ``cfg.img_size``; see ``preprocess.py`` for turning
any image into it and the low-resolution outputs back into the image's own size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import PIXEL_MEAN, PIXEL_STD, ModelConfig
from .appearance_head import AppearanceHead
from .decoder import QMDecoder
from .encoder import DCEncoder
from .image_rules import GREY_SPREAD, channel_spread, to_pixels
from .prompt_generator import SPGenerator


@dataclass
class DeLightSAMOutput:
    #: (B,1,S/4,S/4) mask logits of each sample's modality (256² at 1024²); (B,1,S/2,S/2) with
    #: ``mask_stride = 2``
    mask_logits: torch.Tensor
    #: (B,1,S/patch,S/patch) SP-Generator patch logits (32² at 1024²)
    patch_logits: torch.Tensor
    #: (B,) modality index used for each sample
    modality: torch.Tensor
    #: (B,K) modality classifier logits, or None without a modality head
    modality_logits: torch.Tensor | None
    #: (B,C,S/16,S/16) image embedding h (before the dense prompt)
    embedding: torch.Tensor
    #: (B,3,3) RGB matrices applied to the images before segmenting (the appearance head's
    #: colour correction; identity where nothing changed), or None without one
    colour_matrix: torch.Tensor | None = None


class ModalityHead(nn.Module):
    """Predicts the modality from pooled stage-0 features (mean and std over space).

    It sits before the first modality controller, so "auto" costs no second encoder pass.
    (B,C,H,W) -> (B,K) logits.
    """

    def __init__(self, in_chs: int, num_modalities: int, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * in_chs, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, num_modalities)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().flatten(2)
        pooled = torch.cat([x.mean(-1), x.std(-1)], dim=1)
        return self.mlp(pooled)


class DeLightSAM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = DCEncoder(cfg)
        self.modality_head: ModalityHead | AppearanceHead | None = None
        if cfg.modality_head:
            head_cls = AppearanceHead if cfg.modality_head_kind == "appearance" else ModalityHead
            self.modality_head = head_cls(self.encoder.conv_out_channels, cfg.num_modalities)
        self.prompt_generator = SPGenerator(cfg)
        self.decoder = QMDecoder(cfg)

    def forward(
        self,
        images: torch.Tensor,
        modality: torch.Tensor | None = None,
        use_controller: bool = True,
        correct_colour: bool | None = None,
        run_head: bool = True,
        darkfield: torch.Tensor | None = None,
    ) -> DeLightSAMOutput:
        """images (B,3,S,S) normalised; modality (B,) long, or None to use the modality head.

        ``correct_colour`` (None: in eval mode only): with an appearance head, colour images whose
        channel order or hue the head finds shifted are put back before the encoder's ViT stages,
        the decoder and the modality decision see them (``DeLightSAMOutput.colour_matrix``).

        ``run_head=False`` (a given ``modality`` only) skips the modality/appearance head: no
        modality logits, no colour correction (tiled inference decides both once for the whole
        image and runs its tiles this way).

        ``darkfield`` (B,) bool: which images a modality with a dark-field refiner
        (``ModelConfig.darkfield_refiners``) sends through it; None: each image's own pixels
        decide (``image_rules.darkfield_rows``; tiled inference decides once for the whole image)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B,3,S,S), got {tuple(images.shape)}")
        if run_head:
            images, feats, modality_logits, colour_matrix = self.stage0(images, correct_colour)
        elif modality is None:
            raise ValueError("run_head=False needs the modality")
        else:
            feats, modality_logits, colour_matrix = self.encoder.forward_conv(images), None, None
        if modality is None:
            if modality_logits is None:
                raise ValueError("this model has no modality head: pass the modality explicitly")
            modality = modality_logits.argmax(dim=1)
        modality = modality.to(device=images.device, dtype=torch.long)
        if modality.shape != (images.shape[0],):
            raise ValueError(f"modality must have shape ({images.shape[0]},), got {tuple(modality.shape)}")
        h = self.encoder.forward_vit(feats, modality if use_controller else None)
        patch_logits, dense = self.prompt_generator(h)
        mask_logits = self.decoder(h + dense, modality, stage0=feats, image=images, darkfield=darkfield)
        return DeLightSAMOutput(mask_logits, patch_logits, modality, modality_logits, h, colour_matrix)

    def stage0(
        self, images: torch.Tensor, correct_colour: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The modality-independent part: stage-0 features, modality logits and (appearance head,
        eval mode or ``correct_colour``) the colour correction. Returns (images as corrected,
        features, modality logits or None, (B,3,3) colour matrices or None). ``auto`` for a whole
        stack reads this alone, without the ViT stages."""
        feats = self.encoder.forward_conv(images)
        if isinstance(self.modality_head, AppearanceHead):
            app = self.modality_head(feats)
            if correct_colour if correct_colour is not None else not self.training:
                return self._correct_colour(images, feats, app)
            return images, feats, app.modality_logits, None
        logits = self.modality_head(feats) if self.modality_head is not None else None
        return images, feats, logits, None

    def _correct_colour(
        self, images: torch.Tensor, feats: torch.Tensor, app
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply the appearance head's correction to the images it finds shifted; recompute their
        stage-0 features and modality logits. Returns (images, feats, modality_logits, (B,3,3))."""
        head = self.modality_head
        assert isinstance(head, AppearanceHead)
        mean = torch.tensor(PIXEL_MEAN, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(PIXEL_STD, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
        raw = to_pixels(images)
        colour = channel_spread(raw) > GREY_SPREAD  # grey images (equal channels) are never changed
        mats, changed = head.correction(app, colour)
        logits = app.modality_logits
        if bool(changed.any()):
            idx = torch.nonzero(changed).flatten()
            fixed = torch.einsum("bij,bjhw->bihw", mats[idx], raw[idx]).clamp(0, 255)
            fixed = ((fixed - mean) / std).to(images.dtype)
            images = images.clone()
            images[idx] = fixed
            feats = feats.clone()
            feats[idx] = self.encoder.forward_conv(fixed)
            logits = logits.clone()
            logits[idx] = head(feats[idx]).modality_logits.to(logits.dtype)
        return images, feats, logits, mats

    # -- parameter groups, used by `info`, distillation and fine-tuning ---------------------

    def modality_specific_parameters(self) -> dict[str, int]:
        """Number of parameters that every modality has of its own (controller + query + hypernet);
        refiners, which only some modalities have, are counted by ``parameter_counts``."""
        cfg = self.config
        k = cfg.num_modalities
        per = sum(p.numel() for p in self.encoder.controller_parameters()) // k
        per += self.decoder.queries.weight.numel() // k
        if cfg.per_modality_hypernetworks:
            per += sum(p.numel() for p in self.decoder.hypernetworks[0].parameters())
        return {"per_modality": per}

    def parameter_counts(self) -> dict[str, int]:
        """total = shared + K·per_modality + refiners; active = what one image runs through (its
        modality's own parameters, and the largest refiner where a modality has one)."""
        total = sum(p.numel() for p in self.parameters())
        per = self.modality_specific_parameters()["per_modality"]
        k = self.config.num_modalities
        refiner_sizes = [sum(p.numel() for p in r.parameters()) for r in self.decoder.refiners.values()]
        refiners = sum(refiner_sizes)
        shared = total - k * per - refiners
        counts = {"total": total, "shared": shared, "per_modality": per, "active": shared + per + max(refiner_sizes, default=0)}
        if refiners:
            counts["refiners"] = refiners
        return counts
