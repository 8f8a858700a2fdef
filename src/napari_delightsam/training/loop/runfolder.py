"""A run folder's shared files and the run log: what every training loop writes and reads back.

    last.safetensors        the model after the last finished epoch (written by the caller's saver)
    last_state.safetensors  optimizer + scheduler of that epoch (``state.py``: no pickle)
    metrics.jsonl           one JSON object per line: "initial", "step" and "epoch" rows
    curves.png              loss / validation curves (segmentation training only)

Each loop adds its own descriptor (``run.json`` for ``train``, ``distill.json`` for MDKD).
``RunLog`` owns the progress events, the metrics rows and the in-memory history; only the main
rank writes (DDP), every rank keeps the same history.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...atomic_files import atomic_write
from ..errors import TrainingError
from .state import load_training_state, save_training_state

__all__ = [
    "CURVES",
    "LAST",
    "LAST_STATE",
    "METRICS",
    "ProgressFn",
    "RunLog",
    "SaveModel",
    "load_resumable",
    "prepare_run_folder",
    "read_metrics",
    "require_resumable",
    "save_resumable",
    "write_json",
]

LAST = "last.safetensors"
LAST_STATE = "last_state.safetensors"
METRICS = "metrics.jsonl"
CURVES = "curves.png"

#: receives progress events: ``{"event": name, ...fields}``
ProgressFn = Callable[[dict[str, Any]], None]


def prepare_run_folder(out: Path, resume: bool, descriptor: str, *, create: bool = True) -> None:
    """Check ``out`` for a new run (absent or empty) or a resumed one (holds ``descriptor``).

    ``create``: make the folder (the main rank does; other DDP ranks only check).
    """
    if resume:
        if not (out / descriptor).is_file():
            raise TrainingError(f"cannot resume: {out} holds no {descriptor} (not a training run folder)")
        return
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise TrainingError(
            f"output folder {out} is not empty; choose a new folder, or pass resume=True (--resume) to continue it"
        )
    if create:
        out.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented, key-sorted JSON, written atomically (non-JSON values as ``str``)."""
    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line cut by a crash is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _write_metrics(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")


class RunLog:
    """Progress events, ``metrics.jsonl`` rows and the history of one run.

    ``progress`` gets every event on the main rank; ``record`` appends a row to the file and
    the history (main rank); ``plot`` redraws ``curves`` from the history when a path is set.
    """

    def __init__(
        self,
        metrics: Path,
        progress: ProgressFn | None = None,
        *,
        is_main: bool = True,
        curves: Path | None = None,
    ) -> None:
        self.metrics = metrics
        self.progress = progress
        self.is_main = is_main
        self.curves = curves
        self.history: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        if self.progress is not None and self.is_main:
            self.progress(event)

    def warn(self, message: str, category: type[Warning] = UserWarning) -> None:
        """A user-facing warning: a Python warning and a ``warning`` event (main rank)."""
        if self.is_main:
            warnings.warn(message, category, stacklevel=3)
            self.emit({"event": "warning", "message": message})

    def record(self, row: dict[str, Any]) -> None:
        if self.is_main:
            _append_metrics(self.metrics, row)
            self.history.append(row)

    def resume_at(self, start_epoch: int) -> None:
        """Keep the rows of finished epochs (< ``start_epoch``) as the history; the main rank also
        drops the others from the file (lines of an epoch that was cut off)."""
        self.history = [r for r in read_metrics(self.metrics) if int(r.get("epoch", 0)) < start_epoch]
        if self.is_main:
            _write_metrics(self.metrics, self.history)

    def plot(self) -> None:
        if self.curves is None or not self.is_main:
            return
        from .plot import plot_curves

        try:
            plot_curves(self.history, self.curves)
        except Exception as exc:  # a plot must never stop a training run
            warnings.warn(f"could not draw {self.curves.name}: {exc}", UserWarning, stacklevel=2)


# -- last checkpoint + optimizer state: what resume starts from --------------------------------------


#: (path, metadata) -> writes a model file there (a checkpoint, ViT-Med's trained parts...)
SaveModel = Callable[[Path, dict[str, str]], Path]


def save_resumable(
    out: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    param_names: list[str],
    info: dict[str, Any],
    save_model: SaveModel,
    meta: dict[str, str],
) -> None:
    """Write ``last_state`` (optimizer, scheduler, ``info`` with its ``"epoch"``) then ``last``
    (``save_model(path, meta)``, ``meta`` with the same ``"epoch"``): resume checks they agree."""
    save_training_state(out / LAST_STATE, optimizer, scheduler, param_names, info)
    save_model(out / LAST, meta)


def require_resumable(out: Path) -> None:
    """Refuse a run folder with no finished epoch (before anything is loaded from it)."""
    if not (out / LAST).is_file() or not (out / LAST_STATE).is_file():
        raise TrainingError(f"cannot resume {out}: no finished epoch yet ({LAST} / {LAST_STATE} missing)")


def load_resumable(
    out: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    param_names: list[str],
    advice: str = "start a new run",
) -> dict[str, Any]:
    """Restore optimizer and scheduler from ``last_state``; return its ``info``.

    Refuses when ``last`` and ``last_state`` are of different epochs (a crash between the two
    writes): continuing would pair one epoch's weights with another's optimizer moments.
    """
    from safetensors import safe_open

    require_resumable(out)
    with safe_open(str(out / LAST), framework="pt", device="cpu") as fh:
        model_epoch = (fh.metadata() or {}).get("epoch")
    info = load_training_state(out / LAST_STATE, optimizer, scheduler, param_names)
    if str(info.get("epoch")) != model_epoch:
        raise TrainingError(
            f"cannot resume {out}: {LAST} (epoch {model_epoch}) and {LAST_STATE} (epoch {info.get('epoch')}) "
            f"disagree (interrupted while saving); {advice}"
        )
    return info
