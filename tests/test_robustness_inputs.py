"""Robustness of ``Segmenter.segment`` to whatever array a user (or napari) hands it.

Every case ends in one of two ways, decided up front by an independent statement of the
documented rules (``_expected``):

* a result whose mask, probability and heatmap have exactly the input's (H, W), with finite
  probabilities in [0, 1] — and the preprocessing round trip (``prepare_image`` ->
  ``to_model_tensor`` -> ``to_input_size``) exact in shape; or
* one ``ValueError`` whose one-line message names the problem (the shape, the dtype, the
  number of NaN/inf values, "empty", or the megapixel limit).

Complements tests/test_preprocess.py and tests/test_inference.py (B), which test the rules
themselves on typical arrays; here the inputs are adversarial (dtype extremes, every small
size, big-endian, strided, lazy, huge) and go end to end through the network.
"""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_delightsam.inference import Segmenter
from napari_delightsam.preprocess import prepare_image, to_input_size, to_model_tensor

#: every dtype a napari Image layer can hold
NAPARI_DTYPES = (
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64",
)  # fmt: skip
_CHANNELS = (1, 3, 4)
_MODALITY = "dermoscopy"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def seg(tiny_model) -> Segmenter:
    return Segmenter.from_model(tiny_model, device="cpu")


# -- the oracle ------------------------------------------------------------------------------


def _expected(shape: tuple[int, ...], dtype: np.dtype, n_nonfinite: int = 0) -> tuple[str, object]:
    """("ok", (H, W)) or ("error", regex the message must match), from the documented rules:
    shape first (2D grey; 3D channel-last when the last axis is 1/3/4, else channel-first when
    the first is; anything else refused naming the shape), then empty, then dtype, then NaN/inf."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        h, w = shape
    elif len(shape) == 3 and shape[2] in _CHANNELS:
        h, w = shape[0], shape[1]
    elif len(shape) == 3 and shape[0] in _CHANNELS:
        h, w = shape[1], shape[2]
    elif len(shape) == 3:
        return "error", re.escape(f"cannot interpret an image of shape {shape}")
    else:
        return "error", re.escape(f"shape {shape} ({len(shape)} dimensions)")
    if h == 0 or w == 0:
        return "error", re.escape(f"image of shape {shape} is empty")
    if dtype.kind not in "biuf":
        return "error", re.escape(f"unsupported image dtype {dtype}")
    if n_nonfinite:
        return "error", rf"contains {n_nonfinite} non-finite values"
    return "ok", (h, w)


def _nonfinite(arr: np.ndarray) -> int:
    return int(arr.size - np.count_nonzero(np.isfinite(arr))) if arr.dtype.kind == "f" else 0


def _check(seg: Segmenter, image, expected: tuple[str, object], **kwargs):
    """Segment ``image`` and hold the outcome to ``expected``; returns the result (or None)."""
    kind, what = expected
    if kind == "error":
        with pytest.raises(ValueError) as exc:
            seg.segment(image, _MODALITY, **kwargs)
        msg = str(exc.value)
        assert "\n" not in msg, msg
        assert re.search(what, msg), f"{msg!r} does not match {what!r}"
        return None
    r = seg.segment(image, _MODALITY, **kwargs)
    assert r.mask.shape == what and r.mask.dtype == np.bool_
    assert r.probability.shape == what and r.probability.dtype == np.float32
    assert r.patch_heatmap.shape == what
    assert np.isfinite(r.probability).all() and np.isfinite(r.patch_heatmap).all()
    assert r.probability.min() >= 0.0 and r.probability.max() <= 1.0
    assert np.array_equal(r.mask, r.probability > r.threshold)
    assert r.info is not None and r.info.size == what
    return r


def _round_trip(image, size: tuple[int, int], **kwargs) -> None:
    """prepare_image -> to_model_tensor -> to_input_size is exact in shape."""
    out, info = prepare_image(image, **kwargs)
    assert out.shape == (*size, 3) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 255.0
    assert info.size == size and info.input_shape == tuple(np.shape(image))
    x = to_model_tensor(out, 64, "cpu")
    assert x.shape == (1, 3, 64, 64) and torch.isfinite(x).all()
    assert to_input_size(torch.zeros(2, 1, 16, 16), info.size).shape == (2, 1, *size)


def _full_range(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random values over the dtype's whole finite range, with its min and max present."""
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    if dt.kind == "b":
        arr = rng.random(shape) > 0.5
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        arr = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
        arr.flat[0], arr.flat[-1] = info.min, info.max
    else:
        info = np.finfo(dt)
        arr = (rng.standard_normal(shape) * 1000).astype(dt)
        arr.flat[0], arr.flat[-1] = info.min, info.max
    return arr


