"""Fine-tuning on a large annotated image: its inference tiles against the image resized whole.

    python benchmarks/finetune_tiles.py --data ../shared/data --dataset microscopy/MoNuSeg2018 \\
        --k 4 --epochs 2 --steps 10 --img-size 512 [--checkpoint FILE] [--json OUT.json]

A user annotates one large field (here a k×k mosaic of a dataset's images, e.g. 4 × 4 H&E tiles
of 512² = one 2048² field) and presses "Fine-tune on my annotations". The fine-tune widget's
own path (``widgets.finetune_job.run_finetune``: pairs written to a dataset folder, ``delightsam
train`` in a child process, its best checkpoint) runs twice from the same model with the same
steps: once with the field written as the tiles tiled inference cuts from it
(``FinetuneSettings.tiles``, the default) and once resized whole to the training size (before).
Each model then segments, tiled as the product does (``tiling="auto"``), the field it was trained
on and a field of k² *other* images of the dataset (seeded choice); Dice per field, and the
starting model's for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _fields(data: Path, dataset: str, k: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Two k×k mosaics (train, held out) of the dataset's images (resized to the first image's
    size where they differ), seeded; returns (images, masks, the image ids of each field)."""
    from PIL import Image

    from napari_delightsam.data import discover, load_pair

    modality, name = dataset.split("/", 1)
    records = [r for r in discover(data, [modality]) if r.dataset == name]
    if len(records) < 2 * k * k:
        raise SystemExit(f"{dataset}: {len(records)} images, need {2 * k * k} for two {k}x{k} fields")
    order = np.random.default_rng(seed).permutation(len(records))[: 2 * k * k]
    tiles, masks, ids = [], [], []
    side = None
    for i in order:
        image, mask = load_pair(records[i])
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        side = side or image.shape[:2]
        if image.shape[:2] != side:
            image = np.asarray(Image.fromarray(image).resize(side[::-1], Image.Resampling.BILINEAR))
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(side[::-1], Image.Resampling.NEAREST)) > 127
        tiles.append(image)
        masks.append(mask > 0)
        ids.append(records[i].sample_id)

    def mosaic(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.concatenate(parts[r * k : (r + 1) * k], axis=1) for r in range(k)], axis=0)

    n = k * k
    return ([mosaic(tiles[:n]), mosaic(tiles[n:])], [mosaic(masks[:n]), mosaic(masks[n:])],
            [",".join(ids[:n]), ",".join(ids[n:])])


def _dice_tiled(seg: Any, images: list[np.ndarray], masks: list[np.ndarray], modality: str) -> dict[str, Any]:
    from napari_delightsam.training.evaluation.metrics import dice_score

    out = {}
    for name, image, mask in zip(("trained_field", "held_out_field"), images, masks, strict=True):
        t0 = time.perf_counter()
        res = seg.segment(image, modality=modality, tiling="auto")
        out[name] = {"dice": round(100 * float(dice_score(res.mask, mask)), 2),
                     "tiles": (res.tiling or {}).get("tiles"), "seconds": round(time.perf_counter() - t0, 1)}
    return out


def _finetune(pairs: list[Any], settings: Any, out: Path) -> tuple[str, dict[str, Any], float]:
    from napari_delightsam.widgets.finetune_job import run_finetune

    t0 = time.perf_counter()
    gen = run_finetune(pairs, None, settings, out, {})
    counts: dict[str, Any] = {}
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            summary = stop.value or {}
            break
        if event and event.get("event") == "data":
            counts = event["counts"]
        if event and event.get("event") in ("epoch", "end", "error"):
            keep = {k: event.get(k) for k in ("event", "epoch", "train_loss", "val_dice", "message") if event.get(k) is not None}
            print(json.dumps(keep), flush=True)
    best = (summary.get("end") or {}).get("best_checkpoint")
    if not best:
        raise SystemExit(f"fine-tuning failed: {summary.get('error') or summary.get('stderr')}")
    return str(best), counts, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--dataset", default="microscopy/MoNuSeg2018", help="modality/dataset")
    parser.add_argument("--k", type=int, default=4, help="fields of k x k of the dataset's images")
    parser.add_argument("--checkpoint", help="starting model (default: the bundled one)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from napari_delightsam.checkpoint import bundled_checkpoint_path
    from napari_delightsam.inference import load_model
    from napari_delightsam.widgets.finetune_job import FinetuneSettings, TrainingPair

    modality = args.dataset.split("/", 1)[0]
    images, masks, ids = _fields(args.data, args.dataset, args.k, args.seed)
    start = args.checkpoint or str(bundled_checkpoint_path() or "")
    if not start:
        raise SystemExit("no bundled model installed: give --checkpoint")
    report: dict[str, Any] = {
        "command": "python benchmarks/finetune_tiles.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads},
        "dataset": args.dataset, "field": list(images[0].shape[:2]), "k": args.k, "field_images": ids,
        "recipe": {"epochs": args.epochs, "steps_per_epoch": args.steps, "img_size": args.img_size,
                   "batch_size": args.batch_size, "lr": args.lr},
        "start_model": Path(start).name,
        "arms": {},
    }
    report["arms"]["start"] = _dice_tiled(load_model(start, device="cpu"), images, masks, modality)
    print("start", json.dumps(report["arms"]["start"]), flush=True)
    pair = TrainingPair(images[0], masks[0].astype(np.uint8), modality, "field", rgb=True)
    root = Path(tempfile.mkdtemp(prefix="delightsam-ft-tiles-"))
    for arm, tiles in (("tiles", True), ("whole", False)):
        settings = FinetuneSettings(epochs=args.epochs, steps_per_epoch=args.steps, img_size=args.img_size,
                                    lr=args.lr, batch_size=args.batch_size, device="cpu", init=start, tiles=tiles)
        best, counts, seconds = _finetune([pair], settings, root / arm)
        result = _dice_tiled(load_model(best, device="cpu"), images, masks, modality)
        report["arms"][arm] = {**result, "training_images": counts, "finetune_seconds": round(seconds, 1)}
        print(arm, json.dumps(report["arms"][arm]), flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
