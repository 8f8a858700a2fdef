"""Robustness of loading checkpoints: hostile or damaged files are refused with a message and
nothing in them ever runs.

Every entry point is tried: ``load_checkpoint``, ``read_checkpoint_info``, ``load_model(path)``,
``delightsam segment --checkpoint`` and ``delightsam info --checkpoint``. The only accepted
outcome for a bad file is ``CheckpointError`` (a ``ValueError``) with a one-line message, or
for the CLIs exit code 2 with one ``error:`` line. Pickles are proved never to run: their
payload creates a sentinel file when unpickled, and unpickling entry points are spied on.

Complements tests/test_checkpoint.py (A), which checks one example of each refusal; here the
damage is drawn anywhere (hypothesis), header fields are corrupted one by one, and every
entry point (Python and CLI) is tried.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from napari_delightsam import cli
from napari_delightsam.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from napari_delightsam.config import CHECKPOINT_FORMAT_VERSION, ModelConfig, tiny_config
from napari_delightsam.inference import load_model
from napari_delightsam.model import DeLightSAM

pytestmark = pytest.mark.usefixtures("one_thread", "single_process_env")


@pytest.fixture(autouse=True)
def _two_commands(monkeypatch) -> None:
    # only the two CLIs under test (the other subcommands are not needed to refuse a file)
    monkeypatch.setattr(cli, "COMMANDS", ("segment", "info"))


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    """A valid tiny checkpoint's bytes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("good") / "tiny.safetensors"
    return save_checkpoint(path, DeLightSAM(tiny_config()).eval()).read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


_PY_LOADERS: dict[str, Callable[[Path], object]] = {
    "load_checkpoint": load_checkpoint,
    "read_checkpoint_info": read_checkpoint_info,
    "load_model": lambda p: load_model(p, device="cpu"),
}


def _refused(path: Path, *, loaders=("load_checkpoint", "read_checkpoint_info", "load_model")) -> list[str]:
    """Every Python entry point refuses ``path`` with one CheckpointError naming it."""
    messages = []
    for name in loaders:
        with pytest.raises(CheckpointError) as exc:
            _PY_LOADERS[name](path)
        msg = str(exc.value)
        assert "\n" not in msg, (name, msg)
        assert path.name in msg, (name, msg)
        messages.append(msg)
    return messages


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err.splitlines()
    return code, err


def _cli_refuses(capsys, tmp_path: Path, path: Path) -> list[str]:
    """Both CLIs exit 2 with exactly one 'error:' line that names the file; no output written."""
    image = tmp_path / "cli_input.png"
    if not image.exists():
        from PIL import Image

        Image.fromarray(np.zeros((20, 20), np.uint8)).save(image)
    out = tmp_path / "cli_out"
    lines = []
    for argv in (
        ["segment", str(image), "-m", "xray", "-o", str(out), "--checkpoint", str(path), "-q"],
        ["info", "--checkpoint", str(path)],
    ):
        code, err = _cli(capsys, *argv)
        assert code == 2, (argv[0], err)
        assert len(err) == 1 and err[0].startswith(f"delightsam {argv[0]}: error: "), err
        assert path.name in err[0], err
        lines.append(err[0])
    assert not out.exists() or not any(out.iterdir())
    return lines


