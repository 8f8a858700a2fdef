"""Faults during writes: an exception, an interrupt or a kill never costs the previous file.

Every writer the package uses for user-visible files goes through ``atomic_files.atomic_write``
(temporary file in the same folder, fsync, ``os.replace``): checkpoints
(``save_checkpoint``) and mask/heatmap exports (``write_mask_png``, ``write_png``,
``write_tiff``, and ``delightsam segment`` which uses them). Here each of them is made to fail
at each stage of a write, or its process is killed with SIGKILL half-way through, and the
previous file must be byte-identical (and still load), with no temporary file left behind
after an exception. A killed process cannot clean up: its temporary file stays, hidden
(``.<name>.<random><suffix>.tmp``, or safetensors' own ``.tmpXXXXXX``), and is ignored by the
CLI's folder scan.

Complements tests/test_checkpoint.py and tests/test_image_files.py (A, B), which check one
failing writer each.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_delightsam import atomic_files, checkpoint, cli, image_files
from napari_delightsam.checkpoint import load_checkpoint, save_checkpoint
from napari_delightsam.config import tiny_config
from napari_delightsam.image_files import read_image, write_mask_png, write_png, write_tiff
from napari_delightsam.model import DeLightSAM

_REAL_ATOMIC_WRITE = atomic_files.atomic_write


def _masks(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((96, 128)) > 0.5


class _Writer:
    """One kind of user-visible file: how to write version ``v`` and how to check it."""

    def __init__(self, name: str, module, suffix: str, write: Callable[[Path, int], None]) -> None:
        self.name, self.module, self.suffix, self.write = name, module, suffix, write


def _write_checkpoint(path: Path, version: int) -> None:
    torch.manual_seed(version)
    save_checkpoint(path, DeLightSAM(tiny_config()), {"version": str(version)})


_WRITERS = {
    "checkpoint": _Writer("checkpoint", checkpoint, ".safetensors", _write_checkpoint),
    "mask-png": _Writer(
        "mask-png", image_files, ".png", lambda p, v: write_mask_png(p, _masks(v), overwrite=True)
    ),
    "png": _Writer(
        "png", image_files, ".png", lambda p, v: write_png(p, (_masks(v) * 200).astype(np.uint8), overwrite=True)
    ),
    "tiff": _Writer(
        "tiff", image_files, ".tif", lambda p, v: write_tiff(p, _masks(v).astype(np.float32) * v, overwrite=True)
    ),
}


def _check_intact(path: Path, before: bytes, writer: _Writer) -> None:
    assert path.read_bytes() == before
    if writer.name == "checkpoint":
        assert load_checkpoint(path).config == tiny_config()
    else:
        assert read_image(path).shape == (96, 128)


# -- exceptions at every stage of a write ----------------------------------------------------


def _failing_write_fn(stage: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    def wrap(write_fn: Callable[[Path], None]) -> Callable[[Path], None]:
        def broken(tmp: Path) -> None:
            if stage == "before-writing":
                raise OSError(errno.ENOSPC, "No space left on device")
            if stage == "out-of-memory":
                raise MemoryError()
            write_fn(tmp)
            data = Path(tmp).read_bytes()
            Path(tmp).write_bytes(data[: len(data) // 2])  # half of the content is on disk
            if stage == "half-written":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise KeyboardInterrupt  # "interrupted": Ctrl+C, or a closing window's signal

        return broken

    return wrap


_STAGES = ("before-writing", "half-written", "interrupted", "out-of-memory", "fsync-fails", "rename-fails")
_EXPECTED = {
    "before-writing": OSError,
    "half-written": OSError,
    "interrupted": KeyboardInterrupt,
    "out-of-memory": MemoryError,
    "fsync-fails": OSError,
    "rename-fails": OSError,
}


@pytest.mark.parametrize("stage", _STAGES)
@pytest.mark.parametrize("kind", list(_WRITERS))
def test_an_exception_at_any_stage_keeps_the_previous_file(tmp_path, monkeypatch, kind, stage):
    writer = _WRITERS[kind]
    target = tmp_path / f"result{writer.suffix}"
    writer.write(target, 1)
    before = target.read_bytes()
    listing = sorted(os.listdir(tmp_path))

    if stage == "fsync-fails":

        def fsync(fd):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(atomic_files.os, "fsync", fsync)
    elif stage == "rename-fails":

        def replace(src, dst):
            raise OSError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(atomic_files.os, "replace", replace)
    else:
        wrap = _failing_write_fn(stage)
        monkeypatch.setattr(
            writer.module, "atomic_write", lambda path, fn: _REAL_ATOMIC_WRITE(path, wrap(fn))
        )

    with pytest.raises(_EXPECTED[stage]):
        writer.write(target, 2)
    monkeypatch.undo()

    _check_intact(target, before, writer)
    assert sorted(os.listdir(tmp_path)) == listing  # no temporary file left
    writer.write(target, 3)  # and the next write works
    assert target.read_bytes() != before


@pytest.mark.parametrize("kind", list(_WRITERS))
def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch, kind):
    writer = _WRITERS[kind]
    wrap = _failing_write_fn("half-written")
    monkeypatch.setattr(writer.module, "atomic_write", lambda path, fn: _REAL_ATOMIC_WRITE(path, wrap(fn)))
    with pytest.raises(OSError):
        writer.write(tmp_path / f"new{writer.suffix}", 1)
    assert os.listdir(tmp_path) == []


def test_replacing_keeps_the_files_permissions(tmp_path):
    target = tmp_path / "mask.png"
    write_mask_png(target, _masks(1))
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    target.chmod(0o640)
    write_mask_png(target, _masks(2), overwrite=True)
    assert target.stat().st_mode & 0o777 == 0o640


# -- SIGKILL half-way through a write --------------------------------------------------------

_SLOW_WRITER = """
import sys, time
from pathlib import Path
import numpy as np, torch
from napari_delightsam import checkpoint, image_files, atomic_files

