"""Appearance shifts (``data/appearance.py``), the appearance head's colour correction
(``model/appearance_head.py``), ``auto``'s decision (``Segmenter.auto_decision``,
``decide_modality``, one modality per stack) and training the head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_delightsam.config import tiny_config
from napari_delightsam.data.appearance import (
    BGR_INDEX,
    CHANNEL_ORDERS,
    SHIFTS,
    channel_order_matrix,
    endoscope_frame,
    hue_matrix,
    is_grey,
    random_appearance,
)
from napari_delightsam.model import DeLightSAM
from napari_delightsam.model.appearance_head import AppearanceHead, describe_correction

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(h: int = 60, w: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 200
    img[..., 1] = rng.integers(60, 120, (h, w))
    img[..., 2] = 30
    mask = np.zeros((h, w), bool)
    mask[20:40, 30:60] = True
    return img, mask


# -- shifts -------------------------------------------------------------------------------------


def test_geometric_shifts_move_the_mask_with_the_image():
    img, mask = _image()
    half, m_half = SHIFTS["half resolution"].apply(img, mask, 0)
    assert half.shape[:2] == m_half.shape == (30, 40)
    assert m_half.sum() == pytest.approx(mask.sum() / 4, rel=0.1)
    wide, m_wide = SHIFTS["aspect stretch 1.4"].apply(img, mask, 0)
    assert wide.shape[:2] == m_wide.shape == (60, 112)
    assert m_wide.sum() == pytest.approx(mask.sum() * 1.4, rel=0.1)


def test_resolution_loss_keeps_size_and_mask_and_removes_fine_detail():
    board = np.stack([(np.indices((60, 80)).sum(axis=0) % 2 * 200 + 20).astype(np.uint8)] * 3, axis=-1)
    mask = np.zeros((60, 80), bool)
    mask[10:30, 20:50] = True
    out, m = SHIFTS["resolution loss 2×"].apply(board, mask, 0)
    assert out.shape == board.shape and out.dtype == np.uint8 and m is mask
    assert board.std() > 90 and out.std() < 10  # the 1-pixel checkerboard is gone
    assert not SHIFTS["resolution loss 2×"].geometric


def test_frames_black_out_the_corners_and_the_mask_under_them():
    img, _ = _image()
    full = np.ones(img.shape[:2], bool)
    framed, m = SHIFTS["octagonal frame"].apply(img, full, 0)
    inside = endoscope_frame(60, 80, "octagon")
    assert not inside[0, 0] and not inside[-1, -1] and inside[30, 40]
    assert (framed[~inside] == 0).all() and (framed[inside] == img[inside]).all()
    assert (m == inside).all()
    circle = endoscope_frame(60, 80, "circle")
    assert not circle[30, 0] and circle[30, 40]


def test_colour_shifts_keep_grey_images_grey_and_bgr_swaps_channels():
    img, mask = _image()
    bgr, m = SHIFTS["BGR channel order"].apply(img, mask, 0)
    assert (bgr == img[..., ::-1]).all() and m is mask
    grey = np.repeat(img[..., 1:2], 3, axis=-1)
    assert is_grey(grey) and not is_grey(img)
    for name in ("hue +25°", "hue -25°", "H&E stain jitter", "greyscale"):
        out, _ = SHIFTS[name].apply(grey, mask, 0)
        assert is_grey(out), name
    assert SHIFTS["greyscale"].colour_only and not SHIFTS["hue +25°"].colour_only
    hue, _ = SHIFTS["hue +25°"].apply(img, mask, 0)
    assert np.abs(hue.astype(int) - img).mean() > 5


def test_hue_matrix_is_a_rotation_that_keeps_grey():
    m = hue_matrix(25.0)
    assert np.allclose(m @ np.ones(3), np.ones(3), atol=1e-6)  # grey stays grey
    assert np.allclose(hue_matrix(-25.0) @ m, np.eye(3), atol=1e-6)


def test_appearance_mix_sets_bgr_share_and_canvas():
    from napari_delightsam.data.appearance import BGR_INDEX, AppearanceMix

    img, _ = _image(64, 48)
    rng = np.random.default_rng(5)
    mix = AppearanceMix(reorder_p=1.0, bgr_share=1.0, canvas_p=1.0)
    shapes = set()
    for _ in range(40):
        out, order, _hue = random_appearance(img, rng, mix=mix)
        if not is_grey(out):  # a greyscale draw reorders nothing
            assert order == BGR_INDEX
        shapes.add(out.shape[:2])
    assert any(h > 64 * 1.05 or w > 48 * 1.05 for h, w in shapes)  # a black canvas was added
    none = AppearanceMix(reorder_p=1.0, bgr_share=0.0)
    orders = {random_appearance(img, rng, mix=none)[1] for _ in range(40)}
    assert BGR_INDEX not in orders and len(orders - {0}) >= 2
    with pytest.raises(ValueError, match="canvas_p"):
        AppearanceMix(canvas_p=1.5)


def test_wide_field_cuts_the_round_field_of_view_at_top_and_bottom_on_a_wider_canvas():
    from napari_delightsam.data.appearance import AppearanceMix, wide_field

    disc = np.zeros((100, 100, 3), np.uint8)
    yy, xx = np.mgrid[:100, :100]
    disc[(yy - 49.5) ** 2 + (xx - 49.5) ** 2 <= 50**2] = (200, 90, 40)  # a fundus-like round field
    widths = []
    for seed in range(10):
        out = wide_field(disc, np.random.default_rng(seed))
        h, w = out.shape[:2]
        assert 60 <= h <= 90 and w >= 1.3 * h - 1 and w >= 100
        assert (out[h // 2, w // 2] == (200, 90, 40)).all()
        if w >= 106:  # wider than the image: black margins left and right
            assert (out[h // 2, :3] == 0).all() and (out[h // 2, -3:] == 0).all()
        assert (out[0, w // 2] != 0).any()  # the disc is cut at the top: its top row is not black
        widths.append(w)
    assert max(widths) >= 106
    with pytest.raises(ValueError, match="wide_field_p"):
        AppearanceMix(wide_field_p=-0.1)
    # a mix without it keeps every draw of a seed
    img, _ = _image(64, 48)
    a = random_appearance(img, np.random.default_rng(3), mix=AppearanceMix())
    b = random_appearance(img, np.random.default_rng(3), mix=AppearanceMix(wide_field_p=0.0))
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]


def test_greyscale_p_sets_how_often_a_colour_image_turns_grey():
    from napari_delightsam.data.appearance import AppearanceMix, greyscale, is_grey

    img, _ = _image(64, 48)
    assert not is_grey(img) and is_grey(greyscale(img))
    always, never = AppearanceMix(greyscale_p=1.0, reorder_p=0.0), AppearanceMix(greyscale_p=0.0, reorder_p=0.0)
    rng = np.random.default_rng(5)
    assert all(is_grey(random_appearance(img, rng, mix=always)[0]) for _ in range(20))
    assert not any(is_grey(random_appearance(img, rng, mix=never)[0]) for _ in range(20))
    # a grey modality's images (colour=False) are never asked to change colour
    assert not is_grey(random_appearance(img, rng, colour=False, mix=always)[0])
    with pytest.raises(ValueError, match="greyscale_p"):
        AppearanceMix(greyscale_p=1.5)
    # the default (0.1) is the probability of the mixes before the field existed
    assert AppearanceMix().greyscale_p == 0.1


def test_mix_by_modality_narrows_hue_where_asked():
    from napari_delightsam.data.appearance import AppearanceMix, MixByModality

    mixes = MixByModality.from_settings(AppearanceMix(reorder_p=0.5), {"microscopy": {"hue_max": 5.0}})
    assert mixes.for_modality("microscopy").hue_max == 5.0 and mixes.for_modality("microscopy").reorder_p == 0.5
    assert mixes.for_modality("fundus") == AppearanceMix(reorder_p=0.5)
    img, _ = _image(48, 48)
    rng = np.random.default_rng(2)
    hues = [random_appearance(img, rng, mix=mixes.for_modality("microscopy"))[2] for _ in range(60)]
    assert max(abs(h) for h in hues) <= 5.0 and any(h != 0 for h in hues)
    with pytest.raises(ValueError, match="unknown appearance-mix fields"):
        MixByModality.from_settings(AppearanceMix(), {"microscopy": {"hue": 5}})
    with pytest.raises(ValueError, match="hue_max"):
        AppearanceMix(hue_max=120.0)


def test_random_appearance_reports_what_it_did():
    img, _ = _image(64, 64)
    rng = np.random.default_rng(3)
    orders, hues = set(), []
    for _ in range(60):
        out, order, hue = random_appearance(img, rng)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
        orders.add(order)
        hues.append(hue)
    assert len(orders) > 2 and 0 in orders
    assert max(abs(h) for h in hues) <= 45.0 and any(h != 0 for h in hues)
    grey = np.repeat(img[..., 1:2], 3, axis=-1)
    for _ in range(20):
        out, order, hue = random_appearance(grey, rng, colour=False)
        assert order == 0 and hue == 0.0 and is_grey(out)


# -- the appearance head ------------------------------------------------------------------------


def _forced(order: int | None = None, hue: float | None = None) -> DeLightSAM:
    """A tiny appearance-head model whose head always answers ``order`` and ``hue``."""
    torch.manual_seed(0)
    model = DeLightSAM(tiny_config(modality_head_kind="appearance")).eval()
    head = model.modality_head
    assert isinstance(head, AppearanceHead)
    with torch.no_grad():
        head.order.weight.zero_()
        head.order.bias.fill_(-10.0)
        head.order.bias[order or 0] = 10.0
        head.hue.weight.zero_()
        head.hue.bias.fill_((hue or 0.0) / 45.0)
    head.hue_min_degrees.fill_(10.0)
    return model


def _normalised(rgb: np.ndarray) -> torch.Tensor:
    from napari_delightsam.preprocess import to_model_tensor

    return to_model_tensor(rgb, 128, "cpu")


def test_bgr_input_is_segmented_as_its_rgb_original():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (128, 128, 3)).astype(np.uint8)
    model = _forced(order=BGR_INDEX)
    with torch.inference_mode():
        fixed = model(_normalised(rgb[..., ::-1].copy()), torch.tensor([0]))
        plain = model(_normalised(rgb), torch.tensor([0]), correct_colour=False)
    assert fixed.colour_matrix is not None
    assert describe_correction(fixed.colour_matrix[0].numpy()) == "channels BGR -> RGB"
    assert torch.allclose(fixed.mask_logits, plain.mask_logits, atol=1e-3)
    assert torch.allclose(fixed.modality_logits, plain.modality_logits, atol=1e-3)


def test_grey_images_and_training_mode_are_never_corrected():
    grey = np.repeat(np.random.default_rng(2).integers(0, 256, (128, 128, 1)).astype(np.uint8), 3, axis=-1)
    model = _forced(order=BGR_INDEX, hue=30.0)
    with torch.inference_mode():
        out = model(_normalised(grey), torch.tensor([0]))
    assert torch.allclose(out.colour_matrix[0], torch.eye(3))
    model.train()
    out = model(_normalised(grey), torch.tensor([0]))
    assert out.colour_matrix is None


def test_hue_correction_and_its_description():
    model = _forced(hue=30.0)
    rgb = np.random.default_rng(4).integers(0, 256, (128, 128, 3)).astype(np.uint8)
    with torch.inference_mode():
        out = model(_normalised(rgb), torch.tensor([0]))
    m = out.colour_matrix[0].numpy()
    assert np.allclose(m, hue_matrix(-30.0), atol=1e-4)
    assert describe_correction(m) == "hue -30°"
    assert describe_correction(np.eye(3)) is None
    both = hue_matrix(-20.0) @ channel_order_matrix(BGR_INDEX).T
    assert describe_correction(both) == "channels BGR -> RGB, hue -20°"
    assert len(CHANNEL_ORDERS) == 6 and CHANNEL_ORDERS[0] == (0, 1, 2)


# -- auto's decision ------------------------------------------------------------------------------


def _segmenter(threshold: str | None = None):
    from napari_delightsam.inference import AUTO_CONFIDENCE_KEY, MODALITY_HEAD_TRAINED_KEY, Segmenter

    torch.manual_seed(0)
    model = DeLightSAM(tiny_config(modality_head_kind="appearance")).eval()
    meta = {MODALITY_HEAD_TRAINED_KEY: "true"}
    if threshold is not None:
        meta[AUTO_CONFIDENCE_KEY] = threshold
    return Segmenter(model, device="cpu", metadata=meta)


def test_auto_decision_asks_below_the_models_threshold():
    img = np.random.default_rng(5).integers(0, 256, (90, 70, 3)).astype(np.uint8)
    always = _segmenter("1.0")
    result = always.segment(img, modality="auto")
    d = always.auto_decision(result)
    assert d.asks and d.modality == result.modality and d.runner_up != d.modality
    assert d.confidence == pytest.approx(result.modality_probabilities[d.modality])
    assert d.confidence >= d.runner_up_confidence
    assert d.modality in d.describe() and d.runner_up in d.describe()
    assert d.reason == "" and d.why() == f"p={d.confidence:.2f} is below this model's 1.00"
    never = _segmenter("0.0")
    assert not never.auto_decision(never.segment(img, modality="auto")).asks
    assert _segmenter().auto_confidence_threshold == pytest.approx(0.9)  # no calibration in the file
    given = never.segment(img, modality="xray")
    assert never.auto_decision(given).modality == "xray"


def test_auto_asks_before_calling_a_greyscale_image_a_colour_only_modality():
    import dataclasses

    from napari_delightsam.inference import COLOUR_ONLY_MODALITIES

    seg = _segmenter("0.0")  # never asks for confidence
    colour = np.random.default_rng(7).integers(0, 256, (64, 80, 3)).astype(np.uint8)
    grey = np.repeat(colour[..., :1], 3, axis=-1)
    rc, rg = seg.segment(colour, modality="dermoscopy"), seg.segment(grey, modality="dermoscopy")
    assert not rc.info.greyscale and rg.info.greyscale and rg.info.to_dict()["greyscale"] is True
    assert seg.segment(colour[..., 0], modality="xray").info.greyscale  # one channel
    for modality in COLOUR_ONLY_MODALITIES:
        result = dataclasses.replace(rg, modality=modality)
        d = seg.auto_decision(result)
        assert d.asks and d.modality == modality and "greyscale" in d.reason and d.why() == d.reason
        assert not seg.auto_decision(dataclasses.replace(rc, modality=modality)).asks
    for modality in ("xray", "ultrasound", "microscopy"):  # grey as stored: no reason to ask
        d = seg.auto_decision(dataclasses.replace(rg, modality=modality))
        assert not d.asks and d.reason == ""
    # a stack of grey slices is grey; one colour slice makes it colour
    stack = seg.decide_modality([grey, grey])
    assert stack.asks == (stack.modality in COLOUR_ONLY_MODALITIES)
    assert not seg.decide_modality([grey, colour]).reason


def test_a_batch_or_stack_gets_one_modality_unless_told_otherwise():
    seg = _segmenter("0.5")
    rng = np.random.default_rng(6)
    images = [rng.integers(0, 256, (64, 64, 3)).astype(np.uint8) * (k % 2) for k in range(6)]
    per_image = [r.modality for r in seg.segment_batch(images, "auto", auto_per_image=True)]
    shared = [r.modality for r in seg.segment_batch(images, "auto")]
    decision = seg.decide_modality(images)
    assert len(set(shared)) == 1 and shared[0] == decision.modality
    assert len(set(per_image)) >= 1  # per image: each its own decision
    probs = [seg.segment(im, modality="auto").modality_probabilities for im in images]
    mean = {m: np.mean([p[m] for p in probs]) for m in probs[0]}
    assert decision.modality == max(mean, key=mean.get)
    assert decision.confidence == pytest.approx(max(mean.values()), abs=1e-4)


# -- training -------------------------------------------------------------------------------------


def test_training_the_head_learns_and_calibrates():
    from napari_delightsam.training.stages.appearance_head import (
        HeadImage,
        calibrate,
        train_appearance_head,
        validation_views,
        with_appearance_head,
    )

    torch.manual_seed(0)
    base = DeLightSAM(tiny_config()).eval()
    model = with_appearance_head(base)
    for k, v in base.state_dict().items():  # everything but the head carried over
        if not k.startswith("modality_head."):
            assert torch.equal(model.state_dict()[k], v)
    rng = np.random.default_rng(0)

    def item(modality: int, seed: int) -> HeadImage:
        r = np.random.default_rng(seed)
        if modality == 0:  # reddish blobs, colour
            img = np.zeros((96, 96, 3), np.uint8)
            img[..., 0] = r.integers(150, 230)
            img[..., 1] = r.integers(40, 90, (96, 96))
            img[..., 2] = 40
        else:  # grey stripes
            g = (127 + 100 * np.sin(np.arange(96) / r.uniform(2, 4)))[None, :].repeat(96, 0)
            img = np.repeat(g[..., None], 3, axis=-1).astype(np.uint8)
        return HeadImage(img, modality, "dermoscopy/a" if modality == 0 else "xray/b", modality == 0)

    train = [item(k % 2, k) for k in range(16)]
    val = validation_views(model, [item(k % 2, 100 + k) for k in range(6)], 128)
    assert val.view.count("BGR") == 3 and val.view.count("as stored") == 6
    del rng
    _, summary = train_appearance_head(model, train, val, modalities=model.config.modalities, steps=40,
                                       eval_every=20, batch_size=8, lr=3e-3)
    assert summary["best"]["val_modality_nll"] < summary["start"]["val_modality_nll"]
    assert summary["best"]["val_modality_acc"] > summary["start"]["val_modality_acc"]
    assert summary["best"]["val_modality_acc"] >= 0.75
    cal = calibrate(model.modality_head, val)
    assert cal["temperature"] == pytest.approx(float(model.modality_head.temperature))
    assert 0.5 <= cal["auto_confidence_threshold"] <= 0.99
    assert cal["stored_reordered"] == 0.0
    with pytest.raises(ValueError, match="multiple"):
        train_appearance_head(model, train, val, modalities=model.config.modalities, steps=5, eval_every=2)
    # selecting on modality + channel order: the score is both NLLs, weighted as in training
    import torch.nn.functional as F

    from napari_delightsam.training.stages.appearance_head import _predict, _val_metrics

    with torch.inference_mode():
        logits, order, _ = _predict(model.modality_head, val.feats)
    c = val.colour
    want = F.cross_entropy(logits, val.modality) + 2.0 * F.cross_entropy(order[c], val.order[c])
    assert _val_metrics(model.modality_head, val, 2.0)["val_neg_nll_with_order"] == pytest.approx(-float(want), rel=1e-5)
    _, by_both = train_appearance_head(model, train, val, modalities=model.config.modalities, steps=20,
                                       eval_every=10, batch_size=4, lr=3e-3, select="modality+order")
    kept = by_both["best"]["val_neg_nll_with_order"]
    assert kept >= by_both["start"]["val_neg_nll_with_order"]
    with pytest.raises(ValueError, match="select"):
        train_appearance_head(model, train, val, modalities=model.config.modalities, steps=2, eval_every=1, select="order")


def test_a_model_with_an_appearance_head_keeps_it_for_further_training():
    from napari_delightsam.training.stages.appearance_head import with_appearance_head

    model = DeLightSAM(tiny_config(modality_head_kind="appearance")).eval()
    with torch.no_grad():
        model.modality_head.temperature.fill_(0.7)
    kept = with_appearance_head(model)
    assert kept is model and float(kept.modality_head.temperature) == pytest.approx(0.7)
    fresh = with_appearance_head(DeLightSAM(tiny_config()).eval())
    assert isinstance(fresh.modality_head, AppearanceHead) and float(fresh.modality_head.temperature) == 1.0
