"""Screenshots of the real napari window for the README (run under Xvfb, see below).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py

Writes ``docs/screenshots/segment_widget.png`` (an image, the segment widget, the mask and the
patch-prompt heatmap), ``docs/screenshots/refine_widget.png`` (the refine widget after Refine all
and one box drawn) and ``docs/screenshots/finetune_widget.png`` (the fine-tune widget after a
short fine-tune of the same model on the image and its mask) and ``docs/screenshots/annotate_widget.png``
(the annotate widget on a folder of three synthetic dermoscopy images, the first saved);
``--only`` picks some of them. The image is the package's
synthetic dermoscopy sample: committed screenshots must not carry images of the training
data (``../shared/data``'s licenses forbid copies in this repository). ``--image FILE`` (with a
mask beside it) or ``--from-data`` (the first image of ``--modality`` in the data) show a real
image, for local looks only.
The model is the bundled one when installed, else random weights (``--checkpoint`` to choose).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _data_image(modality: str) -> Path | None:
    roots = [Path(os.environ["DELIGHTSAM_DATA"])] if os.environ.get("DELIGHTSAM_DATA") else []
    roots.append(REPO.parent / "shared" / "data")
    for root in roots:
        files = sorted((root / modality).glob("*/images/*"))
        if files:
            return files[0]
    return None


def _mask_for(image_path: Path):
    import numpy as np
    from PIL import Image

    mask = image_path.parent.parent / "masks" / (image_path.stem + ".png")
    if not mask.is_file():
        return None
    return (np.asarray(Image.open(mask)) > 0).astype(np.uint8)


def _wait(app, predicate, timeout: float) -> bool:
    t0 = time.monotonic()
    while not predicate():
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > timeout:
            return False
    for _ in range(20):
        app.processEvents()
        time.sleep(0.01)
    return True


def _annotate_screenshot(args: argparse.Namespace, spec: str, size: tuple[int, int]) -> int:
    """The annotate widget on a folder of three synthetic dermoscopy images (written to a temporary
    folder, masks beside them), after the first image was saved and the second opened."""
    import tempfile

    import napari
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from napari_delightsam.sample_data import make_dermoscopy

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "lesions", Path(tmp) / "lesions-masks"
        src.mkdir()
        for i, seed in enumerate((7, 11, 23)):
            Image.fromarray(make_dermoscopy(seed)[0]).save(src / f"lesion_{i + 1:03d}.png")
        viewer = napari.Viewer(title="napari — De-LightSAM")
        viewer.window._qt_window.resize(*size)
        app = QApplication.instance()
        _, widget = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM annotate")
        if spec not in ("bundled", "untrained"):
            widget.use_checkpoint(spec)
        else:
            widget.model_combo.setCurrentIndex(widget.model_combo.findData(spec))
        widget.modality_combo.setCurrentText("dermoscopy")
        widget.device_combo.setCurrentText("cpu")

        def on_screen(name: str) -> bool:
            labels = widget._labels()
            return not widget.busy and labels is not None and labels.name == f"{name}_delightsam_mask"

        cwd = Path.cwd()
        os.chdir(tmp)  # the widget shows the folders as typed: relative, not a temporary path
        try:
            widget.start(src.name, out.name)
        finally:
            os.chdir(cwd)
        if not _wait(app, lambda: on_screen("lesion_001"), 600):
            print("the annotate widget did not open the first image in time", file=sys.stderr)
            return 1
        widget.save_and_next()
        if not _wait(app, lambda: on_screen("lesion_002"), 600):
            print("the annotate widget did not open the next image in time", file=sys.stderr)
            return 1
        viewer.reset_view()
        _wait(app, lambda: True, 1)
        path = args.out / "annotate_widget.png"
        Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(path)
        print(f"wrote {path}")
        from napari.qt.threading import WorkerBase

        WorkerBase.await_workers(600_000)  # the next image's prefetch (napari's own quit does this)
        viewer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, help="image file (default: the synthetic dermoscopy sample)")
    parser.add_argument("--from-data", action="store_true", help="the first --modality image of the data (not to commit)")
    parser.add_argument("--modality", default="dermoscopy")
    parser.add_argument("--checkpoint", help="checkpoint file or 'untrained' (default: bundled if installed)")
    parser.add_argument("--out", type=Path, default=HERE / "screenshots")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-steps", type=int, default=3)
    parser.add_argument("--finetune-size", type=int, default=512)
    parser.add_argument("--size", default="1600x1000", help="window size WxH")
    parser.add_argument("--only", nargs="+", choices=("segment", "refine", "finetune", "annotate"),
                        default=["segment", "refine", "finetune", "annotate"], help="which screenshots to write")
    args = parser.parse_args(argv)

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_delightsam.checkpoint import bundled_checkpoint_path
    from napari_delightsam.image_files import read_image
    from napari_delightsam.sample_data import load_sample

    os.environ.setdefault("DELIGHTSAM_CONFIG_DIR", str(Path.home() / ".cache" / "delightsam-screenshots"))
    args.out.mkdir(parents=True, exist_ok=True)
    image_path = args.image or (_data_image(args.modality) if args.from_data else None)
    if image_path is not None:
        image, mask, name = read_image(image_path), _mask_for(image_path), image_path.stem
    else:
        image, mask = load_sample("synthetic_dermoscopy")
        mask, name = (mask > 0).astype(np.uint8), "synthetic_dermoscopy"

    width, height = (int(v) for v in args.size.split("x"))
    spec = args.checkpoint or ("bundled" if bundled_checkpoint_path() else "untrained")
    if "annotate" in args.only:
        code = _annotate_screenshot(args, spec, (width, height))
        if code or args.only == ["annotate"]:
            return code

    viewer = napari.Viewer(title="napari — De-LightSAM")
    viewer.window._qt_window.resize(width, height)
    app = QApplication.instance()
    viewer.add_image(image, name=name, rgb=image.ndim == 3)
    dock, seg = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM segment")
    if spec not in ("bundled", "untrained"):
        seg.use_checkpoint(spec)
    else:
        seg.model_combo.setCurrentIndex(seg.model_combo.findData(spec))
    seg.modality_combo.setCurrentText(args.modality)
    seg.device_combo.setCurrentText("auto")
    seg.image_combo.value = viewer.layers[name]
    seg.run()
    if not _wait(app, lambda: not seg.busy, 600):
        print("segmentation did not finish in time", file=sys.stderr)
        return 1
    viewer.layers.selection.active = viewer.layers[f"{name}_delightsam_mask"]
    viewer.reset_view()
    _wait(app, lambda: True, 1)
    from PIL import Image

    if "segment" in args.only:
        path = args.out / "segment_widget.png"
        Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(path)
        print(f"wrote {path}")

    if "refine" in args.only:  # Refine all, then one box around the reference object
        _, ref = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM refine", tabify=True)
        ref.image_picker.value = viewer.layers[name]
        ref.labels_picker.value = viewer.layers[f"{name}_delightsam_mask"]
        ref.device_combo.value = "cpu"
        ref.refine_all()
        shapes = ref.start_boxes()
        if mask is not None and shapes is not None and mask.any():
            rows, cols = np.nonzero(mask)
            r0, r1, c0, c1 = rows.min() - 0.5, rows.max() + 0.5, cols.min() - 0.5, cols.max() + 0.5
            shapes.add_rectangles([np.array([[r0, c0], [r0, c1], [r1, c1], [r1, c0]])])
        if not _wait(app, lambda: ref.pending == 0, 600):
            print("refinement did not finish in time", file=sys.stderr)
        viewer.layers.selection.active = viewer.layers[f"{name}_delightsam_mask"]
        _wait(app, lambda: True, 1)
        path = args.out / "refine_widget.png"
        Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(path)
        print(f"wrote {path}")
    if "finetune" not in args.only:
        viewer.close()
        return 0

    # fine-tune widget: the image with its reference mask (or the model's mask) as a pair
    if mask is not None:
        viewer.add_labels(mask, name=f"{name}_reference", opacity=0.4, visible=False)
    labels = f"{name}_reference" if mask is not None else f"{name}_delightsam_mask"
    # tabbed next to the segment widget, which stays alive to receive the new checkpoint
    ft_dock, ft = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM fine-tune", tabify=True)
    ft_dock.raise_()
    ft.add_pair(name, labels, args.modality)
    ft.epochs_spin.setValue(args.finetune_epochs)
    ft.steps_spin.setValue(args.finetune_steps)
    ft.img_size_combo.setCurrentText(str(args.finetune_size))
    if args.finetune_epochs > 0:
        ft.start()
        if not _wait(app, lambda: not ft.busy, 1200):
            print("fine-tune did not finish in time", file=sys.stderr)
    path = args.out / "finetune_widget.png"
    Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(path)
    print(f"wrote {path}")
    print(ft.log.toPlainText())
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
