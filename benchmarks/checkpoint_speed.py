"""End-to-end speed of checkpoints side by side, per modality, in alternating rounds.

    python benchmarks/checkpoint_speed.py --checkpoint v1.2=OLD.safetensors --checkpoint v1.3=bundled \\
        --modality fundus dermoscopy --rounds 12 [--size 1024] [--threads 2] [--json OUT]

Each checkpoint is loaded as the plugin loads it (``load_model(path, device)``: its default
precision and fast path) and segments one random uint8 RGB image of ``--size``² through the
public ``Segmenter.segment`` (pre-processing, network, mask at the input size). After two warm-up
calls per (checkpoint, modality), every round times each pair once, so that the host's drift hits
all of them alike; the median over rounds is printed. Use it where one checkpoint runs a part
only for some modalities (e.g. a per-modality refiner): ``delightsam benchmark`` times one modality.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from napari_delightsam.inference import load_model, set_threads

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                   help="NAME=PATH, or NAME=bundled for the shipped model; repeat to compare")
    p.add_argument("--modality", nargs="+", default=["fundus", "dermoscopy"])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.rounds < 1 or a.size < 16:
        p.error("--rounds must be >= 1 and --size >= 16")
    set_threads(a.threads)
    models = {}
    for spec in a.checkpoint:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            p.error(f"--checkpoint takes NAME=PATH, got {spec!r}")
        models[name] = load_model(None if path == "bundled" else path, a.device)
    image = np.random.default_rng(0).integers(0, 256, size=(a.size, a.size, 3), dtype=np.uint8)
    pairs = [(name, m) for name in models for m in a.modality]
    for name, m in pairs:
        for _ in range(2):
            models[name].segment(image, m)
    times: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    for _ in range(a.rounds):
        for name, m in pairs:
            start = time.perf_counter()
            models[name].segment(image, m)
            times[(name, m)].append(time.perf_counter() - start)
    rows = [
        {"checkpoint": name, "modality": m, "median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t)}
        for (name, m), t in times.items()
    ]
    print(f"| checkpoint | modality | median ms ({a.rounds} rounds, {a.size}², {a.threads} threads) | min ms |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['modality']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} |")
    if a.json:
        a.json.write_text(json.dumps({"size": a.size, "threads": a.threads, "rounds": a.rounds,
                                      "cpu": platform.processor() or platform.machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
