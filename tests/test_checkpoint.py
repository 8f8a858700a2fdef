"""Atomic writes, hashing, and safetensors checkpoints: round-trip and every refusal."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from napari_delightsam import checkpoint as ckpt
from napari_delightsam.atomic_files import atomic_write, sha256_file
from napari_delightsam.checkpoint import (
    CheckpointError,
    bundled_checkpoint_path,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from napari_delightsam.config import CHECKPOINT_FORMAT_VERSION, tiny_config
from napari_delightsam.model import DeLightSAM

# -- atomic_files -------------------------------------------------------------------------------------


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    assert atomic_write(target, lambda p: p.write_bytes(b"first")) == target
    assert target.read_bytes() == b"first"
    atomic_write(target, lambda p: p.write_bytes(b"second"))
    assert target.read_bytes() == b"second"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "keep.bin"
    target.write_bytes(b"original \x00 bytes")
    before = target.read_bytes()

    def failing(p: Path) -> None:
        p.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.bin"]


def test_atomic_write_temp_has_suffix_and_same_folder(tmp_path: Path) -> None:
    seen: list[Path] = []

    def writer(p: Path) -> None:
        seen.append(p)
        p.write_text("x")

    atomic_write(tmp_path / "mask.png", writer)
    assert seen[0].parent == tmp_path and seen[0] != tmp_path / "mask.png"
    assert ".png" in seen[0].name


def test_atomic_write_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write(tmp_path / "nope" / "f.txt", lambda p: p.write_text("x"))


def test_sha256_file(tmp_path: Path) -> None:
    f = tmp_path / "abc.txt"
    f.write_bytes(b"abc")
    # FIPS 180-2 test vector
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = tmp_path / "big.bin"
    data = os.urandom(3 * (1 << 20) + 17)
    big.write_bytes(data)
    assert sha256_file(big) == hashlib.sha256(data).hexdigest()


# -- round trip -----------------------------------------------------------------------------------


def _perturb_buffers(model: DeLightSAM) -> None:
    """Give every BatchNorm non-default running stats (so a lost buffer would show)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)


def _inputs(cfg, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=g)
    return x, torch.tensor([0, 4, 5][:n])


def test_roundtrip_identical_outputs(tmp_path: Path, tiny_model: DeLightSAM) -> None:
    _perturb_buffers(tiny_model)
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, {"note": "hello"})
    loaded = load_checkpoint(path)
    assert not loaded.training
    assert loaded.config == tiny_model.config
    sd_a, sd_b = tiny_model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    # persistent buffers: BN stats and SAM's random-Fourier PE matrix
    pe_key = "decoder.pe_layer.positional_encoding_gaussian_matrix"
    assert pe_key in sd_b and torch.equal(sd_a[pe_key], sd_b[pe_key])
    x, mod = _inputs(tiny_model.config)
    with torch.no_grad():
        a, b = tiny_model(x, mod), loaded(x, mod)
    assert torch.equal(a.mask_logits, b.mask_logits)
    assert torch.equal(a.patch_logits, b.patch_logits)
    assert torch.equal(a.modality_logits, b.modality_logits)


def test_read_checkpoint_info(tmp_path: Path, tiny_model: DeLightSAM) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, {"data": "PH2", "epochs": "3"})
    cfg, meta = read_checkpoint_info(path)
    assert cfg == tiny_model.config
    assert meta["format"] == "napari-delightsam"
    assert meta["format_version"] == str(CHECKPOINT_FORMAT_VERSION)
    assert meta["dtype"] == "float32"
    assert meta["data"] == "PH2" and meta["epochs"] == "3"
    assert "config" not in meta


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_storage_loads_as_fp32(tmp_path: Path, tiny_model: DeLightSAM, dtype: torch.dtype) -> None:
    full = save_checkpoint(tmp_path / "full.safetensors", tiny_model)
    half = save_checkpoint(tmp_path / "half.safetensors", tiny_model, dtype=dtype)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    assert read_checkpoint_info(half)[1]["dtype"] == str(dtype).removeprefix("torch.")
    loaded = load_checkpoint(half)
    for name, t in loaded.state_dict().items():
        ref = tiny_model.state_dict()[name]
        assert t.dtype == ref.dtype, name
        if t.is_floating_point():
            assert torch.equal(t, ref.to(dtype).float()), name
    x, mod = _inputs(tiny_model.config)
    with torch.no_grad():
        a, b = tiny_model(x, mod).mask_logits, loaded(x, mod).mask_logits
    assert torch.allclose(a, b, atol=0.1, rtol=0.05)


