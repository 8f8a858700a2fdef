"""napari-delightsam: De-LightSAM prompt-free medical segmentation for napari, CLI and Python.

Public API::

    from napari_delightsam import load_model
    seg = load_model()                      # bundled model in weights/, offline
    result = seg.segment(image, modality="dermoscopy")
    result.mask, result.probability, result.patch_heatmap

    from napari_delightsam import load_refiner   # correct with a box (LiteMedSAM)
    refiner = load_refiner()
    refiner.set_image(image)                # embedding computed once per image
    mask = refiner.segment_box((x0, y0, x1, y1))   # (H, W) bool, x = column, y = row

    from napari_delightsam import refine_objects  # every object of a mask, redrawn from its box
    better = refine_objects(refiner, result.mask).labels
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import MODALITIES, ModelConfig  # noqa: E402

__all__ = [
    "MODALITIES",
    "BoxRefiner",
    "ModelConfig",
    "SegmentationResult",
    "Segmenter",
    "__version__",
    "load_model",
    "load_refiner",
    "refine_objects",
]


def __getattr__(name: str):  # lazy: keep `import napari_delightsam` light for napari's plugin scan
    if name in ("load_model", "Segmenter", "SegmentationResult"):
        from . import inference

        return getattr(inference, name)
    if name in ("load_refiner", "BoxRefiner", "refine_objects"):
        from . import refine

        return getattr(refine, name)
    raise AttributeError(name)
