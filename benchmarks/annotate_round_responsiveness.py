"""GUI-thread gaps while the annotate panel runs a fine-tune round (learn as you go).

    OMP_NUM_THREADS=1 xvfb-run -a python benchmarks/annotate_round_responsiveness.py \\
        --images ../shared/data/colonoscopy/PolypGen/images --prefix EndoCV2021_C5_ --n 10 \\
        --work WORK_DIR [--checkpoint FILE]

The first ``--n`` images (name order, names starting with ``--prefix``) get masks headless
(``delightsam annotate``), one more is left to do; the panel opens it, then **Fine-tune now**
runs a real round (the trainer and the scoring as child processes, the saved images read and
written by the panel's worker thread). A 50 ms ``QTimer`` on the GUI thread ticks the whole
time; the largest gap between ticks is how long the GUI could not react. ``--checkpoint``
defaults to a tiny untrained model (the round's children do not run on the GUI thread, so the
model's size changes how long the round takes, not the gaps). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--prefix", default="")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--modality", default="colonoscopy")
    p.add_argument("--work", type=Path, required=True, help="a scratch folder (emptied)")
    p.add_argument("--checkpoint", default=None)
    args = p.parse_args(argv)

    shutil.rmtree(args.work, ignore_errors=True)
    src, out = args.work / "images", args.work / "masks"
    src.mkdir(parents=True)
    files = sorted(f for f in args.images.iterdir() if f.name.startswith(args.prefix))[: args.n + 1]
    ckpt = args.checkpoint
    if ckpt is None:  # before napari starts (see widgets/_llvm.py)
        import torch

        from napari_delightsam.checkpoint import save_checkpoint
        from napari_delightsam.config import tiny_config
        from napari_delightsam.model import DeLightSAM

        torch.manual_seed(0)
        ckpt = str(save_checkpoint(args.work / "tiny.safetensors", DeLightSAM(tiny_config()).eval()))
    for f in files[:-1]:
        (src / f.name).symlink_to(f.resolve())
    from napari_delightsam.cli import main as cli

    cli(["annotate", "-i", str(src), "-o", str(out), "-m", args.modality, "--checkpoint", ckpt, "--device", "cpu"])
    (src / files[-1].name).symlink_to(files[-1].resolve())

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=False)
    _, widget = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM annotate")
    widget.use_checkpoint(ckpt)
    widget.device_combo.setCurrentText("cpu")
    widget.modality_combo.setCurrentText(args.modality)
    widget.start(src, out)
    app = QApplication.instance()
    deadline = time.perf_counter() + 600
    while (widget.busy or widget._labels() is None) and time.perf_counter() < deadline:
        app.processEvents()
        time.sleep(0.01)
    gaps: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(tick)
    timer.start()
    last[0] = time.perf_counter()
    if widget.finetune_now() is None:
        raise SystemExit("the round did not start")
    deadline = time.perf_counter() + 1800
    while widget.learning and time.perf_counter() < deadline:
        app.processEvents()
        time.sleep(0.005)
    timer.stop()
    r = widget.last_round
    print(json.dumps({
        "images_saved": len(files) - 1, "round": None if r is None else r.status,
        "round_seconds": None if r is None else r.seconds, "ticks": len(gaps),
        "max_gap_ms": round(1000 * max(gaps), 1), "p99_gap_ms": round(1000 * float(np.percentile(gaps, 99)), 1),
        "mean_gap_ms": round(1000 * float(np.mean(gaps)), 1), "load_average": os.getloadavg()[0],
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
