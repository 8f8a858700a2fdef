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

The machine's load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--modality", default="dermoscopy")
    parser.add_argument("--threads", type=int, default=2)
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
        for k in range(args.images - 1):
            kind = "prefetched" if k % 2 == 0 else "not prefetched"
            if kind == "prefetched":
                wait(lambda: widget._prefetch.get("result") is not None)
            name = widget._labels().name
            t0 = time.perf_counter()
            widget.save_and_next()
            wait(on_screen(name))
            times[kind].append(time.perf_counter() - t0)
        widget.close()
        app.processEvents()
        viewer.close()
    print(f"{args.images} images of {args.size}x{args.size}, {args.threads} threads, CPU; "
          f"first image (model load + segmentation) {first:.2f} s")
    for kind, values in times.items():
        if values:
            print(f"  Save & next, {kind:15s} median {np.median(values):.3f} s over {len(values)}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
