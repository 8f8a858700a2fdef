"""Paired augmentation: image and mask must stay aligned under every transform."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_delightsam.data import SegmentationDataset, records_from_items
from napari_delightsam.data.augment import POLICIES, AugmentPolicy, augment, policy_for

pytestmark = pytest.mark.usefixtures("one_thread")


FULL_GEOMETRY = AugmentPolicy(scale_p=1.0)  # always rescale, so the crop/pad path runs


def pattern(size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric mask, and an image whose channel 0 IS the mask (0/255)."""
    rng = np.random.default_rng(seed)
    m = np.zeros((size, size), dtype=np.float32)
    m[5:20, 8:40] = 1  # a bar near the top
    m[30:55, 45:60] = 1  # a block bottom-right
    m[rng.integers(0, size, 20), rng.integers(0, size, 20)] = 1  # scattered pixels
    image = torch.from_numpy(rng.uniform(0, 255, (3, size, size)).astype(np.float32))
    image[0] = torch.from_numpy(m) * 255
    return image, torch.from_numpy(m)[None]


@pytest.mark.parametrize(
    "policy", [FULL_GEOMETRY, POLICIES["xray"], POLICIES["dermoscopy"]], ids=["scale", "xray", "derm"]
)
def test_geometry_moves_image_and_mask_together(policy):
    image, mask = pattern()
    changed = 0
    for seed in range(40):
        img, msk = augment(image, mask, seed, policy, intensity=False, appearance=False)
        assert img.shape == (3, 64, 64) and msk.shape == (1, 64, 64) and img.dtype == torch.uint8
        assert set(torch.unique(msk).tolist()) <= {0, 1}
        # channel 0 carried the mask: after the transform it must still coincide with it exactly
        np.testing.assert_array_equal((img[0] > 127).numpy(), (msk[0] == 1).numpy(), err_msg=f"seed {seed}")
        changed += int(not torch.equal(msk, mask.to(torch.uint8)))
    assert changed >= 20  # the transforms really did something


def test_intensity_never_changes_the_geometry():
    image, mask = pattern()
    for seed in range(20):
        img_a, msk_a = augment(image, mask, seed, POLICIES["dermoscopy"], intensity=False)
        img_b, msk_b = augment(image, mask, seed, POLICIES["dermoscopy"], intensity=True)
        assert torch.equal(msk_a, msk_b)
        assert img_b.dtype == torch.uint8


def test_augment_is_deterministic_in_its_seed():
    image, mask = pattern()
    a = augment(image, mask, 123, POLICIES["colonoscopy"])
    b = augment(image, mask, 123, POLICIES["colonoscopy"])
    c = augment(image, mask, 124, POLICIES["colonoscopy"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def test_grey_modalities_stay_grey_and_upright():
    for name in ("xray", "ultrasound"):
        p = policy_for(name)
        assert p.colour == 0 and not p.vflip and not p.rot90
    grey = torch.rand(1, 64, 64).repeat(3, 1, 1) * 255
    mask = torch.zeros(1, 64, 64)
    mask[:, :10] = 1  # a top band: must stay in the top half (no vertical flip/rotation)
    for seed in range(20):
        img, msk = augment(grey, mask, seed, policy_for("xray"))
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
        assert msk[0, :32].sum() >= msk[0, 32:].sum()
    # colour modalities do get colour jitter
    assert policy_for("dermoscopy").colour > 0 and policy_for("unknown-modality") == POLICIES["dermoscopy"]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="expected image"):
        augment(torch.zeros(3, 8, 8), torch.zeros(1, 8, 9), 0)


def test_dataset_applies_the_same_transform_to_image_and_mask():
    """End to end through resize + cache + augmentation (intensity on): a grey image that is
    the mask pattern must still match the returned mask (up to a few resampled boundary
    pixels); a misaligned transform would disagree on a large part of the image."""
    rng = np.random.default_rng(3)
    mask = np.zeros((90, 120), dtype=np.uint8)
    mask[10:40, 15:70] = 1
    mask[55:85, 80:115] = 1
    image = np.repeat((mask * 255)[..., None], 3, axis=2).astype(np.uint8)
    items = [(image, mask, "dermoscopy"), (image, mask, "colonoscopy")]
    ds = SegmentationDataset(records_from_items(items), 64, POLICIES.keys(), augment=True)
    for seed in range(30):
        sample = ds[(int(rng.integers(0, 2)), seed)]
        ch = sample["image"][0].int()
        lo, hi = int(ch.min()), int(ch.max())
        assert hi > lo
        # the grey image is the mask pattern: its bright pixels are exactly the mask pixels
        # (intensity changes are monotone, resampling acts on both the same way)
        agree = ((ch > (lo + hi) / 2) == (sample["mask"][0] == 1)).float().mean().item()
        assert agree > 0.98, seed


def test_appearance_never_changes_the_geometry_or_the_mask():
    image, mask = pattern()
    for seed in range(20):
        img_a, msk_a = augment(image, mask, seed, POLICIES["microscopy"], appearance=False)
        img_b, msk_b = augment(image, mask, seed, POLICIES["microscopy"], appearance=True)
        assert torch.equal(msk_a, msk_b)


@pytest.mark.parametrize("modality", ["xray", "ultrasound", "colonoscopy", "microscopy"])
def test_a_grey_image_stays_grey_under_appearance_changes(modality):
    grey = torch.rand(1, 64, 64).repeat(3, 1, 1) * 255
    mask = torch.zeros(1, 64, 64)
    changed = 0
    for seed in range(30):
        img, _ = augment(grey, mask, seed, policy_for(modality), geometry=False, intensity=False)
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2]), seed
        changed += int(not torch.equal(img[0], grey[0].round().to(torch.uint8)))
    assert changed >= 5  # blur, sharpening, noise or JPEG did act on it


