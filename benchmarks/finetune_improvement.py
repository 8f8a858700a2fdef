"""Does "fine-tune on my annotations" help? Dice on held-out images before and after a short CPU run.

    python benchmarks/finetune_improvement.py --modality dermoscopy --train 10 --eval 20 \\
        --epochs 4 --steps 10 --img-size 256 [--checkpoint FILE] [--json out.json]

This goes through exactly what the napari fine-tune widget does (``widgets.finetune_job``):
the ``--train`` (image, mask) pairs are written to a temporary dataset folder, ``delightsam
train --progress-jsonl`` runs as a child process starting from the model, and its best
checkpoint is compared with the starting model on ``--eval`` other images of the same modality
(seeded, disjoint choice from ``../shared/data/<modality>``). Dice per image with the modality
given explicitly, threshold 0.5; mean and median reported, plus the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("DELIGHTSAM_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    if not root.is_dir():
        raise SystemExit(f"data folder {root} not found (set DELIGHTSAM_DATA)")
    return root


def _pairs(root: Path, modality: str) -> list[tuple[Path, Path]]:
    out = []
    for img in sorted((root / modality).glob("*/images/*")):
        mask = img.parent.parent / "masks" / f"{img.stem}.png"
        if mask.is_file():
            out.append((img, mask))
    return out


def _evaluate(segmenter, items, modality: str) -> dict[str, float]:
    from napari_delightsam.training.evaluation.metrics import dice_score

    scores = [dice_score(segmenter.segment(image, modality=modality).mask, mask) for image, mask in items]
    return {"mean_dice": round(float(np.mean(scores)), 4), "median_dice": round(float(np.median(scores)), 4),
            "n": len(scores)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modality", default="dermoscopy")
    parser.add_argument("--train", type=int, default=10, help="annotated images to fine-tune on")
    parser.add_argument("--eval", type=int, default=20, help="held-out images to measure on")
    parser.add_argument("--checkpoint", help="starting model (default: bundled, else random weights)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--freeze", nargs="+", metavar="PART",
                        help="parts kept fixed instead of the widget's default (backbone), as `delightsam train "
                             "--freeze`: e.g. backbone decoder fine_upscale")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from PIL import Image

    from napari_delightsam.checkpoint import bundled_checkpoint_path
    from napari_delightsam.image_files import read_image
    from napari_delightsam.inference import load_model
    from napari_delightsam.widgets.finetune_job import FinetuneSettings, TrainingPair, run_finetune

    pairs = _pairs(_data_root(), args.modality)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(pairs))
    if len(pairs) < args.train + args.eval:
        raise SystemExit(f"only {len(pairs)} {args.modality} images; need {args.train + args.eval}")

    def load(i: int):
        img, mask = pairs[i]
        return read_image(img), np.asarray(Image.open(mask)) > 0

    train_items = [load(i) for i in order[: args.train]]
    eval_items = [load(i) for i in order[args.train : args.train + args.eval]]

    start = args.checkpoint or (str(bundled_checkpoint_path()) if bundled_checkpoint_path() else None)
    if start is None:
        # random weights of the default architecture, saved so the child starts from the same ones
        from napari_delightsam.checkpoint import save_checkpoint

        seg0 = load_model("untrained", device="cpu")
        start = str(Path(tempfile.mkdtemp(prefix="delightsam-ft-start-")) / "start.safetensors")
        save_checkpoint(start, seg0.model)
    seg0 = load_model(start, device="cpu")
    t0 = time.perf_counter()
    before = _evaluate(seg0, eval_items, args.modality)
    before_train = _evaluate(seg0, train_items, args.modality)
    eval_s = time.perf_counter() - t0
    print(f"before: held-out {before}, train {before_train} ({eval_s:.0f} s)", flush=True)

    settings = FinetuneSettings(epochs=args.epochs, steps_per_epoch=args.steps, img_size=args.img_size,
                                lr=args.lr, batch_size=args.batch_size, device="cpu", init=start,
                                extra_args=("--freeze", *args.freeze) if args.freeze else ())
    # each image's own layout: a set may mix grey and RGB files (BrEaST does)
    tp = [TrainingPair(img, mask, args.modality, f"img{i:02d}", rgb=img.ndim == 3)
          for i, (img, mask) in enumerate(train_items)]
    out = Path(tempfile.mkdtemp(prefix="delightsam-ft-bench-")) / "run"
    holder: dict = {}
    t0 = time.perf_counter()
    gen = run_finetune(tp, None, settings, out, holder)
    summary = None
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            summary = stop.value
            break
        if event and event.get("event") in ("initial", "epoch", "end", "error"):
            keep = {k: event.get(k) for k in ("event", "epoch", "train_loss", "val_dice", "status", "message")
                    if event.get(k) is not None}
            print(json.dumps(keep), flush=True)
    train_s = time.perf_counter() - t0
    best = (summary or {}).get("end", {}) or {}
    best_path = best.get("best_checkpoint")
    if not best_path:
        print(f"training failed: {summary}", file=sys.stderr)
        return 1
    seg1 = load_model(best_path, device="cpu")
    after = _evaluate(seg1, eval_items, args.modality)
    after_train = _evaluate(seg1, train_items, args.modality)
    result = {
        "modality": args.modality,
        "start_model": start,
        "train_images": args.train,
        "eval_images": args.eval,
        "freeze": args.freeze or ["backbone"],
        "recipe": {"epochs": args.epochs, "steps_per_epoch": args.steps, "img_size": args.img_size,
                   "batch_size": args.batch_size, "lr": args.lr, "device": "cpu", "cpus": os.cpu_count()},
        "finetune_seconds": round(train_s, 1),
        "before": {"held_out": before, "train_images": before_train},
        "after": {"held_out": after, "train_images": after_train},
        "best_checkpoint": best_path,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
