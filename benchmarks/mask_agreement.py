"""Mask agreement between two ways of running De-LightSAM, on real images.

Used for two claims in weights/MODEL_CARD.md and the README:

* storage precision: the bundled fp16-stored checkpoint vs the fp32 checkpoint it came from;
* fast path: bf16 autocast + channels_last vs fp32 eager, same checkpoint.

Example::

    python benchmarks/mask_agreement.py --data ../shared/data \
        --reference runs/default/best.safetensors --reference-precision fp32 \
        --candidate weights/delightsam_default.safetensors --candidate-precision auto \
        --split test --json agreement.json

Prints Dice(candidate mask, reference mask) per modality (mean and minimum over images).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from napari_delightsam.data import discover, load_pair
from napari_delightsam.inference import load_model
from napari_delightsam.training.evaluation.evaluate import resolve_eval_splits, select_records
from napari_delightsam.training.evaluation.metrics import dice_score


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root (<modality>/<dataset>/images|masks)")
    p.add_argument("--reference", required=True, help="checkpoint giving the reference masks")
    p.add_argument("--reference-precision", default="fp32", help="fp32 | bf16 | auto (default fp32)")
    p.add_argument("--candidate", required=True, help="checkpoint giving the compared masks")
    p.add_argument("--candidate-precision", default="auto", help="fp32 | bf16 | auto (default auto = fast path)")
    p.add_argument("--split", default="test", help="test | val | train | all (default test)")
    p.add_argument("--splits", default=None, help="splits.json (default: the reference's run folder or recomputed)")
    p.add_argument("--max-per-dataset", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the per-image figures here")
    args = p.parse_args(argv)

    records = discover(args.data)
    splits, source = resolve_eval_splits(records, args.splits, args.reference, seed=None)
    chosen = records if args.split == "all" else select_records(records, splits, args.split, args.max_per_dataset)
    # an fp32 reference is plain eager mode: no conv-BN folding, no channels_last
    ref_fast = args.reference_precision != "fp32"
    ref = load_model(args.reference, device=args.device, precision=args.reference_precision, fast=ref_fast)
    cand = load_model(args.candidate, device=args.device, precision=args.candidate_precision)
    print(
        f"split: {args.split} ({source}), {len(chosen)} images; reference {ref.fast_path_description()}, "
        f"candidate {cand.fast_path_description()}"
    )

    per_modality: dict[str, list[float]] = defaultdict(list)
    rows = []
    for rec in chosen:
        image, _ = load_pair(rec)
        a = ref.segment(image, modality=rec.modality).mask
        b = cand.segment(image, modality=rec.modality).mask
        d = dice_score(b, a)
        per_modality[rec.modality].append(d)
        rows.append({"key": rec.key, "id": rec.sample_id, "modality": rec.modality, "dice": d})

    print("| modality | n | mean Dice(candidate, reference) | min |")
    print("|---|---:|---:|---:|")
    for modality, values in sorted(per_modality.items()):
        print(f"| {modality} | {len(values)} | {np.mean(values):.4f} | {np.min(values):.4f} |")
    all_values = [r["dice"] for r in rows]
    print(f"| all | {len(all_values)} | {np.mean(all_values):.4f} | {np.min(all_values):.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": args.reference, "candidate": args.candidate,
                                               "reference_precision": ref.precision,
                                               "candidate_precision": cand.precision, "images": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
