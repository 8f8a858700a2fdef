"""Any 2D image -> the model's input tensor, and the model's outputs -> the image's own size.

Pipeline (SPEC §2)::

    image (H,W) | (H,W,C) | (C,H,W), any numeric dtype
      -> prepare_image   : (H,W,3) float32 in [0,255] + PrepInfo   (numpy, CPU)
      -> to_model_tensor : (1,3,S,S) float32, SAM-normalised        (torch, on the device)
    model low-res output (..., h, w)
      -> to_input_size   : (..., H, W)                              (torch, on the device)

Layout rules
    * 2D ``(H,W)`` is grey. 3D is channel-last when the last axis has 1, 3 or 4 entries
      (grey, RGB, RGBA); channel-first ``(C,H,W)`` only when it is unambiguous: the first
      axis has 1, 3 or 4 entries and the last axis does not. An ambiguous shape such as
      ``(3,3,3)`` or ``(4,100,3)`` is read channel-last. Alpha is dropped; grey is repeated
      to 3 channels. Anything else (2 channels, stacks, 4D) is refused with the shape named.

Intensity rules (recorded in ``PrepInfo.intensity`` and ``PrepInfo.window``)
    * ``bool``: False/True -> 0/255.
    * ``uint8``: used as is.
    * any other dtype whose finite values lie in [0, 1] (float in [0,1], 0/1 integer
      masks): multiplied by 255 ("unit-range").
    * any other dtype whose finite values lie in [0, 255]: used as is ("identity").
    * everything else: the (0.5, 99.5) percentile window of the finite values is clipped and
      stretched to [0, 255] ("percentile"; computed on a strided subsample of at most
      4 M values for big images). If that window is empty the min/max window is used; if
      that is empty too (a constant image) the result is all zeros ("constant").
    * NaN/inf are refused (``ValueError`` naming their count) unless ``nan_policy="zero"``,
      which computes the window on the finite values and sets the others to 0.

Resizing is a plain resize to S×S (as the authors did, no letterbox): bilinear with
antialiasing, done by torch on the target device (GPU preprocessing when there is one).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .config import PIXEL_MEAN, PIXEL_STD

#: Largest image accepted (height × width), shared with ``image_files``: 10000×10000 = 100 MP.
DEFAULT_MAX_PIXELS = 100_000_000
#: Percentile window for images that are not already 8-bit-like.
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)
#: Percentiles of bigger images are computed on a strided subsample of about this many pixels.
_PERCENTILE_SAMPLE = 4_000_000
_CHANNELS = (1, 3, 4)

NanPolicy = Literal["raise", "zero"]


@dataclass(frozen=True)
class PrepInfo:
    """What ``prepare_image`` did, enough to map outputs back and to tell the user."""

    #: shape and dtype of the array as given
    input_shape: tuple[int, ...]
    dtype: str
    #: the image's own size; every output is returned at this size
    height: int
    width: int
    #: "grey", "rgb" or "rgba" (alpha dropped)
    layout: str
    #: True when the input was (C,H,W)
    channels_first: bool
    #: "bool" | "uint8" | "unit-range" | "identity" | "percentile" | "constant"
    intensity: str
    #: input values mapped to 0 and 255
    window: tuple[float, float]
    #: NaN/inf values set to 0 (nan_policy="zero")
    nonfinite: int = 0
    #: the image carries no colour: one channel, or three (nearly) equal ones (``is_grey``), or
    #: a single channel shown in one colour (``pseudo_colour``)
    greyscale: bool = False
    #: the unit RGB colour of a single-channel image stored in false colour (a blue DAPI
    #: channel exported as RGB), which was taken back to grey; None for any other image
    pseudo_colour: tuple[float, float, float] | None = None

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "dtype": self.dtype,
            "size": [self.height, self.width],
            "layout": self.layout,
            "channels_first": self.channels_first,
            "intensity": self.intensity,
            "window": [float(self.window[0]), float(self.window[1])],
            "nonfinite": self.nonfinite,
            "greyscale": self.greyscale,
            "pseudo_colour": None if self.pseudo_colour is None else [round(float(v), 4) for v in self.pseudo_colour],
        }


def check_size(height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse images above ``max_pixels`` (before anything big is allocated)."""
    pixels = int(height) * int(width)
    if pixels > max_pixels:
        side = int(math.isqrt(max_pixels))
        raise ValueError(
            f"image of {height}x{width} = {pixels / 1e6:.1f} megapixels exceeds the limit of "
            f"{max_pixels / 1e6:.0f} megapixels (about {side}x{side}); downsample it first "
            "(e.g. skimage.transform.rescale) or raise max_pixels"
        )


