"""Mosaic benchmark for tiled inference (issue #31): whole image vs tiled at a few scales.

Every test/unseen image of the chosen modalities (``--splits``) is resized to the network's
input (S×S, as the model sees it alone; masks nearest-neighbour) and laid out in mosaics of
k×k such images (one dataset per mosaic, images drawn in a seeded order, repeated when a
dataset has fewer than k² images). Each mosaic is segmented as a whole image (``tiling="off"``)
and tiled at each ``--scales`` value (``tiling="on"``, ``--overlap`` working pixels, the true
modality given). Per cell (modality, k, method): the mean over mosaics of the Dice of the whole
mosaic against the mosaic of masks, the mean Dice of the k² images cut back out of it, seconds
per mosaic, network calls (tiles) per mosaic and megapixels of input per second. The row "each
image alone" segments the mosaic's k² images one by one (the target tiling should reach).
``--memory-sides`` adds the peak memory of segmenting one synthetic RGB image per side, whole
and tiled (a fresh child process per run: the highest resident set size sampled every 2 ms
during the call, minus the resident size after loading the model and one warm-up call; the
input image, made before the call, is not counted; its size is listed).

    python benchmarks/tiled_inference.py --data ../shared/data \\
        --splits benchmarks/protocol/splits-unseen-v1.json --max-images 6 --threads 1 \\
        --scales 1.25 1 0.75 0.5 --memory-sides 2048 4096 8192 \\
        --out benchmarks/results/tiling/tiled-inference-v1.4.json --markdown
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: (modality, dataset) -> the splits whose images form the mosaics
DATASETS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "microscopy": [("microscopy/MoNuSeg2018", ("unseen", "test")), ("microscopy/DSB2018", ("test", "unseen"))],
    "fundus": [
        ("fundus/DRIVE", ("test", "unseen")),
        ("fundus/IDRiD-vessel_sample6", ("unseen", "test")),
        ("fundus/STARE_sample2", ("unseen", "test")),
    ],
}


def _resize(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    img = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    msk = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(img), np.asarray(msk) > 127


def load_tiles(data: Path, splits_path: Path, modality: str, size: int) -> dict[str, list[tuple[np.ndarray, np.ndarray, str]]]:
    """dataset key -> [(tile (S,S,3) uint8, mask (S,S) bool, sample id)] for the modality."""
    from napari_delightsam.data import discover, load_pair, load_splits

    splits = load_splits(splits_path)
    records = discover(data, [modality])
    out: dict[str, list[tuple[np.ndarray, np.ndarray, str]]] = {}
    for key, names in DATASETS[modality]:
        wanted = {i for s in names for i in splits.ids(key, s)}
        for rec in records:
            if rec.key == key and rec.sample_id in wanted:
                image, mask = load_pair(rec)
                tile, tmask = _resize(image, mask, size)
                out.setdefault(key, []).append((tile, tmask, rec.sample_id))
    return out


def mosaics(tiles: dict[str, list], k: int, count: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray, list[str]]]:
    """``count`` k×k mosaics, dataset by dataset in turn, images in a seeded order per dataset."""
    rng = np.random.default_rng(seed + k)
    keys = sorted(tiles)
    orders = {key: list(rng.permutation(len(tiles[key]))) for key in keys}
    cursor = dict.fromkeys(keys, 0)
    out = []
    for i in range(count):
        key = keys[i % len(keys)]
        pool, order = tiles[key], orders[key]
        picks = []
        for _ in range(k * k):
            picks.append(pool[order[cursor[key] % len(order)]])
            cursor[key] += 1
        rows = [np.concatenate([p[0] for p in picks[r * k : (r + 1) * k]], axis=1) for r in range(k)]
        mrows = [np.concatenate([p[1] for p in picks[r * k : (r + 1) * k]], axis=1) for r in range(k)]
        out.append((key, np.concatenate(rows, axis=0), np.concatenate(mrows, axis=0), [p[2] for p in picks]))
    return out


def _methods(scales: list[float], k: int, baselines: bool = True) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [("whole", {"tiling": "off"})] if baselines else []
    if k > 1 and baselines:  # for 1×1 the image alone is the whole-image run
        out.append(("each image alone", {"tiling": "off", "alone": True}))
    return out + [(f"tiled x{s:g}", {"tiling": "on", "tile_scale": s}) for s in scales]


def _segment_alone(seg, image: np.ndarray, modality: str, k: int, size: int) -> np.ndarray:
    """The mosaic's k² images segmented one by one (as whole images), laid out again."""
    mask = np.zeros(image.shape[:2], bool)
    for r in range(k):
        for c in range(k):
            sl = (slice(r * size, (r + 1) * size), slice(c * size, (c + 1) * size))
            mask[sl] = seg.segment(image[sl], modality=modality, tiling="off").mask
    return mask