def test_save_options_and_metadata_validation(tmp_path: Path, tiny_model: DeLightSAM) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model)
    with pytest.raises(FileExistsError):
        save_checkpoint(path, tiny_model, overwrite=False)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "r.safetensors", tiny_model, {"config": "x"})
    with pytest.raises(TypeError, match="str to str"):
        save_checkpoint(tmp_path / "r.safetensors", tiny_model, {"epochs": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="storage dtype"):
        save_checkpoint(tmp_path / "r.safetensors", tiny_model, dtype=torch.float64)
    with pytest.raises(TypeError, match="DeLightSAM"):
        save_checkpoint(tmp_path / "r.safetensors", torch.nn.Linear(2, 2))
    assert not (tmp_path / "r.safetensors").exists()


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, tiny_model: DeLightSAM, monkeypatch) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model)
    before = path.read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="no space"):
        save_checkpoint(path, tiny_model)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


# -- refusals -------------------------------------------------------------------------------------


def test_missing_and_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)


def test_unreadable(tmp_path: Path, tiny_model: DeLightSAM, monkeypatch) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # chmod does not stop root, so simulate the OS refusing the read
    monkeypatch.setattr(ckpt, "open", denied, raising=False)
    with pytest.raises(CheckpointError, match="permission denied"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"abc",
        os.urandom(4096),
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
        b"hello world, plain text\n",
    ],
    ids=["empty", "tiny", "random", "bad-header", "text"],
)
def test_not_safetensors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_checkpoint(path)


def test_truncated(tmp_path: Path, tiny_model: DeLightSAM) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)
    header_only = tmp_path / "head.safetensors"
    header_only.write_bytes(data[:100])  # inside the JSON header
    with pytest.raises(CheckpointError, match="truncated|not a safetensors"):
        load_checkpoint(header_only)


class _Evil:
    """Unpickling this creates a file: proof that an unpickle happened."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


@pytest.mark.parametrize("style", ["pickle", "torch-zip", "torch-legacy"])
def test_pickle_is_never_unpickled(tmp_path: Path, style: str) -> None:
    # control: the payload really does create its sentinel when unpickled
    control = tmp_path / "control_sentinel"
    pickle.loads(pickle.dumps(_Evil(control))).close()
    assert control.exists()

    sentinel = tmp_path / "sentinel"
    payload = {"state_dict": _Evil(sentinel), "weight": torch.zeros(2)}
    path = tmp_path / "model.pth"
    if style == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    elif style == "torch-zip":
        torch.save(payload, path)
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    for fn in (load_checkpoint, read_checkpoint_info):
        with pytest.raises(CheckpointError, match="refusing to unpickle"):
            fn(path)
    assert not sentinel.exists()


def _write_raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path:
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _meta(cfg, **over: str) -> dict[str, str]:
    meta = {
        "format": "napari-delightsam",
        "format_version": str(CHECKPOINT_FORMAT_VERSION),
        "config": cfg.to_json(),
    }
    meta.update(over)
    return meta


def test_foreign_safetensors(tmp_path: Path, tiny_model: DeLightSAM) -> None:
    sd = tiny_model.state_dict()
    no_meta = _write_raw(tmp_path / "a.safetensors", sd, None)
    with pytest.raises(
        CheckpointError, match="not a napari-delightsam checkpoint.*no napari-delightsam metadata"
    ):
        load_checkpoint(no_meta)
    other = _write_raw(tmp_path / "b.safetensors", sd, {"format": "pt"})
    with pytest.raises(CheckpointError, match="format is 'pt'"):
        load_checkpoint(other)


def test_format_version_and_config(tmp_path: Path, tiny_model: DeLightSAM) -> None:
    sd, cfg = tiny_model.state_dict(), tiny_model.config
    newer = _write_raw(
        tmp_path / "v.safetensors", sd, _meta(cfg, format_version=str(CHECKPOINT_FORMAT_VERSION + 1))
    )
    with pytest.raises(CheckpointError, match="newer than this napari-delightsam supports"):
        load_checkpoint(newer)
    garbage_version = _write_raw(tmp_path / "g.safetensors", sd, _meta(cfg, format_version="one"))
    with pytest.raises(CheckpointError, match="invalid format_version"):
        load_checkpoint(garbage_version)
    no_cfg_meta = _meta(cfg)
    del no_cfg_meta["config"]
    no_cfg = _write_raw(tmp_path / "n.safetensors", sd, no_cfg_meta)
    with pytest.raises(CheckpointError, match="no model config"):
        load_checkpoint(no_cfg)
    bad_json = _write_raw(tmp_path / "j.safetensors", sd, _meta(cfg, config="{not json"))
    with pytest.raises(CheckpointError, match="stored model config is invalid"):
        load_checkpoint(bad_json)
    d = cfg.to_dict()
    d["unknown_knob"] = 1
    unknown = _write_raw(tmp_path / "u.safetensors", sd, _meta(cfg, config=json.dumps(d)))
    with pytest.raises(CheckpointError, match="unknown_knob"):
        read_checkpoint_info(unknown)
    d = cfg.to_dict()
    d["controller_attention"] = "weird"
    invalid = _write_raw(tmp_path / "i.safetensors", sd, _meta(cfg, config=json.dumps(d)))
    with pytest.raises(CheckpointError, match="controller_attention"):
        load_checkpoint(invalid)


def test_architecture_mismatch_is_listed(tmp_path: Path, tiny_model: DeLightSAM) -> None:
    cfg = tiny_model.config
    sd = dict(tiny_model.state_dict())
    sd.pop("decoder.queries.weight")
    sd.pop("neck_typo.weight", None)
    sd["extra.layer.weight"] = torch.zeros(3)
    sd["prompt_generator.patch_generator.0.weight"] = torch.zeros(5, 5, 2, 2)
    path = _write_raw(tmp_path / "m.safetensors", sd, _meta(cfg))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "1 missing key(s): decoder.queries.weight" in msg
    assert "1 unexpected key(s): extra.layer.weight" in msg
    assert "prompt_generator.patch_generator.0.weight: file (5, 5, 2, 2) vs model" in msg


def test_other_config_mismatch_lists_first_few(tmp_path: Path, tiny_model: DeLightSAM) -> None:
    """Tensors of one variant under another variant's config: shapes listed, capped."""
    other = tiny_config(embed_dim=48)
    path = _write_raw(tmp_path / "m.safetensors", tiny_model.state_dict(), _meta(other))
    with pytest.raises(CheckpointError, match=r"shape mismatch\(es\):.*\(\+\d+ more\)"):
        load_checkpoint(path)


