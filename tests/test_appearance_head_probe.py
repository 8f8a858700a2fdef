"""``benchmarks/appearance_head_probe.py`` on a tiny model: per image two views, order
probabilities summing to one, and the decision equal to the Segmenter's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")


def test_probe_reports_both_views(tmp_path, capsys, load_script, tiny_appearance_setup):
    from napari_delightsam.inference import load_model

    ckpt = tiny_appearance_setup["ckpt"]
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    bench = load_script("benchmarks/appearance_head_probe.py")
    out = tmp_path / "probe.json"
    assert bench.main([str(tmp_path / "a.png"), "--checkpoint", str(ckpt), "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["view"] for r in rows] == ["as stored", "BGR"]
    for r in rows:
        assert sum(r["order_p"].values()) == pytest.approx(1.0, abs=1e-3) and set(r["order_p"]) >= {"RGB", "BGR"}
    seg = load_model(ckpt, device="cpu")
    result = seg.segment(img, modality="auto")
    assert rows[0]["modality"] == result.modality
    assert "a.png [BGR]" in capsys.readouterr().out


def test_probe_adds_a_wide_field_view_on_request(tmp_path, load_script, tiny_appearance_setup):
    bench = load_script("benchmarks/appearance_head_probe.py")
    img = np.full((100, 100, 3), 150, np.uint8)
    from napari_delightsam.data.appearance import wide_field_layout

    wide = wide_field_layout(img, keep=bench.WIDE_FIELD_KEEP, aspect=bench.WIDE_FIELD_ASPECT)
    assert wide.shape == (72, 108, 3) and (wide[:, :4] == 0).all() and (wide[:, 4:104] == 150).all()
    Image.fromarray(img).save(tmp_path / "a.png")
    out = tmp_path / "probe.json"
    assert bench.main([str(tmp_path / "a.png"), "--checkpoint", str(tiny_appearance_setup["ckpt"]), "--threads", "1",
                       "--wide-field", "--json", str(out)]) == 0
    assert [r["view"] for r in json.loads(out.read_text())["rows"]] == ["as stored", "BGR", "wide field"]
