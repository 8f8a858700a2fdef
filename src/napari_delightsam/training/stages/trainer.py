"""Segmentation training of De-LightSAM (paper §III-E (d)): one function for CLI, widget and DDP.

``train(config, out_dir, data_root=None, items=None, progress=None, stop_event=None)``

* data: a folder in the project layout and/or in-memory ``(image, mask, modality)`` items;
  seeded 8:1:1 split per dataset (``splits.json``), modality-balanced sampling, paired
  augmentation, resized RAM cache (``napari_delightsam.data``);
* model: ``DeLightSAM`` from a preset + overrides, initialised from nothing, LiteMedSAM's
  encoder or a checkpoint; parameter groups can be frozen or given their own learning-rate
  multiplier (``lr_scale``);
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

The epochs themselves run in ``loop.run_loop`` (shared with the MDKD stages); this module
prepares what it needs, one named step each: run folder, model, data, optimizer, resume, then
the loop and the result.

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
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ...config import ModelConfig
from ...data import (
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
from ...data.augment import policies_with
from ...data.splits import SPLIT_NAMES, Splits
from ...devices import autocast_context, autocast_dtype, resolve_device
from ...model import DeLightSAM, delightsam_loss
from ..config import RESUME_MUTABLE, TrainConfig
from ..errors import TrainingError
from ..evaluation.validation import gather_validation, summarise_validation, validate
from ..loop.batches import EpochBatches, cache_cap, relayed_warnings, steps_per_epoch
from ..loop.distributed import DistContext
from ..loop.optim import Optimisation, adam_exponential, apply_freeze, lr_groups
from ..loop.run import BestKeeper, EpochHooks, Loss, LossFn, Schedule, StopFlag, isolated_rng, run_loop
from ..loop.runfolder import (
    CURVES,
    LAST,
    LAST_STATE,
    METRICS,
    ProgressFn,
    RunLog,
    load_resumable,
    prepare_run_folder,
    require_resumable,
    save_resumable,
    write_json,
)
from ..model_setup import (
    build_model,
    inherited_calibration,
    inherits_trained_head,
    modality_head_trained,
    model_config_for,
    set_train_mode,
)

__all__ = [
    "BEST",
    "CURVES",
    "INIT",
    "LAST",
    "LAST_STATE",
    "METRICS",
    "RUN_FILE",
    "SPLITS_FILE",
    "TrainResult",
    "TrainingError",
    "benchmark_loader",
    "build_model",
    "check_resume_settings",
    "finish_run",
    "model_config_for",
    "summarise_validation",
    "train",
    "validate",
]

RUN_FILE = "run.json"
SPLITS_FILE = "splits.json"
BEST = "best.safetensors"
INIT = "init.safetensors"


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
    device = resolve_device(cfg.device)
    dist_ctx = DistContext.from_env(use_cuda=device.type == "cuda")
    if dist_ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_ctx.local_rank)
    if dist_ctx.enabled and stop_event is not None:
        warnings.warn(
            "stop_event is ignored under torchrun (stop all ranks with a signal)", UserWarning, stacklevel=2
        )
        stop_event = None
    log = RunLog(out / METRICS, progress, is_main=dist_ctx.is_main, curves=out / CURVES)
    try:
        with isolated_rng(device):
            return _train(
                cfg, out, data_root, items, log, stop_event, resume, show_progress, device, dist_ctx
            )
    finally:
        dist_ctx.close()


def _train(
    cfg: TrainConfig,
    out: Path,
    data_root: str | Path | None,
    items: Sequence[tuple[np.ndarray, np.ndarray, str]] | None,
    log: RunLog,
    stop_event: StopFlag | None,
    resume: bool,
    show_progress: bool,
    device: torch.device,
    dist_ctx: DistContext,
) -> TrainResult:
    """The run, one named step each: folder, model, data, optimizer, resume, epochs, result."""
    _prepare_run(out, cfg, resume, dist_ctx)
    model, init_report = _model_for_run(cfg, out, resume)  # seeded: every rank builds the same
    data = _build_data(cfg, out, data_root, items, model.config.modalities, resume, dist_ctx, log, device)
    freeze_bn = cfg.freeze_bn if cfg.freeze_bn is not None else cfg.init != "none"
    trainable, opt = _build_optimizer(model, cfg, device)
    start = _resume(out, model, opt, device, log) if resume else _Start()
    head_trained = bool(
        model.modality_head is not None and cfg.train_modality_head and "modality_head" not in cfg.freeze
    )
    if dist_ctx.is_main and not resume:
        _write_run_json(out, cfg, model, data, data_root, items, dist_ctx, init_report, freeze_bn, trainable)
    ddp_model = _wrap_ddp(model, device, dist_ctx)
    amp_dtype = autocast_dtype(device, cfg.amp, cpu=cfg.amp_cpu)
    _enable_cuda_speedups(device)
    log.emit(
        {
            "event": "start",
            "out_dir": str(out),
            "epochs": cfg.epochs,
            "start_epoch": start.epoch,
            "steps_per_epoch": data.steps,
            "n_train": len(data.train),
            "n_val": len(data.val),
            "device": str(device),
            "world_size": dist_ctx.world_size,
        }
    )
    val_indices = list(range(len(data.val)))[dist_ctx.rank :: dist_ctx.world_size]
    unseen_indices = list(range(len(data.unseen)))[dist_ctx.rank :: dist_ctx.world_size] if data.unseen else []

    def validate_now() -> dict[str, Any]:
        row = gather_validation(model, data.val, val_indices, device, cfg.batch_size, amp_dtype, dist_ctx)
        if data.unseen is not None:
            unseen = gather_validation(model, data.unseen, unseen_indices, device, cfg.batch_size, amp_dtype, dist_ctx)
            row.update({k.replace("val_", "unseen_", 1): v for k, v in unseen.items()})
        picked = [row.get("val_dice")] + ([row.get("unseen_dice")] if cfg.select_on == "val+unseen" else [])
        row["select_dice"] = float(np.mean(picked)) if None not in picked else None
        return row

    head_declared = modality_head_trained(
        model, cfg, init_report, stage0_frozen=bool({"backbone", "encoder"} & set(cfg.freeze))
    )
    files = _Checkpoints(out, model, opt, cfg, len(data.train), init_report, data.splits, head_declared)
    if not resume:
        _start_of_run(cfg, files, log, dist_ctx, validate_now)
    # "val": the in-domain Dice picks best (rows keep their best_val_dice); "val+unseen": the mean
    best_metric = "select_dice" if cfg.select_on == "val+unseen" else "val_dice"
    best = BestKeeper(best_metric, files.save_best, start.best_val, start.best_epoch)

    # step 6: the epochs (loop.py)
    outcome = run_loop(
        Schedule(
            epochs=cfg.epochs,
            steps_per_epoch=data.steps,
            start_epoch=start.epoch,
            grad_accum=cfg.grad_accum,
            seed=cfg.seed,
            val_every=cfg.val_every,
            log_every=cfg.log_every,
            samples_per_step=cfg.batch_size * cfg.grad_accum * dist_ctx.world_size,
            time_budget_s=cfg.time_budget_s,
        ),
        data.batches,
        _segmentation_loss(ddp_model, device, cfg, amp_dtype, head_trained),
        opt.optimizer,
        opt.scheduler,
        trainable,
        EpochHooks(
            train_mode=lambda: set_train_mode(ddp_model, freeze_bn),
            save_last=lambda epoch, step, row: files.save_last(epoch, step, row, best),
            validate=validate_now,
            best=best,
        ),
        log,
        dist=dist_ctx,
        ddp=ddp_model if dist_ctx.enabled else None,
        grad_clip=cfg.grad_clip,
        stop=stop_event,
        show_progress=show_progress,
        oom_message=lambda: _oom_message(out, device, cfg),
    )
    return finish_run(out, model, outcome.epochs_completed, outcome.stopped, best, log, data.skipped)


# -- step 1: the run folder ----------------------------------------------------------------------


def _prepare_run(out: Path, cfg: TrainConfig, resume: bool, dist_ctx: DistContext) -> None:
    """A new run needs an empty folder; a resumed one its ``run.json`` with compatible settings."""
    prepare_run_folder(out, resume, RUN_FILE, create=dist_ctx.is_main)
    dist_ctx.barrier()
    if resume:
        check_resume_settings(out, RUN_FILE, cfg)


def check_resume_settings(out: Path, descriptor: str, cfg: TrainConfig) -> None:
    """``TrainingError`` unless ``cfg`` differs from the run's stored ``train_config`` (in the JSON
    file ``descriptor``) only in settings a resumed run may change (``RESUME_MUTABLE``)."""
    stored = json.loads((out / descriptor).read_text(encoding="utf-8"))
    stored_cfg = TrainConfig.from_dict(stored["train_config"])
    diff = {k: v for k, v in stored_cfg.differences(cfg).items() if k not in RESUME_MUTABLE}
    if diff:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise TrainingError(f"cannot resume {out} with different settings ({listed})")


# -- step 2: the model ---------------------------------------------------------------------------


def _model_for_run(cfg: TrainConfig, out: Path, resume: bool) -> tuple[DeLightSAM, dict[str, Any]]:
    """A new run's initialised model, or (resume) the stored architecture, seeded (its weights are
    loaded from ``last`` by ``_resume``)."""
    if not resume:
        return build_model(cfg)
    run = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    model_cfg = ModelConfig.from_dict(run["model_config"])
    torch.manual_seed(cfg.seed)
    # what the run started from still decides whether a head it never trained is a trained one
    started = run.get("init") or {}
    return DeLightSAM(model_cfg), {
        "init": "resume",
        "source_modality_head_trained": started.get("source_modality_head_trained", ""),
        "source_calibration": started.get("source_calibration") or {},
    }


# -- step 3: the data ----------------------------------------------------------------------------


@dataclass
class _Data:
    splits: Splits
    train: SegmentationDataset
    val: SegmentationDataset
    #: the split's unseen-domain part (None when it has none)
    unseen: SegmentationDataset | None
    #: optimizer steps per epoch
    steps: int
    batches: EpochBatches
    skipped: list[str]


def _build_data(
    cfg: TrainConfig,
    out: Path,
    data_root: str | Path | None,
    items: Sequence[tuple[np.ndarray, np.ndarray, str]] | None,
    modalities: Sequence[str],
    resume: bool,
    dist_ctx: DistContext,
    log: RunLog,
    device: torch.device,
) -> _Data:
    """Records -> split -> train/val datasets (resized, cached) -> this rank's epoch batches."""
    with relayed_warnings(log):
        records = _collect_records(cfg, data_root, items, modalities)
        splits = _resolve_splits(records, cfg, out, resume, dist_ctx)
        train_recs = select(records, splits, "train", cfg.max_per_dataset)
        val_recs = select(records, splits, "val", cfg.val_max_per_dataset or cfg.max_per_dataset)
        unseen_recs = select(records, splits, "unseen", cfg.val_max_per_dataset or cfg.max_per_dataset)
        if not train_recs:
            raise TrainingError("the split left no training images")
        if cfg.select_on == "val+unseen" and not unseen_recs:
            raise TrainingError(
                "select_on 'val+unseen' needs a split with unseen-domain images "
                "(e.g. --splits benchmarks/protocol/splits-unseen-v1.json)"
            )
        mem_cap = cache_cap()
        train_ds = SegmentationDataset(
            train_recs,
            cfg.img_size,
            modalities,
            augment=cfg.augment,
            policies=policies_with(cfg.augment_overrides),
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
        unseen_ds = (
            SegmentationDataset(
                unseen_recs, cfg.img_size, modalities, augment=False, cache=cfg.cache, cache_max_bytes=mem_cap
            )
            if unseen_recs
            else None
        )
    steps = steps_per_epoch(
        len(train_ds), cfg.batch_size * cfg.grad_accum * dist_ctx.world_size, cfg.steps_per_epoch
    )
    batches = EpochBatches(
        train_ds,
        batch_size=cfg.batch_size,
        steps=steps,
        grad_accum=cfg.grad_accum,
        seed=cfg.seed,
        balanced=cfg.balanced,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        rank=dist_ctx.rank,
        world_size=dist_ctx.world_size,
    )
    skipped = train_ds.skipped + val_ds.skipped + (unseen_ds.skipped if unseen_ds is not None else [])
    return _Data(splits, train_ds, val_ds, unseen_ds, steps, batches, skipped)


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
        except (FileNotFoundError, ValueError) as exc:
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
    """The run's split: a given splits file (copied into the run), the run's own ``splits.json``
    (resume), or a new seeded split."""
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
            len(ids - {i for s in SPLIT_NAMES for i in splits.ids(k, s)})
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


# -- step 4: what trains, and the optimizer ---------------------------------------------------------


def _build_optimizer(
    model: DeLightSAM, cfg: TrainConfig, device: torch.device
) -> tuple[list[tuple[str, nn.Parameter]], Optimisation]:
    """Freeze groups, move the model to ``device`` (channels_last if set), Adam + decay with
    per-group learning rates (``cfg.lr_scale``)."""
    trainable = apply_freeze(model, cfg.freeze, cfg.train_modality_head)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # resume loads into these tensors, keeping the format
    groups = lr_groups(model, trainable, cfg.lr_scale)
    return trainable, adam_exponential(groups, cfg.lr, cfg.gamma, cfg.weight_decay)


# -- step 5: resume ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Start:
    """Where the loop starts: the first epoch to run and the best validation Dice so far."""

    epoch: int = 0
    best_val: float | None = None
    best_epoch: int | None = None


def _resume(out: Path, model: DeLightSAM, opt: Optimisation, device: torch.device, log: RunLog) -> _Start:
    """Weights from ``last``, optimizer/scheduler from ``last_state``, the history of finished
    epochs; where to continue."""
    from ...checkpoint import CheckpointError, load_checkpoint

    require_resumable(out)
    try:
        source = load_checkpoint(out / LAST)
    except CheckpointError as exc:
        raise TrainingError(f"cannot resume: {exc}") from exc
    model.load_state_dict(source.state_dict())
    model.to(device)
    info = load_resumable(
        out,
        opt.optimizer,
        opt.scheduler,
        opt.param_names,
        advice="restart from a copy of best.safetensors with --init",
    )
    start = _Start(int(info["epoch"]) + 1, info.get("best_val"), info.get("best_epoch"))
    log.resume_at(start.epoch)
    return start


# -- what the loop is given: run.json, DDP, checkpoints, the loss ----------------------------------


def _write_run_json(
    out: Path,
    cfg: TrainConfig,
    model: DeLightSAM,
    data: _Data,
    data_root: str | Path | None,
    items: Sequence[Any] | None,
    dist_ctx: DistContext,
    init_report: dict[str, Any],
    freeze_bn: bool,
    trainable: Sequence[tuple[str, nn.Parameter]],
) -> None:
    write_json(
        out / RUN_FILE,
        {
            "train_config": cfg.to_dict(),
            "model_config": model.config.to_dict(),
            "sampling_rule": SAMPLING_RULE,
            "split_rule": data.splits.group_rule,
            "split_seed": data.splits.seed,
            "data_root": str(Path(data_root).expanduser().resolve()) if data_root is not None else None,
            "n_items": len(items) if items is not None else 0,
            "datasets": _dataset_counts(data.train.records, data.val.records),
            "world_size": dist_ctx.world_size,
            "init": init_report,
            "freeze_bn": freeze_bn,
            "skipped": data.skipped,
            "parameters": model.parameter_counts(),
            "trainable_parameters": sum(p.numel() for _, p in trainable),
        },
    )


def _wrap_ddp(model: DeLightSAM, device: torch.device, dist_ctx: DistContext) -> nn.Module:
    if not dist_ctx.enabled:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,  # a batch of one modality leaves the others' controllers unused
    )


