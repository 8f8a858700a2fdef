"""Robustness of reading image files and of ``delightsam segment`` on folders of bad files.

Every bad file gives one ``ImageReadError`` (a ``ValueError``) whose one-line message names the
file and the problem; in a batch (``delightsam segment FOLDER``) each bad file costs one stderr
line, the other files are still segmented, and the exit code is 1.

Complements tests/test_image_files.py and tests/test_segment_cli.py (B): those check one
truncation point per format, a PNG bomb header and a small folder; here truncation and
corruption are drawn anywhere in the file (hypothesis), every format gets a bomb header, and
one folder holds every kind of bad file next to good ones with awkward names.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from napari_delightsam import cli
from napari_delightsam.checkpoint import save_checkpoint
from napari_delightsam.config import tiny_config
from napari_delightsam.image_files import ImageReadError, read_image
from napari_delightsam.inference import Segmenter
from napari_delightsam.model import DeLightSAM

_RGB = np.random.default_rng(0).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)

pytestmark = pytest.mark.usefixtures("one_thread", "single_process_env")


def _encode(fmt: str, array: np.ndarray = _RGB, **tiff_options) -> bytes:
    buf = io.BytesIO()
    if fmt == "TIFF":
        tifffile.imwrite(buf, array, **tiff_options)
    elif fmt == "TIFF-zlib":
        tifffile.imwrite(buf, array, compression="zlib")
    else:
        Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "TIFF-zlib": ".tiff"}
_ENCODED = {fmt: _encode(fmt) for fmt in _FORMATS}

# the phrases read_image uses for each kind of failure
_BAD_FILE_WORDS = (
    "truncated", "corrupt", "empty", "not a recognised image", "TIFF", "megapixels",
    "decompression bomb", "holds no image", "not a regular file",
)  # fmt: skip


def _read_error(path: Path) -> str:
    """read_image(path) must raise one ImageReadError naming the file; returns the message."""
    with pytest.raises(ImageReadError) as exc:
        read_image(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    assert any(word in msg for word in _BAD_FILE_WORDS), msg
    return msg


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# -- damaged files: anywhere, any format ------------------------------------------------------


@pytest.mark.parametrize("fmt", list(_FORMATS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_anywhere_gives_one_clear_error(tmp_path, fmt, fraction):
    data = _ENCODED[fmt]
    cut = int(len(data) * fraction)
    path = _write(tmp_path, f"cut{_FORMATS[fmt]}", data[:cut])
    try:
        image = read_image(path)
    except ImageReadError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(f"{path}: ")
        if cut == 0:
            assert "empty (0 bytes)" in msg
        return
    # only a cut in trailing bytes the decoder does not need may still read, and then fully
    assert image.shape == _RGB.shape


def _segment_or_value_error(seg: Segmenter, image: np.ndarray) -> None:
    try:
        r = seg.segment(image, "dermoscopy")
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    assert r.mask.shape == r.info.size and np.isfinite(r.probability).all()


@pytest.mark.parametrize("fmt", list(_FORMATS))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8)
)
def test_corrupted_bytes_give_an_image_or_one_clear_error_end_to_end(tmp_path, tiny_model, fmt, flips):
    """Random byte changes: read_image returns pixels or raises ImageReadError, never anything
    else; whatever pixels come out, segmenting them gives a mask or one ValueError."""
    data = bytearray(_ENCODED[fmt])
    for where, value in flips:
        data[int(where * len(data))] = value
    path = _write(tmp_path, f"flip{_FORMATS[fmt]}", bytes(data))
    try:
        image = read_image(path)
    except ImageReadError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(f"{path}: ")
        return
    assert isinstance(image, np.ndarray)
    _segment_or_value_error(Segmenter.from_model(tiny_model, device="cpu"), image)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".PNG"])
def test_zero_byte_files_of_every_extension(tmp_path, ext):
    assert "file is empty (0 bytes)" in _read_error(_write(tmp_path, f"zero{ext}", b""))


# -- decompression bombs: refused from the header ---------------------------------------------


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_ENCODED["JPEG"])
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(_ENCODED["BMP"])
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _tiff_claiming(width: int, height: int) -> bytes:
    """A 150-byte little-endian TIFF: one deflate strip of zeros claiming width x height."""
    strip = zlib.compress(b"\0" * 1024)
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1),
            (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, len(strip))]  # fmt: skip
    data_offset = 8 + 2 + 12 * len(tags) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for tag, kind, value in tags:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, 1) + packed
    return bytes(out + struct.pack("<I", 0) + strip)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png_with_text_bomb() -> bytes:
    """An 8x8 PNG carrying a zTXt chunk that inflates to 64 MB."""
    rows = b"".join(b"\x00" + b"\x80" * 8 for _ in range(8))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
        + _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * (64 << 20), 9))
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "name, make, words",
    [
        ("bomb.jpg", lambda: _jpeg_claiming(65000, 65000), ("decompression bomb", "megapixels")),
        ("bomb.bmp", lambda: _bmp_claiming(50000, 50000), ("decompression bomb", "megapixels")),
        ("bomb.tif", lambda: _tiff_claiming(100000, 100000), ("100000x100000", "100 megapixels")),
        ("big.tif", lambda: _tiff_claiming(11000, 11000), ("11000x11000", "121.0 megapixels")),
        ("big.jpg", lambda: _jpeg_claiming(11000, 11000), ("11000x11000", "121.0 megapixels")),
        ("text-bomb.png", _png_with_text_bomb, ("corrupt", "too large")),
    ],
)
def test_bomb_headers_are_refused_before_decoding(tmp_path, name, make, words):
    """(B tests the PNG IHDR bomb.) Each file is a few kB but claims gigapixels or a huge text
    chunk; the refusal names the size (or Pillow's bomb check) before any pixels are decoded."""
    path = _write(tmp_path, name, make())
    assert path.stat().st_size < 300_000
    msg = _read_error(path)
    assert any(w in msg for w in words), msg


# -- files that are not images ----------------------------------------------------------------

_NOT_IMAGES = {
    "pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n",
    "zip": b"PK\x03\x04" + b"\x00" * 60,
    "html": b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>\n',
    "python": b"import os\nos.system('echo pwned')\n",
    "random": np.random.default_rng(0).bytes(4096),
    "png-signature-only": b"\x89PNG\r\n\x1a\n",
    "png-no-idat": b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)),
    "jpeg-soi-only": b"\xff\xd8\xff",
    "tiff-magic-only": b"II*\x00",
    "tiff-bad-ifd": b"MM\x00*" + struct.pack(">I", 10**9) + b"\x00" * 32,
    "npy": b"\x93NUMPY\x01\x00" + b"v" * 60,
}


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif", ".bmp"])
@pytest.mark.parametrize("kind", list(_NOT_IMAGES))
def test_non_image_files_with_image_extensions(tmp_path, kind, ext):
    _read_error(_write(tmp_path, f"{kind}{ext}", _NOT_IMAGES[kind]))


