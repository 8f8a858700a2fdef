"""The network a training run starts from: ``TrainConfig`` -> a seeded ``DeLightSAM``.

Initialisation is ``cfg.init``: "none" (random, seeded), "litemedsam" (the DC-Encoder backbone
from LiteMedSAM's TinyViT) or a De-LightSAM checkpoint (its architecture, with ``cfg.model``
overrides that keep the tensors' shapes; ``mask_stride: 2`` on a stride-4 checkpoint adds the
decoder's fine stage, which starts out as a plain ×2 upsampling of the checkpoint's logits;
``refiner_modalities`` adds a refiner per new modality, which starts out as the identity).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig, darkfield_refiner_name, tiny_config
from ..model import DeLightSAM
from .config import TrainConfig
from .errors import TrainingError

__all__ = ["ADDED_BY_OVERRIDE", "build_model", "inherits_trained_head", "model_config_for", "modality_head_trained", "set_train_mode"]

#: tensors a ``cfg.model`` override may add to a checkpoint's network: the fine stage
#: (``mask_stride`` 4 -> 2) and the refiner of a modality added to ``refiner_modalities``
ADDED_BY_OVERRIDE = ("decoder.fine.", "decoder.refiners.")


#: checkpoint metadata that calibrates ``auto`` (the confidence below which it asks, and the
#: appearance head's provenance); the temperature is a buffer of the head itself
CALIBRATION_KEYS = ("auto_confidence_threshold", "appearance_head")


def model_config_for(cfg: TrainConfig) -> ModelConfig:
    """The preset's ``ModelConfig`` with ``cfg.model`` overrides and the training image size."""
    base = tiny_config() if cfg.model_preset == "tiny" else ModelConfig()
    changes = dict(cfg.model)
    changes["img_size"] = cfg.img_size
    try:
        return ModelConfig.from_dict({**base.to_dict(), **changes})
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"invalid model settings: {exc}") from exc


def build_model(cfg: TrainConfig) -> tuple[DeLightSAM, dict[str, Any]]:
    """A seeded ``DeLightSAM`` for ``cfg`` with its initialisation applied; returns a report."""
    init = cfg.init
    torch.manual_seed(cfg.seed)
    if init not in ("none", "litemedsam"):
        return _from_checkpoint(cfg, Path(init).expanduser())
    model = DeLightSAM(model_config_for(cfg))
    if init == "litemedsam":
        try:
            from .litemedsam_init import init_encoder_from_litemedsam
        except ImportError as exc:
            raise TrainingError(f"--init litemedsam needs the LiteMedSAM interop ({exc})") from exc
        try:
            report = init_encoder_from_litemedsam(model)
        except (ImportError, FileNotFoundError) as exc:
            raise TrainingError(
                f"--init litemedsam: {exc} (install the extra: pip install 'napari-delightsam[litemedsam]')"
            ) from exc
        return model, {"init": "litemedsam", **{k: _jsonable(v) for k, v in dict(report).items()}}
    return model, {"init": "none"}


def _from_checkpoint(cfg: TrainConfig, path: Path) -> tuple[DeLightSAM, dict[str, Any]]:
    from ..checkpoint import CheckpointError, load_checkpoint, read_checkpoint_info

    try:
        stored_cfg, meta = read_checkpoint_info(path)
        source = load_checkpoint(path)
    except CheckpointError as exc:
        raise TrainingError(f"--init: {exc}") from exc
    changes = dict(cfg.model)
    changes["img_size"] = cfg.img_size
    try:
        model_cfg = stored_cfg.replace(**changes)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"invalid model settings for {path.name}: {exc}") from exc
    model = DeLightSAM(model_cfg)
    stored, wanted = source.state_dict(), model.state_dict()
    resized = [k for k, t in stored.items() if k in wanted and wanted[k].shape != t.shape]
    if resized:  # e.g. another fine_hidden: load_state_dict would fail on the shapes
        k = resized[0]
        raise TrainingError(
            f"--init {path.name}: model settings {sorted(cfg.model)} change the architecture "
            f"({k}: {tuple(stored[k].shape)} in the checkpoint, {tuple(wanted[k].shape)} with these settings)"
        )
    missing, unexpected = model.load_state_dict(stored, strict=False)
    added = [k for k in missing if _added_by_override(k, stored_cfg, model_cfg)]
    if unexpected or [k for k in missing if "attention_bias_idxs" not in k and k not in added]:
        raise TrainingError(
            f"--init {path.name}: model settings {sorted(cfg.model)} change the architecture "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    return model, {
        "init": "checkpoint",
        "path": str(path),
        "source_modality_head_trained": meta.get("modality_head_trained", ""),
        "source_calibration": {k: meta[k] for k in CALIBRATION_KEYS if k in meta},
        "added_tensors": len(added),
    }


def _added_by_override(key: str, stored: ModelConfig, wanted: ModelConfig) -> bool:
    """Whether tensor ``key`` of the ``wanted`` network is one the override adds to ``stored``'s."""
    if key.startswith("decoder.fine."):
        return stored.mask_stride != wanted.mask_stride
    if key.startswith("decoder.refiners."):
        stored_names = {*stored.refiner_modalities, *(darkfield_refiner_name(m) for m in stored.darkfield_refiners)}
        return key.split(".")[2] not in stored_names
    return False


def inherits_trained_head(init_report: dict[str, Any]) -> bool:
    """Whether the network came from a checkpoint whose modality head was trained."""
    return str(init_report.get("source_modality_head_trained", "")).strip().lower() == "true"


def modality_head_trained(
    model: DeLightSAM, cfg: TrainConfig, init_report: dict[str, Any], *, stage0_frozen: bool
) -> bool:
    """The ``modality_head_trained`` a run's checkpoints declare (``auto`` is refused without it):
    the run trains the head, or the head comes trained from the ``--init`` checkpoint and the run
    changes neither it nor the stem and stage 0 it reads (``stage0_frozen``: backbone fixed)."""
    if model.modality_head is None:
        return False
    if cfg.train_modality_head and "modality_head" not in cfg.freeze:
        return True
    return stage0_frozen and inherits_trained_head(init_report)


def inherited_calibration(cfg: TrainConfig, init_report: dict[str, Any], head_declared: bool) -> dict[str, str]:
    """The ``--init`` checkpoint's calibration of ``auto`` (``CALIBRATION_KEYS``) that a run's
    checkpoints keep: only when the run declares the head trained without training it (the head
    and the stage 0 it reads came unchanged from that checkpoint), else none — a retrained head
    falls back to the default confidence rule rather than another head's calibration."""
    if not head_declared or (cfg.train_modality_head and "modality_head" not in cfg.freeze):
        return {}
    stored = init_report.get("source_calibration") or {}
    return {k: str(stored[k]) for k in CALIBRATION_KEYS if k in stored}


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Training mode; with ``freeze_bn`` BatchNorm layers stay in eval mode (running statistics
    fixed: a pretrained backbone's statistics are better than a small batch's)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
