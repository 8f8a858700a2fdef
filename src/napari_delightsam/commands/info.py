"""`delightsam info`: variant, modalities, parameter counts and FLOPs of a model.

Parameters are reported as total / shared / per modality / active (= shared + one modality's
controller, query token and hypernetwork — what one forward pass uses). FLOPs are measured with
``torch.utils.flop_counter.FlopCounterMode`` for one image with one modality active, at two
sizes: the model's own input size (``--img-size`` to choose another; what one call of this
model costs, e.g. 512² for the bundled model) and 1024² (the paper's size, the figure to
compare with it); it counts matrix multiplies and convolutions (2 FLOPs per multiply-add).
Two details:

* The counter has no formula for PyTorch's fused CPU attention kernel, so
  ``F.scaled_dot_product_attention`` with a mask would count as 0 FLOPs; the count is taken
  with the math SDPA backend, whose batched matmuls are counted (about 5.2 GFLOPs of window
  attention at 1024²).
* The paper's "55.86 GFLOPs" is, as is common for SAM-family papers (fvcore), a count of
  multiply-accumulates: compare it with our GMACs (= FLOPs / 2).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cli import CommandError
from ..config import ModelConfig

#: the paper's figures for the whole model with one active controller at 1024²
PAPER_PARAMS = 12.74e6
PAPER_GFLOPS_AS_REPORTED = 55.86  # multiply-accumulates (see module docstring)


@dataclass
class FlopReport:
    img_size: int
    flops: int
    #: FLOPs per top-level component (encoder parts, modality_head, prompt_generator, decoder)
    by_component: dict[str, int]

    @property
    def macs(self) -> float:
        return self.flops / 2


def count_flops(model: nn.Module, img_size: int | None = None, modality: int = 0) -> FlopReport:
    """FLOPs of one forward pass of ``model`` (a DeLightSAM) on one image, one modality active.

    Runs a real forward pass on the model's device with ``requires_grad_(False)`` (not under
    ``no_grad``: the counter's module tracker misbehaves there) and the math SDPA backend.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg: ModelConfig = model.config  # type: ignore[assignment]
    size = img_size or cfg.img_size
    param = next(model.parameters())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval().requires_grad_(False)
    x = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
    mod = torch.tensor([modality], device=param.device)
    try:
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            model(x, mod)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    by_component: dict[str, int] = {}

    def collect(prefix: str, module: nn.Module) -> None:
        # modules called through helper methods (encoder.forward_conv/forward_vit, a ModuleList
        # of stages) have no entry of their own: descend to the parts that were called
        for child, sub in module.named_children():
            name = f"{prefix}.{child}" if prefix else child
            if f"{root}.{name}" in counts:
                by_component[name] = int(counts[f"{root}.{name}"])
            else:
                collect(name, sub)

    collect("", model)
    return FlopReport(size, int(counter.get_total_flops()), by_component)


def _resolve(checkpoint: str | None) -> tuple[nn.Module, str, str | None, dict[str, str]]:
    """-> (model, description, note, checkpoint metadata)."""
    from ..atomic_files import sha256_file
    from ..checkpoint import CheckpointError, bundled_checkpoint_path, load_checkpoint, read_checkpoint_info
    from ..model import DeLightSAM

    note = None
    path: Path | None = None
    if checkpoint is None:
        path = bundled_checkpoint_path()
        if path is None:
            note = "no bundled model in weights/ yet: showing the default architecture with untrained weights"
    elif checkpoint != "untrained":
        path = Path(checkpoint).expanduser()
    if path is None:
        torch.manual_seed(0)
        return DeLightSAM(ModelConfig()).eval(), "untrained (default architecture, fresh weights)", note, {}
    try:
        model = load_checkpoint(path)
        _, meta = read_checkpoint_info(path)
    except CheckpointError as exc:
        raise CommandError(str(exc)) from exc
    meta = dict(meta)
    meta["sha256"] = sha256_file(path)
    return model, str(path), note, meta


def _rel(ours: float, paper: float) -> float:
    return (ours - paper) / paper


#: the paper's input size: FLOPs are also reported there, whatever the model's own size
PAPER_IMG_SIZE = 1024


def _flops_at(model: nn.Module, size: int, what: str, modality: int = 0) -> FlopReport:
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    if size != cfg.img_size:
        from ..model import DeLightSAM

        try:
            flop_cfg = cfg.replace(img_size=size)
        except ValueError as exc:
            raise CommandError(f"{what} {size}: {exc}") from exc
        model = DeLightSAM(flop_cfg)  # FLOPs do not depend on the weights
    return count_flops(model, size, modality)


def _flops_dict(flops: FlopReport) -> dict[str, Any]:
    return {
        "img_size": flops.img_size,
        "flops": flops.flops,
        "gflops": flops.flops / 1e9,
        "gmacs": flops.macs / 1e9,
        "by_component_gflops": {k: v / 1e9 for k, v in flops.by_component.items()},
        "method": "torch.utils.flop_counter.FlopCounterMode, batch 1, one modality, math SDPA backend",
    }


