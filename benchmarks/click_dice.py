"""Dice after 1, 3 and 5 simulated clicks against one box, per object, with the refine widget's
refiner (LiteMedSAM, the tuned decoder, its fast path) on real images.

    python benchmarks/click_dice.py --data ../shared/data --splits benchmarks/protocol/splits-unseen-v1.json \\
        [--split test unseen] [--modalities colonoscopy dermoscopy ultrasound xray] [--max-per-dataset 8] \\
        [--clicks 5] [--click-box moved-or-mask|moved|kept] [--box-sizes F ...] [--after-box 0.1] \\
        [--threads 2] [--json OUT.json] [--md OUT.md]

Each object is a connected component of the ground truth (at least ``--min-object`` of the image;
lungs are two objects). For each one, after the image's embedding:

* **one box**: ``segment_box`` with the object's tight bounding box (what Box costs a user);
* **clicks**, the simulated user of the interactive-segmentation literature: the first click is
  positive, at the object's interior point farthest from its boundary; each further click goes to
  the interior point (farthest from its border) of the largest error region of the current mask
  -- positive if the region is missed object, negative if it is false background. The clicks go
  through ``BoxRefiner.segment_clicks`` exactly as the widget sends them: the first without a
  box (the candidate boxes around it), the next ones with two candidates, the box the previous
  click used moved by the clicks and the extent of the previous mask (``refine.next_click_boxes``;
  ``--click-box moved``: the moved box alone, the rule before).

``--after-box JITTER``: a user who drags a box first (the object's tight box, each side moved by
up to JITTER of its length, seeded per object) and then clicks the same way; the clicks go with
the drawn box as the widget sends them (the box moved by the clicks and the extent of the mask
the box or the last click wrote; ``--after-box-rule moved``: the moved box alone), and each mask
is written inside the drawn box and the box the clicks used. "one box" is then that rough box.

Dice is the object's own (its mask against its component). Reported per modality and split:
mean Dice of one box and after 1..N clicks, the share of objects where one click reaches 90 % of
the box's Dice, and the median seconds of a first and of a further click. A negative click whose
candidate box moved away from the object can make a mask worse: that is what a user would see.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import runpy
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from napari_delightsam.click_simulation import CLICK_MODALITIES as LESIONS
from napari_delightsam.click_simulation import next_click


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def object_masks(gt: np.ndarray, min_fraction: float) -> list[np.ndarray]:
    from skimage.measure import label as connected

    comps = connected(gt, connectivity=2)
    sizes = np.bincount(comps.ravel())[1:]
    keep = [k + 1 for k in np.argsort(-sizes) if sizes[k] >= max(16, min_fraction * gt.size)]
    return [comps == k for k in keep]


def kept_box(chosen: Any, points: Any, signs: Any) -> np.ndarray | None:
    """The rule before clicks moved the box (``--click-box kept``): the box the clicks last used
    while every positive click lies inside it, else None (the candidates are tried again)."""
    if chosen is None:
        return None
    pts, lab = np.asarray(points, dtype=np.float64), np.asarray(signs)
    pos = pts[lab == 1]
    x0, y0, x1, y1 = chosen
    inside = (pos[:, 0] >= x0) & (pos[:, 0] <= x1) & (pos[:, 1] >= y0) & (pos[:, 1] <= y1)
    return np.asarray(chosen) if bool(inside.all()) else None


def run_object(refiner: Any, target: np.ndarray, n_clicks: int, rule: str = "moved-or-mask",
               clip_to_box: bool = False) -> dict[str, Any]:
    from napari_delightsam.refine import mask_extent, mask_inside_box, next_click_box, next_click_boxes

    box_mask = refiner.segment_box(mask_extent(target))
    points: list[tuple[float, float]] = []
    signs: list[int] = []
    chosen = None
    mask = np.zeros_like(target)
    dices: list[float] = []
    seconds: list[float] = []
    for _ in range(n_clicks):
        click = next_click(mask, target)
        if click is None:  # exact: further clicks change nothing
            dices.append(dices[-1])
            continue
        points.append(click[0])
        signs.append(click[1])
        if not any(signs):  # a negative click before any positive one: the simulator never does this
            raise AssertionError("first simulated click must be positive")
        if rule == "kept":
            prompt_box = kept_box(chosen, points, signs)
        elif rule == "moved":
            prompt_box = next_click_box(chosen, points, signs)
        else:  # the widget's: the moved box and the last mask's extent, the decoder keeps one
            prompt_box = next_click_boxes(chosen, mask if chosen is not None else None, points, signs)
        t0 = time.perf_counter()
        mask, _, used = refiner.segment_clicks(np.asarray(points), np.asarray(signs), prompt_box)
        seconds.append(time.perf_counter() - t0)
        mask = np.asarray(mask, dtype=bool)
        if clip_to_box:  # as the widget wrote a click-only object before: inside the box its click used
            mask = mask_inside_box(mask, used)
        chosen = used  # as the widget keeps it: the box this click used
        dices.append(dice(mask, target))
    return {"box": dice(np.asarray(box_mask, dtype=bool), target), "clicks": dices, "click_s": seconds,
            "pixels": int(target.sum())}


def jittered_box(target: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """The object's tight box with each coordinate moved by U(-f, f) × its side, clipped: the rough
    box a user drags, by ``correction_effort.py``'s own rule (``jittered_box``)."""
    from skimage.measure import regionprops

    return _correction_effort()["jittered_box"](regionprops(target.astype(np.uint8))[0], target.shape, fraction, rng)


