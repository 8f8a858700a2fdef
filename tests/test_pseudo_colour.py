"""A single channel stored in false colour (a blue DAPI channel exported as RGB) is taken back to
grey before segmenting (``preprocess.pseudo_colour``); real colour images are left alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from napari_delightsam.preprocess import PSEUDO_COLOUR_RESIDUAL, prepare_array, prepare_image, pseudo_colour

pytestmark = pytest.mark.usefixtures("one_thread")


def _nuclei(size: int = 96, seed: int = 0) -> np.ndarray:
    """A grey fluorescence-like field: bright blobs of varied intensity on black, (H,W) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size), np.float32)
    for _ in range(12):
        y, x = rng.uniform(8, size - 8, 2)
        img = np.maximum(img, rng.uniform(80, 255) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 30.0))
    return np.rint(img).astype(np.uint8)


def _false_colour(grey: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    return np.clip(np.rint(grey[..., None].astype(np.float32) * np.asarray(colour, np.float32)), 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("colour", [(0, 0, 1), (0, 1, 0), (1, 0, 1), (0, 0.6, 1)])
def test_one_channel_in_any_colour_comes_back_grey(colour):
    grey = _nuclei()
    out, info = prepare_array(_false_colour(grey, colour))
    assert out.shape == (*grey.shape, 1) and out.dtype == np.uint8 and info.greyscale
    unit = np.asarray(colour, np.float64) / np.linalg.norm(colour)
    np.testing.assert_allclose(info.pseudo_colour, unit, atol=1e-3)
    assert np.abs(out[..., 0].astype(int) - grey).max() <= 1  # the channel itself
    assert info.to_dict()["pseudo_colour"] is not None
    full, _ = prepare_image(_false_colour(grey, colour))  # the (H,W,3) form repeats it
    assert full.shape == (*grey.shape, 3) and np.array_equal(full[..., 0], full[..., 2])


def test_a_jpeg_export_of_a_blue_channel_is_recognised_too():
    out, info = prepare_array(_jpeg(_false_colour(_nuclei(seed=1), (0, 0, 1)), 75))
    assert info.pseudo_colour is not None and out.shape[-1] == 1


def test_float_images_in_false_colour_keep_their_type():
    image = _false_colour(_nuclei(seed=2), (0, 1, 0)).astype(np.float32) / 255.0  # values in [0, 1]
    out, info = prepare_array(image)
    assert info.pseudo_colour is not None and out.dtype == np.float32 and out.shape[-1] == 1


def test_colour_images_and_grey_images_are_left_alone():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    he = np.empty((64, 64, 3), np.uint8)
    he[:] = (235, 200, 220)
    he[16:40, 16:40] = (90, 40, 140)  # purple nuclei on pink: two colours
    from napari_delightsam.sample_data import make_dermoscopy

    skin, _ = make_dermoscopy()  # a brown lesion on skin: nearly one colour, still two
    for image in (noise, he, skin):
        out, info = prepare_array(image)
        assert info.pseudo_colour is None and not info.greyscale and out.shape[-1] == 3
        assert pseudo_colour(image) is None
    grey = np.repeat(_nuclei()[..., None], 3, axis=2)
    out, info = prepare_array(grey)
    assert info.greyscale and info.pseudo_colour is None
    assert PSEUDO_COLOUR_RESIDUAL < 3.9  # below the least one-coloured photograph of the data (a fundus)


def test_the_result_says_so_and_equals_the_grey_images(seg_tiny):
    grey = _nuclei(size=80, seed=3)
    blue = _false_colour(grey, (0, 0, 1))
    a, b = seg_tiny.segment(grey, "microscopy"), seg_tiny.segment(blue, "microscopy")
    assert a.colour_correction is None
    assert b.colour_correction is not None and "blue" in b.colour_correction and "grey" in b.colour_correction
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-5)
    tiled = seg_tiny.segment(np.tile(blue, (3, 3, 1)), "microscopy", tiling="on", tile_scale=1.0, tile_overlap=16)
    assert tiled.tiling is not None and "blue" in (tiled.colour_correction or "")


@pytest.fixture(scope="module")
def seg_tiny():
    import torch

    from napari_delightsam.config import tiny_config
    from napari_delightsam.inference import Segmenter
    from napari_delightsam.model import DeLightSAM

    torch.manual_seed(0)
    return Segmenter(DeLightSAM(tiny_config(img_size=64)).eval(), device="cpu", fast=False)


def test_a_tinted_grey_image_is_taken_as_grey():
    from napari_delightsam.preprocess import describe_pseudo_colour

    grey = np.clip(_nuclei(seed=4).astype(np.float32) + 60, 0, 255)  # a grey field, not black
    image = _false_colour(grey.astype(np.uint8), (1.0, 0.93, 0.85))  # a sepia tint (a scanner, a viewer)
    out, info = prepare_array(image)
    assert info.pseudo_colour is not None and out.shape[-1] == 1
    assert describe_pseudo_colour(info.pseudo_colour).startswith("a nearly grey image")


def test_training_data_is_read_as_stored(tmp_path):
    from napari_delightsam.data import discover, load_pair

    folder = tmp_path / "microscopy" / "m"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    blue = _false_colour(_nuclei(seed=5), (0, 0, 1))
    Image.fromarray(blue).save(folder / "images" / "a.png")
    Image.fromarray(((blue[..., 2] > 100) * 255).astype(np.uint8)).save(folder / "masks" / "a.png")
    image, _ = load_pair(discover(tmp_path)[0])
    assert image.shape[-1] == 3 and image[..., 0].max() == 0 and image[..., 2].max() > 0  # still blue
    out, info = prepare_array(blue, read_false_colour=False)
    assert info.pseudo_colour is None and out.shape[-1] == 3
