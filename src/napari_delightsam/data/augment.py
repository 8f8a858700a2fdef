"""Augmentations applied to image and mask together (uint8, CPU, seeded per sample).

Geometry (flips, 90° rotations, random scale + crop/pad) is applied to ONE array that stacks
the image's 3 channels and the mask as a 4th channel, so the two can never drift apart — the
authors' public code flipped the mask but fed the unflipped image. Intensity changes
(gamma, contrast, brightness, per-channel colour gain) touch the image channels only; they are
pointwise, so they are applied as one 256-entry lookup table per channel.

Everything stays uint8 and channels-last (H,W,4): flips and rotations are numpy views, the
rescale is torch's uint8 channels-last bilinear kernel — a 1024² sample costs a few
milliseconds, so DataLoader workers keep up with a GPU.

Per-modality policy (``POLICIES``): dermoscopy, fundus, colonoscopy and microscopy have no
canonical orientation and get all 8 flips/rotations and colour jitter; chest X-ray and
ultrasound keep their orientation (left-right flip only: lungs upright, probe on top) and are
grey, so they get no colour jitter (channels stay equal). Unknown modality names get the full
policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["POLICIES", "AugmentPolicy", "augment", "augment_hwc", "policy_for"]


@dataclass(frozen=True)
class AugmentPolicy:
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    scale: tuple[float, float] = (0.75, 1.25)
    #: probability of applying the random scale + crop/pad
    scale_p: float = 0.5
    brightness: float = 0.15  # additive, fraction of the 0..255 range
    contrast: float = 0.2  # multiplicative around the image mean
    gamma: tuple[float, float] = (0.7, 1.4)
    #: per-channel gain jitter (white balance); 0 for grey modalities
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


def _scale_crop(x: np.ndarray, factor: float, u_top: float, u_left: float) -> np.ndarray:
    """Zoom the stacked (S,S,C) uint8 array by ``factor``, then crop (zoom in) or zero-pad
    (zoom out) back to S×S at the offset given by ``u_top``, ``u_left`` in [0, 1)."""
    s = x.shape[0]
    n = max(8, int(round(s * factor)))
    if n == s:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]  # channels-last view
    y = (
        F.interpolate(t, size=(n, n), mode="bilinear", align_corners=False, antialias=n < s)[0]
        .permute(1, 2, 0)
        .numpy()
    )
    room = abs(n - s) + 1
    top, left = int(u_top * room), int(u_left * room)
    if n > s:
        return y[top : top + s, left : left + s]
    out = np.zeros_like(x)
    out[top : top + n, left : left + n] = y
    return out


def _intensity_luts(image: np.ndarray, rng: np.random.Generator, p: AugmentPolicy) -> np.ndarray:
    """(3,256) uint8 lookup tables: gamma, contrast around the mean, brightness, channel gain."""
    x = np.arange(256, dtype=np.float64) / 255.0
    x = x ** rng.uniform(*p.gamma)
    hist = np.bincount(image[::4, ::4, :3].reshape(-1), minlength=256)  # mean from a 1/16 subsample
    mean = float((hist * x).sum() / max(1, hist.sum()))
    x = (x - mean) * rng.uniform(1 - p.contrast, 1 + p.contrast) + mean
    x = x + rng.uniform(-p.brightness, p.brightness)
    gains = 1 + rng.uniform(-p.colour, p.colour, size=3) if p.colour else np.ones(3)
    return np.clip(np.round(np.clip(x[None, :] * gains[:, None], 0, 1) * 255), 0, 255).astype(np.uint8)


def augment_hwc(
    x: np.ndarray, seed: int, policy: AugmentPolicy = _FULL, *, geometry: bool = True, intensity: bool = True
) -> np.ndarray:
    """(S,S,4) uint8 — RGB + mask (0..255, may be soft) — -> augmented (S,S,4) uint8 (may be a view).

    Deterministic in ``seed``. All geometry parameters are drawn before the intensity ones, so
    switching intensity off never changes the geometry of a seed.
    """
    rng = np.random.default_rng(int(seed))
    hflip, vflip = rng.random() < 0.5, rng.random() < 0.5
    k = int(rng.integers(0, 4))
    do_scale = rng.random() < policy.scale_p
    factor = rng.uniform(*policy.scale)
    u_top, u_left = rng.random(), rng.random()
    do_intensity = rng.random() < policy.intensity_p
    if intensity and do_intensity:
        luts = _intensity_luts(x, rng, policy)
        x = x.copy()
        for c in range(3):
            x[..., c] = np.take(luts[c], x[..., c])
    if geometry:
        # one RGBA pixel = one uint32: flips/rotations move 4-byte pixels, not single bytes
        px = np.ascontiguousarray(x).view(np.uint32)[..., 0]
        moved = False
        if policy.hflip and hflip:
            px, moved = px[:, ::-1], True
        if policy.vflip and vflip:
            px, moved = px[::-1], True
        if policy.rot90 and k:
            px, moved = np.rot90(px, k), True
        if moved:
            x = np.ascontiguousarray(px).view(np.uint8).reshape(*px.shape, 4)
        if policy.scale != (1.0, 1.0) and do_scale:
            x = _scale_crop(x, factor, u_top, u_left)
    return x


def augment(
    image: torch.Tensor,
    mask: torch.Tensor,
    seed: int,
    policy: AugmentPolicy = _FULL,
    *,
    geometry: bool = True,
    intensity: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly transform image (3,S,S) and mask (1,S,S) with the same geometry.

    Inputs: uint8 (mask 0..255) or float (image in [0,255], mask in [0,1]).
    Returns (image (3,S,S) uint8, mask (1,S,S) uint8 in {0,1}).
    """
    if image.ndim != 3 or image.shape[0] != 3 or mask.shape != (1, *image.shape[1:]):
        raise ValueError(
            f"expected image (3,S,S) and mask (1,S,S), got {tuple(image.shape)} and {tuple(mask.shape)}"
        )
    if image.dtype != torch.uint8:
        image = image.float().clamp(0, 255).round().to(torch.uint8)
    if mask.dtype != torch.uint8:
        mask = (mask.float().clamp(0, 1) * 255).round().to(torch.uint8)
    stacked = torch.cat([image, mask], 0).permute(1, 2, 0).contiguous().numpy()
    out = augment_hwc(stacked, seed, policy, geometry=geometry, intensity=intensity)
    t = torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)
    return t[:3].contiguous(), (t[3:] > 127).to(torch.uint8)