real = atomic_files.atomic_write

def slow(path, write_fn):
    def fn(tmp):
        write_fn(tmp)
        data = Path(tmp).read_bytes()
        with open(tmp, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            print("HALF", len(data) // 2, tmp, flush=True)
            time.sleep(120)  # killed here
            fh.write(data[len(data) // 2 :])
    return real(path, fn)

checkpoint.atomic_write = slow
image_files.atomic_write = slow
kind, target = sys.argv[1], Path(sys.argv[2])
mask = np.random.default_rng(7).random((96, 128)) > 0.5
if kind == "checkpoint":
    from napari_delightsam.config import tiny_config
    from napari_delightsam.model import DeLightSAM
    torch.manual_seed(7)
    checkpoint.save_checkpoint(target, DeLightSAM(tiny_config()), {"version": "7"})
elif kind == "mask-png":
    image_files.write_mask_png(target, mask, overwrite=True)
elif kind == "png":
    image_files.write_png(target, (mask * 200).astype(np.uint8), overwrite=True)
else:
    image_files.write_tiff(target, mask.astype(np.float32) * 7, overwrite=True)
print("FINISHED", flush=True)
"""


def _kill_half_way(kind: str, target: Path) -> Path:
    """Run the slow writer in a child, SIGKILL it once half the bytes are on disk; returns the
    temporary file it was writing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, kind, str(target)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("HALF"), (line, proc.stderr.read() if proc.poll() is not None else "")
        _, half, tmp = line.split(maxsplit=2)
        tmp_path = Path(tmp.strip())
        assert tmp_path.stat().st_size == int(half)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return tmp_path


@pytest.mark.parametrize("kind", list(_WRITERS))
def test_sigkill_half_way_through_a_write_keeps_the_previous_file(tmp_path, kind):
    writer = _WRITERS[kind]
    target = tmp_path / f"result{writer.suffix}"
    writer.write(target, 1)
    before = target.read_bytes()

    tmp = _kill_half_way(kind, target)

    _check_intact(target, before, writer)
    # the killed process's temporary file: beside the target, hidden, never mistaken for a result
    assert tmp.parent == tmp_path and tmp.name.startswith(f".{target.name}.") and tmp.name.endswith(".tmp")
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, tmp.name])
    from napari_delightsam.commands.segment import expand_inputs

    files, _ = expand_inputs([str(tmp_path)])
    assert tmp not in files
    writer.write(target, 3)
    assert target.read_bytes() != before


@pytest.mark.slow
def test_sigkill_at_a_random_moment_of_real_writes(tmp_path):
    """No patching: a child rewrites a default-size checkpoint (about 50 MB) and an 8-megapixel
    mask in a loop and is killed at a random moment; each file is always a complete version."""
    script = (
        "import sys, numpy as np, torch\n"
        "from napari_delightsam.checkpoint import save_checkpoint\n"
        "from napari_delightsam.config import ModelConfig\n"
        "from napari_delightsam.image_files import write_mask_png\n"
        "from napari_delightsam.model import DeLightSAM\n"
        "folder = sys.argv[1]\n"
        "model = DeLightSAM(ModelConfig())\n"
        "mask = np.random.default_rng(0).random((2048, 4096)) > 0.5\n"
        "for i in range(10**6):\n"
        "    save_checkpoint(folder + '/model.safetensors', model, {'i': str(i)})\n"
        "    write_mask_png(folder + '/mask.png', np.roll(mask, i, axis=1), overwrite=True)\n"
        "    print('SAVED', i, flush=True)\n"
    )
    rng = random.Random(0)
    for attempt in range(3):
        folder = tmp_path / f"run{attempt}"
        folder.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            assert proc.stdout.readline().startswith("SAVED 0")
            time.sleep(rng.uniform(0.1, 3.0))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        _, meta = checkpoint.read_checkpoint_info(folder / "model.safetensors")
        assert int(meta["i"]) >= 0
        assert load_checkpoint(folder / "model.safetensors").config.img_size == 1024
        mask = read_image(folder / "mask.png")
        assert mask.shape == (2048, 4096) and set(np.unique(mask)) <= {0, 255}
        # a kill can leave our hidden temporary file, or safetensors' own (".tmpXXXXXX"): hidden
        leftovers = [n for n in os.listdir(folder) if n not in ("model.safetensors", "mask.png")]
        assert all(n.startswith(".") for n in leftovers), leftovers


# -- concurrent writers: a reader never sees a torn file -------------------------------------


def test_concurrent_writers_and_a_reader_see_only_complete_files(tmp_path):
    target = tmp_path / "mask.png"
    versions = [_masks(i) for i in range(3)]
    write_mask_png(target, versions[0])
    expected = [np.where(v, 255, 0).astype(np.uint8) for v in versions]
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = 0

    def writer(i: int) -> None:
        try:
            for _ in range(15):
                write_mask_png(target, versions[i], overwrite=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:
        nonlocal reads
        try:
            while not stop.is_set():
                got = read_image(target)
                assert any(np.array_equal(got, e) for e in expected), "a torn or foreign mask was read"
                reads += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    watcher.join(timeout=60)
    assert not errors, errors
    assert reads > 0
    assert os.listdir(tmp_path) == ["mask.png"]


# -- the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", DeLightSAM(tiny_config()))


def _images(folder: Path, n: int, size: int = 64) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size + i % 5, 3), dtype=np.uint8)).save(
            folder / f"img{i:03d}.png"
        )
        names.append(f"img{i:03d}")
    return names


