"""Tiled inference: images of any size segmented at the objects' own scale.

Whole-image inference resizes every image to the network's input (S×S, 512² for the bundled
model). That suits a polyp frame or a chest X-ray; it shrinks the nuclei of a 2048² H&E field or
the vessels of a large fundus photograph below what the network can see. Tiled inference::

    image (H,W[,C]) --prepare_array--> (H,W,C) [0,255]                        (as whole-image)
      --resize by tile_scale--> working image (Hw,Ww), sides a multiple of the output stride g
      --S×S tiles, neighbours overlapping by >= tile_overlap working px (reflect-padded where
        the working image is smaller than S)-->
      --batches of tiles on the device (the Segmenter's fast paths)--> mask logits (S/g)² and
        SP-Generator patch logits (resized to (S/g)²) per tile
      --accumulate w·logits and w on the (Hw/g, Ww/g) output grid, w a per-tile window-->
      --logits = sum(w·logits) / sum(w), resized to (H,W), sigmoid--> probability, heatmap;
        mask = probability > threshold

``tile_scale`` is the factor the image is resized by before tiling (1.0: its own pixels; 0.5:
halved, for objects twice as large in pixels as in the training images; 2.0: doubled). The
training images are resized to S×S as a whole, so "the training scale" is the scale of an image
of about S² pixels: the stored MoNuSeg tiles (512²) and the DRIVE/STARE/IDRiD images (about 512²)
are at scale 1.0.

Blending: each tile's logits are weighted by a separable raised-cosine (Hann) ramp over its
overlap with each neighbour, flat (1.0) in its interior and on sides at the image border, never
below ``WINDOW_FLOOR``; the blended logit of a pixel is the weighted mean over the tiles that
cover it (the weight map is the sum of the windows, so every pixel's weights sum to 1 after the
division). Blending is in logit space on the network's own output grid, so an image of exactly
S×S tiled at scale 1 gives the whole-image result (one tile, weight 1), and the sigmoid comes
after the resize to (H,W), as in the whole-image path. A constant image gives a seam-free map.

Memory (bounded, streaming): tiles are cut from the working image one batch at a time (never a
stack of all tiles); the state kept is three float32 maps on the output grid (Hw/g × Ww/g, i.e.
1/4 of the working pixels for the bundled model, g = 2; 1/16 for g = 4): the weighted logit sum,
the weighted heatmap-logit sum and the weight sum. float32 because float16 loses integer-step
precision above 2048 and the grid is small. Beyond that: the input, the prepared uint8 (or
float32) copy, the working image when tile_scale != 1, and the outputs themselves (probability and
heatmap (H,W) float32, mask (H,W) bool), as in whole-image inference. A 8192² RGB image at scale
1 keeps 3 × 4096² × 4 B = 192 MB of accumulators.

The auto rule (``AUTO_TILING``) says, per modality, when ``tiling="auto"`` tiles and at which
scale; it was measured with ``benchmarks/tiled_inference.py`` (docs/tiled-inference.md).
Modalities without an entry (polyps, lungs, skin and breast lesions) are always segmented as
a whole. With ``modality="auto"`` the whole image is run first: its predicted modality decides
the rule and is then given to every tile (a tile alone may look like another modality).

The modality/appearance head runs once per image, on the whole image at S² (modality
probabilities, and the colour correction of a colour image it finds shifted, applied to the
working image); tiles run without it (``Segmenter._run(run_head=False)``): per tile it recoloured
151 of 270 fundus mosaic tiles, a crop of a retina being unlike the whole retinas it learned.
The whole image also decides whether a modality with a dark-field refiner uses it for every tile
(``model/image_rules.py``): a tile crowded with fluorescent nuclei is not dark, its image is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .model.image_rules import darkfield_rows
from .preprocess import PrepInfo, describe_pseudo_colour, prepare_array, to_model_tensor

if TYPE_CHECKING:
    from .inference import SegmentationResult, Segmenter

__all__ = [
    "AUTO_TILING",
    "DEFAULT_OVERLAP",
    "TILING_MODES",
    "TilePlan",
    "TilePolicy",
    "TrainingTile",
    "auto_tiles",
    "blend_window",
    "iter_segment",
    "may_tile",
    "plan_tiles",
    "policy_for",
    "tile_starts",
    "training_tiles",
]

Tiling = Literal["auto", "on", "off"]
TILING_MODES: tuple[str, ...] = ("auto", "on", "off")

#: overlap between neighbouring tiles, in working (network) pixels, when neither the caller nor
#: the modality's policy gives one
DEFAULT_OVERLAP = 64
#: lowest weight of a tile's window (its outermost pixels next to a neighbour)
WINDOW_FLOOR = 1e-3
#: tiles per network call when the caller gives no batch size
DEFAULT_TILE_BATCH = {"cuda": 16, "mps": 4, "cpu": 2}


@dataclass(frozen=True)
class TilePolicy:
    """How ``tiling="auto"`` treats one modality."""

    #: resize factor applied before tiling (1.0 = the image's own pixels)
    scale: float = 1.0
    #: tile when the image's longer side (its own pixels) exceeds this many network input sides
    min_side: float = 1.5
    #: overlap between neighbouring tiles, in working pixels
    overlap: int = DEFAULT_OVERLAP
    #: when set, the scale is relative to the field instead: the image is resized so that its
    #: longer side is ``fit`` network input sides (for images that always show one whole object,
    #: a retina, and are large because of their resolution); ``scale`` is then not used
    fit: float | None = None

    def scale_for(self, size: tuple[int, int], input_size: int) -> float:
        """The resize factor for an image of ``size`` (H, W)."""
        return self.fit * input_size / max(size) if self.fit else self.scale


#: The auto rule, measured by ``benchmarks/tiled_inference.py`` on mosaics of 1×1, 2×2 and 4×4
#: visible test/unseen images resized to 512² (docs/tiled-inference.md): at 2×2 and 4×4, tiles at
#: scale 1.25 gave the best Dice of the scales tried (1.25, 1, 0.75, 0.5) for microscopy and fundus,
#: within 0.1 of, or above, each image segmented alone; scale 1 is 0.5 (microscopy) to 1.6 (fundus)
#: lower, with as many tiles at 1024² and 31 % fewer at 2048². The threshold 1.5 (768 px for the bundled model) lies between the measured
#: 1× and 2× sizes, so images of about the training size stay whole as before. Modalities not
#: listed are segmented as a whole image.
#: Fundus is field-relative (``fit``): a fundus photograph shows one retina whatever its size, so
#: a large one is large because of its resolution, not because it shows more. Measured with
#: ``benchmarks/tiled_native.py`` (the visible test/unseen fundus images upsampled ×2 and ×4):
#: 1.25 of the image's own pixels gave 73.7 / 49.7 against 73.9 / 73.7 whole (7.5 / 30 tiles),
#: 1.25 of the field's training scale (longer side 1.25 × 512 = 640, then tiles) 75.1 / 74.9 (3 tiles).
AUTO_TILING: dict[str, TilePolicy] = {
    "microscopy": TilePolicy(scale=1.25, min_side=1.5, overlap=64),
    "fundus": TilePolicy(scale=1.25, min_side=1.5, overlap=64, fit=1.25),
}


def policy_for(modality: str) -> TilePolicy:
    """The modality's policy; modalities without an entry get the defaults (used for "on")."""
    return AUTO_TILING.get(str(modality), TilePolicy())


