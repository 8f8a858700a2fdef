"""Augmentations applied to image and mask together (uint8, CPU, seeded per sample).

Geometry (flips, 90° rotations, random scale + crop/pad) is applied to ONE array that stacks
the image's 3 channels and the mask as a 4th channel, so the two can never drift apart — the
authors' public code flipped the mask but fed the unflipped image. Intensity changes
(gamma, contrast, brightness, per-channel colour gain) touch the image channels only; they are
pointwise, so they are applied as one 256-entry lookup table per channel.

Everything stays uint8 and channels-last (H,W,4): flips and rotations are numpy views, the
rescale is torch's uint8 channels-last bilinear kernel — a 1024² sample costs a few
milliseconds, so DataLoader workers keep up with a GPU.

Appearance changes (``appearance=True``, on by default) imitate what differs between centres,
scanners and stains rather than between images of one source, as domain-generalisation work
does: hue and saturation (one 3×3 colour matrix in YIQ space), H&E stain jitter in HED space
(microscopy), random greyscale, Gaussian blur or unsharp-mask sharpening, Gaussian or speckle
noise, and JPEG re-compression, and (where a policy asks) a resolution loss (``lowres_p``) and the
colour channels in another order (``channel_order_p``, last). They are drawn after the geometry and intensity parameters, so
a seed's geometry and intensity do not depend on them. A grey image (equal channels) stays grey.

Per-modality policy (``POLICIES``): dermoscopy, fundus, colonoscopy and microscopy have no
canonical orientation and get all 8 flips/rotations and colour jitter; chest X-ray and
ultrasound keep their orientation (left-right flip only: lungs upright, probe on top) and are
grey, so they get no colour jitter (channels stay equal). Unknown modality names get the full
policy.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["POLICIES", "AugmentPolicy", "augment", "augment_hwc", "policies_with", "policy_for"]


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
    # appearance (centre / scanner / stain differences)
    #: hue rotation, fraction of a full turn (0.05 = ±18°); 0 for grey modalities
    hue: float = 0.05
    #: saturation factor range (1 = unchanged)
    saturation: tuple[float, float] = (0.7, 1.3)
    #: probability of H&E stain jitter in HED space, and its scale/shift per stain
    stain_p: float = 0.0
    stain_sigma: float = 0.05
    greyscale_p: float = 0.05
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    sharpen_p: float = 0.15
    noise_p: float = 0.2
    #: Gaussian noise sigma range, grey levels (0..255)
    noise_sigma: tuple[float, float] = (2.0, 8.0)
    #: noise multiplies the image (ultrasound speckle) instead of adding to it
    speckle: bool = False
    jpeg_p: float = 0.2
    jpeg_quality: tuple[int, int] = (35, 90)
    #: probability of a colour image arriving with its channels reordered (a file written in
    #: OpenCV's BGR order, an exporter's swapped planes), applied last; 0 keeps a seed's draws
    #: identical to a policy without the field
    channel_order_p: float = 0.0
    #: share of those reorderings that are BGR (the common one); the rest is one of the other
    #: four non-identity orders
    bgr_share: float = 0.5
    #: probability of a resolution loss: the image (not the mask) downsampled by a factor drawn
    #: from ``lowres_factor`` and upsampled back (a low-resolution camera, a half-size export),
    #: before blur, noise and JPEG; 0 keeps a seed's draws identical to a policy without the field
    lowres_p: float = 0.0
    lowres_factor: tuple[float, float] = (1.5, 3.0)


_FULL = AugmentPolicy()
_UPRIGHT_GREY = AugmentPolicy(
    vflip=False, rot90=False, scale=(0.85, 1.15), colour=0.0, hue=0.0, saturation=(1.0, 1.0), greyscale_p=0.0
)

POLICIES: dict[str, AugmentPolicy] = {
    "dermoscopy": _FULL,
    "fundus": _FULL,
    "colonoscopy": _FULL,
    # H&E and fluorescence: stain jitter, and greyscale more often (shape, not stain, is the cue)
    "microscopy": AugmentPolicy(stain_p=0.5, greyscale_p=0.15),
    "xray": _UPRIGHT_GREY,
    # speckle: multiplicative noise, the texture that differs between ultrasound machines
    "ultrasound": AugmentPolicy(
        vflip=False,
        rot90=False,
        scale=(0.85, 1.15),
        colour=0.0,
        hue=0.0,
        saturation=(1.0, 1.0),
        greyscale_p=0.0,
        speckle=True,
        noise_sigma=(0.05, 0.2),
        noise_p=0.3,
    ),
}


def policy_for(modality: str) -> AugmentPolicy:
    return POLICIES.get(modality, _FULL)


def policies_with(overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, AugmentPolicy]:
    """The policies of the modalities ``overrides`` names, each ``policy_for(modality)`` with the
    named fields replaced (lists become tuples), e.g. ``{"microscopy": {"channel_order_p": 0.5}}``.

    ``ValueError`` for a field ``AugmentPolicy`` does not have or a value of the wrong shape, so a
    typo in a recipe fails before any training step.
    """
    known = {f.name: f for f in dataclasses.fields(AugmentPolicy)}
    out: dict[str, AugmentPolicy] = {}
    for modality, changes in overrides.items():
        if not isinstance(changes, Mapping):
            raise ValueError(f"augment override for {modality!r} must be a mapping of policy fields")
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(
                f"unknown augmentation field(s) for {modality!r}: {', '.join(unknown)}; "
                f"choose from {', '.join(known)}"
            )
        base = policy_for(modality)
        values: dict[str, Any] = {}
        for name, value in changes.items():
            current = getattr(base, name)
            if isinstance(current, tuple):
                if not isinstance(value, (list, tuple)) or len(value) != len(current):
                    raise ValueError(f"{modality}.{name} must be {len(current)} numbers, got {value!r}")
                value = tuple(type(c)(v) for c, v in zip(current, value, strict=True))
            elif isinstance(current, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{modality}.{name} must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{modality}.{name} must be a number, got {value!r}")
            else:
                value = type(current)(value)
            values[name] = value
        for name in ("channel_order_p", "bgr_share", "greyscale_p", "stain_p", "scale_p", "intensity_p", "lowres_p"):
            v = values.get(name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{modality}.{name} must be a probability in [0, 1], got {v!r}")
        lo = values.get("lowres_factor")
        if lo is not None and not 1.0 <= lo[0] <= lo[1]:
            raise ValueError(f"{modality}.lowres_factor must be two factors 1 <= low <= high, got {list(lo)!r}")
        out[modality] = dataclasses.replace(base, **values)
    return out


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


# YIQ: hue is a rotation of the (I, Q) plane, saturation a scaling of it
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


def _colour_matrix(hue_turns: float, saturation: float) -> np.ndarray:
    """3×3 RGB -> RGB matrix: rotate hue by ``hue_turns`` of a full turn, scale saturation."""
    a = 2 * np.pi * hue_turns
    c, s = np.cos(a) * saturation, np.sin(a) * saturation
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return _YIQ2RGB @ rot @ _RGB2YIQ


def _stain_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """H&E stain jitter: per-stain scale and shift in HED space (Tellez et al. 2018)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3)
    beta = rng.uniform(-sigma, sigma, size=3) * 0.1  # HED values are ~0..0.3
    return np.clip(hed2rgb(hed * alpha + beta) * 255.0, 0, 255)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """(H,W,C) float32 -> blurred, separable Gaussian (torch conv, reflect padding)."""
    radius = max(1, int(round(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = torch.from_numpy((k / k.sum()).astype(np.float32))
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[:, None]  # (C,1,H,W)
    t = F.pad(t, (radius, radius, radius, radius), mode="reflect")
    t = F.conv2d(F.conv2d(t, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return t[:, 0].permute(1, 2, 0).numpy()


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Re-compress (H,W,C) uint8 (C = 1 or 3) as JPEG at ``quality``."""
    from PIL import Image

    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(quality))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L" if img.shape[-1] == 1 else "RGB"))
    return out.reshape(img.shape)


def _resolution_loss(img: np.ndarray, factor: float) -> np.ndarray:
    """(H,W,C) float32 downsampled by ``factor`` (antialiased) and upsampled back (bilinear)."""
    h, w = img.shape[:2]
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    small = F.interpolate(t, size=(max(2, round(h / factor)), max(2, round(w / factor))), mode="bilinear",
                          align_corners=False, antialias=True)
    back = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return back[0].permute(1, 2, 0).numpy()


def _appearance(rgb: np.ndarray, rng: np.random.Generator, p: AugmentPolicy) -> np.ndarray:
    """(S,S,3) uint8 -> (S,S,3) uint8 with the policy's appearance changes (all drawn here)."""
    hue = rng.uniform(-p.hue, p.hue) if p.hue else 0.0
    sat = rng.uniform(*p.saturation)
    do_stain = rng.random() < p.stain_p
    do_grey = rng.random() < p.greyscale_p
    u_filter = rng.random()
    sigma = rng.uniform(*p.blur_sigma)
    do_noise = rng.random() < p.noise_p
    noise_sigma = rng.uniform(*p.noise_sigma)
    do_jpeg = rng.random() < p.jpeg_p
    quality = int(rng.integers(p.jpeg_quality[0], p.jpeg_quality[1] + 1))
    noise_seed = int(rng.integers(0, 2**31 - 1))
    # drawn only when enabled: policies without it keep every draw of a seed
    lowres = rng.uniform(*p.lowres_factor) if p.lowres_p > 0 and rng.random() < p.lowres_p else 1.0

    grey_in = bool(np.array_equal(rgb[::7, ::7, 0], rgb[::7, ::7, 1])) and bool(
        np.array_equal(rgb[::7, ::7, 1], rgb[::7, ::7, 2])
    )
    x = rgb[..., :1].astype(np.float32) if grey_in else rgb.astype(np.float32)
    if not grey_in:
        if do_stain:
            x = _stain_jitter(x / 255.0, rng, p.stain_sigma).astype(np.float32)
        if hue or sat != 1.0:
            x = x @ _colour_matrix(hue, sat).T.astype(np.float32)
        if do_grey:
            x = x @ _RGB2YIQ[0].astype(np.float32)[:, None]
            x = np.repeat(x, 3, axis=-1)
    if lowres > 1.0:
        x = _resolution_loss(x, lowres)
    if u_filter < p.blur_p:
        x = _gaussian_blur(x, sigma)
    elif u_filter < p.blur_p + p.sharpen_p:  # unsharp mask
        x = x + 0.8 * (x - _gaussian_blur(x, sigma))
    if do_noise:
        noise = np.random.default_rng(noise_seed).standard_normal(x.shape[:2] + (1,)).astype(np.float32)
        x = x * (1 + noise_sigma * noise) if p.speckle else x + noise_sigma * noise
    out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if do_jpeg:
        out = _jpeg(out, quality)
    if out.shape[-1] == 1:
        return np.repeat(out, 3, axis=-1)
    # drawn last and only when enabled: policies without it keep every earlier draw of a seed
    if p.channel_order_p > 0 and rng.random() < p.channel_order_p:
        order = (2, 1, 0) if rng.random() < p.bgr_share else _OTHER_ORDERS[int(rng.integers(0, 4))]
        out = np.ascontiguousarray(out[..., order])
    return out


#: the non-identity channel orders other than BGR
_OTHER_ORDERS = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1))


def augment_hwc(
    x: np.ndarray,
    seed: int,
    policy: AugmentPolicy = _FULL,
    *,
    geometry: bool = True,
    intensity: bool = True,
    appearance: bool = True,
) -> np.ndarray:
    """(S,S,4) uint8 — RGB + mask (0..255, may be soft) — -> augmented (S,S,4) uint8 (may be a view).

    Deterministic in ``seed``. All geometry parameters are drawn before the intensity ones, and
    those before the appearance ones, so switching intensity or appearance off never changes
    the geometry of a seed.
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
    if appearance:
        rgb = _appearance(x[..., :3], rng, policy)
        x = np.concatenate([rgb, x[..., 3:]], axis=-1)
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
    appearance: bool = True,
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
    out = augment_hwc(stacked, seed, policy, geometry=geometry, intensity=intensity, appearance=appearance)
    t = torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)
    return t[:3].contiguous(), (t[3:] > 127).to(torch.uint8)
