"""Losses (paper Eq. 3 and 8): L = L_focal + L_dice (mask) + λ · L_BCE (patch), λ = 0.7.

Focal and BCE are per-pixel / per-patch means; Dice is a soft Dice per image, averaged over
the batch (not a Dice of the batch mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.), mean over pixels. logits/target: (B,1,H,W)."""
    logits = logits.float()
    target = target.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 − soft Dice per image, averaged over the batch. logits/target: (B,1,H,W)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    inter = (p * t).sum(1)
    dice = (2 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return (1 - dice).mean()


def patch_targets(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """Max-pooled ground truth: (B,1,S,S) {0,1} -> (B,1,grid,grid); a patch is 1 if any pixel is."""
    size = mask.shape[-1]
    if size % grid:
        raise ValueError(f"mask size {size} is not a multiple of the patch grid {grid}")
    return F.max_pool2d(mask.float(), kernel_size=size // grid)


@dataclass
class LossTerms:
    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    patch: torch.Tensor
    modality: torch.Tensor


def delightsam_loss(
    mask_logits: torch.Tensor,
    patch_logits: torch.Tensor,
    target: torch.Tensor,
    patch_weight: float = 0.7,
    modality_logits: torch.Tensor | None = None,
    modality_target: torch.Tensor | None = None,
    modality_weight: float = 0.1,
) -> LossTerms:
    """mask_logits (B,1,h,w) are resized to the target (B,1,S,S) before focal + Dice.

    The modality cross-entropy (beyond the paper, for "auto") is added when both of its
    arguments are given.
    """
    if mask_logits.shape[-2:] != target.shape[-2:]:
        mask_logits = F.interpolate(mask_logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    focal = focal_loss(mask_logits, target)
    dice = dice_loss(mask_logits, target)
    patch_t = patch_targets(target, patch_logits.shape[-1])
    patch = F.binary_cross_entropy_with_logits(patch_logits.float(), patch_t)
    total = focal + dice + patch_weight * patch
    mod = torch.zeros((), device=total.device)
    if modality_logits is not None and modality_target is not None:
        mod = F.cross_entropy(modality_logits.float(), modality_target)
        total = total + modality_weight * mod
    return LossTerms(total, focal, dice, patch, mod)
