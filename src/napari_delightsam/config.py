"""Model configuration: one frozen dataclass per variant, stored inside every checkpoint.

A checkpoint file describes the network it holds: ``ModelConfig.to_dict()`` goes into the
safetensors metadata and ``ModelConfig.from_dict`` rebuilds the exact architecture.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

#: The six source modalities of the paper, in the order of the QM-Decoder query tokens.
MODALITIES: tuple[str, ...] = (
    "dermoscopy",
    "xray",
    "fundus",
    "colonoscopy",
    "ultrasound",
    "microscopy",
)

#: Bumped whenever the meaning of a stored config or tensor layout changes.
CHECKPOINT_FORMAT_VERSION = 1

#: SAM's pixel statistics (RGB, 0..255). The authors' public code divides by the mean by
#: mistake; we use the real std.
PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one De-LightSAM variant (defaults: the paper's model at 1024²).

    Encoder numbers follow TinyViT-5M (the MobileSAM / LiteMedSAM layout): a conv stem of
    stride 4, an MBConv stage and three transformer stages; the neck maps to ``embed_dim``.
    """

    variant: str = "delightsam-tinyvit5m"
    img_size: int = 1024
    modalities: tuple[str, ...] = MODALITIES
    # DC-Encoder (TinyViT-5M); the conv stem is 3 -> embed_dims[0] // 2 -> embed_dims[0]
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    embed_dim: int = 256
    # Modality controller (paper Eq. 1-2)
    #: "kv": one learned token per head joined to keys and values, plus a learned logit
    #: bias (the authors' code); "none": no attention prompt.
    controller_attention: str = "kv"
    controller_tokens: int = 1
    #: hidden width of the per-modality parallel FFN as a multiple of the block width
    #: (authors' code: 4.0 = a full second MLP; 0 disables it).
    controller_ffn_ratio: float = 4.0
    # SP-Generator (Eq. 3-4)
    patch_size: int = 32
    patch_hidden: int = 64
    #: the authors' code detaches the patch map and thresholds it at 0.5 before the prompt
    #: encoder; the paper feeds the sigmoid map itself (default).
    prompt_detach: bool = False
    prompt_hard_threshold: bool = False
    # QM-Decoder (Eq. 5-7)
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    #: one hypernetwork MLP per modality (paper) or one shared (authors' code)
    per_modality_hypernetworks: bool = True
    #: detail skips into the decoder's upscaling path (beyond the paper, ``model/detail.py``):
    #: "stage0" (stride-8 encoder features), "image" (a small conv branch on the image)
    decoder_skips: tuple[str, ...] = ()
    #: the QM-Decoder's output stride: 4 (the paper: logits at S/4) or 2 (beyond the paper:
    #: ``model/detail.py``'s ``FineUpscale`` adds a stride-2 stage that reads the image, for
    #: structures a few pixels wide such as retinal vessels)
    mask_stride: int = 4
    #: channels of the stride-2 stage's image branch (``mask_stride`` 2 only)
    fine_hidden: int = 16
    #: modalities whose logits a ``model/detail.py`` ``MaskRefiner`` corrects (beyond the paper;
    #: needs ``mask_stride`` 2): a small U-Net over the image, the stride-2 features and the logits
    #: that only these modalities run (e.g. ("fundus",) for retinal vessels)
    refiner_modalities: tuple[str, ...] = ()
    #: modalities of ``refiner_modalities`` with a second refiner for their dark-field images
    #: (grey with a dark median: fluorescence; ``model/image_rules.py``), named
    #: ``<modality>_darkfield``; their other images keep the first
    darkfield_refiners: tuple[str, ...] = ()
    #: the refiners' width at S/2 and number of levels (S/2, S/4, ...)
    refiner_width: int = 16
    refiner_levels: int = 3
    # Beyond the paper: a modality classifier on pooled image embeddings for "auto".
    modality_head: bool = True
    #: "pooled" (v1: an MLP on the mean and std of the stage-0 features) or "appearance" (v2,
    #: ``model/appearance_head.py``: convolutions over the stage-0 features that also predict the
    #: channel order and hue rotation, which eval mode undoes before segmenting)
    modality_head_kind: str = "pooled"
    format_version: int = CHECKPOINT_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.embed_dims)
        if not (len(self.depths) == len(self.num_heads) == len(self.window_sizes) == n):
            raise ValueError("embed_dims, depths, num_heads and window_sizes must have equal length")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.img_size % 64:
            raise ValueError(f"img_size {self.img_size} must be a multiple of 64")
        if self.modality_head_kind not in ("pooled", "appearance"):
            raise ValueError(f"modality_head_kind must be 'pooled' or 'appearance', got {self.modality_head_kind!r}")
        if self.controller_attention not in ("kv", "none"):
            raise ValueError(f"controller_attention must be 'kv' or 'none', got {self.controller_attention!r}")
        if len(set(self.modalities)) != len(self.modalities) or not self.modalities:
            raise ValueError("modalities must be a non-empty list of unique names")
        bad = [s for s in self.decoder_skips if s not in ("stage0", "image")]
        if bad or len(set(self.decoder_skips)) != len(self.decoder_skips):
            raise ValueError(f"decoder_skips must be distinct names from stage0, image; got {self.decoder_skips!r}")
        if self.mask_stride not in (2, 4):
            raise ValueError(f"mask_stride must be 4 (the paper) or 2, got {self.mask_stride!r}")
        if not (isinstance(self.fine_hidden, int) and self.fine_hidden >= 1):
            raise ValueError(f"fine_hidden must be a positive integer, got {self.fine_hidden!r}")
        unknown = [m for m in self.refiner_modalities if m not in self.modalities]
        if unknown or len(set(self.refiner_modalities)) != len(self.refiner_modalities):
            raise ValueError(
                f"refiner_modalities must be distinct names from {', '.join(self.modalities)}; got {self.refiner_modalities!r}"
            )
        stray = [m for m in self.darkfield_refiners if m not in self.refiner_modalities]
        if stray or len(set(self.darkfield_refiners)) != len(self.darkfield_refiners):
            raise ValueError(
                f"darkfield_refiners must be distinct names from refiner_modalities {list(self.refiner_modalities)}; "
                f"got {self.darkfield_refiners!r}"
            )
        if self.refiner_modalities and self.mask_stride != 2:
            raise ValueError("refiner_modalities need mask_stride 2 (the refiners read the stride-2 stage)")
        for name in ("refiner_width", "refiner_levels"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 at 1024²: stride 16)."""
        return self.img_size // 16

    @property
    def mask_size(self) -> int:
        """Side of the QM-Decoder's logit map (img_size / mask_stride)."""
        return self.img_size // self.mask_stride

    @property
    def patch_grid(self) -> int:
        """Side of the SP-Generator patch map (32 at 1024² with 32-px patches)."""
        return self.img_size // self.patch_size

    def refiner_for(self, modality: str, darkfield: bool) -> str | None:
        """The refiner that corrects an image of ``modality`` (``darkfield``: the image is
        dark-field, ``model/image_rules.py``), by its key; None when the modality has none."""
        if modality not in self.refiner_modalities:
            return None
        return darkfield_refiner_name(modality) if darkfield and modality in self.darkfield_refiners else modality

    def modality_index(self, modality: str | int) -> int:
        if isinstance(modality, (int,)) and not isinstance(modality, bool):
            if not 0 <= modality < self.num_modalities:
                raise ValueError(f"modality index {modality} out of range 0..{self.num_modalities - 1}")
            return int(modality)
        name = str(modality).strip().lower().replace("-", "").replace(" ", "")
        aliases = {"x-ray": "xray", "cxr": "xray", "endoscopy": "colonoscopy", "us": "ultrasound"}
        name = aliases.get(name, name)
        if name not in self.modalities:
            raise ValueError(
                f"unknown modality {modality!r}; choose one of {', '.join(self.modalities)} or 'auto'"
            )
        return self.modalities.index(name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def darkfield_refiner_name(modality: str) -> str:
    """The key of ``modality``'s dark-field refiner (``decoder.refiners.<key>.*``)."""
    return f"{modality}_darkfield"


def tiny_config(**changes: Any) -> ModelConfig:
    """A very small variant for tests and smoke runs (same code paths, ~0.3 M params)."""
    base = ModelConfig(
        variant="delightsam-tiny-test",
        img_size=128,
        embed_dims=(16, 32, 32, 64),
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 2),
        window_sizes=(7, 7, 7, 7),
        embed_dim=32,
        patch_hidden=16,
        decoder_depth=1,
        decoder_heads=2,
        decoder_mlp_dim=64,
    )
    return base.replace(**changes) if changes else base
