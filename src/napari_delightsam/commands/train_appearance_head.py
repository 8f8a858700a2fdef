"""`delightsam train-appearance-head`: give a model v2's appearance head (modality, channel order,
hue), trained for robustness and calibrated on validation data; every other weight is kept.

    delightsam train-appearance-head --init MODEL --data ../shared/data --out RUN \\
        --splits benchmarks/protocol/splits-unseen-v1.json [--steps 600]

Loads ``--init`` (a De-LightSAM .safetensors; default the bundled model), replaces its modality
head by an ``AppearanceHead`` (``model/appearance_head.py``), trains it on the training split
(``training/appearance_head.py``: balanced over modalities and datasets, random appearance
shifts), keeps the best step on validation views of the validation split, calibrates it (softmax
temperature, ``auto``'s confidence threshold, the colour-correction thresholds) and writes
``RUN/model.safetensors`` (fp16, like the bundled file) with ``RUN/summary.json`` and
``RUN/metrics.jsonl``. ``--extra-train SPLIT`` adds the images of another split to training
(e.g. ``unseen`` for a shipped head that has seen every camera; its unseen figures are then
no longer unseen).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from ..cli import CommandError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-appearance-head",
        help="train and calibrate v2's appearance head (modality, channel order, hue) on a model",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--init", type=Path, help="De-LightSAM .safetensors to start from (default: the bundled model)")
    p.add_argument("--data", type=Path, required=True, help="data root: <modality>/<dataset>/images|masks")
    p.add_argument("--out", type=Path, required=True, help="run folder (new or empty)")
    p.add_argument("--splits", type=Path, required=True, help="splits.json (e.g. benchmarks/protocol/splits-unseen-v1.json)")
    p.add_argument("--extra-train", nargs="*", default=[], metavar="SPLIT",
                   help="also train on these splits' images (e.g. unseen); default: none")
    p.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    p.add_argument("--eval-every", type=int, default=100, help="validate every N steps (default 100)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--train-max-per-dataset", type=int, default=None,
                   help="training images per dataset (default: all; seeded choice)")
    p.add_argument("--val-max-per-dataset", type=int, default=30,
                   help="validation images per dataset (default 30; seeded choice)")
    p.add_argument("--target-precision", type=float, default=0.995,
                   help="auto's confidence threshold is the lowest at which this share of the confident "
                        "validation predictions is right (default 0.995)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import bundled_checkpoint_path, load_checkpoint, read_checkpoint_info, save_checkpoint
    from ..data import discover, load_splits, select
    from ..inference import AUTO_CONFIDENCE_KEY, MODALITY_HEAD_TRAINED_KEY, set_threads
    from ..training.appearance_head import (
        calibrate,
        load_head_images,
        train_appearance_head,
        validation_views,
        with_appearance_head,
    )
    from ..training.runfolder import RunLog

    if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1 or args.lr <= 0:
        raise CommandError("--steps, --batch-size, --eval-every and --lr must be positive")
    if args.steps % args.eval_every:
        raise CommandError(f"--steps ({args.steps}) must be a multiple of --eval-every ({args.eval_every})")
    init = args.init if args.init is not None else bundled_checkpoint_path()
    if init is None or not Path(init).is_file():
        raise CommandError(f"--init: {init} is not a file")
    if not args.splits.is_file():
        raise CommandError(f"--splits: {args.splits} is not a file")
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CommandError(f"--out {out} exists and is not an empty folder; choose another")
    if args.threads is not None:
        set_threads(args.threads)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    _, init_meta = read_checkpoint_info(init)
    model = with_appearance_head(load_checkpoint(init))
    modalities = list(model.config.modalities)
    records = discover(args.data, None)
    splits = load_splits(args.splits)
    train_records = select(records, splits, "train", args.train_max_per_dataset)
    for extra in args.extra_train:
        train_records += select(records, splits, extra, args.train_max_per_dataset)
    val_records = select(records, splits, "val", args.val_max_per_dataset)
    if not train_records or not val_records:
        raise CommandError(f"no training or validation images under {args.data} for this split")
    say(f"loading {len(train_records)} training and {len(val_records)} validation images")
    train = load_head_images(train_records, modalities)
    val = validation_views(model, load_head_images(val_records, modalities), model.config.img_size)
    say(f"{len(val.view)} validation views; training {args.steps} steps of {args.batch_size}")
    out.mkdir(parents=True, exist_ok=True)

    def progress(event: dict[str, Any]) -> None:
        if "val_modality_acc" in event:
            say(f"step {event['global_step']}: modality {100 * event['val_modality_acc']:.1f} % "
                f"(NLL {event['val_modality_nll']:.3f}), order {100 * (event['val_order_acc'] or 0):.1f} %, "
                f"hue MAE {event['val_hue_mae'] or 0:.1f}°")

    _, summary = train_appearance_head(
        model, train, val, modalities=modalities, steps=args.steps, eval_every=args.eval_every,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, log=RunLog(out / "metrics.jsonl", progress),
    )
    cal = calibrate(model.modality_head, val, target_precision=args.target_precision)
    say(f"calibrated: temperature {cal['temperature']:.2f}, auto asks below p={cal['auto_confidence_threshold']:.2f} "
        f"({100 * cal['asks']:.1f} % of validation views; {100 * cal['wrong_unasked']:.2f} % wrong and not asked)")
    command = "delightsam " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "delightsam train-appearance-head"
    from ..checkpoint import RESERVED_METADATA_KEYS

    meta = {k: v for k, v in init_meta.items() if k not in RESERVED_METADATA_KEYS}
    meta.update({
        MODALITY_HEAD_TRAINED_KEY: "true",
        AUTO_CONFIDENCE_KEY: f"{cal['auto_confidence_threshold']:.2f}",
        "appearance_head": json.dumps({"command": command, "splits": args.splits.name,
                                       "train_splits": ["train", *args.extra_train], "summary": summary,
                                       "calibration": cal}, default=float),
    })
    target = save_checkpoint(out / "model.safetensors", model, meta, dtype=torch.float16)
    (out / "summary.json").write_text(json.dumps({"summary": summary, "calibration": cal}, indent=1, default=float),
                                      encoding="utf-8")
    say(f"wrote {target}")
    return 0
