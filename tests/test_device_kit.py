"""scripts/device: the pack's shrinking and WebP images, their unpacking, and the model's trip back in parts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_delightsam.checkpoint import load_checkpoint, save_checkpoint
from napari_delightsam.config import tiny_config
from napari_delightsam.data import discover
from napari_delightsam.data.synthetic import make_synthetic_dataset
from napari_delightsam.model import DeLightSAM

KIT = Path(__file__).resolve().parents[1] / "scripts" / "device"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"device_{name}", KIT / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shrink_keeps_the_aspect_and_the_mask_area():
    pack = _module("pack")
    image = np.random.default_rng(0).uniform(0, 255, (600, 900, 3)).astype(np.float32)
    mask = np.zeros((600, 900), bool)
    mask[150:450, 300:600] = True
    small, small_mask = pack.shrink(image, mask, 300)
    assert small.shape == (200, 300, 3) and small_mask.shape == (200, 300) and small_mask.dtype == bool
    assert abs(small_mask.mean() - mask.mean()) < 0.01
    same, same_mask = pack.shrink(image, mask, 1000)  # already small enough: untouched
    assert same is image and same_mask is mask


def test_webp_pack_unpacks_into_a_dataset_the_loader_reads(tmp_path: Path):
    pack, unpack = _module("pack"), _module("unpack")
    root = make_synthetic_dataset(tmp_path / "data", n_per_dataset=3, size=(80, 120))
    records = discover(root)
    assert pack.pack_data(records, tmp_path / "packed", quality=90, max_side=64, fmt="webp") == len(records)
    pngs, webps = list((tmp_path / "packed").rglob("*.png")), list((tmp_path / "packed").rglob("*.webp"))
    assert len(webps) == len(pngs) == len(records)
    assert {p.parent.name for p in webps} == {"images"} and {p.parent.name for p in pngs} == {"masks"}
    n = unpack.unpack(tmp_path / "packed", tmp_path / "unpacked", workers=1)
    assert n == 2 * len(records)
    back = discover(tmp_path / "unpacked")
    assert {(r.key, r.sample_id) for r in back} == {(r.key, r.sample_id) for r in records}
    webp = next((tmp_path / "packed").rglob("*.webp"))
    png = tmp_path / "unpacked" / webp.relative_to(tmp_path / "packed").with_suffix(".png")
    assert np.array_equal(np.asarray(Image.open(webp)), np.asarray(Image.open(png)))  # lossless from there on
    assert max(np.asarray(Image.open(png)).shape[:2]) == 64


def test_a_model_travels_in_parts_and_a_damaged_part_is_refused(tmp_path: Path):
    ship = _module("ship")
    ship.PART = 64 * 1024  # small parts, so that a tiny model is cut too
    torch.manual_seed(0)
    model = DeLightSAM(tiny_config())
    src = tmp_path / "best.safetensors"
    save_checkpoint(src, model, {"note": "kept"})
    out = tmp_path / "out"
    out.mkdir()
    written = ship.ship_file(src, out)
    parts = sorted(out.glob("best.part*"))
    assert len(parts) > 1 and out / "best.sha256" in written
    joined = ship.join(out, tmp_path / "joined.safetensors")
    back = load_checkpoint(joined).state_dict()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert torch.equal(back[name], tensor.half().float()), name  # fp16 storage
    parts[0].write_bytes(parts[0].read_bytes()[:-1] + b"\0")
    with pytest.raises(SystemExit, match="digest"):
        ship.join(out, tmp_path / "again.safetensors")
