"""Dataset discovery, bad data, splits, balanced sampling and the cached loader."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from napari_delightsam.config import MODALITIES
from napari_delightsam.data import (
    BadSampleError,
    BalancedSampler,
    DataWarning,
    SampleRecord,
    SegmentationDataset,
    balanced_weights,
    default_group,
    discover,
    load_pair,
    load_splits,
    make_splits,
    measure_loader,
    records_from_items,
    save_splits,
    select,
)
from napari_delightsam.data.sampling import sample_counts
from napari_delightsam.data.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    return make_synthetic_dataset(
        tmp_path / "data", {"dermoscopy": ["d1"], "xray": ["x1", "x2"]}, n_per_dataset=5, size=(40, 50)
    )


def fake_records(counts: dict[str, int]) -> list[SampleRecord]:
    """counts: {"modality/dataset": n} -> in-memory-free records (ids only)."""
    out = []
    for key, n in counts.items():
        mod, ds = key.split("/")
        out += [SampleRecord(mod, ds, f"img_{i:04d}") for i in range(n)]
    return out


# -- discovery ---------------------------------------------------------------------------------


def test_discover_finds_pairs_sorted(data_root: Path):
    recs = discover(data_root)
    assert len(recs) == 15
    assert [r.key for r in recs] == sorted(r.key for r in recs)
    assert {r.key for r in recs} == {"dermoscopy/d1", "xray/x1", "xray/x2"}
    assert all(r.mask_path.parent.name == "masks" and r.mask_path.stem == r.sample_id for r in recs)
    assert {r.modality for r in discover(data_root, ["x-ray"])} == {"xray"}  # aliases accepted


def test_discover_warns_and_skips_what_it_cannot_use(data_root: Path):
    (data_root / "xray" / "x1" / "masks" / "img_002.png").unlink()
    (data_root / "notamodality" / "ds" / "images").mkdir(parents=True)
    with pytest.warns(DataWarning) as caught:
        recs = discover(data_root)
    messages = " ".join(str(w.message) for w in caught)
    assert "img_002" in messages and "no mask" in messages
    assert "notamodality" in messages
    assert len(recs) == 14


def test_discover_errors_name_the_problem(tmp_path: Path, data_root: Path):
    with pytest.raises(FileNotFoundError, match="not found"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image/mask pairs"):
        discover(tmp_path / "empty")
    (data_root / "fundus" / "f1" / "images").mkdir(parents=True)
    (data_root / "fundus" / "f1" / "masks").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        discover(data_root)
    with pytest.raises(ValueError, match="unknown modality"):
        discover(data_root, ["radiology"])


# -- bad data ---------------------------------------------------------------------------------------


def test_load_pair_reports_bad_files_by_name(data_root: Path):
    recs = discover(data_root)
    bad = recs[0]
    bad.image_path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(BadSampleError, match=bad.image_path.name):
        load_pair(bad)
    other = recs[1]
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(other.mask_path)
    with pytest.raises(BadSampleError, match=f"{other.image_path.name}.*does not match"):
        load_pair(other)


def test_non_binary_masks_are_binarised_with_a_warning(data_root: Path):
    rec = discover(data_root)[2]
    image, _ = load_pair(rec)
    grey = np.zeros(image.shape[:2], np.uint8)
    grey[:, : grey.shape[1] // 2] = 200
    grey[0, 0] = 100
    Image.fromarray(grey).save(rec.mask_path)
    with pytest.warns(DataWarning, match=f"{rec.mask_path.name}.*not binary"):
        _, mask = load_pair(rec)
    assert mask.dtype == bool and mask.sum() == (grey > 127).sum()
    Image.fromarray((grey > 127).astype(np.uint8)).save(rec.mask_path)  # 0/1 masks are fine as they are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, mask01 = load_pair(rec)
    np.testing.assert_array_equal(mask01, grey > 127)


def test_bad_samples_are_skipped_not_crashing_a_batch(data_root: Path):
    recs = discover(data_root)
    recs[3].image_path.write_bytes(b"garbage")
    with pytest.warns(DataWarning, match=recs[3].image_path.name):
        ds = SegmentationDataset(recs, 64, MODALITIES, augment=True, cache=True)
    assert len(ds) == len(recs) - 1 and len(ds.skipped) == 1
    # without the cache the bad file is met inside a batch: it is replaced, not fatal
    lazy = SegmentationDataset(recs, 64, MODALITIES, augment=False, cache=False)
    with pytest.warns(DataWarning, match="skipped"):
        sample = lazy[(3, 0)]
    assert sample["index"].item() == 4
    loader = DataLoader(lazy, batch_size=4, sampler=[(i, i) for i in range(len(recs))], num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shapes = [b["image"].shape[0] for b in loader]
    assert sum(shapes) == len(recs)
    for r in recs:
        if r is not recs[3]:
            r.image_path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of the"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SegmentationDataset(recs, 64, MODALITIES, cache=True)


def test_in_memory_items_use_nonzero_labels_as_foreground():
    image = np.random.default_rng(0).integers(0, 255, (30, 40), dtype=np.uint8)  # grey
    labels = np.zeros((30, 40), np.int32)
    labels[5:10, 5:10] = 1
    labels[20:25, 20:30] = 7  # another label id: still foreground
    recs = records_from_items([(image, labels, "US")])
    assert recs[0].modality == "ultrasound" and recs[0].key == "ultrasound/user"
    img, mask = load_pair(recs[0])
    assert img.shape == (30, 40, 3) and mask.sum() == 25 + 50
    with pytest.raises(ValueError, match="does not match"):
        records_from_items([(image, labels[:10], "dermoscopy")])
    with pytest.raises(ValueError, match="unknown modality"):
        records_from_items([(image, labels, "mri")])
    with pytest.raises(ValueError, match="no training items"):
        records_from_items([])


# -- splits -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("176OLCV1_100H0160", "176olcv1"),
        ("176OLCV1_100H0255", "176olcv1"),
        ("14_endocv2021_positive_1242", "14_endocv2021"),
        ("100H0050", "100h0050"),
        ("C3_EndoCV2021_00106", "c3_endocv2021_00106"),
        ("covid-19-pneumonia-58-day-10", "covid-19-pneumonia-58"),
        ("nejmoa2001017_f1-b", "nejmoa2001017_f1"),
        ("IMD002", "imd002"),
        ("test_01", "test_01"),
    ],
)
def test_default_group_rules(name: str, group: str):
    assert default_group(name) == group


def test_split_is_811_deterministic_and_disjoint():
    recs = fake_records({"busi/a": 500, "drive/b": 40})
    s1 = make_splits(recs, seed=0)
    s2 = make_splits(list(reversed(recs)), seed=0)
    assert s1.assignments == s2.assignments  # independent of input order
    assert make_splits(recs, seed=1).assignments != s1.assignments
    for key, n in (("busi/a", 500), ("drive/b", 40)):
        parts = s1.assignments[key]
        sizes = [len(parts[s]) for s in ("train", "val", "test")]
        assert sizes == [int(0.8 * n), int(0.1 * n), int(0.1 * n)]
        all_ids = parts["train"] + parts["val"] + parts["test"]
        assert len(set(all_ids)) == n


def test_split_keeps_video_sequences_on_one_side():
    ids = [f"{seq}OLCV1_100H{f:04d}" for seq in range(30) for f in range(6)] + [
        f"{i}H0050" for i in range(40)
    ]
    recs = [SampleRecord("colonoscopy", "polyp", i) for i in ids]
    s = make_splits(recs, seed=0)
    sides = {}
    for split, members in s.assignments["colonoscopy/polyp"].items():
        for i in members:
            sides.setdefault(default_group(i), set()).add(split)
    assert all(len(v) == 1 for v in sides.values())
    sizes = {k: len(v) for k, v in s.assignments["colonoscopy/polyp"].items()}
    assert sizes["val"] >= 20 and sizes["test"] >= 20 and sizes["train"] >= 150


def test_tiny_datasets_still_get_a_validation_image():
    s = make_splits(fake_records({"m/one": 1, "m/two": 2, "m/three": 3}), seed=0)
    one, two, three = (s.assignments[k] for k in ("m/one", "m/two", "m/three"))
    assert one["val"] == one["train"] and "val_is_train" in one
    assert len(two["train"]) == 1 and len(two["val"]) == 1
    assert len(three["val"]) >= 1 and len(three["train"]) >= 1


def test_splits_round_trip_and_select(tmp_path: Path):
    recs = fake_records({"a/x": 30, "b/y": 20})
    s = make_splits(recs, seed=3)
    save_splits(tmp_path / "splits.json", s)
    loaded = load_splits(tmp_path / "splits.json")
    assert loaded.assignments == s.assignments and loaded.seed == 3
    test = select(recs, loaded, "test")
    assert {r.sample_id for r in test if r.key == "a/x"} == set(s.assignments["a/x"]["test"])
    capped = select(recs, loaded, "train", max_per_dataset=5)
    assert len(capped) == 10 and capped == select(recs, loaded, "train", max_per_dataset=5)
    assert len(select(recs, loaded, "all")) == 50
    new = recs + [SampleRecord("a", "x", "added_later")]
    assert len(select(new, loaded, "all")) == 50  # unknown ids are left out
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        load_splits(tmp_path / "bad.json")


# -- sampling -------------------------------------------------------------------------------------


def test_balanced_weights_equalise_modalities_then_datasets():
    recs = fake_records({"fundus/drive": 40, "ultrasound/busi": 500, "xray/a": 100, "xray/b": 300})
    w = balanced_weights(recs)
    per_mod = {}
    per_ds = {}
    for r, wi in zip(recs, w, strict=True):
        per_mod[r.modality] = per_mod.get(r.modality, 0) + wi
        per_ds[r.key] = per_ds.get(r.key, 0) + wi
    assert all(v == pytest.approx(1 / 3) for v in per_mod.values())
    assert per_ds["xray/a"] == pytest.approx(per_ds["xray/b"])
    sampler = BalancedSampler(recs, samples_per_rank=6000, seed=0)
    counts = sample_counts(recs, sampler)
    assert all(abs(c / 6000 - 1 / 3) < 0.03 for c in counts.values())


def test_sampler_is_seeded_per_epoch_and_sharded_across_ranks():
    recs = fake_records({"a/x": 10, "b/y": 50})
    ranks = [BalancedSampler(recs, 8, seed=5, rank=r, world_size=3) for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    shards = [list(s) for s in ranks]
    assert all(len(sh) == 8 for sh in shards)
    idx, aug = ranks[0].global_stream()
    woven = [None] * 24
    for r, sh in enumerate(shards):
        woven[r::3] = sh
    assert woven == list(zip(idx.tolist(), aug.tolist(), strict=True))  # disjoint shards of one stream
    again = BalancedSampler(recs, 8, seed=5, rank=1, world_size=3)
    again.set_epoch(2)
    assert list(again) == shards[1]
    again.set_epoch(3)
    assert list(again) != shards[1]


# -- loader ----------------------------------------------------------------------------------------


def test_dataset_returns_training_tensors_and_the_loader_is_measured(data_root: Path):
    recs = discover(data_root)
    ds = SegmentationDataset(recs, 64, MODALITIES, augment=True)
    item = ds[(0, 7)]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
    assert item["mask"].shape == (1, 64, 64) and set(torch.unique(item["mask"]).tolist()) <= {0, 1}
    assert item["mask"].sum() > 0  # the synthetic targets survive the resize
    assert item["modality"].item() == MODALITIES.index(recs[0].modality)
    loader = DataLoader(ds, batch_size=4, sampler=BalancedSampler(ds.records, 24, seed=0), num_workers=0)
    stats = measure_loader(loader, max_batches=4, warmup=1)
    assert stats["samples"] == 16 and stats["samples_per_s"] > 0


@pytest.mark.data
def test_real_data_split_has_no_polypgen_sequence_leak(shared_data_dir: Path):
    recs = discover(shared_data_dir)
    s = make_splits(recs, seed=0)
    for key, parts in s.assignments.items():
        groups = {split: {default_group(i) for i in parts[split]} for split in ("train", "val", "test")}
        assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"]), key
        n = sum(len(parts[x]) for x in ("train", "val", "test"))
        assert len(parts["val"]) >= 1 and abs(len(parts["test"]) - 0.1 * n) <= 10, key