def auto_tiles(modality: str, size: tuple[int, int], input_size: int) -> bool:
    """The auto rule: does ``tiling="auto"`` tile an image of ``size`` (H, W) of ``modality``?
    (Its longer side, in the image's own pixels, above ``min_side`` network input sides.)"""
    policy = AUTO_TILING.get(str(modality))
    return policy is not None and max(size) > policy.min_side * input_size


def may_tile(tiling: str, modality: str | None, size: tuple[int, int], input_size: int) -> bool:
    """Whether ``Segmenter.segment(tiling=...)`` may tile an image of ``size``: always for "on",
    never for "off"; for "auto" when the rule tiles ``modality`` at that size, or, for
    ``modality=None`` ("auto", not known before the whole-image pass), any listed modality."""
    mode = _check_tiling(tiling)
    if mode != "auto":
        return mode == "on"
    names = list(AUTO_TILING) if modality is None else [modality]
    return any(auto_tiles(n, size, input_size) for n in names)


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering ``[0, length)`` with overlaps >= ``overlap``.

    Evenly spread, the first at 0 and the last flush with the end, every start a multiple of
    ``align`` (``length`` and ``tile`` must be multiples of it). One tile when ``length <= tile``.
    """
    if tile < 1 or align < 1 or tile % align or length % align:
        raise ValueError(f"bad tiling: length {length}, tile {tile}, align {align}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, {tile}), got {overlap}")
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    # rounding the spread down to `align` keeps every gap <= the ideal one, so overlaps only grow
    last = length - tile
    starts = [(k * last // (n - 1)) // align * align for k in range(n)]
    starts[-1] = last
    return starts


def blend_window(size: int, ramp_before: int, ramp_after: int, floor: float = WINDOW_FLOOR) -> np.ndarray:
    """1D window: raised-cosine ramps over the first/last ``ramp_*`` entries, 1.0 between, >= floor.

    A ramp of 0 (an image border, no neighbour) leaves that side flat. Two neighbours whose ramps
    span exactly their overlap sum to 1 there (cos² + sin²).
    """
    w = np.ones(size, dtype=np.float64)
    for ramp, side in ((ramp_before, 1), (ramp_after, -1)):
        r = int(min(max(ramp, 0), size))
        if r:
            t = (np.arange(r) + 0.5) / r
            up = 0.5 - 0.5 * np.cos(np.pi * t)
            if side == 1:
                w[:r] = np.minimum(w[:r], up)
            else:
                w[size - r :] = np.minimum(w[size - r :], up[::-1])
    return np.maximum(w, floor).astype(np.float32)


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles go, in working pixels (the image after the ``scale`` resize)."""

    #: the input's (H, W)
    size: tuple[int, int]
    #: the resized image's (Hw, Ww), multiples of ``stride``
    working: tuple[int, int]
    #: the tiled area (working size padded up to at least one tile)
    padded: tuple[int, int]
    tile: int
    stride: int
    overlap: int
    scale: float
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of tiles."""
        return len(self.ys), len(self.xs)

    def positions(self) -> Iterator[tuple[int, int]]:
        for y in self.ys:
            for x in self.xs:
                yield y, x

    def windows(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(y, x, window)`` per tile on the output grid (``tile // stride`` square)."""
        m = self.tile // self.stride
        wy = _axis_windows(self.ys, self.tile, self.overlap, self.stride)
        wx = _axis_windows(self.xs, self.tile, self.overlap, self.stride)
        for i, y in enumerate(self.ys):
            for j, x in enumerate(self.xs):
                yield y, x, (wy[i][:, None] * wx[j][None, :]).reshape(m, m)


