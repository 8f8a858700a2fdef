"""``TrainConfig``: everything that defines a training run (stored in ``run.json`` and in every
checkpoint's metadata, so a run can be resumed and a model traced back to its recipe).

Defaults are the paper's recipe: Adam lr 1e-4, exponential decay 0.98 per epoch, batch 4,
focal + Dice + 0.7·patch BCE, 1024², 200 epochs; plus a small modality cross-entropy for the
"auto" modality head (beyond the paper).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FREEZE_GROUPS", "LR_SCALE_GROUPS", "RESUME_MUTABLE", "TrainConfig", "require_positive_int"]

#: parameter groups that ``freeze`` may name ("encoder": backbone + controllers)
FREEZE_GROUPS = (
    "backbone", "controllers", "encoder", "prompt_generator", "decoder", "fine_upscale", "refiners", "modality_head"
)
#: parameter groups that ``lr_scale`` may name (``optim.PARAM_GROUPS``)
LR_SCALE_GROUPS = ("backbone", "controllers", "prompt_generator", "decoder", "fine_upscale", "refiners", "modality_head")
#: fields a resumed run may change without breaking its schedule
RESUME_MUTABLE = frozenset(
    {
        "epochs",
        "device",
        "num_workers",
        "cache",
        "val_every",
        "log_every",
        "val_at_start",
        "save_init",
        # numerics of the same computation: a run may move to a machine that does them differently
        "amp",
        "amp_cpu",
        "channels_last",
        # a resumed run reads its own splits.json copy
        "splits_file",
        # a wall-clock budget belongs to the session that runs, not to the schedule
        "time_budget_s",
    }
)


def _cpu_has_native_bf16() -> bool:
    from ..devices import cpu_supports_bf16  # imports torch: only when a config is built

    return cpu_supports_bf16()


@dataclass
class TrainConfig:
    # schedule (paper: Adam 1e-4, ×0.98 per epoch, batch 4, 200 epochs at 1024²)
    epochs: int = 200
    #: optimizer steps per epoch; None = one pass over the training images
    steps_per_epoch: int | None = None
    img_size: int = 1024
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    gamma: float = 0.98
    weight_decay: float = 0.0
    #: learning-rate multiplier per parameter group (LR_SCALE_GROUPS), e.g. {"backbone": 0.1};
    #: groups not named train at ``lr``. Empty: one optimizer group, as the paper's recipe
    lr_scale: dict[str, float] = field(default_factory=dict)
    grad_clip: float | None = None
    # losses (Eq. 3, 8) + modality head
    patch_weight: float = 0.7
    modality_weight: float = 0.1
    train_modality_head: bool = True
    # model
    #: "default" (the paper's model) or "tiny" (tests, smoke runs)
    model_preset: str = "default"
    #: ModelConfig field overrides, e.g. {"controller_ffn_ratio": 1.0}
    model: dict[str, Any] = field(default_factory=dict)
    #: "none" | "litemedsam" (DC-Encoder backbone from LiteMedSAM) | path to a .safetensors checkpoint
    init: str = "none"
    #: parameter groups to keep fixed, from FREEZE_GROUPS
    freeze: tuple[str, ...] = ()
    #: BatchNorm running statistics fixed; None = fixed when starting from pretrained weights
    freeze_bn: bool | None = None
    # data
    seed: int = 0
    modalities: tuple[str, ...] | None = None
    max_per_dataset: int | None = None
    val_max_per_dataset: int | None = None
    #: which validation picks ``best``: "val" (the in-domain val split) or "val+unseen" (the mean
    #: of in-domain and unseen-domain validation Dice; needs a split with an ``unseen`` part, e.g.
    #: ``benchmarks/protocol/splits-unseen-v1.json``). Both are reported whenever the split has one
    select_on: str = "val"
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    #: use this splits.json (e.g. an earlier run's) instead of making a split; samples it does not
    #: name are left out, and named samples missing from the data are simply absent
    splits_file: str | None = None
    balanced: bool = True
    augment: bool = True
    #: per-modality changes to the augmentation policy (``data.augment.AugmentPolicy`` fields),
    #: e.g. {"microscopy": {"channel_order_p": 0.5, "greyscale_p": 0.3}}; modalities not named
    #: keep their policy
    augment_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache: bool = True
    num_workers: int = 2
    # runtime
    device: str = "auto"
    #: bf16 autocast on CUDA (ignored on CPU unless ``amp_cpu``)
    amp: bool = True
    #: bf16 autocast on CPU too. Default: on where the CPU computes bf16 natively (AMX /
    #: AVX512-BF16, ``devices.cpu_supports_bf16``: 1.8x per step there), off elsewhere (emulated
    #: bf16 is slower than fp32); measured with benchmarks/cpu_levers.py --train, see the README
    amp_cpu: bool = field(default_factory=_cpu_has_native_bf16)
    #: channels_last memory format for weights and images (1.5x per step in fp32, 1.27x with bf16,
    #: 512², batch 4, this project's 2-core CPU: benchmarks/cpu_levers.py --train; also the faster
    #: layout for TinyViT's convolutions on GPUs)
    channels_last: bool = True
    val_every: int = 1
    #: validate the starting weights too (an "initial" line in metrics.jsonl: the baseline)
    val_at_start: bool = True
    #: also write the starting weights as init.safetensors (to evaluate the baseline later)
    save_init: bool = False
    #: a "step" line in metrics.jsonl every N optimizer steps (0 = epoch lines only)
    log_every: int = 10
    #: seconds of training (steps + validation) after which the first validated epoch to end is
    #: the last one: the run ends as finished, best kept (e.g. a lent GPU's fixed time); counted
    #: from the start (or resume) of this call; None = the schedule's epochs
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("freeze", "modalities", "split_ratios"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        self.validate()
        # floats, so that a JSON round trip (run.json, --config) gives an equal config
        self.lr_scale = {g: float(v) for g, v in self.lr_scale.items()}

    def validate(self) -> None:
        require_positive_int(self, "epochs", "img_size", "batch_size", "grad_accum", "val_every")
        for name in ("steps_per_epoch", "max_per_dataset", "val_max_per_dataset"):
            if getattr(self, name) is not None:
                require_positive_int(self, name)
        if self.img_size % 64:
            raise ValueError(f"img_size must be a multiple of 64, got {self.img_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 seconds, got {self.time_budget_s}")
        if self.select_on not in ("val", "val+unseen"):
            raise ValueError(f"select_on must be 'val' or 'val+unseen', got {self.select_on!r}")
        if self.model_preset not in ("default", "tiny"):
            raise ValueError(f"model_preset must be 'default' or 'tiny', got {self.model_preset!r}")
        bad = [g for g in self.freeze if g not in FREEZE_GROUPS]
        if bad:
            raise ValueError(
                f"unknown freeze group(s) {', '.join(bad)}; choose from {', '.join(FREEZE_GROUPS)}"
            )
        if len(self.split_ratios) != 3 or any(r < 0 for r in self.split_ratios):
            raise ValueError(f"split_ratios must be three non-negative numbers, got {self.split_ratios}")
        self._validate_lr_scale()
        if not isinstance(self.augment_overrides, dict):
            raise ValueError(f"augment_overrides must be a mapping of modality -> fields, got {self.augment_overrides!r}")
        from ..data.augment import policies_with

        policies_with(self.augment_overrides)  # ValueError for an unknown field or a bad value

    def _validate_lr_scale(self) -> None:
        if not isinstance(self.lr_scale, dict):
            raise ValueError(f"lr_scale must be a mapping of group -> multiplier, got {self.lr_scale!r}")
        bad = [g for g in self.lr_scale if g not in LR_SCALE_GROUPS]
        if bad:
            raise ValueError(
                f"unknown lr_scale group(s) {', '.join(map(str, bad))}; choose from {', '.join(LR_SCALE_GROUPS)}"
            )
        for group, scale in self.lr_scale.items():
            ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
            if not ok or not scale > 0:
                raise ValueError(
                    f"lr_scale[{group!r}] must be a number > 0, got {scale!r} (to keep a group fixed, freeze it)"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainConfig:
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"training config not found: {p}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a JSON object of training settings")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{p}: {exc}") from exc

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def require_positive_int(obj: object, *names: str) -> None:
    """``ValueError`` unless each attribute ``names`` of ``obj`` is an int >= 1."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
