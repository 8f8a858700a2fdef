"""Unseen-domain hold-outs: held-out samples form the "unseen" split and never reach training."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_delightsam.data import SampleRecord, discover, load_splits, make_splits, save_splits, select
from napari_delightsam.data.holdout import UNSEEN_V1, HoldoutRule, HoldoutSet, holdout_by_name


def records(spec: dict[str, list[str]]) -> list[SampleRecord]:
    out = []
    for key, ids in spec.items():
        mod, ds = key.split("/")
        out += [SampleRecord(mod, ds, i) for i in ids]
    return out


CENTRES = {
    "colonoscopy/multi": [f"A_{i:03d}" for i in range(40)] + [f"B_{i:03d}" for i in range(20)],
    "colonoscopy/other": [f"x{i:03d}" for i in range(10)],
    "xray/lungs": [f"cxr{i:03d}" for i in range(30)],
}
RULES = HoldoutSet(
    "test-protocol",
    (HoldoutRule("colonoscopy/multi", r"^B_", "centre B"), HoldoutRule("colonoscopy/other")),
)


def test_held_out_samples_form_the_unseen_split_only():
    splits = make_splits(records(CENTRES), seed=0, holdout=RULES)
    multi = splits.assignments["colonoscopy/multi"]
    assert multi["unseen"] == [f"B_{i:03d}" for i in range(20)]
    in_domain = multi["train"] + multi["val"] + multi["test"]
    assert not any(i.startswith("B_") for i in in_domain)
    assert sorted(in_domain) == [f"A_{i:03d}" for i in range(40)]
    whole = splits.assignments["colonoscopy/other"]
    assert whole["train"] == whole["val"] == whole["test"] == []
    assert len(whole["unseen"]) == 10
    assert splits.assignments["xray/lungs"]["unseen"] == []


def test_the_in_domain_split_is_the_split_made_without_the_holdout():
    recs = records(CENTRES)
    plain = make_splits(recs, seed=3)
    held = make_splits(recs, seed=3, holdout=RULES)
    for key in CENTRES:
        for split in ("train", "val", "test"):
            kept = [i for i in plain.assignments[key][split] if not RULES.held_out(key, i)]
            assert held.assignments[key][split] == kept, (key, split)


def test_unseen_split_round_trips_and_is_selectable(tmp_path: Path):
    recs = records(CENTRES)
    splits = make_splits(recs, seed=0, holdout=RULES)
    path = save_splits(tmp_path / "splits.json", splits)
    back = load_splits(path)
    assert back.holdout == RULES
    assert back.assignments["colonoscopy/multi"]["unseen"] == splits.assignments["colonoscopy/multi"]["unseen"]
    unseen = select(recs, back, "unseen")
    assert {r.key for r in unseen} == {"colonoscopy/multi", "colonoscopy/other"}
    assert len(unseen) == 30
    train_ids = {(r.key, r.sample_id) for r in select(recs, back, "train")}
    assert not train_ids & {(r.key, r.sample_id) for r in unseen}
    assert len(select(recs, back, "all")) == len(recs)


def test_val_is_train_marker_survives_a_round_trip(tmp_path: Path):
    recs = records({"fundus/one": ["only"]})
    splits = make_splits(recs, seed=0)
    assert "val_is_train" in splits.assignments["fundus/one"]
    back = load_splits(save_splits(tmp_path / "s.json", splits))
    assert "val_is_train" in back.assignments["fundus/one"]


def test_holdout_names():
    assert holdout_by_name("none") is None
    assert holdout_by_name("unseen-v1") is UNSEEN_V1
    with pytest.raises(ValueError, match="unknown holdout"):
        holdout_by_name("nope")


@pytest.mark.data
def test_unseen_v1_holds_out_a_domain_of_every_modality(shared_data_dir: Path):
    recs = discover(shared_data_dir)
    splits = make_splits(recs, seed=0, holdout=UNSEEN_V1)
    unseen = select(recs, splits, "unseen")
    train = select(recs, splits, "train")
    assert {r.modality for r in unseen} == {r.modality for r in recs}
    assert {r.modality for r in train} == {r.modality for r in recs}
    unseen_keys = {(r.key, r.sample_id) for r in unseen}
    assert not unseen_keys & {(r.key, r.sample_id) for r in train}
    # MoNuSeg's test tiles come from TCGA tissue-source sites that no training tile comes from
    site = lambda r: r.sample_id.split("-")[1]  # noqa: E731 - TCGA-<site>-<patient>...
    mo_train = {site(r) for r in train if r.dataset == "MoNuSeg2018"}
    mo_unseen = {site(r) for r in unseen if r.dataset == "MoNuSeg2018"}
    assert mo_train and mo_unseen and not mo_train & mo_unseen