# -- property: any array in -> mask of its size or one clear error ---------------------------

_ANY_DTYPE = st.sampled_from(
    [np.dtype(d) for d in NAPARI_DTYPES] + [np.dtype(d) for d in (">u2", ">i4", ">f4", ">f8")]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arr=hnp.arrays(
        dtype=_ANY_DTYPE,
        shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6),
    )
)
def test_any_array_gives_a_mask_of_its_size_or_one_clear_error(seg, arr):
    """Hypothesis draws the values too: full integer ranges, float extremes, NaN and inf."""
    expected = _expected(arr.shape, arr.dtype, _nonfinite(arr))
    _check(seg, arr, expected)
    if expected[0] == "ok":
        _round_trip(arr, expected[1])
    elif _nonfinite(arr) and _expected(arr.shape, arr.dtype)[0] == "ok":
        # the same array is usable when NaN/inf are explicitly set to 0
        size = _expected(arr.shape, arr.dtype)[1]
        _check(seg, arr, ("ok", size), nan_policy="zero")
        _round_trip(arr, size, nan_policy="zero")


# -- dtypes x layouts ------------------------------------------------------------------------

_LAYOUTS = {
    "grey": lambda h, w: (h, w),
    "grey-last": lambda h, w: (h, w, 1),
    "grey-first": lambda h, w: (1, h, w),
    "rgb": lambda h, w: (h, w, 3),
    "rgb-first": lambda h, w: (3, h, w),
    "rgba": lambda h, w: (h, w, 4),
    "rgba-first": lambda h, w: (4, h, w),
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("dtype", NAPARI_DTYPES)
def test_every_napari_dtype_in_every_layout(seg, dtype, layout):
    """Full-range values (the dtype's min and max included) in each accepted layout."""
    shape = _LAYOUTS[layout](23, 37)
    image = _full_range(dtype, shape)
    r = _check(seg, image, ("ok", (23, 37)))
    assert r.info.layout == {"grey": "grey", "rgb": "rgb", "rgba": "rgba"}[layout.split("-")[0]]
    assert r.info.channels_first == layout.endswith("-first")
    _round_trip(image, (23, 37))


@pytest.mark.parametrize("dtype", NAPARI_DTYPES)
def test_dtype_extremes_map_without_overflow_warnings(dtype):
    """Only the dtype's extreme values (min, max, 0, 1): no overflow, no NaN, no warning.

    Found a bug: float64 images spanning more than float64's range (e.g. -1e308..1e308)
    became NaN (hi - lo overflowed); fixed in preprocess by mapping such windows at half scale.
    """
    dt = np.dtype(dtype)
    if dt.kind == "b":
        values = [False, True]
    else:
        info = np.iinfo(dt) if dt.kind in "iu" else np.finfo(dt)
        values = [info.min, info.max, 0, 1]
    image = np.resize(np.array(values, dtype=dt), (8, 9))
    with np.errstate(all="raise"):
        out, info_ = prepare_image(image)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 255.0
    # the darkest values map to black and the brightest to white (within float rounding)
    flat = out[:, :, 0].ravel()
    order = np.argsort(image.ravel().astype(np.float64), kind="stable")
    assert flat[order[0]] == pytest.approx(0.0, abs=0.01)
    assert flat[order[-1]] == pytest.approx(255.0, abs=0.01)


def test_float64_beyond_half_range_segments(seg):
    image = np.random.default_rng(3).choice(np.array([-1.7e308, 1.7e308, 0.0, 1e300]), (40, 50))
    r = _check(seg, image, ("ok", (40, 50)))
    assert r.info.intensity == "percentile"


# -- NaN / inf -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize(
    "poison, n_nan, n_inf",
    [("nan", 3, 0), ("inf", 0, 2), ("-inf", 0, 1), ("mixed", 2, 2), ("all-nan", 30, 0)],
)
def test_nan_and_inf_are_counted_refused_and_zeroable(seg, dtype, poison, n_nan, n_inf):
    image = np.random.default_rng(0).random((5, 6)).astype(dtype)
    flat = image.reshape(-1)
    if poison == "all-nan":
        flat[:] = np.nan
    else:
        flat[:n_nan] = np.nan
        flat[n_nan : n_nan + n_inf] = -np.inf if poison == "-inf" else np.inf
        if poison == "mixed":
            flat[n_nan + 1] = -np.inf
    n = n_nan + n_inf
    _check(seg, image, ("error", rf"{n} non-finite values \({n_nan} NaN, {n_inf} inf\) out of 30"))
    r = _check(seg, image, ("ok", (5, 6)), nan_policy="zero")
    assert r.info.nonfinite == n
    out, _ = prepare_image(image, nan_policy="zero")
    assert (out[~np.isfinite(image)] == 0).all()


