"""``benchmarks/component_filters.py``: the component rules of ablation P1 (model card)."""

from __future__ import annotations

import numpy as np


def test_rules_keep_the_components_they_name(load_script):
    cf = load_script("benchmarks/component_filters.py")
    mask = np.zeros((20, 30), dtype=bool)
    prob = np.zeros((20, 30), dtype=np.float32)
    mask[1:11, 1:11], prob[1:11, 1:11] = True, 0.6  # big (100 px), unsure: mass 60
    mask[13:19, 13:19], prob[13:19, 13:19] = True, 0.95  # middle (36 px), sure: mass 34.2
    mask[2:4, 25:27], prob[2:4, 25:27] = True, 0.99  # tiny (4 px), sure
    out = cf.filtered_masks(mask, prob)
    assert set(out) == set(cf.RULES)
    big, mid, tiny = mask.copy(), mask.copy(), mask.copy()
    big[12:, :] = False
    big[:, 20:] = False
    mid[:12, :] = False
    tiny[5:, :] = False
    tiny[:, :20] = False
    np.testing.assert_array_equal(out["none"], mask)
    np.testing.assert_array_equal(out["lcc"], big)
    np.testing.assert_array_equal(out["topmass"], big)
    np.testing.assert_array_equal(out["area0.25"], big | mid)  # 36 >= 25, 4 < 25
    np.testing.assert_array_equal(out["area0.5"], big)
    np.testing.assert_array_equal(out["max0.9"], mid | tiny)
    np.testing.assert_array_equal(out["mean0.7"], mid | tiny)
    empty = np.zeros_like(mask)
    assert not cf.filtered_masks(empty, prob)["lcc"].any()


def test_a_threshold_no_component_reaches_keeps_the_best_one(load_script):
    cf = load_script("benchmarks/component_filters.py")
    mask = np.zeros((10, 10), dtype=bool)
    prob = np.zeros((10, 10), dtype=np.float32)
    mask[0:3, 0:3], prob[0:3, 0:3] = True, 0.55
    mask[6:9, 6:9], prob[6:9, 6:9] = True, 0.65
    out = cf.filtered_masks(mask, prob)
    assert out["max0.9"][7, 7] and not out["max0.9"][1, 1]
