"""Head training on cached frozen-encoder embeddings: stage 1 of the v1 recipe.

``train_heads(config, cache_dir, out_dir, ...)``

With the DC-Encoder frozen, every training step would recompute the same embedding. The
embeddings of every (image, augmented view) are computed once (``embedding_cache``:
``build_cache_folder``) and the SP-Generator, the QM-Decoder and the modality head train on the
stored tensors: about 40× more head updates per CPU-hour than end-to-end steps with a frozen
backbone (``benchmarks/results``: 0.1 s vs 4.3 s per batch of 4 at 512²).

* data: the cache folder's ``train__*`` files (views of the training split), with a random
  flip/rotation of embedding and mask together, drawn modality-balanced (``BalancedSampler``);
* validation: the ``val__*`` (in-domain) and ``unseen__*`` (held-out domains) files, Dice at the
  decoder's resolution (logits > 0 vs the stored mask > 0.5); the checkpoint kept as ``best`` is
  the one with the highest ``select_dice`` = mean of in-domain and unseen-domain validation
  Dice (each a mean over modalities), or the in-domain one when no unseen file exists;
* the loop, resume and checkpoints are those of segmentation training (``loop.run_loop``,
  ``runfolder``): ``last`` + ``last_state`` every epoch, ``metrics.jsonl``; the files hold the
  whole model (encoder included), ready for ``load_model`` or a later stage's ``--init``.

The encoder weights the cache was made with must be those of the model built from ``config``
(checked by fingerprint), so a stale cache is never trained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...data import SAMPLING_RULE
from ...devices import autocast_context, autocast_dtype, resolve_device
from ...model import DeLightSAM
from ...model.delightsam import ModalityHead
from ..caches.embedding_cache import (
    EmbeddingDataset,
    EmbeddingSet,
    cached_mask_size,
    concatenate,
    encoder_fingerprint,
    heads_forward,
    heads_loss,
    load_embeddings,
)
from ..config import TrainConfig
from ..errors import TrainingError
from ..evaluation.validation import summarise_validation
from ..loop.batches import EpochBatches, steps_per_epoch
from ..loop.optim import adam_exponential, apply_freeze, lr_groups
from ..loop.run import BestKeeper, EpochHooks, Loss, Schedule, StopFlag, isolated_rng, run_loop
from ..loop.runfolder import (
    CURVES,
    LAST,
    METRICS,
    ProgressFn,
    RunLog,
    load_resumable,
    prepare_run_folder,
    require_resumable,
    save_resumable,
    write_json,
)
from ..model_setup import build_model, modality_head_trained, set_train_mode
from .trainer import BEST, TrainResult, check_resume_settings, finish_run

__all__ = ["HEADS_FILE", "cached_validation", "load_cache_split", "train_heads"]

HEADS_FILE = "heads.json"


def load_cache_split(cache_dir: str | Path, split: str) -> EmbeddingSet | None:
    """All ``<split>__*.safetensors`` files of ``cache_dir`` as one set (None if there are none)."""
    files = sorted(Path(cache_dir).glob(f"{split}__*.safetensors"))
    if not files:
        return None
    return concatenate([load_embeddings(f) for f in files])


@torch.no_grad()
def cached_validation(
    model: DeLightSAM, data: EmbeddingSet, prefix: str, batch_size: int = 32
) -> dict[str, Any]:
    """Dice of the heads on stored embeddings, per modality and their mean, as ``<prefix>_dice``,
    ``<prefix>_dice_per_modality``, ``<prefix>_modality_accuracy``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ds = EmbeddingDataset(data, flips=False)
    rows = []
    for start in range(0, len(ds), batch_size):
        idx = list(range(start, min(start + batch_size, len(ds))))
        items = [ds[i] for i in idx]
        batch = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
        logits, _ = heads_forward(model, batch)
        pred = (logits > 0).flatten(1)
        gt = (batch["mask"] > 0.5).flatten(1)
        inter, p_area, g_area = (pred & gt).sum(1), pred.sum(1), gt.sum(1)
        head_ok: list[bool | None] = [None] * len(idx)
        if isinstance(model.modality_head, ModalityHead):  # the cache holds the pooled head's input only
            head_ok = (model.modality_head.mlp(batch["head_input"]).argmax(1) == batch["modality"]).tolist()
        from ..evaluation.metrics import dice_from_counts

        for j, i in enumerate(idx):
            key = data.keys[int(data.record[i])]
            modality, dataset, sample = key.split("/", 2)
            rows.append(
                {
                    "key": f"{modality}/{dataset}",
                    "modality": modality,
                    "id": sample,
                    "dice": dice_from_counts(int(inter[j]), int(p_area[j]), int(g_area[j])),
                    "head_ok": head_ok[j],
                }
            )
    if was_training:
        model.train()
    summary = summarise_validation(rows)
    return {
        f"{prefix}_dice": summary["val_dice"],
        f"{prefix}_dice_per_modality": summary["val_dice_per_modality"],
        f"{prefix}_modality_accuracy": summary["val_modality_accuracy"],
        f"{prefix}_dice_per_dataset": _per_dataset(rows),
    }