def infer_layout(shape: Sequence[int]) -> tuple[int, int, int, bool]:
    """(H, W, C, channels_first) of an image shape, or ``ValueError`` naming the shape.

    See the module docstring for the rules (channel-last wins when ambiguous).
    """
    shape = tuple(int(s) for s in shape)
    hint = (
        "expected a 2D image: (H,W) grey, (H,W,C) or (C,H,W) with C = 1, 3 or 4; "
        "for a stack or a multichannel image pick one slice or three channels first"
    )
    if len(shape) == 2:
        h, w, c, first = shape[0], shape[1], 1, False
    elif len(shape) == 3:
        if shape[2] in _CHANNELS:
            h, w, c, first = shape[0], shape[1], shape[2], False
        elif shape[0] in _CHANNELS:
            h, w, c, first = shape[1], shape[2], shape[0], True
        else:
            raise ValueError(f"cannot interpret an image of shape {shape}: {hint}")
    else:
        raise ValueError(f"cannot interpret an image of shape {shape} ({len(shape)} dimensions): {hint}")
    if h < 1 or w < 1:
        raise ValueError(f"image of shape {shape} is empty")
    return h, w, c, first


def _window_for(sample: np.ndarray, lo_all: float, hi_all: float, percentiles: tuple[float, float]):
    # float64 values near its limits: the interpolation may overflow (inf, or NaN from inf * 0);
    # a window that is not finite and ordered falls back to the min/max window
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        lo, hi = lo_all, hi_all
    return lo, hi


def is_grey(image: np.ndarray, tol: float = 2.0, step: int = 7) -> bool:
    """True when ``image`` ((H, W), (H, W, 1) or (H, W, 3+), values on a 0-255 scale) carries no
    colour: one channel, or three whose mean absolute differences (every ``step``-th pixel) are at
    most ``tol``."""
    if image.ndim == 2 or image.shape[-1] == 1:
        return True
    sub = image[::step, ::step, :3].astype(np.float64)
    return bool(np.abs(sub[..., 0] - sub[..., 1]).mean() <= tol and np.abs(sub[..., 1] - sub[..., 2]).mean() <= tol)


#: mean distance (0-255 scale) of a colour image's pixels from the line of one colour below which
#: the image is one channel in false colour: 0 for an exact one, at most 2.7 after JPEG at
#: quality 75; photographs of the six modalities have 3.9 or more (docs/appearance.md)
PSEUDO_COLOUR_RESIDUAL = 2.5
#: pixels read to decide (all of a smaller image)
_PSEUDO_COLOUR_SAMPLE = 65536


def pseudo_colour(image: np.ndarray) -> np.ndarray | None:
    """The unit RGB colour ``c`` when the (H,W,3) 0-255 ``image`` is one channel shown in that
    colour (every pixel close to ``g·c``, ``PSEUDO_COLOUR_RESIDUAL``) and not grey; else None."""
    if image.ndim != 3 or image.shape[-1] < 3 or is_grey(image):
        return None
    return _one_colour(image)


