"""The one training loop: segmentation training, the three MDKD stages and the fine-tune child.

``run_loop(schedule, batches, loss_fn, optimizer, scheduler, trainable, hooks, log, ...)``

The loop does not know what a batch holds, which network trains or what validation measures:

* ``batches(epoch)``: an iterator over that epoch's micro-batches (``steps × grad_accum`` of
  them) — images, cached embeddings, anything ``loss_fn`` understands;
* ``loss_fn(batch) -> Loss``: the scalar to backpropagate and named floats to log. Callers
  compose it; an extra term is ``loss.plus("l2sp", term, weight)``;
* ``trainable``: the parameters gradient clipping measures; the optimizer holds the same ones,
  grouped as the caller likes (e.g. per-group learning rates);
* ``hooks``: train mode, validation (a dict of row fields), the best and last checkpoints.

Every epoch, in this order: torch reseeded with ``seed·100003 + epoch`` (a resumed run draws
the numbers a straight run draws), train mode, the steps — stop flag checked before each; zero
grad; each micro-batch's ``total / grad_accum`` backpropagated (DDP's ``no_sync`` on all but the
last); gradient clipping; optimizer step (and the scheduler step where ``scheduler_per_step``); a ``step`` event, and a ``step`` row every
``log_every`` steps — then, unless stopped, the scheduler step (per-epoch schedules), validation when due, the best
and last checkpoints (main rank), an ``epoch`` row and event. A stop validates the current
weights and keeps them only if they beat the best; ``last`` stays at the last finished epoch so a
resume keeps its exact schedule. Out-of-memory errors become ``TrainingError``.

Rows (``metrics.jsonl``) and events carry ``epoch, step, steps, global_step, loss, <logged>``
per step and ``epoch, global_step, train_loss, lr, epoch_seconds, <validation>`` per epoch;
``step_details`` adds ``lr, sec_per_step`` to steps and ``train_seconds, images_per_s`` to epochs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..errors import TrainingError
from .distributed import DistContext
from .optim import current_lr
from .runfolder import RunLog

__all__ = [
    "BestKeeper",
    "EpochHooks",
    "Loss",
    "LossFn",
    "LoopOutcome",
    "Schedule",
    "StopFlag",
    "is_out_of_memory",
    "isolated_rng",
    "progress_bar",
    "run_loop",
]


@dataclass(frozen=True)
class Loss:
    """One micro-batch's loss: ``total`` (a 0-d tensor, backpropagated) and floats to log."""

    total: torch.Tensor
    logged: Mapping[str, float] = field(default_factory=dict)

    def plus(self, name: str, term: torch.Tensor, weight: float = 1.0) -> Loss:
        """This loss with ``weight · term`` added to the total and ``term`` logged as ``name``."""
        return Loss(self.total + weight * term, {**self.logged, name: float(term.detach())})


#: batch -> Loss; the batch is whatever ``batches`` yields
LossFn = Callable[[Any], Loss]


class StopFlag(Protocol):
    """A ``threading.Event``-like flag: the loop ends cleanly before the next step once set."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class Schedule:
    epochs: int
    #: optimizer steps per epoch
    steps_per_epoch: int
    #: first epoch to run (0, or the epoch after the last finished one on resume)
    start_epoch: int = 0
    #: micro-batches per optimizer step
    grad_accum: int = 1
    #: torch is reseeded with ``seed·100003 + epoch`` at the start of every epoch
    seed: int = 0
    #: validate after every N-th epoch (and after the last)
    val_every: int = 1
    #: a "step" row in metrics.jsonl every N optimizer steps (0: none)
    log_every: int = 0
    #: samples per optimizer step, all ranks together (``images_per_s``); None: not reported
    samples_per_step: int | None = None
    #: wall-clock budget of this call (steps and validation): the first validated epoch that ends
    #: past it is the last one, and the run ends as finished (best and last kept); None: no budget
    time_budget_s: float | None = None
    #: step the scheduler after every optimizer step (e.g. one-cycle) instead of after every epoch
    scheduler_per_step: bool = False

    def validates(self, epoch: int) -> bool:
        return (epoch + 1) % self.val_every == 0 or epoch + 1 == self.epochs


@dataclass
class BestKeeper:
    """Keeps the checkpoint of the highest validation ``metric`` (e.g. ``"val_dice"``).

    ``save(summary, epoch)`` writes it (called on the main rank only).
    """

    metric: str
    save: Callable[[dict[str, Any], int], object]
    value: float | None = None
    epoch: int | None = None

    @property
    def row_field(self) -> str:
        return f"best_{self.metric}"

    def offer(self, summary: Mapping[str, Any], epoch: int) -> bool:
        """Take ``summary``'s metric as the best if it beats it; True when it did."""
        value = summary.get(self.metric)
        if value is None or (self.value is not None and not value > self.value):
            return False
        self.value, self.epoch = value, epoch
        return True


