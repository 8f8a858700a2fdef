"""The one exception type of the training backend (train, the MDKD stages, evaluation helpers)."""

from __future__ import annotations

__all__ = ["TrainingError"]


class TrainingError(RuntimeError):
    """An expected training failure (bad run folder, out of memory, nothing to train...)."""
