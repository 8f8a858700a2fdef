"""Appearance heads compared on the same validation views: for each model file, the modality
accuracy, how often ``auto`` would ask (the file's own calibrated temperature and confidence
threshold) and how often it would be wrong without asking, per kind of view.

The views are those a head stage validates on (``training.stages.appearance_head.validation_views``:
as stored, BGR, hue +25°, greyscale for colour images, one random appearance) drawn from the
validation split with one fixed seed and the training mix of ``--config`` (a head stage's settings,
JSON), so every file is scored on identical images. Validation data only: this is what chooses
between candidate heads.

    python benchmarks/appearance_head_val.py --data ../shared/data \
        --splits benchmarks/protocol/splits-unseen-v1.json --checkpoints A.safetensors B.safetensors \
        [--config '{"canvas_p": 0.25}'] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def score(path: Path, records: list[Any], config: dict[str, Any]) -> dict[str, Any]:
    """The head of ``path`` on the validation views of ``records``."""
    import torch
    import torch.nn.functional as F

    from napari_delightsam.checkpoint import load_checkpoint, read_checkpoint_info
    from napari_delightsam.inference import AUTO_CONFIDENCE_KEY, DEFAULT_AUTO_CONFIDENCE
    from napari_delightsam.training.stages.appearance_head import (
        HeadStageConfig,
        load_head_images,
        validation_views,
    )

    cfg = HeadStageConfig.from_dict(config)
    model = load_checkpoint(path).eval()
    if model.config.modality_head_kind != "appearance":
        raise SystemExit(f"{path}: this model has no appearance head")
    _, meta = read_checkpoint_info(path)
    threshold = float(meta.get(AUTO_CONFIDENCE_KEY, DEFAULT_AUTO_CONFIDENCE))
    modalities = list(model.config.modalities)
    val = validation_views(model, load_head_images(records, modalities), model.config.img_size, mix=cfg.mix,
                           grey_view=True)
    head = model.modality_head
    with torch.inference_mode():
        logits = torch.cat([head(val.feats[i : i + 64].float()).modality_logits for i in range(0, len(val.view), 64)])
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    right = pred == val.modality
    asks = conf < threshold
    by_view: dict[str, Any] = {}
    for view in dict.fromkeys(val.view):
        idx = torch.tensor([v == view for v in val.view])
        by_view[view] = {"n": int(idx.sum()), "right": float(right[idx].float().mean()),
                         "asks": float(asks[idx].float().mean()),
                         "wrong_unasked": int((~right & ~asks & idx).sum())}
    wrong = [{"view": val.view[i], "truth": modalities[int(val.modality[i])], "picked": modalities[int(pred[i])],
              "confidence": round(float(conf[i]), 4), "asks": bool(asks[i])}
             for i in torch.nonzero(~right).flatten().tolist()]
    return {"checkpoint": str(path), "threshold": threshold, "n_views": len(val.view),
            "nll": float(F.cross_entropy(logits, val.modality)), "right": float(right.float().mean()),
            "asks": float(asks.float().mean()), "wrong_unasked": int((~right & ~asks).sum()),
            "by_view": by_view, "wrong": wrong}


def markdown(results: list[dict[str, Any]]) -> str:
    views = list(results[0]["by_view"])
    head = "| model | threshold | NLL | right | asks | wrong, not asked | " + " | ".join(
        f"{v}: right / wrong unasked" for v in views) + " |"
    lines = [head, "|" + "---|" * (6 + len(views))]
    for r in results:
        cells = [r["checkpoint"], f"{r['threshold']:.2f}", f"{r['nll']:.3f}", f"{100 * r['right']:.1f} %",
                 f"{100 * r['asks']:.1f} %", str(r["wrong_unasked"])]
        cells += [f"{100 * r['by_view'][v]['right']:.1f} % / {r['by_view'][v]['wrong_unasked']}" for v in views]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    p.add_argument("--config", default="{}", help="head stage settings (JSON) whose mix draws the random views")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from napari_delightsam.data import discover, load_splits, select
    from napari_delightsam.inference import set_threads
    from napari_delightsam.training.stages.appearance_head import HeadStageConfig

    set_threads(args.threads)
    config = json.loads(args.config)
    cfg = HeadStageConfig.from_dict(config)
    records = select(discover(args.data, None), load_splits(args.splits), "val", cfg.val_max_per_dataset)
    results = [score(path, records, config) for path in args.checkpoints]
    print(markdown(results))
    for r in results:
        for w in r["wrong"]:
            if not w["asks"]:
                print(f"{r['checkpoint']}: {w['view']} {w['truth']} -> {w['picked']} p {w['confidence']:.3f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": "python benchmarks/appearance_head_val.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "config": config, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
