"""Preprocessing: layouts, dtypes, intensity rules, size limits and exact shape round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_delightsam.config import PIXEL_MEAN, PIXEL_STD
from napari_delightsam.preprocess import (
    DEFAULT_MAX_PIXELS,
    infer_layout,
    prepare_array,
    prepare_image,
    to_input_size,
    to_model_tensor,
)

S = 128

pytestmark = pytest.mark.usefixtures("one_thread")


ALL_DTYPES = [
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
    np.float16, np.float32, np.float64,
]  # fmt: skip


def _random_image(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    return (rng.standard_normal(shape) * 1000).astype(dtype)


def _expected_size(shape: tuple[int, ...]) -> tuple[int, int]:
    """The documented rule, written independently of the implementation."""
    if len(shape) == 2:
        return shape
    if shape[2] in (1, 3, 4):
        return shape[0], shape[1]
    return shape[1], shape[2]


# -- layouts -----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    channels=st.sampled_from([None, 1, 3, 4]),
    first=st.booleans(),
    dtype=st.sampled_from(ALL_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_any_layout_and_dtype_round_trips_exactly(h, w, channels, first, dtype, seed):
    rng = np.random.default_rng(seed)
    if channels is None:
        shape = (h, w)
    elif first:
        shape = (channels, h, w)
    else:
        shape = (h, w, channels)
    image = _random_image(rng, shape, dtype)
    out, info = prepare_image(image)
    eh, ew = _expected_size(shape)
    assert out.shape == (eh, ew, 3) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 255
    assert info.size == (eh, ew)
    x = to_model_tensor(out, S, "cpu")
    assert x.shape == (1, 3, S, S) and x.dtype == torch.float32 and torch.isfinite(x).all()
    back = to_input_size(torch.zeros(1, 1, S // 4, S // 4), info.size)
    assert back.shape == (1, 1, eh, ew)


@pytest.mark.parametrize(
    "size", [(17, 33), (1, 1), (1023, 1025), (768, 1365), (10000, 20), (20, 10000), (5, 16)]
)
def test_round_trip_shape_odd_sizes(size):
    image = np.random.default_rng(0).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    out, info = prepare_array(image)
    x = to_model_tensor(out, S, "cpu")
    assert x.shape == (1, 3, S, S)
    lowres = torch.randn(2, 1, S // 4, S // 4)
    assert to_input_size(lowres, info.size).shape == (2, 1, *size)
    assert to_input_size(lowres[0, 0], info.size).shape == size


def test_channel_first_is_the_transpose_of_channel_last():
    rng = np.random.default_rng(1)
    last = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    first = np.ascontiguousarray(last.transpose(2, 0, 1))
    a, ia = prepare_image(last)
    b, ib = prepare_image(first)
    np.testing.assert_array_equal(a, b)
    assert not ia.channels_first and ib.channels_first


def test_ambiguous_shape_is_read_channel_last():
    h, w, c, first = infer_layout((3, 3, 3))
    assert (h, w, c, first) == (3, 3, 3, False)
    # first axis 3 but last axis 4: still channel-last (3 x 50 RGBA)
    assert infer_layout((3, 50, 4)) == (3, 50, 4, False)
    assert infer_layout((4, 50, 60)) == (50, 60, 4, True)


def test_alpha_is_dropped_and_grey_is_repeated():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, size=(9, 11, 1), dtype=np.uint8)], axis=2)
    np.testing.assert_array_equal(prepare_image(rgba)[0], prepare_image(rgb)[0])
    assert prepare_image(rgba)[1].layout == "rgba"
    grey = rgb[:, :, 0]
    out, info = prepare_image(grey)
    assert info.layout == "grey"
    for ch in range(3):
        np.testing.assert_array_equal(out[:, :, ch], grey.astype(np.float32))
    np.testing.assert_array_equal(prepare_image(grey[:, :, None])[0], out)


@pytest.mark.parametrize(
    "shape", [(10, 10, 2), (2, 10, 10), (5, 10, 10, 3), (2, 3, 10, 10), (10,), (), (10, 10, 5), (7, 10, 10)]
)
def test_unusable_shapes_are_refused_with_the_shape_named(shape):
    with pytest.raises(ValueError) as exc:
        prepare_image(np.zeros(shape, dtype=np.uint8))
    assert str(tuple(shape)) in str(exc.value)


def test_empty_image_is_refused():
    with pytest.raises(ValueError, match="empty"):
        prepare_image(np.zeros((0, 5), dtype=np.uint8))


@pytest.mark.parametrize("dtype", [np.complex64, object, "U3"])
def test_unsupported_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match="dtype"):
        prepare_image(np.zeros((4, 4), dtype=dtype))


# -- intensity ---------------------------------------------------------------------------


def test_uint8_is_used_as_is():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out, info = prepare_image(image)
    np.testing.assert_array_equal(out[:, :, 1], image.astype(np.float32))
    assert info.intensity == "uint8"


def test_bool_maps_to_0_and_255():
    image = np.eye(5, dtype=bool)
    out, info = prepare_image(image)
    assert set(np.unique(out)) == {0.0, 255.0}
    np.testing.assert_array_equal(out[:, :, 0] == 255, image)
    assert info.intensity == "bool"


def test_uint16_wide_range_uses_the_percentile_window():
    rng = np.random.default_rng(3)
    image = rng.integers(1000, 4000, size=(64, 64)).astype(np.uint16)
    image[0, 0] = 65535  # one hot pixel must not squash the rest
    out, info = prepare_image(image)
    assert info.intensity == "percentile"
    lo, hi = info.window
    assert lo == pytest.approx(np.percentile(image, 0.5))
    assert hi == pytest.approx(np.percentile(image, 99.5))
    assert out.min() == 0 and out.max() == 255
    assert out[:, :, 0].std() > 50  # the bulk is spread over the range


def test_8bit_like_integers_and_unit_floats():
    image16 = np.array([[0, 10], [200, 255]], dtype=np.uint16)
    out, info = prepare_image(image16)
    assert info.intensity == "identity"
    np.testing.assert_array_equal(out[:, :, 0], image16.astype(np.float32))
    unit = np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32)
    out, info = prepare_image(unit)
    assert info.intensity == "unit-range"
    np.testing.assert_allclose(out[:, :, 0], unit * 255)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64, np.int64])
def test_constant_images_map_to_zeros_without_nan(dtype):
    image = np.full((8, 9), 5000, dtype=dtype)
    with np.errstate(all="raise"):  # a division by zero would raise here
        out, info = prepare_image(image)
    assert info.intensity == "constant"
    assert np.all(out == 0)


def test_extreme_float_range_stays_finite():
    image = np.array([[-3e38, 0.0], [1.0, 3e38]], dtype=np.float32)
    out, _ = prepare_image(image)
    assert np.isfinite(out).all() and out.min() == 0 and out.max() == 255


def test_nan_and_inf_are_refused_with_their_count():
    image = np.ones((6, 6), dtype=np.float32) * 1000
    image[0, :3] = np.nan
    image[1, 0] = np.inf
    with pytest.raises(ValueError) as exc:
        prepare_image(image)
    msg = str(exc.value)
    assert "4 non-finite" in msg and "3 NaN" in msg and "1 inf" in msg and "nan_policy" in msg


def test_nan_policy_zero_sets_them_to_zero():
    image = np.linspace(1000, 2000, 36, dtype=np.float64).reshape(6, 6)
    image[2, 2] = np.nan
    image[3, 3] = -np.inf
    out, info = prepare_image(image, nan_policy="zero")
    assert info.nonfinite == 2 and np.isfinite(out).all()
    assert out[2, 2, 0] == 0 and out[3, 3, 0] == 0
    assert out.max() == 255
    out, info = prepare_image(np.full((3, 3), np.nan), nan_policy="zero")
    assert np.all(out == 0) and info.nonfinite == 9
    with pytest.raises(ValueError, match="nan_policy"):
        prepare_image(image, nan_policy="ignore")  # type: ignore[arg-type]


# -- sizes -------------------------------------------------------------------------------


class _LazyHuge:
    """Looks like a 20000x20000 RGB image; fails the test if anything tries to load it."""

    shape = (20000, 20000, 3)
    dtype = np.dtype(np.uint8)
    ndim = 3

    def __array__(self, *args, **kwargs):
        raise AssertionError("the image was materialised before the size check")


def test_too_large_is_refused_before_loading():
    with pytest.raises(ValueError) as exc:
        prepare_image(_LazyHuge())
    msg = str(exc.value)
    assert "20000x20000" in msg and "400.0 megapixels" in msg and "100 megapixels" in msg
    assert "downsample" in msg
    assert DEFAULT_MAX_PIXELS == 10000 * 10000


def test_max_pixels_is_configurable():
    with pytest.raises(ValueError, match="10x10"):
        prepare_image(np.zeros((10, 10), np.uint8), max_pixels=99)
    assert prepare_image(np.zeros((10, 10), np.uint8), max_pixels=100)[0].shape == (10, 10, 3)


# -- model tensor ------------------------------------------------------------------------


def test_normalisation_uses_sam_mean_and_std():
    mean = np.array(PIXEL_MEAN, dtype=np.float32)
    std = np.array(PIXEL_STD, dtype=np.float32)
    image = np.broadcast_to(mean + std, (40, 50, 3)).astype(np.float32)
    x = to_model_tensor(image, S, "cpu")
    torch.testing.assert_close(x, torch.ones(1, 3, S, S), atol=1e-5, rtol=0)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_uint8_and_float_resize_agree_within_one_grey_level():
    image = np.random.default_rng(4).integers(0, 256, size=(300, 200, 3), dtype=np.uint8)
    a = to_model_tensor(image, S, "cpu")
    b = to_model_tensor(image.astype(np.float32), S, "cpu")
    assert (a - b).abs().max().item() <= 1.01 / min(PIXEL_STD)


def test_plain_resize_keeps_content_where_it_was():
    """No letterboxing: the left half of a wide image fills the left half of the input."""
    image = np.zeros((100, 400), dtype=np.uint8)
    image[:, :200] = 255
    x = to_model_tensor(prepare_array(image)[0], S, "cpu")
    left, right = x[0, 0, :, : S // 2 - 2], x[0, 0, :, S // 2 + 2 :]
    assert left.min() > 1.5 and right.max() < -1.5


def test_to_input_size_interpolates_bilinearly():
    low = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    up = to_input_size(low, (2, 4))
    torch.testing.assert_close(up[0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    with pytest.raises(ValueError):
        to_input_size(torch.zeros(4), (2, 2))
