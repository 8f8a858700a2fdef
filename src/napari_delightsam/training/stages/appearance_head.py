"""Training the appearance head (``model/appearance_head.py``): modality, channel order and hue
from the frozen stage-0 features, robust to the shifts real images carry.

Everything else in the network is fixed, and the stage-0 features come from LiteMedSAM's frozen
stem, so the head trains on its own, cheaply: each step draws ``batch_size`` images balanced
over modalities and, within a modality, over datasets, applies ``data.appearance.random_appearance``
(crops, aspect, resolution, gamma, contrast, H&E stain, white balance, hue ±45°, greyscale, a
random channel order, endoscope frames, JPEG) and trains three outputs: modality (cross-entropy,
label smoothing 0.05), channel order (cross-entropy, colour images only) and hue rotation
(smooth L1, colour images only). The steps run in the one training loop (``loop.run_loop``),
an "epoch" of ``eval_every`` steps between validations; the best state on validation is kept.

Validation views of each validation image: as stored, BGR, hue +25°, greyscale (colour images,
when ``HeadStageConfig.val_greyscale``) and one random appearance (fixed seeds). After training,
``calibrate`` fits the softmax temperature on those views (lowest
NLL on a grid), picks ``auto``'s confidence threshold (the lowest at which the confident
predictions are at least ``target_precision`` right), the order head's minimum probability (no
as-stored validation image reordered) and the hue correction's minimum angle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...data.appearance import (
    BGR_INDEX,
    COLOUR_MODALITIES,
    AppearanceMix,
    MixByModality,
    greyscale,
    hue_matrix,
    is_grey,
    random_appearance,
)
from ...model.appearance_head import HUE_UNIT, NEVER, AppearanceHead
from ...preprocess import to_model_tensor
from ..loop.run import BestKeeper, EpochHooks, Loss, Schedule, StopFlag, isolated_rng, run_loop
from ..loop.runfolder import RunLog

__all__ = [
    "HeadImage", "HeadStageConfig", "ValViews", "calibrate", "load_head_images", "train_appearance_head",
    "train_head_stage", "validation_views", "with_appearance_head",
]


def with_appearance_head(model: Any) -> Any:
    """A copy of ``model`` (a ``DeLightSAM``) whose modality head is a new ``AppearanceHead``;
    every other tensor is the model's own (checked: nothing else may be missing or left over).
    A model that already has an appearance head is returned as it is: training continues it."""
    from ...model import DeLightSAM

    if model.config.modality_head_kind == "appearance":
        return model.eval()
    new = DeLightSAM(model.config.replace(modality_head_kind="appearance"))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("modality_head.")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("modality_head.")] + list(unexpected)
    if bad:
        raise ValueError(f"cannot carry these tensors over to the appearance-head model: {bad[:5]}")
    return new.eval()


@dataclass
class HeadImage:
    image: np.ndarray  # (H,W,3) uint8
    modality: int
    dataset: str
    colour: bool


def load_head_images(records: Sequence[Any], modalities: Sequence[str]) -> list[HeadImage]:
    """Decode ``records`` (``data.SampleRecord``) once into memory as uint8."""
    from ...data.records import load_image_only

    out = []
    for rec in records:
        img = np.clip(np.rint(load_image_only(rec)), 0, 255).astype(np.uint8)
        out.append(HeadImage(img, modalities.index(rec.modality), f"{rec.modality}/{rec.dataset}", not is_grey(img)))
    return out


def _tensor(img: np.ndarray, size: int) -> torch.Tensor:
    return to_model_tensor(img, size, "cpu")[0].contiguous()


class Stage0:
    """The frozen stem + stage 0 as a feature extractor: a copy with BatchNorm folded into the
    convolutions, channels_last, one image at a time (on a CPU a stacked batch of 512² images is
    memory-bound and slower per image)."""

    def __init__(self, model: Any) -> None:
        import copy

        from ...model.fusion import fuse_conv_bn

        enc = copy.deepcopy(model.encoder).eval().requires_grad_(False)
        fuse_conv_bn(enc)
        self.encoder = enc.to(memory_format=torch.channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([
                self.encoder.forward_conv(x[i : i + 1].contiguous(memory_format=torch.channels_last)).contiguous()
                for i in range(x.shape[0])
            ])


def _apply(img: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img.astype(np.float32) @ m.T.astype(np.float32)), 0, 255).astype(np.uint8)


@dataclass
class ValViews:
    """Stage-0 features of the validation views and what each should be predicted as."""

    feats: torch.Tensor  # (N,C,h,w) float16
    modality: torch.Tensor  # (N,) long
    order: torch.Tensor  # (N,) long
    hue: torch.Tensor  # (N,) float, degrees
    colour: torch.Tensor  # (N,) bool
    view: list[str]  # "as stored", "BGR", "hue +25", "random"


def validation_views(
    model: Any, images: Sequence[HeadImage], size: int, seed: int = 1234, mix: MixByModality | None = None,
    *, grey_view: bool = False,
) -> ValViews:
    """Stage-0 features of each image as stored, BGR, hue +25° (colour images), greyscale (colour
    images of a colour modality, when ``grey_view``) and one random appearance drawn with ``mix``
    (default: v2's mix), with what each should be predicted as."""
    mix = mix if mix is not None else MixByModality()
    feats, mods, orders, hues, colours, views = [], [], [], [], [], []
    rng = np.random.default_rng(seed)
    stage0 = Stage0(model)
    with torch.inference_mode():
        for item in images:
            cands: list[tuple[str, np.ndarray, int, float]] = [("as stored", item.image, 0, 0.0)]
            if item.colour:
                cands.append(("BGR", item.image[..., ::-1].copy(), BGR_INDEX, 0.0))
                cands.append(("hue +25", _apply(item.image, hue_matrix(25.0)), 0, 25.0))
            colour_ok = item.colour and any(item.dataset.startswith(m) for m in COLOUR_MODALITIES)
            if grey_view and colour_ok:
                cands.append(("greyscale", greyscale(item.image), 0, 0.0))
            img, order, hue = random_appearance(item.image, rng, colour=colour_ok,
                                                mix=mix.for_modality(item.dataset.split("/")[0]))
            cands.append(("random", img, order, hue))
            for name, img, order, hue in cands:
                x = _tensor(img, size)[None]
                feats.append(stage0(x)[0].to(torch.float16))
                mods.append(item.modality)
                orders.append(order)
                hues.append(hue)
                colours.append(item.colour and not is_grey(img))
                views.append(name)
    return ValViews(torch.stack(feats), torch.tensor(mods), torch.tensor(orders), torch.tensor(hues, dtype=torch.float32),
                    torch.tensor(colours), views)


def _predict(head: AppearanceHead, feats: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw modality logits, order logits, hue degrees) for stored features, in chunks."""
    out = [head(feats[i : i + chunk].float(), calibrated=False) for i in range(0, len(feats), chunk)]
    return (torch.cat([o.modality_logits for o in out]), torch.cat([o.order_logits for o in out]),
            torch.cat([o.hue_degrees for o in out]))


#: ``train_appearance_head(select=...)``: the validation metric each choice maximises
SELECT_SCORES = {"modality": "val_neg_nll", "modality+order": "val_neg_nll_with_order"}


def _val_metrics(head: AppearanceHead, val: ValViews, order_weight: float = 0.5) -> dict[str, Any]:
    with torch.inference_mode():
        logits, order, hue = _predict(head, val.feats)
    nll = float(F.cross_entropy(logits, val.modality))
    right = logits.argmax(1) == val.modality
    c = val.colour
    order_nll = float(F.cross_entropy(order[c], val.order[c])) if bool(c.any()) else 0.0
    per_view = {v: float(right[[i for i, w in enumerate(val.view) if w == v]].float().mean()) for v in dict.fromkeys(val.view)}
    return {
        "val_modality_nll": nll,
        "val_neg_nll": -nll,
        "val_order_nll": order_nll,
        #: the selection score of ``select="modality+order"``: modality and channel-order NLL, weighted as in training
        "val_neg_nll_with_order": -(nll + order_weight * order_nll),
        "val_modality_acc": float(right.float().mean()),
        "val_modality_acc_by_view": per_view,
        "val_order_acc": float((order.argmax(1)[c] == val.order[c]).float().mean()) if bool(c.any()) else None,
        "val_hue_mae": float((hue[c] - val.hue[c]).abs().mean()) if bool(c.any()) else None,
    }


def train_appearance_head(
    model: Any,
    train: Sequence[HeadImage],
    val: ValViews,
    *,
    modalities: Sequence[str],
    steps: int = 600,
    eval_every: int = 100,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    mix: AppearanceMix | MixByModality | None = None,
    order_weight: float = 0.5,
    select: str = "modality",
    log: RunLog | None = None,
    stop: StopFlag | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train ``model.modality_head`` (an ``AppearanceHead``; everything else frozen) and return
    its best state on ``val`` (lowest modality NLL) and a summary. ``mix``: the training
    augmentation's tunable probabilities; ``order_weight``: the channel-order loss's weight;
    ``select``: the state kept is the one with the lowest validation modality NLL ("modality") or
    modality + ``order_weight`` × channel-order NLL ("modality+order")."""
    if select not in SELECT_SCORES:
        raise ValueError(f"select must be one of {sorted(SELECT_SCORES)}, got {select!r}")
    mixes = mix if isinstance(mix, MixByModality) else MixByModality(mix if mix is not None else AppearanceMix())
    head = model.modality_head
    if not isinstance(head, AppearanceHead):
        raise ValueError("the model has no appearance head (modality_head_kind must be 'appearance')")
    if steps < 1 or eval_every < 1 or steps % eval_every:
        raise ValueError(f"steps ({steps}) must be a positive multiple of eval_every ({eval_every})")
    if not train:
        raise ValueError("no training images")
    log = log if log is not None else RunLog(Path("metrics.jsonl"), is_main=False)
    size = model.config.img_size
    rng = np.random.default_rng(seed)
    model.requires_grad_(False)
    model.eval()
    head.requires_grad_(True)
    by_mod: dict[int, dict[str, list[int]]] = {}
    for i, item in enumerate(train):
        by_mod.setdefault(item.modality, {}).setdefault(item.dataset, []).append(i)
    mods = sorted(by_mod)
    stage0 = Stage0(model)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )

    def draw() -> int:
        sets = by_mod[mods[int(rng.integers(len(mods)))]]
        names = sorted(sets)
        pool = sets[names[int(rng.integers(len(names)))]]
        return pool[int(rng.integers(len(pool)))]

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            xs, ms, os_, hs, cs = [], [], [], [], []
            for _ in range(batch_size):
                item = train[draw()]
                colour_ok = item.colour and modalities[item.modality] in COLOUR_MODALITIES
                img, order, hue = random_appearance(item.image, rng, colour=colour_ok,
                                                    mix=mixes.for_modality(modalities[item.modality]))
                xs.append(_tensor(img, size))
                ms.append(item.modality)
                os_.append(order)
                hs.append(hue)
                cs.append(item.colour and not is_grey(img))
            feats = stage0(torch.stack(xs)).clone()  # out of inference mode: the head trains on it
            yield feats, torch.tensor(ms), torch.tensor(os_), torch.tensor(hs, dtype=torch.float32), torch.tensor(cs)

    def loss_fn(batch: tuple[torch.Tensor, ...]) -> Loss:
        feats, m, order, hue, colour = batch
        out = head(feats, calibrated=False)
        loss = F.cross_entropy(out.modality_logits, m, label_smoothing=0.05)
        result = Loss(loss, {"modality": float(loss.detach())})
        if bool(colour.any()):
            result = result.plus("order", F.cross_entropy(out.order_logits[colour], order[colour]), order_weight)
            result = result.plus("hue", F.smooth_l1_loss(out.hue_degrees[colour] / HUE_UNIT, hue[colour] / HUE_UNIT), 0.5)
        return result

    def validate() -> dict[str, Any]:
        head.eval()
        return _val_metrics(head, val, order_weight)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in head.state_dict().items()}

    start = validate()
    log.record({"type": "initial", "epoch": -1, "global_step": 0, **start})
    kept: dict[str, Any] = {"state": snapshot(), "summary": start, "step": 0}
    done = {"steps": 0}

    def keep(summary: dict[str, Any], epoch: int) -> None:
        kept.update(state=snapshot(), summary=summary, step=(epoch + 1) * eval_every)

    score = SELECT_SCORES[select]
    best = BestKeeper(score, keep, value=start[score], epoch=-1)
    t0 = time.perf_counter()
    with isolated_rng(torch.device("cpu")):
        outcome = run_loop(
            Schedule(epochs=steps // eval_every, steps_per_epoch=eval_every, seed=seed, log_every=10,
                     samples_per_step=batch_size, scheduler_per_step=True),
            batches, loss_fn, opt, sched, list(head.named_parameters()),
            EpochHooks(train_mode=head.train, save_last=lambda *_: None, validate=validate, best=best),
            log, stop=stop, grad_clip=1.0,
        )
    done["steps"] = outcome.global_step
    head.load_state_dict(kept["state"])
    head.requires_grad_(False)
    head.eval()
    summary = {"start": start, "best": kept["summary"], "best_step": kept["step"], "steps": outcome.global_step,
               "stopped": outcome.stopped, "seconds": time.perf_counter() - t0}
    return kept["state"], summary


