"""Segmentation metrics as the paper reports them: Dice and Hausdorff distance, in pixels.

Definitions
-----------
* Dice = 2|P∩G| / (|P|+|G|). Both empty -> 1.0 (a correct "nothing here"); exactly one empty
  -> 0.0. Empty cases are counted (``n_empty_pred``, ``n_empty_gt``, ``n_both_empty``).
* Hausdorff distances are between the *boundaries* of P and G (pixels of the mask that touch
  the background with 4-connectivity; the image edge counts as background), Euclidean, in
  pixels of the grid they are computed on:
  - HD   = max of both directed distances (the authors' "maximum HD");
  - HD95 = 95th percentile of the pooled directed distances of both boundaries
    (the MedPy definition).
  HD is undefined when P or G is empty: the value is NaN, the case is left out of the HD
  means and counted in ``n_hd_excluded`` (the authors dropped such cases too).
* Two grids: the image's original size, and the paper's 1024×1024 grid (prediction and
  ground truth each resized there with nearest neighbour) — keys with suffix ``_1024``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "aggregate",
    "boundary",
    "dice_from_counts",
    "dice_score",
    "hausdorff",
    "image_metrics",
    "resize_nearest",
]

_CROSS = ndimage.generate_binary_structure(2, 1)


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2D mask, got shape {m.shape}")
    return m.astype(bool, copy=False)


def dice_from_counts(intersection: int, pred_area: int, gt_area: int) -> float:
    """Dice = 2|P∩G| / (|P|+|G|) from pixel counts; 1.0 when both masks are empty.

    The one Dice definition of the project: ``dice_score`` (numpy masks), the trainer's
    validation (counts taken on the training device) and the benchmarks all end here.
    """
    total = int(pred_area) + int(gt_area)
    if total == 0:
        return 1.0
    return 2.0 * int(intersection) / total


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two (H,W) masks; 1.0 when both are empty."""
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} != gt shape {g.shape}")
    return dice_from_counts(int(np.logical_and(p, g).sum()), int(p.sum()), int(g.sum()))


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (or on the image edge)."""
    m = _as_bool(mask, "mask")
    return m & ~ndimage.binary_erosion(m, structure=_CROSS, border_value=0)


def hausdorff(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(HD, HD95) in pixels between the boundaries of two (H,W) masks; (nan, nan) if either is empty."""
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} != gt shape {g.shape}")
    if not p.any() or not g.any():
        return math.nan, math.nan
    bp, bg = boundary(p), boundary(g)
    # Distances only involve boundary pixels: crop to their joint bounding box (exact, faster).
    rows = np.flatnonzero((bp | bg).any(axis=1))
    cols = np.flatnonzero((bp | bg).any(axis=0))
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    bp, bg = bp[sl], bg[sl]
    d_to_g = ndimage.distance_transform_edt(~bg)[bp]
    d_to_p = ndimage.distance_transform_edt(~bp)[bg]
    both = np.concatenate([d_to_g, d_to_p])
    return float(both.max()), float(np.percentile(both, 95))


def resize_nearest(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H,W) mask to ``size`` (pixel centres sampled)."""
    m = _as_bool(mask, "mask")
    h, w = (size, size) if isinstance(size, int) else size
    rows = np.minimum(((np.arange(h) + 0.5) * m.shape[0] / h).astype(np.int64), m.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * m.shape[1] / w).astype(np.int64), m.shape[1] - 1)
    return m[rows[:, None], cols[None, :]]


def image_metrics(pred: np.ndarray, gt: np.ndarray, grid: int | None = 1024) -> dict[str, float | bool]:
    """Dice/HD/HD95 of one image on its own grid and (if ``grid``) on the grid×grid grid."""
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    hd, hd95 = hausdorff(p, g)
    out: dict[str, float | bool] = {
        "dice": dice_score(p, g),
        "hd": hd,
        "hd95": hd95,
        "pred_empty": not bool(p.any()),
        "gt_empty": not bool(g.any()),
    }
    if grid:
        pr, gr = resize_nearest(p, grid), resize_nearest(g, grid)
        hd_r, hd95_r = hausdorff(pr, gr)
        out.update({"dice_1024": dice_score(pr, gr), "hd_1024": hd_r, "hd95_1024": hd95_r})
    return out


def _mean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over images: Dice over all; HD/HD95 over images where both masks are non-empty.

    Returns ``{"dice", "dice_std", "hd", "hd95", ["dice_1024", "hd_1024", "hd95_1024"], "n",
    "n_hd_excluded", "n_empty_pred", "n_empty_gt", "n_both_empty"}``; a mean with no defined
    value is ``None`` (JSON null).
    """
    n = len(rows)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        return {**out, "dice": None, "hd": None, "hd95": None, "n_hd_excluded": 0}
    dice = [float(r["dice"]) for r in rows]
    out["dice"] = float(np.mean(dice))
    out["dice_std"] = float(np.std(dice))
    out["hd"] = _mean(r["hd"] for r in rows)
    out["hd95"] = _mean(r["hd95"] for r in rows)
    if all("dice_1024" in r for r in rows):
        out["dice_1024"] = float(np.mean([r["dice_1024"] for r in rows]))
        out["hd_1024"] = _mean(r["hd_1024"] for r in rows)
        out["hd95_1024"] = _mean(r["hd95_1024"] for r in rows)
    out["n_hd_excluded"] = sum(1 for r in rows if r["hd"] is None or math.isnan(r["hd"]))
    out["n_empty_pred"] = sum(1 for r in rows if r.get("pred_empty"))
    out["n_empty_gt"] = sum(1 for r in rows if r.get("gt_empty"))
    out["n_both_empty"] = sum(1 for r in rows if r.get("pred_empty") and r.get("gt_empty"))
    return out
