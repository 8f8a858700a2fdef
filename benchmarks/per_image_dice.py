"""The command line both post-processing ablations share (``component_filters.py``,
``threshold_sweep.py``): run the model over a split, write one row of Dice per variant and image.

    python benchmarks/<script>.py --data DIR --splits FILE --split val --out OUT.jsonl [--checkpoint FILE]
    python benchmarks/<script>.py --summarise FILE [FILE ...]

Each row: ``{"key", "modality", "id", "dice": {variant: Dice}}``; ``variants(result)`` maps the
``Segmenter``'s result (true modality given, threshold 0.5) to ``{variant: (H,W) bool mask}``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def main(
    argv: list[str] | None,
    description: str,
    variants: Callable[[Any], dict[str, np.ndarray]],
    summarise: Callable[[list[Path]], str],
) -> int:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path)
    p.add_argument("--splits", type=Path)
    p.add_argument("--split", default="val")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--out", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--summarise", type=Path, nargs="+")
    args = p.parse_args(argv)
    if args.summarise:
        print(summarise(args.summarise), end="")
        return 0
    if args.data is None or args.splits is None or args.out is None:
        p.error("--data, --splits and --out are needed (or --summarise FILES)")
    from napari_delightsam.data import discover, load_pair, load_splits, select
    from napari_delightsam.inference import load_model, set_threads
    from napari_delightsam.training.evaluation.metrics import dice_score

    set_threads(args.threads)
    chosen = select(discover(args.data, None), load_splits(args.splits), args.split, None)
    seg = load_model(args.checkpoint, "cpu")
    with open(args.out, "w", encoding="utf-8") as stream:
        for rec in chosen:
            image, gt = load_pair(rec)
            masks = variants(seg.segment(image, modality=rec.modality))
            row = {"key": rec.key, "modality": rec.modality, "id": rec.sample_id,
                   "dice": {k: dice_score(v, gt) for k, v in masks.items()}}
            stream.write(json.dumps(row) + "\n")
            stream.flush()
    print(summarise([args.out]), end="")
    return 0