@pytest.mark.timeout(60)
def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    """Found: a FIFO named *.png was reported as 'file is empty (0 bytes)'; it is now named for
    what it is (and is never opened: opening a FIFO blocks until something writes to it)."""
    fifo = tmp_path / "stream.png"
    os.mkfifo(fifo)
    assert "not a regular file" in _read_error(fifo)


# -- the CLI on a folder of good and bad files -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", DeLightSAM(tiny_config()))


def _tiff_that_logs_but_reads() -> bytes:
    """A TIFF with one extra tag of an invalid type: tifffile logs a warning and reads it."""
    data = bytearray(_encode("TIFF", _RGB[:20, :30]))
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    last = ifd + 2 + 12 * (count - 1)  # overwrite the last tag (software/resolution metadata)
    data[last : last + 12] = struct.pack("<HHII", 65000, 77, 1, 0)
    return bytes(data)


def _good_and_bad_folder(folder: Path) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """(good file name -> (H, W), bad file names): every kind of bad file, awkward names."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    good: dict[str, tuple[int, int]] = {}

    def save(name: str, array: np.ndarray, fmt: str | None = None, **tiff_options) -> None:
        path = folder / name
        if fmt == "TIFF":
            tifffile.imwrite(path, array, **tiff_options)
        else:
            Image.fromarray(array).save(path, format=fmt)
        good[name] = array.shape[:2]

    save("scan 01 (copy).PNG", rng.integers(0, 256, (31, 45, 3), dtype=np.uint8), "PNG")
    save("ñandú ü.jpg", rng.integers(0, 256, (40, 23), dtype=np.uint8), "JPEG")
    save("файл снимок.tif", rng.integers(0, 65535, (17, 64), dtype=np.uint16), "TIFF")
    save("画像 🩺.bmp", rng.integers(0, 256, (25, 25, 3), dtype=np.uint8), "BMP")
    save("-starts-with-dash.png", rng.integers(0, 256, (12, 50, 4), dtype=np.uint8), "PNG")
    save(
        " leading space.tiff",
        rng.random((3, 20, 30)).astype(np.float32),
        "TIFF",
        photometric="rgb",
        planarconfig="separate",
    )
    good[" leading space.tiff"] = (20, 30)  # channel-first
    _write(folder, "tifffile-warns.tif", _tiff_that_logs_but_reads())
    good["tifffile-warns.tif"] = (20, 30)

    nan = rng.random((16, 16)).astype(np.float32)
    nan[3, 3] = np.nan
    bad = {
        "truncated ü.png": _ENCODED["PNG"][: len(_ENCODED["PNG"]) // 2],
        "cut short.jpg": _ENCODED["JPEG"][: len(_ENCODED["JPEG"]) // 3],
        "cut-zlib.tif": _ENCODED["TIFF-zlib"][:300],
        "zero bytes.jpeg": b"",
        "bomb.tif": _tiff_claiming(100000, 100000),
        "bomb-jpeg.jpg": _jpeg_claiming(65000, 65000),
        "notes.png": b"these are my notes\n" * 10,
        "report.tif": _NOT_IMAGES["pdf"],
        "stack.tif": _encode(
            "TIFF", rng.integers(0, 256, (2, 3, 16, 16), dtype=np.uint8), photometric="minisblack"
        ),
        "two-channel.tif": _encode("TIFF", rng.integers(0, 256, (16, 16, 2), dtype=np.uint8)),
        "nan.tif": _encode("TIFF", nan),
        "complex.tif": _encode("TIFF", np.zeros((16, 16), np.complex64)),
    }
    for name, data in bad.items():
        _write(folder, name, data)
    (folder / "readme.txt").write_text("not picked up: not an image extension")
    (folder / ".hidden.png").write_bytes(b"not picked up: hidden")
    return good, sorted(bad)


def _mask_name(name: str) -> str:
    return f"{Path(name).stem}_mask.png"


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_cli_folder_of_good_and_bad_files(tmp_path, tiny_ckpt):
    """One stderr line per bad file (naming it), every good file segmented at its own size,
    exit code 1. Run as a real process: in-process, pytest would capture log records that a
    user sees on stderr. Found: tifffile logged extra stderr lines for damaged (and some
    readable) TIFFs; read_image now keeps tifffile's log quiet while reading."""
    folder = tmp_path / "in dossier é"
    good, bad = _good_and_bad_folder(folder)
    out = tmp_path / "out résultats"
    captured = subprocess.run(
        [sys.executable, "-m", "napari_delightsam.cli", "segment", str(folder), "-m", "dermoscopy",
         "-o", str(out), "--checkpoint", str(tiny_ckpt), "--batch-size", "3", "-q"],
        capture_output=True, text=True, timeout=300, env=_cli_env(),
    )  # fmt: skip
    err = captured.stderr.splitlines()
    assert captured.returncode == 1, captured.stderr
    assert len(err) == len(bad), "\n".join(err)
    for name in bad:
        lines = [line for line in err if f"{folder / name}:" in line]
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith("delightsam segment: error: ")
    assert sorted(p.name for p in out.iterdir()) == sorted(_mask_name(n) for n in good)
    for name, size in good.items():
        mask = np.asarray(Image.open(out / _mask_name(name)))
        assert mask.shape == size and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert f"segmented {len(good)} image(s)" in captured.stdout and f"{len(bad)} failed" in captured.stdout
    # the named problems
    by_name = {name: next(line for line in err if f"{folder / name}:" in line) for name in bad}
    assert "0 bytes" in by_name["zero bytes.jpeg"]
    assert "100000x100000" in by_name["bomb.tif"]
    assert "(2, 3, 16, 16)" in by_name["stack.tif"] and "(16, 16, 2)" in by_name["two-channel.tif"]
    assert "1 non-finite" in by_name["nan.tif"] and "complex64" in by_name["complex.tif"]