def test_nan_in_one_channel_only_is_refused(seg):
    image = np.random.default_rng(0).random((3, 12, 14)).astype(np.float32)
    image[2, 5, 5] = np.nan
    _check(seg, image, ("error", r"1 non-finite values \(1 NaN, 0 inf\)"))


# -- constant images -------------------------------------------------------------------------


def _constant_level(dtype: np.dtype, value) -> float:
    """The documented grey level of a constant image: bool 0/255, uint8 as is, [0,1] x255,
    [0,255] as is, anything else has an empty window and maps to 0."""
    if dtype.kind == "b":
        return 255.0 if value else 0.0
    if dtype == np.uint8:
        return float(value)
    v = float(value)
    if 0.0 <= v <= 1.0:
        return v * 255.0
    if 0.0 <= v <= 255.0:
        return v
    return 0.0


def _constant_cases() -> list[tuple[str, object]]:
    cases: list[tuple[str, object]] = [("bool", False), ("bool", True)]
    for name in NAPARI_DTYPES[1:]:
        dt = np.dtype(name)
        info = np.iinfo(dt) if dt.kind in "iu" else np.finfo(dt)
        cases += [(name, 0), (name, 1), (name, info.max), (name, info.min)]
        if dt.kind == "f":
            cases.append((name, 0.25))
        if dt.itemsize > 1 or dt.kind == "f":
            cases.append((name, 200))
    return cases


@pytest.mark.parametrize("dtype, value", _constant_cases())
def test_constant_images_map_to_one_documented_level(seg, dtype, value):
    dt = np.dtype(dtype)
    image = np.full((9, 11, 3), value, dtype=dt)
    out, _ = prepare_image(image)
    np.testing.assert_allclose(out, _constant_level(dt, image.flat[0]), rtol=1e-3, atol=1e-3)
    _check(seg, image, ("ok", (9, 11)))


def test_constant_images_with_the_same_level_give_the_same_probability(seg):
    """Zeros of uint8, a 16-bit constant, int64 min and float -1e30 all map to black."""
    ref = seg.segment(np.zeros((20, 20, 3), np.uint8), _MODALITY).probability
    for image in (
        np.full((20, 20, 3), 7000, np.uint16),
        np.full((20, 20), np.iinfo(np.int64).min, np.int64),
        np.full((3, 20, 20), -1e30, np.float32),
        np.zeros((20, 20), bool),
    ):
        np.testing.assert_allclose(seg.segment(image, _MODALITY).probability, ref, atol=1e-6)


# -- sizes -----------------------------------------------------------------------------------


