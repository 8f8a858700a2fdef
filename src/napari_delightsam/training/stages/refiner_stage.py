"""A "refiner" recipe stage: one modality's ``MaskRefiner`` trained alone on cached inputs.

``train_refiner(cfg, out_dir, data_root=...)``. The network in front of a refiner is fixed while
the refiner trains, so what the refiner receives for an image — the normalised image, the
decoder's stride-2 features and the logits before any refiner — is the same at every step. The
stage runs the network it starts from (``cfg.init``) once over the modality's train / val / unseen
images (``max_per_dataset`` / ``val_max_per_dataset``), records those inputs with a forward
pre-hook on the refiner (in memory, fp16; rebuilt on resume, a pure function of the init) and
trains the refiner alone on them:

* the refiner of the stage's modality (``cfg.modalities``: exactly one, listed in the model's
  ``refiner_modalities``) starts fresh — output conv at zero, i.e. the masks the stage starts
  from — whether or not the init checkpoint had one; every other weight is the init's;
* loss: BCE + soft Dice of the refined logits bilinearly taken to the network's input size,
  against the ground truth area-resized to it (the "heads" stages use the paper's loss at the
  decoder's output size; at the input size thin vessels count for what they are: ablations R2 /
  R3 of the model card);
* augmentation (``augment``): rot90 / flip of the whole (image, features, logits, mask) tuple and
  a per-channel brightness and contrast jitter of the image (± ``COLOUR_JITTER`` / 2);
* AdamW (``lr``, ``weight_decay``), one-cycle over the stage's ``epochs × steps_per_epoch`` steps
  (10 % warm-up), stepped after every optimizer step; batches drawn by ``balanced`` sampling;
* validation after every ``val_every`` epochs: Dice at each image's original size (logits →
  ``to_input_size``, sigmoid > 0.5, as ``delightsam evaluate``), the mean over the val images and
  over the unseen images; ``select_dice`` is their mean (or val's alone), the best epoch by it is
  ``best.safetensors``.

Run folder, events and resume are those of the other stages (``refiner.json``, ``metrics.jsonl``,
``best`` / ``last`` / ``last_state``); ``benchmarks/refiner_feature_cache.py`` is the same
training on a checkpoint outside a recipe.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data import SAMPLING_RULE
from ...devices import resolve_device
from ...model import DeLightSAM
from ..config import TrainConfig
from ..errors import TrainingError
from ..loop.batches import EpochBatches
from ..loop.run import BestKeeper, EpochHooks, Loss, Schedule, StopFlag, isolated_rng, run_loop
from ..loop.runfolder import (
    CURVES,
    LAST,
    METRICS,
    RunLog,
    load_resumable,
    prepare_run_folder,
    require_resumable,
    save_resumable,
    write_json,
)
from ..model_setup import build_model, inherits_trained_head
from .trainer import BEST, TrainResult, check_resume_settings, finish_run

__all__ = [
    "COLOUR_JITTER",
    "REFINER_FILE",
    "RefinerRows",
    "check_refiner_config",
    "record_refiner_inputs",
    "refiner_loss",
    "refiner_validation",
    "train_refiner",
]

#: the run folder's descriptor of a refiner stage
REFINER_FILE = "refiner.json"
#: amplitude of the per-channel brightness / contrast jitter of the image (``augment``)
COLOUR_JITTER = 0.3
#: one-cycle warm-up fraction
WARMUP = 0.1


@dataclass
class RefinerRows:
    """What the refiner reads for each image, and the images' ground truth."""

    keys: list[str]
    records: list[Any]
    #: (N, 3, S, S) normalised images, fp16
    image: torch.Tensor
    #: (N, C, S/2, S/2) the decoder's stride-2 features, fp16
    features: torch.Tensor
    #: (N, 1, S/2, S/2) logits before the refiner, fp32
    logits: torch.Tensor
    #: ground truth: (N, 1, S, S) area-resized fractions (training rows) or a list of (H, W) bool
    truth: torch.Tensor | list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.keys)


