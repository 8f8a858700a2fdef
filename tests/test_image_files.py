"""Image reading (every bad-file case gives one clear ImageReadError) and atomic mask writing."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_delightsam.image_files import (
    ImageReadError,
    read_image,
    write_mask_png,
    write_png,
    write_tiff,
)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)


# -- reading: good files -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_png_round_trip(tmp_path, rgb, mode):
    src = {"L": rgb[:, :, 0], "RGB": rgb, "RGBA": np.dstack([rgb, rgb[:, :, :1]])}[mode]
    path = tmp_path / "x.png"
    Image.fromarray(src).save(path)
    np.testing.assert_array_equal(read_image(path), src)


def test_png_16bit_and_bmp_and_jpeg(tmp_path, rgb):
    deep = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 50).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    got = read_image(tmp_path / "deep.png")
    assert got.shape == (40, 30) and got.max() == deep.max()
    Image.fromarray(rgb).save(tmp_path / "x.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "x.bmp"), rgb)
    Image.fromarray(rgb).save(tmp_path / "x.jpg", quality=95)
    jpg = read_image(tmp_path / "x.jpg")
    assert jpg.shape == rgb.shape and jpg.dtype == np.uint8


def test_palette_and_grey_alpha_modes_become_usable_arrays(tmp_path, rgb):
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (37, 53, 3)
    Image.fromarray(rgb).convert("LA").save(tmp_path / "la.png")
    assert read_image(tmp_path / "la.png").shape == (37, 53)
    Image.fromarray(rgb[:, :, 0] > 128).save(tmp_path / "bits.png")
    assert read_image(tmp_path / "bits.png").dtype == np.bool_


@pytest.mark.parametrize(
    "array", [np.zeros((3, 20, 30), np.float32), np.ones((20, 30), np.uint16), np.ones((20, 30, 3), np.uint8)]
)
def test_tiff_round_trip(tmp_path, array):
    tifffile.imwrite(tmp_path / "x.tif", array)
    got = read_image(tmp_path / "x.tif")
    assert got.dtype == array.dtype and got.shape == array.shape


def test_format_is_chosen_by_content_not_extension(tmp_path, rgb):
    tifffile.imwrite(tmp_path / "really_a_tiff.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "really_a_tiff.png"), rgb)


def test_unicode_and_spaces_in_paths(tmp_path, rgb):
    folder = tmp_path / "dössier mit Leerzeichen 画像"
    folder.mkdir()
    path = folder / "ïmage 1 (copy).png"
    Image.fromarray(rgb).save(path)
    np.testing.assert_array_equal(read_image(path), rgb)
    out = write_mask_png(folder / "maské 1.png", rgb[:, :, 0] > 100)
    assert read_image(out).shape == rgb.shape[:2]


# -- reading: bad files --------------------------------------------------------------------


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(ImageReadError) as exc:
        read_image(path, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.png")
    assert isinstance(ImageReadError("x"), ValueError)


def test_folder_and_empty_file(tmp_path):
    assert "folder" in _error(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty (0 bytes)" in _error(tmp_path / "empty.png")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a picture\n" * 20)
    assert "not a recognised image" in _error(tmp_path / "notes.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_truncated_files(tmp_path, rgb, fmt):
    big = np.random.default_rng(1).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
    full = tmp_path / f"full.{fmt.lower()}"
    if fmt == "TIFF":
        tifffile.imwrite(full, big)
    else:
        Image.fromarray(big).save(full, format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    msg = _error(cut)
    assert "corrupt" in msg or "truncated" in msg


def test_corrupt_tiff_header(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\xff" * 64)
    assert "TIFF" in _error(tmp_path / "bad.tif")


def test_decompression_bomb_header_is_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    assert bomb.stat().st_size < 200
    msg = _error(bomb)
    assert "decompression bomb" in msg or "megapixels" in msg
    # above our limit (100 MP) but below Pillow's own error threshold: our check names the size
    big = tmp_path / "big.png"
    big.write_bytes(_png_header_only(12_000, 12_000))
    msg = _error(big)
    assert "12000x12000" in msg and "100 megapixels" in msg


def test_pixel_limit_applies_to_tiff(tmp_path, rgb):
    tifffile.imwrite(tmp_path / "x.tif", rgb)
    assert "37x53" in _error(tmp_path / "x.tif", max_pixels=100)


# -- writing -------------------------------------------------------------------------------


def test_mask_png_binary_and_labels(tmp_path):
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:5] = True
    out = write_mask_png(tmp_path / "m.png", mask)
    got = np.asarray(Image.open(out))
    assert got.dtype == np.uint8 and set(np.unique(got)) == {0, 255}
    np.testing.assert_array_equal(got == 255, mask)
    labels = np.arange(35, dtype=np.int32).reshape(5, 7)
    np.testing.assert_array_equal(np.asarray(Image.open(write_mask_png(tmp_path / "l.png", labels))), labels)
    forced = write_mask_png(tmp_path / "f.png", labels, binary=True)
    assert set(np.unique(np.asarray(Image.open(forced)))) == {0, 255}


@pytest.mark.parametrize(
    "bad",
    [
        np.full((3, 3), 300, np.int32),
        np.full((3, 3), -1, np.int16),
        np.zeros((3, 3, 3), bool),
        np.zeros((3, 3), np.float32),
    ],
)
def test_mask_png_refuses_unwritable_masks(tmp_path, bad):
    with pytest.raises(ValueError):
        write_mask_png(tmp_path / "m.png", bad)
    assert not (tmp_path / "m.png").exists()


def test_existing_files_are_not_overwritten_without_asking(tmp_path):
    target = tmp_path / "m.png"
    write_mask_png(target, np.ones((4, 4), bool))
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_mask_png(target, np.zeros((4, 4), bool))
    with pytest.raises(FileExistsError):
        write_tiff(target, np.zeros((4, 4), np.float32))
    assert target.read_bytes() == before
    write_mask_png(target, np.zeros((4, 4), bool), overwrite=True)
    assert np.asarray(Image.open(target)).max() == 0


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "m.png"
    write_mask_png(target, np.ones((4, 4), bool))
    before = target.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_mask_png(target, np.zeros((4, 4), bool), overwrite=True)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]  # no temporary left behind


def test_tiff_writer_round_trip_with_zlib(tmp_path):
    heat = np.random.default_rng(2).random((23, 41)).astype(np.float32)
    out = write_tiff(tmp_path / "h.tif", heat)
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression.name in ("ADOBE_DEFLATE", "DEFLATE")
        np.testing.assert_array_equal(tif.asarray(), heat)


def test_write_png_checks_dtype(tmp_path):
    with pytest.raises(ValueError, match="PNG"):
        write_png(tmp_path / "x.png", np.zeros((3, 3), np.float32))
    write_png(tmp_path / "x.png", np.zeros((3, 3, 3), np.uint8))
    assert read_image(tmp_path / "x.png").shape == (3, 3, 3)