def test_every_size_from_1x1_to_16x16(seg):
    """All 256 sizes, grey and RGB, through segment_batch (mixed sizes in one stacked batch)."""
    rng = np.random.default_rng(0)
    sizes = [(h, w) for h in range(1, 17) for w in range(1, 17)]
    images = [
        rng.integers(0, 256, size=(h, w) if (h + w) % 2 else (h, w, 3), dtype=np.uint8) for h, w in sizes
    ]
    results = seg.segment_batch(images, _MODALITY, batch_size=32)
    assert len(results) == len(sizes)
    for (h, w), image, r in zip(sizes, images, results, strict=True):
        assert r.mask.shape == (h, w) and r.probability.shape == (h, w) and r.patch_heatmap.shape == (h, w)
        assert np.isfinite(r.probability).all()
        _round_trip(image, (h, w))


@pytest.mark.parametrize(
    "shape, size",
    [
        ((10000, 20), (10000, 20)),
        ((20, 10000), (20, 10000)),
        ((10000, 20, 3), (10000, 20)),
        ((3, 20, 10000), (20, 10000)),
        ((10000, 1), (10000, 1)),
        ((1, 10000), (1, 10000)),
        ((1, 10000, 4), (1, 10000)),
    ],
)
def test_very_elongated_images(seg, shape, size):
    image = np.random.default_rng(0).integers(0, 4096, size=shape).astype(np.uint16)
    _check(seg, image, ("ok", size))
    _round_trip(image, size)


# -- layouts that cannot be an image, ambiguous layouts --------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        (),
        (10,),
        (0,),
        (1, 16, 16, 3),
        (2, 16, 16, 3),
        (16, 16, 3, 1),
        (3, 16, 16, 1),
        (2, 2, 16, 16, 3),
        (16, 16, 2),
        (2, 16, 16),
        (16, 16, 5),
        (5, 16, 16),
        (6, 7, 8),
        (0, 0, 0),
    ],
)
def test_unusable_dimensions_are_refused_naming_the_shape(seg, shape):
    image = np.zeros(shape, np.uint8)
    expected = _expected(shape, image.dtype)
    assert expected[0] == "error"
    _check(seg, image, expected)
    with pytest.raises(ValueError, match="pick one slice or three channels"):
        seg.segment(image, _MODALITY)


@pytest.mark.parametrize(
    "shape", [(0, 7), (7, 0), (0, 0), (0, 7, 3), (7, 0, 4), (3, 0, 7), (1, 0, 9), (0, 5, 1)]
)
def test_empty_arrays_are_refused_as_empty(seg, shape):
    _check(seg, np.zeros(shape, np.float32), ("error", re.escape(f"image of shape {shape} is empty")))


def test_rgba_alpha_is_ignored(seg):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    ref = seg.segment(rgb, _MODALITY).probability
    for alpha in (np.zeros((30, 40, 1), np.uint8), rng.integers(0, 256, size=(30, 40, 1), dtype=np.uint8)):
        rgba = np.concatenate([rgb, alpha], axis=2)
        np.testing.assert_array_equal(seg.segment(rgba, _MODALITY).probability, ref)
        np.testing.assert_array_equal(seg.segment(rgba.transpose(2, 0, 1), _MODALITY).probability, ref)


@pytest.mark.parametrize("h, w", [(30, 40), (5, 200), (2, 7)])
def test_channel_first_gives_the_same_mask_as_channel_last(seg, h, w):
    last = np.random.default_rng(2).integers(0, 60000, size=(h, w, 3)).astype(np.uint16)
    a = seg.segment(last, _MODALITY)
    b = seg.segment(np.ascontiguousarray(last.transpose(2, 0, 1)), _MODALITY)
    assert not a.info.channels_first and b.info.channels_first
    np.testing.assert_array_equal(a.probability, b.probability)
    np.testing.assert_array_equal(a.mask, b.mask)