def _enable_cuda_speedups(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass
class _Checkpoints:
    """The model files of a segmentation run and their metadata (``checkpoint.save_checkpoint``):
    ``best`` by validation Dice, ``last`` + its optimizer state, ``init`` (the starting weights)."""

    out: Path
    model: DeLightSAM
    opt: Optimisation
    cfg: TrainConfig
    n_train: int
    init_report: dict[str, Any]
    splits: Splits
    head_trained: bool

    @property
    def meta(self) -> dict[str, str]:
        return {
            "modality_head_trained": "true" if self.head_trained else "false",
            "train_config": self.cfg.to_json(),
            "sampling_rule": SAMPLING_RULE,
            "split_seed": str(self.splits.seed),
            "init": json.dumps(self.init_report, default=str),
            **inherited_calibration(self.cfg, self.init_report, self.head_trained),
        }

    def _training(self, summary: dict[str, Any], epoch: int) -> str:
        """What the file's weights scored: ``summary`` holds the validation fields (or none)."""
        return json.dumps(
            {
                "epoch": epoch,
                "epochs": self.cfg.epochs,
                "img_size": self.cfg.img_size,
                "n_train": self.n_train,
                "val_dice": summary.get("val_dice"),
                "val_dice_per_modality": summary.get("val_dice_per_modality"),
                "unseen_dice": summary.get("unseen_dice"),
                "unseen_dice_per_modality": summary.get("unseen_dice_per_modality"),
                "select_dice": summary.get("select_dice"),
                "val_modality_accuracy": summary.get("val_modality_accuracy"),
            }
        )

    def save_best(self, summary: dict[str, Any], epoch: int) -> Path:
        return _save_model(
            self.out / BEST, self.model, {**self.meta, "training": self._training(summary, epoch)}
        )

    def save_last(self, epoch: int, global_step: int, row: dict[str, Any], best: BestKeeper) -> None:
        info = {"epoch": epoch, "best_val": best.value, "best_epoch": best.epoch, "global_step": global_step}
        meta = {**self.meta, "epoch": str(epoch), "training": self._training(row, epoch)}
        save_resumable(
            self.out,
            self.opt.optimizer,
            self.opt.scheduler,
            self.opt.param_names,
            info,
            lambda path, m: _save_model(path, self.model, m),
            meta,
        )

    def save_init(self) -> Path:
        meta = {
            "modality_head_trained": "true" if inherits_trained_head(self.init_report) else "false",
            "init": json.dumps(self.init_report, default=str),
            "split_seed": str(self.splits.seed),
        }
        return _save_model(self.out / INIT, self.model, meta)


def _start_of_run(
    cfg: TrainConfig,
    files: _Checkpoints,
    log: RunLog,
    dist_ctx: DistContext,
    validate_now: Callable[[], dict[str, Any]],
) -> None:
    """A new run's optional ``init.safetensors`` and its "initial" validation (the baseline)."""
    if cfg.save_init and dist_ctx.is_main:
        files.save_init()
    if cfg.val_at_start:
        row = {"type": "initial", "epoch": -1, "global_step": 0, **validate_now()}
        log.record(row)
        log.emit({"event": "initial", **{k: v for k, v in row.items() if k != "type"}})


def _forward_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    cfg: TrainConfig,
    amp_dtype: torch.dtype | None,
    head: bool,
):
    """Eq. 3/8 on one batch ``{"image" (B,3,S,S) 0..255, "mask" (B,1,S,S), "modality" (B,)}``:
    the network under autocast, the loss terms in fp32."""
    images = normalise(batch["image"].to(device, non_blocking=True))
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = batch["mask"].to(device, non_blocking=True).float()
    modality = batch["modality"].to(device, non_blocking=True)
    with autocast_context(device, amp_dtype):
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


