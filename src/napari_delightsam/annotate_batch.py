"""The annotation loop without a person: segment every image of a session that has no mask yet,
save each mask with its provenance (atomically), and -- with a :class:`~.annotate_learning.Learner`
whose ``every`` is set -- fine-tune after every ``every`` saved masks, segmenting the next
images with the new model only when it won on the held-out images.

``delightsam annotate`` is this module on the command line. Without corrections the masks it
trains on are the model's own: fine-tuning helps when the output folder already holds corrected
masks (an earlier session in napari), which count as saved images like the new ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .annotate_learning import BUNDLED, THRESHOLD, UNTRAINED, Learner

if TYPE_CHECKING:
    from .annotate import AnnotationSession

__all__ = ["annotate_all", "load_segmenter", "segment_and_save"]

Progress = Callable[[dict[str, Any]], None]


def load_segmenter(spec: str, device: str) -> Any:
    """A Segmenter for a model choice: "bundled", "untrained" or a checkpoint file."""
    from .inference import load_model

    return load_model(None if spec == BUNDLED else spec, device=device)


def provenance(spec: str, segmenter: Any, result: Any, modality: str, image: np.ndarray, seconds: float,
               model_name: str | None = None) -> dict[str, Any]:
    """The sidecar record of a mask segmented here (the annotate widget's fields)."""
    from . import __version__
    from .widgets.core import utc_now

    path = getattr(segmenter, "checkpoint_path", None)
    return {
        "model_file": str(path) if path else None,
        "model_sha256": getattr(segmenter, "checkpoint_sha256", None),
        "model": spec if spec in (BUNDLED, UNTRAINED) else "file",
        "model_name": model_name,
        "modality": modality,
        "modality_used": result.modality,
        "modality_probabilities": result.modality_probabilities,
        "threshold": THRESHOLD,
        "instances": False,
        "input_shape": list(image.shape),
        "time": utc_now(),
        "device": str(getattr(segmenter, "device", "")),
        "seconds": round(seconds, 3),
        "package_version": __version__,
        "edited_after_segmentation": False,
    }


def segment_and_save(session: AnnotationSession, index: int, segmenter: Any, spec: str, modality: str,
                     model_name: str | None = None) -> list[Path] | None:
    """Segment image ``index`` and save its mask + sidecar; None when the image cannot be read."""
    image = session.load_image(index)
    if image is None:
        return None
    started = time.perf_counter()
    result = segmenter.segment(image, modality, THRESHOLD)
    prov = provenance(spec, segmenter, result, modality, image, time.perf_counter() - started, model_name)
    return session.save(index, result.mask.astype(np.uint8), provenance=prov)


def annotate_all(
    session: AnnotationSession,
    base: str,
    *,
    device: str = "auto",
    modality: str = "auto",
    learner: Learner | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Segment and save every readable image without a mask (in name order); returns a summary
    ``{"saved", "unreadable", "rounds": [RoundResult...], "models": {image: model}}``."""
    emit = progress or (lambda _event: None)
    loaded: dict[str, Any] = {}
    summary: dict[str, Any] = {"saved": 0, "unreadable": [], "rounds": [], "models": {}}
    index = session.next_todo(-1)
    while index is not None:
        spec = learner.model_for(base) if learner is not None else base
        if spec not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[spec] = load_segmenter(spec, device)
        name = learner.describe(spec) if learner is not None else spec
        written = segment_and_save(session, index, loaded[spec], spec, modality, name)
        if written is None:
            summary["unreadable"].append(session.name(index))
            emit({"event": "unreadable", "image": session.name(index), "reason": session.unreadable.get(session.name(index))})
        else:
            summary["saved"] += 1
            summary["models"][session.name(index)] = name
            emit({"event": "saved", "image": session.name(index), "mask": written[0].name, "model": name,
                  "summary": session.summary()})
        if learner is not None and learner.due():
            result = learner.run_round_blocking(base)
            summary["rounds"].append(result)
            emit({"event": "round", "round": result.round, "status": result.status, "message": result.message})
        index = session.next_todo(index)
    return summary