@pytest.mark.parametrize(
    "shape, size, layout, first",
    [
        ((3, 3, 3), (3, 3), "rgb", False),  # fully ambiguous: channel-last wins
        ((4, 4, 4), (4, 4), "rgba", False),
        ((3, 50, 4), (3, 50), "rgba", False),  # could be RGB (3,H,W) or RGBA (H,W,4)
        ((4, 50, 3), (4, 50), "rgb", False),
        ((1, 50, 3), (1, 50), "rgb", False),
        ((3, 50, 1), (3, 50), "grey", False),
        ((3, 50, 60), (50, 60), "rgb", True),  # unambiguous channel-first
        ((1, 50, 60), (50, 60), "grey", True),
    ],
)
def test_ambiguous_layouts_follow_the_documented_rule(seg, shape, size, layout, first):
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    r = _check(seg, image, ("ok", size))
    assert (r.info.layout, r.info.channels_first) == (layout, first)
    _round_trip(image, size)


# -- dtypes that are not pixels --------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((8, 8), np.complex64),
        np.ones((8, 8, 3), np.complex128),
        np.array([[1, 2], [3, 4]], dtype=object),
        np.full((8, 8), None, dtype=object),
        np.full((8, 8), "a", dtype="U3"),
        np.full((8, 8), b"a", dtype="S2"),
        np.zeros((8, 8), "datetime64[s]"),
        np.zeros((8, 8), "timedelta64[ms]"),
        np.zeros((8, 8), dtype=[("r", "u1"), ("g", "u1")]),
        np.zeros((8, 8), dtype="V4"),
    ],
    ids=["complex64", "complex128", "object-ints", "object-none", "str", "bytes", "datetime",
         "timedelta", "structured", "void"],
)  # fmt: skip
def test_non_pixel_dtypes_are_refused_naming_the_dtype(seg, image):
    _check(seg, image, ("error", re.escape(f"unsupported image dtype {image.dtype}")))


def test_a_bad_shape_and_a_bad_dtype_give_one_error_about_the_shape(seg):
    _check(seg, np.zeros((2, 8, 8, 3), np.complex64), ("error", re.escape("(2, 8, 8, 3)")))


# -- memory layouts and array-likes ----------------------------------------------------------


def test_memory_layouts_and_array_likes_give_the_canonical_result(seg, tmp_path):
    rng = np.random.default_rng(4)
    base = rng.integers(0, 4000, size=(24, 30, 3)).astype(np.uint16)
    ref = seg.segment(base, _MODALITY).probability
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint16, shape=base.shape)
    mm[:] = base
    mm.flush()
    big = np.zeros((48, 90, 3), np.uint16)
    big[::2, ::3] = base
    flipped = np.ascontiguousarray(base[::-1, ::-1])[::-1, ::-1]
    readonly = base.copy()
    readonly.flags.writeable = False
    variants = {
        "fortran": np.asfortranarray(base),
        "strided": big[::2, ::3],
        "negative-strides": flipped,
        "read-only": readonly,
        "big-endian": base.astype(">u2"),
        "memmap": np.load(tmp_path / "x.npy", mmap_mode="r"),
        "torch": torch.from_numpy(base.astype(np.int32)),
    }
    for name, image in variants.items():
        r = seg.segment(image, _MODALITY)
        np.testing.assert_array_equal(r.probability, ref, err_msg=name)
    # nested lists become int64 (mapped in float64): the same as an int64 array
    as_int64 = seg.segment(base.astype(np.int64), _MODALITY).probability
    np.testing.assert_array_equal(seg.segment(base.tolist(), _MODALITY).probability, as_int64)
    # the input is never modified in place
    np.testing.assert_array_equal(readonly, base)
    np.testing.assert_array_equal(mm, base)


@pytest.mark.parametrize("dtype", [">i2", ">u4", ">f4", ">f8", "<f2"])
def test_explicit_byte_orders_match_native(seg, dtype):
    native = (
        np.random.default_rng(5).integers(0, 1000, size=(16, 18)).astype(np.dtype(dtype).newbyteorder("="))
    )
    a = seg.segment(native, _MODALITY).probability
    b = seg.segment(native.astype(dtype), _MODALITY).probability
    np.testing.assert_array_equal(a, b)


# -- huge images: refused before memory blows up ---------------------------------------------


class _LazyImage:
    """Has a shape and dtype like a dask/zarr array; fails the test if it is ever loaded."""

    def __init__(self, shape: tuple[int, ...], dtype=np.uint8) -> None:
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.ndim = len(shape)

    def __array__(self, *args, **kwargs):
        raise AssertionError("the image was loaded before the size check")