def _segmentation_loss(
    model: nn.Module, device: torch.device, cfg: TrainConfig, amp_dtype: torch.dtype | None, head: bool
) -> LossFn:
    """The loop's loss: the total, and the soft Dice (1 − Dice loss) logged as ``dice``."""

    def loss(batch: dict[str, torch.Tensor]) -> Loss:
        terms = _forward_loss(model, batch, device, cfg, amp_dtype, head)
        return Loss(terms.total, {"dice": 1.0 - float(terms.dice.detach())})

    return loss


def _save_model(path: Path, model: DeLightSAM, meta: dict[str, str]) -> Path:
    from ...checkpoint import save_checkpoint

    return save_checkpoint(path, model, meta)


def _oom_message(out: Path, device: torch.device, cfg: TrainConfig) -> str:
    kept = f"; best checkpoint kept at {out / BEST}" if (out / BEST).is_file() else ""
    return (
        f"out of memory on {device} at batch size {cfg.batch_size}, image size {cfg.img_size}: "
        f"reduce --batch-size (use grad_accum to keep the effective batch) or --img-size{kept}"
    )


def _dataset_counts(train: Sequence[SampleRecord], val: Sequence[SampleRecord]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, recs in (("train", train), ("val", val)):
        for r in recs:
            out.setdefault(r.key, {"train": 0, "val": 0})[name] += 1
    return out


# -- step 7: the result ------------------------------------------------------------------------------


def finish_run(
    out: Path,
    model: DeLightSAM,
    epochs_completed: int,
    stopped: bool,
    best: BestKeeper,
    log: RunLog,
    skipped: list[str],
) -> TrainResult:
    """The run's ``TrainResult`` (best/last files, best validation, history) and its ``end`` event."""
    result = TrainResult(
        out_dir=out,
        best_checkpoint=(out / BEST) if (out / BEST).is_file() else None,
        last_checkpoint=(out / LAST) if (out / LAST).is_file() else None,
        best_val_dice=best.value,
        best_epoch=best.epoch,
        epochs_completed=epochs_completed,
        stopped=stopped,
        history=log.history,
        skipped=skipped,
        model=model.eval(),
    )
    log.emit(
        {
            "event": "end",
            "status": "stopped" if stopped else "finished",
            "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
            "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
            "best_val_dice": best.value,
            "best_epoch": best.epoch,
            "epochs_completed": epochs_completed,
        }
    )
    return result


# -- the data pipeline alone ---------------------------------------------------------------------------


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
            recs, cfg.img_size, modalities, augment=cfg.augment, cache=cfg.cache, cache_max_bytes=cache_cap()
        )
    prep_s = time.perf_counter() - t0
    sampler = BalancedSampler(
        ds.records,
        samples_per_rank=max(1, max_batches + 2) * cfg.batch_size,
        seed=cfg.seed,
        balanced=cfg.balanced,
    )
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers)
    from ...data import measure_loader

    stats = measure_loader(loader, max_batches=max_batches)
    return {
        "n_images": float(len(ds)),
        "cache_seconds": prep_s if cfg.cache else 0.0,
        "cache_images_per_s": len(ds) / prep_s if (cfg.cache and prep_s > 0) else float("nan"),
        **stats,
    }