def calibrate(head: AppearanceHead, val: ValViews, *, target_precision: float = 0.995) -> dict[str, Any]:
    """Fit the temperature, ``auto``'s confidence threshold and the correction thresholds on ``val``
    (sets the head's buffers; returns what it chose and the validation figures behind it)."""
    with torch.inference_mode():
        logits, order, hue = _predict(head, val.feats)
    temps = np.exp(np.linspace(np.log(0.3), np.log(5.0), 60))
    nlls = [float(F.cross_entropy(logits / t, val.modality)) for t in temps]
    t_best = float(temps[int(np.argmin(nlls))])
    probs = (logits / t_best).softmax(1)
    conf, pred = probs.max(1)
    right = pred == val.modality
    threshold = 0.99
    for tau in np.round(np.arange(0.5, 0.995, 0.01), 2):
        sel = conf >= tau
        if bool(sel.any()) and float(right[sel].float().mean()) >= target_precision:
            threshold = float(tau)
            break
    sel = conf >= threshold
    stored = torch.tensor([v == "as stored" for v in val.view]) & val.colour
    p_order = order.softmax(1)
    non_id = p_order[:, 1:].max(1).values
    order_min = max(0.5, float(non_id[stored].max()) + 0.02) if bool(stored.any()) else 0.5
    order_min = min(order_min, 0.95)
    hue_stored = hue[stored].abs()
    hue_min = max(12.0, float(torch.quantile(hue_stored, 0.95))) if bool(stored.any()) else NEVER
    head.temperature.fill_(t_best)
    head.order_min_p.fill_(order_min)
    head.hue_min_degrees.fill_(hue_min)
    bgr = torch.tensor([v == "BGR" for v in val.view])
    return {
        "temperature": t_best,
        "nll_at_1": float(F.cross_entropy(logits, val.modality)),
        "nll_calibrated": float(min(nlls)),
        "auto_confidence_threshold": threshold,
        "accuracy": float(right.float().mean()),
        "asks": float((~sel).float().mean()),
        "wrong_unasked": float((~right & sel).float().mean()),
        "order_min_p": order_min,
        "bgr_detected": float(((p_order.argmax(1) == BGR_INDEX) & (non_id >= order_min))[bgr].float().mean()) if bool(bgr.any()) else None,
        "stored_reordered": float(((p_order.argmax(1) != 0) & (non_id >= order_min))[stored].float().mean()) if bool(stored.any()) else None,
        "hue_min_degrees": hue_min,
        "n_views": len(val.view),
    }