def _refused_without_allocating(call) -> str:
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as exc:
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB allocated before refusing"
    return str(exc.value)


@pytest.mark.parametrize("shape", [(30000, 30000, 3), (30000, 30000), (3, 30000, 30000)])
def test_30000_squared_is_refused_before_loading(seg, shape):
    for image in (_LazyImage(shape), np.broadcast_to(np.uint8(7), shape)):
        for call in (
            lambda im=image: seg.segment(im, _MODALITY),
            lambda im=image: seg.prepare(im),
            lambda im=image: seg.segment_batch([np.zeros((8, 8), np.uint8), im], _MODALITY),
        ):
            msg = _refused_without_allocating(call)
            assert "30000x30000" in msg and "900.0 megapixels" in msg and "100 megapixels" in msg, msg
            assert "downsample" in msg and "\n" not in msg


def test_segment_batch_names_the_unusable_image(seg):
    """Found: segment_batch raised the preprocessing error without saying which image; it now
    names the index (e.g. a stack slice)."""
    images = [np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), np.zeros((8, 8, 2), np.uint8)]
    with pytest.raises(ValueError, match=re.escape("image 2 of the batch (3 images): cannot interpret")):
        seg.segment_batch(images, _MODALITY, batch_size=2)


def test_dask_array_is_checked_before_it_is_computed(seg):
    da = pytest.importorskip("dask.array")
    huge = da.zeros((30000, 30000, 3), dtype=np.uint8, chunks=(1000, 1000, 3))
    msg = _refused_without_allocating(lambda: seg.segment(huge, _MODALITY))
    assert "30000x30000" in msg
    small = da.from_array(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8), chunks=20)
    _check(seg, small, ("ok", (40, 50)))


@pytest.mark.slow
def test_8192_rgb_16bit_and_float_within_3gb_peak_rss():
    """B's slow test covers uint8 8192x8192 RGB; this covers the whole-image paths that make float
    copies (uint16 -> percentile window, float32 -> unit range), each in a fresh child process whose
    own peak RSS (ru_maxrss) is read after the call. (The tiled path's memory: tests/test_tiling.py.)"""
    import subprocess
    import sys

    script = (
        "import resource, sys, numpy as np\n"
        "from napari_delightsam.inference import load_model\n"
        "seg = load_model('untrained', 'cpu')\n"
        "rng = np.random.default_rng(0)\n"
        "if sys.argv[1] == 'uint16':\n"
        "    img = rng.integers(0, 65536, size=(8192, 8192, 3), dtype=np.uint16)\n"
        "else:\n"
        "    img = rng.random((8192, 8192, 3), dtype=np.float32)\n"
        "r = seg.segment(img, 'microscopy', tiling='off')\n"
        "assert r.mask.shape == (8192, 8192) and np.isfinite(r.probability).all()\n"
        "import os  # VmHWM: peak RSS of this process image only; ru_maxrss also counts the\n"
        "# forked parent (pytest) because Linux carries it across exec\n"
        "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')] if os.path.exists('/proc/self/status') else []\n"
        "print(hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    for dtype in ("uint16", "float32"):
        proc = subprocess.run(
            [sys.executable, "-c", script, dtype], capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        peak_mib = int(proc.stdout.strip().splitlines()[-1]) / 1024
        print(f"8192x8192x3 {dtype}: peak RSS {peak_mib:.0f} MiB")
        assert peak_mib < 3 * 1024, f"{dtype}: peak RSS {peak_mib:.0f} MiB"


def test_pixel_limit_arithmetic_is_exact_at_the_boundary(tiny_model):
    """max_pixels is a strict upper bound: h*w == max_pixels passes, one more pixel is refused."""
    seg = Segmenter.from_model(tiny_model, device="cpu", max_pixels=12 * 34)
    assert seg.segment(np.zeros((12, 34), np.uint8), _MODALITY).mask.shape == (12, 34)
    with pytest.raises(ValueError, match=r"13x34"):
        seg.segment(_LazyImage((13, 34)), _MODALITY)