@dataclass
class EpochHooks:
    """What the caller does around the steps."""

    #: put the network(s) in training mode (e.g. BatchNorm statistics kept frozen)
    train_mode: Callable[[], None]
    #: (epoch, global_step, epoch row) -> write ``last`` + its optimizer state (main rank only)
    save_last: Callable[[int, int, dict[str, Any]], None]
    #: validation of the current weights -> fields of the epoch row (all ranks)
    validate: Callable[[], dict[str, Any]] | None = None
    best: BestKeeper | None = None


@dataclass(frozen=True)
class LoopOutcome:
    #: epochs finished (the schedule's ``epochs`` unless stopped)
    epochs_completed: int
    stopped: bool
    global_step: int
    #: the loss of the last optimizer step run (None when no step ran)
    last_loss: float | None


def isolated_rng(device: torch.device) -> AbstractContextManager:
    """Fork torch's RNG (CPU, and ``device`` if CUDA): a run reseeds it freely and the caller's
    state (e.g. napari's) is as it was afterwards."""
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's "can't allocate memory"."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar of ``total`` steps, or None when disabled (no tqdm import then)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def run_loop(
    schedule: Schedule,
    batches: Callable[[int], Iterator[Any]],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainable: Sequence[tuple[str, nn.Parameter]],
    hooks: EpochHooks,
    log: RunLog,
    *,
    dist: DistContext | None = None,
    ddp: nn.Module | None = None,
    grad_clip: float | None = None,
    stop: StopFlag | None = None,
    show_progress: bool = False,
    step_details: bool = True,
    oom_message: Callable[[], str] | None = None,
) -> LoopOutcome:
    """Run ``schedule``'s epochs from ``start_epoch``; see the module docstring.

    ``ddp``: the DistributedDataParallel wrapper ``loss_fn`` calls (for ``no_sync`` and the
    buffer broadcast after each epoch's steps); ``oom_message()``: the error text on out of memory.
    """
    dist = dist or DistContext()
    accum_context: Callable[[], AbstractContextManager] = (
        ddp.no_sync if (ddp is not None and dist.enabled) else nullcontext  # type: ignore[assignment]
    )
    clip_params = [p for _, p in trainable]
    steps = schedule.steps_per_epoch
    global_step = schedule.start_epoch * steps
    epoch = schedule.start_epoch
    stopped = False
    last_loss: float | None = None
    t_start = time.perf_counter()
    try:
        for epoch in range(schedule.start_epoch, schedule.epochs):
            torch.manual_seed(schedule.seed * 100003 + epoch)  # any in-model randomness: same on resume
            hooks.train_mode()
            t_epoch = time.perf_counter()
            losses: list[float] = []
            bar = progress_bar(steps, f"epoch {epoch + 1}/{schedule.epochs}", show_progress and dist.is_main)
            micro_batches = batches(epoch)
            for step in range(steps):
                if stop is not None and stop.is_set():
                    stopped = True
                    break
                t_step = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                logged = _accumulate(micro_batches, loss_fn, schedule.grad_accum, accum_context)
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(clip_params, grad_clip)
                optimizer.step()
                if schedule.scheduler_per_step:
                    scheduler.step()
                global_step += 1
                last_loss = logged["loss"]
                losses.append(last_loss)
                row: dict[str, Any] = {
                    "epoch": epoch,
                    "step": step + 1,
                    "steps": steps,
                    "global_step": global_step,
                    **logged,
                }
                if step_details:
                    row["lr"] = current_lr(optimizer)
                    row["sec_per_step"] = time.perf_counter() - t_step
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4f}" if k == "loss" else f"{v:.3f}" for k, v in logged.items()})
                    bar.update(1)
                log.emit({"event": "step", **row})
                if schedule.log_every and global_step % schedule.log_every == 0:
                    log.record({"type": "step", **row})
            if bar is not None:
                bar.close()
            train_s = time.perf_counter() - t_epoch
            if ddp is not None:
                dist.sync_buffers(getattr(ddp, "module", ddp))
            if stopped:
                _keep_if_best(hooks, epoch, dist)
                break
            if not schedule.scheduler_per_step:
                scheduler.step()
            _end_epoch(
                schedule,
                hooks,
                log,
                dist,
                optimizer,
                epoch,
                global_step,
                losses,
                t_epoch,
                train_s,
                step_details,
            )
            elapsed = time.perf_counter() - t_start
            if _budget_spent(schedule, hooks, dist, epoch, elapsed):
                row = {"epoch": epoch, "elapsed_s": elapsed, "budget_s": schedule.time_budget_s}
                if dist.is_main:
                    log.record({"type": "budget", **row})
                log.emit({"event": "budget", **row})
                epoch += 1
                break
        else:
            epoch = schedule.epochs
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        torch.cuda.empty_cache()  # a no-op unless CUDA was used
        message = (
            oom_message() if oom_message is not None else "out of memory: reduce the batch size or image size"
        )
        raise TrainingError(message) from exc
    dist.barrier()
    return LoopOutcome(epoch, stopped, global_step, last_loss)