# -- random bytes, truncation, byte damage ----------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=2048),
        # a plausible little header length followed by junk: gets past the first check
        st.tuples(st.integers(2, 200), st.binary(max_size=400)).map(lambda t: struct.pack("<Q", t[0]) + t[1]),
        st.tuples(st.integers(2, 200), st.binary(max_size=400)).map(
            lambda t: struct.pack("<Q", t[0]) + b"{" + t[1]
        ),
    )
)
def test_random_bytes_are_refused(tmp_path, data):
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    _refused(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_anywhere_is_refused(tmp_path, good_bytes, fraction):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good_bytes[: int(len(good_bytes) * fraction)])
    msgs = _refused(path, loaders=("load_checkpoint", "read_checkpoint_info"))
    assert any(w in msgs[0] for w in ("truncated", "not a safetensors checkpoint")), msgs[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    in_header=st.booleans(),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_damaged_bytes_load_or_are_refused_never_anything_else(tmp_path, good_bytes, in_header, flips):
    """Damage in the header or the tensor data: the model loads (harmless change) or
    CheckpointError; never KeyError/TypeError/a crash deep inside."""
    (n,) = struct.unpack("<Q", good_bytes[:8])
    start, stop = (8, 8 + n) if in_header else (8 + n, len(good_bytes))
    data = bytearray(good_bytes)
    for where, value in flips:
        data[start + int(where * (stop - start))] = value
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(data))
    try:
        model = load_checkpoint(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        return
    # a harmless change (e.g. a digit of a float setting in the config) may still load
    assert isinstance(model, DeLightSAM)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_every_header_length_of_our_own_checkpoints_loads(tmp_path, tiny_model):
    """Found: a safetensors file starts with its header length, little-endian; for 1 valid
    header length in 32 (padded to 8 bytes) the first byte is 0x80, the pickle magic byte,
    and load_checkpoint refused our own checkpoint as "a Python pickle". Metadata of every
    length mod 256 shifts the header length through all 32 cases; each must load."""
    firsts = set()
    for extra in range(0, 256, 8):
        path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, {"note": "x" * extra})
        firsts.add(path.read_bytes()[0])
        assert read_checkpoint_info(path)[1]["note"] == "x" * extra
        assert load_checkpoint(path).config == tiny_model.config
    assert 0x80 in firsts  # the case that used to fail was exercised


# -- corrupt header fields, one at a time -----------------------------------------------------


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _field(key: str, value) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        entry = header[_first_tensor(header)]
        if value is _DELETE:
            del entry[key]
        else:
            entry[key] = value

    return edit


_DELETE = object()

_HEADER_DAMAGE: dict[str, Callable[[dict], None]] = {
    "no-shape": _field("shape", _DELETE),
    "shape-null": _field("shape", None),
    "shape-string": _field("shape", "12"),
    "shape-negative": _field("shape", [-1, 4]),
    "shape-float": _field("shape", [1.5]),
    "no-dtype": _field("dtype", _DELETE),
    "dtype-unknown": _field("dtype", "F128"),
    "dtype-number": _field("dtype", 4),
    "no-offsets": _field("data_offsets", _DELETE),
    "offsets-strings": _field("data_offsets", ["0", "4"]),
    "offsets-null": _field("data_offsets", [None, None]),
    "offsets-reversed": _field("data_offsets", [8, 0]),
    "offsets-negative": _field("data_offsets", [-8, 0]),
    "offsets-bool": _field("data_offsets", [False, True]),
    "offsets-beyond-file": _field("data_offsets", [0, 10**15]),
    "entry-not-object": lambda h: h.__setitem__(_first_tensor(h), [1, 2]),
    "metadata-not-object": lambda h: h.__setitem__("__metadata__", "napari-delightsam"),
    "config-not-json": lambda h: h["__metadata__"].__setitem__("config", "{not json"),
    "config-a-list": lambda h: h["__metadata__"].__setitem__("config", "[1, 2]"),
    "config-null": lambda h: h["__metadata__"].__setitem__("config", "null"),
    "config-missing": lambda h: h["__metadata__"].pop("config"),
    "config-unknown-field": lambda h: h["__metadata__"].__setitem__(
        "config", json.dumps({**json.loads(h["__metadata__"]["config"]), "rm_rf": True})
    ),
    "format-version-text": lambda h: h["__metadata__"].__setitem__("format_version", "one"),
    "format-version-future": lambda h: h["__metadata__"].__setitem__(
        "format_version", str(CHECKPOINT_FORMAT_VERSION + 1)
    ),
}