def run_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    from napari_delightsam.inference import load_model
    from napari_delightsam.training.evaluation.metrics import dice_score

    seg = load_model(args.checkpoint, "cpu")
    size = seg.config.img_size
    seg.segment(np.zeros((size, size, 3), np.uint8), modality="microscopy", tiling="off")  # warm-up
    rows = []
    for modality in args.modalities:
        tiles = load_tiles(args.data, args.splits, modality, size)
        print(f"{modality}: {', '.join(f'{k} {len(v)}' for k, v in sorted(tiles.items()))} images", file=sys.stderr)
        for k in args.sizes:
            mos = mosaics(tiles, k, args.max_images, args.seed)
            for name, kwargs in _methods(args.scales, k, not args.no_baselines):
                if "tile_scale" in kwargs:
                    kwargs = {**kwargs, "tile_overlap": args.overlap}
                whole_dice, tile_dice, secs, ntiles = [], [], [], []
                per_key: dict[str, dict[str, list[float]]] = {}
                for key, image, gt, _ in mos:
                    t0 = time.perf_counter()
                    if kwargs.get("alone"):
                        pred, n = _segment_alone(seg, image, modality, k, size), k * k
                    else:
                        result = seg.segment(image, modality=modality, **kwargs)
                        pred, n = result.mask, (result.tiling["tiles"] if result.tiling else 1)
                    secs.append(time.perf_counter() - t0)
                    ntiles.append(n)
                    whole_dice.append(dice_score(pred, gt))
                    own = per_key.setdefault(key, {"mosaic": [], "tiles": []})
                    own["mosaic"].append(whole_dice[-1])
                    for r in range(k):
                        for c in range(k):
                            sl = (slice(r * size, (r + 1) * size), slice(c * size, (c + 1) * size))
                            tile_dice.append(dice_score(pred[sl], gt[sl]))
                            own["tiles"].append(tile_dice[-1])
                mpx = (k * size) ** 2 / 1e6
                row = {
                    "modality": modality,
                    "k": k,
                    "side": k * size,
                    "method": name,
                    "mosaics": len(mos),
                    "dice_mosaic": 100 * float(np.mean(whole_dice)),
                    "dice_tiles": 100 * float(np.mean(tile_dice)),
                    "seconds": float(np.mean(secs)),
                    "tiles": float(np.mean(ntiles)),
                    "mpx_per_s": mpx / float(np.mean(secs)),
                    "datasets": {
                        key: {"mosaics": len(v["mosaic"]), "dice_mosaic": 100 * float(np.mean(v["mosaic"])),
                              "dice_tiles": 100 * float(np.mean(v["tiles"]))}
                        for key, v in sorted(per_key.items())
                    },
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return rows


class _RssSampler:
    """Highest resident set size seen by a thread sampling it every ``interval`` seconds (MB)."""

    def __init__(self, interval: float = 0.002) -> None:
        import threading

        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss / 1e6)
            self._stop.wait(self.interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss / 1e6)