def _per_dataset(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["key"], []).append(r["dice"])
    return {k: float(np.mean(v)) for k, v in sorted(by.items())}


def train_heads(
    train_config: TrainConfig,
    cache_dir: str | Path,
    out_dir: str | Path,
    progress: ProgressFn | None = None,
    stop_event: StopFlag | None = None,
    *,
    views: Sequence[int] | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Train the SP-Generator, QM-Decoder and modality head on a cache folder; see the module
    docstring. ``train_config``: its schedule, optimizer, loss weights, model settings and
    ``init`` are used (the encoder is always frozen; ``img_size`` must be the cache's).
    ``views``: train on these augmented views only (default: every view in the cache)."""
    cfg = train_config
    cfg.validate()
    out = Path(out_dir).expanduser()
    device = resolve_device(cfg.device)
    log = RunLog(out / METRICS, progress, curves=out / CURVES)
    with isolated_rng(device):
        return _train_heads(cfg, Path(cache_dir), out, log, stop_event, resume, show_progress, device, views)


def _train_heads(
    cfg: TrainConfig,
    cache_dir: Path,
    out: Path,
    log: RunLog,
    stop_event: StopFlag | None,
    resume: bool,
    show_progress: bool,
    device: torch.device,
    views: Sequence[int] | None,
) -> TrainResult:
    prepare_run_folder(out, resume, HEADS_FILE)
    if resume:
        check_resume_settings(out, HEADS_FILE, cfg)
    model, init_report = build_model(cfg)
    if cfg.init == "litemedsam":
        model.encoder.neutralise_controllers()
    train_set = load_cache_split(cache_dir, "train")
    if train_set is None:
        raise TrainingError(f"{cache_dir} holds no train__*.safetensors embedding files")
    fingerprint = encoder_fingerprint(model)
    if train_set.meta.get("encoder_sha256") != fingerprint:
        raise TrainingError(
            f"the embeddings in {cache_dir} were made with other encoder weights than --init {cfg.init}; "
            "rebuild the cache"
        )
    if int(train_set.meta.get("img_size", -1)) != model.config.img_size:
        raise TrainingError(
            f"the cache is at {train_set.meta.get('img_size')}², the model at {model.config.img_size}²"
        )
    cached_mask = cached_mask_size(train_set.meta)
    if cached_mask != model.config.mask_size:
        raise TrainingError(
            f"the cache holds masks at {cached_mask}², the model's decoder outputs {model.config.mask_size}²; "
            "rebuild the cache"
        )
    if views is not None:
        rows = torch.nonzero(torch.isin(train_set.view, torch.as_tensor(list(views)))).flatten()
        if rows.numel() == 0:
            raise TrainingError(f"the cache holds no training rows of views {list(views)}")
        train_set = train_set.subset(rows)
    val_set = load_cache_split(cache_dir, "val")
    unseen_set = load_cache_split(cache_dir, "unseen")
    train_ds = EmbeddingDataset(train_set, flips=cfg.augment)

    trainable = apply_freeze(model, ("encoder", *cfg.freeze), cfg.train_modality_head)
    model.to(device)
    opt = adam_exponential(lr_groups(model, trainable, cfg.lr_scale), cfg.lr, cfg.gamma, cfg.weight_decay)
    start_epoch, best_val, best_epoch = 0, None, None
    if resume:
        from ...checkpoint import CheckpointError, load_checkpoint

        require_resumable(out)
        try:
            model.load_state_dict(load_checkpoint(out / LAST).state_dict())
        except CheckpointError as exc:
            raise TrainingError(f"cannot resume: {exc}") from exc
        info = load_resumable(out, opt.optimizer, opt.scheduler, opt.param_names)
        start_epoch, best_val, best_epoch = int(info["epoch"]) + 1, info.get("best_val"), info.get("best_epoch")
        log.resume_at(start_epoch)
    else:
        write_json(
            out / HEADS_FILE,
            {
                "train_config": cfg.to_dict(),
                "model_config": model.config.to_dict(),
                "cache_dir": str(cache_dir.resolve()),
                "cache_meta": train_set.meta,
                "views": list(views) if views is not None else None,
                "n_train_rows": len(train_set),
                "n_train_records": len(train_set.keys),
                "n_val": len(val_set) if val_set is not None else 0,
                "n_unseen": len(unseen_set) if unseen_set is not None else 0,
                "sampling_rule": SAMPLING_RULE,
                "init": init_report,
                "trainable_parameters": sum(p.numel() for _, p in trainable),
            },
        )
    steps = steps_per_epoch(len(train_ds), cfg.batch_size * cfg.grad_accum, cfg.steps_per_epoch)
    batches = EpochBatches(
        train_ds, batch_size=cfg.batch_size, steps=steps, grad_accum=cfg.grad_accum, seed=cfg.seed
    )
    amp = autocast_dtype(device, cfg.amp, cpu=cfg.amp_cpu)
    # the embedding cache holds the pooled head's input; an appearance head trains on images
    # (``training/appearance_head.py``) and is left as it is here
    head = bool(isinstance(model.modality_head, ModalityHead) and cfg.train_modality_head)

    def loss_fn(batch: dict[str, torch.Tensor]) -> Loss:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(device, amp):
            terms = heads_loss(
                model,
                batch,
                patch_weight=cfg.patch_weight,
                modality_weight=cfg.modality_weight,
                train_modality_head=head,
            )
        return Loss(terms.total, {"dice": 1.0 - float(terms.dice.detach())})

    def validate_now() -> dict[str, Any]:
        row: dict[str, Any] = {}
        if val_set is not None:
            row.update(cached_validation(model, val_set, "val"))
        if unseen_set is not None:
            row.update(cached_validation(model, unseen_set, "unseen"))
        picked = [row[k] for k in ("val_dice", "unseen_dice") if row.get(k) is not None]
        row["select_dice"] = float(np.mean(picked)) if picked else None
        return row

    meta = {
        # the encoder is frozen here: a head frozen in this run keeps the --init checkpoint's state
        "modality_head_trained": "true" if modality_head_trained(model, cfg, init_report, stage0_frozen=True) else "false",
        "train_config": cfg.to_json(),
        "sampling_rule": SAMPLING_RULE,
        "init": json.dumps(init_report, default=str),
        "stage": "heads on cached frozen-encoder embeddings",
    }

    def save(path: Path, extra: dict[str, str]) -> Path:
        from ...checkpoint import save_checkpoint

        return save_checkpoint(path, model, {**meta, **extra})

    def training_meta(summary: dict[str, Any], epoch: int) -> dict[str, str]:
        keep = ("val_dice", "val_dice_per_modality", "unseen_dice", "unseen_dice_per_modality", "select_dice")
        return {"training": json.dumps({"epoch": epoch, **{k: summary.get(k) for k in keep}})}

    best = BestKeeper(
        "select_dice", lambda summary, epoch: save(out / BEST, training_meta(summary, epoch)), best_val, best_epoch
    )

    def save_last(epoch: int, global_step: int, row: dict[str, Any]) -> None:
        info = {"epoch": epoch, "best_val": best.value, "best_epoch": best.epoch, "global_step": global_step}
        save_resumable(
            out,
            opt.optimizer,
            opt.scheduler,
            opt.param_names,
            info,
            lambda path, m: save(path, m),
            {"epoch": str(epoch), **training_meta(row, epoch)},
        )

    if not resume and cfg.val_at_start:
        row = {"type": "initial", "epoch": -1, "global_step": 0, **validate_now()}
        log.record(row)
        log.emit({"event": "initial", **{k: v for k, v in row.items() if k != "type"}})
    log.emit(
        {
            "event": "start",
            "out_dir": str(out),
            "epochs": cfg.epochs,
            "start_epoch": start_epoch,
            "steps_per_epoch": steps,
            "n_train": len(train_set),
            "n_val": (len(val_set) if val_set is not None else 0) + (len(unseen_set) if unseen_set is not None else 0),
            "device": str(device),
            "world_size": 1,
        }
    )
    outcome = run_loop(
        Schedule(
            epochs=cfg.epochs,
            steps_per_epoch=steps,
            start_epoch=start_epoch,
            grad_accum=cfg.grad_accum,
            seed=cfg.seed,
            val_every=cfg.val_every,
            log_every=cfg.log_every,
            samples_per_step=cfg.batch_size * cfg.grad_accum,
            time_budget_s=cfg.time_budget_s,
        ),
        batches,
        loss_fn,
        opt.optimizer,
        opt.scheduler,
        trainable,
        EpochHooks(
            train_mode=lambda: set_train_mode(model, True),
            save_last=save_last,
            validate=validate_now,
            best=best,
        ),
        log,
        grad_clip=cfg.grad_clip,
        stop=stop_event,
        show_progress=show_progress,
    )
    return finish_run(out, model, outcome.epochs_completed, outcome.stopped, best, log, [])