# ---- the stage: a model file in, a model file with a trained, calibrated appearance head out -------


@dataclass(frozen=True)
class HeadStageConfig:
    """Settings of ``train_head_stage`` (the ``appearance-head`` recipe stage and
    ``delightsam train-appearance-head``)."""

    steps: int = 300
    eval_every: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    #: other splits whose images join training (e.g. ["unseen"]: a head that has seen every camera)
    extra_train: tuple[str, ...] = ()
    train_max_per_dataset: int | None = None
    val_max_per_dataset: int | None = 30
    #: auto's confidence threshold: the lowest at which this share of confident validation picks is right
    target_precision: float = 0.995
    #: the channel-order loss's weight (modality cross-entropy has weight 1)
    order_weight: float = 0.5
    #: ``data.appearance.AppearanceMix``: probability of a channel reordering, share of them BGR
    #: (None: uniform), probability of a black canvas around the image
    reorder_p: float = 0.4
    bgr_share: float | None = None
    canvas_p: float = 0.0
    #: probability that a colour training image becomes greyscale
    greyscale_p: float = 0.1
    #: validation (and so calibration) also sees each colour image in greyscale
    val_greyscale: bool = False
    #: which validation score picks the state kept: "modality" (modality NLL) or "modality+order"
    select: str = "modality"
    #: per-modality changes of the mix, e.g. {"microscopy": {"hue_max": 12, "stain_sigma_max": 0.1}}
    #: (``data.appearance.AppearanceMix`` fields); the validation views' random mix follows it
    mix_by_modality: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def mix(self) -> MixByModality:
        base = AppearanceMix(reorder_p=self.reorder_p, bgr_share=self.bgr_share, canvas_p=self.canvas_p,
                             greyscale_p=self.greyscale_p)
        return MixByModality.from_settings(base, self.mix_by_modality)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadStageConfig:
        import dataclasses

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown appearance-head settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if not isinstance(values.get("mix_by_modality", {}), dict):
            raise ValueError("mix_by_modality must map a modality to {field: value}")
        cfg = cls(**values)
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.eval_every < 1 or cfg.lr <= 0:
            raise ValueError("steps, batch_size, eval_every and lr must be positive")
        if cfg.steps % cfg.eval_every:
            raise ValueError(f"steps ({cfg.steps}) must be a multiple of eval_every ({cfg.eval_every})")
        if cfg.order_weight < 0:
            raise ValueError(f"order_weight must be >= 0, got {cfg.order_weight}")
        _ = cfg.mix  # building it validates the probabilities
        if cfg.select not in SELECT_SCORES:
            raise ValueError(f"select must be one of {', '.join(sorted(SELECT_SCORES))}, got {cfg.select!r}")
        if not 0.5 < cfg.target_precision <= 1.0:
            raise ValueError(f"target_precision must be in (0.5, 1], got {cfg.target_precision}")
        return cfg