def _one_colour(image: np.ndarray) -> np.ndarray | None:
    """``pseudo_colour`` for an (H,W,3) image already known not to be grey."""
    h, w = image.shape[:2]
    if h * w <= _PSEUDO_COLOUR_SAMPLE:
        px = image[:, :, :3].reshape(-1, 3).astype(np.float32)
    else:  # pixels drawn at fixed random places: a regular grid can fall on one phase of a pattern
        idx = np.random.default_rng(0).integers(0, h * w, _PSEUDO_COLOUR_SAMPLE)
        px = image[idx // w, idx % w, :3].astype(np.float32)
    norm = np.linalg.norm(px, axis=1)
    bright = px[norm > max(8.0, float(np.median(norm)))]  # the colour of what is lit
    colour = (bright if len(bright) >= 16 else px).mean(0)
    length = float(np.linalg.norm(colour))
    if length < 1e-6:
        return None
    colour /= length
    residual = np.linalg.norm(px - (px @ colour)[:, None] * colour[None], axis=1).mean()
    return colour if residual < PSEUDO_COLOUR_RESIDUAL else None


def _to_grey_along(image: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """(H,W,3) -> (H,W,1): each pixel's intensity along ``colour``, scaled so that ``g·c`` with
    the largest channel of ``c`` at 1 gives back ``g`` (a pure blue channel is that channel)."""
    weights = (colour * colour.max()).astype(np.float32)
    grey = np.empty(image.shape[:2] + (1,), np.float32)
    rows = max(1, 2**22 // max(1, image.shape[1]))
    for y in range(0, image.shape[0], rows):  # a block of rows at a time: no full float copy
        grey[y : y + rows, :, 0] = image[y : y + rows, :, :3].astype(np.float32) @ weights
    np.clip(grey, 0.0, 255.0, out=grey)
    return np.rint(grey).astype(np.uint8) if image.dtype == np.uint8 else grey


def describe_pseudo_colour(colour: Sequence[float]) -> str:
    """e.g. "one channel in blue (0.00, 0.00, 1.00) taken as grey"."""
    names = {(0, 0, 1): "blue", (0, 1, 0): "green", (1, 0, 0): "red", (1, 0, 1): "magenta", (0, 1, 1): "cyan",
             (1, 1, 0): "yellow"}
    key = tuple(int(v > 0.5 * max(colour)) for v in colour)
    values = ", ".join(f"{v:.2f}" for v in colour)
    if key == (1, 1, 1):  # a tinted grey image (a sepia scanner or viewer)
        return f"a nearly grey image ({values}) taken as grey"
    return f"one channel in {names.get(key, 'colour')} ({values}) taken as grey"  # type: ignore[call-overload]


def prepare_array(
    image: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    nan_policy: NanPolicy = "raise",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    keep_uint8: bool = True,
    read_false_colour: bool = True,
) -> tuple[np.ndarray, PrepInfo]:
    """The lean form of :func:`prepare_image` used by the Segmenter.

    Returns ``(H,W,C)`` with C = 1 (grey, not yet repeated) or 3, values in [0,255]: uint8
    when the mapping is exact in 8 bit and ``keep_uint8``, else float32. Avoids copies of
    big inputs where it can. ``PrepInfo.greyscale`` says whether the result carries colour. A
    single channel stored in false colour (``pseudo_colour``) comes back as that channel, grey:
    the network learned fluorescence, X-ray and ultrasound images grey (``read_false_colour=False``
    keeps it as stored: training data is read as stored, its augmentation changes colours).
    """
    out, info = _prepare_array(image, max_pixels=max_pixels, nan_policy=nan_policy, percentiles=percentiles,
                               keep_uint8=keep_uint8)
    step = max(7, math.ceil(math.sqrt(out.shape[0] * out.shape[1] / 2**20)))  # at most ~1 Mpx read
    if is_grey(out, step=step):
        return out, dataclasses.replace(info, greyscale=True)
    colour = _one_colour(out) if read_false_colour else None  # not grey: checked just above
    if colour is None:
        return out, info
    return _to_grey_along(out, colour), dataclasses.replace(
        info, greyscale=True, pseudo_colour=tuple(float(v) for v in colour)  # type: ignore[arg-type]
    )


def _prepare_array(
    image: Any,
    *,
    max_pixels: int,
    nan_policy: NanPolicy,
    percentiles: tuple[float, float],
    keep_uint8: bool,
) -> tuple[np.ndarray, PrepInfo]:
    if nan_policy not in ("raise", "zero"):
        raise ValueError(f"nan_policy must be 'raise' or 'zero', got {nan_policy!r}")
    shape = getattr(image, "shape", None)
    if shape is None:
        image = np.asarray(image)
        shape = image.shape
    h, w, c, first = infer_layout(shape)
    check_size(h, w, max_pixels)  # before np.asarray: a lazy (dask/zarr) array is not loaded yet
    arr = np.asarray(image)
    dtype = arr.dtype
    if dtype.kind not in "biuf":
        raise ValueError(f"unsupported image dtype {dtype} (expected bool, integer or float)")
    if dtype.kind == "f" and dtype.itemsize > 8:  # long double
        arr = arr.astype(np.float64)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif first:
        arr = arr.transpose(1, 2, 0)  # a view
    layout = {1: "grey", 3: "rgb", 4: "rgba"}[c]
    if c == 4:
        arr = arr[:, :, :3]
    info = dict(
        input_shape=tuple(int(s) for s in shape),
        dtype=str(dtype),
        height=h,
        width=w,
        layout=layout,
        channels_first=first,
    )

    if dtype.kind == "b":
        out = arr.astype(np.uint8) * np.uint8(255)
        return _finish(out, keep_uint8), PrepInfo(**info, intensity="bool", window=(0.0, 1.0))
    if dtype == np.uint8:
        return _finish(arr, keep_uint8), PrepInfo(**info, intensity="uint8", window=(0.0, 255.0))

    work = arr.astype(np.float32) if dtype == np.float16 else arr
    lo_all, hi_all = float(work.min()), float(work.max())
    finite: np.ndarray | None = None
    nonfinite = 0
    if not (math.isfinite(lo_all) and math.isfinite(hi_all)):
        finite = np.isfinite(work)
        n_finite = int(np.count_nonzero(finite))
        nonfinite = finite.size - n_finite
        if nan_policy == "raise":
            n_nan = int(np.count_nonzero(np.isnan(work)))
            raise ValueError(
                f"image contains {nonfinite} non-finite values ({n_nan} NaN, {nonfinite - n_nan} inf) "
                f"out of {finite.size}; clean them first or pass nan_policy='zero' to set them to 0"
            )
        if n_finite == 0:
            zeros = np.zeros((h, w, arr.shape[2]), dtype=np.float32)
            return _finish(zeros, keep_uint8), PrepInfo(
                **info, intensity="constant", window=(0.0, 0.0), nonfinite=nonfinite
            )
        lo_all, hi_all = float(work[finite].min()), float(work[finite].max())

    # 64-bit inputs, and float32 with a range float32 cannot subtract, are mapped in float64
    wide = dtype.itemsize >= 8 or (hi_all - lo_all) > float(np.finfo(np.float32).max) / 2
    calc = np.float64 if wide else np.float32
    if lo_all >= 0 and hi_all <= 1:
        out = work.astype(calc) * calc(255.0)
        intensity, window = "unit-range", (0.0, 1.0)
    elif lo_all >= 0 and hi_all <= 255:
        out = work.astype(calc)  # a copy: the non-finite fix below must not touch the input
        intensity, window = "identity", (0.0, 255.0)
    else:
        step = max(1, math.ceil(math.sqrt(h * w / _PERCENTILE_SAMPLE)))
        sample = work[::step, ::step]
        if finite is not None:
            sample = sample[finite[::step, ::step]]
            if sample.size == 0:
                sample = work[finite]
        lo, hi = _window_for(sample, lo_all, hi_all, percentiles)
        if not hi > lo:
            out = np.zeros((h, w, arr.shape[2]), dtype=np.float32)
            intensity, window = "constant", (lo, lo)
        else:
            out = work.astype(calc)
            np.clip(out, lo, hi, out=out)
            # a float64 window wider than float64's range (e.g. -1e308..1e308): hi - lo would
            # overflow to inf and give NaN pixels, so map it at half scale
            scale = 1.0 if math.isfinite(hi - lo) else 0.5
            if scale != 1.0:
                out *= calc(scale)
            out -= calc(lo * scale)
            out *= calc(255.0 / (hi * scale - lo * scale))
            intensity, window = "percentile", (lo, hi)
    if finite is not None:
        out[~finite] = 0
    out = out.astype(np.float32, copy=False)
    np.clip(out, 0.0, 255.0, out=out)  # rounding at the window edges
    return _finish(out, keep_uint8), PrepInfo(**info, intensity=intensity, window=window, nonfinite=nonfinite)


def _finish(out: np.ndarray, keep_uint8: bool) -> np.ndarray:
    if out.dtype == np.uint8 and not keep_uint8:
        return out.astype(np.float32)
    return out


def prepare_image(
    image: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    nan_policy: NanPolicy = "raise",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    read_false_colour: bool = True,
) -> tuple[np.ndarray, PrepInfo]:
    """Any supported 2D image -> ``(H,W,3)`` float32 in [0,255] and a :class:`PrepInfo`
    (``read_false_colour``: as :func:`prepare_array`).

    Raises ``ValueError`` with the reason for: unusable shapes (named), unsupported dtypes,
    NaN/inf (unless ``nan_policy="zero"``) and images above ``max_pixels``.
    """
    out, info = prepare_array(
        image, max_pixels=max_pixels, nan_policy=nan_policy, percentiles=percentiles, keep_uint8=False,
        read_false_colour=read_false_colour,
    )
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.float32), info


def _pixel_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def to_model_tensor(prepared: np.ndarray | torch.Tensor, img_size: int, device: torch.device | str = "cpu"):
    """``(H,W,C)`` in [0,255] (C = 1 or 3; uint8 or float) -> ``(1,3,S,S)`` float32 on ``device``.

    Plain bilinear resize to S×S with antialiasing (torch, on the device), then SAM
    normalisation ``(x - PIXEL_MEAN) / PIXEL_STD``. The result is channels_last in memory.
    On CPU a uint8 image is resized by torch's uint8 kernel (less memory for big images,
    within one grey level of the float path); elsewhere it is converted to float first.
    """
    device = torch.device(device)
    if isinstance(prepared, np.ndarray):
        arr = prepared[:, :, None] if prepared.ndim == 2 else prepared
        if arr.ndim != 3 or arr.shape[2] not in (1, 3):
            raise ValueError(f"expected a prepared (H,W,1|3) array, got shape {prepared.shape}")
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float32, copy=False)
        if not arr.flags.writeable:
            arr = arr.copy()
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        t = prepared if prepared.ndim == 3 else prepared[:, :, None]
    x = t.to(device).permute(2, 0, 1).unsqueeze(0)  # (1,C,H,W), channels_last strides
    if not (x.dtype == torch.uint8 and device.type == "cpu"):
        x = x.float()
    if tuple(x.shape[-2:]) != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    x = x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean, std = _pixel_stats(device)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def to_input_size(lowres: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear map of ``(..., h, w)`` model outputs to ``(..., H, W)``, the input's size.

    Antialiasing is used where an axis shrinks (e.g. very elongated images).
    """
    if lowres.ndim < 2:
        raise ValueError(f"expected a (..., h, w) tensor, got shape {tuple(lowres.shape)}")
    height, width = int(size[0]), int(size[1])
    lead = lowres.shape[:-2]
    x = lowres.reshape(-1, 1, *lowres.shape[-2:]).float()
    if tuple(x.shape[-2:]) != (height, width):
        shrinks = height < x.shape[-2] or width < x.shape[-1]
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinks)
    return x.reshape(*lead, height, width)
