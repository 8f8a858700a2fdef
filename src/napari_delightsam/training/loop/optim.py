"""Which parameters train, and how fast: freeze groups, per-group learning rates, Adam + decay.

De-LightSAM's parameters fall into seven groups (``PARAM_GROUPS``): the DC-Encoder backbone, the
modality controllers inside it, the SP-Generator, the QM-Decoder, the decoder's stride-2 stage
(``fine_upscale``, where the model has one), its per-modality refiners (``refiners``, where it
has any) and the modality head.
``freeze`` fixes whole groups; ``lr_scale`` multiplies the learning rate of a group. The
optimizer is the paper's: Adam, the learning rate × ``gamma`` after every epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import TrainingError

__all__ = [
    "PARAM_GROUPS",
    "Optimisation",
    "adam_exponential",
    "apply_freeze",
    "current_lr",
    "lr_groups",
    "named_parameter_groups",
    "train_only",
]

#: the parameter groups of a De-LightSAM network, in model order
PARAM_GROUPS = ("backbone", "controllers", "prompt_generator", "decoder", "fine_upscale", "refiners", "modality_head")

NamedParams = list[tuple[str, nn.Parameter]]


def named_parameter_groups(model: nn.Module) -> dict[str, NamedParams]:
    """``model``'s (name, parameter) pairs by group (``PARAM_GROUPS``), each in model order."""
    controller_ids = {id(p) for p in model.encoder.controller_parameters()}
    groups: dict[str, NamedParams] = {g: [] for g in PARAM_GROUPS}
    for name, p in model.named_parameters():
        if name.startswith("encoder."):
            groups["controllers" if id(p) in controller_ids else "backbone"].append((name, p))
        elif name.startswith("prompt_generator."):
            groups["prompt_generator"].append((name, p))
        elif name.startswith("decoder.fine."):
            groups["fine_upscale"].append((name, p))
        elif name.startswith("decoder.refiners."):
            groups["refiners"].append((name, p))
        elif name.startswith("decoder."):
            groups["decoder"].append((name, p))
        elif name.startswith("modality_head."):
            groups["modality_head"].append((name, p))
        else:  # pragma: no cover - a new top-level part: train it
            groups["backbone"].append((name, p))
    return groups


def apply_freeze(model: nn.Module, freeze: Iterable[str], train_modality_head: bool = True) -> NamedParams:
    """Set ``requires_grad`` per group (``freeze`` may also name ``"encoder"``: backbone +
    controllers); return the trainable (name, param) pairs in model order."""
    frozen = set(freeze)
    if "encoder" in frozen:
        frozen |= {"backbone", "controllers"}
    if not train_modality_head:
        frozen.add("modality_head")
    for group, params in named_parameter_groups(model).items():
        for _, p in params:
            p.requires_grad_(group not in frozen)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("every parameter group is frozen: nothing to train")
    return trainable


def train_only(model: nn.Module, group: str) -> NamedParams:
    """Freeze everything but ``group``; return its (name, param) pairs (possibly none)."""
    model.requires_grad_(False)
    trainable = named_parameter_groups(model)[group]
    for _, p in trainable:
        p.requires_grad_(True)
    return trainable


def lr_groups(
    model: nn.Module, trainable: Sequence[tuple[str, nn.Parameter]], lr_scale: Mapping[str, float]
) -> list[tuple[NamedParams, float]]:
    """(params, learning-rate multiplier) per optimizer group.

    No ``lr_scale``: one group of ``trainable`` (the optimizer and its saved state exactly as
    before per-group rates existed); otherwise one group per parameter group that trains,
    multiplier 1.0 where ``lr_scale`` does not name it.
    """
    if not lr_scale:
        return [(list(trainable), 1.0)]
    ids = {id(p) for _, p in trainable}
    out = []
    for group, params in named_parameter_groups(model).items():
        chosen = [(n, p) for n, p in params if id(p) in ids]
        if chosen:
            out.append((chosen, float(lr_scale.get(group, 1.0))))
    return out


@dataclass(frozen=True)
class Optimisation:
    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.ExponentialLR
    #: trainable parameter names in the optimizer's order (stored with its state, checked on resume)
    param_names: list[str]


def adam_exponential(
    groups: Sequence[tuple[Sequence[tuple[str, nn.Parameter]], float]],
    lr: float,
    gamma: float,
    weight_decay: float = 0,  # torch's own default (an int): distillation's saved state as before
) -> Optimisation:
    """Adam over ``groups`` ((params, lr multiplier) each) and ``ExponentialLR(gamma)``.

    A lone group with multiplier 1 is a plain Adam group; otherwise each group gets its own
    ``lr`` and records its ``lr_scale`` (``current_lr`` divides it out again).
    """
    if len(groups) == 1 and groups[0][1] == 1.0:
        param_groups: list[dict[str, Any]] = [{"params": [p for _, p in groups[0][0]]}]
    else:
        param_groups = [
            {"params": [p for _, p in params], "lr": lr * scale, "lr_scale": scale}
            for params, scale in groups
        ]
    optimizer = torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    return Optimisation(optimizer, scheduler, [n for params, _ in groups for n, _ in params])


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's base learning rate now (first group's rate over its multiplier)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)
