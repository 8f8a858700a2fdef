"""Losses (paper Eq. 3, 8) against values computed by hand with `math`."""

from __future__ import annotations

import math

import pytest
import torch

from napari_delightsam.model.losses import delightsam_loss, dice_loss, focal_loss, patch_targets


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _t(values: list[float], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(shape)


def _focal_by_hand(z: float, y: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = _sig(z)
    p_t = p if y == 1 else 1 - p
    a_t = alpha if y == 1 else 1 - alpha
    return -a_t * (1 - p_t) ** gamma * math.log(p_t)


def _bce_by_hand(z: float, y: float) -> float:
    p = _sig(z)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


LOGITS = [0.0, 2.0, -1.0, 3.0]
TARGET = [1.0, 0.0, 0.0, 1.0]


def test_focal_loss_hand_values() -> None:
    logits, target = _t(LOGITS, (1, 1, 2, 2)), _t(TARGET, (1, 1, 2, 2))
    # element by element: z=0,y=1 -> 0.25·0.25·ln2 ; z=2,y=0 -> 0.75·σ(2)²·(−ln(1−σ(2))) ; ...
    expected = sum(_focal_by_hand(z, y) for z, y in zip(LOGITS, TARGET, strict=True)) / 4
    assert expected == pytest.approx(
        (0.25 * 0.25 * math.log(2) + _focal_by_hand(2, 0) + _focal_by_hand(-1, 0) + _focal_by_hand(3, 1)) / 4
    )
    assert focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # first element alone, fully by hand: α·(1−p)^γ·(−ln p) with p = 0.5
    assert focal_loss(_t([0.0], (1, 1, 1, 1)), _t([1.0], (1, 1, 1, 1))).item() == pytest.approx(
        0.25 * 0.5**2 * math.log(2), rel=1e-6
    )


def test_focal_loss_is_per_pixel_mean_and_alpha_gamma() -> None:
    logits, target = _t(LOGITS, (1, 1, 2, 2)), _t(TARGET, (1, 1, 2, 2))
    expected = (
        sum(_focal_by_hand(z, y, alpha=0.5, gamma=0.0) for z, y in zip(LOGITS, TARGET, strict=True)) / 4
    )
    # gamma = 0, alpha = 0.5 -> half the plain BCE
    assert expected == pytest.approx(
        0.5 * sum(_bce_by_hand(z, y) for z, y in zip(LOGITS, TARGET, strict=True)) / 4
    )
    assert focal_loss(logits, target, alpha=0.5, gamma=0.0).item() == pytest.approx(expected, rel=1e-5)
    # the same pixels split over two images give the same mean
    two = focal_loss(logits.view(2, 1, 1, 2), target.view(2, 1, 1, 2)).item()
    assert two == pytest.approx(focal_loss(logits, target).item(), rel=1e-6)


def test_dice_loss_hand_values_per_image() -> None:
    # image 1: p = σ(0), σ(2) ; t = 1, 0   image 2: p = σ(-1), σ(3) ; t = 0, 1
    logits = _t(LOGITS, (2, 1, 1, 2))
    target = _t(TARGET, (2, 1, 1, 2))
    p = [_sig(z) for z in LOGITS]
    d1 = 1 - (2 * (p[0] * 1) + 1) / (p[0] + p[1] + 1 + 1)
    d2 = 1 - (2 * (p[3] * 1) + 1) / (p[2] + p[3] + 1 + 1)
    assert dice_loss(logits, target).item() == pytest.approx((d1 + d2) / 2, rel=1e-5)
    # not a Dice of the whole batch
    whole = 1 - (2 * (p[0] + p[3]) + 1) / (sum(p) + 2 + 1)
    assert abs(dice_loss(logits, target).item() - whole) > 1e-3


def test_dice_loss_limits() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    perfect = torch.where(target > 0, 50.0, -50.0)
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    inverse = -perfect
    # no overlap: 1 − 1/(8 + 8 + 1)
    assert dice_loss(inverse, target).item() == pytest.approx(1 - 1 / 17, rel=1e-5)


def test_patch_targets_max_pool() -> None:
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 1, 6] = 1  # one pixel in the top-right 4x4 patch
    mask[0, 0, 7, 0] = 1  # one pixel in the bottom-left patch
    assert patch_targets(mask, 2).tolist() == [[[[0.0, 1.0], [1.0, 0.0]]]]
    assert patch_targets(mask, 8).equal(mask)
    assert patch_targets(mask, 1).tolist() == [[[[1.0]]]]
    with pytest.raises(ValueError, match="not a multiple"):
        patch_targets(mask, 3)


def test_total_loss_weights_patch_term_by_0_7() -> None:
    mask_logits = _t(LOGITS, (1, 1, 2, 2))
    target = _t(TARGET, (1, 1, 2, 2))
    patch_logits = _t([0.5], (1, 1, 1, 1))  # one patch: max-pooled target = 1
    terms = delightsam_loss(mask_logits, patch_logits, target)
    focal = sum(_focal_by_hand(z, y) for z, y in zip(LOGITS, TARGET, strict=True)) / 4
    p = [_sig(z) for z in LOGITS]
    dice = 1 - (2 * (p[0] + p[3]) + 1) / (sum(p) + 2 + 1)
    patch = -math.log(_sig(0.5))
    assert terms.focal.item() == pytest.approx(focal, rel=1e-5)
    assert terms.dice.item() == pytest.approx(dice, rel=1e-5)
    assert terms.patch.item() == pytest.approx(patch, rel=1e-5)
    assert terms.total.item() == pytest.approx(focal + dice + 0.7 * patch, rel=1e-5)
    assert terms.modality.item() == 0.0
    other = delightsam_loss(mask_logits, patch_logits, target, patch_weight=0.0)
    assert other.total.item() == pytest.approx(focal + dice, rel=1e-5)


def test_patch_bce_against_max_pooled_target() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 0, 0] = 1  # only the top-left 2x2 patch is positive
    patch_logits = _t([1.0, -2.0, 0.0, 3.0], (1, 1, 2, 2))
    terms = delightsam_loss(torch.zeros(1, 1, 4, 4), patch_logits, target)
    expected = (
        _bce_by_hand(1.0, 1) + _bce_by_hand(-2.0, 0) + _bce_by_hand(0.0, 0) + _bce_by_hand(3.0, 0)
    ) / 4
    assert terms.patch.item() == pytest.approx(expected, rel=1e-5)