def test_wrong_dtype_and_nonfinite(tmp_path: Path, tiny_model: DeLightSAM) -> None:
    cfg = tiny_model.config
    sd = dict(tiny_model.state_dict())
    sd["decoder.queries.weight"] = torch.zeros_like(sd["decoder.queries.weight"], dtype=torch.int32)
    path = _write_raw(tmp_path / "d.safetensors", sd, _meta(cfg))
    with pytest.raises(CheckpointError, match="decoder.queries.weight has dtype torch.int32"):
        load_checkpoint(path)
    sd = dict(tiny_model.state_dict())
    bad = sd["decoder.queries.weight"].clone()
    bad[0, 0] = float("nan")
    sd["decoder.queries.weight"] = bad
    path = _write_raw(tmp_path / "nan.safetensors", sd, _meta(cfg))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(path)


def test_format_detected_by_content_not_name(tmp_path: Path, tiny_model: DeLightSAM) -> None:
    path = save_checkpoint(tmp_path / "weights.pth", tiny_model)
    assert load_checkpoint(path).config == tiny_model.config


def test_header_constant_is_little_endian_length(tmp_path: Path, tiny_model: DeLightSAM) -> None:
    """Sanity check of the on-disk layout we validate against (8-byte LE header length + JSON)."""
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"]["format"] == "napari-delightsam"


# -- bundled model --------------------------------------------------------------------------------


def _fake_layout(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    pkg = tmp_path / "repo" / "src" / "napari_delightsam"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(ckpt, "__file__", str(pkg / "checkpoint.py"))
    return pkg / "weights", tmp_path / "repo" / "weights"


def test_bundled_checkpoint_lookup(tmp_path: Path, monkeypatch, tiny_model: DeLightSAM) -> None:
    pkg_weights, repo_weights = _fake_layout(tmp_path, monkeypatch)
    assert bundled_checkpoint_path() is None
    repo_weights.mkdir()
    save_checkpoint(repo_weights / "delightsam_default.safetensors", tiny_model)
    assert bundled_checkpoint_path() == repo_weights / "delightsam_default.safetensors"
    pkg_weights.mkdir()
    save_checkpoint(pkg_weights / "delightsam_default.safetensors", tiny_model)
    assert bundled_checkpoint_path() == pkg_weights / "delightsam_default.safetensors"
    # the bundled model is never overwritten
    with pytest.raises(CheckpointError, match="bundled default model"):
        save_checkpoint(pkg_weights / "delightsam_default.safetensors", tiny_model)


def test_bundled_checkpoint_is_a_valid_file_when_present() -> None:
    path = bundled_checkpoint_path()
    if path is None:
        assert not (
            Path(ckpt.__file__).resolve().parents[1] / "weights" / ckpt.BUNDLED_CHECKPOINT_NAME
        ).exists()
    else:
        cfg, meta = read_checkpoint_info(path)
        assert meta["format"] == "napari-delightsam" and cfg.img_size > 0