def train_head_stage(
    init: str | Path,
    data_root: str | Path,
    splits_file: str | Path,
    target: str | Path,
    cfg: HeadStageConfig,
    *,
    progress: Any = None,
    metrics: str | Path | None = None,
    command: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Give the model in ``init`` a trained, calibrated appearance head and write it to ``target``
    (fp16, ``init``'s metadata kept, ``modality_head_trained`` and ``auto_confidence_threshold``
    set). Returns the file and ``{"summary", "calibration"}``."""
    import json

    from ...checkpoint import RESERVED_METADATA_KEYS, load_checkpoint, read_checkpoint_info, save_checkpoint
    from ...data import discover, load_splits, select
    from ...inference import AUTO_CONFIDENCE_KEY, MODALITY_HEAD_TRAINED_KEY

    say = progress or (lambda event: None)
    _, init_meta = read_checkpoint_info(init)
    model = with_appearance_head(load_checkpoint(init))
    modalities = list(model.config.modalities)
    records = discover(data_root, None)
    splits = load_splits(splits_file)
    train_records = select(records, splits, "train", cfg.train_max_per_dataset)
    for extra in cfg.extra_train:
        train_records += select(records, splits, extra, cfg.train_max_per_dataset)
    val_records = select(records, splits, "val", cfg.val_max_per_dataset)
    if not train_records or not val_records:
        raise ValueError(f"no training or validation images under {data_root} for this split")
    say({"event": "appearance-head", "status": f"loading {len(train_records)} training and {len(val_records)} validation images"})
    train = load_head_images(train_records, modalities)
    val = validation_views(model, load_head_images(val_records, modalities), model.config.img_size, mix=cfg.mix,
                           grey_view=cfg.val_greyscale)
    say({"event": "appearance-head", "status": f"{len(val.view)} validation views; {cfg.steps} steps of {cfg.batch_size}"})
    log = RunLog(Path(metrics), progress) if metrics is not None else None
    _, summary = train_appearance_head(
        model, train, val, modalities=modalities, steps=cfg.steps, eval_every=cfg.eval_every,
        batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, mix=cfg.mix, order_weight=cfg.order_weight, select=cfg.select, log=log,
    )
    cal = calibrate(model.modality_head, val, target_precision=cfg.target_precision)
    meta = {k: v for k, v in init_meta.items() if k not in RESERVED_METADATA_KEYS}
    meta.update({
        MODALITY_HEAD_TRAINED_KEY: "true",
        AUTO_CONFIDENCE_KEY: f"{cal['auto_confidence_threshold']:.2f}",
        "appearance_head": json.dumps({"command": command, "splits": Path(splits_file).name,
                                       "train_splits": ["train", *cfg.extra_train], "summary": summary,
                                       "calibration": cal}, default=float),
    })
    path = save_checkpoint(target, model, meta, dtype=torch.float16)
    return path, {"summary": summary, "calibration": cal}