def _axis_windows(starts: tuple[int, ...], tile: int, overlap: int, stride: int) -> list[np.ndarray]:
    m = tile // stride
    out = []
    for k, s in enumerate(starts):
        # ramp over the requested overlap, never past the actual overlap with the neighbour
        before = 0 if k == 0 else min(overlap, starts[k - 1] + tile - s) // stride
        after = 0 if k == len(starts) - 1 else min(overlap, s + tile - starts[k + 1]) // stride
        out.append(blend_window(m, before, after))
    return out


def plan_tiles(
    size: tuple[int, int], tile: int, *, scale: float = 1.0, overlap: int = DEFAULT_OVERLAP, stride: int = 4
) -> TilePlan:
    """The tile layout of an image of ``size`` resized by ``scale``; tiles of ``tile`` px."""
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"tile scale must be a positive number, got {scale!r}")
    if tile % stride:
        raise ValueError(f"tile {tile} is not a multiple of the output stride {stride}")
    overlap = int(overlap)
    if not 0 <= overlap <= tile // 2:
        raise ValueError(f"tile overlap must be in [0, {tile // 2}] (half a tile), got {overlap}")
    h, w = int(size[0]), int(size[1])
    hw = max(stride, round(h * scale / stride) * stride)
    ww = max(stride, round(w * scale / stride) * stride)
    hp, wp = max(hw, tile), max(ww, tile)
    return TilePlan(
        size=(h, w),
        working=(hw, ww),
        padded=(hp, wp),
        tile=tile,
        stride=stride,
        overlap=overlap,
        scale=scale,
        ys=tuple(tile_starts(hp, tile, overlap, stride)),
        xs=tuple(tile_starts(wp, tile, overlap, stride)),
    )


def _to_uint8(arr: np.ndarray, rows: int = 512) -> np.ndarray:
    """(H,W,C) float in [0,255] -> uint8, rounded, a block of rows at a time (no full float copy)."""
    out = np.empty(arr.shape, dtype=np.uint8)
    for r in range(0, arr.shape[0], rows):
        out[r : r + rows] = np.clip(np.rint(arr[r : r + rows]), 0, 255)
    return out


