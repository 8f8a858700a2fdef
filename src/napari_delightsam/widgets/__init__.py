"""napari widgets of De-LightSAM: segment, fine-tune, export.

The napari/Qt-free logic lives in plain modules that can be tested without a viewer:
``core`` (input checks, thresholds, layer naming, edit detection, output folders),
``export`` (PNG/TIFF + provenance JSON), ``settings`` (remembered choices),
``model_cache`` (one Segmenter per checkpoint and device) and ``finetune_job`` (the training
child process and its progress stream), ``notify`` (notifications). ``segment_widget``,
``finetune_widget`` and ``refine_widget`` (correct with a box, LiteMedSAM) are the dock widgets
named in ``napari.yaml``; importing this package does not import Qt.
"""

from __future__ import annotations

__all__ = ["SegmentWidget", "FinetuneWidget", "RefineWidget"]


def __getattr__(name: str):  # lazy: keep Qt out of `import napari_delightsam.widgets`
    if name == "SegmentWidget":
        from .segment_widget import SegmentWidget

        return SegmentWidget
    if name == "FinetuneWidget":
        from .finetune_widget import FinetuneWidget

        return FinetuneWidget
    if name == "RefineWidget":
        from .refine_widget import RefineWidget

        return RefineWidget
    raise AttributeError(name)
