"""A "graft" recipe stage: a part of an earlier model, copied into the current one.

Some parts of an earlier model do one job better than their successors, which were retrained
for another: v1.4's nuclei refiner segments fluorescence nuclei better than the one retrained
for H&E under channel-order and stain shifts (v2.1), and worse on those shifts. A graft stage
gives the network a new part (``model``: ``ModelConfig`` changes, e.g. a dark-field refiner) and
fills it with the tensors of the earlier part (``copy``: source prefix → target prefix); every
other tensor is the stage's ``init``'s, bit for bit. Nothing is trained, so the stage takes
seconds and its result is a pure function of the two files.

The source is the best checkpoint of an earlier stage of the recipe chain
(``source_stage``: ``<run>/<source_stage>/best.safetensors``); a run started with
``--start-at`` has no such folder, so that file is put there first (the documented command
does it from git history).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GraftConfig", "graft"]


@dataclass(frozen=True)
class GraftConfig:
    #: the recipe stage whose best checkpoint the tensors come from
    source_stage: str
    #: source tensor-name prefix -> target prefix (e.g. "decoder.refiners.microscopy." ->
    #: "decoder.refiners.microscopy_darkfield.")
    copy: dict[str, str]
    #: ``ModelConfig`` changes that give the network the parts the copy fills
    model: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraftConfig:
        unknown = sorted(set(data) - {"source_stage", "copy", "model"})
        if unknown:
            raise ValueError(f"unknown graft settings: {', '.join(unknown)}")
        if not isinstance(data.get("source_stage"), str) or not data["source_stage"]:
            raise ValueError("a graft stage needs 'source_stage': the stage whose best checkpoint it copies from")
        copy = data.get("copy")
        if not isinstance(copy, dict) or not copy:
            raise ValueError("a graft stage needs 'copy': {source prefix: target prefix}")
        for src, dst in copy.items():
            if not (isinstance(src, str) and isinstance(dst, str) and src.endswith(".") and dst.endswith(".")):
                raise ValueError(f"graft 'copy' maps module prefixes ending in '.', got {src!r}: {dst!r}")
        model = data.get("model", {})
        if not isinstance(model, dict):
            raise ValueError("graft 'model' must be a mapping of ModelConfig fields")
        return cls(data["source_stage"], dict(copy), dict(model))


def graft(init: str | Path, source: str | Path, target: str | Path, cfg: GraftConfig) -> Path:
    """``init``'s network with ``cfg.model``'s changes, its new tensors copied from ``source``
    (``cfg.copy``), written to ``target`` (fp32, ``init``'s metadata kept, a ``graft`` record
    added as its ``training`` record). ``ValueError`` when a copied tensor is missing or of another shape, or when the
    changes add tensors the copy does not fill."""
    import torch

    from ...checkpoint import RESERVED_METADATA_KEYS, load_checkpoint, read_checkpoint_info, save_checkpoint
    from ...config import ModelConfig
    from ...model import DeLightSAM

    init_cfg, init_meta = read_checkpoint_info(init)
    try:
        new_cfg = ModelConfig.from_dict({**init_cfg.to_dict(), **cfg.model})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"graft: invalid model changes {cfg.model}: {exc}") from None
    model = DeLightSAM(new_cfg)
    missing, unexpected = model.load_state_dict(load_checkpoint(init).state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"graft: the model changes remove tensors of {Path(init).name} ({unexpected[0]}, ...)")
    source_state = load_checkpoint(source).state_dict()
    wanted = model.state_dict()
    filled: dict[str, torch.Tensor] = {}
    for src_prefix, dst_prefix in cfg.copy.items():
        names = [k for k in source_state if k.startswith(src_prefix)]
        if not names:
            raise ValueError(f"graft: {Path(source).name} has no tensors under {src_prefix!r}")
        for name in names:
            dst = dst_prefix + name[len(src_prefix):]
            if dst not in wanted or wanted[dst].shape != source_state[name].shape:
                raise ValueError(f"graft: {name} {tuple(source_state[name].shape)} has no counterpart {dst} in the new network")
            filled[dst] = source_state[name]
    left = [k for k in missing if k not in filled and "attention_bias_idxs" not in k]
    if left:
        raise ValueError(f"graft: the model changes add tensors the copy does not fill ({left[0]}, ...)")
    model.load_state_dict(filled, strict=False)
    meta = {k: v for k, v in init_meta.items() if k not in RESERVED_METADATA_KEYS}
    meta["training"] = json.dumps({
        "kind": "graft", "source_stage": cfg.source_stage, "copy": cfg.copy, "model": cfg.model, "tensors": len(filled),
    })
    return save_checkpoint(target, model, meta, dtype=torch.float32)
