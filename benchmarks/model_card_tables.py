"""Markdown tables for the model card from `delightsam evaluate --json` and
`benchmarks/compare_baselines.py` outputs (no model is run here).

    python benchmarks/model_card_tables.py --column "v1.0=eval-v1-test.json" \\
        --column "v0.2=eval-v02-test.json" --column "LiteMedSAM GT box=cmp-test/comparison.json:litemedsam_gt_boxes" \\
        [--metric dice|hd|hd95] [--metrics-of v1.0]

Each ``--column NAME=FILE[:METHOD]`` is one column: an evaluate JSON (its ``datasets``), or a
comparison JSON with the method to read. Rows: datasets, then the mean over modalities (each
modality's mean over its images, as ``delightsam evaluate`` reports it). ``--metrics-of NAME``
adds a second table with n, Dice, HD and HD95 of that column (original resolution).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _load(spec: str) -> tuple[str, dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    name, _, rest = spec.partition("=")
    path, _, method = rest.partition(":")
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if method:
        m = data["methods"][method]
        return name, m["datasets"], m.get("modalities", {})
    return name, data["datasets"], data["modalities"]


def _cell(v: Any, scale: float) -> str:
    return "—" if v is None else f"{scale * float(v):.1f}"


def table(columns: list[tuple[str, dict, dict]], metric: str) -> str:
    scale = 100.0 if metric == "dice" else 1.0
    keys = sorted({k for _, ds, _ in columns for k in ds})
    out = ["| dataset | n | " + " | ".join(n for n, _, _ in columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for k in keys:
        n = next((ds[k]["n"] for _, ds, _ in columns if k in ds), "")
        out.append(f"| {k} | {n} | " + " | ".join(_cell(ds.get(k, {}).get(metric), scale) for _, ds, _ in columns) + " |")
    means = []
    for _name, _datasets, mods in columns:
        vals = [m.get(metric) for m in mods.values() if m.get(metric) is not None]
        means.append(_cell(sum(vals) / len(vals), scale) if vals else "—")
    out.append("| **mean over modalities** | | " + " | ".join(f"**{m}**" for m in means) + " |")
    return "\n".join(out)


def metrics_table(name: str, ds: dict[str, dict[str, Any]]) -> str:
    out = [f"| dataset ({name}) | n | Dice % | HD | HD95 | empty predictions |", "|---|---:|---:|---:|---:|---:|"]
    for k in sorted(ds):
        r = ds[k]
        out.append(
            f"| {k} | {r['n']} | {100 * r['dice']:.1f} | {_cell(r.get('hd'), 1)} | {_cell(r.get('hd95'), 1)} | "
            f"{r.get('n_empty_pred', 0)} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--column", action="append", required=True, help="NAME=FILE[:METHOD]")
    p.add_argument("--metric", default="dice", choices=("dice", "hd", "hd95"))
    p.add_argument("--metrics-of", help="also print n / Dice / HD / HD95 of this column")
    args = p.parse_args()
    columns = [_load(c) for c in args.column]
    print(table(columns, args.metric))
    if args.metrics_of:
        chosen = next(c for c in columns if c[0] == args.metrics_of)
        print()
        print(metrics_table(chosen[0], chosen[1]))


if __name__ == "__main__":
    main()
