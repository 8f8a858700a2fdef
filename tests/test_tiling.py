"""Tiled inference (``tiling.py``, ``Segmenter.segment(tiling=...)``): layout, blending, streaming, rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_delightsam.config import tiny_config
from napari_delightsam.inference import MODALITY_HEAD_TRAINED_KEY, Segmenter, _BatchOutput, load_model
from napari_delightsam.tiling import (
    AUTO_TILING,
    WINDOW_FLOOR,
    auto_tiles,
    blend_window,
    plan_tiles,
    policy_for,
    tile_starts,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def seg() -> Segmenter:
    return load_model("untrained", "cpu", config=tiny_config())


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _weight_map(plan) -> np.ndarray:
    g, m = plan.stride, plan.tile // plan.stride
    total = np.zeros((plan.padded[0] // g, plan.padded[1] // g), np.float64)
    for y, x, w in plan.windows():
        total[y // g : y // g + m, x // g : x // g + m] += w
    return total


# -- layout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 100, 128, 129, 200, 256, 300, 1000, 2048, 3001 // 4 * 4])
@pytest.mark.parametrize("overlap", [0, 16, 48, 64])
def test_tiles_cover_every_pixel_with_at_least_the_overlap(length, overlap):
    tile, align = 128, 4
    padded = max(length, tile)
    padded = -(-padded // align) * align
    starts = tile_starts(padded, tile, overlap, align)
    covered = np.zeros(padded, bool)
    for s in starts:
        assert s % align == 0 and 0 <= s <= padded - tile
        covered[s : s + tile] = True
    assert covered.all()
    assert starts[0] == 0 and starts[-1] == padded - tile
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + tile - b >= overlap  # neighbours overlap by at least what was asked
    if padded > tile and overlap == 0:
        assert len(starts) == -(-padded // tile)  # no more tiles than needed


def test_plan_weights_are_positive_everywhere_and_normalise_to_one():
    plan = plan_tiles((700, 450), 128, overlap=32, stride=4)
    assert plan.working == (700, 452) or plan.working == (700, 448)
    total = _weight_map(plan)
    assert total.min() >= WINDOW_FLOOR  # every output cell is covered by some tile's weight
    g, m = plan.stride, plan.tile // plan.stride
    normalised = np.zeros_like(total)
    for y, x, w in plan.windows():
        normalised[y // g : y // g + m, x // g : x // g + m] += w / total[y // g : y // g + m, x // g : x // g + m]
    np.testing.assert_allclose(normalised, 1.0, atol=1e-6)


def test_raised_cosine_neighbours_sum_to_one_over_their_overlap():
    tile, overlap = 64, 16
    left, right = blend_window(tile, 0, overlap), blend_window(tile, overlap, 0)
    np.testing.assert_allclose(left[-overlap:] + right[:overlap], 1.0, atol=1e-6)
    assert left[0] == 1.0 and right[-1] == 1.0  # image borders stay flat
    assert left.min() >= WINDOW_FLOOR and np.all(np.diff(left[-overlap:]) < 0)


def test_bad_layouts_are_refused(seg):
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles((500, 500), 128, overlap=65, stride=4)
    with pytest.raises(ValueError, match="scale"):
        plan_tiles((500, 500), 128, scale=0.0, stride=4)
    with pytest.raises(ValueError, match="tiling must be one of"):
        seg.segment(_image(64, 64), "microscopy", tiling="maybe")
    with pytest.raises(ValueError, match="tile_scale"):
        seg.segment(_image(64, 64), "microscopy", tiling="on", tile_scale=-1)


# -- blending on the network's outputs -------------------------------------------------------------


def _constant_run(seg, monkeypatch, value_of_tile):
    """Replace the network: tile k of a batch gets constant logits value_of_tile(call, k)."""
    calls: list[int] = []
    m, p = seg.config.mask_size, seg.config.patch_grid

    def fake_run(batch, modality, **kwargs):
        n = len(batch)
        calls.append(n)
        vals = torch.tensor([value_of_tile(len(calls), k) for k in range(n)], dtype=torch.float32)
        return _BatchOutput(
            vals.view(n, 1, 1, 1).expand(n, 1, m, m).clone(),
            vals.view(n, 1, 1, 1).expand(n, 1, p, p).clone(),
            torch.zeros(n, dtype=torch.long),
            None,
        )

    monkeypatch.setattr(seg, "_run", fake_run)
    return calls


def test_a_constant_image_gives_a_seam_free_map(seg, monkeypatch):
    _constant_run(seg, monkeypatch, lambda call, k: 1.5)
    res = seg.segment(np.full((410, 390), 90, np.uint8), "microscopy", tiling="on", tile_overlap=32)
    assert res.tiling["tiles"] > 4
    expected = 1.0 / (1.0 + np.exp(-1.5))
    np.testing.assert_allclose(res.probability, expected, atol=1e-6)
    np.testing.assert_allclose(res.patch_heatmap, expected, atol=1e-6)


def test_disagreeing_tiles_are_blended_not_seamed(seg, monkeypatch):
    # alternate tiles say -4 and +4: a hard seam would jump by the whole difference at once
    _constant_run(seg, monkeypatch, lambda call, k: 4.0 if (call + k) % 2 else -4.0)
    res = seg.segment(_image(256, 256), "microscopy", tiling="on", tile_overlap=64, tile_batch_size=1)
    logit = np.log(res.probability / (1 - res.probability))
    steps = max(np.abs(np.diff(logit, axis=0)).max(), np.abs(np.diff(logit, axis=1)).max())
    assert logit.max() - logit.min() > 6  # the tiles do disagree...
    assert steps < 0.5  # ...but the map crosses over smoothly (8 logits over a 64-px ramp)


# -- the Segmenter path ----------------------------------------------------------------------------


def test_one_tile_of_the_input_size_equals_the_whole_image_run(seg):
    img = _image(seg.config.img_size, seg.config.img_size, seed=3)
    whole = seg.segment(img, "microscopy", tiling="off")
    tiled = seg.segment(img, "microscopy", tiling="on", tile_scale=1.0)
    assert tiled.tiling["tiles"] == 1 and whole.tiling is None
    np.testing.assert_array_equal(tiled.probability, whole.probability)
    np.testing.assert_array_equal(tiled.mask, whole.mask)
    # the heatmap goes patch grid -> output grid -> image (two bilinear steps instead of one)
    np.testing.assert_allclose(tiled.patch_heatmap, whole.patch_heatmap, atol=0.02)


def test_a_3000_by_2000_image_comes_back_at_full_size(seg):
    img = np.random.default_rng(0).integers(0, 256, (3000, 2000), dtype=np.uint8)  # grey
    res = seg.segment(img, "microscopy", tiling="on", tile_scale=0.1, tile_overlap=32)
    assert res.mask.shape == res.probability.shape == res.patch_heatmap.shape == (3000, 2000)
    assert res.probability.dtype == np.float32 and res.mask.dtype == bool
    assert res.tiling["working_size"] == [300, 200] and res.tiling["grid"] == [3, 2]
    assert res.timings["tiles"] == 6.0 and res.timings["total"] > 0
    np.testing.assert_array_equal(res.mask, res.probability > 0.5)


def test_tiles_are_streamed_in_batches_and_the_run_can_stop_between_them(seg, monkeypatch):
    real_run = seg._run
    sizes: list[int] = []

    def spy(batch, modality, **kwargs):
        sizes.append(len(batch))
        return real_run(batch, modality, **kwargs)

    monkeypatch.setattr(seg, "_run", spy)
    steps = seg.segment_steps(_image(400, 300), "microscopy", tiling="on", tile_overlap=32, tile_batch_size=2, tile_scale=1.0)
    progress = list(_drain(steps))
    total = progress[-1][1]
    assert total == 4 * 3 and max(sizes) == 2 and sum(sizes) == total  # never a stack of all tiles
    assert [d for d, _ in progress] == list(range(2, total + 1, 2))

    sizes.clear()
    steps = seg.segment_steps(_image(400, 300), "microscopy", tiling="on", tile_overlap=32, tile_batch_size=2, tile_scale=1.0)
    assert next(steps) == (2, 12)
    steps.close()  # cancel between batches: no further network call
    assert sizes == [2]


def _drain(gen):
    while True:
        try:
            yield next(gen)
        except StopIteration:
            return


def test_float_and_padded_inputs(seg):
    # a float image smaller than a tile along one axis: reflect-padded, cropped back
    img = np.random.default_rng(1).random((60, 300)).astype(np.float32) * 1000
    res = seg.segment(img, "fundus", tiling="on", tile_overlap=32)
    assert res.probability.shape == (60, 300) and res.tiling["grid"][0] == 1
    assert np.isfinite(res.probability).all()


# -- the auto rule ---------------------------------------------------------------------------------


def test_auto_rule_tiles_large_microscopy_and_fundus_only():
    assert set(AUTO_TILING) == {"microscopy", "fundus"}
    for modality in ("microscopy", "fundus"):
        assert not auto_tiles(modality, (512, 512), 512)
        assert auto_tiles(modality, (1024, 1024), 512)
        assert auto_tiles(modality, (2048, 700), 512)
        assert not auto_tiles(modality, (768, 600), 512) and auto_tiles(modality, (600, 769), 512)  # 1.5 x 512
        assert policy_for(modality).scale == 1.25  # the best measured scale (docs/tiled-inference.md)
    for modality in ("colonoscopy", "xray", "dermoscopy", "ultrasound"):
        assert not auto_tiles(modality, (4096, 4096), 512)
        assert policy_for(modality).scale == 1.0  # tiling="on" still has a default


def test_fundus_is_tiled_relative_to_the_field_and_microscopy_in_its_own_pixels(seg):
    s = seg.config.img_size
    assert policy_for("fundus").fit == 1.25 and policy_for("microscopy").fit is None
    assert policy_for("fundus").scale_for((4 * s, 3 * s), s) == pytest.approx(1.25 / 4)
    assert policy_for("microscopy").scale_for((4 * s, 3 * s), s) == 1.25
    big = _image(4 * s, 4 * s)
    fundus = seg.segment(big, "fundus")  # auto: tiled, the longer side resized to 1.25 inputs
    assert fundus.tiling["working_size"] == [round(1.25 * s), round(1.25 * s)]
    assert fundus.tiling["grid"] == [2, 2] and fundus.mask.shape == big.shape[:2]
    micro = seg.segment(big, "microscopy")
    assert micro.tiling["working_size"] == [5 * s, 5 * s] and micro.tiling["tiles"] >= 36
    explicit = seg.segment(big, "fundus", tiling="on", tile_scale=1.0)  # a given scale wins
    assert explicit.tiling["working_size"] == [4 * s, 4 * s]


def test_tiling_auto_follows_the_rule_in_segment(seg):
    s = seg.config.img_size
    big = _image(2 * s, 2 * s)
    assert seg.segment(big, "microscopy").tiling is not None  # the default is "auto"
    assert seg.segment(big, "colonoscopy").tiling is None
    assert seg.segment(_image(s, s), "microscopy").tiling is None
    off = seg.segment(big, "microscopy", tiling="off")
    assert off.tiling is None and off.mask.shape == big.shape[:2]


def test_auto_modality_decides_the_rule_from_the_whole_image(tiny_model):
    seg = Segmenter(tiny_model, "cpu", metadata={MODALITY_HEAD_TRAINED_KEY: "true"})
    img = _image(2 * seg.config.img_size, 2 * seg.config.img_size)
    whole = seg.segment(img, "auto", tiling="off")
    tiled = seg.segment(img, "auto", tiling="on", tile_overlap=32)
    assert tiled.modality == whole.modality  # the tiles get the whole image's modality
    assert tiled.modality_probabilities == whole.modality_probabilities
    assert tiled.tiling is not None and tiled.tiling["tiles"] > 1
    auto = seg.segment(img, "auto")
    assert (auto.tiling is not None) == (whole.modality in AUTO_TILING)


def test_segment_batch_tiles_what_segment_tiles_and_batches_the_rest(seg, monkeypatch):
    s = seg.config.img_size
    images = [_image(s, s, seed=1), _image(2 * s, 2 * s, seed=2), _image(40, 50, seed=3)]
    singles = [seg.segment(im, "microscopy") for im in images]
    batch = seg.segment_batch(images, "microscopy", batch_size=4)
    assert [r.tiling is not None for r in batch] == [False, True, False]
    for a, b in zip(singles, batch, strict=True):
        np.testing.assert_allclose(a.probability, b.probability, atol=1e-4)
    off = seg.segment_batch(images, "microscopy", batch_size=4, tiling="off")
    assert all(r.tiling is None for r in off)


def test_a_float_image_is_resampled_in_uint8_when_scaled():
    """The working copy of a float image at another scale is uint8 (a quarter of float32's
    memory), within one grey level of resampling the float image itself."""
    import torch.nn.functional as F

    from napari_delightsam import tiling

    rng = np.random.default_rng(0)
    arr = (rng.random((100, 120, 3)) * 255).astype(np.float32)
    plan = tiling.plan_tiles((100, 120), 64, scale=1.25, overlap=16)
    work = tiling._working_image(arr, plan)
    assert work.dtype == np.uint8
    hw, ww = plan.working
    t = torch.from_numpy(np.rint(arr).astype(np.uint8)).permute(2, 0, 1)[None].float()
    want = F.interpolate(t, size=(hw, ww), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(work[:hw, :ww].astype(np.float32) - want).max() <= 1.0
    same = tiling._working_image(arr, tiling.plan_tiles((100, 120), 64, scale=1.0, overlap=16))
    assert same.dtype == np.float32  # no resampling: the image as prepared


# -- the modality/appearance head: once per image, not per tile --------------------------------------


def test_tiles_skip_the_head_and_take_the_whole_images_colour_correction(seg, monkeypatch):
    from napari_delightsam import tiling
    from napari_delightsam.config import PIXEL_MEAN, PIXEL_STD

    swap = np.eye(3)[::-1].copy()  # BGR -> RGB
    probs = np.full(len(seg.modalities), 1.0 / len(seg.modalities))
    monkeypatch.setattr(tiling, "_whole_image_appearance", lambda s, a: (probs, swap, False))
    seen: list[tuple[bool, torch.Tensor]] = []
    real_run = seg._run

    def spy(batch, modality, **kwargs):
        seen.append((kwargs.get("run_head", True), torch.cat([p.tensor for p in batch])))
        return real_run(batch, modality, **kwargs)

    monkeypatch.setattr(seg, "_run", spy)
    img = np.empty((300, 260, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 200, 100, 10
    img[:, 1::2, 2] = 60  # two colours: not one channel in false colour (which would be read as grey)
    res = seg.segment(img, "microscopy", tiling="on", tile_scale=1.0, tile_overlap=32)
    assert res.tiling["tiles"] == sum(t.shape[0] for _, t in seen) > 1
    assert all(head is False for head, _ in seen)  # no tile runs the modality/appearance head
    x = torch.cat([t for _, t in seen])
    want = [(v - m) / s for v, m, s in zip((10, 100, 200), PIXEL_MEAN, PIXEL_STD, strict=True)]
    for c in (1, 2):  # every tile sees the corrected colours (blue and red swapped back)
        np.testing.assert_allclose(x[:, c].numpy(), want[c], atol=1e-4)
    red = sorted({round(float(v), 3) for v in x[:, 0].flatten()[:4000].tolist()})
    assert red == [round((v - PIXEL_MEAN[0]) / PIXEL_STD[0], 3) for v in (10, 60)]
    assert res.colour_correction is not None and "BGR" in res.colour_correction
    assert img[0, 0].tolist() == [200, 100, 10]  # the caller's image is not touched
    assert not seg.auto_available and res.modality_probabilities is None  # an untrained head claims nothing


def test_the_whole_image_appearance_pass_and_the_headless_forward(seg):
    from napari_delightsam import tiling

    grey = np.repeat(_image(200, 200)[..., :1], 3, axis=2)  # equal channels: never recoloured
    probs, matrix, darkfield = tiling._whole_image_appearance(seg, grey)
    assert matrix is None and probs is not None and darkfield is (float(np.median(grey)) < 64)
    assert probs.shape == (len(seg.modalities),) and probs.sum() == pytest.approx(1.0, abs=1e-5)
    x = torch.randn(2, 3, seg.config.img_size, seg.config.img_size)
    mod = torch.tensor([seg.config.modality_index("microscopy")] * 2)
    with torch.inference_mode():
        full = seg.model(x, mod, correct_colour=False)
        headless = seg.model(x, mod, run_head=False)
        with pytest.raises(ValueError, match="needs the modality"):
            seg.model(x, None, run_head=False)
    assert headless.modality_logits is None and full.modality_logits is not None
    torch.testing.assert_close(headless.mask_logits, full.mask_logits)
    torch.testing.assert_close(headless.patch_logits, full.patch_logits)


# -- training on tiles -------------------------------------------------------------------------------


def test_training_tiles_are_the_tiles_inference_feeds_the_network(seg, monkeypatch):
    """A large annotated microscopy image trains on exactly what tiled inference will show the
    network (same prepared intensities, scale, positions), each tile with its own mask."""
    from napari_delightsam.config import PIXEL_MEAN, PIXEL_STD
    from napari_delightsam.tiling import training_tiles

    size = seg.config.img_size
    image = _image(2 * size + 40, 3 * size, seed=3)
    mask = image[..., 1] > 128
    seen: list[torch.Tensor] = []
    real_run = seg._run

    def spy(batch, modality, **kwargs):
        seen.extend(p.tensor for p in batch)
        return real_run(batch, modality, **kwargs)

    monkeypatch.setattr(seg, "_run", spy)
    res = seg.segment(image, "microscopy", tiling="auto")
    tiles = training_tiles(image, mask, "microscopy", size, stride=size // seg.config.mask_size)
    assert tiles is not None and len(tiles) == res.tiling["tiles"] == len(seen) > 4
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    fed = torch.cat(seen) * std + mean  # back to [0, 255]
    for tile, x in zip(tiles, fed, strict=True):
        assert tile.image.shape == (size, size, 3) and tile.image.dtype == np.uint8
        np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), tile.image, atol=0.01)
        # the mask moved with the image: where the (resized) green channel is clearly above or
        # below 128, the mask says so
        green = tile.image[..., 1].astype(int)
        assert tile.mask[green > 160].mean() > 0.95 and tile.mask[green < 96].mean() < 0.05
    # at the modality's scale (1.25 for microscopy): the working image is 1.25 x the input
    assert res.tiling["scale"] == pytest.approx(1.25, rel=0.02)


def test_training_tiles_leave_what_auto_segments_whole_alone():
    from napari_delightsam.tiling import training_tiles

    image = _image(512, 512)
    mask = np.zeros((512, 512), bool)
    assert training_tiles(image, mask, "microscopy", 512) is None  # the training size: whole
    assert training_tiles(_image(2048, 2048), np.zeros((2048, 2048), bool), "colonoscopy", 512) is None
    # fundus is field-relative: a 3000 x 2000 photograph becomes 640 x 428, two tiles of 512
    grey = np.random.default_rng(0).integers(0, 4000, (3000, 2000)).astype(np.uint16)
    tiles = training_tiles(grey, grey > 2000, "fundus", 512)
    assert tiles is not None and len(tiles) == 2
    assert all(t.image.shape == (512, 512) and t.image.dtype == np.uint8 for t in tiles)
    with pytest.raises(ValueError, match="differ in size"):
        training_tiles(_image(1000, 1000), np.zeros((999, 1000), bool), "microscopy", 512)
