"""Save & next in "De-LightSAM annotate": seconds from the key to the next image's mask on screen.

    xvfb-run -a python benchmarks/annotate_save_next.py [--images 6] [--size 1024] [--checkpoint FILE]
        [--modality dermoscopy] [--threads 2]

A temporary folder of ``--images`` RGB images of ``--size``² (the bundled dermoscopy sample,
resized and rotated), annotated with the widget in a real napari viewer (``show=False``) and the
bundled model (or ``--checkpoint``) on the CPU. Reported (medians):

* ``prefetched``: Save & next after the next image's background segmentation finished (a user who
  corrects for longer than a segmentation takes): writing the mask + sidecar, showing the next one;
* ``not prefetched``: Save & next at once after an image appears (the next one is still being
  segmented): until its mask is on screen.

``--box``: on every image the user first corrects with a box of the "De-LightSAM refine" widget
(its LiteMedSAM, loaded and embedded in the background), so Save & next also clears the image's
boxes layer. With every Save & next the longest gap of a 50 ms timer on the GUI thread is
recorded from the key until a second after the mask is on screen (``--box`` or not). Last, the
first image (saved: its mask, no heatmap) is opened again from the last one (segmented).

The machine's load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


class _GapProbe:
    """A 50 ms timer on the GUI thread; ``stop()`` -> its longest gap between ticks (ms)."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.longest, self._last = 0.0, time.perf_counter()
        self.timer = QTimer()
        self.timer.setInterval(50)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.longest, self._last = max(self.longest, (now - self._last) * 1000.0), now

    def stop(self) -> float:
        self._tick()
        self.timer.stop()
        return self.longest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--modality", default="dermoscopy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--box", action="store_true", help="correct every image with a box of the refine widget first")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from napari_delightsam.inference import load_model  # noqa: F401 -- the model before the viewer (_llvm.py)
    from napari_delightsam.sample_data import load_sample

    torch.set_num_threads(args.threads)
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_delightsam.widgets.annotate_widget import AnnotateWidget

    rgb = Image.fromarray(np.asarray(load_sample("synthetic_dermoscopy")[0]))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "images"
        src.mkdir()
        for i in range(args.images):
            rgb.resize((args.size, args.size)).rotate(i * 7).save(src / f"image{i:03d}.png")
        viewer = napari.Viewer(show=False)
        widget = AnnotateWidget(viewer)
        refine = None
        if args.box:
            _, refine = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM refine")
            refine.device_combo.value = "cpu"
        widget.device_combo.setCurrentText("cpu")
        widget.modality_combo.setCurrentText(args.modality)
        if args.checkpoint is not None and not widget.use_checkpoint(args.checkpoint):
            return 2
        app = QApplication.instance()

        def wait(condition, limit=600.0):
            t0 = time.time()
            while not condition() and time.time() - t0 < limit:
                app.processEvents()
                time.sleep(0.005)

        def on_screen(name):
            return lambda: (not widget.busy and widget._labels() is not None
                            and widget._labels().name != name)

        t0 = time.perf_counter()
        widget.start(src, Path(tmp) / "masks")
        wait(on_screen(""))
        first = time.perf_counter() - t0
        times: dict[str, list[float]] = {"prefetched": [], "not prefetched": []}
        gaps: dict[str, list[float]] = {"prefetched": [], "not prefetched": []}
        for k in range(args.images - 1):
            kind = "prefetched" if k % 2 == 0 else "not prefetched"
            if refine is not None:  # a box around the middle half, refined by LiteMedSAM
                done = refine.refinements
                shapes = refine.start_boxes()
                q, h = args.size / 4, args.size * 3 / 4
                shapes.add_rectangles([np.array([[q, q], [q, h], [h, h], [h, q]])])
                wait(lambda done=done: refine.pending == 0 and refine.refinements > done)
            if kind == "prefetched":
                wait(lambda: widget._prefetch.get("result") is not None)
            name = widget._labels().name
            probe = _GapProbe()
            t0 = time.perf_counter()
            widget.save_and_next()
            wait(on_screen(name))
            times[kind].append(time.perf_counter() - t0)
            t1 = time.time()
            wait(lambda t1=t1: time.time() - t1 > 1.0)
            gaps[kind].append(probe.stop())
        # back to the first image, saved (its mask, no heatmap), from the last one (segmented)
        name = widget._labels().name
        probe = _GapProbe()
        t0 = time.perf_counter()
        widget.jump(0)
        wait(on_screen(name))
        reopen = time.perf_counter() - t0
        t1 = time.time()
        wait(lambda: time.time() - t1 > 1.0)
        reopen_gap = probe.stop()
        wait(lambda: not widget.busy and widget._prefetch.get("worker") is None)  # no worker left running
        widget.close()
        app.processEvents()
        viewer.close()
    print(f"{args.images} images of {args.size}x{args.size}, {args.threads} threads, CPU; "
          f"first image (model load + segmentation) {first:.2f} s")
    if args.box:
        print("each image corrected with a box of the refine widget first")
    for kind, values in times.items():
        if values:
            print(f"  Save & next, {kind:15s} median {np.median(values):.3f} s over {len(values)}; longest GUI gap "
                  f"from the key to 1 s after: median {np.median(gaps[kind]):.0f} ms, max {max(gaps[kind]):.0f} ms")
    print(f"  back to a saved image (its mask, no heatmap) {reopen:.3f} s; longest GUI gap {reopen_gap:.0f} ms")
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