def test_cli_files_given_one_by_one_with_a_missing_one(tmp_path, tiny_ckpt, capsys):
    folder = tmp_path / "in"
    good, bad = _good_and_bad_folder(folder)
    names = [*sorted(good)[:3], *bad[:4]]
    argv = [str(folder / n) for n in names] + [str(tmp_path / "gone.png")]
    code = cli.main(
        ["segment", *argv, "-m", "xray", "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_ckpt)]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("delightsam segment")]
    assert code == 1
    assert len(err) == 4 + 1 and any("gone.png: no such file" in line for line in err)
    assert len(list((tmp_path / "out").iterdir())) == 3


def test_cli_output_on_a_console_that_cannot_print_the_path(tmp_path, tiny_ckpt):
    """Found: on an ASCII (or legacy Windows code page) console, a non-ASCII --out folder made the
    final summary line fail with UnicodeEncodeError after all the work: exit code 2 and a
    misleading error. The CLI now escapes what the console cannot print."""
    folder = tmp_path / "données"
    folder.mkdir()
    Image.fromarray(_RGB).save(folder / "é.png")
    (folder / "bàd.png").write_bytes(b"junk")
    env = {**_cli_env(), "PYTHONIOENCODING": "ascii"}
    proc = subprocess.run(
        [sys.executable, "-m", "napari_delightsam.cli", "segment", str(folder), "-m", "xray",
         "-o", str(tmp_path / "masques 画像"), "--checkpoint", str(tiny_ckpt), "-q"],
        capture_output=True, timeout=300, env=env,
    )  # fmt: skip
    out, err = proc.stdout.decode("ascii"), proc.stderr.decode("ascii")
    assert proc.returncode == 1, err
    assert "segmented 1 image(s) into" in out and "\\u753b\\u50cf" in out and "1 failed" in out
    assert err.count("delightsam segment: error:") == 1 and "b\\xe0d.png" in err
    assert (tmp_path / "masques 画像" / "é_mask.png").is_file()