def _working_image(arr: np.ndarray, plan: TilePlan) -> np.ndarray:
    """(H,W,C) [0,255] -> the (Hp,Wp,C) tiled area: resized to the working size, reflect-padded."""
    hw, ww = plan.working
    if (hw, ww) != arr.shape[:2]:
        if arr.dtype != np.uint8:
            # resample in uint8 (values are already in [0, 255]): a quarter of the memory of the
            # float32 working copies (an 8192² uint16 image at scale 1.25 peaked at 4.6 GB)
            arr = _to_uint8(arr)
        src = np.ascontiguousarray(arr)
        if not src.flags.writeable:  # torch wants a writable buffer (it does not write to it)
            src = src.copy()
        t = torch.from_numpy(src).permute(2, 0, 1).unsqueeze(0)
        if t.dtype != torch.uint8:
            t = t.float()
        shrinks = hw < arr.shape[0] or ww < arr.shape[1]
        t = F.interpolate(t, size=(hw, ww), mode="bilinear", align_corners=False, antialias=shrinks)
        out = t[0].permute(1, 2, 0).numpy()
        arr = out if arr.dtype == np.uint8 else np.clip(out, 0, 255).astype(np.float32, copy=False)
    hp, wp = plan.padded
    if (hp, wp) != (hw, ww):
        arr = np.pad(arr, ((0, hp - hw), (0, wp - ww), (0, 0)), mode="reflect" if min(hw, ww) > 1 else "edge")
    return arr


@dataclass(frozen=True)
class TrainingTile:
    """One tile of a large annotated image, as tiled inference shows it to the network."""

    #: top-left corner in working pixels (the image resized by the plan's scale)
    y: int
    x: int
    #: (t, t) grey or (t, t, 3) RGB uint8: the prepared image ([0, 255], as inference maps it)
    image: np.ndarray
    #: (t, t) bool
    mask: np.ndarray


def training_tiles(image: Any, mask: np.ndarray, modality: str, input_size: int,
                   stride: int = 2) -> list[TrainingTile] | None:
    """The tiles ``tiling="auto"`` would cut from ``image`` at inference, with their masks: for
    training on a large annotated image at the scale the model will segment it at (a fine-tune
    on a 2048² H&E field resized whole to 512² would learn nuclei four times smaller than the
    tiles then show). None when the auto rule segments this image whole: train on it whole.

    The image is prepared as inference prepares it (``prepare_array``: one intensity mapping for
    the whole image), resized by the modality's tile scale (``policy_for``), reflect-padded up to
    one tile where it is smaller, and cut into ``input_size``² tiles overlapping as inference's.
    The mask follows the same resize and padding (bilinear, then > 0.5). ``stride`` aligns the
    working size and the tile starts as inference does for a model of that output stride
    (``input_size // mask_size``: 2 for the bundled model)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {mask.shape}")
    size = (int(mask.shape[0]), int(mask.shape[1]))
    if not auto_tiles(modality, size, input_size):
        return None
    arr, _ = prepare_array(image)
    if arr.shape[:2] != size:
        raise ValueError(f"image {arr.shape[:2]} and mask {size} differ in size")
    policy = policy_for(modality)
    plan = plan_tiles(size, input_size, scale=policy.scale_for(size, input_size), overlap=policy.overlap,
                      stride=stride)
    work = _to_uint8(_working_image(arr, plan)) if arr.dtype != np.uint8 else _working_image(arr, plan)
    soft = _working_image(np.where(mask > 0, 255, 0).astype(np.uint8)[:, :, None], plan)[:, :, 0]
    t = plan.tile
    tiles = []
    for y, x in plan.positions():
        img = work[y : y + t, x : x + t]
        tiles.append(TrainingTile(y, x, np.ascontiguousarray(img[:, :, 0] if img.shape[2] == 1 else img),
                                  soft[y : y + t, x : x + t] > 127))
    return tiles


def _whole_image_appearance(seg: Segmenter, arr: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
    """The modality/appearance head once, on the whole image at S² (as whole-image inference sees
    it): (modality probabilities (K,) or None, the colour correction (3,3) or None when there is
    none, whether the image is dark-field: ``model/image_rules.py``). The tiles then run without
    the head and with the whole image's dark-field decision: a tile alone may look like another
    modality or colour (a tile full of nuclei is not dark), and the head costs ~5-10 % of a
    tile's forward."""
    x = to_model_tensor(arr, seg.config.img_size, seg.device).contiguous(memory_format=seg.memory_format)
    darkfield = bool(darkfield_rows(x)[0])
    with torch.inference_mode(), seg._autocast():
        _, _, logits, mats = seg.model.stage0(x, correct_colour=None)
    probs = torch.softmax(logits.float(), dim=1)[0].cpu().numpy() if logits is not None else None
    matrix = None
    if mats is not None:
        m = mats[0].float().cpu().numpy()
        matrix = None if np.allclose(m, np.eye(3), atol=1e-6) else m
    return probs, matrix, darkfield


