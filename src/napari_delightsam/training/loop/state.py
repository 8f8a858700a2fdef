"""Resumable training state without pickle: optimizer + scheduler in a safetensors file.

``save_training_state(path, optimizer, scheduler, param_names, info)`` writes the optimizer's
per-parameter tensors (Adam: ``exp_avg``, ``exp_avg_sq``, ``step``) as safetensors tensors
named ``state.<param index>.<field>``, and the JSON-serialisable parts (param-group
hyperparameters, scheduler state, the ordered parameter names, caller ``info``) as metadata.
``load_training_state`` restores them into freshly built objects and checks that the
parameter names match, so a state file is never applied to a different model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...atomic_files import atomic_write

__all__ = ["TrainingStateError", "load_training_state", "save_training_state"]

_FORMAT = "napari-delightsam-training-state"


class TrainingStateError(ValueError):
    """The training-state file is missing, corrupt or belongs to another model."""


def save_training_state(
    path: str | Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    param_names: list[str],
    info: dict[str, Any],
) -> Path:
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
        for g in sd["param_groups"]
    ]
    meta = {
        "format": _FORMAT,
        "param_names": json.dumps(param_names),
        "param_groups": json.dumps(groups),
        "scalars": json.dumps(scalars),
        "scheduler": json.dumps(scheduler.state_dict() if scheduler is not None else None),
        "info": json.dumps(info),
    }
    if not tensors:  # safetensors needs at least one tensor to be a useful file
        tensors["_empty"] = torch.zeros(0)
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_training_state(
    path: str | Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    param_names: list[str],
) -> dict[str, Any]:
    """Restore optimizer/scheduler in place; return the stored ``info``."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise TrainingStateError(f"training state not found: {p}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise TrainingStateError(f"{p}: not a readable training-state file ({exc})") from exc
    if meta.get("format") != _FORMAT:
        raise TrainingStateError(f"{p}: not a napari-delightsam training-state file")
    try:
        stored_names = json.loads(meta["param_names"])
        groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta["scalars"])
        sched = json.loads(meta["scheduler"])
        info = json.loads(meta["info"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise TrainingStateError(f"{p}: incomplete training-state metadata ({exc})") from exc
    if stored_names != param_names:
        raise TrainingStateError(
            f"{p}: the optimizer state belongs to a different set of trainable parameters "
            f"({len(stored_names)} stored vs {len(param_names)} now); was the model or 'freeze' changed?"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key == "_empty":
            continue
        _, idx, field = key.split(".", 2)
        state.setdefault(int(idx), {})[field] = value
    for idx, values in scalars.items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scheduler is not None and sched is not None:
        scheduler.load_state_dict(sched)
    return info