def check_refiner_config(cfg: TrainConfig) -> str:
    """The modality a refiner stage trains; ``ValueError`` with the reason when ``cfg`` cannot run
    one (the model's ``refiner_modalities``, where an init checkpoint brings them, are checked
    when the network is built)."""
    if cfg.modalities is None or len(cfg.modalities) != 1:
        raise ValueError(
            f"a refiner stage trains one modality's refiner: set 'modalities' to one name, got {cfg.modalities}"
        )
    modality = cfg.modalities[0]
    listed = cfg.model.get("refiner_modalities")
    if listed is not None and modality not in listed:
        raise ValueError(
            f"a refiner stage for {modality!r} needs it in the model's refiner_modalities (has {list(listed)})"
        )
    if not cfg.steps_per_epoch:
        raise ValueError(
            "a refiner stage needs 'steps_per_epoch' (its data is a few images, not an epoch of them)"
        )
    return modality


@torch.no_grad()
def record_refiner_inputs(
    model: DeLightSAM,
    modality: str,
    records: Sequence[Any],
    device: torch.device,
    *,
    train: bool,
    progress: Callable[[int, int], None] | None = None,
) -> RefinerRows:
    """Run ``model`` over ``records`` (all of ``modality``) and keep what its refiner for it receives.

    An image the refiner does not receive (a dark-field image of a modality with a dark-field
    refiner, ``ModelConfig.darkfield_refiners``) is left out: this refiner never corrects it.
    ``train``: ground truth area-resized to the input size (else kept at the original size);
    ``progress(done, total)`` after each image."""
    from ...data import load_pair
    from ...preprocess import prepare_array, to_model_tensor

    refiner = model.decoder.refiners[modality]
    seen: dict[str, torch.Tensor] = {}

    def grab(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen["image"], seen["features"], seen["logits"] = (a.detach() for a in args[:3])

    handle = refiner.register_forward_pre_hook(grab)
    index = torch.tensor([model.config.modalities.index(modality)], device=device)
    size = model.config.img_size
    images, features, logits, truth, kept = [], [], [], [], []
    was_training = model.training
    model.eval()
    try:
        for done, record in enumerate(records, 1):
            image, gt = load_pair(record)
            arr, _ = prepare_array(image)
            seen.clear()
            model(to_model_tensor(arr, size, device), index)
            if progress is not None:
                progress(done, len(records))
            if not seen:  # routed to another refiner
                continue
            kept.append(record)
            images.append(seen["image"][0].to("cpu", torch.float16))
            features.append(seen["features"][0].to("cpu", torch.float16))
            logits.append(seen["logits"][0].to("cpu", torch.float32))
            mask = torch.from_numpy(np.ascontiguousarray(gt))
            truth.append(
                F.interpolate(mask[None, None].float(), size=(size, size), mode="area")[0] if train else mask
            )
    finally:
        handle.remove()
        model.train(was_training)
    if not kept:
        empty = torch.zeros(0)
        return RefinerRows([], [], empty, empty, empty, [])
    return RefinerRows(
        [r.key for r in kept],
        kept,
        torch.stack(images),
        torch.stack(features),
        torch.stack(logits),
        torch.stack(truth) if train else truth,
    )


class _RefinerDataset(torch.utils.data.Dataset):
    """Training rows with rot90 / flip of the whole tuple and the image's colour jitter."""

    def __init__(self, rows: RefinerRows, augment: bool) -> None:
        self.rows, self.augment, self.records = rows, augment, rows.records

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """``item``: a row, or (row, augmentation seed) as ``BalancedSampler`` yields them."""
        i, seed = (int(item), None) if isinstance(item, (int, np.integer)) else (int(item[0]), int(item[1]))
        r = self.rows
        assert isinstance(r.truth, torch.Tensor)
        parts = [r.image[i].float(), r.features[i].float(), r.logits[i], r.truth[i]]
        if self.augment:
            g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, ())))
            k = int(torch.randint(4, (), generator=g))
            parts = [torch.rot90(t, k, (1, 2)) for t in parts]
            if bool(torch.rand((), generator=g) < 0.5):
                parts = [torch.flip(t, (2,)) for t in parts]
            gain, shift = torch.rand(2, 3, 1, 1, generator=g) - 0.5
            parts[0] = parts[0] * (1 + COLOUR_JITTER * gain) + COLOUR_JITTER * shift
        return dict(
            zip(("image", "features", "logits", "truth"), (p.contiguous() for p in parts), strict=True)
        )


