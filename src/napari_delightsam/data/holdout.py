"""Unseen-domain hold-outs: datasets (or centres) that training never uses.

A model that only ever sees one source per modality learns that source, not the modality. To
measure generalisation the project keeps, for every modality, at least one dataset or centre
out of training altogether and scores it as the ``unseen`` split, next to the in-domain
``test`` split of the training sources (``make_splits(..., holdout=UNSEEN_V1)``).

A hold-out rule names a dataset key (``<modality>/<dataset>``) and, optionally, a regular
expression on the sample id that selects one centre inside a multi-centre dataset. The
in-domain split of such a dataset is computed on *all* its ids first and the held-out ids are
then moved out of train/val/test, so the in-domain test images are exactly those of a split
made without the hold-out (a model trained before the protocol existed never trained on them).

``UNSEEN_V1`` (the protocol of the v1 default model; the choice of each rule is explained in
``weights/MODEL_CARD.md``):

=============  ===========================================  ==================================
modality       held out                                     why this one
=============  ===========================================  ==================================
colonoscopy    PolypGen centre C5 (``EndoCV2021_C5_*``)     another hospital's endoscopes
dermoscopy     HAM10000 sample (ISIC archive)               another lesion archive than PH2
fundus         STARE sample, IDRiD vessel sample            other cameras and annotators
microscopy     MoNuSeg ``test_`` tiles                      TCGA tissue-source sites (centres)
                                                            that no ``train_`` tile comes from
ultrasound     BrEaST-Lesions-USG sample (TCIA)             another hospital and machine
xray           OpenIST normal films                         another archive (normal PA films)
=============  ===========================================  ==================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["HOLDOUTS", "UNSEEN_V1", "HoldoutRule", "HoldoutSet", "holdout_by_name"]


@dataclass(frozen=True)
class HoldoutRule:
    """Hold out ``dataset`` (a ``<modality>/<dataset>`` key), or only its ids matching ``pattern``."""

    dataset: str
    pattern: str | None = None
    reason: str = ""

    def matches(self, key: str, sample_id: str) -> bool:
        if key != self.dataset:
            return False
        return self.pattern is None or re.search(self.pattern, sample_id) is not None

    def to_dict(self) -> dict[str, str | None]:
        return {"dataset": self.dataset, "pattern": self.pattern, "reason": self.reason}


@dataclass(frozen=True)
class HoldoutSet:
    """A named list of hold-out rules (stored in ``splits.json`` so a split names its protocol)."""

    name: str
    rules: tuple[HoldoutRule, ...]

    def held_out(self, key: str, sample_id: str) -> bool:
        return any(rule.matches(key, sample_id) for rule in self.rules)

    def held_out_ids(self, key: str, ids: Iterable[str]) -> list[str]:
        return sorted(i for i in ids if self.held_out(key, i))

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> HoldoutSet:
        rules = data.get("rules", [])
        if not isinstance(rules, Sequence):
            raise ValueError("holdout rules must be a list")
        return cls(
            str(data.get("name", "custom")),
            tuple(
                HoldoutRule(str(r["dataset"]), r.get("pattern"), str(r.get("reason", "")))  # type: ignore[index, union-attr]
                for r in rules
            ),
        )


UNSEEN_V1 = HoldoutSet(
    "unseen-v1",
    (
        HoldoutRule("colonoscopy/PolypGen", r"^EndoCV2021_C5_", "PolypGen centre C5: another hospital"),
        HoldoutRule("dermoscopy/HAM10000_sample36", None, "another lesion archive (ISIC) than PH2"),
        HoldoutRule("fundus/STARE_sample2", None, "another camera and annotator than DRIVE"),
        HoldoutRule("fundus/IDRiD-vessel_sample6", None, "another camera and annotator than DRIVE"),
        HoldoutRule(
            "microscopy/MoNuSeg2018",
            r"^test_",
            "MoNuSeg test tiles: TCGA tissue-source sites that no train_ tile comes from",
        ),
        HoldoutRule(
            "ultrasound/BrEaST-Lesions-USG_sample15", None, "another hospital and machine than BUSI/UDIAT"
        ),
        HoldoutRule("xray/OpenIST_normalCXR_lungs", None, "another archive (normal PA films) than V7's COVID set"),
    ),
)

#: hold-out protocols by name (``delightsam splits --holdout NAME``)
HOLDOUTS: dict[str, HoldoutSet] = {UNSEEN_V1.name: UNSEEN_V1}


def holdout_by_name(name: str) -> HoldoutSet | None:
    """The named protocol; ``"none"`` gives None."""
    if name == "none":
        return None
    try:
        return HOLDOUTS[name]
    except KeyError:
        raise ValueError(f"unknown holdout {name!r}; choose none or {', '.join(HOLDOUTS)}") from None