@functools.cache
def _correction_effort() -> dict[str, Any]:
    """benchmarks/correction_effort.py's functions, loaded once."""
    return runpy.run_path(str(Path(__file__).resolve().parent / "correction_effort.py"))


def run_after_box(refiner: Any, target: np.ndarray, n_clicks: int, jitter: float, rng: np.random.Generator,
                  rule: str = "moved-or-mask") -> dict[str, Any]:
    """A user who drags a box first (the tight box jittered by up to ``jitter`` of its sides), then
    clicks the largest error region ``n_clicks`` times, the clicks sent as the widget sends clicks
    that follow a drawn box. ``rule`` ``moved``: the drawn box moved by the clicks, one prompt;
    ``moved-or-mask``: that box and the extent of the object's last mask moved the same way
    (``refine.next_click_boxes``; the regions holding a positive click, else its largest region),
    the decoder keeps one. Each mask is written as the widget writes it: inside the drawn box and
    the box the clicks used."""
    from napari_delightsam.refine import mask_inside_box as inside
    from napari_delightsam.refine import next_click_box, next_click_boxes

    drawn = jittered_box(target, jitter, rng)
    mask = inside(np.asarray(refiner.segment_box(drawn), dtype=bool), drawn)
    box_dice = dice(mask, target)
    points: list[tuple[float, float]] = []
    signs: list[int] = []
    dices: list[float] = []
    seconds: list[float] = []
    for _ in range(n_clicks):
        click = next_click(mask, target)
        if click is None:
            dices.append(dices[-1] if dices else box_dice)
            continue
        points.append(click[0])
        signs.append(click[1])
        if rule == "moved":
            prompt = next_click_box(drawn, points, signs)
        else:
            prompt = next_click_boxes(drawn, mask, points, signs, largest_region_without_positive=True)
        t0 = time.perf_counter()
        obj, _, used = refiner.segment_clicks(np.asarray(points), np.asarray(signs), prompt)
        seconds.append(time.perf_counter() - t0)
        region = np.concatenate([np.minimum(used[:2], drawn[:2]), np.maximum(used[2:], drawn[2:])])
        mask = inside(np.asarray(obj, dtype=bool), region)
        dices.append(dice(mask, target))
    return {"box": box_dice, "clicks": dices, "click_s": seconds, "pixels": int(target.sum()),
            "drawn_box": [round(float(v), 2) for v in drawn]}


