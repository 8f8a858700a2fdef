"""Appearance and geometry shifts that real images carry: the robustness scoreboard's shifts and
the modality head's training augmentation, one implementation for both.

Every function takes an ``(H,W,3)`` uint8 image and an ``(H,W)`` mask (bool or uint8, or None)
and returns the shifted pair; masks follow the geometric shifts (resize, stretch) and lose what
a frame blacks out. Colour shifts leave a grey image grey where that is what the shift means
(hue, stain, channel order have no effect on equal channels).

``SHIFTS`` is the scoreboard (``benchmarks/appearance_shift.py``): fixed, named shifts;
``EXTRA_SHIFTS`` are more, run when named (false-colour exports of grey images).
``random_appearance`` draws a random mix of the same kinds of change for training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import permutations

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocess import is_grey
from .augment import _RGB2YIQ, _colour_matrix, _jpeg, _stain_jitter

__all__ = [
    "AppearanceMix",
    "CHANNEL_ORDERS",
    "MixByModality",
    "COLOUR_MODALITIES",
    "EXTRA_SHIFTS",
    "SHIFTS",
    "Shift",
    "channel_order_matrix",
    "endoscope_frame",
    "greyscale",
    "hue_matrix",
    "is_grey",
    "random_appearance",
]

#: the six orders of three channels; index 0 is the identity, index 5 is BGR
CHANNEL_ORDERS: tuple[tuple[int, int, int], ...] = tuple(permutations(range(3)))  # type: ignore[assignment]
BGR_INDEX = CHANNEL_ORDERS.index((2, 1, 0))
#: modalities whose images are colour (greyscale is a shift for these only)
COLOUR_MODALITIES = ("dermoscopy", "fundus", "colonoscopy", "microscopy")

Pair = tuple[np.ndarray, "np.ndarray | None"]


def channel_order_matrix(order: int) -> np.ndarray:
    """3×3 matrix that reorders RGB channels as ``CHANNEL_ORDERS[order]`` (out[c] = in[perm[c]])."""
    m = np.zeros((3, 3))
    for c, src in enumerate(CHANNEL_ORDERS[order]):
        m[c, src] = 1.0
    return m


def hue_matrix(degrees: float) -> np.ndarray:
    """3×3 RGB -> RGB matrix rotating hue by ``degrees`` (YIQ plane rotation, luminance kept)."""
    return _colour_matrix(degrees / 360.0, 1.0)


def _apply_matrix(image: np.ndarray, m: np.ndarray) -> np.ndarray:
    x = image[..., :3].astype(np.float32) @ m.T.astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _resize(array: np.ndarray, size: tuple[int, int], *, nearest: bool) -> np.ndarray:
    contiguous = np.ascontiguousarray(array)
    # torch.from_numpy warns on a read-only array (a decoded file's buffer): copy those
    t = torch.from_numpy(contiguous if contiguous.flags.writeable else contiguous.copy())
    t = t[None, None].float() if t.ndim == 2 else t.permute(2, 0, 1)[None].float()
    if nearest:
        out = F.interpolate(t, size=size, mode="nearest")
    else:
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    out = out[0].permute(1, 2, 0) if array.ndim == 3 else out[0, 0]
    return out.round().clamp(0, 255).numpy().astype(array.dtype)


def _resize_pair(image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]) -> Pair:
    img = _resize(image, size, nearest=False)
    if mask is None:
        return img, None
    m = _resize(mask.astype(np.uint8), size, nearest=True)
    return img, m.astype(mask.dtype)


def endoscope_frame(height: int, width: int, shape: str = "octagon", cut: float = 0.2) -> np.ndarray:
    """(H,W) bool: True inside an endoscope-style field of view, centred. Octagon: the corners
    cut by ``cut`` of the shorter side; circle: radius (1 + cut/2) × half the shorter side."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if shape == "circle":
        cy, cx, r = (height - 1) / 2, (width - 1) / 2, min(height, width) / 2 * (1.0 + cut / 2)
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape != "octagon":
        raise ValueError(f"unknown frame shape {shape!r}")
    c = cut * min(height, width)
    inside = (xx + yy >= c) & ((width - 1 - xx) + yy >= c) & (xx + (height - 1 - yy) >= c)
    return inside & ((width - 1 - xx) + (height - 1 - yy) >= c)


def _frame(image: np.ndarray, mask: np.ndarray | None, shape: str, cut: float = 0.2) -> Pair:
    inside = endoscope_frame(image.shape[0], image.shape[1], shape, cut)
    img = image.copy()
    img[~inside] = 0
    if mask is None:
        return img, None
    m = mask.copy()
    m[~inside] = 0
    return img, m


