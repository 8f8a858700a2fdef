"""One positive click per object the prompt-free mask missed entirely, as the refine widget
applies it (binary mode): Dice before and after, with and without the mask already drawn passed
to the first click (``BoxRefiner.segment_clicks(existing=...)``: candidates that would swallow
``CLICK_SWALLOW_MIN`` or more of its regions are passed over).

Objects are the ground truth's connected components (``correction_effort.gt_objects``); a click
goes to the innermost pixel of each one with no predicted pixel; each clicked object is merged into
the mask as the widget merges it (``correction_effort.correct`` inside
``refine.click_object_region``: the box its click used, grown to hold the decoder's mask).

    python benchmarks/click_missed_objects.py --data ../shared/data \\
        --splits benchmarks/protocol/splits-unseen-v1.json --split val --modality microscopy \\
        [--max-per-dataset 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _effort() -> Any:
    """benchmarks/correction_effort.py's functions (its object and merge rules) as a namespace."""
    return SimpleNamespace(**runpy.run_path(str(REPO / "benchmarks" / "correction_effort.py")))


def run_image(fx: Any, seg: Any, refiner: Any, image: np.ndarray, gt: np.ndarray, modality: str) -> dict[str, Any]:
    """Dice of the prompt-free mask and after the clicks, both ways; clicks and seconds."""
    from napari_delightsam.click_simulation import interior_point
    from napari_delightsam.refine import click_object_region
    from napari_delightsam.training.evaluation.metrics import dice_score

    pf = seg.segment(image, modality, 0.5).mask
    lab, objects = fx.gt_objects(gt)
    missed = [p for p in objects if not pf[tuple(p.coords.T)].any()]
    refiner.set_image(image)
    row: dict[str, Any] = {"objects": len(objects), "clicks": len(missed), "dice_before": dice_score(pf, gt)}
    for arm, existing in (("plain", None), ("existing", pf)):
        masks, boxes, seconds = [], [], []
        for p in missed:
            t0 = time.perf_counter()
            mask, _, box = refiner.segment_clicks([interior_point(lab == p.label)], [1], existing=existing)
            seconds.append(time.perf_counter() - t0)
            masks.append(mask)
            boxes.append(click_object_region(box, mask))  # where the widget writes a click-only object
        row[f"dice_{arm}"] = dice_score(fx.correct(pf, masks, boxes), gt)
        row[f"median_region_{arm}"] = float(np.median([m.sum() for m in masks])) if masks else None
        row[f"click_s_{arm}"] = float(np.mean(seconds)) if seconds else None
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--modality", default="microscopy")
    p.add_argument("--max-per-dataset", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from napari_delightsam import load_model, load_refiner
    from napari_delightsam.data import discover, load_pair, load_splits, select
    from napari_delightsam.inference import set_threads

    set_threads(args.threads)
    fx = _effort()
    records = select(discover(args.data, [args.modality]), load_splits(args.splits), args.split, args.max_per_dataset)
    seg, refiner = load_model(device="cpu"), load_refiner("cpu")
    rows = []
    for rec in sorted(records, key=lambda r: (r.key, r.sample_id)):
        image, gt = load_pair(rec)
        row = {"dataset": rec.key, "id": rec.sample_id, **run_image(fx, seg, refiner, image, gt, rec.modality)}
        rows.append(row)
        print(f"{rec.key}/{rec.sample_id}: {row['clicks']} clicks; Dice {100 * row['dice_before']:.1f} -> plain "
              f"{100 * row['dice_plain']:.1f}, with the mask {100 * row['dice_existing']:.1f}", file=sys.stderr)
    summary = {}
    for key in sorted({r["dataset"] for r in rows}):
        part = [r for r in rows if r["dataset"] == key]
        clicked = [r for r in part if r["clicks"]]
        summary[key] = {"images": len(part), "images_clicked": len(clicked), "clicks": int(sum(r["clicks"] for r in part)),
                        **{f"dice_{a}": float(np.mean([r[f"dice_{a}"] for r in part])) for a in ("before", "plain", "existing")}}
    lines = ["| dataset | images (with clicks) | clicks | Dice before | after, plain | after, with the mask |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, s in summary.items():
        lines.append(f"| {key} | {s['images']} ({s['images_clicked']}) | {s['clicks']} | {100 * s['dice_before']:.1f} | "
                     f"{100 * s['dice_plain']:.1f} | {100 * s['dice_existing']:.1f} |")
    print("\n".join(lines))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/click_missed_objects.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.json.write_text(json.dumps({"command": command, "summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
