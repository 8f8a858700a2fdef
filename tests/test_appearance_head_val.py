"""``benchmarks/appearance_head_val.py``: heads scored on identical validation views, each with its
own calibrated confidence threshold."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_heads_are_scored_on_the_same_views_with_their_own_threshold(tmp_path, load_script, tiny_appearance_setup):
    from napari_delightsam.checkpoint import (
        RESERVED_METADATA_KEYS,
        load_checkpoint,
        read_checkpoint_info,
        save_checkpoint,
    )
    from napari_delightsam.inference import AUTO_CONFIDENCE_KEY

    ckpt = tiny_appearance_setup["ckpt"]
    _, info = read_checkpoint_info(ckpt)
    meta = {k: v for k, v in info.items() if k not in RESERVED_METADATA_KEYS}
    never_asks = save_checkpoint(tmp_path / "never-asks.safetensors", load_checkpoint(ckpt),
                                 {**meta, AUTO_CONFIDENCE_KEY: "0.00"})
    always_asks = save_checkpoint(tmp_path / "always-asks.safetensors", load_checkpoint(ckpt),
                                  {**meta, AUTO_CONFIDENCE_KEY: "1.01"})
    bench = load_script("benchmarks/appearance_head_val.py")
    out = tmp_path / "val.json"
    assert bench.main(["--data", str(tiny_appearance_setup["data"]), "--splits", str(tiny_appearance_setup["splits"]),
                       "--checkpoints", str(never_asks), str(always_asks), "--threads", "1", "--json", str(out)]) == 0
    a, b = json.loads(out.read_text())["results"]
    assert a["n_views"] == b["n_views"] > 0 and a["right"] == b["right"] and a["nll"] == pytest.approx(b["nll"])
    assert {"as stored", "BGR", "greyscale", "random"} <= set(a["by_view"])
    assert sum(v["n"] for v in a["by_view"].values()) == a["n_views"]
    assert (a["threshold"], a["asks"], b["threshold"], b["asks"]) == (0.0, 0.0, 1.01, 1.0)
    wrong = round((1 - a["right"]) * a["n_views"])
    assert a["wrong_unasked"] == wrong == len(a["wrong"]) and b["wrong_unasked"] == 0
