"""Evaluation: aggregation per dataset/modality, empty cases, overlays, split reuse, CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_delightsam.data import discover, load_pair, make_splits, select
from napari_delightsam.data.synthetic import make_synthetic_dataset
from napari_delightsam.training.evaluation.evaluate import (
    evaluate_records,
    format_markdown,
    resolve_eval_splits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class FakeResult:
    mask: np.ndarray
    modality_probabilities: dict[str, float] | None = None


class OracleSegmenter:
    """Returns the ground truth for dermoscopy, nothing for xray (hand-checkable numbers)."""

    def __init__(self, records):
        self.truth = {str(r.image_path): load_pair(r)[1] for r in records}
        self.calls = []

    def segment(self, image, modality="auto", threshold=0.5):
        self.calls.append(modality)
        # the fixture images are all distinct sizes, so the shape identifies the record
        gt = next(g for n, g in self.truth.items() if g.shape == image.shape[:2])
        if modality == "dermoscopy":
            return FakeResult(gt.copy(), {"dermoscopy": 0.9, "xray": 0.1})
        return FakeResult(np.zeros_like(gt), {"dermoscopy": 0.8, "xray": 0.2})


@pytest.fixture
def distinct_sizes(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for mod, ds, sizes in (
        ("dermoscopy", "d", [(40, 50), (41, 50), (42, 50)]),
        ("xray", "x", [(40, 60), (41, 60)]),
    ):
        (root / mod / ds / "images").mkdir(parents=True)
        (root / mod / ds / "masks").mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                root / mod / ds / "images" / f"im{i}.png"
            )
            m = np.zeros((h, w), np.uint8)
            m[5:20, 10:30] = 255
            Image.fromarray(m).save(root / mod / ds / "masks" / f"im{i}.png")
    return root


def test_evaluate_aggregates_per_dataset_and_modality(distinct_sizes: Path, tmp_path: Path):
    recs = discover(distinct_sizes)
    seg = OracleSegmenter(recs)
    report = evaluate_records(seg, recs, grid=1024, overlays_dir=tmp_path / "ov", overlays_per_dataset=1)
    assert seg.calls == ["dermoscopy"] * 3 + ["xray"] * 2  # the dataset's modality is passed
    d, x = report.datasets["dermoscopy/d"], report.datasets["xray/x"]
    assert d["n"] == 3 and d["dice"] == 1.0 and d["hd"] == 0.0 and d["hd95"] == 0.0 and d["dice_1024"] == 1.0
    assert (
        x["n"] == 2
        and x["dice"] == 0.0
        and x["hd"] is None
        and x["n_hd_excluded"] == 2
        and x["n_empty_pred"] == 2
    )
    assert report.modalities["xray"]["dice"] == 0.0 and report.overall["mean_modality_dice"] == 0.5
    assert d["modality_accuracy"] == 1.0 and x["modality_accuracy"] == 0.0
    assert report.mean_seconds_per_image is not None
    out = report.to_dict()
    json.dumps(out, allow_nan=False)  # undefined HD is null, not NaN
    assert set(out["datasets"]["xray/x"]) >= {"dice", "hd", "hd95", "n"}
    assert len(out["images"]) == 5 and out["images"][3]["hd"] is None
    pngs = sorted(p.name for p in (tmp_path / "ov").iterdir())
    assert len(pngs) == 4 and any("best1" in p for p in pngs) and any("worst1" in p for p in pngs)
    pic = Image.open(tmp_path / "ov" / pngs[0])
    assert pic.width > 2 * pic.height  # image | prediction | ground truth side by side
    table = format_markdown(report)
    assert "| dermoscopy/d | 3 | 100.00 | 0.00 | 0.00 |" in table
    assert "| xray/x | 2 | 0.00 | – | – |" in table


def test_evaluation_split_is_the_training_split(tmp_path: Path):
    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.model import DeLightSAM

    root = make_synthetic_dataset(tmp_path / "data", n_per_dataset=20, size=(20, 20))
    recs = discover(root)
    train_split = make_splits(recs, seed=7)
    ckpt = tmp_path / "elsewhere" / "model.safetensors"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, DeLightSAM(tiny_config()), {"split_seed": "7"})
    splits, source = resolve_eval_splits(recs, None, ckpt, None)
    assert "seed 7" in source and splits.assignments == train_split.assignments
    assert {r.sample_id for r in select(recs, splits, "test")} == {
        r.sample_id for r in select(recs, train_split, "test")
    }
    (tmp_path / "elsewhere" / "splits.json").write_text(json.dumps(make_splits(recs, seed=99).to_dict()))
    splits2, source2 = resolve_eval_splits(recs, None, ckpt, None)
    assert source2.endswith("splits.json") and splits2.seed == 99  # a run folder's own file wins


def test_cli_evaluate_a_trained_checkpoint(tmp_path: Path, capsys):
    from napari_delightsam.cli import main
    from napari_delightsam.training import TrainConfig, train

    root = make_synthetic_dataset(tmp_path / "data", n_per_dataset=10, size=(40, 48))
    cfg = TrainConfig(
        epochs=1,
        steps_per_epoch=1,
        img_size=64,
        batch_size=2,
        model_preset="tiny",
        num_workers=0,
        device="cpu",
        val_at_start=False,
    )
    train(cfg, tmp_path / "run", data_root=root, show_progress=False)
    out_json = tmp_path / "eval.json"
    args = [
        "evaluate",
        "--data",
        str(root),
        "--checkpoint",
        str(tmp_path / "run" / "best.safetensors"),
        "--json",
        str(out_json),
        "--overlays",
        str(tmp_path / "ov"),
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "| dermoscopy/derm_a |" in captured.out and "mean time per image" in captured.out
    result = json.loads(out_json.read_text())
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    n_test = sum(len(v["test"]) for v in splits["datasets"].values())
    assert result["split"] == "test" and result["overall"]["n"] == n_test
    assert set(result["modalities"]) == {"dermoscopy", "xray"}
    assert result["split_source"].endswith("splits.json")
    assert any((tmp_path / "ov").iterdir())
    assert main(args) == 2  # the JSON file exists: nothing is overwritten
    assert "exists" in capsys.readouterr().err


def test_evaluate_records_passes_the_tiling_choice(distinct_sizes: Path):
    from napari_delightsam.config import tiny_config
    from napari_delightsam.inference import load_model

    recs = discover(distinct_sizes)[:2]
    seg = load_model("untrained", "cpu", config=tiny_config())
    on = evaluate_records(seg, recs, grid=None, tiling="on")
    off = evaluate_records(seg, recs, grid=None, tiling="off")
    assert [r["tiles"] for r in on.images] == [1, 1]  # 40x50 images: one 128² tile each
    assert all("tiles" not in r for r in off.images)
    # one tile holding the whole image is padded, not resized: a different (valid) mask
    assert all(0.0 <= r["dice"] <= 1.0 for r in on.images)
