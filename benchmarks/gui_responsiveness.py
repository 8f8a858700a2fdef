"""How responsive the napari window stays while De-LightSAM works (run under Xvfb or on a desktop).

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/gui_responsiveness.py [--json out.json]

A ``QTimer`` ticks every 50 ms on the GUI thread; any work that blocks the GUI thread shows up as
a gap much longer than 50 ms. Measured in a real (shown) napari window:

1. idle: the window doing nothing (the baseline of this machine);
2. segment: the "De-LightSAM segment" widget segmenting an image in its worker thread: the first
   run is the session's first result (the model loads, napari creates its first Labels layer),
   then a warm run;
3. segment tiled: the same widget segmenting a large RGB image (``--tiled-size``, 2048² by default)
   with the bundled model (when installed) as microscopy with tiling "auto" (tiled: progress per
   batch of tiles, the three full-size layers added at the end); the longest gaps are listed with
   the stage they fell in (while the tiles ran, in the widget's result handler on the GUI thread,
   or in the first draw after it), and the handler's own time and profile;
4. fine-tune: the "De-LightSAM fine-tune" widget training in its child process (the widget's own
   50 ms probe, ``FinetuneWidget.tick_stats``); ``--skip-finetune`` leaves it out.

Prints max / 99th percentile / mean gap in ms for each. The model is the default architecture
with random weights unless ``--checkpoint`` is given (the work per step, not the weights, is
what loads the machine).

Python's full (generation 2) garbage collections are timed too (``gc_full_passes``: when,
how long, in which case): in a napari process with torch loaded one walks every object the
process holds and stalls the GUI thread wherever an allocation triggers it. The widgets freeze
what is alive when they start work (``napari_delightsam.widgets.gc_policy``);
``DELIGHTSAM_GC_FREEZE=0`` in the environment measures without. A last case removes the tiled
case's layers (the policy's full collection then) and reports what the frozen generation held
as garbage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def _tiled_case(app, viewer, seg, probe: Probe, tile: np.ndarray, side: int,
                gc_passes: list[dict[str, Any]] = (), profile: bool = True) -> dict | None:
    """Segment a ``side``² RGB image (``tile`` repeated) as microscopy, tiling "auto", in the segment
    widget; the probe's gaps, the five longest with their stage, and the GUI-thread time of the
    widget's result handler (mask threshold, fingerprint, the mask layer), with its profile unless
    ``profile`` is False (profiling slows it by about a third)."""
    reps = -(-side // tile.shape[0])
    large = np.tile(tile, (reps, reps, 1))[:side, :side].copy()
    viewer.add_image(large, name="large", rgb=True)
    for _ in range(20):
        app.processEvents()
    bundled = seg.model_combo.findData("bundled")
    if bundled >= 0 and "not installed" not in seg.model_combo.itemText(bundled):
        seg.model_combo.setCurrentIndex(bundled)  # the shipped network size (its tiles, its cost)
    seg.modality_combo.setCurrentText("microscopy")
    seg.tiling_combo.setCurrentText("auto")
    seg.image_combo.value = viewer.layers["large"]
    handler = seg._on_returned
    spans: list[tuple[float, float]] = []

    profile_lines: list[str] = []

    def timed(payload):  # the result handler runs on the GUI thread: time it (and profile it)
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile() if profile else None
        start = time.perf_counter()
        try:
            if prof is None:
                handler(payload)
            else:
                prof.runcall(handler, payload)
        finally:
            spans.append((start, time.perf_counter()))
            if prof is not None:
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
                profile_lines.extend(_short_path(line.strip()) for line in out.getvalue().splitlines() if "/" in line)

    seg._on_returned = timed  # looked up when the widget connects its worker's signals
    probe.start()
    t0 = time.monotonic()
    if seg.run() is None or not _spin(app, lambda: not seg.busy, 3600):
        return None
    for _ in range(20):  # the layers' first draw comes after the handler returns
        app.processEvents()
        time.sleep(0.01)
    stats = probe.stop()
    seg._on_returned = handler
    layers_at = spans[0] if spans else (float("inf"), float("inf"))
    start_t = probe.times[0] - probe.gaps[0] / 1000 if probe.times else 0.0
    worst = sorted(zip(probe.gaps, probe.times, strict=True), reverse=True)[:5]
    tiles = (seg._last.run.tilings[0] if seg._last is not None and seg._last.run.tilings else None) or {}
    return {
        **stats,
        "model": seg.model_combo.currentData(),
        "side": side,
        "tiles": tiles.get("tiles"),
        "seconds": round(time.monotonic() - t0, 2),
        "result_handler_ms": round((layers_at[1] - layers_at[0]) * 1000, 1) if spans else None,
        "worst_gaps": [
            {"gap_ms": round(g, 1), "at_s": round(t - start_t, 2), "stage": _stage(t - g / 1000, t, layers_at),
             "full_gc_ms": round(sum(p["ms"] for p in gc_passes if t - g / 1000 <= p["_end"] <= t), 1)}
            for g, t in worst
        ],
        "result_handler_profile": profile_lines[:25],
    }


def _short_path(line: str) -> str:
    """A profile line with its file named from the package on (no machine-specific prefix)."""
    for marker in ("site-packages/", "src/"):
        head, sep, tail = line.partition(marker)
        if sep:
            return head.rsplit(" ", 1)[0] + " " + tail
    return line


_CASE = ["startup"]  # the case running now, for the garbage-collection log


def _watch_full_gc() -> list[dict[str, Any]]:
    """Log every full (generation 2) garbage collection: its start (s since this call), length
    in ms, the case it fell in and the objects it freed."""
    import gc

    passes: list[dict[str, Any]] = []
    t0, started = time.perf_counter(), [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            started[0] = time.perf_counter()
            return
        end = time.perf_counter()
        passes.append({"at_s": round(started[0] - t0, 2), "ms": round((end - started[0]) * 1000, 1),
                       "case": _CASE[0], "collected": info.get("collected"), "_end": end})

    gc.callbacks.append(callback)
    return passes


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _remove_case(app, viewer, probe: Probe) -> dict[str, Any]:
    """Remove the tiled case's layers (its input and the three outputs); the GUI-thread gaps
    while napari removes them and the policy collects, the process's memory before and after,
    then what a full collection of everything (frozen included) still finds as garbage."""
    import gc

    names = [layer.name for layer in viewer.layers if layer.name == "large" or layer.name.startswith("large ")]
    rss_before = _rss_mb()
    probe.start()
    t0 = time.monotonic()
    for name in names:
        viewer.layers.remove(name)
    _spin(app, lambda: time.monotonic() - t0 > 2.0, 10)
    stats = probe.stop()
    rss_after = _rss_mb()
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    start = time.perf_counter()
    garbage = gc.collect()
    return {**stats, "layers_removed": names, "rss_mb_before": round(rss_before), "rss_mb_after": round(rss_after),
            "frozen_objects_after": frozen, "garbage_left_in_all_objects": garbage,
            "full_collection_all_objects_ms": round((time.perf_counter() - start) * 1000, 1)}


def _write(results: dict[str, Any], path: Path | None) -> None:
    for entry in results.get("gc_full_passes", []):
        entry.pop("_end", None)
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")


def _stage(start: float, end: float, handler: tuple[float, float]) -> str:
    """Where a gap fell: while tiles ran in the worker, in the result handler, or after it (the
    first draw of the new layers)."""
    if end < handler[0]:
        return "tiles"
    return "result handler" if start <= handler[1] else "first draw"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="model file (default: default architecture, random weights)")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the synthetic test image")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--tiled-size", type=int, default=2048,
                        help="side of the large image segmented tiled (0: leave the case out)")
    parser.add_argument("--skip-finetune", action="store_true", help="leave the fine-tune case out")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-profile", action="store_true",
                        help="time the tiled result handler without profiling it (profiling slows it)")
    args = parser.parse_args(argv)
    gc_passes = _watch_full_gc()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_delightsam.sample_data import load_sample
    from napari_delightsam.widgets import gc_policy

    os.environ.setdefault("DELIGHTSAM_CONFIG_DIR", tempfile.mkdtemp(prefix="delightsam-bench-cfg-"))
    viewer = napari.Viewer(title="De-LightSAM responsiveness")
    app = QApplication.instance()
    image, mask = load_sample("synthetic_dermoscopy")
    from skimage.transform import resize

    big = (resize(image, (args.image_size, args.image_size), preserve_range=True)).astype(np.uint8)
    viewer.add_image(big, name="image", rgb=True)  # only an image: the first run is a session's first result
    for _ in range(50):  # let the window appear before measuring
        app.processEvents()

    import platform

    results: dict[str, Any] = {
        "command": "python benchmarks/gui_responsiveness.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform, "cpu": platform.processor() or platform.machine()},
        "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
    }
    probe = Probe()
    _CASE[0] = "idle"
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
        _CASE[0] = label
        probe.start()
        t0 = time.monotonic()
        seg.run()
        if not _spin(app, lambda: not seg.busy, 900):
            print("segmentation did not finish", file=sys.stderr)
            return 1
        results[label] = {**probe.stop(), "seconds": round(time.monotonic() - t0, 2)}

    if args.tiled_size:
        _CASE[0] = "segment_tiled"
        results["segment_tiled"] = _tiled_case(app, viewer, seg, probe, big, args.tiled_size, gc_passes,
                                                 profile=not args.no_profile)
        if results["segment_tiled"] is None:
            print("tiled segmentation did not finish", file=sys.stderr)
            return 1
        _CASE[0] = "remove_layers"
        results["remove_layers"] = _remove_case(app, viewer, probe)
    results["gc_policy"] = gc_policy.enabled()
    results["gc_full_passes"] = gc_passes  # "_end" is dropped when written
    if args.skip_finetune:
        viewer.close()
        results["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
        _write(results, args.json)
        return 0

    viewer.add_image(image, name="lesion", rgb=True)
    viewer.add_labels((mask > 0).astype(np.uint8), name="lesion_corrected")
    viewer.add_image(image[::-1].copy(), name="lesion2", rgb=True)
    viewer.add_labels((mask[::-1] > 0).astype(np.uint8), name="lesion2_corrected")
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
    _CASE[0] = "finetune"
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

    results["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    _write(results, args.json)
    return 0 if summary.get("returncode") == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
