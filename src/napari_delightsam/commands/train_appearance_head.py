"""`delightsam train-appearance-head`: give a model v2's appearance head (modality, channel order,
hue), trained for robustness and calibrated on validation data; every other weight is kept.

    delightsam train-appearance-head --init MODEL --data ../shared/data --out RUN \\
        --splits benchmarks/protocol/splits-unseen-v1.json [--steps 600]

Loads ``--init`` (a De-LightSAM .safetensors; default the bundled model), replaces its modality
head by an ``AppearanceHead`` (``model/appearance_head.py``), trains it on the training split
(``training/stages/appearance_head.py``: balanced over modalities and datasets, random appearance
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
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
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
    p.add_argument("--order-weight", type=float, default=0.5,
                   help="weight of the channel-order loss (modality cross-entropy: 1; default 0.5)")
    p.add_argument("--reorder-p", type=float, default=0.4,
                   help="probability that a colour training image's channels are reordered (default 0.4)")
    p.add_argument("--bgr-share", type=float, default=None,
                   help="share of those reorderings that are BGR (default: all five orders equally likely)")
    p.add_argument("--canvas-p", type=float, default=0.0,
                   help="probability of a wider or taller black canvas around a training image (default 0)")
    p.add_argument("--greyscale-p", type=float, default=0.1,
                   help="probability that a colour training image becomes greyscale (default 0.1)")
    p.add_argument("--val-greyscale", action="store_true",
                   help="validation and calibration also see each colour validation image in greyscale")
    p.add_argument("--select", default="modality", metavar="{modality,modality+order}",
                   help="validation score that picks the state kept: modality NLL (default) or modality "
                        "+ order-weight x channel-order NLL")
    p.add_argument("--mix-by-modality", default=None, metavar="JSON",
                   help='per-modality changes of the training mix, e.g. \'{"microscopy": {"hue_max": 12, '
                        '"stain_sigma_max": 0.1}}\' (fields of data.appearance.AppearanceMix)')
    p.add_argument("--threads", type=int, help="torch CPU threads")
    return p


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import bundled_checkpoint_path
    from ..inference import set_threads
    from ..training.stages.appearance_head import HeadStageConfig, train_head_stage

    try:
        try:
            by_modality = json.loads(args.mix_by_modality) if args.mix_by_modality else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"mix_by_modality is not JSON: {exc}") from None
        cfg = HeadStageConfig.from_dict({
            "steps": args.steps, "eval_every": args.eval_every, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "extra_train": args.extra_train, "train_max_per_dataset": args.train_max_per_dataset,
            "val_max_per_dataset": args.val_max_per_dataset, "target_precision": args.target_precision,
            "order_weight": args.order_weight, "reorder_p": args.reorder_p, "bgr_share": args.bgr_share,
            "canvas_p": args.canvas_p, "greyscale_p": args.greyscale_p, "val_greyscale": args.val_greyscale,
            "select": args.select, "mix_by_modality": by_modality,
        })
    except ValueError as exc:
        raise CommandError(str(exc).replace("_", "-")) from None
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
    out.mkdir(parents=True, exist_ok=True)

    def say(event: dict[str, Any]) -> None:
        if "status" in event:
            print(event["status"], file=sys.stderr, flush=True)
        elif "val_modality_acc" in event:
            print(f"step {event['global_step']}: modality {100 * event['val_modality_acc']:.1f} % "
                  f"(NLL {event['val_modality_nll']:.3f}), order {100 * (event['val_order_acc'] or 0):.1f} %, "
                  f"hue MAE {event['val_hue_mae'] or 0:.1f}°", file=sys.stderr, flush=True)

    command = "delightsam " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    target, report = train_head_stage(init, args.data, args.splits, out / "model.safetensors", cfg, progress=say,
                                      metrics=out / "metrics.jsonl", command=command)
    cal = report["calibration"]
    print(f"calibrated: temperature {cal['temperature']:.2f}, auto asks below p={cal['auto_confidence_threshold']:.2f} "
          f"({100 * cal['asks']:.1f} % of validation views; {100 * cal['wrong_unasked']:.2f} % wrong and not asked)",
          file=sys.stderr)
    (out / "summary.json").write_text(json.dumps(report, indent=1, default=float), encoding="utf-8")
    print(f"wrote {target}")
    return 0