def test_low_res_mask_logits_are_resized_to_target() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[..., :, :2] = 1
    low = _t([3.0, -3.0], (1, 1, 1, 2))  # (1,2) logits are upsampled bilinearly to (4,4) first
    up = torch.nn.functional.interpolate(low, size=(4, 4), mode="bilinear", align_corners=False)
    terms = delightsam_loss(low, torch.zeros(1, 1, 1, 1), target)
    assert terms.focal.item() == pytest.approx(focal_loss(up, target).item(), rel=1e-6)
    assert terms.dice.item() == pytest.approx(dice_loss(up, target).item(), rel=1e-6)


def test_modality_term_added_with_its_weight() -> None:
    mask_logits = _t(LOGITS, (1, 1, 2, 2))
    target = _t(TARGET, (1, 1, 2, 2))
    patch_logits = _t([0.5], (1, 1, 1, 1))
    logits = _t([2.0, 0.0, -1.0], (1, 3))
    base = delightsam_loss(mask_logits, patch_logits, target)
    terms = delightsam_loss(
        mask_logits, patch_logits, target, modality_logits=logits, modality_target=torch.tensor([1])
    )
    ce = -math.log(math.exp(0.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)))
    assert terms.modality.item() == pytest.approx(ce, rel=1e-5)
    assert terms.total.item() == pytest.approx(base.total.item() + 0.1 * ce, rel=1e-5)


def test_loss_gradients_flow() -> None:
    mask_logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    patch_logits = torch.zeros(2, 1, 2, 2, requires_grad=True)
    target = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    delightsam_loss(mask_logits, patch_logits, target).total.backward()
    assert mask_logits.grad.abs().sum() > 0 and patch_logits.grad.abs().sum() > 0
