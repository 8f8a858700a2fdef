"""``benchmarks/appearance_head_probe.py`` on a tiny model: per image two views, order
probabilities summing to one, and the decision equal to the Segmenter's."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")


def test_probe_reports_both_views(tmp_path, capsys):
    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.inference import MODALITY_HEAD_TRAINED_KEY, load_model
    from napari_delightsam.model import DeLightSAM

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", DeLightSAM(tiny_config(modality_head_kind="appearance")).eval(),
                           {MODALITY_HEAD_TRAINED_KEY: "true"})
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "appearance_head_probe.py"
    spec = importlib.util.spec_from_file_location("appearance_head_probe", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["appearance_head_probe"] = bench
    spec.loader.exec_module(bench)
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
