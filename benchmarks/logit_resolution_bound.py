"""How much Dice a logit map of a given size can hold at all: the ground truth itself, area-resized
to the decoder's output (the model squashes every image to S×S, so the map covers the whole
image), turned into logits and bilinearly brought back to the image, as the Segmenter does.

No model is involved: this bounds what any decoder of that output size can draw with a
bilinear upsampling (a learned map can beat it a little by placing its zero crossings better).
It is the measured reason for ``ModelConfig.mask_stride = 2`` (``model/detail.py``).

Example::

    python benchmarks/logit_resolution_bound.py --data ../shared/data --modalities fundus microscopy \
        --sizes 128 256 --json bound.json

Prints the mean Dice per dataset and logit-map size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_delightsam.data import discover, load_pair
from napari_delightsam.training.evaluation.metrics import dice_score


def bound_dice(mask: np.ndarray, size: int) -> float:
    """Dice of ``mask`` (H,W bool) after area-resizing to (size, size) and back through logits."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    low = F.interpolate(t, size=(size, size), mode="area")
    logits = torch.logit(low.clamp(1e-3, 1 - 1e-3))
    up = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
    return dice_score((up > 0).numpy(), mask)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root (<modality>/<dataset>/images|masks)")
    p.add_argument("--modalities", nargs="*", default=None, help="only these modalities (default: all)")
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 256], help="logit-map sides (default 128 256)")
    p.add_argument("--json", default=None, help="write the per-dataset figures here")
    args = p.parse_args(argv)
    if any(s < 1 for s in args.sizes):
        p.error("--sizes must be positive")
    records = [r for r in discover(args.data) if not args.modalities or r.modality in args.modalities]
    if not records:
        p.error(f"no datasets of {args.modalities} under {args.data}")
    per: dict[str, dict[int, list[float]]] = {}
    for rec in records:
        _, mask = load_pair(rec)
        for size in args.sizes:
            per.setdefault(rec.key, {}).setdefault(size, []).append(bound_dice(mask > 0, size))
    print("| dataset | n | " + " | ".join(f"{s}² logits" for s in args.sizes) + " |")
    print("|---|---:|" + "---:|" * len(args.sizes))
    table = {}
    for key, by_size in sorted(per.items()):
        means = {s: 100 * float(np.mean(v)) for s, v in by_size.items()}
        table[key] = {"n": len(by_size[args.sizes[0]]), **{str(s): m for s, m in means.items()}}
        print(f"| {key} | {table[key]['n']} | " + " | ".join(f"{means[s]:.1f}" for s in args.sizes) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": args.data, "sizes": args.sizes, "datasets": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