def _recolour(work: np.ndarray, matrix: np.ndarray, rows: int = 512) -> np.ndarray:
    """(H,W,3) [0,255] with each pixel's RGB replaced by ``matrix @ rgb`` (clamped; uint8 rounded),
    in place, a block of rows at a time (the appearance head's correction, as whole-image
    inference applies it to its S² input)."""
    if not work.flags.writeable:
        work = work.copy()
    mt = matrix.T.astype(np.float32)
    for r in range(0, work.shape[0], rows):
        block = np.clip(work[r : r + rows].astype(np.float32) @ mt, 0, 255)
        work[r : r + rows] = np.rint(block) if work.dtype == np.uint8 else block
    return work


def _check_tiling(tiling: Any) -> str:
    mode = str(tiling).strip().lower() if isinstance(tiling, str) else tiling
    if mode is True:
        return "on"
    if mode is False or mode is None:
        return "off"
    if mode not in TILING_MODES:
        raise ValueError(f"tiling must be one of {', '.join(TILING_MODES)}, got {tiling!r}")
    return str(mode)


def iter_segment(
    seg: Segmenter,
    image: Any,
    modality: Any = "auto",
    threshold: float = 0.5,
    *,
    tiling: Tiling | str = "auto",
    tile_scale: float | None = None,
    tile_overlap: int | None = None,
    batch_size: int | None = None,
    nan_policy: str = "raise",
) -> Generator[tuple[int, int], None, SegmentationResult]:
    """Segment one image, whole or tiled; yields ``(tiles done, tiles)`` after each batch of tiles.

    The generator's return value is the :class:`SegmentationResult` (``Segmenter.segment`` runs
    it to the end; the napari widget stops it between batches to cancel). ``tiling``: "auto" (the
    rule, ``AUTO_TILING``), "on" or "off" (whole image, as before tiling existed). ``tile_scale``
    and ``tile_overlap`` default to the modality's policy. A whole-image run yields nothing.
    """
    from .inference import PreparedImage, _check_threshold

    mode = _check_tiling(tiling)
    threshold = _check_threshold(threshold)
    index = seg.resolve_modality(modality)
    if tile_scale is not None and not (math.isfinite(float(tile_scale)) and float(tile_scale) > 0):
        raise ValueError(f"tile_scale must be a positive number, got {tile_scale!r}")
    t0 = time.perf_counter()
    arr, info = prepare_array(image, max_pixels=seg.max_pixels, nan_policy=nan_policy)  # type: ignore[arg-type]
    prep_seconds = time.perf_counter() - t0
    size = seg.config.img_size

    def whole() -> SegmentationResult:
        t = time.perf_counter()
        prepared = PreparedImage(to_model_tensor(arr, size, seg.device), info, prep_seconds)
        prepared.seconds += time.perf_counter() - t
        return seg.segment_prepared([prepared], modality, threshold)[0]

    name = seg.modalities[index] if index is not None else None
    if mode == "off" or (mode == "auto" and name is not None and not auto_tiles(name, info.size, size)):
        return whole()
    first = None
    if name is None:  # "auto": the whole image names the modality, which decides the rule
        first = whole()
        name = first.modality
        if mode == "auto" and not auto_tiles(name, info.size, size):
            return first
        index = seg.config.modality_index(name)
    policy = policy_for(name)
    scale = policy.scale_for(info.size, size) if tile_scale is None else float(tile_scale)
    overlap = policy.overlap if tile_overlap is None else int(tile_overlap)
    stride = size // seg.config.mask_size
    plan = plan_tiles(info.size, size, scale=scale, overlap=overlap, stride=stride)
    return (yield from _run_tiles(seg, arr, info, plan, index, threshold, batch_size, prep_seconds, first, name))


