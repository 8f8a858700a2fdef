"""Segmentation training of De-LightSAM (paper §III-E (d)): one function for CLI, widget and DDP.

``train(config, out_dir, data_root=None, items=None, progress=None, stop_event=None)``

* data: a folder in the project layout and/or in-memory ``(image, mask, modality)`` items;
  seeded 8:1:1 split per dataset (``splits.json``), modality-balanced sampling, paired
  augmentation, resized RAM cache (``napari_delightsam.data``);
* model: ``DeLightSAM`` from a preset + overrides, initialised from nothing, LiteMedSAM's
  encoder or a checkpoint; parameter groups can be frozen;
* optimisation: Adam, ``ExponentialLR`` stepped once per epoch, gradient accumulation, bf16
  autocast on CUDA; loss = focal + Dice + 0.7·patch BCE (+ modality CE for the "auto" head);
* every epoch (rank 0): ``last.safetensors`` + ``last_state.safetensors`` (optimizer and
  scheduler, no pickle), ``best.safetensors`` by mean validation Dice (mean over modalities of
  the per-modality mean), ``metrics.jsonl`` and ``curves.png``;
* ``resume=True`` continues from ``last`` with the same sample stream and learning-rate
  schedule, so 1 epoch + resume 1 epoch gives the weights of 2 epochs straight;
* torchrun: DDP with one shard of the same seeded stream per rank, rank-0 writes;
* ``stop_event.is_set()`` ends the run cleanly (validates the current weights and keeps the best
  checkpoint); out of memory raises ``TrainingError`` with advice, keeping the best checkpoint.

Progress events (``progress(dict)``, rank 0 only; ``delightsam train --progress-jsonl`` prints
them): ``warning`` {message}; ``start`` {out_dir, epochs, start_epoch, steps_per_epoch, n_train,
n_val, device, world_size}; ``initial`` {val_dice, val_dice_per_modality, ...} (the starting
weights); ``step`` {epoch, step, steps, global_step, loss, dice, lr, sec_per_step}; ``epoch``
{epoch, train_loss, val_dice, val_dice_per_modality, val_modality_accuracy, best_val_dice,
improved, ...}; ``end`` {status: finished|stopped, best_checkpoint, last_checkpoint,
best_val_dice, best_epoch, epochs_completed}.

Run folder::

    run.json  splits.json  last.safetensors  last_state.safetensors  best.safetensors
    metrics.jsonl  curves.png
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import ModelConfig, tiny_config
from ..data import (
    SAMPLING_RULE,
    BalancedSampler,
    SampleRecord,
    SegmentationDataset,
    discover,
    load_splits,
    make_splits,
    normalise,
    records_from_items,
    save_splits,
    select,
)
from ..data.splits import Splits
from ..io_utils import atomic_write
from ..model import DeLightSAM, delightsam_loss
from .config import RESUME_MUTABLE, TrainConfig
from .distributed import DistContext
from .state import load_training_state, save_training_state

__all__ = ["TrainResult", "TrainingError", "benchmark_loader", "build_model", "train"]

RUN_FILE = "run.json"
SPLITS_FILE = "splits.json"
LAST = "last.safetensors"
LAST_STATE = "last_state.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
INIT = "init.safetensors"

ProgressFn = Callable[[dict[str, Any]], None]


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


class TrainingError(RuntimeError):
    """An expected training failure (bad run folder, out of memory, nothing to train...)."""


@dataclass
class TrainResult:
    out_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    best_val_dice: float | None
    best_epoch: int | None
    epochs_completed: int
    stopped: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: the trained network in memory (final weights, eval mode, on the training device)
    model: DeLightSAM | None = field(default=None, repr=False)


# -- model -------------------------------------------------------------------------------------


def model_config_for(cfg: TrainConfig) -> ModelConfig:
    base = tiny_config() if cfg.model_preset == "tiny" else ModelConfig()
    changes = dict(cfg.model)
    changes["img_size"] = cfg.img_size
    try:
        return ModelConfig.from_dict({**base.to_dict(), **changes})
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"invalid model settings: {exc}") from exc


def build_model(cfg: TrainConfig) -> tuple[DeLightSAM, dict[str, Any]]:
    """A seeded ``DeLightSAM`` for ``cfg`` with its initialisation applied; returns a report."""
    init = cfg.init
    torch.manual_seed(cfg.seed)
    if init not in ("none", "litemedsam"):
        from ..checkpoint import CheckpointError, load_checkpoint, read_checkpoint_info

        path = Path(init).expanduser()
        try:
            stored_cfg, meta = read_checkpoint_info(path)
            source = load_checkpoint(path)
        except CheckpointError as exc:
            raise TrainingError(f"--init: {exc}") from exc
        changes = dict(cfg.model)
        changes["img_size"] = cfg.img_size
        try:
            model_cfg = stored_cfg.replace(**changes)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"invalid model settings for {path.name}: {exc}") from exc
        model = DeLightSAM(model_cfg)
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
        if unexpected or [k for k in missing if "attention_bias_idxs" not in k]:
            raise TrainingError(
                f"--init {path.name}: model settings {sorted(cfg.model)} change the architecture "
                f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
            )
        return model, {
            "init": "checkpoint",
            "path": str(path),
            "source_modality_head_trained": meta.get("modality_head_trained", ""),
        }
    model = DeLightSAM(model_config_for(cfg))
    if init == "litemedsam":
        try:
            from ..litemedsam import init_encoder_from_litemedsam
        except ImportError as exc:
            raise TrainingError(f"--init litemedsam needs the LiteMedSAM interop ({exc})") from exc
        try:
            report = init_encoder_from_litemedsam(model)
        except (ImportError, FileNotFoundError) as exc:
            raise TrainingError(
                f"--init litemedsam: {exc} (install the extra: pip install 'napari-delightsam[litemedsam]')"
            ) from exc
        return model, {"init": "litemedsam", **{k: _jsonable(v) for k, v in dict(report).items()}}
    return model, {"init": "none"}


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)


def _param_groups(model: DeLightSAM) -> dict[str, list[tuple[str, nn.Parameter]]]:
    controller_ids = {id(p) for p in model.encoder.controller_parameters()}
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {
        "backbone": [],
        "controllers": [],
        "prompt_generator": [],
        "decoder": [],
        "modality_head": [],
    }
    for name, p in model.named_parameters():
        if name.startswith("encoder."):
            groups["controllers" if id(p) in controller_ids else "backbone"].append((name, p))
        elif name.startswith("prompt_generator."):
            groups["prompt_generator"].append((name, p))
        elif name.startswith("decoder."):
            groups["decoder"].append((name, p))
        elif name.startswith("modality_head."):
            groups["modality_head"].append((name, p))
        else:  # pragma: no cover - a new top-level part: train it
            groups["backbone"].append((name, p))
    return groups


def _apply_freeze(model: DeLightSAM, cfg: TrainConfig) -> list[tuple[str, nn.Parameter]]:
    """Set requires_grad per ``cfg.freeze``; return the trainable (name, param) in model order."""
    frozen = set(cfg.freeze)
    if "encoder" in frozen:
        frozen |= {"backbone", "controllers"}
    if not cfg.train_modality_head:
        frozen.add("modality_head")
    groups = _param_groups(model)
    for gname, params in groups.items():
        for _, p in params:
            p.requires_grad_(gname not in frozen)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("every parameter group is frozen: nothing to train")
    return trainable


def _set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# -- run folder ----------------------------------------------------------------------------------


def _prepare_out_dir(out: Path, resume: bool, is_main: bool) -> None:
    if resume:
        if not (out / RUN_FILE).is_file():
            raise TrainingError(f"cannot resume: {out} holds no {RUN_FILE} (not a training run folder)")
        return
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise TrainingError(
            f"output folder {out} is not empty; choose a new folder, or pass resume=True (--resume) to continue it"
        )
    if is_main:
        out.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return rows


def _write_metrics(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# -- data ------------------------------------------------------------------------------------------


def _collect_records(
    cfg: TrainConfig,
    data_root: str | Path | None,
    items: Sequence[tuple[np.ndarray, np.ndarray, str]] | None,
    modalities: Sequence[str],
) -> list[SampleRecord]:
    records: list[SampleRecord] = []
    if data_root is not None:
        try:
            records += discover(data_root, cfg.modalities, known_modalities=modalities)
        except FileNotFoundError as exc:
            raise TrainingError(str(exc)) from exc
        except ValueError as exc:
            raise TrainingError(str(exc)) from exc
    if items is not None and len(items) > 0:
        try:
            item_records = records_from_items(items, known_modalities=modalities)
        except ValueError as exc:
            raise TrainingError(str(exc)) from exc
        if cfg.modalities is not None:
            item_records = [r for r in item_records if r.modality in cfg.modalities]
        records += item_records
    if not records:
        raise TrainingError("no training data: pass a data folder (--data) and/or in-memory items")
    return records


def _resolve_splits(
    records: Sequence[SampleRecord], cfg: TrainConfig, out: Path, resume: bool, dist_ctx: DistContext
) -> Splits:
    path = out / SPLITS_FILE
    if not resume and cfg.splits_file and not path.is_file():
        try:
            given = load_splits(cfg.splits_file)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TrainingError(f"splits file {cfg.splits_file}: {exc}") from exc
        if dist_ctx.is_main:
            save_splits(path, given)  # the run folder keeps its own copy (resume, evaluate)
        return given
    if resume or path.is_file():
        splits = load_splits(path)
        known = {r.key: set() for r in records}
        for r in records:
            known[r.key].add(r.sample_id)
        new = sum(
            len(ids - {i for s in ("train", "val", "test") for i in splits.ids(k, s)})
            for k, ids in known.items()
        )
        if new:
            warnings.warn(
                f"{new} sample(s) not in {path} are left out of this resumed run", UserWarning, stacklevel=3
            )
        return splits
    splits = make_splits(records, seed=cfg.seed, ratios=cfg.split_ratios)
    if dist_ctx.is_main:
        save_splits(path, splits)
    return splits


def _device(cfg: TrainConfig) -> torch.device:
    from ..devices import resolve_device

    return resolve_device(cfg.device)


# -- validation --------------------------------------------------------------------------------


@torch.no_grad()
def validate(
    model: DeLightSAM,
    dataset: SegmentationDataset,
    indices: Sequence[int],
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None,
) -> list[dict[str, Any]]:
    """Per-sample Dice at the training size (threshold 0.5) and modality-head correctness."""
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        batch = [dataset[i] for i in chunk]
        images = torch.stack([b["image"] for b in batch]).to(device)
        masks = torch.stack([b["mask"] for b in batch]).to(device).float()
        modality = torch.stack([b["modality"] for b in batch]).to(device)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with ctx:
            out = model(normalise(images), modality)
        logits = torch.nn.functional.interpolate(
            out.mask_logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False
        )
        pred = logits > 0
        gt = masks > 0.5
        inter = (pred & gt).flatten(1).sum(1).float()
        total = pred.flatten(1).sum(1).float() + gt.flatten(1).sum(1).float()
        dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
        head_ok = (
            (out.modality_logits.argmax(1) == modality).tolist()
            if out.modality_logits is not None
            else [None] * len(chunk)
        )
        for j, i in enumerate(chunk):
            rec = dataset.records[i]
            rows.append(
                {
                    "key": rec.key,
                    "modality": rec.modality,
                    "id": rec.sample_id,
                    "dice": float(dice[j]),
                    "head_ok": head_ok[j],
                }
            )
    if was_training:
        model.train()
    return rows


def summarise_validation(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean Dice per modality (over its images), their mean, and modality-head accuracy."""
    per_mod: dict[str, list[float]] = {}
    head: dict[str, list[bool]] = {}
    for r in rows:
        per_mod.setdefault(r["modality"], []).append(r["dice"])
        if r["head_ok"] is not None:
            head.setdefault(r["modality"], []).append(bool(r["head_ok"]))
    dice_mod = {m: float(np.mean(v)) for m, v in sorted(per_mod.items())}
    acc_mod = {m: float(np.mean(v)) for m, v in sorted(head.items())}
    return {
        "val_dice": float(np.mean(list(dice_mod.values()))) if dice_mod else None,
        "val_dice_per_modality": dice_mod,
        "val_modality_accuracy": float(np.mean([a for v in head.values() for a in v])) if head else None,
        "val_modality_accuracy_per_modality": acc_mod,
        "n_val": len(rows),
    }