def test_appearance_changes_colour_images_in_every_way_it_promises():
    """Across seeds, a colour image gets hue/saturation shifts, greyscale, blur and JPEG."""
    rng = np.random.default_rng(0)
    base = np.zeros((64, 64, 3), dtype=np.float32)
    base[..., 0], base[..., 1], base[..., 2] = 200, 90, 60  # a reddish tissue colour
    base += rng.normal(0, 3, base.shape)
    image = torch.from_numpy(np.clip(base, 0, 255)).permute(2, 0, 1)
    mask = torch.zeros(1, 64, 64)
    hue_shift = grey = 0
    for seed in range(60):
        img, _ = augment(image, mask, seed, POLICIES["colonoscopy"], geometry=False, intensity=False)
        rgb = img.float().mean(dim=(1, 2))
        grey += int(float(rgb.max() - rgb.min()) < 2)
        hue_shift += int(abs(float(rgb[1] - 90)) > 5)
    assert grey >= 1 and hue_shift >= 10


def test_stain_jitter_keeps_he_images_plausible():
    """H&E stain jitter changes the colours but keeps pixels in range and roughly in place."""
    he = np.zeros((32, 32, 3), dtype=np.uint8)
    he[..., 0], he[..., 1], he[..., 2] = 180, 110, 190  # pink-purple
    he[8:16, 8:16] = (70, 40, 120)  # a dark nucleus
    image = torch.from_numpy(he).permute(2, 0, 1).float()
    stain_only = AugmentPolicy(stain_p=1.0, stain_sigma=0.2, hue=0, saturation=(1, 1), greyscale_p=0,
                               blur_p=0, sharpen_p=0, noise_p=0, jpeg_p=0)
    outs = [augment(image, torch.zeros(1, 32, 32), s, stain_only, geometry=False, intensity=False)[0]
            for s in range(10)]
    assert any(not torch.equal(o, outs[0]) for o in outs[1:])
    for o in outs:  # the nucleus stays darker than the tissue around it
        assert o[:, 8:16, 8:16].float().mean() < o[:, 20:, 20:].float().mean()


def _plain(policy: AugmentPolicy, **changes) -> AugmentPolicy:
    """``policy`` with every other appearance change off: only the fields in ``changes`` act."""
    import dataclasses

    off = dict(hue=0.0, saturation=(1.0, 1.0), stain_p=0.0, greyscale_p=0.0, blur_p=0.0, sharpen_p=0.0,
               noise_p=0.0, jpeg_p=0.0)
    return dataclasses.replace(policy, **{**off, **changes})


def test_channel_order_reorders_colour_images_bgr_mostly_and_leaves_grey_ones():
    image = torch.stack([torch.full((32, 32), v) for v in (200.0, 90.0, 30.0)])
    mask = torch.zeros(1, 32, 32)
    policy = _plain(policy_for("microscopy"), channel_order_p=0.5, bgr_share=0.5)
    seen: dict[tuple[int, ...], int] = {}
    for seed in range(200):
        img, _ = augment(image, mask, seed, policy, geometry=False, intensity=False)
        order = tuple(int(v) for v in img[:, 0, 0])
        seen[order] = seen.get(order, 0) + 1
    assert set(seen) <= {(200, 90, 30), (30, 90, 200), (200, 30, 90), (90, 200, 30), (90, 30, 200), (30, 200, 90)}
    assert 70 <= seen[(200, 90, 30)] <= 130  # about half as stored
    assert 30 <= seen[(30, 90, 200)] <= 75  # about half the reorderings BGR
    assert len(seen) == 6  # and every other order too
    grey = torch.full((3, 32, 32), 77.0)
    for seed in range(20):
        img, _ = augment(grey, mask, seed, policy, geometry=False, intensity=False)
        assert torch.equal(img, grey.to(torch.uint8))


