"""Deterministic, seeded train/val/test split per dataset (8:1:1), kept in ``splits.json``.

The split is a pure function of (sample ids, dataset key, seed, ratios, grouping rule): the
trainer writes it into the run folder and reuses that file on resume, and ``evaluate`` either
reads the file or recomputes the same split, so a model is scored on its own held-out images.

Grouping (near-duplicates stay on one side)
-------------------------------------------
Images are split by *group*, not one by one. ``default_group`` derives a group from the file
name with three generic rules, applied in order:

1. A leading numeric sequence token followed by ``_`` is the group: video frames such as
   PolypGen ``176OLCV1_100H0160`` -> ``176OLCV1`` and ``14_endocv2021_positive_1242`` ->
   ``14_endocv2021``
   (also patient-numbered names such as ``16654_2_1`` -> ``16654``).
2. A trailing follow-up day is dropped: ``covid-19-pneumonia-58-day-10`` -> ``covid-19-pneumonia-58``.
3. A trailing figure-panel letter is dropped: ``nejmoa2001017_f1-b`` -> ``nejmoa2001017_f1``.

Anything else (``100H0050``, ``IMD002``, ``benign_002``, ``C3_EndoCV2021_00106``) is its own
group. Pass another ``group_fn`` to ``make_splits`` for other naming schemes.

Sizes: val = max(1, round(0.1·n)) once a dataset has 2 images, test = round(0.1·n) as long as
train keeps at least one image; groups are shuffled with the seed and filled test first, then
val, then train. A dataset of a single image trains on it and validates on it too
(``val_is_train`` in the file).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .holdout import HoldoutSet
from .records import SampleRecord

__all__ = ["SPLIT_NAMES", "Splits", "default_group", "load_splits", "make_splits", "save_splits", "select"]

SPLIT_NAMES = ("train", "val", "test", "unseen")
GROUP_RULE = (
    "v1: leading numeric sequence token before '_'; strip trailing -day<N>; strip trailing -<panel letter>"
)

_SEQUENCE = re.compile(r"^(\d[0-9a-z]*(?:_endocv\d+)?)_.", re.IGNORECASE)
_DAY = re.compile(r"[-_ ]day[-_ ]?\d+.*$", re.IGNORECASE)
_PANEL = re.compile(r"-[a-z]\d?$", re.IGNORECASE)


def default_group(sample_id: str) -> str:
    """Group key of a file stem (see the module docstring for the rules)."""
    m = _SEQUENCE.match(sample_id)
    if m:
        return m.group(1).lower()
    stem = _DAY.sub("", sample_id)
    stem = _PANEL.sub("", stem)
    return (stem or sample_id).lower()


@dataclass
class Splits:
    """``assignments[dataset_key][split] -> sorted list of sample ids``."""

    seed: int
    ratios: tuple[float, float, float]
    assignments: dict[str, dict[str, list[str]]]
    group_rule: str = GROUP_RULE
    #: the unseen-domain protocol whose samples form the "unseen" split (None: no hold-out)
    holdout: HoldoutSet | None = None

    def ids(self, key: str, split: str) -> list[str]:
        return list(self.assignments.get(key, {}).get(split, []))

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "ratios": list(self.ratios),
            "group_rule": self.group_rule,
            "datasets": self.assignments,
            "holdout": self.holdout.to_dict() if self.holdout is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Splits:
        try:
            datasets = data["datasets"]
            assignments = {
                str(k): {s: [str(i) for i in v.get(s, [])] for s in SPLIT_NAMES} for k, v in datasets.items()
            }
            for k, v in datasets.items():
                if "val_is_train" in v:
                    assignments[k]["val_is_train"] = []  # marker kept through a round trip
            holdout = data.get("holdout")
            return cls(
                int(data["seed"]),
                tuple(float(r) for r in data["ratios"]),
                assignments,
                str(data.get("group_rule", "")),
                HoldoutSet.from_dict(holdout) if holdout else None,
            )  # type: ignore[arg-type]
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a valid splits file ({exc})") from exc


def _split_dataset(
    ids: Sequence[str],
    key: str,
    seed: int,
    ratios: tuple[float, float, float],
    group_fn: Callable[[str], str],
) -> dict[str, list[str]]:
    n = len(ids)
    groups: dict[str, list[str]] = {}
    for sid in sorted(ids):
        groups.setdefault(group_fn(sid), []).append(sid)
    names = sorted(groups)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    order = [names[i] for i in rng.permutation(len(names))]
    total = sum(ratios)
    n_val = max(1, round(n * ratios[1] / total)) if n >= 2 else 0
    n_test = round(n * ratios[2] / total)
    n_test = max(0, min(n_test, n - n_val - 1))
    out: dict[str, list[str]] = {s: [] for s in SPLIT_NAMES}
    if n == 0:
        return out
    remaining = list(order)
    # Largest-last greedy fill: a group goes to test/val only if it fits (or the split is empty),
    # so one long video sequence does not swallow the test set.
    for split, target in (("test", n_test), ("val", n_val)):
        kept: list[str] = []
        for i, g in enumerate(remaining):
            size = len(groups[g])
            have = len(out[split])
            left_for_train = len(kept) + len(remaining) - i - 1  # if g is taken here
            if have < target and (have + size <= target or have == 0) and left_for_train >= 1:
                out[split].extend(groups[g])
            else:
                kept.append(g)
        remaining = kept
    for g in remaining:
        out["train"].extend(groups[g])
    if not out["train"]:  # guard: never leave train empty
        out["train"], out["val"] = out["val"], []
    for s in SPLIT_NAMES:
        out[s].sort()
    if not out["val"]:
        out["val"] = list(out["train"])
        out["val_is_train"] = []
    return out


def make_splits(
    records: Sequence[SampleRecord],
    seed: int = 0,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    group_fn: Callable[[str], str] = default_group,
    holdout: HoldoutSet | None = None,
) -> Splits:
    """Split every dataset in ``records`` (see the module docstring).

    ``holdout``: samples its rules match form the ``unseen`` split and leave train/val/test.
    The in-domain split is made on all ids first, so the other samples keep the assignment a
    split without the hold-out gives them (``data/holdout.py``).
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers, got {ratios}")
    by_key: dict[str, list[str]] = {}
    for r in records:
        by_key.setdefault(r.key, []).append(r.sample_id)
    assignments = {
        key: _split_dataset(ids, key, seed, tuple(ratios), group_fn) for key, ids in sorted(by_key.items())
    }
    if holdout is not None:
        for key, parts in assignments.items():
            unseen = set(holdout.held_out_ids(key, by_key[key]))
            if not unseen:
                continue
            for split in ("train", "val", "test"):
                parts[split] = [i for i in parts[split] if i not in unseen]
            parts["unseen"] = sorted(unseen)
            if not parts["train"]:  # the whole dataset is held out
                parts.pop("val_is_train", None)
            elif not parts["val"]:
                parts["val"] = list(parts["train"])
                parts["val_is_train"] = []
    rule = GROUP_RULE if group_fn is default_group else getattr(group_fn, "__name__", "custom")
    return Splits(seed, tuple(ratios), assignments, rule, holdout)  # type: ignore[arg-type]


