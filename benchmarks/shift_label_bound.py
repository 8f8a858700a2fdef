"""The best Dice any model can score under the scoreboard's resampling shifts.

"half resolution" and "aspect stretch 1.4" resample the labels with the image (nearest
neighbour), and a label map of vessels or nuclei one or two pixels wide does not survive that:
the resampled labels are no longer the structure the image shows. This scores a *perfect*
prediction -- the stored labels themselves, smoothly resized to the shifted size (antialiased
bilinear, threshold 0.5), as a model that drew the stored labels exactly would be resized --
against the scoreboard's resampled labels, on the scoreboard's images (``appearance_shift.py``'s
selection). A shift's drop on a modality is a model's loss only where this bound stays near 100.
"resolution loss 2×" (image to half size and back, labels untouched) measures the same image
change without the label problem.

    python benchmarks/shift_label_bound.py --data ../shared/data \\
        --splits benchmarks/protocol/splits-unseen-v1.json --split test unseen --max-per-dataset 8 \\
        --json OUT.json

Prints mean Dice % per split, modality and shift.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

RESAMPLING_SHIFTS = ("half resolution", "aspect stretch 1.4")


def perfect_dice(gt: np.ndarray, shifted_labels: np.ndarray) -> float:
    """Dice of ``gt`` (H,W bool) resized smoothly to ``shifted_labels``' shape against them."""
    from napari_delightsam.training.evaluation.metrics import dice_score

    t = torch.from_numpy(gt.astype(np.float32))[None, None]
    soft = F.interpolate(t, size=shifted_labels.shape, mode="bilinear", align_corners=False, antialias=True)[0, 0]
    return dice_score((soft >= 0.5).numpy(), shifted_labels.astype(bool))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--split", nargs="+", default=["test", "unseen"])
    p.add_argument("--max-per-dataset", type=int, default=8)
    p.add_argument("--modalities", nargs="+", default=None)
    p.add_argument("--json", type=Path, help="write per-image and mean Dice here")
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from appearance_shift import choose_records

    from napari_delightsam.data import load_pair
    from napari_delightsam.data.appearance import SHIFTS

    rows: list[dict[str, Any]] = []
    for split in args.split:
        for rec in choose_records(args.data, args.splits, split, args.max_per_dataset, args.modalities):
            image, gt = load_pair(rec)
            image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
            gt = gt > 0
            for name in RESAMPLING_SHIFTS:
                _, labels = SHIFTS[name].apply(image, gt, 0)
                rows.append({"split": split, "modality": rec.modality, "dataset": rec.dataset,
                             "sample_id": rec.sample_id, "shift": name, "dice": perfect_dice(gt, labels)})
    means: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        cells[(r["split"], r["modality"], r["shift"])].append(r["dice"])
    for (split, modality, shift), values in sorted(cells.items()):
        means[split][modality][shift] = float(np.mean(values))
    for split, per in means.items():
        print(f"{split}: perfect prediction's Dice %, " + " / ".join(RESAMPLING_SHIFTS))
        for modality, by_shift in per.items():
            print(f"  {modality:12s} " + " / ".join(f"{100 * by_shift[s]:.1f}" for s in RESAMPLING_SHIFTS))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/shift_label_bound.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.json.write_text(json.dumps({"command": command, "means": means, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