def test_a_policy_without_channel_order_keeps_every_draw_of_a_seed():
    """The new field is drawn last and only when on: recipes written before it reproduce."""
    import dataclasses

    image, mask = pattern()
    base = policy_for("microscopy")
    off = dataclasses.replace(base, channel_order_p=0.0, bgr_share=0.9)
    for seed in range(10):
        assert torch.equal(augment(image, mask, seed, base)[0], augment(image, mask, seed, off)[0])


def test_resolution_loss_blurs_fine_detail_and_leaves_the_mask():
    """A 1-pixel checkerboard survives without the loss and is averaged away with it; the mask
    (and the coarse content) stay in place."""
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 200 + 20).astype(np.float32)
    image = torch.from_numpy(np.stack([board] * 3))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    policy = _plain(policy_for("fundus"), lowres_p=1.0, lowres_factor=(2.0, 2.0))
    img, m = augment(image, mask, 3, policy, geometry=False, intensity=False)
    assert torch.equal(m, mask)
    assert float(img.float().std()) < 10 and abs(float(img.float().mean()) - 120) < 5
    kept, _ = augment(image, mask, 3, _plain(policy_for("fundus")), geometry=False, intensity=False)
    assert float(kept.float().std()) > 90


def test_a_policy_without_resolution_loss_keeps_every_draw_of_a_seed():
    import dataclasses

    image, mask = pattern()
    base = policy_for("fundus")
    off = dataclasses.replace(base, lowres_p=0.0, lowres_factor=(2.0, 4.0))
    for seed in range(10):
        assert torch.equal(augment(image, mask, seed, base)[0], augment(image, mask, seed, off)[0])


def test_policies_with_replaces_named_fields_and_refuses_typos():
    from napari_delightsam.data.augment import policies_with

    out = policies_with({"microscopy": {"channel_order_p": 0.5, "gamma": [0.5, 1.8], "greyscale_p": 0.3}})
    assert set(out) == {"microscopy"}
    assert out["microscopy"].gamma == (0.5, 1.8) and out["microscopy"].channel_order_p == 0.5
    assert out["microscopy"].stain_p == policy_for("microscopy").stain_p  # the rest is the modality's
    for bad, match in [
        ({"microscopy": {"chanel_order_p": 0.5}}, "unknown augmentation field"),
        ({"microscopy": {"gamma": [0.5]}}, "2 numbers"),
        ({"microscopy": {"channel_order_p": 1.5}}, "probability"),
        ({"microscopy": {"hflip": 1}}, "true or false"),
        ({"microscopy": {"hue": "x"}}, "a number"),
        ({"fundus": {"lowres_factor": [0.5, 2.0]}}, "1 <= low <= high"),
        ({"fundus": {"lowres_p": 2}}, "probability"),
    ]:
        with pytest.raises(ValueError, match=match):
            policies_with(bad)


def test_train_config_checks_its_augment_overrides():
    from napari_delightsam.training import TrainConfig

    cfg = TrainConfig(augment_overrides={"fundus": {"greyscale_p": 0.4}})
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown augmentation field"):
        TrainConfig(augment_overrides={"fundus": {"grayscale_p": 0.4}})


def test_the_dataset_uses_the_policy_given_for_a_modality():
    from napari_delightsam.data.augment import policies_with

    image = np.zeros((40, 40, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 210, 120, 40
    mask = np.zeros((40, 40), dtype=np.uint8)
    items = [(image, mask, "microscopy"), (image, mask, "dermoscopy")]
    always_bgr = {m: {**_plain(policy_for(m)).__dict__, "channel_order_p": 1.0, "bgr_share": 1.0,
                      "intensity_p": 0.0, "scale_p": 0.0} for m in ["microscopy"]}
    ds = SegmentationDataset(records_from_items(items), 32, POLICIES.keys(), augment=True,
                             policies=policies_with(always_bgr))
    for seed in range(5):
        micro = ds[(0, seed)]["image"].float().mean(dim=(1, 2))
        assert micro[2] > micro[0]  # blue now first-channel red
        derm = ds[(1, seed)]["image"].float().mean(dim=(1, 2))
        assert derm[0] > derm[2]  # dermoscopy keeps its own policy: never reordered
