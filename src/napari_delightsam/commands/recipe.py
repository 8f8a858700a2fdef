"""`delightsam recipe NAME`: run a whole training recipe (split, embedding cache, stages, export).

    delightsam recipe v1 --data ../shared/data --out runs/v1

``NAME`` is a shipped recipe (``training/stages/recipes/<name>.json``: ``v1`` made the bundled model)
or a recipe JSON file. The same command continues an interrupted run: finished stages are
skipped, the current one resumes from its last checkpoint. ``--show`` prints the recipe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..cli import CommandError
from .train import jsonl_progress, reported_failures


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "recipe",
        help="run a training recipe end to end (e.g. v1, the bundled model's), resumable",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("name", help="a shipped recipe (v1, v2, v2.1, v2.2, v2.3, v2.4) or a recipe JSON file (may extend one)")
    p.add_argument("--data", type=Path, help="data root: <modality>/<dataset>/images|masks")
    p.add_argument("--out", type=Path, help="run folder (new, or the same one to continue)")
    p.add_argument("--splits", type=Path, help="use this splits.json instead of the recipe's seeded split")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument(
        "--until",
        metavar="STAGE",
        help="run the stages up to and including STAGE and export its best as model-STAGE.safetensors",
    )
    p.add_argument(
        "--start-at",
        metavar="STAGE",
        help="with --init: the stages before STAGE are taken as done by the model file --init (e.g. "
        "`recipe v2 --start-at appearance-head --init V1_EXPORT`: v2 from the v1 recipe's export)",
    )
    p.add_argument("--init", type=Path, metavar="FILE", help="the model that stands for the stages before --start-at")
    p.add_argument("--show", action="store_true", help="print the recipe as JSON and exit")
    p.add_argument("--progress-jsonl", action="store_true", help="machine-readable progress on stdout")
    return p


def run(args: argparse.Namespace) -> int:
    from ..training.stages.recipe import load_recipe, run_recipe

    try:
        recipe = load_recipe(args.name)
    except (FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    if args.show:
        print(json.dumps(recipe.to_dict(), indent=1))
        return 0
    if args.data is None or args.out is None:
        raise CommandError("--data ROOT and --out RUN_DIR are required")
    if args.splits is not None and not args.splits.is_file():
        raise CommandError(f"--splits: {args.splits} is not a file")
    try:
        recipe.stages_until(args.until)
    except ValueError as exc:
        raise CommandError(f"--until: {exc}") from exc
    if (args.start_at is None) != (args.init is None):
        raise CommandError("--start-at STAGE and --init FILE go together")
    if args.init is not None and not args.init.is_file():
        raise CommandError(f"--init: {args.init} is not a file")
    if args.start_at is not None and args.start_at not in [s.name for s in recipe.stages_until(args.until)]:
        raise CommandError(f"--start-at: recipe {recipe.name} has no stage {args.start_at!r} up to --until")
    progress = jsonl_progress(args.progress_jsonl)
    printer = progress or _print_recipe_events
    with reported_failures(progress):
        exported = run_recipe(
            recipe,
            args.data,
            args.out,
            splits_file=args.splits,
            device=args.device,
            progress=printer,
            show_progress=not args.progress_jsonl,
            until=args.until,
            start_at=args.start_at,
            init=args.init,
        )
    if not args.progress_jsonl:
        print(f"recipe {recipe.name} finished: {exported}")
    return 0


def _print_recipe_events(event: dict[str, Any]) -> None:
    kind = event.get("event")
    if kind == "recipe":
        print(f"[{event['stage']}] {event['status']}", flush=True)
    elif kind == "epoch":
        fields = ("train_loss", "val_dice", "unseen_dice", "select_dice")
        shown = " ".join(f"{k} {event[k]:.4f}" for k in fields if isinstance(event.get(k), float))
        print(f"  epoch {event['epoch']}: {shown}", flush=True)
    elif kind == "cache" and event.get("done") == event.get("total"):
        print(f"  cache {event['split']} {event['dataset']}: {event['total']} views", flush=True)
    elif kind == "record" and event.get("done") == event.get("total"):
        print(f"  refiner inputs {event['split']}: {event['total']} images", flush=True)
    elif kind == "warning":
        print(f"  warning: {event['message']}", flush=True)
