"""Ablation: does dropping some of the prompt-free mask's connected components help?

    python benchmarks/component_filters.py --data ../shared/data \\
        --splits benchmarks/protocol/splits-unseen-v1.json --split val --out OUT.jsonl [--checkpoint FILE]
    python benchmarks/component_filters.py --summarise OUT.jsonl [MORE.jsonl ...]

For every image of the split: the model's mask (true modality given, threshold 0.5) and its
probability map; then, per rule, the mask keeping only some of its 8-connected components, and
each version's Dice against the ground truth. Rules (``RULES``): ``none``; ``lcc`` (the largest
component); ``topmass`` (the component with the largest probability mass); ``areaF`` /
``massF`` (components with at least F × the largest area / mass); ``maxT`` / ``meanT``
(components whose highest / mean probability reaches T; the best component when none does).
One row per image goes to ``--out`` (JSON lines, written as it goes); ``--summarise`` prints the
mean Dice per modality and rule. A rule is chosen per modality on the val split and then read
on the unseen split; model card, ablation P1.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

AREA_FRACTIONS = (0.1, 0.25, 0.5)
MAX_PROBS = (0.7, 0.8, 0.9)
MEAN_PROBS = (0.6, 0.7)
RULES = (
    ["none", "lcc", "topmass"]
    + [f"{k}{f}" for f in AREA_FRACTIONS for k in ("area", "mass")]
    + [f"max{t}" for t in MAX_PROBS]
    + [f"mean{t}" for t in MEAN_PROBS]
)


def filtered_masks(mask: np.ndarray, prob: np.ndarray) -> dict[str, np.ndarray]:
    """Every rule's version of ``mask`` (H,W bool) given ``prob`` (H,W float)."""
    from skimage.measure import label

    lab = label(mask, connectivity=2)
    n = int(lab.max())
    if n == 0:
        return {rule: mask for rule in RULES}
    flat = lab.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    mass = np.bincount(flat, weights=prob.ravel(), minlength=n + 1)[1:]
    mean = mass / np.maximum(area, 1)
    peak = np.zeros(n)
    np.maximum.at(peak, flat[flat > 0] - 1, prob.ravel()[flat > 0])
    ids = np.arange(1, n + 1)

    def keep(sel: np.ndarray) -> np.ndarray:
        return np.isin(lab, ids[sel])

    def at_least(values: np.ndarray, t: float) -> np.ndarray:
        sel = values >= t
        return sel if sel.any() else values == values.max()

    out = {"none": mask, "lcc": keep(area == area.max()), "topmass": keep(mass == mass.max())}
    for f in AREA_FRACTIONS:
        out[f"area{f}"] = keep(area >= f * area.max())
        out[f"mass{f}"] = keep(mass >= f * mass.max())
    for t in MAX_PROBS:
        out[f"max{t}"] = keep(at_least(peak, t))
    for t in MEAN_PROBS:
        out[f"mean{t}"] = keep(at_least(mean, t))
    return out


def summarise(paths: list[Path]) -> str:
    rows = [json.loads(line) for p in paths for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    by: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        by[r["modality"]].append(r)
    lines = ["| modality | n | " + " | ".join(RULES) + " |", "|---|---:|" + "---:|" * len(RULES)]
    for m, rs in sorted(by.items()):
        cells = [f"{100 * sum(r['dice'][k] for r in rs) / len(rs):.1f}" for k in RULES]
        lines.append(f"| {m} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from per_image_dice import main as run  # benchmarks/ is on sys.path when this runs as a script

    def variants(result: Any) -> dict[str, np.ndarray]:
        return filtered_masks(np.asarray(result.mask, bool), np.asarray(result.probability, np.float32))

    return run(argv, __doc__.split("\n\n")[0], variants, summarise)


if __name__ == "__main__":
    sys.exit(main())
