"""``benchmarks/tiled_native.py``: the emulated higher-resolution images and the methods compared."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tiled_native.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("tiled_native", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_upsampling_keeps_the_field_and_the_mask_binary(bench):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (34, 51, 3), dtype=np.uint8)
    mask = np.zeros((34, 51), bool)
    mask[10:20, 5:30] = True
    big, big_mask = bench.upsample(image, mask, 4.0)
    assert big.shape == (136, 204, 3) and big.dtype == np.uint8
    assert big_mask.shape == (136, 204) and big_mask.dtype == bool
    np.testing.assert_array_equal(big_mask, np.kron(mask, np.ones((4, 4), bool)))  # nearest: same field
    assert abs(float(big.mean()) - float(image.mean())) < 2.0


def test_methods_are_whole_the_rule_and_tiles_at_the_stored_images_scale(bench):
    names = bench.methods(4.0, [1.25, 1.0])
    assert names[0] == ("whole", {"tiling": "off"}) and names[1] == ("rule", {"tiling": "auto"})
    assert names[2] == ("tiled rel x1.25", {"tiling": "on", "tile_scale": 1.25 / 4.0})
    assert names[3][1]["tile_scale"] == 0.25
    assert [n for n, _ in bench.methods(2.0, [1.25], rule=False)] == ["whole", "tiled rel x1.25"]
