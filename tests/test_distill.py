"""MDKD stages with tiny teachers: the right parameters move, frozen ones do not."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from napari_delightsam.checkpoint import load_checkpoint, read_checkpoint_info
from napari_delightsam.data.synthetic import make_synthetic_dataset
from napari_delightsam.training.stages.distill import (
    AdaptedMLP,
    DistillConfig,
    ResizingTeacher,
    ViTMedTeacher,
    distill_common,
    distill_domain,
    load_sam_image_encoder,
    train_medical_teacher,
)

CFG = DistillConfig(
    epochs=1,
    steps_per_epoch=3,
    batch_size=2,
    img_size=128,
    model_preset="tiny",
    num_workers=0,
    device="cpu",
    lr=1e-3,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_sam_encoder(seed: int = 1) -> ImageEncoderViT:
    """A 1-layer segment-anything ViT whose output matches the tiny config: (B,32,8,8) at 128²."""
    torch.manual_seed(seed)
    return ImageEncoderViT(
        img_size=128,
        patch_size=16,
        embed_dim=32,
        depth=1,
        num_heads=2,
        out_chans=32,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=4,
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], keys) -> list[str]:
    return [k for k in keys if not torch.equal(before[k], after[k].cpu())]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("distill") / "data", n_per_dataset=4, size=(40, 48))


def test_common_kd_trains_only_the_shared_encoder(tmp_path: Path, data: Path):
    teacher = ResizingTeacher(tiny_sam_encoder(), 128)
    teacher_before = snapshot(teacher)
    result = distill_common(teacher, data / "dermoscopy", tmp_path / "run", CFG, show_progress=False)
    model = result.model
    assert result.final_loss is not None and result.final_loss > 0
    from napari_delightsam.training.stages.trainer import build_model

    start, _ = build_model(CFG.train_config())
    before = snapshot(start)
    after = snapshot(model)
    ctrl = {n for n, p in model.named_parameters() if ".prompt." in n or ".controller_ffn." in n}
    backbone = [n for n, _ in model.named_parameters() if n.startswith("encoder.") and n not in ctrl]
    assert len(changed(before, after, backbone)) > len(backbone) // 2
    assert changed(before, after, ctrl) == []  # controllers are off in common KD
    others = [n for n, _ in model.named_parameters() if not n.startswith("encoder.")]
    assert changed(before, after, others) == []
    assert changed(teacher_before, snapshot(teacher), teacher_before) == []
    assert not any(p.requires_grad for p in teacher.parameters())
    loaded = load_checkpoint(tmp_path / "run" / "last.safetensors")  # usable as train --init
    assert changed(after, snapshot(loaded), after) == []
    assert read_checkpoint_info(tmp_path / "run" / "last.safetensors")[1]["distill_stage"] == "common"


def test_domain_kd_trains_only_the_controller_of_each_images_modality(tmp_path: Path, data: Path):
    teacher = ResizingTeacher(tiny_sam_encoder(), 128)
    cfg = DistillConfig(**{**CFG.to_dict(), "modalities": ("dermoscopy",)})  # modality 0 only
    from napari_delightsam.training.stages.trainer import build_model

    before = snapshot(build_model(cfg.train_config())[0])
    result = distill_domain(teacher, data, tmp_path / "run", cfg, show_progress=False)
    model = result.model
    after = snapshot(model)
    ctrl = [n for n, p in model.named_parameters() if ".prompt." in n or ".controller_ffn." in n]
    moved_slice0 = False
    for n in ctrl:
        # every controller tensor is (K, ...): only slice 0 (dermoscopy) may change
        assert torch.equal(before[n][1:], after[n][1:]), n
        moved_slice0 |= not torch.equal(before[n][0], after[n][0])
    assert moved_slice0
    frozen = [k for k in before if k not in ctrl]  # backbone, BN statistics, decoder, heads
    assert changed(before, after, frozen) == []


def test_medical_teacher_trains_adapters_prompt_and_decoder_only(tmp_path: Path, data: Path):
    encoder = tiny_sam_encoder()
    sam_before = snapshot(encoder)
    result = train_medical_teacher(encoder, data, tmp_path / "run", CFG, show_progress=False)
    teacher = result.model
    assert isinstance(teacher, ViTMedTeacher)
    after = snapshot(teacher)
    # the SAM weights themselves (now under .mlp.mlp for the FFN) did not move
    for k, v in sam_before.items():
        k2 = k.replace(".mlp.", ".mlp.mlp.") if ".mlp.lin" in k else k
        assert torch.equal(v, after[f"encoder.{k2}"]), k
    trained = [n for n, _ in teacher.trainable_named_parameters()]
    assert any(".mlp.down." in n for n in trained) and any(n.startswith("decoder.") for n in trained)
    assert any(n.startswith("prompt_generator.") for n in trained)
    start = ViTMedTeacher(tiny_sam_encoder(), teacher.config, CFG.adapter_ratio)
    assert changed(
        snapshot(start), after, [n for n in trained if ".mlp.down." in n or n.startswith("decoder.")]
    )
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "last.safetensors"), "pt") as fh:
        assert set(fh.keys()) == set(trained)  # only the trained parts are stored


def test_adapter_starts_as_the_identity_of_the_frozen_ffn():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    adapted = AdaptedMLP(mlp, 8, 2)
    x = torch.randn(3, 8)
    assert torch.equal(adapted(x), mlp(x))


def test_sam_checkpoint_is_read_without_unpickling_code(tmp_path: Path, monkeypatch):
    import segment_anything

    class TinySam(nn.Module):
        def __init__(self):
            super().__init__()
            self.image_encoder = tiny_sam_encoder(seed=5)

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: TinySam())
    source = tiny_sam_encoder(seed=9)
    full = {f"image_encoder.{k}": v for k, v in source.state_dict().items()}
    full["prompt_encoder.dummy"] = torch.zeros(1)
    torch.save(full, tmp_path / "sam.pth")
    enc = load_sam_image_encoder(tmp_path / "sam.pth", "vit_b")
    assert changed(snapshot(source), snapshot(enc), snapshot(source)) == []
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    torch.save({"image_encoder.x": torch.zeros(1), "evil": nn.Linear(2, 2)}, tmp_path / "module.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_sam_image_encoder(tmp_path / "module.pth", "vit_b")
    with pytest.raises(FileNotFoundError):
        load_sam_image_encoder(tmp_path / "missing.pth")


def test_cli_distill_refuses_bad_input_with_one_line(tmp_path: Path, data: Path, capsys):
    from napari_delightsam.cli import main

    missing = tmp_path / "sam_vit_b.pth"
    assert (
        main(
            [
                "distill",
                "common",
                "--teacher-sam",
                str(missing),
                "--images",
                str(data),
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 2
    )
    assert "file not found" in capsys.readouterr().err
    args = [
        "distill",
        "domain",
        "--teacher",
        str(tmp_path / "vitmed.safetensors"),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "b"),
    ]
    assert main(args) == 2
    assert "--teacher-sam" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    args = [
        "distill",
        "domain",
        "--teacher",
        "litemedsam",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "c"),
        "--model-preset",
        "tiny",
        "--img-size",
        "128",
        "--device",
        "cpu",
    ]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["common", "domain", "medical-teacher"])
def test_every_stage_resumes_bit_for_bit(tmp_path: Path, data: Path, stage: str):
    """1 epoch + resume to 2 gives the weights, optimizer state and history of 2 epochs straight."""
    two = DistillConfig(**{**CFG.to_dict(), "epochs": 2, "steps_per_epoch": 2, "log_every": 1})
    one = DistillConfig(**{**two.to_dict(), "epochs": 1})

    def go(out: Path, cfg: DistillConfig, resume: bool = False):
        if stage == "medical-teacher":
            return train_medical_teacher(
                tiny_sam_encoder(), data, out, cfg, resume=resume, show_progress=False
            )
        fn = distill_common if stage == "common" else distill_domain
        source = data / "dermoscopy" if stage == "common" else data
        return fn(
            ResizingTeacher(tiny_sam_encoder(), 128), source, out, cfg, resume=resume, show_progress=False
        )

    straight = go(tmp_path / "a", two)
    go(tmp_path / "b", one)
    resumed = go(tmp_path / "b", two, resume=True)
    assert resumed.epochs_completed == 2 and resumed.final_loss == straight.final_loss
    from safetensors import safe_open

    for name in ("last.safetensors", "last_state.safetensors"):
        with (
            safe_open(str(tmp_path / "a" / name), "pt") as fa,
            safe_open(str(tmp_path / "b" / name), "pt") as fb,
        ):
            assert set(fa.keys()) == set(fb.keys())
            assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()), name

    def no_time(rows):
        return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]

    assert no_time(resumed.history) == no_time(straight.history)
    assert [r["type"] for r in straight.history] == ["step", "step", "epoch"] * 2


def test_a_stage_refuses_to_resume_an_unfinished_folder(tmp_path: Path, data: Path):
    from napari_delightsam.training import TrainingError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "distill.json").write_text("{}")
    with pytest.raises(TrainingError, match="no finished epoch"):
        distill_domain(ResizingTeacher(tiny_sam_encoder(), 128), data, tmp_path / "run", CFG, resume=True)
