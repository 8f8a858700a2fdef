"""Validation during segmentation training: per-image Dice at the training size, modality head.

The reported ``val_dice`` is the mean over modalities of the per-modality mean Dice (each
modality counts once, however many images it has), as the paper reports its tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...data import SegmentationDataset, normalise
from ...devices import autocast_context
from ...model import DeLightSAM
from ..loop.distributed import DistContext
from .metrics import dice_from_counts

__all__ = ["gather_validation", "summarise_validation", "validate"]


@torch.no_grad()
def validate(
    model: DeLightSAM,
    dataset: SegmentationDataset,
    indices: Sequence[int],
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None,
) -> list[dict[str, Any]]:
    """Per-sample Dice at the training size (logits > 0 vs mask > 0.5) and modality-head correctness.

    Rows: ``{key, modality, id, dice, head_ok}`` (``head_ok`` None without a modality head).
    """
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        batch = [dataset[i] for i in chunk]
        images = torch.stack([b["image"] for b in batch]).to(device)
        masks = torch.stack([b["mask"] for b in batch]).to(device).float()
        modality = torch.stack([b["modality"] for b in batch]).to(device)
        with autocast_context(device, amp_dtype):
            out = model(normalise(images), modality)
        logits = torch.nn.functional.interpolate(
            out.mask_logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False
        )
        pred = (logits > 0).flatten(1)
        gt = (masks > 0.5).flatten(1)
        # pixel counts on the device (B numbers each leave it), the Dice itself in metrics
        counts = torch.stack([(pred & gt).sum(1), pred.sum(1), gt.sum(1)], 1).tolist()
        head_ok = (
            (out.modality_logits.argmax(1) == modality).tolist()
            if out.modality_logits is not None
            else [None] * len(chunk)
        )
        for j, i in enumerate(chunk):
            rec = dataset.records[i]
            rows.append(
                {
                    "key": rec.key,
                    "modality": rec.modality,
                    "id": rec.sample_id,
                    "dice": dice_from_counts(*counts[j]),
                    "head_ok": head_ok[j],
                }
            )
    if was_training:
        model.train()
    return rows


def summarise_validation(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean Dice per modality (over its images), their mean, and modality-head accuracy."""
    per_mod: dict[str, list[float]] = {}
    head: dict[str, list[bool]] = {}
    for r in rows:
        per_mod.setdefault(r["modality"], []).append(r["dice"])
        if r["head_ok"] is not None:
            head.setdefault(r["modality"], []).append(bool(r["head_ok"]))
    dice_mod = {m: float(np.mean(v)) for m, v in sorted(per_mod.items())}
    acc_mod = {m: float(np.mean(v)) for m, v in sorted(head.items())}
    return {
        "val_dice": float(np.mean(list(dice_mod.values()))) if dice_mod else None,
        "val_dice_per_modality": dice_mod,
        "val_modality_accuracy": float(np.mean([a for v in head.values() for a in v])) if head else None,
        "val_modality_accuracy_per_modality": acc_mod,
        "n_val": len(rows),
    }


def gather_validation(
    model: DeLightSAM,
    dataset: SegmentationDataset,
    indices: Sequence[int],
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None,
    dist: DistContext,
) -> dict[str, Any]:
    """``validate`` this rank's ``indices``; the summary of all ranks' rows (every rank gets it)."""
    rows = validate(model, dataset, indices, device, batch_size, amp_dtype)
    all_rows = [r for part in dist.all_gather_objects(rows) for r in part]
    return summarise_validation(all_rows)