def refiner_loss(refined: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE + soft Dice, soft Dice) of (B, 1, s, s) logits bilinearly taken to the (B, 1, S, S) truth's size."""
    up = F.interpolate(refined, size=truth.shape[-2:], mode="bilinear", align_corners=False)
    prob = up.sigmoid()
    soft_dice = 1 - (2 * (prob * truth).sum((1, 2, 3)) + 1) / (prob.sum((1, 2, 3)) + truth.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(up, truth) + soft_dice.mean(), soft_dice.mean()


@torch.no_grad()
def refiner_validation(refiner: nn.Module, rows: RefinerRows, prefix: str) -> dict[str, Any]:
    """Dice of the refined masks at each image's original size: the mean over ``rows`` as
    ``<prefix>_dice``, per dataset as ``<prefix>_dice_per_dataset`` (None, {} without rows)."""
    from ...preprocess import to_input_size
    from ..evaluation.metrics import dice_from_counts

    if not len(rows):
        return {f"{prefix}_dice": None, f"{prefix}_dice_per_dataset": {}}
    was_training = refiner.training
    refiner.eval()
    device = next(refiner.parameters()).device
    per: dict[str, list[float]] = {}
    for i, key in enumerate(rows.keys):
        args = (rows.image[i : i + 1], rows.features[i : i + 1], rows.logits[i : i + 1])
        refined = refiner(*(a.to(device, torch.float32) for a in args))[0, 0].cpu()
        gt = rows.truth[i]
        pred = to_input_size(refined, tuple(gt.shape)) > 0  # sigmoid > 0.5
        truth = gt > 0
        per.setdefault(key, []).append(
            dice_from_counts(int((pred & truth).sum()), int(pred.sum()), int(truth.sum()))
        )
    refiner.train(was_training)
    scores = [d for v in per.values() for d in v]
    return {
        f"{prefix}_dice": float(np.mean(scores)),
        f"{prefix}_dice_per_dataset": {k: float(np.mean(v)) for k, v in sorted(per.items())},
    }


def train_refiner(
    train_config: TrainConfig,
    out_dir: str | Path,
    *,
    data_root: str | Path,
    progress: Any = None,
    stop_event: StopFlag | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Train one modality's refiner (see the module docstring); ``data_root`` holds the images of
    ``train_config.splits_file``'s split."""
    cfg = train_config
    cfg.validate()
    try:
        modality = check_refiner_config(cfg)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    if cfg.splits_file is None:
        raise TrainingError("a refiner stage needs a splits file (the recipe's splits.json)")
    out = Path(out_dir).expanduser()
    device = resolve_device(cfg.device)
    log = RunLog(out / METRICS, progress, curves=out / CURVES)
    with isolated_rng(device):
        return _train_refiner(
            cfg, modality, Path(data_root), out, log, stop_event, resume, show_progress, device
        )


def _train_refiner(
    cfg: TrainConfig,
    modality: str,
    data_root: Path,
    out: Path,
    log: RunLog,
    stop_event: StopFlag | None,
    resume: bool,
    show_progress: bool,
    device: torch.device,
) -> TrainResult:
    from ...checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from ...data import discover, load_splits, select
    from ...model.detail import MaskRefiner

    prepare_run_folder(out, resume, REFINER_FILE)
    if resume:
        check_resume_settings(out, REFINER_FILE, cfg)
    model, init_report = build_model(cfg)
    if modality not in model.decoder.refiners:
        raise TrainingError(
            f"the network has no refiner for {modality} (refiner_modalities {list(model.config.refiner_modalities)}); "
            "list it in the stage's model settings"
        )
    model.decoder.refiners[modality] = MaskRefiner(*model.decoder.refiners[modality].sizes)  # starts fresh
    model.to(device)
    records = [r for r in discover(data_root) if r.modality == modality]
    splits = load_splits(cfg.splits_file)
    eval_cap = cfg.val_max_per_dataset or cfg.max_per_dataset

    def record(split: str, cap: int | None, train: bool) -> RefinerRows:
        chosen = select(records, splits, split, cap)
        return record_refiner_inputs(
            model,
            modality,
            chosen,
            device,
            train=train,
            progress=lambda done, total: log.emit(
                {"event": "record", "split": split, "done": done, "total": total}
            ),
        )

    train_rows = record("train", cfg.max_per_dataset, True)
    if not len(train_rows):
        raise TrainingError(f"no training images of {modality} in {data_root} for this split")
    val_rows = record("val", eval_cap, False)
    unseen_rows = record("unseen", eval_cap, False)
    refiner = model.decoder.refiners[modality]
    model.requires_grad_(False)
    refiner.requires_grad_(True)
    prefix = f"decoder.refiners.{modality}."
    trainable = [(prefix + n, p) for n, p in refiner.named_parameters()]
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = int(cfg.steps_per_epoch or 0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, cfg.lr, total_steps=cfg.epochs * steps, pct_start=WARMUP
    )
    param_names = [n for n, _ in trainable]
    start_epoch, best_val, best_epoch = 0, None, None
    if resume:
        require_resumable(out)
        try:
            model.load_state_dict(load_checkpoint(out / LAST).state_dict())
        except CheckpointError as exc:
            raise TrainingError(f"cannot resume: {exc}") from exc
        info = load_resumable(out, optimizer, scheduler, param_names)
        start_epoch, best_val, best_epoch = (
            int(info["epoch"]) + 1,
            info.get("best_val"),
            info.get("best_epoch"),
        )
        log.resume_at(start_epoch)
    else:
        write_json(
            out / REFINER_FILE,
            {
                "train_config": cfg.to_dict(),
                "model_config": model.config.to_dict(),
                "modality": modality,
                "n_train": len(train_rows),
                "n_val": len(val_rows),
                "n_unseen": len(unseen_rows),
                "init": init_report,
                "trainable_parameters": sum(p.numel() for _, p in trainable),
                "colour_jitter": COLOUR_JITTER,
                "warmup": WARMUP,
            },
        )
    batches = EpochBatches(
        _RefinerDataset(train_rows, cfg.augment),
        batch_size=cfg.batch_size,
        steps=steps,
        seed=cfg.seed,
        balanced=cfg.balanced,
    )

    def loss_fn(batch: dict[str, torch.Tensor]) -> Loss:
        batch = {k: v.to(device) for k, v in batch.items()}
        total, soft_dice = refiner_loss(
            refiner(batch["image"], batch["features"], batch["logits"]), batch["truth"]
        )
        return Loss(total, {"dice": 1.0 - float(soft_dice.detach())})

    def validate_now() -> dict[str, Any]:
        row = {
            **refiner_validation(refiner, val_rows, "val"),
            **refiner_validation(refiner, unseen_rows, "unseen"),
        }
        picked = [row["val_dice"]] + ([row["unseen_dice"]] if cfg.select_on == "val+unseen" else [])
        picked = [v for v in picked if v is not None]
        row["select_dice"] = float(np.mean(picked)) if picked else None
        return row

    meta = {
        # only the refiner trains: the head is what the init checkpoint says it is
        "modality_head_trained": "true" if inherits_trained_head(init_report) else "false",
        "train_config": cfg.to_json(),
        "sampling_rule": SAMPLING_RULE,
        "init": json.dumps(init_report, default=str),
        "stage": f"{modality} refiner on cached inputs",
    }

    def training_meta(summary: dict[str, Any], epoch: int) -> dict[str, str]:
        keep = ("val_dice", "val_dice_per_dataset", "unseen_dice", "unseen_dice_per_dataset", "select_dice")
        return {
            "training": json.dumps(
                {"epoch": epoch, "modality": modality, **{k: summary.get(k) for k in keep}}
            )
        }

    def save(path: Path, extra: dict[str, str]) -> Path:
        return save_checkpoint(path, model, {**meta, **extra})

    best = BestKeeper(
        "select_dice",
        lambda summary, epoch: save(out / BEST, training_meta(summary, epoch)),
        best_val,
        best_epoch,
    )

    def save_last(epoch: int, global_step: int, row: dict[str, Any]) -> None:
        info = {"epoch": epoch, "best_val": best.value, "best_epoch": best.epoch, "global_step": global_step}
        save_resumable(
            out,
            optimizer,
            scheduler,
            param_names,
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
            "n_train": len(train_rows),
            "n_val": len(val_rows) + len(unseen_rows),
            "device": str(device),
            "world_size": 1,
        }
    )
    outcome = run_loop(
        Schedule(
            epochs=cfg.epochs,
            steps_per_epoch=steps,
            start_epoch=start_epoch,
            seed=cfg.seed,
            val_every=cfg.val_every,
            log_every=cfg.log_every,
            samples_per_step=cfg.batch_size,
            time_budget_s=cfg.time_budget_s,
            scheduler_per_step=True,
        ),
        batches,
        loss_fn,
        optimizer,
        scheduler,
        trainable,
        EpochHooks(train_mode=lambda: refiner.train(), save_last=save_last, validate=validate_now, best=best),
        log,
        grad_clip=cfg.grad_clip,
        stop=stop_event,
        show_progress=show_progress,
    )
    return finish_run(out, model, outcome.epochs_completed, outcome.stopped, best, log, [])
