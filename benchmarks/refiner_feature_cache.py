"""Ablation R: a per-modality ``MaskRefiner`` trained on cached decoder features of a fixed model.

    python benchmarks/refiner_feature_cache.py --data ../shared/data \\
        --splits benchmarks/protocol/splits-unseen-v1.json --modality fundus --cache-dir runs/refiner-cache \\
        [--checkpoint FILE] [--width 16] [--levels 3] [--steps 1200] [--lr 3e-3] [--colour 0.3] [--out R.pt]

The exploration behind the recipe's ``vessel-refiner`` stage, faster than the stage because the
whole decoder is fixed: for every image of the modality (train / val / unseen splits) the model
(default: the bundled one, fp32; ablations R1/R2 of the model card used v1.2, which has no
refiner: ``git show 8d374c8:weights/delightsam_default.safetensors``) runs once and its normalised
512² image, the stride-2 features (the output of ``decoder.fine``) and its final logits (after
any refiner of its own) are stored (``--cache-dir``, fp16, reused when
present). A ``model.detail.MaskRefiner`` then trains on them alone: BCE + soft Dice of the
refined logits, bilinearly taken to the network's input size, against the ground truth
area-resized to it; rot90 / flip of the whole (image, features, logits, mask) tuple and a
per-channel brightness / contrast jitter of the image (``--colour``); AdamW one-cycle. Every
``--eval-every`` steps it prints the Dice of val and unseen images at their original size
(logits -> ``to_input_size``, sigmoid > 0.5, as ``delightsam evaluate``), per dataset.
The differences from the recipe stage (which trains on the embedding cache with the paper's
loss at the decoder's 256² and an exponential schedule) are the ablation's point.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def build_cache(args: argparse.Namespace, split: str, path: Path) -> list[dict]:
    from napari_delightsam.data import discover, load_pair, load_splits, select
    from napari_delightsam.inference import load_model

    seg = load_model(args.checkpoint, "cpu", precision="fp32")
    model = seg.model
    if model.decoder.fine is None:
        raise SystemExit("the model has no stride-2 stage (mask_stride 2): nothing to refine")
    grab: dict[str, torch.Tensor] = {}
    hook = model.decoder.fine.register_forward_hook(lambda mod, inp, out: grab.__setitem__("up", out.detach().float()))
    records = [r for r in select(discover(args.data), load_splits(args.splits), split) if r.modality == args.modality]
    k = seg.modalities.index(args.modality)
    rows = []
    try:
        for r in records:
            image, gt = load_pair(r)
            prepared = seg.prepare(image)
            with torch.inference_mode():
                out = model(prepared.tensor, torch.tensor([k]))
            rows.append({"key": r.key, "x": prepared.tensor[0].half(), "up": grab["up"][0].half(),
                         "logit": out.mask_logits[0].float(), "gt": torch.from_numpy(np.ascontiguousarray(gt))})
    finally:
        hook.remove()
    torch.save(rows, path)
    return rows


def load_split(args: argparse.Namespace, split: str) -> list[dict]:
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    path = args.cache_dir / f"{args.modality}-{split}.pt"
    return torch.load(path) if path.is_file() else build_cache(args, split, path)


def dice(pred: torch.Tensor, gt: torch.Tensor) -> float:
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & gt).sum()) / total


@torch.no_grad()
def evaluate(net: torch.nn.Module | None, rows: list[dict]) -> dict[str, float]:
    from napari_delightsam.preprocess import to_input_size

    per: dict[str, list[float]] = {}
    for d in rows:
        logit = d["logit"][None].float()
        if net is not None:
            logit = net(d["x"][None].float(), d["up"][None].float(), logit)
        pred = to_input_size(logit[0, 0], tuple(d["gt"].shape)).sigmoid() > 0.5
        per.setdefault(d["key"], []).append(dice(pred, d["gt"] > 0))
    return {k: 100 * float(np.mean(v)) for k, v in per.items()}


def main(argv: list[str] | None = None) -> int:
    from napari_delightsam.inference import set_threads
    from napari_delightsam.model.detail import MaskRefiner

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--modality", default="fundus")
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--checkpoint", default=None, help="default: the bundled model")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--colour", type=float, default=0.3)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="save the refiner's state dict here")
    a = p.parse_args(argv)
    set_threads(a.threads)
    torch.manual_seed(a.seed)
    train, val, unseen = (load_split(a, s) for s in ("train", "val", "unseen"))
    if not train:
        raise SystemExit(f"no training images of {a.modality}")
    size = train[0]["x"].shape[-1]
    net = MaskRefiner(train[0]["up"].shape[0], a.width, a.levels)
    print(json.dumps({"params": sum(p.numel() for p in net.parameters()), "train": len(train), "val": len(val),
                      "unseen": len(unseen), "start_val": evaluate(None, val), "start_unseen": evaluate(None, unseen)}))
    targets = [F.interpolate(d["gt"][None, None].float().gt(0).float(), size=(size, size), mode="area")[0] for d in train]
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=a.steps, pct_start=0.1)
    rng = np.random.default_rng(a.seed)
    start = time.perf_counter()
    for step in range(1, a.steps + 1):
        xs, ups, logits, gts = [], [], [], []
        for i in rng.choice(len(train), a.batch):
            d, k, flip = train[i], int(rng.integers(4)), bool(rng.random() < 0.5)
            parts = [d["x"].float(), d["up"].float(), d["logit"].float(), targets[i]]
            parts = [torch.rot90(t, k, (1, 2)) for t in parts]
            parts = [torch.flip(t, (2,)) for t in parts] if flip else parts
            if a.colour > 0:
                parts[0] = parts[0] * (1 + a.colour * (torch.rand(3, 1, 1) - 0.5)) + a.colour * (torch.rand(3, 1, 1) - 0.5)
            for bucket, t in zip((xs, ups, logits, gts), parts):
                bucket.append(t)
        out = net(torch.stack(xs), torch.stack(ups), torch.stack(logits))
        up = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)
        gt = torch.stack(gts)
        prob = up.sigmoid()
        soft_dice = 1 - (2 * (prob * gt).sum((1, 2, 3)) + 1) / (prob.sum((1, 2, 3)) + gt.sum((1, 2, 3)) + 1)
        loss = F.binary_cross_entropy_with_logits(up, gt) + soft_dice.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % a.eval_every == 0 or step == a.steps:
            net.eval()
            row = {"step": step, "seconds": round(time.perf_counter() - start, 1), "loss": round(float(loss.detach()), 4),
                   "val": evaluate(net, val), "unseen": evaluate(net, unseen)}
            net.train()
            print(json.dumps(row), flush=True)
    if a.out:
        torch.save(net.state_dict(), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
