"""`delightsam info`: counts, FLOPs (attention included), fallbacks and one-line errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

import napari_delightsam.checkpoint as ckpt
from napari_delightsam.atomic_files import sha256_file
from napari_delightsam.checkpoint import save_checkpoint
from napari_delightsam.cli import main
from napari_delightsam.commands.info import count_flops, format_info
from napari_delightsam.config import tiny_config
from napari_delightsam.model import DeLightSAM


@pytest.fixture
def tiny_ckpt(tmp_path: Path, tiny_model: DeLightSAM) -> Path:
    return save_checkpoint(tmp_path / "tiny.safetensors", tiny_model, {"recipe": "unit test"})


def _run_json(argv: list[str], capsys) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_counts_match_the_model(tiny_ckpt: Path, tiny_model: DeLightSAM, capsys) -> None:
    info = _run_json(["info", "--checkpoint", str(tiny_ckpt)], capsys)
    assert info["checkpoint"] == str(tiny_ckpt)
    assert info["variant"] == "delightsam-tiny-test"
    assert info["img_size"] == 128
    assert info["modalities"] == list(tiny_model.config.modalities)
    assert info["parameters"] == tiny_model.parameter_counts()
    f = info["flops"]
    assert f["img_size"] == 128 and f["flops"] > 0
    assert f["gmacs"] == pytest.approx(f["gflops"] / 2)
    assert f["gflops"] == pytest.approx(f["flops"] / 1e9)
    assert sum(f["by_component_gflops"].values()) == pytest.approx(f["gflops"], rel=1e-9)
    assert info["metadata"]["recipe"] == "unit test"
    assert info["metadata"]["sha256"] == sha256_file(tiny_ckpt)
    # the paper's figure is at 1024²: the same architecture is counted there too
    f1024 = info["flops_1024"]
    assert f1024["img_size"] == 1024 and f1024["flops"] > 40 * f["flops"]  # ~ (1024/128)² = 64×
    assert info["paper"]["gmacs_rel_diff"] == pytest.approx((f1024["gmacs"] - 55.86) / 55.86)
    assert "note" not in info


def test_text_output(tiny_ckpt: Path, capsys) -> None:
    assert main(["info", "--checkpoint", str(tiny_ckpt)]) == 0
    out = capsys.readouterr().out
    for needle in (
        "variant:     delightsam-tiny-test",
        "dermoscopy, xray",
        "shared",
        "per modality",
        "active",
        "FLOPs",
        "MACs",
        "paper 12.74 M",
        "recipe: unit test",
        "at 128x128 (this model's input size): FLOPs",  # what one call of this model costs
        "at 1024x1024 (the paper's size): FLOPs",  # the figure to compare with the paper
    ):
        assert needle in out, needle


def _vit_stage_flops_by_hand(
    dim: int, heads: int, window: int, grid: int, depth: int, tokens: int, mlp_ratio: float, ffn_ratio: float
) -> int:
    """Multiply-adds ×2 of one TinyViT stage with modality controller (no merging), batch 1."""
    pad = -(-grid // window) * window
    windows = (pad // window) ** 2
    n = window * window
    rows = windows * n  # attention runs on padded windows
    head_dim = dim // heads
    hidden = int(dim * mlp_ratio)
    ffn = int(dim * ffn_ratio)
    per_block = (
        2 * rows * dim * 3 * dim  # qkv
        + 2 * 2 * windows * heads * n * (n + tokens) * head_dim  # QK^T and AV with prompt tokens
        + 2 * rows * dim * dim  # proj
        + 2 * grid * grid * dim * 9  # 3x3 depthwise local conv
        + 2 * 2 * grid * grid * dim * hidden  # block MLP
        + 2 * 2 * grid * grid * dim * ffn  # controller FFN
    )
    return depth * per_block


def test_flop_count_includes_window_attention() -> None:
    """The last ViT stage (no merging) against a hand count: the fused SDPA kernel would count 0."""
    cfg = tiny_config()
    model = DeLightSAM(cfg)
    report = count_flops(model)
    grid = cfg.img_size // 16
    expected = _vit_stage_flops_by_hand(
        cfg.embed_dims[3],
        cfg.num_heads[3],
        cfg.window_sizes[3],
        grid,
        cfg.depths[3],
        cfg.controller_tokens,
        cfg.mlp_ratio,
        cfg.controller_ffn_ratio,
    )
    assert report.by_component["encoder.stages.3"] == expected
    # counting leaves the model as it was
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_img_size_option(tiny_ckpt: Path, capsys) -> None:
    small = _run_json(["info", "--checkpoint", str(tiny_ckpt)], capsys)["flops"]["flops"]
    big = _run_json(["info", "--checkpoint", str(tiny_ckpt), "--img-size", "256"], capsys)
    assert big["flops"]["img_size"] == 256 and big["img_size"] == 128
    assert 3 * small < big["flops"]["flops"] < 4.5 * small  # ~ quadratic in the side (window padding)


@pytest.mark.parametrize("size", ["100", "0", "-64"])
def test_bad_img_size_is_one_line(tiny_ckpt: Path, capsys, size: str) -> None:
    assert main(["info", "--checkpoint", str(tiny_ckpt), "--img-size", size]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("delightsam info: error:") and "img" in err and "\n" not in err


def test_bundled_model_is_the_default(tiny_ckpt: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ckpt, "bundled_checkpoint_path", lambda: tiny_ckpt)
    info = _run_json(["info"], capsys)
    assert info["checkpoint"] == str(tiny_ckpt) and "note" not in info


def test_no_bundled_model_falls_back_to_untrained(monkeypatch, capsys) -> None:
    monkeypatch.setattr(ckpt, "bundled_checkpoint_path", lambda: None)
    info = _run_json(["info", "--img-size", "256"], capsys)
    assert "no bundled model" in info["note"]
    assert info["checkpoint"].startswith("untrained")
    assert info["variant"] == "delightsam-tinyvit5m"
    assert "note:        no bundled model" in format_info(info)


def test_default_config_counts_against_paper(capsys) -> None:
    """The default variant: active params and MACs at 1024² within ±15 % of the paper."""
    info = _run_json(["info", "--checkpoint", "untrained"], capsys)
    print(format_info(info))
    assert "note" not in info
    p, f, paper = info["parameters"], info["flops"], info["paper"]
    assert p["active"] == p["shared"] + p["per_modality"]
    assert p["total"] == p["shared"] + 6 * p["per_modality"]
    assert f["img_size"] == 1024 and info["flops_1024"] == f
    assert abs(paper["active_params_rel_diff"]) < 0.15
    assert abs(paper["gmacs_rel_diff"]) < 0.15
    assert paper["active_params_rel_diff"] == pytest.approx((p["active"] - 12.74e6) / 12.74e6)
    assert paper["gmacs_rel_diff"] == pytest.approx((f["gmacs"] - 55.86) / 55.86)
    # attention is counted: ~5.2 GFLOPs of window attention at 1024² on top of ~108.2
    assert f["gflops"] > 112


@pytest.mark.parametrize("kind", ["missing", "random", "pickle", "folder"])
def test_bad_checkpoint_exit_2_one_line(tmp_path: Path, capsys, kind: str) -> None:
    path = tmp_path / "model.safetensors"
    if kind == "random":
        path.write_bytes(b"\x13" * 64)
    elif kind == "pickle":
        path = tmp_path / "model.pth"
        path.write_bytes(pickle.dumps({"w": torch.zeros(2)}))
    elif kind == "folder":
        path = tmp_path
    assert main(["info", "--checkpoint", str(path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == ""
    assert err.startswith("delightsam info: error:") and "\n" not in err
    expected = {
        "missing": "not found",
        "random": "not a safetensors",
        "pickle": "refusing to unpickle",
        "folder": "folder",
    }[kind]
    assert expected in err
