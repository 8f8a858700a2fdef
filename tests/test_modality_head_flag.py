"""``modality_head_trained`` in a run's checkpoints (``auto`` is refused without it): a run that
keeps a trained head and the stage-0 features it reads fixed passes the flag on; a run that
changes those features, or starts from an untrained head, does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_delightsam.checkpoint import read_checkpoint_info, save_checkpoint
from napari_delightsam.data import discover, make_splits, select
from napari_delightsam.data.synthetic import make_synthetic_dataset
from napari_delightsam.inference import load_model
from napari_delightsam.training import TrainConfig, train
from napari_delightsam.training.caches.embedding_cache import build_cache_folder
from napari_delightsam.training.model_setup import build_model
from napari_delightsam.training.stages.heads import train_heads

pytestmark = pytest.mark.usefixtures("one_thread", "single_process_env")

TINY = dict(img_size=64, model_preset="tiny", num_workers=0, device="cpu", log_every=0, batch_size=2,
            steps_per_epoch=1, epochs=1, val_at_start=False, amp_cpu=False)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("flag") / "data", n_per_dataset=6, size=(40, 52))


def source(tmp_path: Path, head_trained: bool) -> Path:
    model, _ = build_model(TrainConfig(**TINY))
    flag = "true" if head_trained else "false"
    return save_checkpoint(tmp_path / f"source-{flag}.safetensors", model, {"modality_head_trained": flag})


def flag_of(path: Path) -> str:
    return read_checkpoint_info(path)[1]["modality_head_trained"]


@pytest.mark.parametrize("head_trained", [True, False])
def test_a_frozen_backbone_run_that_does_not_train_the_head_keeps_the_sources_flag(tmp_path, data_root, head_trained):
    init = source(tmp_path, head_trained)
    cfg = TrainConfig(**TINY, init=str(init), freeze=("backbone", "modality_head"), train_modality_head=False)
    result = train(cfg, tmp_path / "run", data_root=data_root, show_progress=False)
    expected = "true" if head_trained else "false"
    assert flag_of(result.best_checkpoint) == expected and flag_of(result.last_checkpoint) == expected
    # a resumed run still knows where it started
    more = train(cfg.replace(epochs=2), tmp_path / "run", data_root=data_root, resume=True, show_progress=False)
    assert more.epochs_completed == 2 and flag_of(more.last_checkpoint) == expected
    if head_trained:  # and auto works on what it saved
        out = load_model(more.last_checkpoint, "cpu", precision="fp32").segment(
            np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8), "auto"
        )
        assert out.mask.shape == (40, 52)


def test_a_run_that_moves_stage_zero_does_not_pass_an_untouched_head_on(tmp_path, data_root):
    init = source(tmp_path, True)
    cfg = TrainConfig(**TINY, init=str(init), freeze=("modality_head",), train_modality_head=False)
    result = train(cfg, tmp_path / "run", data_root=data_root, show_progress=False)
    assert flag_of(result.last_checkpoint) == "false"
    with pytest.raises(Exception, match="modality_head_trained"):
        load_model(result.last_checkpoint, "cpu").segment(np.zeros((40, 52, 3), np.uint8), "auto")


@pytest.mark.parametrize("head_trained", [True, False])
def test_heads_on_the_cache_with_the_head_fixed_keep_the_sources_flag(tmp_path, data_root, head_trained):
    init = source(tmp_path, head_trained)
    cfg = TrainConfig(**TINY, init=str(init), train_modality_head=False, freeze=("modality_head",))
    model, _ = build_model(cfg)
    records = discover(data_root)
    build_cache_folder(model.eval(), select(records, make_splits(records, seed=0), "train"), tmp_path / "c", "train")
    result = train_heads(cfg, tmp_path / "c", tmp_path / "h", show_progress=False)
    assert flag_of(result.last_checkpoint) == ("true" if head_trained else "false")
    # training the head sets it whatever the source said
    trained = train_heads(cfg.replace(train_modality_head=True, freeze=()), tmp_path / "c", tmp_path / "h2",
                          show_progress=False)
    assert flag_of(trained.last_checkpoint) == "true"


def test_a_run_that_keeps_the_head_keeps_autos_calibration_and_one_that_trains_it_does_not(tmp_path, data_root):
    """A fine-tune of a calibrated model (the fine-tune widget's path) keeps the confidence below
    which ``auto`` asks; retraining the head drops it (the default rule applies again)."""
    model, _ = build_model(TrainConfig(**TINY))
    calibration = {"auto_confidence_threshold": "0.87", "appearance_head": '{"command": "x"}'}
    init = save_checkpoint(tmp_path / "calibrated.safetensors", model, {"modality_head_trained": "true", **calibration})
    kept = TrainConfig(**TINY, init=str(init), freeze=("backbone", "modality_head"), train_modality_head=False)
    result = train(kept, tmp_path / "run", data_root=data_root, show_progress=False)
    for path in (result.best_checkpoint, result.last_checkpoint):
        meta = read_checkpoint_info(path)[1]
        assert {k: meta.get(k) for k in calibration} == calibration
    assert load_model(result.last_checkpoint, "cpu", precision="fp32").auto_confidence_threshold == 0.87
    more = train(kept.replace(epochs=2), tmp_path / "run", data_root=data_root, resume=True, show_progress=False)
    assert read_checkpoint_info(more.last_checkpoint)[1].get("auto_confidence_threshold") == "0.87"
    retrained = train(kept.replace(freeze=("backbone",), train_modality_head=True), tmp_path / "run2",
                      data_root=data_root, show_progress=False)
    meta = read_checkpoint_info(retrained.last_checkpoint)[1]
    assert meta["modality_head_trained"] == "true" and not set(calibration) & set(meta)