def gather_info(checkpoint: str | None, img_size: int | None) -> dict[str, Any]:
    model, source, note, meta = _resolve(checkpoint)
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    size = img_size or cfg.img_size
    flops = _flops_at(model, size, "--img-size")
    at_paper = flops if size == PAPER_IMG_SIZE else _flops_at(model, PAPER_IMG_SIZE, "FLOPs at")
    params = model.parameter_counts()
    info: dict[str, Any] = {
        "checkpoint": source,
        "variant": cfg.variant,
        "img_size": cfg.img_size,
        "modalities": list(cfg.modalities),
        "refiner_modalities": list(cfg.refiner_modalities),
        "darkfield_refiners": list(cfg.darkfield_refiners),
        "parameters": params,
        # at the model's own input size (or --img-size): what one call costs
        "flops": _flops_dict(flops),
        # at the paper's 1024², the same architecture: the figure to compare with the paper
        "flops_1024": _flops_dict(at_paper),
        "paper": {
            "active_params": PAPER_PARAMS,
            "gflops_as_reported": PAPER_GFLOPS_AS_REPORTED,
            "active_params_rel_diff": _rel(params["active"], PAPER_PARAMS),
            "gmacs_rel_diff": _rel(at_paper.macs / 1e9, PAPER_GFLOPS_AS_REPORTED),
        },
        "metadata": meta,
    }
    if cfg.refiner_modalities:
        # a refined modality costs more per call than the others (the figure above is modality 0)
        info["flops_refined_modalities"] = {
            m: _flops_dict(_flops_at(model, size, "--img-size", cfg.modalities.index(m))) for m in cfg.refiner_modalities
        }
    if note:
        info["note"] = note
    return info


def _refined(info: dict[str, Any]) -> str:
    """"fundus, microscopy (+ dark-field microscopy)": the modalities that run a refiner."""
    dark = info.get("darkfield_refiners") or []
    return ", ".join(info["refiner_modalities"]) + (f" (+ dark-field {', '.join(dark)})" if dark else "")


def _m(n: float) -> str:
    return f"{n / 1e6:.2f} M"


def _pct(x: float) -> str:
    return f"{x * 100:+.1f} %"


def format_info(info: dict[str, Any]) -> str:
    p, f, f1024, paper = info["parameters"], info["flops"], info["flops_1024"], info["paper"]
    size = f["img_size"]
    own = "this model's input size" if size == info["img_size"] else "--img-size"
    lines = ["De-LightSAM model info"]
    if "note" in info:
        lines.append(f"  note:        {info['note']}")
    lines += [
        f"  checkpoint:  {info['checkpoint']}",
        f"  variant:     {info['variant']} (input {info['img_size']}x{info['img_size']})",
        f"  modalities:  {', '.join(info['modalities'])} ({len(info['modalities'])})",
        "  parameters:",
        f"    total          {_m(p['total']):>10}  ({p['total']:,})",
        f"    shared         {_m(p['shared']):>10}  ({p['shared']:,})",
        f"    per modality   {_m(p['per_modality']):>10}  ({p['per_modality']:,})",
        *([f"    refiners       {_m(p['refiners']):>10}  ({p['refiners']:,}) for {_refined(info)}"] if "refiners" in p else []),
        f"    active         {_m(p['active']):>10}  ({p['active']:,}) = shared + one modality"
        + (" (+ its refiner)" if "refiners" in p else "")
        + f"   paper {PAPER_PARAMS / 1e6:.2f} M ({_pct(paper['active_params_rel_diff'])})",
        "  compute (one image, one modality):",
        f"    at {size}x{size} ({own}): FLOPs {f['gflops']:.2f} G, MACs {f['gmacs']:.2f} G",
    ]
    for m, fr in info.get("flops_refined_modalities", {}).items():
        lines.append(f"    {m} (runs its refiner), at {size}x{size}: FLOPs {fr['gflops']:.2f} G, MACs {fr['gmacs']:.2f} G")
    if f1024["img_size"] != size:
        lines.append(
            f"    at {f1024['img_size']}x{f1024['img_size']} (the paper's size): FLOPs {f1024['gflops']:.2f} G, "
            f"MACs {f1024['gmacs']:.2f} G"
        )
    lines += [
        f'    paper          {PAPER_GFLOPS_AS_REPORTED:.2f} "GFLOPs" at 1024x1024 = MACs '
        f"(ours {_pct(paper['gmacs_rel_diff'])})",
        f"    by component at {size}x{size}: "
        + ", ".join(f"{k} {v:.2f}" for k, v in f["by_component_gflops"].items())
        + " GFLOPs",
        f"    counted with   {f['method']}",
    ]
    meta = {k: v for k, v in info["metadata"].items() if k not in ("format",)}
    if meta:
        lines.append("  metadata:")
        lines += [f"    {k}: {v}" for k, v in sorted(meta.items())]
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info",
        help="show a model's variant, modalities, parameter counts and FLOPs",
        description="Show variant, modalities, parameters (total/shared/per modality/active) and FLOPs "
        "measured with torch's FLOP counter at the model's own input size and at the paper's 1024², "
        "next to the paper's figures.",
    )
    p.add_argument(
        "--checkpoint",
        metavar="F",
        default=None,
        help="a .safetensors checkpoint, or 'untrained' (default: the bundled model; untrained if none is bundled)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        metavar="S",
        help="input size for the first FLOP count (default: the model's own; 1024² is always counted too)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    if args.img_size is not None and args.img_size <= 0:
        raise CommandError(f"--img-size must be positive, got {args.img_size}")
    info = gather_info(args.checkpoint, args.img_size)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(format_info(info))
    return 0
