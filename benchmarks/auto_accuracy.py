"""`auto`'s decisions on whole splits, fast: the appearance head alone (stage 0 + head, no
segmentation), per image and view, with the colour correction it applies.

    python benchmarks/auto_accuracy.py --data ../shared/data --splits benchmarks/protocol/splits-unseen-v1.json \\
        --split test unseen [--checkpoint FILE] [--views "as stored" "BGR channel order" ...] --out OUT.json

For every image of the splits and every view (``data.appearance.SHIFTS`` names; colour-only
views on colour modalities only), the Segmenter's own decision path (``decide_modality``:
preprocessing, stage 0, the head's correction, the calibrated probabilities, the model's
threshold) gives the modality, its confidence and whether ``auto`` asks; the correction is read
from ``stage0``'s colour matrix. Reported per split and view: right %, asks %, wrong and not
asked %, colours changed % (as stored, every change is a false one), and for BGR views the
share of colour images put back to RGB; per dataset: right %.
A tenth of the scoreboard's time (``benchmarks/appearance_shift.py`` segments every view twice),
so a head can be checked on every image before the scoreboard is run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_VIEWS = ("as stored", "BGR channel order", "hue +25°", "hue -25°", "greyscale")


def _is_reorder_to_rgb(matrix: np.ndarray) -> bool:
    """True when a (3,3) colour matrix is the BGR -> RGB swap."""
    return bool(np.allclose(matrix, np.eye(3)[::-1], atol=1e-3))


def decide(seg: Any, image: np.ndarray) -> dict[str, Any]:
    """``auto``'s decision for one image and whether the head put BGR channels back."""
    import torch

    decision = seg.decide_modality([image])
    with torch.inference_mode():
        x = seg.prepare(image).tensor.contiguous(memory_format=seg.memory_format)
        _, _, _, mats = seg.model.stage0(x)
    matrix = None if mats is None else mats[0].float().cpu().numpy()
    return {"modality_picked": decision.modality, "confidence": decision.confidence,
            "runner_up": decision.runner_up, "asks": decision.asks,
            "colour_changed": matrix is not None and not np.allclose(matrix, np.eye(3), atol=1e-3),
            "bgr_fixed": matrix is not None and _is_reorder_to_rgb(matrix)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in sorted({r["split"] for r in rows}):
        views: dict[str, Any] = {}
        for view in dict.fromkeys(r["view"] for r in rows if r["split"] == split):
            cells = [r for r in rows if r["split"] == split and r["view"] == view]
            right = [r["modality_picked"] == r["modality"] for r in cells]
            by_dataset: dict[str, list[bool]] = defaultdict(list)
            for r, ok in zip(cells, right, strict=True):
                by_dataset[r["key"]].append(ok)
            entry = {
                "n_images": len(cells),
                "right": float(np.mean(right)),
                "asks": float(np.mean([r["asks"] for r in cells])),
                "wrong_unasked": float(np.mean([(not ok) and not r["asks"] for r, ok in zip(cells, right, strict=True)])),
                "right_by_dataset": {k: float(np.mean(v)) for k, v in sorted(by_dataset.items())},
                "colour_changed": float(np.mean([r["colour_changed"] for r in cells])),
            }
            if view == "BGR channel order":
                entry["bgr_put_back"] = float(np.mean([r["bgr_fixed"] for r in cells]))
            views[view] = entry
        out[split] = views
    return out


def report(summary: dict[str, Any]) -> str:
    lines = []
    for split, views in summary.items():
        lines += [f"## {split}", "",
                  "| view | n | right % | asks % | wrong, not asked % | colours changed % | BGR put back % (of all images) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for view, e in views.items():
            back = f"{100 * e['bgr_put_back']:.1f}" if "bgr_put_back" in e else ""
            lines.append(f"| {view} | {e['n_images']} | {100 * e['right']:.1f} | {100 * e['asks']:.1f} | "
                         f"{100 * e['wrong_unasked']:.1f} | {100 * e['colour_changed']:.1f} | {back} |")
        lines.append("")
        first = next(iter(views.values()))["right_by_dataset"]
        lines += ["| right % by dataset | " + " | ".join(views) + " |", "|---|" + "---:|" * len(views)]
        for key in first:
            cells = [views[v]["right_by_dataset"].get(key) for v in views]
            lines.append(f"| {key} | " + " | ".join("–" if c is None else f"{100 * c:.0f}" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--split", nargs="+", default=["unseen"])
    p.add_argument("--checkpoint", default=None, help="model file (default: the bundled model)")
    p.add_argument("--views", nargs="+", default=list(DEFAULT_VIEWS), help="names from data.appearance.SHIFTS")
    p.add_argument("--max-per-dataset", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="results JSON (a .md report is written beside it)")
    args = p.parse_args(argv)

    from napari_delightsam.atomic_files import atomic_write
    from napari_delightsam.data import discover, load_splits, select
    from napari_delightsam.data.appearance import SHIFTS
    from napari_delightsam.image_files import read_image
    from napari_delightsam.inference import load_model, set_threads

    unknown = [v for v in args.views if v not in SHIFTS]
    if unknown:
        p.error(f"unknown views {unknown}; choose from {list(SHIFTS)}")
    if args.out.exists():
        p.error(f"{args.out} exists; choose another --out")
    set_threads(args.threads)
    seg = load_model(args.checkpoint, device="cpu")
    records = discover(args.data, None)
    splits = load_splits(args.splits)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for split in args.split:
        for rec in select(records, splits, split, args.max_per_dataset):
            image = read_image(rec.image_path)
            image = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
            for view in args.views:
                shift = SHIFTS[view]
                if not shift.applies_to(rec.modality):
                    continue
                shifted, _ = shift.apply(image, None, 0)
                rows.append({"split": split, "key": f"{rec.modality}/{rec.dataset}", "id": rec.sample_id,
                             "modality": rec.modality, "view": view, **decide(seg, shifted)})
        print(f"{split}: {sum(r['split'] == split for r in rows)} decisions ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
    summary = summarise(rows)
    command = " ".join(["python", "benchmarks/auto_accuracy.py", *(argv if argv is not None else sys.argv[1:])])
    data = {"command": command, "checkpoint": args.checkpoint or "bundled",
            "threshold": seg.auto_confidence_threshold, "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(data, indent=1), encoding="utf-8"))
    text = f"# `auto` decisions (appearance head only)\n\nModel: `{data['checkpoint']}`; asks below {data['threshold']:.2f}.\n\n"
    text += report(summary) + f"\nCommand: `{command}`\n"
    atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(report(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
