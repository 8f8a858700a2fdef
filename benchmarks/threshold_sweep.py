"""Ablation: the mask threshold per modality, chosen on the validation split.

    python benchmarks/threshold_sweep.py --data ../shared/data \\
        --splits benchmarks/protocol/splits-unseen-v1.json --split val --out OUT.jsonl [--checkpoint FILE]
    python benchmarks/threshold_sweep.py --summarise VAL.jsonl [UNSEEN.jsonl]

For every image of the split: the model's probability map (true modality given) and the Dice of
``probability > t`` for each t in ``THRESHOLDS``. One row per image to ``--out`` (JSON lines);
``--summarise`` prints the mean Dice per modality and threshold, and with a second file the
threshold each modality's first file (val) picks, read on the second (unseen). Model card,
ablation P2.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLDS = (0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)


def _means(path: Path) -> dict[str, dict[str, float]]:
    by: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            by[row["modality"]].append(row)
    return {m: {t: 100 * float(np.mean([r["dice"][t] for r in rs])) for t in rs[0]["dice"]} for m, rs in sorted(by.items())}


def summarise(paths: list[Path]) -> str:
    val = _means(paths[0])
    keys = list(next(iter(val.values())))
    lines = ["| modality | " + " | ".join(f"t={k}" for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    lines += [f"| {m} | " + " | ".join(f"{v[k]:.2f}" for k in keys) + " |" for m, v in val.items()]
    if len(paths) > 1:
        other = _means(paths[1])
        lines += ["", "| modality | t chosen on the first file | first file: 0.5 → t | second file: 0.5 → t |",
                  "|---|---:|---:|---:|"]
        for m, v in val.items():
            t = max(keys, key=lambda k: (round(v[k], 6), k == "0.5"))
            o = other.get(m)
            lines.append(f"| {m} | {t} | {v['0.5']:.2f} → {v[t]:.2f} | "
                         + (f"{o['0.5']:.2f} → {o[t]:.2f} |" if o else "– |"))
        first = [v["0.5"] for v in val.values()]
        chosen = {m: max(keys, key=lambda k, v=v: (round(v[k], 6), k == "0.5")) for m, v in val.items()}
        lines += ["", f"mean over modalities, first file: {np.mean(first):.2f} → "
                  f"{np.mean([val[m][chosen[m]] for m in val]):.2f}; second file: "
                  f"{np.mean([other[m]['0.5'] for m in other]):.2f} → "
                  f"{np.mean([other[m][chosen.get(m, '0.5')] for m in other]):.2f}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from per_image_dice import main as run  # benchmarks/ is on sys.path when this runs as a script

    def variants(result: Any) -> dict[str, np.ndarray]:
        prob = np.asarray(result.probability, dtype=np.float32)
        return {str(t): prob > t for t in THRESHOLDS}

    return run(argv, __doc__.split("\n\n")[0], variants, summarise)


if __name__ == "__main__":
    sys.exit(main())
