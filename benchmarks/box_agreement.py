"""Agreement of the box refiner's fast path with plain fp32 eager LiteMedSAM, on real images.

    python benchmarks/box_agreement.py --data ../shared/data [--split test] [--max-per-dataset 5] \\
        [--boxes-per-image 5] [--bf16-max-per-dataset 1] [--decoder tuned|litemedsam|FILE] [--json OUT.json]

Reference: ``refine.BoxRefiner(build_litemedsam(), fast=False)`` with the same mask decoder as
the candidates (``--decoder``: the bundled tuned one by default) -- fp32, eager, no conv-BN
folding, contiguous memory (what ``baselines`` scores). Candidates: ``load_refiner()`` (the
default fast path on this machine: conv-BN folded + channels_last encoder + inference_mode, and
bf16 autocast where the CPU/GPU computes bf16 natively) and, with ``--bf16-max-per-dataset``,
the same with bf16 forced (emulated and slow where bf16 is not native: it shows what a bf16
machine would compute). Boxes: the ground truth's components (``baselines.component_boxes``,
largest first, at most ``--boxes-per-image``). Reported per modality: Dice(candidate mask,
reference mask) over boxes (mean, minimum), the fraction of pixels that differ, and the
median embedding time of each path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from napari_delightsam.benchmarking.baselines import component_boxes
    from napari_delightsam.data import discover, load_pair, make_splits, select
    from napari_delightsam.model.litemedsam import build_litemedsam, load_box_decoder
    from napari_delightsam.refine import BoxRefiner, load_refiner
    from napari_delightsam.training.evaluation.metrics import dice_score

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-per-dataset", type=int, default=5)
    p.add_argument("--boxes-per-image", type=int, default=5)
    p.add_argument("--bf16-max-per-dataset", type=int, default=0, help="also bf16 forced on N images per dataset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--decoder", default="tuned",
                   help="tuned (default, the bundled decoder) | litemedsam | a decoder file; the reference uses the same")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    records = discover(args.data)
    chosen = select(records, make_splits(records, seed=args.seed), args.split, args.max_per_dataset)
    paths: dict[str, Any] = {"fast": load_refiner(args.device, decoder=args.decoder)}
    reference_net = build_litemedsam()
    if paths["fast"].weights.get("decoder_file"):
        load_box_decoder(paths["fast"].weights["decoder_file"], reference_net)
    reference = BoxRefiner(reference_net, args.device, fast=False)
    if args.bf16_max_per_dataset:
        paths["bf16"] = load_refiner(args.device, precision="bf16", decoder=args.decoder)
    described = {"reference": reference.fast_path_description(), **{k: v.fast_path_description() for k, v in paths.items()}}
    print(f"{len(chosen)} images; " + "; ".join(f"{k}: {v}" for k, v in described.items()), file=sys.stderr)

    rows: list[dict[str, Any]] = []
    bf16_done: dict[str, int] = defaultdict(int)
    for n, rec in enumerate(chosen, 1):
        image, gt = load_pair(rec)
        boxes = component_boxes(gt, max_boxes=args.boxes_per_image).boxes
        t0 = time.perf_counter()
        reference.set_image(image)
        row: dict[str, Any] = {"key": rec.key, "modality": rec.modality, "id": rec.sample_id,
                               "boxes": len(boxes), "embed_s": {"reference": time.perf_counter() - t0}}
        ref_masks = reference.segment_boxes(boxes)
        for name, refiner in paths.items():
            if name == "bf16":
                if bf16_done[rec.key] >= args.bf16_max_per_dataset:
                    continue
                bf16_done[rec.key] += 1
            t0 = time.perf_counter()
            refiner.set_image(image)
            row["embed_s"][name] = time.perf_counter() - t0
            masks = refiner.segment_boxes(boxes)
            row[f"dice_{name}"] = [dice_score(a, b) for a, b in zip(masks, ref_masks, strict=True)]
            row[f"differ_{name}"] = float(np.mean(masks != ref_masks)) if len(boxes) else 0.0
        rows.append(row)
        print(f"[{n}/{len(chosen)}] {rec.key}/{rec.sample_id}: "
              + ", ".join(f"{k} min Dice {min(row[f'dice_{k}']):.4f}" for k in paths if f"dice_{k}" in row and row[f"dice_{k}"]),
              file=sys.stderr, flush=True)

    summary: dict[str, Any] = {}
    for name in paths:
        by_mod: dict[str, list[float]] = defaultdict(list)
        differ: dict[str, list[float]] = defaultdict(list)
        embed: dict[str, list[float]] = defaultdict(list)
        ref_embed: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if f"dice_{name}" not in r:
                continue
            for group in (r["modality"], "all"):
                by_mod[group] += r[f"dice_{name}"]
                differ[group].append(r[f"differ_{name}"])
                embed[group].append(r["embed_s"][name])
                ref_embed[group].append(r["embed_s"]["reference"])
        summary[name] = {
            g: {
                "boxes": len(v),
                "dice_mean": float(np.mean(v)) if v else None,
                "dice_min": float(np.min(v)) if v else None,
                "pixels_differing": float(np.mean(differ[g])),
                "embed_s_median": float(np.median(embed[g])),
                "reference_embed_s_median": float(np.median(ref_embed[g])),
            }
            for g, v in sorted(by_mod.items())
        }
    print(f"\nreference: {described['reference']}")
    for name, groups in summary.items():
        print(f"\n{name}: {described[name]}")
        print("| modality | boxes | Dice mean | Dice min | pixels differing | embed s (median) | reference embed s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for g, s in groups.items():
            print(f"| {g} | {s['boxes']} | {s['dice_mean']:.4f} | {s['dice_min']:.4f} | {100 * s['pixels_differing']:.3f} % "
                  f"| {s['embed_s_median']:.2f} | {s['reference_embed_s_median']:.2f} |")
    if args.json:
        info = {"argv": argv if argv is not None else sys.argv[1:], "paths": described,
                "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"info": info, "summary": summary, "images": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