def probe(side: int, method: str, checkpoint: str | None, threads: int, overlap: int) -> dict[str, Any]:
    """Child process: peak memory of segmenting one side×side RGB image (see the docstring)."""
    import gc

    import psutil

    from napari_delightsam.inference import load_model, set_threads

    set_threads(threads)
    seg = load_model(checkpoint, "cpu")
    size = seg.config.img_size
    rng = np.random.default_rng(0)
    seg.segment(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), modality="microscopy", tiling="off")
    # a textured synthetic image: one random 512² tile repeated (generated in place, uint8)
    image = np.tile(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (side // size + 1, side // size + 1, 1))
    image = np.ascontiguousarray(image[:side, :side])
    gc.collect()
    before = psutil.Process().memory_info().rss / 1e6
    kwargs: dict[str, Any] = {"tiling": "off"} if method == "whole" else {"tiling": "on", "tile_overlap": overlap}
    with _RssSampler() as rss:
        t0 = time.perf_counter()
        result = seg.segment(image, modality="microscopy", **kwargs)
        seconds = time.perf_counter() - t0
    return {
        "side": side,
        "method": method,
        "tiles": result.tiling["tiles"] if result.tiling else 1,
        "seconds": seconds,
        "mpx_per_s": side * side / 1e6 / seconds,
        "peak_memory_mb": rss.peak - before,
        "input_mb": image.nbytes / 1e6,
    }


def run_probes(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for side in args.memory_sides:
        for method in ("whole", "tiled"):
            cmd = [sys.executable, __file__, "--probe", str(side), method, "--threads", str(args.threads),
                   "--overlap", str(args.overlap)]
            if args.checkpoint:
                cmd += ["--checkpoint", str(args.checkpoint)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def _methods_seen(report: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for r in report["cells"]:
        if r["method"] not in seen:
            seen.append(r["method"])
    first = [m for m in ("whole", "each image alone") if m in seen]
    return first + [m for m in seen if m not in first]


def markdown(report: dict[str, Any]) -> str:
    lines = [] if not report["cells"] else [
        "| modality | mosaic | side | method | tiles | Dice (mosaic) | Dice (mean of its images) | s / mosaic | Mpx/s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["cells"]:
        lines.append(
            f"| {r['modality']} | {r['k']}×{r['k']} | {r['side']} | {r['method']} | {r['tiles']:.0f} | "
            f"{r['dice_mosaic']:.1f} | {r['dice_tiles']:.1f} | {r['seconds']:.2f} | {r['mpx_per_s']:.2f} |"
        )
    if report["cells"]:
        lines += ["", "Per dataset, Dice of the images cut back out of the mosaic (mosaics per cell in brackets):", "",
                  "| dataset | mosaic | " + " | ".join(_methods_seen(report)) + " |",
                  "|---|---|" + "---:|" * len(_methods_seen(report))]
        by: dict[tuple[str, int], dict[str, Any]] = {}
        for r in report["cells"]:
            for key, v in r["datasets"].items():
                by.setdefault((key, r["k"]), {})[r["method"]] = v
        for (key, k), cells in sorted(by.items()):
            vals = [f"{cells[m]['dice_tiles']:.1f} ({cells[m]['mosaics']})" if m in cells else "" for m in _methods_seen(report)]
            lines.append(f"| {key} | {k}×{k} | " + " | ".join(vals) + " |")
    if report.get("memory"):
        lines += ([""] if lines else []) + ["| side | method | tiles | seconds | Mpx/s | peak memory above the model (MB) | input (MB) |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for r in report["memory"]:
            lines.append(
                f"| {r['side']} | {r['method']} | {r['tiles']} | {r['seconds']:.1f} | {r['mpx_per_s']:.2f} | "
                f"{r['peak_memory_mb']:.0f} | {r['input_mb']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--splits", type=Path, default=Path("benchmarks/protocol/splits-unseen-v1.json"))
    p.add_argument("--checkpoint", default=None, help="a checkpoint file (default: the bundled model)")
    p.add_argument("--modalities", nargs="+", default=["microscopy", "fundus"], choices=sorted(DATASETS))
    p.add_argument("--sizes", nargs="*", type=int, default=[1, 2, 4], help="mosaics of k×k images (none: only the memory probes)")
    p.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.75, 0.5], help="tile scales to compare")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap in working pixels")
    p.add_argument("--no-baselines", action="store_true", help="only the tiled rows (no whole / alone)")
    p.add_argument("--max-images", type=int, default=4, help="mosaics per cell")
    p.add_argument("--memory-sides", nargs="*", type=int, default=[], help="sides of the memory probes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the report (JSON) here")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    p.add_argument("--probe", nargs=2, metavar=("SIDE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe(int(args.probe[0]), args.probe[1], args.checkpoint, args.threads, args.overlap)))
        return 0
    report: dict[str, Any] = {
        "command": "python benchmarks/tiled_inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cells": run_cells(args) if args.sizes else [],
        "memory": run_probes(args) if args.memory_sides else [],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