def test_cli_a_failing_output_write_is_reported_and_the_rest_finish(tmp_path, tiny_ckpt, monkeypatch, capsys):
    names = _images(tmp_path / "in", 5)
    out = tmp_path / "out"
    monkeypatch.setattr(cli, "COMMANDS", ("segment",))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def disk_full_for_img002(path, fn):
        def broken(tmp: Path) -> None:
            fn(tmp)
            if Path(path).name == "img002_mask.png":
                raise OSError(errno.ENOSPC, "No space left on device")

        return _REAL_ATOMIC_WRITE(path, broken)

    monkeypatch.setattr(image_files, "atomic_write", disk_full_for_img002)
    code = cli.main(
        ["segment", str(tmp_path / "in"), "-m", "xray", "-o", str(out), "--checkpoint", str(tiny_ckpt), "-q"]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert code == 1
    assert len(err) == 1 and "img002.png: cannot write the output" in err[0] and "No space left" in err[0]
    assert sorted(os.listdir(out)) == sorted(f"{n}_mask.png" for n in names if n != "img002")


@pytest.mark.slow
def test_cli_killed_mid_run_keeps_finished_masks_and_resumes(tmp_path, tiny_ckpt):
    """A SIGKILL while `delightsam segment` works through a folder: every mask on disk is
    complete; running the same command again skips them and finishes the rest."""
    names = _images(tmp_path / "in", 40, size=256)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "napari_delightsam.cli", "segment", str(tmp_path / "in"), "-m", "xray",
            "-o", str(out), "--checkpoint", str(tiny_ckpt), "--batch-size", "1", "-q"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and len([n for n in os.listdir(out) if not n.startswith(".")]) >= 3:
                break
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    done = sorted(n for n in os.listdir(out) if not n.startswith("."))
    assert 3 <= len(done) < len(names), "the run was not interrupted half-way"
    for name in done:
        mask = read_image(out / name)
        i = int(name[3:6])
        assert mask.shape == (256, 256 + i % 5) and set(np.unique(mask)) <= {0, 255}

    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{len(done)} skipped" in again.stdout
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == sorted(
        f"{n}_mask.png" for n in names
    )