def summarise(rows: list[dict[str, Any]], n_clicks: int) -> dict[str, Any]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["split"], r["modality"])].append(r)
    out: dict[str, Any] = {}
    for (split, modality), objs in sorted(groups.items()):
        box = float(np.mean([o["box"] for o in objs]))
        after = [float(np.mean([o["clicks"][k] for o in objs])) for k in range(n_clicks)]
        first = [o["click_s"][0] for o in objs if o["click_s"]]
        further = [s for o in objs for s in o["click_s"][1:]]
        out.setdefault(split, {})[modality] = {
            "objects": len(objs),
            "images": len({(o["key"], o.get("id")) for o in objs}),
            "box": box,
            "clicks": after,
            "one_click_reaches_90pct_of_box": float(np.mean([o["clicks"][0] >= 0.9 * o["box"] for o in objs])),
            "first_click_median_s": float(np.median(first)) if first else None,
            "further_click_median_s": float(np.median(further)) if further else None,
        }
    return out


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(summary: dict[str, Any], n_clicks: int, command: str, after_box: float | None = None,
             after_box_rule: str = "moved-or-mask") -> str:
    shown = [k for k in (1, 3, 5) if k <= n_clicks]
    lines = ["# Clicks against one box (refine widget's refiner)", "",
             "Dice % per object (a connected component of the ground truth), mean over the objects.", ""]
    if after_box is not None:
        lines += [f"Box, then clicks: 'one box' is a box dragged around the object (its tight box, each side "
                  f"moved by up to {100 * after_box:.0f} % of its length), the clicks follow it "
                  f"(rule: {after_box_rule}).", ""]
    for split, mods in summary.items():
        lines += [f"## {split}", "",
                  "| modality | images / objects | one box | " + " | ".join(f"{k} click{'s' if k > 1 else ''}"
                                                                        for k in shown)
                  + " | 1 click / box | 1 click ≥ 90 % of box | first / further click s |",
                  "|---|---:|---:|" + "---:|" * len(shown) + "---:|---:|---:|"]
        for mod, s in mods.items():
            clicks = " | ".join(f"{100 * s['clicks'][k - 1]:.1f}" for k in shown)
            ratio = s["clicks"][0] / s["box"] if s["box"] else float("nan")
            lines.append(
                f"| {mod} | {s['images']} / {s['objects']} | {100 * s['box']:.1f} | {clicks} | {100 * ratio:.0f} % "
                f"| {100 * s['one_click_reaches_90pct_of_box']:.0f} % "
                f"| {_seconds(s['first_click_median_s'])} / {_seconds(s['further_click_median_s'])} |"
            )
        lines.append("")
    lines += [f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--splits", required=True, type=Path, help="a splits.json (the protocol's)")
    p.add_argument("--split", nargs="+", default=["test", "unseen"])
    p.add_argument("--modalities", nargs="+", default=list(LESIONS))
    p.add_argument("--max-per-dataset", type=int, default=8)
    p.add_argument("--min-object", type=float, default=0.002, help="smallest object, fraction of the image")
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--click-box", choices=("moved-or-mask", "moved", "kept"), default="moved-or-mask",
                   help="moved-or-mask: the widget's rule, the box the last click used moved by the clicks and the "
                        "last mask's extent, the decoder keeps one (refine.next_click_boxes); moved: the moved box "
                        "alone (refine.next_click_box, the rule before); kept: the first click's box is kept while "
                        "the positive clicks lie inside it, else the candidates again")
    p.add_argument("--clip-to-box", action="store_true",
                   help="clip each click's mask to the box it used (how the widget wrote click-only objects "
                        "before refine.click_object_region; the simulated user sees the clipped mask)")
    p.add_argument("--box-sizes", type=float, nargs="+",
                   help="a first click's candidate box sizes instead of refine.CLICK_BOX_SIZES (an ablation)")
    p.add_argument("--after-box", type=float, metavar="JITTER",
                   help="a user who drags a box first (the tight box, each side moved by up to JITTER of its "
                        "length, seeded per object), then clicks: 'box' is that box's Dice, the clicks follow it")
    p.add_argument("--after-box-rule", choices=("moved-or-mask", "moved"), default="moved-or-mask",
                   help="with --after-box: the clicks go with the drawn box moved by them and the last mask's "
                        "extent, the decoder keeps one (moved-or-mask, the widget's rule), or with the moved box "
                        "alone (moved, the rule before)")
    p.add_argument("--box-aspects", type=float, nargs="*",
                   help="a first click's elongated candidates (width / height) instead of refine.CLICK_BOX_ASPECTS; "
                        "none: squares only (an ablation)")
    p.add_argument("--aspect-min-size", type=float,
                   help="the smallest candidate size that also gets elongated boxes, instead of "
                        "refine.CLICK_ASPECT_MIN_SIZE (an ablation)")
    p.add_argument("--decoder", default="tuned", help="the refiner's decoder: tuned | litemedsam | a decoder file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path)
    args = p.parse_args(argv)
    if args.clicks < 1:
        p.error("--clicks must be at least 1")
    import torch

    torch.set_num_threads(args.threads)
    from napari_delightsam import refine
    from napari_delightsam.data import discover, load_pair, load_splits, select
    from napari_delightsam.refine import load_refiner

    if args.box_sizes:
        refine.CLICK_BOX_SIZES = tuple(args.box_sizes)
    if args.box_aspects is not None:
        refine.CLICK_BOX_ASPECTS = tuple(args.box_aspects)
    if args.aspect_min_size is not None:
        refine.CLICK_ASPECT_MIN_SIZE = args.aspect_min_size

    records = [r for r in discover(args.data) if r.modality in args.modalities]
    splits = load_splits(args.splits)
    refiner = load_refiner("cpu", decoder=args.decoder)
    rows: list[dict[str, Any]] = []
    for split in args.split:
        chosen = select(records, splits, split, args.max_per_dataset)
        print(f"{split}: {len(chosen)} images", file=sys.stderr)
        for rec in chosen:
            image, gt = load_pair(rec)
            refiner.set_image(image)
            for k, target in enumerate(object_masks(gt, args.min_object)):
                if args.after_box is not None:
                    seed = zlib.crc32(f"{rec.key}/{rec.sample_id}/{k}".encode())
                    row = run_after_box(refiner, target, args.clicks, args.after_box, np.random.default_rng(seed),
                                        args.after_box_rule)
                else:
                    row = run_object(refiner, target, args.clicks, args.click_box, args.clip_to_box)
                rows.append({"split": split, "modality": rec.modality, "key": rec.key, "id": rec.sample_id, **row})
    summary = summarise(rows, args.clicks)
    command = "python benchmarks/click_dice.py " + " ".join(
        a if not os.path.isabs(a) else os.path.relpath(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    weights = {k: (Path(str(v)).name if k in ("file", "decoder_file") and v else v)  # no machine paths
               for k, v in getattr(refiner, "weights", {}).items()}
    result = {"refiner": refiner.fast_path_description(), "weights": weights,
              "threads": args.threads, "clicks": args.clicks, "click_box": args.click_box,
              "clip_to_box": args.clip_to_box, "after_box": args.after_box, "after_box_rule": args.after_box_rule,
              "box_sizes": list(refine.CLICK_BOX_SIZES), "box_aspects": list(refine.CLICK_BOX_ASPECTS),
              "aspect_min_size": refine.CLICK_ASPECT_MIN_SIZE, "first_click_prompts": refine.first_click_prompts(),
              "summary": summary, "objects": rows,
              "command": command}
    text = markdown(summary, args.clicks, command, args.after_box, args.after_box_rule)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
