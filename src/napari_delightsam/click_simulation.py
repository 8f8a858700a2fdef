"""The simulated user of the interactive-segmentation literature: where the next click goes.

The first click is positive, at the object's interior point farthest from its boundary; each
further click goes to the interior point of the largest error region of the current mask --
positive if the region is missed object, negative if it is false background. The click benchmark
(``benchmarks/click_dice.py``), the annotate-loop benchmark and the decoder's click tuning
(``training/stages/click_tuning.py``) all click by these rules.

Coordinates are (x, y) pixel edges: a click on the pixel at row r, column c is ``(c + 0.5, r + 0.5)``
-- what ``refine.BoxRefiner.segment_clicks`` takes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLICK_MODALITIES", "interior_point", "next_click", "random_interior_point"]

#: modalities whose objects a user points at with clicks (lesions, polyps, lungs); vessel trees
#: and fields of nuclei are corrected with brushes, boxes and Refine all
CLICK_MODALITIES = ("colonoscopy", "dermoscopy", "ultrasound", "xray")


def _border_distance(region: np.ndarray) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(np.pad(np.asarray(region, dtype=bool), 1))[1:-1, 1:-1]


def interior_point(region: np.ndarray) -> tuple[float, float]:
    """(x, y) pixel-centre coordinates of the pixel of ``region`` farthest from its border."""
    dist = _border_distance(region)
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(c) + 0.5, float(r) + 0.5


def random_interior_point(region: np.ndarray, rng: np.random.Generator, depth: float = 0.5) -> tuple[float, float]:
    """(x, y) of a pixel of ``region`` drawn at random among those at least ``depth`` × the
    largest border distance inside it: a user's click near, not exactly at, the middle."""
    dist = _border_distance(region)
    if not dist.any():
        raise ValueError("the region is empty")
    rows, cols = np.nonzero(dist >= depth * dist.max())
    k = int(rng.integers(0, len(rows)))
    return float(cols[k]) + 0.5, float(rows[k]) + 0.5


def next_click(mask: np.ndarray, target: np.ndarray) -> tuple[tuple[float, float], int] | None:
    """The simulated user's next click: the largest error region's interior point; 1 for a missed
    part of the object, 0 for a false one; None when the mask is exact."""
    from skimage.measure import label as connected

    mask, target = np.asarray(mask, dtype=bool), np.asarray(target, dtype=bool)
    best: tuple[int, np.ndarray, int] | None = None
    for error, sign in ((target & ~mask, 1), (mask & ~target, 0)):
        if not error.any():
            continue
        comps = connected(error, connectivity=1)
        sizes = np.bincount(comps.ravel())[1:]
        k = int(np.argmax(sizes)) + 1
        if best is None or sizes[k - 1] > best[0]:
            best = (int(sizes[k - 1]), comps == k, sign)
    if best is None:
        return None
    return interior_point(best[1]), best[2]