@pytest.mark.parametrize("damage", list(_HEADER_DAMAGE))
def test_each_corrupt_header_field_is_refused(tmp_path, good_bytes, damage):
    """Found: a tensor entry without "shape" (KeyError) or with non-integer offsets
    (ValueError/TypeError from int()) escaped as the wrong exception with an unclear message;
    every entry is now validated (dtype, shape, data_offsets) before use."""
    header, body = _split(good_bytes)
    header = copy.deepcopy(header)
    _HEADER_DAMAGE[damage](header)
    path = tmp_path / f"{damage}.safetensors"
    path.write_bytes(_join(header, body))
    # read_checkpoint_info only checks what it reads (the header); loading checks everything
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert "\n" not in str(exc.value) and path.name in str(exc.value)
    with pytest.raises(CheckpointError):
        load_model(path, device="cpu")


def test_header_length_claims_are_checked_before_reading(tmp_path):
    for claim in (0, 1, 2**63, 2**64 - 1, 100 * 2**20 + 1):
        path = tmp_path / "claim.safetensors"
        path.write_bytes(struct.pack("<Q", claim) + b"{}" + b" " * 64)
        _refused(path)


# -- another architecture, foreign files -----------------------------------------------------


def _raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path:
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _ours(cfg: ModelConfig) -> dict[str, str]:
    return {
        "format": "napari-delightsam",
        "format_version": str(CHECKPOINT_FORMAT_VERSION),
        "config": cfg.to_json(),
    }


def test_tiny_weights_under_the_default_config_are_refused_everywhere(tmp_path, tiny_model, capsys):
    path = _raw(tmp_path / "tiny-as-default.safetensors", tiny_model.state_dict(), _ours(ModelConfig()))
    for msg in _refused(path, loaders=("load_checkpoint", "load_model")):
        assert "does not match the architecture in its config" in msg and "shape mismatch" in msg
    for line in _cli_refuses(capsys, tmp_path, path):
        assert "does not match the architecture" in line


def test_foreign_safetensors_without_our_metadata_is_refused_everywhere(tmp_path, capsys):
    """A torchvision ResNet state dict saved as plain safetensors (someone else's model)."""
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18(weights=None).state_dict()
    path = _raw(tmp_path / "resnet18.safetensors", resnet, {"format": "pt"})
    for msg in _refused(path):
        assert "not a napari-delightsam checkpoint" in msg and "format is 'pt'" in msg
    for line in _cli_refuses(capsys, tmp_path, path):
        assert "not a napari-delightsam checkpoint" in line
    # the same tensors claiming to be ours: the key lists are summarised on one line
    claimed = _raw(tmp_path / "resnet-claims-ours.safetensors", resnet, _ours(tiny_config()))
    (msg,) = _refused(claimed, loaders=("load_checkpoint",))
    assert "missing key(s)" in msg and "unexpected key(s)" in msg and "more)" in msg


def test_a_config_asking_for_a_giant_model_is_refused_before_allocating(tmp_path, tiny_model):
    """Found: load_checkpoint built the model from the stored config before comparing it with
    the tensors, so a corrupt or hostile config (here 0.55 G parameters, 2.2 GB) allocated and
    initialised all of it first. Shapes are now compared on a weightless 'meta' model; the
    file is refused in a child process that stays far below that size (importing torch and
    the package alone is about 0.85 GB here)."""
    cfg = tiny_config(embed_dim=4096)
    path = _raw(tmp_path / "giant.safetensors", tiny_model.state_dict(), _ours(cfg))
    script = (
        "import resource, sys\n"
        "from napari_delightsam.checkpoint import CheckpointError, load_checkpoint\n"
        "try:\n"
        "    load_checkpoint(sys.argv[1])\n"
        "except CheckpointError as exc:\n"
        "    print('refused:', exc)\n"
        "import os  # VmHWM: peak RSS of this process image only; ru_maxrss also counts the\n"
        "# forked parent (pytest) because Linux carries it across exec\n"
        "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')] if os.path.exists('/proc/self/status') else []\n"
        "print(hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("refused:") and "does not match the architecture" in lines[0]
    peak_mib = int(lines[-1]) / 1024
    assert peak_mib < 1500, f"peak RSS {peak_mib:.0f} MiB while refusing"


# -- pickles: refused, never run -------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``sentinel``: proof that something unpickled it."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch '{self.sentinel}'",))


def _pickle_files(folder: Path, sentinel: Path) -> dict[str, Path]:
    payload = {"state_dict": _Payload(sentinel), "weight": torch.zeros(2)}
    files: dict[str, Path] = {}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        files[f"pickle-protocol-{protocol}"] = folder / f"p{protocol}.pth"
        files[f"pickle-protocol-{protocol}"].write_bytes(pickle.dumps(payload, protocol=protocol))
    torch.save(payload, folder / "zip.pt")
    files["torch-zip"] = folder / "zip.pt"
    torch.save(payload, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    files["torch-legacy"] = folder / "legacy.pth"
    (folder / "renamed.safetensors").write_bytes(pickle.dumps(payload, protocol=4))
    files["pickle-named-safetensors"] = folder / "renamed.safetensors"
    (folder / "model.ckpt").write_bytes((folder / "zip.pt").read_bytes())
    files["torch-zip-named-ckpt"] = folder / "model.ckpt"
    return files


@pytest.fixture
def no_unpickling(monkeypatch) -> list[str]:
    """Records any call to an unpickling entry point (there must be none)."""
    calls: list[str] = []

    def spy(name, real):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(pickle, "load", spy("pickle.load", pickle.load))
    monkeypatch.setattr(pickle, "loads", spy("pickle.loads", pickle.loads))
    monkeypatch.setattr(torch, "load", spy("torch.load", torch.load))
    return calls


def test_pickle_payload_control_really_runs(tmp_path):
    """The control: unpickling the payload does create its sentinel."""
    sentinel = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(sentinel)))
    assert sentinel.exists()


