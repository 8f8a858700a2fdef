"""Reading images and writing masks, with one clear error per bad file.

* :func:`read_image` reads PNG/JPEG/BMP (Pillow) and TIFF (tifffile, chosen by the file's
  magic bytes, not its extension). Every failure is an :class:`ImageReadError` (a
  ``ValueError``) whose message names the file and the problem: missing, a folder, empty,
  not an image, truncated/corrupt, or too many pixels (decompression bombs included; the
  limit is ``preprocess.DEFAULT_MAX_PIXELS``, checked from the header before decoding).
  Pixels are returned as stored: EXIF orientation is not applied, so masks line up with
  what scientific readers (tifffile, imageio, napari) show.
* :func:`write_mask_png`, :func:`write_png` and :func:`write_tiff` write atomically
  (``atomic_files.atomic_write``) and refuse to replace an existing file unless
  ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import warnings
from pathlib import Path

import numpy as np

from .atomic_files import atomic_write
from .preprocess import DEFAULT_MAX_PIXELS

#: File extensions the CLI picks up from a folder.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ImageReadError(ValueError):
    """An image file could not be read; the message names the file and the reason."""


def _is_tiff(head: bytes) -> bool:
    return head[:4] in _TIFF_MAGIC


def _too_big(path: Path, height: int, width: int, max_pixels: int) -> ImageReadError:
    return ImageReadError(
        f"{path}: image of {height}x{width} = {height * width / 1e6:.1f} megapixels exceeds the limit of "
        f"{max_pixels / 1e6:.0f} megapixels; downsample it first"
    )


def read_image(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Pixels of a PNG/JPEG/BMP/TIFF file as a numpy array (H,W), (H,W,C) or as stored in TIFF.

    Pillow modes map to: "1" -> bool, "L"/"I;16"/"I"/"F" -> 2D, "RGB"/"RGBA" -> (H,W,3|4);
    palette, CMYK, YCbCr, LA... are converted to RGB(A) or L. A TIFF returns its first
    series as stored (a stack stays a stack; ``prepare_image`` says what it cannot use).
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageReadError(f"{p}: no such file") from None
    except OSError as exc:
        raise ImageReadError(f"{p}: cannot access the file ({exc.strerror or exc})") from None
    if p.is_dir():
        raise ImageReadError(f"{p}: is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block until something writes to it
        raise ImageReadError(f"{p}: not a regular file (a pipe, socket or device), not an image file")
    if st.st_size == 0:
        raise ImageReadError(f"{p}: file is empty (0 bytes)")
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ImageReadError(f"{p}: cannot open the file ({exc.strerror or exc})") from None
    if _is_tiff(head):
        return _read_tiff(p, max_pixels)
    return _read_pillow(p, max_pixels)


@contextlib.contextmanager
def _quiet_tifffile():
    """Silence tifffile's log records while reading: on a damaged file it logs several lines
    to stderr before (or instead of) raising, which would break "one line per bad file".
    The failure itself still becomes one ImageReadError."""
    logger = logging.getLogger("tifffile")
    before = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = before


def _read_tiff(path: Path, max_pixels: int) -> np.ndarray:
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ImageReadError(f"{path}: TIFF file holds no image")
            series = tif.series[0]
            height, width = _tiff_plane(series)
            if height * width > max_pixels:
                raise _too_big(path, height, width, max_pixels)
            data = series.asarray()
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(f"{path}: not enough memory to read this TIFF") from None
    except Exception as exc:  # tifffile raises many types for damaged files
        raise ImageReadError(f"{path}: corrupt or unsupported TIFF ({type(exc).__name__}: {exc})") from None
    return np.asarray(data)


def _tiff_plane(series) -> tuple[int, int]:
    """(height, width) of a TIFF series from its axes string (Y, X), else its two largest axes."""
    shape = tuple(int(s) for s in series.shape)
    axes = str(getattr(series, "axes", ""))
    if len(axes) == len(shape) and "Y" in axes and "X" in axes:
        return shape[axes.index("Y")], shape[axes.index("X")]
    big = sorted(shape, reverse=True) + [1, 1]
    return big[0], big[1]


def _read_pillow(path: Path, max_pixels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # we apply our own limit from the header; Pillow's warning is not an error here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise _too_big(path, height, width, max_pixels)
                im.load()
                arr = _pillow_to_array(im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: refused as a possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{path}: not a recognised image file (PNG, JPEG, TIFF or BMP expected)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow: "image file is truncated", broken PNG chunks, bad JPEG markers ...
        raise ImageReadError(f"{path}: truncated or corrupt image ({exc})") from None
    except MemoryError:
        raise ImageReadError(f"{path}: not enough memory to decode this image") from None
    return arr


def _pillow_to_array(im) -> np.ndarray:
    mode = im.mode
    if mode in ("1", "L", "RGB", "RGBA", "I", "F") or mode.startswith("I;16"):
        return np.asarray(im)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        return np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
    if mode in ("LA", "La"):
        return np.asarray(im.convert("L"))
    if mode == "RGBa":
        return np.asarray(im.convert("RGBA"))
    return np.asarray(im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, RGBX ...


# -- writing ---------------------------------------------------------------------------------


def _check_target(path: str | os.PathLike[str], overwrite: bool) -> Path:
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    return target


def mask_to_uint8(mask: np.ndarray, *, binary: bool | None = None) -> np.ndarray:
    """A 2D mask or label image as uint8: binary -> 0/255, labels -> their ids (0..255).

    ``binary=None`` decides from the dtype: bool is binary, integers are label ids.
    ``binary=True`` writes every non-zero value as 255.
    """
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"a mask must be 2D (H,W), got shape {arr.shape}")
    if binary is None:
        binary = arr.dtype == np.bool_
    if binary:
        return np.where(arr != 0, np.uint8(255), np.uint8(0))
    if arr.dtype.kind not in "iu":
        raise ValueError(f"label images must be integer (got {arr.dtype}); pass binary=True for a 0/255 mask")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise ValueError(
            f"label ids {int(arr.min())}..{int(arr.max())} do not fit in an 8-bit PNG; use write_tiff instead"
        )
    return arr.astype(np.uint8)


def write_mask_png(
    path: str | os.PathLike[str], mask: np.ndarray, *, overwrite: bool = False, binary: bool | None = None
) -> Path:
    """Write a mask as an 8-bit PNG atomically (bool -> 0/255, integer labels -> ids ≤ 255)."""
    data = mask_to_uint8(mask, binary=binary)
    return write_png(path, data, overwrite=overwrite)


def write_png(path: str | os.PathLike[str], array: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write a uint8 (H,W), (H,W,3), (H,W,4) or uint16 (H,W) array as PNG, atomically."""
    from PIL import Image

    target = _check_target(path, overwrite)
    arr = np.ascontiguousarray(array)
    ok = (arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)))) or (
        arr.dtype == np.uint16 and arr.ndim == 2
    )
    if not ok:
        raise ValueError(f"PNG needs uint8 (H,W|H,W,3|H,W,4) or uint16 (H,W); got {arr.dtype} {arr.shape}")
    image = Image.fromarray(arr)

    def _write(tmp: Path) -> None:
        image.save(tmp, format="PNG")

    return atomic_write(target, _write)


def write_tiff(path: str | os.PathLike[str], array: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write any numeric array as a zlib-compressed TIFF (tifffile), atomically."""
    import tifffile

    target = _check_target(path, overwrite)
    arr = np.asarray(array)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"cannot write a {arr.dtype} array to TIFF")

    def _write(tmp: Path) -> None:
        tifffile.imwrite(tmp, arr, compression="zlib")

    return atomic_write(target, _write)