def greyscale(image: np.ndarray) -> np.ndarray:
    """``image`` as luma (Y of YIQ) in all three channels."""
    y = image[..., :3].astype(np.float32) @ _RGB2YIQ[0].astype(np.float32)
    return np.repeat(np.clip(np.rint(y), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def _gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    lut = np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** gamma), 0, 255).astype(np.uint8)
    return lut[image]


def _stain(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    if is_grey(image):
        return image
    out = _stain_jitter(image.astype(np.float32) / 255.0, np.random.default_rng(seed), sigma)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Shift:
    """A named shift of the scoreboard. ``colour_only``: run it on colour modalities only;
    ``modalities``: run it on these modalities only (None: every modality it applies to)."""

    name: str
    apply: Callable[[np.ndarray, np.ndarray | None, int], Pair]
    colour_only: bool = False
    geometric: bool = False
    modalities: tuple[str, ...] | None = None

    def applies_to(self, modality: str) -> bool:
        if self.colour_only and modality not in COLOUR_MODALITIES:
            return False
        return self.modalities is None or modality in self.modalities


def _colour(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray, np.ndarray | None, int], Pair]:
    return lambda image, mask, seed: (fn(image), mask)


def _half(image: np.ndarray, mask: np.ndarray | None, seed: int) -> Pair:
    h, w = image.shape[:2]
    return _resize_pair(image, mask, (max(8, h // 2), max(8, w // 2)))


def _resolution_loss(image: np.ndarray, mask: np.ndarray | None, seed: int) -> Pair:
    """The image brought to half size and back (what a half-resolution camera or export shows once
    displayed at the stored size); the mask untouched: scored against the stored labels, which
    "half resolution" cannot do for thin structures (its labels are resampled too)."""
    h, w = image.shape[:2]
    return _resize(_resize(image, (max(8, h // 2), max(8, w // 2)), nearest=False), (h, w), nearest=False), mask


def _stretch(image: np.ndarray, mask: np.ndarray | None, seed: int) -> Pair:
    h, w = image.shape[:2]
    return _resize_pair(image, mask, (h, int(round(w * 1.4))))


SHIFTS: dict[str, Shift] = {
    s.name: s
    for s in (
        Shift("as stored", lambda image, mask, seed: (image, mask)),
        Shift("BGR channel order", _colour(lambda im: im[..., [2, 1, 0]].copy())),
        Shift("hue +25°", _colour(lambda im: im if is_grey(im) else _apply_matrix(im, hue_matrix(25.0)))),
        Shift("hue -25°", _colour(lambda im: im if is_grey(im) else _apply_matrix(im, hue_matrix(-25.0)))),
        # a stain model of haematoxylin and eosin: it means something on stained tissue only
        Shift("H&E stain jitter", lambda image, mask, seed: (_stain(image, 0.25, seed), mask), modalities=("microscopy",)),
        Shift("gamma 0.6", _colour(lambda im: _gamma(im, 0.6))),
        Shift("gamma 1.6", _colour(lambda im: _gamma(im, 1.6))),
        Shift("JPEG quality 25", _colour(lambda im: _jpeg(np.ascontiguousarray(im), 25))),
        Shift("half resolution", _half, geometric=True),
        Shift("resolution loss 2×", _resolution_loss),
        Shift("aspect stretch 1.4", _stretch, geometric=True),
        Shift("octagonal frame", lambda image, mask, seed: _frame(image, mask, "octagon"), geometric=True),
        Shift("circular frame", lambda image, mask, seed: _frame(image, mask, "circle"), geometric=True),
        Shift("greyscale", _colour(greyscale), colour_only=True),
    )
}



def _false_colour(image: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    """A grey image as one channel shown in ``colour`` (a fluorescence channel exported as RGB);
    a colour image unchanged."""
    if not is_grey(image):
        return image
    g = image[..., :1].astype(np.float32)
    return np.clip(np.rint(g * np.asarray(colour, np.float32)), 0, 255).astype(np.uint8)


#: shifts outside the scoreboard (``appearance_shift.py --shifts`` names them): single-channel
#: images of the grey modalities stored in false colour, as microscopy software exports them
EXTRA_SHIFTS: dict[str, Shift] = {
    s.name: s
    for s in (
        Shift("false colour blue", _colour(lambda im: _false_colour(im, (0.0, 0.0, 1.0))),
              modalities=("microscopy", "xray", "ultrasound")),
        Shift("false colour green", _colour(lambda im: _false_colour(im, (0.0, 1.0, 0.0))),
              modalities=("microscopy", "xray", "ultrasound")),
        Shift("false colour magenta", _colour(lambda im: _false_colour(im, (1.0, 0.0, 1.0))),
              modalities=("microscopy", "xray", "ultrasound")),
    )
}


# ---- random appearance for training ------------------------------------------------------------


@dataclass(frozen=True)
class AppearanceMix:
    """How often ``random_appearance`` applies the kinds of change that need tuning per head
    stage (the rest of the mix is fixed). The defaults are the mix v2's head was trained with."""

    #: probability that a colour image's channels are reordered
    reorder_p: float = 0.4
    #: share of the reorderings that are BGR (None: the five non-identity orders equally likely)
    bgr_share: float | None = None
    #: probability that the image is placed on a wider or taller black canvas (a fundus camera's
    #: or video processor's frame around the field of view)
    canvas_p: float = 0.0
    #: probability of a wide-field camera's layout: the image's central rows kept (the round field
    #: of view cut at top and bottom) on a black canvas 1.3-1.7x wider than tall (fundus cameras
    #: that write 3:2 frames); drawn only when above 0, so mixes without it keep their draws
    wide_field_p: float = 0.0
    #: probability that a colour image becomes greyscale (grey X-ray-like copies of dermoscopy,
    #: fundus and endoscopy images: scanned prints, monochrome exports)
    greyscale_p: float = 0.1
    #: the largest hue rotation drawn, degrees (real H&E varies far less in hue than photographs)
    hue_max: float = 45.0
    #: the largest H&E stain jitter drawn (HED scale/shift sigma)
    stain_sigma_max: float = 0.3

    def __post_init__(self) -> None:
        for name in ("reorder_p", "canvas_p", "wide_field_p", "greyscale_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.bgr_share is not None and not 0.0 <= self.bgr_share <= 1.0:
            raise ValueError(f"bgr_share must be in [0, 1] or None, got {self.bgr_share}")
        if not 0.0 <= self.hue_max <= 90.0:
            raise ValueError(f"hue_max must be in [0, 90] degrees, got {self.hue_max}")
        if not 0.05 <= self.stain_sigma_max <= 0.5:
            raise ValueError(f"stain_sigma_max must be in [0.05, 0.5], got {self.stain_sigma_max}")


@dataclass(frozen=True)
class MixByModality:
    """An ``AppearanceMix`` per modality: ``default`` for all but those in ``overrides``."""

    default: AppearanceMix = AppearanceMix()
    overrides: tuple[tuple[str, AppearanceMix], ...] = ()

    def for_modality(self, modality: str) -> AppearanceMix:
        return dict(self.overrides).get(modality, self.default)

    @classmethod
    def from_settings(cls, default: AppearanceMix, by_modality: dict[str, dict[str, float]]) -> MixByModality:
        """``by_modality``: {modality: {field: value}}, each field replacing ``default``'s."""
        import dataclasses

        known = {f.name for f in dataclasses.fields(AppearanceMix)}
        overrides = []
        for modality, fields in sorted(by_modality.items()):
            unknown = sorted(set(fields) - known)
            if unknown:
                raise ValueError(f"unknown appearance-mix fields for {modality}: {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(known))})")
            overrides.append((modality, dataclasses.replace(default, **fields)))
        return cls(default, tuple(overrides))


def black_canvas(image: np.ndarray, rng: np.random.Generator, widen: tuple[float, float] = (1.1, 1.6)) -> np.ndarray:
    """``image`` placed on a black canvas that is wider (or, one time in four, taller) by a random
    factor in ``widen``, at a random offset along that axis."""
    h, w = image.shape[:2]
    f = float(rng.uniform(*widen))
    tall = rng.random() < 0.25
    nh, nw = (int(round(h * f)), w) if tall else (h, int(round(w * f)))
    out = np.zeros((nh, nw, image.shape[2]), dtype=image.dtype)
    top, left = int(rng.integers(0, nh - h + 1)), int(rng.integers(0, nw - w + 1))
    out[top : top + h, left : left + w] = image
    return out


def wide_field_layout(image: np.ndarray, keep: float, aspect: float) -> np.ndarray:
    """``image``'s central ``keep`` of its rows (cut evenly at top and bottom) centred on a black
    canvas ``aspect`` times as wide as the kept height (at least the image's width): how a 3:2
    fundus camera frames the round field of view."""
    h, w = image.shape[:2]
    rows = max(8, int(round(h * keep)))
    top = (h - rows) // 2
    width = max(w, int(round(rows * aspect)))
    out = np.zeros((rows, width, image.shape[2]), dtype=image.dtype)
    left = (width - w) // 2
    out[:, left : left + w] = image[top : top + rows]
    return out


def wide_field(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """:func:`wide_field_layout` with 60-90 % of the rows kept on a canvas 1.3-1.7x as wide."""
    keep = rng.uniform(0.6, 0.9)
    return wide_field_layout(image, keep, rng.uniform(1.3, 1.7))


def _draw_order(rng: np.random.Generator, mix: AppearanceMix) -> int:
    if mix.bgr_share is not None and rng.random() < mix.bgr_share:
        return BGR_INDEX
    others = [i for i in range(1, len(CHANNEL_ORDERS)) if mix.bgr_share is None or i != BGR_INDEX]
    return others[int(rng.integers(len(others)))]


def random_appearance(
    image: np.ndarray, rng: np.random.Generator, *, colour: bool = True, mix: AppearanceMix | None = None
) -> tuple[np.ndarray, int, float]:
    """A random mix of the scoreboard's kinds of change, drawn from ``rng``, for training the
    modality head. Returns (image, channel order applied (index into ``CHANNEL_ORDERS``, 0 for
    none), hue rotation applied in degrees). Geometry here is only what keeps the image's
    meaning: crops, rescaling, aspect, frames, a black canvas, a wide-field layout. ``colour=False`` (grey
    modalities) skips colour. ``mix`` sets the tunable probabilities (``AppearanceMix``)."""
    mix = mix if mix is not None else AppearanceMix()
    h, w = image.shape[:2]
    out = image[..., :3]
    grey = is_grey(out)
    # geometry: crop, aspect, resolution
    if rng.random() < 0.35:
        ch, cw = int(h * rng.uniform(0.55, 1.0)), int(w * rng.uniform(0.55, 1.0))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out = out[top : top + ch, left : left + cw]
    if rng.random() < 0.3:
        a = float(np.exp(rng.uniform(np.log(0.7), np.log(1.45))))
        out = _resize(out, (out.shape[0], max(8, int(round(out.shape[1] * a)))), nearest=False)
    if rng.random() < 0.3:
        f = rng.uniform(0.3, 0.8)
        small = _resize(out, (max(8, int(out.shape[0] * f)), max(8, int(out.shape[1] * f))), nearest=False)
        out = _resize(small, out.shape[:2], nearest=False)
    # intensity
    if rng.random() < 0.5:
        out = _gamma(out, float(np.exp(rng.uniform(np.log(0.5), np.log(1.8)))))
    if rng.random() < 0.3:
        x = out.astype(np.float32)
        x = (x - x.mean()) * rng.uniform(0.7, 1.3) + x.mean() + rng.uniform(-25, 25)
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    order, hue = 0, 0.0
    if colour and not grey:
        if rng.random() < 0.25:
            out = _stain(out, float(rng.uniform(0.05, mix.stain_sigma_max)), int(rng.integers(0, 2**31 - 1)))
        if rng.random() < 0.25:  # white balance: a gain per channel
            gains = rng.uniform(0.75, 1.25, size=3)
            out = np.clip(np.rint(out.astype(np.float32) * gains), 0, 255).astype(np.uint8)
        if rng.random() < 0.6:
            hue = float(rng.uniform(-mix.hue_max, mix.hue_max))
            out = _apply_matrix(out, _colour_matrix(hue / 360.0, float(rng.uniform(0.6, 1.4))))
        if rng.random() < mix.greyscale_p:
            out, hue = greyscale(out), 0.0
        elif rng.random() < mix.reorder_p:
            order = _draw_order(rng, mix)
            out = out[..., list(CHANNEL_ORDERS[order])]
    # frames, canvas, compression
    if mix.wide_field_p and rng.random() < mix.wide_field_p:
        out = wide_field(np.ascontiguousarray(out), rng)
    if mix.canvas_p and rng.random() < mix.canvas_p:
        out = black_canvas(np.ascontiguousarray(out), rng)
    if rng.random() < 0.3:
        shape = "circle" if rng.random() < 0.4 else "octagon"
        out, _ = _frame(np.ascontiguousarray(out), None, shape, float(rng.uniform(0.08, 0.3)))
    if rng.random() < 0.3:
        out = _jpeg(np.ascontiguousarray(out), int(rng.integers(15, 80)))
    return np.ascontiguousarray(out), order, hue