def _accumulate(
    micro_batches: Iterator[Any],
    loss_fn: LossFn,
    grad_accum: int,
    accum_context: Callable[[], AbstractContextManager],
) -> dict[str, float]:
    """Backpropagate ``grad_accum`` micro-batches; their mean loss and logged values."""
    sums: dict[str, float] = {"loss": 0.0}
    for micro in range(grad_accum):
        batch = next(micro_batches)
        # DDP all-reduces gradients on the last micro-batch only
        context = nullcontext() if micro == grad_accum - 1 else accum_context()
        with context:
            loss = loss_fn(batch)
            (loss.total / grad_accum).backward()
        sums["loss"] += float(loss.total.detach()) / grad_accum
        for name, value in loss.logged.items():
            sums[name] = sums.get(name, 0.0) + value / grad_accum
    return sums


def _budget_spent(schedule: Schedule, hooks: EpochHooks, dist: DistContext, epoch: int, elapsed: float) -> bool:
    """True when ``epoch`` (just ended, validated, not the schedule's last) ends past the budget;
    the main rank's clock decides for all ranks."""
    if schedule.time_budget_s is None or epoch + 1 >= schedule.epochs:
        return False
    if hooks.validate is not None and not schedule.validates(epoch):
        return False
    spent = elapsed >= schedule.time_budget_s
    return bool(dist.broadcast_object(spent)) if dist.enabled else spent


def _keep_if_best(hooks: EpochHooks, epoch: int, dist: DistContext) -> None:
    """After a stop: validate what we have and keep it only if it beats the best."""
    if hooks.validate is None:
        return
    summary = hooks.validate()
    if hooks.best is not None and hooks.best.offer(summary, epoch) and dist.is_main:
        hooks.best.save(summary, epoch)


def _end_epoch(
    schedule: Schedule,
    hooks: EpochHooks,
    log: RunLog,
    dist: DistContext,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    global_step: int,
    losses: list[float],
    t_epoch: float,
    train_s: float,
    step_details: bool,
) -> None:
    """Validation when due, best and last checkpoints, the epoch row and event."""
    summary: dict[str, Any] = {}
    if hooks.validate is not None and schedule.validates(epoch):
        summary = hooks.validate()
    row: dict[str, Any] = {
        "type": "epoch",
        "epoch": epoch,
        "global_step": global_step,
        "train_loss": float(np.mean(losses)) if losses else None,
        "lr": current_lr(optimizer),
        "epoch_seconds": time.perf_counter() - t_epoch,
    }
    if step_details:
        per_step = schedule.samples_per_step
        row["train_seconds"] = train_s
        row["images_per_s"] = (
            schedule.steps_per_epoch * per_step / train_s if (per_step and train_s > 0) else None
        )
    row.update(summary)
    improved: bool | None = None
    if hooks.best is not None:
        improved = hooks.best.offer(summary, epoch)
        row[hooks.best.row_field] = hooks.best.value
    if dist.is_main:
        if improved and hooks.best is not None:
            hooks.best.save(summary, epoch)
        hooks.save_last(epoch, global_step, row)
        log.record(row)
        log.plot()
    dist.barrier()
    event = {"event": "epoch", **{k: v for k, v in row.items() if k != "type"}}
    if improved is not None:
        event["improved"] = improved
    log.emit(event)