# -- the training function -------------------------------------------------------------------------


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def train(
    train_config: TrainConfig,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    items: Sequence[tuple[np.ndarray, np.ndarray, str]] | None = None,
    progress: ProgressFn | None = None,
    stop_event: StopFlag | None = None,
    *,
    resume: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Train (or resume) a De-LightSAM run in ``out_dir``; see the module docstring."""
    cfg = train_config
    cfg.validate()
    out = Path(out_dir).expanduser()
    device = _device(cfg)
    dist_ctx = DistContext.from_env(use_cuda=device.type == "cuda")
    if dist_ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_ctx.local_rank)

    def emit(event: dict[str, Any]) -> None:
        if progress is not None and dist_ctx.is_main:
            progress(event)

    if dist_ctx.enabled and stop_event is not None:
        warnings.warn(
            "stop_event is ignored under torchrun (stop all ranks with a signal)", UserWarning, stacklevel=2
        )
        stop_event = None
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        # the run seeds torch's RNG; fork it so the caller's (e.g. napari's) state is untouched
        with torch.random.fork_rng(devices=rng_devices):
            return _train(
                cfg, out, data_root, items, emit, stop_event, resume, show_progress, device, dist_ctx
            )
    finally:
        dist_ctx.close()


def _train(
    cfg: TrainConfig,
    out: Path,
    data_root: str | Path | None,
    items: Sequence[tuple[np.ndarray, np.ndarray, str]] | None,
    emit: ProgressFn,
    stop_event: StopFlag | None,
    resume: bool,
    show_progress: bool,
    device: torch.device,
    dist_ctx: DistContext,
) -> TrainResult:
    _prepare_out_dir(out, resume, dist_ctx.is_main)
    dist_ctx.barrier()
    if resume:
        stored = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        stored_cfg = TrainConfig.from_dict(stored["train_config"])
        diff = {k: v for k, v in stored_cfg.differences(cfg).items() if k not in RESUME_MUTABLE}
        if diff:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise TrainingError(f"cannot resume {out} with different settings ({listed})")

    # model (seeded: every rank builds identical weights)
    if resume:
        model_cfg = ModelConfig.from_dict(
            json.loads((out / RUN_FILE).read_text(encoding="utf-8"))["model_config"]
        )
        torch.manual_seed(cfg.seed)
        model = DeLightSAM(model_cfg)
        init_report: dict[str, Any] = {"init": "resume"}
    else:
        model, init_report = build_model(cfg)
    model_cfg = model.config
    modalities = model_cfg.modalities

    # data
    data_notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = _collect_records(cfg, data_root, items, modalities)
        splits = _resolve_splits(records, cfg, out, resume, dist_ctx)
        train_recs = select(records, splits, "train", cfg.max_per_dataset)
        val_recs = select(records, splits, "val", cfg.val_max_per_dataset or cfg.max_per_dataset)
        if not train_recs:
            raise TrainingError("the split left no training images")
        mem_cap = _cache_cap()
        train_ds = SegmentationDataset(
            train_recs,
            cfg.img_size,
            modalities,
            augment=cfg.augment,
            cache=cfg.cache,
            cache_max_bytes=mem_cap,
        )
        val_ds = SegmentationDataset(
            val_recs or train_recs,
            cfg.img_size,
            modalities,
            augment=False,
            cache=cfg.cache,
            cache_max_bytes=mem_cap,
        )
    for w in caught:
        if issubclass(w.category, UserWarning):
            data_notes.append(str(w.message))
            if dist_ctx.is_main:
                warnings.warn(str(w.message), w.category, stacklevel=2)
                emit({"event": "warning", "message": str(w.message)})
    skipped = train_ds.skipped + val_ds.skipped

    world = dist_ctx.world_size
    per_step = cfg.batch_size * cfg.grad_accum * world
    steps = cfg.steps_per_epoch or max(1, math.ceil(len(train_ds) / per_step))
    sampler = BalancedSampler(
        train_ds.records,
        samples_per_rank=steps * cfg.batch_size * cfg.grad_accum,
        seed=cfg.seed,
        rank=dist_ctx.rank,
        world_size=world,
        balanced=cfg.balanced,
    )
    loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        drop_last=False,
    )

    # optimisation
    freeze_bn = cfg.freeze_bn if cfg.freeze_bn is not None else cfg.init != "none"
    trainable = _apply_freeze(model, cfg)
    param_names = [n for n, _ in trainable]
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # resume loads into these tensors, keeping the format
    optimizer = torch.optim.Adam([p for _, p in trainable], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.gamma)
    start_epoch = 0
    best_val: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = []
    if resume:
        start_epoch, best_val, best_epoch = _load_resume(
            out, model, optimizer, scheduler, param_names, device
        )
        history = [r for r in _read_metrics(out / METRICS) if int(r.get("epoch", 0)) < start_epoch]
        if dist_ctx.is_main:
            _write_metrics(out / METRICS, history)  # drop lines of an epoch that did not finish
    head_trained = bool(
        model.modality_head is not None and cfg.train_modality_head and "modality_head" not in cfg.freeze
    )

    if dist_ctx.is_main and not resume:
        _write_json(
            out / RUN_FILE,
            {
                "train_config": cfg.to_dict(),
                "model_config": model_cfg.to_dict(),
                "sampling_rule": SAMPLING_RULE,
                "split_rule": splits.group_rule,
                "split_seed": splits.seed,
                "data_root": str(Path(data_root).expanduser().resolve()) if data_root is not None else None,
                "n_items": len(items) if items is not None else 0,
                "datasets": _dataset_counts(train_ds.records, val_ds.records),
                "world_size": world,
                "init": init_report,
                "freeze_bn": freeze_bn,
                "skipped": skipped,
                "parameters": model.parameter_counts(),
                "trainable_parameters": sum(p.numel() for _, p in trainable),
            },
        )

    ddp_model: nn.Module = model
    if dist_ctx.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    amp_dtype = (
        torch.bfloat16
        if cfg.amp and (device.type == "cuda" or (device.type == "cpu" and cfg.amp_cpu))
        else None
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    emit(
        {
            "event": "start",
            "out_dir": str(out),
            "epochs": cfg.epochs,
            "start_epoch": start_epoch,
            "steps_per_epoch": steps,
            "n_train": len(train_ds),
            "n_val": len(val_ds),
            "device": str(device),
            "world_size": world,
        }
    )
    val_indices = list(range(len(val_ds)))[dist_ctx.rank :: world]
    if not resume and cfg.save_init and dist_ctx.is_main:
        from ..checkpoint import save_checkpoint

        save_checkpoint(
            out / INIT,
            model,
            {
                "modality_head_trained": "false",
                "init": json.dumps(init_report, default=str),
                "split_seed": str(splits.seed),
            },
        )
    if not resume and cfg.val_at_start:
        summary0 = _gather_validation(model, val_ds, val_indices, device, cfg, amp_dtype, dist_ctx)
        row0 = {"type": "initial", "epoch": -1, "global_step": 0, **summary0}
        if dist_ctx.is_main:
            _append_metrics(out / METRICS, row0)
            history.append(row0)
        emit({"event": "initial", **{k: v for k, v in row0.items() if k != "type"}})
    stopped = False
    global_step = start_epoch * steps
    epoch = start_epoch
    meta_base = {
        "modality_head_trained": "true" if head_trained else "false",
        "train_config": cfg.to_json(),
        "sampling_rule": SAMPLING_RULE,
        "split_seed": str(splits.seed),
        "init": json.dumps(init_report, default=str),
    }

    def save_best(summary: dict[str, Any], ep: int) -> Path:
        from ..checkpoint import save_checkpoint

        return save_checkpoint(
            out / BEST,
            model,
            {**meta_base, "training": json.dumps(_train_info(summary, ep, cfg, len(train_ds)))},
        )

    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            torch.manual_seed(cfg.seed * 100003 + epoch)  # any in-model randomness: same on resume
            _set_train_mode(ddp_model, freeze_bn)
            t_epoch = time.perf_counter()
            losses: list[float] = []
            bar = _progress_bar(steps, epoch, cfg.epochs, show_progress and dist_ctx.is_main)
            batches = iter(loader)
            for step in range(steps):
                if stop_event is not None and stop_event.is_set():
                    stopped = True
                    break
                t_step = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                terms_sum = {"loss": 0.0, "dice": 0.0}
                for micro in range(cfg.grad_accum):
                    batch = next(batches)
                    sync = micro == cfg.grad_accum - 1
                    ctx = ddp_model.no_sync() if (dist_ctx.enabled and not sync) else nullcontext()
                    with ctx:
                        terms = _forward_loss(ddp_model, batch, device, cfg, amp_dtype, head_trained)
                        (terms.total / cfg.grad_accum).backward()
                    terms_sum["loss"] += float(terms.total.detach()) / cfg.grad_accum
                    terms_sum["dice"] += (1.0 - float(terms.dice.detach())) / cfg.grad_accum
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for _, p in trainable], cfg.grad_clip)
                optimizer.step()
                global_step += 1
                losses.append(terms_sum["loss"])
                step_s = time.perf_counter() - t_step
                if bar is not None:
                    bar.set_postfix(loss=f"{terms_sum['loss']:.4f}", dice=f"{terms_sum['dice']:.3f}")
                    bar.update(1)
                event = {
                    "event": "step",
                    "epoch": epoch,
                    "step": step + 1,
                    "steps": steps,
                    "global_step": global_step,
                    "loss": terms_sum["loss"],
                    "dice": terms_sum["dice"],
                    "lr": optimizer.param_groups[0]["lr"],
                    "sec_per_step": step_s,
                }
                emit(event)
                if dist_ctx.is_main and cfg.log_every and global_step % cfg.log_every == 0:
                    _append_metrics(
                        out / METRICS, {"type": "step", **{k: v for k, v in event.items() if k != "event"}}
                    )
                    history.append({"type": "step", **{k: v for k, v in event.items() if k != "event"}})
            if bar is not None:
                bar.close()
            train_s = time.perf_counter() - t_epoch
            dist_ctx.sync_buffers(model)
            if stopped:
                # validate what we have; keep it only if it beats the best (``last`` stays at the
                # last finished epoch so --resume keeps its exact schedule)
                summary = _gather_validation(model, val_ds, val_indices, device, cfg, amp_dtype, dist_ctx)
                if (
                    dist_ctx.is_main
                    and summary["val_dice"] is not None
                    and (best_val is None or summary["val_dice"] > best_val)
                ):
                    best_val, best_epoch = summary["val_dice"], epoch
                    save_best(summary, epoch)
                break
            scheduler.step()
            summary: dict[str, Any] = {}
            if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                summary = _gather_validation(model, val_ds, val_indices, device, cfg, amp_dtype, dist_ctx)
            epoch_s = time.perf_counter() - t_epoch
            row = {
                "type": "epoch",
                "epoch": epoch,
                "global_step": global_step,
                "train_loss": float(np.mean(losses)) if losses else None,
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_seconds": epoch_s,
                "train_seconds": train_s,
                "images_per_s": steps * per_step / train_s if train_s > 0 else None,
                **summary,
            }
            improved = summary.get("val_dice") is not None and (
                best_val is None or summary["val_dice"] > best_val
            )
            if improved:
                best_val, best_epoch = summary["val_dice"], epoch
            row["best_val_dice"] = best_val
            if dist_ctx.is_main:
                from ..checkpoint import save_checkpoint

                if improved:
                    save_best(summary, epoch)
                info = {
                    "epoch": epoch,
                    "best_val": best_val,
                    "best_epoch": best_epoch,
                    "global_step": global_step,
                }
                save_training_state(out / LAST_STATE, optimizer, scheduler, param_names, info)
                save_checkpoint(
                    out / LAST,
                    model,
                    {
                        **meta_base,
                        "epoch": str(epoch),
                        "training": json.dumps(_train_info(summary, epoch, cfg, len(train_ds))),
                    },
                )
                _append_metrics(out / METRICS, row)
                history.append(row)
                _try_plot(history, out / CURVES)
            dist_ctx.barrier()
            emit({"event": "epoch", **{k: v for k, v in row.items() if k != "type"}, "improved": improved})
        else:
            epoch = cfg.epochs
    except Exception as exc:
        if _is_oom(exc):
            if device.type == "cuda":
                torch.cuda.empty_cache()
            kept = f"; best checkpoint kept at {out / BEST}" if (out / BEST).is_file() else ""
            raise TrainingError(
                f"out of memory on {device} at batch size {cfg.batch_size}, image size {cfg.img_size}: "
                f"reduce --batch-size (use grad_accum to keep the effective batch) or --img-size{kept}"
            ) from exc
        raise
    dist_ctx.barrier()
    completed = epoch  # epochs fully finished = index of the epoch that was running (or cfg.epochs)
    result = TrainResult(
        out_dir=out,
        best_checkpoint=(out / BEST) if (out / BEST).is_file() else None,
        last_checkpoint=(out / LAST) if (out / LAST).is_file() else None,
        best_val_dice=best_val,
        best_epoch=best_epoch,
        epochs_completed=completed,
        stopped=stopped,
        history=history,
        skipped=skipped,
        model=model.eval(),
    )
    emit(
        {
            "event": "end",
            "status": "stopped" if stopped else "finished",
            "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
            "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
            "best_val_dice": best_val,
            "best_epoch": best_epoch,
            "epochs_completed": completed,
        }
    )
    return result


def _cache_cap() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.5)
    except Exception:  # pragma: no cover - psutil missing
        return None


def _dataset_counts(train: Sequence[SampleRecord], val: Sequence[SampleRecord]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, recs in (("train", train), ("val", val)):
        for r in recs:
            out.setdefault(r.key, {"train": 0, "val": 0})[name] += 1
    return out


def _train_info(summary: dict[str, Any], epoch: int, cfg: TrainConfig, n_train: int) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "epochs": cfg.epochs,
        "img_size": cfg.img_size,
        "n_train": n_train,
        "val_dice": summary.get("val_dice"),
        "val_dice_per_modality": summary.get("val_dice_per_modality"),
        "val_modality_accuracy": summary.get("val_modality_accuracy"),
    }


def _forward_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    cfg: TrainConfig,
    amp_dtype: torch.dtype | None,
    head: bool,
):
    images = normalise(batch["image"].to(device, non_blocking=True))
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = batch["mask"].to(device, non_blocking=True).float()
    modality = batch["modality"].to(device, non_blocking=True)
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with ctx:
        out = model(images, modality)
    return delightsam_loss(
        out.mask_logits,
        out.patch_logits,
        masks,
        patch_weight=cfg.patch_weight,
        modality_logits=out.modality_logits if head else None,
        modality_target=modality if head else None,
        modality_weight=cfg.modality_weight,
    )


def _gather_validation(
    model: DeLightSAM,
    val_ds: SegmentationDataset,
    indices: Sequence[int],
    device: torch.device,
    cfg: TrainConfig,
    amp_dtype: torch.dtype | None,
    dist_ctx: DistContext,
) -> dict[str, Any]:
    rows = validate(model, val_ds, indices, device, cfg.batch_size, amp_dtype)
    all_rows = [r for part in dist_ctx.all_gather_objects(rows) for r in part]
    return summarise_validation(all_rows)


def _load_resume(
    out: Path,
    model: DeLightSAM,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    param_names: list[str],
    device: torch.device,
) -> tuple[int, float | None, int | None]:
    from ..checkpoint import CheckpointError, load_checkpoint, read_checkpoint_info

    last, state = out / LAST, out / LAST_STATE
    if not last.is_file() or not state.is_file():
        raise TrainingError(f"cannot resume {out}: no finished epoch yet ({LAST} / {LAST_STATE} missing)")
    try:
        _, meta = read_checkpoint_info(last)
        source = load_checkpoint(last)
    except CheckpointError as exc:
        raise TrainingError(f"cannot resume: {exc}") from exc
    model.load_state_dict(source.state_dict())
    model.to(device)
    info = load_training_state(state, optimizer, scheduler, param_names)
    if str(info.get("epoch")) != meta.get("epoch"):
        raise TrainingError(
            f"cannot resume {out}: {LAST} (epoch {meta.get('epoch')}) and {LAST_STATE} (epoch {info.get('epoch')}) "
            "disagree (interrupted while saving); restart from a copy of best.safetensors with --init"
        )
    return int(info["epoch"]) + 1, info.get("best_val"), info.get("best_epoch")


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")


def _try_plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    from .plot import plot_curves

    try:
        plot_curves(rows, path)
    except Exception as exc:  # a plot must never stop a training run
        warnings.warn(f"could not draw {path.name}: {exc}", UserWarning, stacklevel=2)


def _progress_bar(steps: int, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


def benchmark_loader(cfg: TrainConfig, data_root: str | Path, max_batches: int = 50) -> dict[str, float]:
    """Throughput of the training data pipeline alone (no model): decode/resize/cache pass
    time, then samples/s of the DataLoader (augmentation + collation, ``cfg.num_workers``)."""
    modalities = model_config_for(cfg).modalities
    records = _collect_records(cfg, data_root, None, modalities)
    splits = make_splits(records, seed=cfg.seed, ratios=cfg.split_ratios)
    recs = select(records, splits, "train", cfg.max_per_dataset)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = SegmentationDataset(
            recs, cfg.img_size, modalities, augment=cfg.augment, cache=cfg.cache, cache_max_bytes=_cache_cap()
        )
    prep_s = time.perf_counter() - t0
    sampler = BalancedSampler(
        ds.records,
        samples_per_rank=max(1, max_batches + 2) * cfg.batch_size,
        seed=cfg.seed,
        balanced=cfg.balanced,
    )
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers)
    from ..data import measure_loader

    stats = measure_loader(loader, max_batches=max_batches)
    return {
        "n_images": float(len(ds)),
        "cache_seconds": prep_s if cfg.cache else 0.0,
        "cache_images_per_s": len(ds) / prep_s if (cfg.cache and prep_s > 0) else float("nan"),
        **stats,
    }