def _run_tiles(
    seg: Segmenter,
    arr: np.ndarray,
    info: PrepInfo,
    plan: TilePlan,
    index: int,
    threshold: float,
    batch_size: int | None,
    prep_seconds: float,
    first: SegmentationResult | None,
    name: str,
) -> Generator[tuple[int, int], None, SegmentationResult]:
    from .inference import PreparedImage, SegmentationResult
    from .model.appearance_head import describe_correction

    t0 = time.perf_counter()
    mod_probs, colour, darkfield = _whole_image_appearance(seg, arr)
    work = _working_image(arr, plan)
    if colour is not None and work.shape[2] == 3:
        work = _recolour(work if work is not arr else work.copy(), colour)
    del arr
    prep_seconds += time.perf_counter() - t0
    step = int(batch_size) if batch_size else DEFAULT_TILE_BATCH.get(seg.device.type, 2)
    if step < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g, m = plan.stride, plan.tile // plan.stride
    grid = (plan.padded[0] // g, plan.padded[1] // g)
    # the streaming state: three float32 maps on the output grid, nothing per tile
    logit_sum = np.zeros(grid, dtype=np.float32)
    heat_sum = np.zeros(grid, dtype=np.float32)
    weight_sum = np.zeros(grid, dtype=np.float32)
    model_seconds = 0.0
    done = 0
    tiles = plan.windows()
    while True:
        chunk = []
        for item in tiles:
            chunk.append(item)
            if len(chunk) == step:
                break
        if not chunk:
            break
        t = time.perf_counter()
        prepared = [
            PreparedImage(to_model_tensor(work[y : y + plan.tile, x : x + plan.tile], plan.tile, seg.device), info)
            for y, x, _ in chunk
        ]
        prep_seconds += time.perf_counter() - t
        out = seg._run(prepared, [index] * len(chunk), run_head=False, darkfield=darkfield)
        model_seconds += out.seconds
        with torch.inference_mode():
            mask_logits = out.mask_logits[:, 0]
            heat = F.interpolate(out.patch_logits.float(), size=(m, m), mode="bilinear", align_corners=False)[:, 0]
            mask_np = mask_logits.float().cpu().numpy()
            heat_np = heat.cpu().numpy()
        for k, (y, x, w) in enumerate(chunk):
            sy, sx = slice(y // g, y // g + m), slice(x // g, x // g + m)
            logit_sum[sy, sx] += w * mask_np[k]
            heat_sum[sy, sx] += w * heat_np[k]
            weight_sum[sy, sx] += w
        del prepared, out, mask_np, heat_np
        done += len(chunk)
        yield done, plan.count

    t = time.perf_counter()
    hg, wg = plan.working[0] // g, plan.working[1] // g
    weights = weight_sum[:hg, :wg]
    logit_map = torch.from_numpy(np.divide(logit_sum[:hg, :wg], weights))
    heat_map = torch.from_numpy(np.divide(heat_sum[:hg, :wg], weights))
    del logit_sum, heat_sum, weight_sum, work
    with torch.inference_mode():
        probability = seg._upsample(logit_map, info.size)
        heatmap = seg._upsample(heat_map, info.size)
    mask = probability > threshold
    post = time.perf_counter() - t
    timings = {
        "preprocess": prep_seconds,
        "model": model_seconds,
        "postprocess": post,
        "total": prep_seconds + model_seconds + post,
        "tiles": float(plan.count),
    }
    tiling = {
        "tiles": plan.count,
        "grid": list(plan.grid),
        "tile": plan.tile,
        "scale": plan.scale,
        "overlap": plan.overlap,
        "working_size": list(plan.working),
    }
    if first is not None:  # modality="auto": keep what the whole-image pass said about the modality
        timings["total"] += first.timings.get("model", 0.0) + first.timings.get("postprocess", 0.0)
        timings["model"] += first.timings.get("model", 0.0)
        return replace(
            first, mask=mask, probability=probability, patch_heatmap=heatmap, timings=timings,
            threshold=threshold, tiling=tiling, refiner=seg.config.refiner_for(name, darkfield),
        )
    probs = None
    if mod_probs is not None and seg.auto_available:
        probs = {n: float(v) for n, v in zip(seg.modalities, mod_probs, strict=True)}
    return SegmentationResult(
        mask=mask,
        probability=probability,
        patch_heatmap=heatmap,
        modality=name,
        modality_probabilities=probs,
        timings=timings,
        threshold=threshold,
        info=info,
        tiling=tiling,
        colour_correction=(
            describe_correction(colour) if colour is not None
            else describe_pseudo_colour(info.pseudo_colour) if info.pseudo_colour is not None else None
        ),
        refiner=seg.config.refiner_for(name, darkfield),
    )
