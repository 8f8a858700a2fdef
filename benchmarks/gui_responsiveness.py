"""How responsive the napari window stays while De-LightSAM works (run under Xvfb or on a desktop).

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/gui_responsiveness.py [--json out.json]

A ``QTimer`` ticks every 50 ms on the GUI thread; any work that blocks the GUI thread shows up as
a gap much longer than 50 ms. Measured in a real (shown) napari window:

1. idle: the window doing nothing (the baseline of this machine);
2. segment: the "De-LightSAM segment" widget segmenting an image in its worker thread;
3. fine-tune: the "De-LightSAM fine-tune" widget training in its child process (the widget's own
   50 ms probe, ``FinetuneWidget.tick_stats``).

Prints max / 99th percentile / mean gap in ms for each. The model is the default architecture
with random weights unless ``--checkpoint`` is given (the work per step, not the weights, is
what loads the machine).
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


def _stats(gaps: list[float]) -> dict[str, float]:
    if not gaps:
        return {"ticks": 0}
    arr = np.asarray(gaps)
    return {
        "ticks": int(arr.size),
        "max_gap_ms": round(float(arr.max()), 1),
        "p99_gap_ms": round(float(np.percentile(arr, 99)), 1),
        "mean_gap_ms": round(float(arr.mean()), 1),
    }


class Probe:
    """50 ms QTimer on the GUI thread recording the gaps between its ticks."""

    def __init__(self, interval_ms: int = 50) -> None:
        from qtpy.QtCore import QTimer

        self.gaps: list[float] = []
        self.times: list[float] = []
        self._last = time.perf_counter()
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append((now - self._last) * 1000.0)
        self.times.append(now)
        self._last = now

    def start(self) -> None:
        self.gaps.clear()
        self.times.clear()
        self._last = time.perf_counter()
        self.timer.start()

    def stop(self) -> dict[str, float]:
        self.timer.stop()
        return _stats(self.gaps)


def _spin(app, until, timeout_s: float) -> bool:
    t0 = time.monotonic()
    while not until():
        app.processEvents()
        time.sleep(0.005)
        if time.monotonic() - t0 > timeout_s:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="model file (default: default architecture, random weights)")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the synthetic test image")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_delightsam.sample_data import load_sample

    os.environ.setdefault("DELIGHTSAM_CONFIG_DIR", tempfile.mkdtemp(prefix="delightsam-bench-cfg-"))
    viewer = napari.Viewer(title="De-LightSAM responsiveness")
    app = QApplication.instance()
    image, mask = load_sample("synthetic_dermoscopy")
    from skimage.transform import resize

    big = (resize(image, (args.image_size, args.image_size), preserve_range=True)).astype(np.uint8)
    viewer.add_image(big, name="image", rgb=True)
    viewer.add_image(image, name="lesion", rgb=True)
    viewer.add_labels((mask > 0).astype(np.uint8), name="lesion_corrected")
    viewer.add_image(image[::-1].copy(), name="lesion2", rgb=True)
    viewer.add_labels((mask[::-1] > 0).astype(np.uint8), name="lesion2_corrected")
    for _ in range(50):  # let the window appear before measuring
        app.processEvents()

    results: dict[str, dict] = {"machine": {"cpus": os.cpu_count(), "platform": sys.platform}}
    probe = Probe()
    probe.start()
    t0 = time.monotonic()
    _spin(app, lambda: time.monotonic() - t0 > 3.0, 10)
    results["idle"] = probe.stop()

    _, seg = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM segment")
    if args.checkpoint:
        seg.use_checkpoint(args.checkpoint)
    else:
        seg.model_combo.setCurrentIndex(seg.model_combo.findData("untrained"))
    seg.modality_combo.setCurrentText("dermoscopy")
    seg.device_combo.setCurrentText("cpu")
    seg.image_combo.value = viewer.layers["image"]
    # first run loads the model (in the worker); measure a second, warm run too
    for label in ("segment_first_run", "segment_warm_run"):
        probe.start()
        t0 = time.monotonic()
        seg.run()
        if not _spin(app, lambda: not seg.busy, 900):
            print("segmentation did not finish", file=sys.stderr)
            return 1
        results[label] = {**probe.stop(), "seconds": round(time.monotonic() - t0, 2)}

    _, ft = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM fine-tune", tabify=True)
    ft.add_pair("lesion", "lesion_corrected", "dermoscopy")
    ft.add_pair("lesion2", "lesion2_corrected", "dermoscopy")
    ft.epochs_spin.setValue(args.epochs)
    ft.steps_spin.setValue(args.steps)
    ft.img_size_combo.setCurrentText(str(args.train_size))
    ft.batch_spin.setValue(args.batch_size)
    ft.device_combo.setCurrentText("cpu")
    out = Path(tempfile.mkdtemp(prefix="delightsam-bench-run-")) / "run"
    ft.out_edit.setText(str(out))
    t0 = time.monotonic()
    timeline: list[tuple[float, str]] = []
    probe.start()
    worker = ft.start()
    worker.yielded.connect(lambda e: e and timeline.append((time.perf_counter(), e.get("event", "-"))))
    if not _spin(app, lambda: not ft.busy, 3600):
        print("fine-tune did not finish", file=sys.stderr)
        return 1
    probe.stop()
    summary = ft.last_summary or {}
    # where the longest gaps happened: the last training event before each
    worst = sorted(zip(probe.gaps, probe.times, strict=True), reverse=True)[:5]
    start_t = probe.times[0] - probe.gaps[0] / 1000 if probe.times else 0.0
    results["finetune_worst_gaps"] = [
        {"gap_ms": round(g, 1), "at_s": round(t - start_t, 1),
         "after_event": next((k for tt, k in reversed(timeline) if tt <= t), "before first event")}
        for g, t in worst
    ]
    results["finetune"] = {
        **_stats(ft.tick_gaps),
        "seconds": round(time.monotonic() - t0, 1),
        "returncode": summary.get("returncode"),
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "img_size": args.train_size,
        "best_checkpoint": ft.best_checkpoint,
    }
    viewer.close()

    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if summary.get("returncode") == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
