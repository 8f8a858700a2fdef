"""`delightsam evaluate`: Dice / HD / HD95 per image, dataset and modality on a data split.

The split is the training split (same deterministic function and seed), so ``--split test``
scores a trained model on its held-out images: ``--splits FILE`` if given, else the
``splits.json`` beside the checkpoint (a run folder), else the split recomputed with the
checkpoint's recorded seed. Without ``--checkpoint`` the bundled model is evaluated;
``--checkpoint untrained`` evaluates fresh random weights (a baseline).

Output: markdown tables on stdout, ``--json OUT`` with every number (per image too),
``--overlays DIR`` with the best and worst cases per dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..cli import CommandError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="Dice and Hausdorff distances of a model on a data split",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--data", type=Path, required=True, help="data root: <modality>/<dataset>/images|masks")
    p.add_argument(
        "--checkpoint", help="a .safetensors checkpoint, or 'untrained' (default: the bundled model)"
    )
    p.add_argument(
        "--split",
        choices=("test", "val", "train", "unseen", "all"),
        default="test",
        help="test (default): the in-domain test split; unseen: the held-out domains of --holdout",
    )
    p.add_argument(
        "--holdout",
        default=None,
        help="unseen-domain protocol (e.g. unseen-v1, see data/holdout.py) when the split is "
        "recomputed; a splits file names its own",
    )
    p.add_argument(
        "--splits",
        type=Path,
        help="splits.json to use (default: the checkpoint's run folder, else recomputed)",
    )
    p.add_argument(
        "--seed", type=int, help="split seed when the split is recomputed (default: the checkpoint's, else 0)"
    )
    p.add_argument("--json", type=Path, dest="json_out", help="write all results as JSON here")
    p.add_argument("--overlays", type=Path, help="folder for best/worst side-by-side PNGs per dataset")
    p.add_argument(
        "--overlays-per-dataset",
        type=int,
        default=2,
        help="best and worst cases written per dataset (default 2)",
    )
    p.add_argument(
        "--img-size-grid", type=int, default=1024, help="second metric grid (paper: 1024; 0 = off)"
    )
    p.add_argument(
        "--max-per-dataset", type=int, help="evaluate at most N images per dataset (deterministic choice)"
    )
    p.add_argument("--modalities", nargs="+", metavar="M", help="only these modalities")
    p.add_argument(
        "--modality-mode",
        choices=("given", "auto"),
        default="given",
        help="given: the dataset's modality (paper); auto: the model's modality head chooses",
    )
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument(
        "--tile",
        choices=("auto", "on", "off"),
        default="auto",
        help="tiled inference (see delightsam segment --tile): auto (default; tiles only microscopy and fundus "
        "images longer than 1.5x the network input), on, or off (every image whole)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    return p


def run(args: argparse.Namespace) -> int:
    from ..atomic_files import atomic_write
    from ..checkpoint import CheckpointError
    from ..data import discover
    from ..inference import load_model
    from ..training.evaluation.evaluate import (
        evaluate_records,
        format_markdown,
        resolve_eval_splits,
        select_records,
    )

    if args.max_per_dataset is not None and args.max_per_dataset < 1:
        raise CommandError("--max-per-dataset must be >= 1")
    if args.json_out is not None and args.json_out.exists():
        raise CommandError(f"{args.json_out} exists; choose another --json file (nothing is overwritten)")
    try:
        segmenter = load_model(args.checkpoint, device=args.device, precision=args.precision)
    except CheckpointError as exc:
        raise CommandError(str(exc)) from exc
    try:
        records = discover(args.data, args.modalities, known_modalities=segmenter.modalities)
    except (FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    ckpt_path = segmenter.checkpoint_path
    try:
        if args.holdout is not None and args.splits is None:
            from ..data import make_splits
            from ..data.holdout import holdout_by_name

            seed = 0 if args.seed is None else args.seed
            splits = make_splits(records, seed=seed, holdout=holdout_by_name(args.holdout))
            source = f"recomputed, seed {seed}, holdout {args.holdout}"
        else:
            splits, source = resolve_eval_splits(records, args.splits, ckpt_path, args.seed)
    except (FileNotFoundError, ValueError) as exc:
        raise CommandError(f"cannot use the split: {exc}") from exc
    if args.split == "unseen" and splits.holdout is None:
        raise CommandError("--split unseen needs a hold-out protocol: pass --holdout NAME or a --splits file made with one")
    chosen = select_records(records, splits, args.split, args.max_per_dataset)
    if not chosen:
        raise CommandError(f"no images in split {args.split!r} (split from {source})")
    if args.modality_mode == "auto" and not segmenter.auto_available:
        raise CommandError("--modality-mode auto needs a model whose modality head was trained")
    print(
        f"evaluating {segmenter!r} on {len(chosen)} image(s), split {args.split} ({source})",
        file=sys.stderr,
    )
    grid = args.img_size_grid if args.img_size_grid and args.img_size_grid > 0 else None

    def progress(i: int, n: int, row: dict[str, Any]) -> None:
        if i == n or i % 25 == 0:
            print(f"  {i}/{n} images", file=sys.stderr)

    report = evaluate_records(
        segmenter,
        chosen,
        grid=grid,
        modality_mode=args.modality_mode,
        threshold=args.threshold,
        overlays_dir=args.overlays,
        overlays_per_dataset=args.overlays_per_dataset,
        progress=progress,
        tiling=args.tile,
    )
    report.info = {
        "checkpoint": str(ckpt_path) if ckpt_path else (args.checkpoint or "bundled"),
        "checkpoint_sha256": segmenter.checkpoint_sha256,
        "split": args.split,
        "split_source": source,
        "grid": grid,
        "modality_mode": args.modality_mode,
        "threshold": args.threshold,
        "tiling": args.tile,
        "device": str(segmenter.device),
        "precision": segmenter.precision,
        "data": str(args.data),
        "hd_definition": "boundary Hausdorff in pixels; HD95 = 95th percentile of pooled boundary distances; "
        "cases with an empty prediction or ground truth are excluded from HD means (n_hd_excluded); "
        "Dice = 1 when both are empty",
    }
    print(format_markdown(report, grid))
    if args.json_out is not None:
        text = json.dumps(report.to_dict(), indent=1, default=str, allow_nan=False)
        try:
            atomic_write(args.json_out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        except FileNotFoundError as exc:
            raise CommandError(str(exc)) from exc
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0
