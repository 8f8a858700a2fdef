"""Head training on cached embeddings: cache folder, fingerprint check, learning, resume, selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from napari_delightsam.checkpoint import load_checkpoint, read_checkpoint_info
from napari_delightsam.data import discover, make_splits, select
from napari_delightsam.data.synthetic import make_synthetic_dataset
from napari_delightsam.training import TrainConfig, TrainingError
from napari_delightsam.training.caches.embedding_cache import (
    build_cache_folder,
    cache_file_name,
    concatenate,
    load_embeddings,
)
from napari_delightsam.training.model_setup import build_model
from napari_delightsam.training.stages.heads import load_cache_split, train_heads

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    img_size=64,
    batch_size=4,
    steps_per_epoch=10,
    model_preset="tiny",
    num_workers=0,
    device="cpu",
    log_every=0,
    val_at_start=True,
    lr=3e-3,
    gamma=1.0,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Synthetic data, split, and a cache of the tiny model's (seeded) encoder: train with two
    views, val and unseen with the image itself."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("heads") / "data", n_per_dataset=10, size=(40, 52))
    records = discover(root)
    splits = make_splits(records, seed=0, ratios=(0.6, 0.2, 0.2))
    model, _ = build_model(TrainConfig(**TINY))
    model.eval()
    folder = tmp_path_factory.mktemp("heads") / "cache"
    for split, views in (("train", (0, 1)), ("val", (0,)), ("test", (0,))):
        build_cache_folder(model, select(records, splits, split), folder, split, views=views, keep_skip=True)
    # the "test" files stand in for an unseen-domain split here
    for f in folder.glob("test__*"):
        f.rename(folder / f.name.replace("test__", "unseen__", 1))
    return folder


def test_cache_folder_is_one_file_per_dataset_and_resumable(cache_dir: Path, tmp_path: Path):
    train_files = sorted(cache_dir.glob("train__*"))
    datasets = {f.name.split("__")[2] for f in train_files}
    assert len(train_files) >= 2 and len(datasets) >= 2
    assert all(f.name.endswith("__v0-1.safetensors") for f in train_files)
    one = load_embeddings(train_files[0])
    assert sorted(set(one.view.tolist())) == [0, 1] and one.image is not None and one.stage0 is None
    joined = load_cache_split(cache_dir, "train")
    assert len(joined) == sum(len(load_embeddings(f)) for f in train_files)
    assert int(joined.record.max()) == len(joined.keys) - 1  # records renumbered into one key list
    assert cache_file_name("train", "xray/a", (0, 1)) == "train__xray__a__v0-1.safetensors"
    with pytest.raises(ValueError, match="no embedding sets"):
        concatenate([])

    # rebuilt with the same encoder: every file is kept; with other weights: recomputed
    root = next(cache_dir.parent.parent.glob("heads*/data"))
    records = discover(root)
    train_recs = select(records, make_splits(records, seed=0, ratios=(0.6, 0.2, 0.2)), "train")
    folder = tmp_path / "c"
    model, _ = build_model(TrainConfig(**TINY))
    first = build_cache_folder(model.eval(), train_recs, folder, "train")
    stamps = {f: f.stat().st_mtime_ns for f in first}
    again = build_cache_folder(model, train_recs, folder, "train")
    assert again == first and all(f.stat().st_mtime_ns == stamps[f] for f in again)
    other, _ = build_model(TrainConfig(**TINY, seed=3))
    build_cache_folder(other.eval(), train_recs, folder, "train")
    assert all(f.stat().st_mtime_ns != stamps[f] for f in first)

    # the encoder can run under bf16 autocast (the recipe does so where training would): the
    # cache records it, and its embeddings stay close to the fp32 ones
    fp32 = load_embeddings(first[0])
    bf16 = build_cache_folder(
        other, train_recs, tmp_path / "bf16", "train", device="cpu", autocast_dtype=torch.bfloat16
    )
    fast = load_embeddings(next(f for f in bf16 if f.name == first[0].name))
    assert fast.meta["autocast"] == "torch.bfloat16" and fp32.meta["autocast"] == "None"
    cos = torch.nn.functional.cosine_similarity(fast.embedding.float().flatten(1), fp32.embedding.float().flatten(1))
    assert float(cos.min()) > 0.99


def test_heads_learn_select_on_both_validations_and_resume(cache_dir: Path, tmp_path: Path):
    cfg = TrainConfig(**TINY, epochs=6)
    out = tmp_path / "run"
    result = train_heads(cfg, cache_dir, out, show_progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    initial = next(r for r in rows if r["type"] == "initial")
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert len(epochs) == 6
    for r in epochs:
        assert 0 <= r["val_dice"] <= 1 and 0 <= r["unseen_dice"] <= 1
        assert r["select_dice"] == pytest.approx((r["val_dice"] + r["unseen_dice"]) / 2)
    # the heads learn: the synthetic targets are easy, the random start is not
    assert max(r["select_dice"] for r in epochs) > initial["select_dice"] + 0.1
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert result.best_val_dice == pytest.approx(max(r["select_dice"] for r in epochs))
    # the files hold the whole model; the encoder is the one the cache was made with
    best = load_checkpoint(result.best_checkpoint)
    start, _ = build_model(cfg)
    for name, t in start.state_dict().items():
        if name.startswith("encoder."):
            assert torch.equal(best.state_dict()[name], t), name
    _, meta = read_checkpoint_info(result.best_checkpoint)
    assert json.loads(meta["training"])["select_dice"] == pytest.approx(result.best_val_dice)

    # 5 epochs + resume to 6 gives the weights of 6 straight
    out2 = tmp_path / "resumed"
    train_heads(TrainConfig(**TINY, epochs=5), cache_dir, out2, show_progress=False)
    train_heads(TrainConfig(**TINY, epochs=6), cache_dir, out2, show_progress=False, resume=True)
    a = load_checkpoint(out / "last.safetensors").state_dict()
    b = load_checkpoint(out2 / "last.safetensors").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_stale_cache_and_bad_folders_are_refused(cache_dir: Path, tmp_path: Path):
    # other encoder weights (another seed) than the cache was made with
    with pytest.raises(TrainingError, match="other encoder weights"):
        train_heads(TrainConfig(**TINY, epochs=1, seed=5), cache_dir, tmp_path / "a", show_progress=False)
    with pytest.raises(TrainingError, match="no train__"):
        train_heads(TrainConfig(**TINY, epochs=1), tmp_path, tmp_path / "b", show_progress=False)
    with pytest.raises(TrainingError, match="cannot resume"):
        train_heads(TrainConfig(**TINY, epochs=1), cache_dir, tmp_path / "c", show_progress=False, resume=True)


def test_views_choose_the_augmented_copies_trained_on(cache_dir: Path, tmp_path: Path):
    train_heads(TrainConfig(**TINY, epochs=1), cache_dir, tmp_path / "v0", views=[0], show_progress=False)
    info = json.loads((tmp_path / "v0" / "heads.json").read_text())
    all_rows = len(load_cache_split(cache_dir, "train"))
    assert info["views"] == [0] and info["n_train_rows"] * 2 == all_rows
    with pytest.raises(TrainingError, match="no training rows of views"):
        train_heads(TrainConfig(**TINY, epochs=1), cache_dir, tmp_path / "v5", views=[5], show_progress=False)
