"""Appearance-shift benchmark: the project's robustness scoreboard.

Every image of the chosen splits is segmented as stored and under each shift of
``napari_delightsam.data.appearance.SHIFTS`` (channel order, hue ±25°, H&E stain jitter, gamma
0.6 / 1.6, JPEG quality 25, half resolution, resolution loss 2×, 1.4× aspect stretch, octagonal and circular
endoscope frames, greyscale for the colour modalities); masks follow the geometric shifts.
For each (image, shift) it records the Dice with the modality given and what ``auto`` does:
the modality it picks, its calibrated confidence, whether it would ask (below the model's
confidence threshold) and the Dice of the mask it gives.

    python benchmarks/appearance_shift.py --data ../shared/data \\
        --splits benchmarks/protocol/splits-unseen-v1.json --split test unseen \\
        --max-per-dataset 8 --out OUT [--checkpoint FILE] [--threads 2]
    python benchmarks/appearance_shift.py --resummarise OUT/appearance-shift.json
    python benchmarks/appearance_shift.py --compare v1.4=A.json v2=B.json

Writes ``OUT/appearance-shift.json`` (rows + summary) and ``OUT/appearance-shift.md`` (tables:
per shift, mean Dice over modalities with the drop from "as stored", the largest drop of a
modality, ``auto`` right %, ``auto`` asks %, ``auto`` Dice; and per modality × shift).
A colour-only shift (greyscale) is compared with "as stored" over the colour modalities only.
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


def spread(items: list[Any], n: int | None) -> list[Any]:
    """At most ``n`` items evenly spread over ``items`` (all of them for None)."""
    if n is None or len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def choose_records(
    data: Path, splits_file: Path, split: str, max_per_dataset: int | None, modalities: list[str] | None = None
) -> list[Any]:
    from napari_delightsam.data import discover, load_splits, select

    chosen = select(discover(data, modalities), load_splits(splits_file), split, None)
    by_dataset: dict[str, list[Any]] = defaultdict(list)
    for rec in chosen:
        by_dataset[f"{rec.modality}/{rec.dataset}"].append(rec)
    out = []
    for key in sorted(by_dataset):
        out += spread(sorted(by_dataset[key], key=lambda r: r.sample_id), max_per_dataset)
    return out


def evaluate_image(seg: Any, image: np.ndarray, gt: np.ndarray, modality: str, shifts: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """One row per applicable shift: Dice given, and auto's pick, confidence, asks and Dice."""
    from napari_delightsam.training.evaluation.metrics import dice_score

    rows = []
    auto = seg.auto_available
    for name, shift in shifts.items():
        if not shift.applies_to(modality):
            continue
        img, mask = shift.apply(image, gt, seed)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"shift": name}
        if auto:
            ra = seg.segment(img, modality="auto")
            decision = seg.auto_decision(ra)
            row.update(
                auto_modality=ra.modality,
                auto_confidence=decision.confidence,
                auto_runner_up=decision.runner_up,
                auto_asks=decision.asks,
                auto_dice=dice_score(ra.mask, mask),
            )
            if ra.modality == modality:
                rg = ra
            else:
                rg = seg.segment(img, modality=modality)
        else:
            rg = seg.segment(img, modality=modality)
        row["dice"] = dice_score(rg.mask, mask)
        row["colour_correction"] = getattr(rg, "colour_correction", None)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{split: {shift: {mean_dice, drop, worst_drop, worst_modality, auto_right, auto_asks,
    auto_dice, per_modality: {m: dice}}}} — means over modalities of per-modality means. Rows of
    a shift on a modality it no longer applies to (a results file written before the shift's
    scope changed) are left out."""
    from napari_delightsam.data.appearance import COLOUR_MODALITIES, SHIFTS

    rows = [r for r in rows if r["shift"] not in SHIFTS or SHIFTS[r["shift"]].applies_to(r["modality"])]
    out: dict[str, Any] = {}
    for split in sorted({r["split"] for r in rows}):
        srows = [r for r in rows if r["split"] == split]
        cell: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in srows:
            cell[(r["shift"], r["modality"])].append(r)
        modalities = sorted({r["modality"] for r in srows})
        known = list(SHIFTS)
        shifts = sorted(dict.fromkeys(r["shift"] for r in srows), key=lambda n: known.index(n) if n in known else len(known))
        base = {m: _mean([r["dice"] for r in cell[("as stored", m)]]) for m in modalities}
        table: dict[str, Any] = {}
        for s in shifts:
            per = {m: _mean([r["dice"] for r in cell[(s, m)]]) for m in modalities if cell[(s, m)]}
            mods = [m for m in per if base.get(m) is not None]
            mean = _mean([per[m] for m in mods])
            ref = _mean([base[m] for m in mods])
            drops = {m: per[m] - base[m] for m in mods}  # type: ignore[operator]
            worst = min(drops, key=drops.get) if drops else None  # type: ignore[arg-type]
            cells = [r for m in mods for r in cell[(s, m)]]
            entry = {
                "n_images": len(cells),
                "modalities": mods,
                "mean_dice": mean,
                "as_stored_same_modalities": ref,
                "drop": None if mean is None or ref is None else mean - ref,
                "worst_drop": drops[worst] if worst else None,
                "worst_modality": worst,
                "per_modality": per,
            }
            if cells and "auto_modality" in cells[0]:
                right = [r["auto_modality"] == r["modality"] for r in cells]
                entry["auto_right"] = float(np.mean(right))
                entry["auto_asks"] = float(np.mean([r["auto_asks"] for r in cells]))
                entry["auto_wrong_unasked"] = float(
                    np.mean([(r["auto_modality"] != r["modality"]) and not r["auto_asks"] for r in cells])
                )
                entry["auto_mean_dice"] = _mean(
                    [_mean([r["auto_dice"] for r in cell[(s, m)]]) for m in mods]  # type: ignore[misc]
                )
            table[s] = entry
        shifted = [e for k, e in table.items() if k != "as stored" and e["drop"] is not None]
        out[split] = {
            "shifts": table,
            "modalities": modalities,
            "mean_drop_over_shifts": _mean([e["drop"] for e in shifted]),
            "worst_shift_drop": min((e["drop"] for e in shifted), default=None),
            "colour_modalities": [m for m in modalities if m in COLOUR_MODALITIES],
        }
    return out


def _f(x: float | None, scale: float = 100.0, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x * scale:+.1f}" if signed else f"{x * scale:.1f}"


def report(summary: dict[str, Any], header: str) -> str:
    lines = [f"# Appearance-shift benchmark\n\n{header}\n"]
    for split, s in summary.items():
        lines.append(f"## {split}\n")
        lines.append(
            f"Mean drop over the shifts: **{_f(s['mean_drop_over_shifts'], signed=True)}** Dice points; "
            f"worst shift: {_f(s['worst_shift_drop'], signed=True)}.\n"
        )
        has_auto = any("auto_right" in e for e in s["shifts"].values())
        head = "| shift | n | mean Dice | change | worst modality (change) |"
        sep = "|---|---:|---:|---:|---|"
        if has_auto:
            head += " `auto` right % | `auto` asks % | wrong, not asked % | `auto` Dice |"
            sep += "---:|---:|---:|---:|"
        lines += [head, sep]
        for name, e in s["shifts"].items():
            worst = f"{e['worst_modality']} ({_f(e['worst_drop'], signed=True)})" if e["worst_modality"] and name != "as stored" else ""
            row = f"| {name} | {e['n_images']} | {_f(e['mean_dice'])} | {'' if name == 'as stored' else _f(e['drop'], signed=True)} | {worst} |"
            if has_auto:
                row += f" {_f(e.get('auto_right'))} | {_f(e.get('auto_asks'))} | {_f(e.get('auto_wrong_unasked'))} | {_f(e.get('auto_mean_dice'))} |"
            lines.append(row)
        lines.append("")
        mods = s["modalities"]
        lines += ["| Dice % by modality | " + " | ".join(mods) + " |", "|---|" + "---:|" * len(mods)]
        for name, e in s["shifts"].items():
            lines.append(f"| {name} | " + " | ".join(_f(e["per_modality"].get(m)) for m in mods) + " |")
        lines.append("")
    return "\n".join(lines)


def compare(named: list[tuple[str, dict[str, Any]]]) -> str:
    """Side by side, per split and shift, the summaries of several runs (``NAME=JSON`` each): mean
    Dice, its change from "as stored", the worst modality's change and ``auto`` right / asks %."""
    lines = []
    splits = [sp for sp in named[0][1]["summary"] if all(sp in d["summary"] for _, d in named)]
    for split in splits:
        lines += [f"### {split}", ""]
        head = "| shift | " + " | ".join(
            f"{n}: Dice (change) | {n}: worst modality | {n}: `auto` right % (asks %)" for n, _ in named) + " |"
        lines += [head, "|---|" + "---:|---|---:|" * len(named)]
        shifts = list(named[0][1]["summary"][split]["shifts"])
        for shift in shifts:
            cells = []
            for _, d in named:
                e = d["summary"][split]["shifts"].get(shift)
                if e is None:
                    cells += ["–", "–", "–"]
                    continue
                change = "" if shift == "as stored" else f" ({_f(e['drop'], signed=True)})"
                worst = "" if shift == "as stored" or not e["worst_modality"] else f"{e['worst_modality']} {_f(e['worst_drop'], signed=True)}"
                auto = f"{_f(e.get('auto_right'))} ({_f(e.get('auto_asks'))})" if "auto_right" in e else "–"
                cells += [f"{_f(e['mean_dice'])}{change}", worst, auto]
            lines.append(f"| {shift} | " + " | ".join(cells) + " |")
        means = " | ".join(
            f"{_f(d['summary'][split]['mean_drop_over_shifts'], signed=True)} (worst {_f(d['summary'][split]['worst_shift_drop'], signed=True)}) | | "
            for _, d in named)
        lines += [f"| mean change over the shifts | {means}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path)
    p.add_argument("--splits", type=Path)
    p.add_argument("--split", nargs="+", default=["test", "unseen"])
    p.add_argument("--max-per-dataset", type=int, default=8)
    p.add_argument("--shifts", nargs="+", default=None,
                   help="names from SHIFTS or EXTRA_SHIFTS (default: all of SHIFTS, the scoreboard)")
    p.add_argument("--modalities", nargs="+", default=None, help="only these modalities (default: all)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--resummarise", type=Path, default=None, help="rebuild summary + report from a JSON")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--compare", nargs="+", metavar="NAME=JSON", help="print runs side by side and exit")
    args = p.parse_args(argv)

    if args.compare:
        named = []
        for item in args.compare:
            name, _, path = item.partition("=")
            if not path:
                p.error(f"--compare takes NAME=JSON, got {item!r}")
            named.append((name, json.loads(Path(path).read_text(encoding="utf-8"))))
        print(compare(named))
        return 0

    if args.resummarise:
        data = json.loads(args.resummarise.read_text(encoding="utf-8"))
        data["summary"] = summarise(data["rows"])
        _write(args.resummarise, data)
        print(report(data["summary"], data["header"]))
        return 0
    if args.data is None or args.splits is None or args.out is None:
        p.error("--data, --splits and --out are needed (or --resummarise JSON)")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} is not empty: choose a new folder")

    from napari_delightsam.data import load_pair
    from napari_delightsam.data.appearance import EXTRA_SHIFTS, SHIFTS
    from napari_delightsam.inference import load_model, set_threads

    shifts = SHIFTS
    if args.shifts:
        known = {**SHIFTS, **EXTRA_SHIFTS}
        unknown = [s for s in args.shifts if s not in known]
        if unknown:
            p.error(f"unknown shifts {unknown}; choose from {list(known)}")
        shifts = {k: known[k] for k in ["as stored", *args.shifts] if k in known}
    set_threads(args.threads)
    seg = load_model(args.checkpoint, "cpu")
    header = (
        f"Model: `{args.checkpoint or 'bundled'}` (sha256 {seg.checkpoint_sha256[:12] if seg.checkpoint_sha256 else '–'}); "
        f"splits {', '.join(args.split)} of `{args.splits.name}`"
        f"{', modalities ' + ', '.join(args.modalities) if args.modalities else ''}, at most {args.max_per_dataset} images per dataset "
        f"(evenly spread over the sorted ids); CPU, {args.threads} threads. "
        f"`auto` asks below a calibrated confidence of {getattr(seg, 'auto_confidence_threshold', None)}."
    )
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for split in args.split:
        records = choose_records(args.data, args.splits, split, args.max_per_dataset, args.modalities)
        for i, rec in enumerate(records):
            image, gt = load_pair(rec)  # (H,W,3) float32 in [0,255]
            image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
            seed = i  # deterministic: the record's position in the split
            for row in evaluate_image(seg, image[..., :3], gt > 0, rec.modality, shifts, seed):
                row.update(split=split, key=rec.key, dataset=rec.dataset, modality=rec.modality)
                rows.append(row)
            if not args.quiet:
                print(f"[{split} {i + 1}/{len(records)}] {rec.key} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    data = {"header": header, "command": " ".join(["python", "benchmarks/appearance_shift.py", *(argv if argv is not None else sys.argv[1:])]), "rows": rows}
    data["summary"] = summarise(rows)
    _write(args.out / "appearance-shift.json", data)
    print(report(data["summary"], header))
    return 0


def _write(json_path: Path, data: dict[str, Any]) -> None:
    """The results as ``json_path`` and the report beside it (same name, ``.md``)."""
    from napari_delightsam.atomic_files import atomic_write

    def text(path: Path, content: str) -> None:
        atomic_write(path, lambda tmp: tmp.write_text(content, encoding="utf-8"))

    text(json_path, json.dumps(data, indent=1))
    text(json_path.with_suffix(".md"), report(data["summary"], data["header"]) + f"\nCommand: `{data['command']}`\n")


if __name__ == "__main__":
    raise SystemExit(main())