def select(
    records: Sequence[SampleRecord], splits: Splits, split: str, max_per_dataset: int | None = None
) -> list[SampleRecord]:
    """The records of ``split`` ("train" | "val" | "test" | "unseen" | "all"), in the order given.

    Records the splits do not know (added after the split was made) are left out.
    ``max_per_dataset`` keeps N records per dataset, chosen by a seeded hash of the id
    (deterministic, not biased towards the alphabetically first names).
    """
    if split not in (*SPLIT_NAMES, "all"):
        raise ValueError(f"split must be train, val, test, unseen or all, got {split!r}")
    wanted: dict[str, set[str]] = {}
    for key, parts in splits.assignments.items():
        names = SPLIT_NAMES if split == "all" else (split,)
        wanted[key] = {i for s in names for i in parts.get(s, ())}
    chosen = [r for r in records if r.sample_id in wanted.get(r.key, ())]
    if max_per_dataset is None:
        return chosen
    if max_per_dataset < 1:
        raise ValueError(f"max_per_dataset must be >= 1, got {max_per_dataset}")
    by_key: dict[str, list[SampleRecord]] = {}
    for r in chosen:
        by_key.setdefault(r.key, []).append(r)
    keep: set[tuple[str, str]] = set()
    for recs in by_key.values():
        ranked = sorted(
            recs, key=lambda r: (zlib.crc32(f"{splits.seed}:{r.sample_id}".encode()), r.sample_id)
        )
        keep.update((r.key, r.sample_id) for r in ranked[:max_per_dataset])
    return [r for r in chosen if (r.key, r.sample_id) in keep]


def save_splits(path: str | Path, splits: Splits) -> Path:
    from ..atomic_files import atomic_write

    text = json.dumps(splits.to_dict(), indent=1, sort_keys=True)
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load_splits(path: str | Path) -> Splits:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p}: cannot read splits file ({exc})") from exc
    try:
        return Splits.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from exc
