"""``benchmarks/shift_entry_points.py``: the shift reaches exactly the part it names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.data import discover, make_splits, save_splits
    from napari_delightsam.data.synthetic import make_synthetic_dataset
    from napari_delightsam.model import DeLightSAM

    root = tmp_path_factory.mktemp("entry")
    data = make_synthetic_dataset(root / "data", {"microscopy": ["mic_a"], "dermoscopy": ["derm_a"]},
                                  n_per_dataset=10, size=(64, 64))
    for path in data.glob("*/*/images/*.png"):  # strongly coloured: red much brighter than blue
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
        Image.fromarray(np.clip(rgb * np.array([1.0, 0.6, 0.25]) + [40, 0, 0], 0, 255).astype(np.uint8)).save(path)
    splits = root / "splits.json"
    save_splits(splits, make_splits(discover(data), seed=0))
    torch.manual_seed(0)
    cfg = tiny_config(img_size=64, mask_stride=2, refiner_modalities=("microscopy",), decoder_skips=("image",))
    ckpt = save_checkpoint(root / "tiny.safetensors", DeLightSAM(cfg).eval(), {})
    return {"data": data, "splits": splits, "ckpt": ckpt}


def run(load_script, setup, tmp_path, modality: str, shift: str) -> dict:
    bench = load_script("benchmarks/shift_entry_points.py")
    out = tmp_path / f"{modality}-{shift}.json"
    assert bench.main(["--data", str(setup["data"]), "--splits", str(setup["splits"]), "--split", "train",
                       "--modality", modality, "--shift", shift, "--checkpoint", str(setup["ckpt"]),
                       "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_without_a_refiner_the_refiner_entry_changes_nothing(load_script, setup, tmp_path):
    result = run(load_script, setup, tmp_path, "dermoscopy", "bgr")
    assert result["n_images"] >= 3
    for row in result["images"]:
        assert row["refiner"] == row["none"] and row["decoder"] == row["stride2"]
        assert all(0.0 <= row[k] <= 1.0 for k in ("none", "all", "encoder", "decoder", "stride2", "refiner"))


def test_with_a_refiner_each_entry_is_its_own_computation(load_script, setup, tmp_path):
    result = run(load_script, setup, tmp_path, "microscopy", "grey")
    rows = result["images"]
    assert result["shift"] == "grey" and len(rows) >= 3
    assert result["mean_dice"]["none"] == pytest.approx(np.mean([r["none"] for r in rows]))


def test_the_shift_reaches_the_part_named_and_no_other(load_script, setup):
    from napari_delightsam.checkpoint import load_checkpoint
    from napari_delightsam.data import normalise

    bench = load_script("benchmarks/shift_entry_points.py")
    model = load_checkpoint(setup["ckpt"]).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # a refiner that reads its image input (a fresh one may start near identity)
        for p in model.decoder.refiners.parameters():
            p.normal_(0, 0.3)
    raw = torch.rand(1, 3, 64, 64) * 255
    stored, moved = normalise(raw), normalise(bench.shifted(raw, "bgr"))
    micro = model.config.modalities.index("microscopy")
    with torch.inference_mode():
        out = {part: bench.logits_with_shift_in(model, stored, moved, micro, part) for part in bench.PARTS}
        # the stored image everywhere, passed as the "shifted" one, is the plain forward
        same = bench.logits_with_shift_in(model, stored, stored, micro, "all")
    assert torch.equal(same, out["none"])
    for part in ("all", "encoder", "decoder", "stride2", "refiner"):
        assert not torch.equal(out[part], out["none"]), part
    assert not torch.equal(out["stride2"], out["decoder"]) and not torch.equal(out["refiner"], out["decoder"])
    # the refiner's entry is restored afterwards
    assert "forward" not in vars(model.decoder.refiners["microscopy"])
    with pytest.raises(ValueError, match="bgr"):
        bench.shifted(raw, "sepia")