def test_pickles_are_refused_and_never_run_through_python(tmp_path, no_unpickling):
    sentinel = tmp_path / "PWNED"
    for kind, path in _pickle_files(tmp_path, sentinel).items():
        for msg in _refused(path):
            assert "not a safetensors checkpoint" in msg, (kind, msg)
            if kind not in ("pickle-protocol-0", "pickle-protocol-1"):  # these have no magic byte
                assert "refusing to unpickle" in msg, (kind, msg)
        assert not sentinel.exists(), kind
    assert no_unpickling == []


def test_pickles_are_refused_and_never_run_through_the_cli(tmp_path, capsys, no_unpickling):
    sentinel = tmp_path / "PWNED"
    files = _pickle_files(tmp_path, sentinel)
    for kind in ("pickle-protocol-0", "pickle-protocol-5", "torch-zip", "pickle-named-safetensors"):
        for line in _cli_refuses(capsys, tmp_path, files[kind]):
            assert "not a safetensors checkpoint" in line, (kind, line)
        assert not sentinel.exists(), kind
    assert no_unpickling == []


def test_a_pickle_inside_a_valid_checkpoint_is_never_run(tmp_path, good_bytes):
    """Pickle bytes appended after the tensors, and as a metadata value: the file is read as
    safetensors (plain bytes and JSON strings), so the payload is inert either way."""
    sentinel = tmp_path / "PWNED"
    blob = pickle.dumps(_Payload(sentinel), protocol=2)
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(good_bytes + blob)
    try:
        load_checkpoint(trailing)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
    header, body = _split(good_bytes)
    header["__metadata__"]["notes"] = blob.decode("latin-1")
    in_meta = tmp_path / "in-meta.safetensors"
    in_meta.write_bytes(_join(header, body))
    cfg, meta = read_checkpoint_info(in_meta)
    assert cfg == tiny_config() and meta["notes"] == blob.decode("latin-1")
    assert load_checkpoint(in_meta).config == tiny_config()
    assert not sentinel.exists()


def test_litemedsam_reader_uses_weights_only(tmp_path, monkeypatch, no_unpickling):
    """The one foreign-format reader in the inference path (LiteMedSAM .pth, via
    torch.load(weights_only=True)) refuses a pickle that carries code."""
    from napari_delightsam.model import litemedsam

    sentinel = tmp_path / "PWNED"
    files = _pickle_files(tmp_path, sentinel)
    monkeypatch.setattr(litemedsam, "litemedsam_checkpoint_path", lambda: files["torch-zip"])
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        litemedsam.litemedsam_state_dict()
    assert not sentinel.exists()
    assert no_unpickling == ["torch.load"]
