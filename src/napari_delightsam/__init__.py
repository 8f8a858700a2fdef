"""napari-delightsam: De-LightSAM prompt-free medical segmentation for napari, CLI and Python.

Public API::

    from napari_delightsam import load_model
    seg = load_model()                      # bundled model in weights/, offline
    result = seg.segment(image, modality="dermoscopy")
    result.mask, result.probability, result.patch_heatmap
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import MODALITIES, ModelConfig  # noqa: E402

__all__ = ["MODALITIES", "ModelConfig", "__version__", "load_model", "Segmenter", "SegmentationResult"]


def __getattr__(name: str):  # lazy: keep `import napari_delightsam` light for napari's plugin scan
    if name in ("load_model", "Segmenter", "SegmentationResult"):
        from . import inference

        return getattr(inference, name)
    raise AttributeError(name)
