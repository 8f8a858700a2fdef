"""Each inference lever of issue 6, measured alone on this machine: the network forward at 1024².

    python benchmarks/cpu_levers.py --threads 2 --repeats 10 [--device cpu] [--json levers.json]
    python benchmarks/cpu_levers.py --train --size 512 --batch 4 --repeats 4   (training steps)

Variants (random weights, one image, one modality, ``inference_mode``): fp32 eager;
+ channels_last; bf16 autocast; bf16 autocast + channels_last; + conv-BN folding (the
Segmenter default from ``load_model`` on a CPU with native bf16). Prints the median of the last
``repeats - 2`` calls of each (the first two warm up oneDNN) and the max |Δ| of the mask logits
against fp32 eager. Variants run in alternating rounds so that drifting load hits all alike.

``--train`` times a step of the training loop instead (``training.loop.run_loop``: forward +
loss + backward + Adam, train mode, the default model at ``--size`` with ``--batch`` images):
fp32, + channels_last, bf16 autocast, bf16 autocast + channels_last (conv-BN folding does not apply to training); the median skips
the first step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_delightsam.benchmarking.speed import loop_step_times
from napari_delightsam.config import ModelConfig
from napari_delightsam.model import DeLightSAM
from napari_delightsam.model.fusion import fuse_conv_bn

VARIANTS = ("fp32", "fp32+channels_last", "bf16", "bf16+channels_last", "bf16+channels_last+fused")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--train", action="store_true", help="time training steps instead of forwards")
    p.add_argument("--batch", type=int, default=4, help="images per training step (--train)")
    args = p.parse_args(argv)
    if args.train:
        return train_levers(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = DeLightSAM(ModelConfig(img_size=args.size)).eval().to(device)
    fused = copy.deepcopy(base)
    fuse_conv_bn(fused)
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    fused = fused.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, args.size, args.size, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    mod = torch.tensor([0], device=device)
    setups = {
        "fp32": (base, x, False),
        "fp32+channels_last": (cl, x_cl, False),
        "bf16": (base, x, True),
        "bf16+channels_last": (cl, x_cl, True),
        "bf16+channels_last+fused": (fused, x_cl, True),
    }

    def call(name: str) -> tuple[float, torch.Tensor]:
        model, inp, bf16 = setups[name]
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode(), ctx:
            out = model(inp, mod).mask_logits.float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for v in VARIANTS:
            dt, out = call(v)
            times[v].append(dt)
            outs[v] = out
    ref = outs["fp32"]
    rows = []
    for v in VARIANTS:
        median = float(np.median(times[v][2:] if len(times[v]) > 2 else times[v]))
        rows.append(
            {
                "variant": v,
                "median_s": median,
                "speedup_vs_fp32": float(np.median(times["fp32"][2:] or times["fp32"])) / median,
                "max_abs_diff_vs_fp32": float((outs[v] - ref).abs().max()),
            }
        )
    head = (
        f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"{args.size}², {args.repeats} rounds, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(head)
    print(f"{'variant':28s} {'median':>9s} {'vs fp32':>8s} {'max|Δlogit|':>12s}")
    for r in rows:
        print(
            f"{r['variant']:28s} {r['median_s'] * 1000:7.1f}ms {r['speedup_vs_fp32']:7.2f}× "
            f"{r['max_abs_diff_vs_fp32']:12.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"setup": head, "rows": rows}, indent=1))
    return 0


def train_levers(args: argparse.Namespace) -> int:
    from napari_delightsam.model import delightsam_loss

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = DeLightSAM(ModelConfig(img_size=args.size)).train().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    masks = (torch.rand(args.batch, 1, args.size, args.size, device=device) > 0.7).float()
    mod = torch.arange(args.batch, device=device) % base.config.num_modalities
    variants = ("fp32", "fp32+channels_last", "bf16", "bf16+channels_last")
    models = {v: copy.deepcopy(base) for v in variants}
    for v, m in models.items():
        if "channels_last" in v:
            m.to(memory_format=torch.channels_last)
    optims = {v: torch.optim.Adam(m.parameters(), lr=1e-6) for v, m in models.items()}
    inputs = {v: x.contiguous(memory_format=torch.channels_last) if "channels_last" in v else x for v in variants}

    def loss_of(v: str):  # one variant's forward + loss, as the training loop calls it
        def loss() -> torch.Tensor:
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if v.startswith("bf16") else contextlib.nullcontext()
            with ctx:
                out = models[v](inputs[v], mod)
            return delightsam_loss(out.mask_logits, out.patch_logits, masks).total

        return loss

    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:  # one step of the training loop (training.loop.run_loop) per variant and round
            times[v] += loop_step_times(models[v], loss_of(v), optims[v], 1, device)
    head = (
        f"training step, {platform.processor() or platform.machine()}, {args.threads} threads, torch "
        f"{torch.__version__}, {args.size}², batch {args.batch}, {args.repeats} rounds, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(head)
    ref = float(np.median(times["fp32"][1:] or times["fp32"]))
    rows = []
    for v in variants:
        med = float(np.median(times[v][1:] or times[v]))
        rows.append({"variant": v, "median_s": med, "speedup_vs_fp32": ref / med, "images_per_s": args.batch / med})
        print(f"{v:22s} {med:6.2f} s/step {ref / med:5.2f}× {args.batch / med:6.2f} images/s")
    if args.json:
        args.json.write_text(json.dumps({"setup": head, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
