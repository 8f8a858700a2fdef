"""Dice / Hausdorff metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_delightsam.training.evaluation.metrics import (
    aggregate,
    boundary,
    dice_from_counts,
    dice_score,
    hausdorff,
    image_metrics,
    resize_nearest,
)


def square(shape=(64, 64), top=10, left=10, size=10) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[top : top + size, left : left + size] = True
    return m


def test_dice_hand_cases():
    a = square()
    assert dice_score(a, a) == 1.0
    assert dice_score(a, square(left=40)) == 0.0
    # 10x10 squares offset by 3 columns overlap on 10x7 = 70 pixels: 2*70 / 200
    assert dice_score(a, square(left=13)) == pytest.approx(0.7)
    empty = np.zeros((64, 64), dtype=bool)
    assert dice_score(empty, empty) == 1.0  # both empty: a correct "nothing here"
    assert dice_score(a, empty) == 0.0
    assert dice_score(empty, a) == 0.0


def test_boundary_of_square_is_its_outline():
    b = boundary(square(size=10))
    assert b.sum() == 36  # 4*10 - 4 corners counted once
    assert not b[12:18, 12:18].any()


def test_hausdorff_squares_offset_by_three_pixels():
    hd, hd95 = hausdorff(square(), square(left=13))
    assert hd == pytest.approx(3.0)
    assert 0 < hd95 <= 3.0


def test_hausdorff_single_pixels_3_4_5_triangle():
    a = np.zeros((20, 20), dtype=bool)
    b = np.zeros((20, 20), dtype=bool)
    a[2, 2] = True
    b[5, 6] = True
    assert hausdorff(a, b) == pytest.approx((5.0, 5.0))


def test_hd95_ignores_a_single_outlier_but_hd_does_not():
    gt = square()
    pred = gt.copy()
    pred[10, 40] = True  # 21 px right of the square's nearest boundary pixel (10, 19)
    hd, hd95 = hausdorff(pred, gt)
    assert hd == pytest.approx(21.0)
    assert hd95 == pytest.approx(0.0)


def test_hausdorff_identical_is_zero_and_empty_is_nan():
    a = square()
    assert hausdorff(a, a) == (0.0, 0.0)
    empty = np.zeros_like(a)
    assert all(math.isnan(v) for v in hausdorff(a, empty))
    assert all(math.isnan(v) for v in hausdorff(empty, a))
    assert all(math.isnan(v) for v in hausdorff(empty, empty))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        dice_score(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="2D"):
        hausdorff(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))


def test_resize_nearest_repeats_pixels():
    m = np.array([[1, 0], [0, 1]], dtype=bool)
    r = resize_nearest(m, 4)
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(r, expected)
    assert resize_nearest(np.ones((3, 5), bool), (6, 10)).shape == (6, 10)


def test_image_metrics_on_the_1024_grid_scale_distances():
    # 64 -> 1024 is a factor 16: the 3-pixel offset becomes 48 pixels; Dice is unchanged.
    out = image_metrics(square(), square(left=13), grid=1024)
    assert out["hd"] == pytest.approx(3.0)
    assert out["hd_1024"] == pytest.approx(48.0)
    assert out["dice"] == pytest.approx(0.7)
    assert out["dice_1024"] == pytest.approx(0.7)
    assert out["pred_empty"] is False and out["gt_empty"] is False
    assert "hd_1024" not in image_metrics(square(), square(), grid=None)


def test_aggregate_counts_and_excludes_empty_cases():
    a = square()
    empty = np.zeros_like(a)
    rows = [
        image_metrics(a, a, grid=None),  # dice 1, hd 0
        image_metrics(a, square(left=13), grid=None),  # dice 0.7, hd 3
        image_metrics(empty, a, grid=None),  # missed: dice 0, hd undefined
        image_metrics(empty, empty, grid=None),  # correct empty: dice 1, hd undefined
    ]
    s = aggregate(rows)
    assert s["n"] == 4
    assert s["dice"] == pytest.approx((1 + 0.7 + 0 + 1) / 4)
    assert s["hd"] == pytest.approx(1.5)  # mean of 0 and 3 only
    assert s["n_hd_excluded"] == 2
    assert s["n_empty_pred"] == 2
    assert s["n_empty_gt"] == 1
    assert s["n_both_empty"] == 1
    none = aggregate([image_metrics(empty, a, grid=None)])
    assert none["hd"] is None and none["dice"] == 0.0
    assert aggregate([])["n"] == 0


def test_dice_from_counts_is_the_one_definition():
    assert dice_from_counts(0, 0, 0) == 1.0  # both empty
    assert dice_from_counts(0, 5, 0) == 0.0 and dice_from_counts(0, 0, 5) == 0.0
    assert dice_from_counts(3, 4, 6) == pytest.approx(0.6)
    a, b = square(left=10), square(left=13)
    assert dice_score(a, b) == dice_from_counts(int((a & b).sum()), int(a.sum()), int(b.sum()))


def test_training_validation_dice_is_the_metrics_dice():
    """``validate`` (counts on the device, logits > 0 vs mask > 0.5) equals ``dice_score``."""
    from types import SimpleNamespace

    import torch

    from napari_delightsam.training.evaluation.validation import validate

    size, rng = 16, np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(3, 1, size // 4, size // 4)).astype(np.float32))
    masks = [square((size, size), 2, 3, 6), np.zeros((size, size), bool), square((size, size), 8, 8, 5)]

    class Stub(torch.nn.Module):
        seen = 0  # samples served so far: validate walks the indices in order

        def forward(self, images, modality):
            out = logits[self.seen : self.seen + len(images)]
            self.seen += len(images)
            return SimpleNamespace(mask_logits=out, modality_logits=None)

    items = [
        {
            "image": torch.zeros(3, size, size),
            "mask": torch.from_numpy(m[None].astype(np.float32)),
            "modality": torch.tensor(0),
        }
        for m in masks
    ]
    records = [SimpleNamespace(key="x/d", modality="x", sample_id=str(i)) for i in range(3)]
    dataset = type("DS", (), {"records": records, "__getitem__": lambda self, i: items[i]})()
    rows = validate(Stub(), dataset, [0, 1, 2], torch.device("cpu"), batch_size=2, amp_dtype=None)
    up = torch.nn.functional.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    for row, m, lg in zip(rows, masks, up, strict=True):
        assert row["dice"] == dice_score(lg[0].numpy() > 0, m)
    assert [r["head_ok"] for r in rows] == [None] * 3
