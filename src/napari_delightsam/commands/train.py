"""`delightsam train`: segmentation training on a data folder (single process or torchrun DDP).

Settings come from, in increasing priority: the paper's defaults (``TrainConfig``), a JSON
file (``--config``), then the flags given. ``--resume`` continues a run folder with its stored
settings (only --epochs, --device, --num-workers may change). A non-empty ``--out`` folder is
refused unless ``--resume``: nothing is overwritten silently.

``--progress-jsonl`` prints one JSON object per line on stdout (events ``start``, ``step``,
``epoch``, ``warning``, ``end``; ``error`` before a failure) for a parent process such as the
napari widget; the progress bar is then off.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..cli import CommandError

_FLAG_FIELDS = {
    "epochs": "epochs",
    "steps_per_epoch": "steps_per_epoch",
    "img_size": "img_size",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "lr": "lr",
    "device": "device",
    "num_workers": "num_workers",
    "seed": "seed",
    "init": "init",
    "max_per_dataset": "max_per_dataset",
    "val_max_per_dataset": "val_max_per_dataset",
    "model_preset": "model_preset",
    "select_on": "select_on",
    "time_budget": "time_budget_s",
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train De-LightSAM on ROOT/<modality>/<dataset>/{images,masks}",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--data", type=Path, help="data root: <modality>/<dataset>/images|masks")
    p.add_argument("--out", type=Path, help="run folder (new or empty; existing with --resume)")
    p.add_argument("--config", type=Path, help="JSON file of TrainConfig fields")
    p.add_argument("--init", help="none | litemedsam | path to a .safetensors checkpoint (default: none)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps-per-epoch", type=int, help="optimizer steps per epoch (default: one pass)")
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="end after the first validated epoch past this many seconds of training (finished, best kept)",
    )
    p.add_argument("--img-size", type=int, help="training image size (default 1024)")
    p.add_argument("--batch-size", type=int, help="images per step per process (default 4)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default 2)")
    p.add_argument("--seed", type=int, help="seed of split, sampling, augmentation and init (default 0)")
    p.add_argument("--max-per-dataset", type=int, help="use at most N images per dataset and split")
    p.add_argument("--val-max-per-dataset", type=int, help="validate on at most N images per dataset")
    p.add_argument(
        "--select-on",
        choices=("val", "val+unseen"),
        help="validation that picks best.safetensors: the in-domain val split (default) or the mean of "
        "it and the split's unseen-domain part (--splits benchmarks/protocol/splits-unseen-v1.json)",
    )
    p.add_argument("--modalities", nargs="+", metavar="M", help="train only these modalities")
    p.add_argument(
        "--model-preset", choices=("default", "tiny"), help="architecture preset (default: the paper's)"
    )
    p.add_argument(
        "--freeze",
        nargs="+",
        metavar="PART",
        help="backbone controllers encoder prompt_generator decoder fine_upscale refiners modality_head",
    )
    p.add_argument(
        "--lr-scale",
        nargs="+",
        metavar="GROUP=FACTOR",
        help="learning-rate multiplier per part, e.g. backbone=0.1 (parts: backbone controllers "
        "prompt_generator decoder fine_upscale refiners modality_head; default 1)",
    )
    p.add_argument(
        "--splits",
        type=Path,
        default=None,
        help="splits.json to use (e.g. an earlier run's) instead of making a seeded split",
    )
    p.add_argument("--no-augment", action="store_true", help="no augmentation")
    p.add_argument(
        "--amp-cpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast when training on a CPU (default: on where the CPU has native bf16, "
        "AMX / AVX512-BF16, which is faster per step; off elsewhere)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="decode images on the fly instead of caching them in RAM"
    )
    p.add_argument("--progress-jsonl", action="store_true", help="machine-readable progress on stdout")
    p.add_argument(
        "--benchmark-loader",
        type=int,
        metavar="BATCHES",
        help="only measure the data loader's samples/s over BATCHES batches and exit (no training)",
    )
    return p


def build_config(args: argparse.Namespace, base: dict[str, Any] | None = None):
    from ..training import TrainConfig

    data: dict[str, Any] = dict(base or {})
    if args.config is not None:
        data.update(_json_fields(args.config))
    for flag, fld in _FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            data[fld] = value
    if args.modalities:
        data["modalities"] = tuple(args.modalities)
    if args.freeze:
        data["freeze"] = tuple(args.freeze)
    if getattr(args, "lr_scale", None):
        data["lr_scale"] = {**data.get("lr_scale", {}), **_lr_scale(args.lr_scale)}
    if args.no_augment:
        data["augment"] = False
    if args.no_cache:
        data["cache"] = False
    if args.amp_cpu is not None:
        data["amp_cpu"] = args.amp_cpu
    if args.splits is not None:
        if not args.splits.is_file():
            raise CommandError(f"--splits: {args.splits} is not a file")
        data["splits_file"] = str(args.splits.resolve())
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"invalid training settings: {exc}") from exc


def _lr_scale(pairs: list[str]) -> dict[str, float]:
    """``["backbone=0.1", ...]`` -> ``{"backbone": 0.1}`` (names and values checked by TrainConfig)."""
    out: dict[str, float] = {}
    for pair in pairs:
        group, sep, value = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            out[group.strip()] = float(value)
        except ValueError:
            raise CommandError(f"--lr-scale {pair!r}: expected GROUP=FACTOR, e.g. backbone=0.1") from None
    return out


def jsonl_progress(enabled: bool) -> Callable[[dict[str, Any]], None] | None:
    """With ``enabled``: a progress callback printing one JSON object per line on stdout (for a
    parent process such as the napari widget); None otherwise."""
    if not enabled:
        return None

    def progress(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event, default=str) + "\n")
        sys.stdout.flush()

    return progress


@contextmanager
def reported_failures(progress: Callable[[dict[str, Any]], None] | None) -> Iterator[None]:
    """An expected failure of a run (``TrainingError``, a missing file, a bad value) becomes an
    ``error`` event for the parent process and a one-line ``CommandError``."""
    from ..training import TrainingError

    try:
        yield
    except (TrainingError, FileNotFoundError, ValueError) as exc:
        if progress is not None:
            progress({"event": "error", "message": str(exc)})
        raise CommandError(str(exc)) from exc


def _json_fields(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CommandError(f"cannot read --config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CommandError(f"--config {path}: expected a JSON object")
    return data


def run(args: argparse.Namespace) -> int:
    from ..training import train
    from ..training.stages.trainer import RUN_FILE, benchmark_loader

    if args.benchmark_loader is not None:
        if args.data is None:
            raise CommandError("--benchmark-loader needs --data")
        cfg = build_config(args)
        stats = benchmark_loader(cfg, args.data, max_batches=args.benchmark_loader)
        print(
            json.dumps(
                {
                    "img_size": cfg.img_size,
                    "batch_size": cfg.batch_size,
                    "num_workers": cfg.num_workers,
                    **stats,
                }
            )
        )
        return 0
    if args.out is None:
        raise CommandError("--out RUN_DIR is required")
    data_root = args.data
    if args.resume:
        run_file = args.out / RUN_FILE
        if not run_file.is_file():
            raise CommandError(f"cannot resume: {run_file} not found (is {args.out} a training run folder?)")
        stored = json.loads(run_file.read_text(encoding="utf-8"))
        cfg = build_config(args, base=stored["train_config"])
        if data_root is None:
            data_root = stored.get("data_root")
            if data_root is None:
                raise CommandError(
                    "this run was trained from in-memory items; pass --data to resume it from a folder"
                )
    else:
        if data_root is None:
            raise CommandError("--data ROOT is required")
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
            raise CommandError(
                f"{args.out} exists and is not empty; choose a new --out folder or pass --resume"
            )
        cfg = build_config(args)

    progress = jsonl_progress(args.progress_jsonl)
    # driven by a parent (the napari fine-tune widget): its SIGINT means "stop cleanly"
    stop_event = _parent_stop_event() if args.progress_jsonl else None
    with reported_failures(progress):
        result = train(
            cfg,
            args.out,
            data_root=data_root,
            progress=progress,
            stop_event=stop_event,
            resume=args.resume,
            show_progress=not args.progress_jsonl,
        )
    if not args.progress_jsonl:
        best = f"{result.best_val_dice:.4f}" if result.best_val_dice is not None else "n/a"
        print(
            f"{'stopped' if result.stopped else 'finished'} after {result.epochs_completed} epoch(s); "
            f"best validation Dice {best} (epoch {result.best_epoch}); best: {result.best_checkpoint}; last: {result.last_checkpoint}"
        )
    return 0


def _parent_stop_event():
    """SIGINT (SIGBREAK on Windows) -> finish the step, validate, keep the best checkpoint, report
    "end"; a second signal interrupts at once."""
    import signal
    import threading

    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()
        signal.signal(signum, signal.default_int_handler)

    try:
        for name in ("SIGINT", "SIGBREAK"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), handler)
    except ValueError:  # not the main thread: leave the default behaviour
        return None
    return stop
