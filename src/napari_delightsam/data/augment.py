"""Augmentations applied to image and mask together (torch, CPU, seeded per sample).

Geometry (flips, 90° rotations, random scale + crop/pad) is applied to ONE tensor that stacks
the image's 3 channels and the mask as a 4th channel, so the two can never drift apart — the
authors' public code flipped the mask but fed the unflipped image. Intensity changes
(brightness, contrast, gamma, colour jitter) touch the image channels only.

Per-modality policy (``POLICIES``): dermoscopy, fundus, colonoscopy and microscopy have no
canonical orientation and get all 8 flips/rotations and colour jitter; chest X-ray and
ultrasound keep their orientation (left-right flip only: probe on top, lungs upright) and are
grey, so they get no colour jitter (channels stay equal). Unknown modality names get the full
policy.

Input/output: image (3,S,S) float32 in [0,255]; mask (1,S,S) float32 in [0,1] (may be soft
after resizing; ``augment`` returns it thresholded at 0.5 as {0,1}).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["POLICIES", "AugmentPolicy", "augment", "policy_for"]


@dataclass(frozen=True)
class AugmentPolicy:
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    scale: tuple[float, float] = (0.75, 1.25)
    #: probability of applying the random scale + crop/pad
    scale_p: float = 0.5
    brightness: float = 0.15  # additive, fraction of the 0..255 range
    contrast: float = 0.2  # multiplicative around the mean
    gamma: tuple[float, float] = (0.7, 1.4)
    #: per-channel gain and saturation jitter; 0 for grey modalities
    colour: float = 0.1
    intensity_p: float = 0.8


_FULL = AugmentPolicy()
_UPRIGHT_GREY = AugmentPolicy(vflip=False, rot90=False, scale=(0.85, 1.15), colour=0.0)

POLICIES: dict[str, AugmentPolicy] = {
    "dermoscopy": _FULL,
    "fundus": _FULL,
    "colonoscopy": _FULL,
    "microscopy": _FULL,
    "xray": _UPRIGHT_GREY,
    "ultrasound": _UPRIGHT_GREY,
}


def policy_for(modality: str) -> AugmentPolicy:
    return POLICIES.get(modality, _FULL)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _coin(g: torch.Generator, p: float = 0.5) -> bool:
    return float(torch.rand((), generator=g)) < p


def _scale_crop(x: torch.Tensor, g: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    """Zoom the stacked (C,S,S) tensor by a random factor, then crop (zoom in) or zero-pad
    (zoom out) back to S×S at a random offset."""
    c, s, _ = x.shape
    n = max(8, int(round(s * _uniform(g, lo, hi))))
    if n == s:
        return x
    y = F.interpolate(x[None], size=(n, n), mode="bilinear", align_corners=False, antialias=n < s)[0]
    if n > s:
        top = int(torch.randint(0, n - s + 1, (), generator=g))
        left = int(torch.randint(0, n - s + 1, (), generator=g))
        return y[:, top : top + s, left : left + s]
    out = x.new_zeros((c, s, s))
    top = int(torch.randint(0, s - n + 1, (), generator=g))
    left = int(torch.randint(0, s - n + 1, (), generator=g))
    out[:, top : top + n, left : left + n] = y
    return out


def _intensity(img: torch.Tensor, g: torch.Generator, p: AugmentPolicy) -> torch.Tensor:
    x = img / 255.0
    if p.gamma != (1.0, 1.0):
        x = x.clamp(0, 1) ** _uniform(g, *p.gamma)
    if p.contrast:
        mean = x.mean()
        x = (x - mean) * _uniform(g, 1 - p.contrast, 1 + p.contrast) + mean
    if p.brightness:
        x = x + _uniform(g, -p.brightness, p.brightness)
    if p.colour:
        gains = 1 + (torch.rand(3, 1, 1, generator=g) * 2 - 1) * p.colour
        grey = x.mean(0, keepdim=True)
        sat = _uniform(g, 1 - 2 * p.colour, 1 + 2 * p.colour)
        x = (grey + (x - grey) * sat) * gains
    return (x.clamp(0, 1) * 255.0).to(img.dtype)


def augment(
    image: torch.Tensor,
    mask: torch.Tensor,
    seed: int,
    policy: AugmentPolicy = _FULL,
    *,
    geometry: bool = True,
    intensity: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly transform image (3,S,S) [0,255] and mask (1,S,S) [0,1] with the same geometry.

    Deterministic in ``seed``. Returns (image (3,S,S) float32 in [0,255], mask (1,S,S) {0,1}).
    """
    if image.ndim != 3 or image.shape[0] != 3 or mask.shape != (1, *image.shape[1:]):
        raise ValueError(
            f"expected image (3,S,S) and mask (1,S,S), got {tuple(image.shape)} and {tuple(mask.shape)}"
        )
    g = torch.Generator()
    g.manual_seed(int(seed))
    x = torch.cat([image.float(), mask.float()], dim=0)
    if geometry:
        if policy.hflip and _coin(g):
            x = x.flip(-1)
        if policy.vflip and _coin(g):
            x = x.flip(-2)
        if policy.rot90:
            k = int(torch.randint(0, 4, (), generator=g))
            if k:
                x = torch.rot90(x, k, dims=(-2, -1))
        if policy.scale != (1.0, 1.0) and _coin(g, policy.scale_p):
            x = _scale_crop(x, g, *policy.scale)
    img, msk = x[:3].clamp(0, 255).contiguous(), x[3:].contiguous()  # resampling may round past 255
    if intensity and _coin(g, policy.intensity_p):
        img = _intensity(img, g, policy)
    return img, (msk > 0.5).float()
