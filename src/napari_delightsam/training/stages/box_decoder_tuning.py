"""Tune LiteMedSAM's mask decoder on the training split: the "tuned" box refiner.

LiteMedSAM draws a good mask from a box, but in the conventions of its own training corpus: on
this project's polyps, skin lesions and breast ultrasound its masks from a ground-truth box score
91.9 / 91.5 / 89.5 Dice on the validation split (LiteMedSAM's 256² frame). Its image encoder
and prompt encoder stay as published; only the mask decoder (4.06 M parameters) is trained, on
the embeddings of the training split, each step a random object of each image with its box
jittered by up to ``jitter`` of its size (wider than a user's box, so a box taken from an
imperfect prompt-free mask still gives the whole object). Loss: BCE + soft Dice on the 256²
logits, plus the MSE of the IoU head against the mask's real IoU (Refine all removes objects by
that score). The step with the best validation Dice (mean over modalities, ground-truth boxes
jittered by 10 %) is kept.

With ``prompt_free_fraction`` > 0, that share of each batch is instead a box the way *Refine all*
draws it: the bounding box of one connected component of the prompt-free model's own mask of a
training image (lesion modalities). Its target is the ground-truth objects the component touches;
a component that touches none (a stray region) has an empty target, which trains only the IoU
head (toward 0), so that Refine all's score threshold tells stray regions from lesions. (Measured
as ablation R11 in the model card: fewer boxes after Refine all on breast ultrasound, but worse
masks from a hand-drawn box on unseen nuclei and polyps; the bundled decoder does not use it.)

Embeddings are computed once per image (:func:`cache_records`, one safetensors file per image
under ``folder``, reused by a resumed run when its metadata matches); a training step then runs
the decoder only (about 1 s for 8 boxes on 2 CPU cores).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...click_simulation import CLICK_MODALITIES
from ...refine import LESION_MODALITIES
from ..loop.run import BestKeeper, EpochHooks, Loss, Schedule, StopFlag, isolated_rng, run_loop
from ..loop.runfolder import RunLog
from .click_tuning import CLICK_PROMPT_STYLES, click_batch, click_validation_dice

__all__ = [
    "BoxSample",
    "cache_records",
    "decoder_loss",
    "jitter_boxes",
    "load_cached",
    "prompt_free_tensors",
    "sample_tensors",
    "tune_decoder",
    "validation_dice",
]

#: at most this many objects (largest first) are kept per image
MAX_OBJECTS = 16

#: one step's batch: embeddings, (B,4) boxes, (B,256,256) targets, (B,) stray flags or None,
#: and the clicks ((B,N,2) pixel edges, (B,N) labels) of a click step or None
Batch = tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, "torch.Tensor | None",
              "tuple[torch.Tensor, torch.Tensor] | None"]


@dataclass(frozen=True)
class BoxSample:
    """One image, ready for decoder training: LiteMedSAM's embedding and its objects."""

    embedding: torch.Tensor  # (256, 64, 64) bfloat16
    masks: torch.Tensor  # (K, 256, 256) bool, each object in LiteMedSAM's 256² frame
    boxes: torch.Tensor  # (K, 4) float32, x0 y0 x1 y1 pixel edges in the 256² frame
    modality: str
    #: (M, 4) boxes of the prompt-free mask's components, in the 256² frame (M may be 0)
    pf_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    #: (M, 256, 256) bool: per component, the ground-truth objects it touches (empty: a stray region)
    pf_targets: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 256, 256, dtype=torch.bool))


def _to_frame(mask: np.ndarray, valid: tuple[int, int]) -> torch.Tensor:
    """A full-size bool mask in LiteMedSAM's 256² frame: area-resized to the unpadded part
    (``> 0.5``), zero-padded like the image."""
    nh, nw = valid
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    full = torch.zeros(256, 256, dtype=torch.bool)
    full[:nh, :nw] = F.interpolate(m, size=(nh, nw), mode="area")[0, 0] > 0.5
    return full


def prompt_free_tensors(prompt_free: np.ndarray, gt: np.ndarray, valid: tuple[int, int], scale: float,
                        max_objects: int = MAX_OBJECTS) -> dict[str, torch.Tensor]:
    """Refine all's boxes for one prompt-free mask, with their training targets.

    The components of ``prompt_free`` by Refine all's rule (``refine.objects_of_mask``, largest first,
    at most ``max_objects``): ``pf_boxes`` (M,4) in the 256² frame (input pixels × ``scale``) and
    ``pf_targets`` (M,256,256) uint8, each the union of the ground-truth objects (8-connected
    components of ``gt``) that the component overlaps -- all zero for a stray component.
    """
    from skimage.measure import label as connected

    from ...refine import DEFAULT_MAX_BOXES, DEFAULT_MIN_COMPONENT_FRACTION, objects_of_mask

    pf = np.asarray(prompt_free, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pf.shape != gt.shape:
        raise ValueError(f"prompt-free mask {pf.shape} and ground truth {gt.shape} differ in shape")
    found = objects_of_mask(pf.astype(np.uint8), "binary", DEFAULT_MIN_COMPONENT_FRACTION, DEFAULT_MAX_BOXES)
    gt_ids = connected(gt, connectivity=2)
    boxes, targets = [], []
    for box, member in zip(found.boxes[:max_objects], found.members[:max_objects], strict=False):
        touched = np.unique(gt_ids[(found.ids == member) & gt])
        boxes.append(torch.tensor(box, dtype=torch.float32) * scale)
        targets.append(_to_frame(np.isin(gt_ids, touched[touched > 0]), valid))
    return {
        "pf_boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4),
        "pf_targets": (torch.stack(targets) if targets else torch.zeros(0, 256, 256, dtype=torch.bool)).to(torch.uint8),
    }


def sample_tensors(refiner: Any, image: np.ndarray, gt: np.ndarray, max_objects: int = MAX_OBJECTS,
                   prompt_free: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Embedding, object masks and boxes of one (image, mask) pair in LiteMedSAM's frame, and,
    given the ``prompt_free`` mask of the image, its :func:`prompt_free_tensors`.

    Objects are the mask's 8-connected components by ``refine.component_boxes``' rule (largest
    first, at most ``max_objects``); each is area-resized to the unpadded part of the 256² input
    (``> 0.5``) and zero-padded like the image. ``refiner`` is a :class:`refine.BoxRefiner`.
    """
    from ...refine import DEFAULT_MAX_BOXES, DEFAULT_MIN_COMPONENT_FRACTION, objects_of_mask

    refiner.set_image(image)
    valid = tuple(refiner._valid)
    scale = refiner._scale
    gt = np.asarray(gt, dtype=bool)
    found = objects_of_mask(gt.astype(np.uint8), "binary", DEFAULT_MIN_COMPONENT_FRACTION, DEFAULT_MAX_BOXES)
    if len(found.boxes) == 0:
        raise ValueError("the mask holds no object")
    masks, boxes = [], []
    for box, member in zip(found.boxes[:max_objects], found.members[:max_objects], strict=False):
        masks.append(_to_frame(found.ids == member, valid))
        boxes.append(torch.tensor(box, dtype=torch.float32) * scale)
    out = {
        "embedding": refiner._embedding[0].to(torch.bfloat16).contiguous(),
        "masks": torch.stack(masks).to(torch.uint8),
        "boxes": torch.stack(boxes),
    }
    if prompt_free is not None:
        out.update(prompt_free_tensors(prompt_free, gt, valid, scale, max_objects))
    return out


def cache_records(
    records: Sequence[Any],
    refiner: Any,
    folder: Path,
    *,
    segmenter: Any = None,
    prompt_free_modalities: Sequence[str] = LESION_MODALITIES,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Path], list[str]]:
    """One safetensors file per record under ``folder`` (``00000.safetensors``...); a file whose
    metadata names the same record, LiteMedSAM weights and prompt-free model is kept (resume).
    With a ``segmenter`` (``inference.Segmenter``), images of ``prompt_free_modalities`` also get
    the boxes of its mask (:func:`prompt_free_tensors`). Returns the files and the records skipped
    (unreadable, or no object), one line each."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ...atomic_files import atomic_write
    from ...data import BadSampleError, load_pair

    folder.mkdir(parents=True, exist_ok=True)
    weights = str(refiner.weights.get("sha256"))
    files, skipped = [], []
    t0 = time.perf_counter()
    for n, rec in enumerate(records):
        path = folder / f"{n:05d}.safetensors"
        with_pf = segmenter is not None and rec.modality in prompt_free_modalities
        meta = {"key": rec.key, "id": rec.sample_id, "modality": rec.modality, "litemedsam_sha256": weights,
                "prompt_free_sha256": str(segmenter.checkpoint_sha256) if with_pf else "none"}
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if dict(f.metadata() or {}) == meta:
                    files.append(path)
                    continue
        try:
            image, gt = load_pair(rec)
            pf = np.asarray(segmenter.segment(image, modality=rec.modality).mask) if with_pf else None
            tensors = sample_tensors(refiner, image, gt, prompt_free=pf)
        except (BadSampleError, ValueError) as exc:
            skipped.append(f"{rec.key}/{rec.sample_id}: {exc}")
            continue
        atomic_write(path, lambda tmp, t=tensors, m=meta: save_file(t, str(tmp), metadata=m))
        files.append(path)
        if progress and (n + 1) % 50 == 0:
            progress(f"embedded {n + 1}/{len(records)} images ({time.perf_counter() - t0:.0f} s)")
    return files, skipped


def load_cached(files: Sequence[Path]) -> list[BoxSample]:
    """The samples of :func:`cache_records`' files (no pickle)."""
    from safetensors import safe_open

    out = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            modality = (f.metadata() or {}).get("modality", "")
            extra = {}
            if "pf_boxes" in f.keys():
                extra = {"pf_boxes": f.get_tensor("pf_boxes").float(), "pf_targets": f.get_tensor("pf_targets").bool()}
            out.append(BoxSample(f.get_tensor("embedding"), f.get_tensor("masks").bool(), f.get_tensor("boxes").float(),
                                 modality, **extra))
    return out


def jitter_boxes(boxes: torch.Tensor, fraction: float, rng: np.random.Generator, size: int = 256) -> torch.Tensor:
    """(N,4) boxes with each coordinate moved by U(-f, f) × the box's width (x) or height (y),
    clipped to ``[0, size]`` (the correction-effort benchmark's rule)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    span = torch.stack([w, h, w, h], dim=1)
    moved = boxes + torch.from_numpy(rng.uniform(-fraction, fraction, tuple(boxes.shape))).float() * span
    return moved.clamp(0, size)


def decoder_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor,
                 stray: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE + soft Dice of (N,256,256) logits against bool targets, + MSE of the IoU head (N,)
    against each thresholded mask's IoU (0 when both are empty). Items flagged ``stray`` (N,)
    bool -- a prompt-free box around a region with no object -- take no mask loss, only the IoU
    term (their IoU is 0)."""
    from ...model.losses import dice_loss

    with torch.no_grad():
        pred = logits > 0
        real_iou = (pred & target).sum((1, 2)) / (pred | target).sum((1, 2)).clamp(min=1)
    iou = F.mse_loss(iou_pred, real_iou.float())
    drawn = torch.ones(len(target), dtype=torch.bool, device=target.device) if stray is None else ~stray.to(target.device)
    if drawn.any():
        bce = F.binary_cross_entropy_with_logits(logits[drawn], target[drawn].float())
        dice = dice_loss(logits[drawn], target[drawn])
    else:
        bce = dice = logits.sum() * 0.0
    loss = bce + dice + iou
    return loss, {"bce": float(bce.detach()), "dice": float(dice.detach()), "iou_mse": float(iou.detach())}


def _decode(net: nn.Module, embeddings: torch.Tensor, boxes: torch.Tensor, dense_pe: torch.Tensor,
            dtype: torch.dtype | None, points: tuple[torch.Tensor, torch.Tensor] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,256,256) logits and (B,) scores of B box prompts, each with its clicks when ``points``
    ((B,N,2) pixel-edge coordinates in the 256² frame, (B,N) labels 1/0) is given -- shifted by
    -0.5 as ``BoxRefiner`` sends them (SAM's prompt encoder takes pixel indices)."""
    from ...devices import autocast_context

    device = embeddings.device
    with torch.no_grad():
        prompt_points = None if points is None else (points[0].to(device) - 0.5, points[1].to(device))
        sparse, dense = net.prompt_encoder(points=prompt_points, boxes=boxes[:, None, :].to(device), masks=None)
    with autocast_context(embeddings.device, dtype):
        low, iou = net.mask_decoder(
            image_embeddings=embeddings,
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
    return low.float()[:, 0], iou.float()[:, 0]


@torch.no_grad()
def validation_dice(net: nn.Module, samples: Sequence[BoxSample], *, dtype: torch.dtype | None = None,
                    jitter: float = 0.1, seed: int = 1) -> dict[str, float]:
    """Mean Dice per modality of the union of every object's mask, each from its own box
    jittered by up to ``jitter`` (seeded), in the 256² frame."""
    from ..evaluation.metrics import dice_from_counts

    was_training = net.mask_decoder.training
    net.mask_decoder.eval()
    device = next(net.mask_decoder.parameters()).device
    dense_pe = net.prompt_encoder.get_dense_pe().to(device)
    rng = np.random.default_rng(seed)
    per: dict[str, list[float]] = {}
    for s in samples:
        boxes = jitter_boxes(s.boxes, jitter, rng).to(device)
        emb = s.embedding.float().to(device)[None].expand(len(boxes), -1, -1, -1)
        low, _ = _decode(net, emb, boxes, dense_pe, dtype)
        pred = (low > 0).any(0).cpu()
        gt = s.masks.any(0)
        per.setdefault(s.modality, []).append(dice_from_counts(int((pred & gt).sum()), int(pred.sum()), int(gt.sum())))
    net.mask_decoder.train(was_training)
    return {m: float(np.mean(v)) for m, v in sorted(per.items())}


def _mixed_batch(train: Sequence[BoxSample], with_pf: Sequence[int], batch_size: int, jitter: float,
                 fraction: float, pf_jitter: float, rng: np.random.Generator,
                 ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch: per item, with probability ``fraction`` a random prompt-free component box of a
    random image in ``with_pf`` (jittered by up to ``pf_jitter``), else a random ground-truth
    object of a random image (jittered by up to ``jitter``). Returns embeddings, (B,4) boxes,
    (B,256,256) targets and (B,) stray flags (a prompt-free box with an empty target)."""
    embs, boxes, targets, stray = [], [], [], []
    for _ in range(batch_size):
        if rng.random() < fraction:
            s = train[with_pf[int(rng.integers(0, len(with_pf)))]]
            k = int(rng.integers(0, len(s.pf_boxes)))
            boxes.append(jitter_boxes(s.pf_boxes[k : k + 1], pf_jitter, rng)[0])
            targets.append(s.pf_targets[k])
            stray.append(not bool(s.pf_targets[k].any()))
        else:
            s = train[int(rng.integers(0, len(train)))]
            k = int(rng.integers(0, len(s.boxes)))
            boxes.append(jitter_boxes(s.boxes[k : k + 1], jitter, rng)[0])
            targets.append(s.masks[k])
            stray.append(False)
        embs.append(s.embedding)
    return embs, torch.stack(boxes), torch.stack(targets), torch.tensor(stray)


def tune_decoder(
    net: nn.Module,
    train: Sequence[BoxSample],
    val: Sequence[BoxSample],
    *,
    steps: int = 300,
    lr: float = 5e-5,
    batch_size: int = 8,
    jitter: float = 0.2,
    eval_every: int = 50,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    prompt_free_fraction: float = 0.0,
    prompt_free_jitter: float = 0.05,
    click_fraction: float = 0.0,
    click_rounds: int = 4,
    click_modalities: Sequence[str] = CLICK_MODALITIES,
    click_style: str = "widget",
    after_box_fraction: float = 0.0,
    log: RunLog | None = None,
    stop: StopFlag | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train ``net.mask_decoder`` (everything else frozen) and return the best decoder state on
    ``val`` and a summary (``start``/``best`` validation Dice per modality, ``best_step``).

    AdamW (weight decay 0.01), 20 warm-up steps then cosine decay; each step ``batch_size``
    images drawn at random, one random object each, its box jittered by up to ``jitter``; with
    probability ``prompt_free_fraction`` an item is instead one random prompt-free component box
    (:attr:`BoxSample.pf_boxes`, jittered by up to ``prompt_free_jitter``) of an image that has
    one. With ``click_fraction`` > 0, that share of the steps are click steps instead
    (:func:`click_tuning.click_batch`: objects of ``click_modalities`` prompted as the refine widget
    sends clicks in ``click_style``, 1 + U{0..``click_rounds``} clicks, the same number for the
    whole step; with probability ``after_box_fraction`` a click step is an after-box step instead: a
    rough box, then U{1..``click_rounds``} clicks); the validation then also measures Dice after
    1..3 simulated clicks (:func:`click_tuning.click_validation_dice`; with after-box steps also
    after a rough box and 1..3 clicks, reported) and the state kept is the best mean of the box
    Dice and the click Dice (``val_select``: half the box mean, half the mean over click modalities
    of Dice after 1 and after 3 clicks from no box). The steps run in the project's one training loop (:func:`loop.run_loop`), an "epoch" of
    ``eval_every`` steps between validations (so ``steps`` must be a multiple of it); validation
    also at step 0. ``log`` (a :class:`RunLog`) gets the ``initial`` row, a ``step`` row per step
    and an ``epoch`` row per validation (``global_step``, ``val_mean``, ``val_dice`` per modality),
    and their events; ``stop`` ends the run early (the best state so far is returned).
    """
    if not train or not val:
        raise ValueError("tuning needs training and validation images")
    if steps < 1 or batch_size < 1 or eval_every < 1:
        raise ValueError("steps, batch_size and eval_every must be >= 1")
    if steps % eval_every:
        raise ValueError(f"steps ({steps}) must be a multiple of eval_every ({eval_every})")
    if not 0.0 <= prompt_free_fraction <= 1.0:
        raise ValueError(f"prompt_free_fraction must be in [0, 1], got {prompt_free_fraction}")
    with_pf = [i for i, s in enumerate(train) if len(s.pf_boxes)]
    if prompt_free_fraction > 0 and not with_pf:
        raise ValueError("prompt_free_fraction > 0 needs training samples with prompt-free boxes (cache_records(segmenter=...))")
    if not 0.0 <= click_fraction <= 1.0 or click_rounds < 0:
        raise ValueError(f"click_fraction must be in [0, 1] and click_rounds >= 0, got {click_fraction}, {click_rounds}")
    if not 0.0 <= after_box_fraction <= 1.0 or (after_box_fraction > 0 and click_rounds < 1):
        raise ValueError(f"after_box_fraction must be in [0, 1] (and click_rounds >= 1), got {after_box_fraction}")
    if click_style not in CLICK_PROMPT_STYLES:
        raise ValueError(f"click_style must be one of {', '.join(CLICK_PROMPT_STYLES)}, got {click_style!r}")
    click_pool = [i for i, s in enumerate(train) if s.modality in click_modalities]
    if click_fraction > 0 and not click_pool:
        raise ValueError(f"click_fraction > 0 needs training images of {', '.join(click_modalities)}")
    log = log if log is not None else RunLog(Path("metrics.jsonl"), is_main=False)  # records nothing
    rng = np.random.default_rng(seed)
    net.requires_grad_(False)
    net.eval()
    decoder = net.mask_decoder.float()  # fp32 weights to train (a BoxRefiner may hold them in bf16)
    decoder.requires_grad_(True)
    device = next(decoder.parameters()).device
    dense_pe = net.prompt_encoder.get_dense_pe().detach().to(device)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )

    def decode(embs: torch.Tensor, boxes: torch.Tensor, points: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return _decode(net, embs.float().to(device), boxes.to(device), dense_pe, dtype, points)

    def batches(epoch: int) -> Iterator[Batch]:
        while True:  # one draw per step, from the one generator: the draws of a single straight run
            if click_fraction > 0 and rng.random() < click_fraction:
                after_box = after_box_fraction > 0 and rng.random() < after_box_fraction
                rounds = int(rng.integers(1 if after_box else 0, click_rounds + 1))
                embs, box, points, target = click_batch(train, click_pool, batch_size, rounds, rng, decode,
                                                        style=click_style, after_box=after_box)
                yield embs, box, target, None, points
            elif prompt_free_fraction > 0:
                yield (*_mixed_batch(train, with_pf, batch_size, jitter, prompt_free_fraction, prompt_free_jitter, rng),
                       None)
            else:  # ground-truth boxes only: the draws of the bundled decoder's run
                picks = [int(i) for i in rng.integers(0, len(train), batch_size)]
                ks = [int(rng.integers(0, len(train[i].boxes))) for i in picks]
                box = jitter_boxes(torch.stack([train[i].boxes[k] for i, k in zip(picks, ks, strict=True)]), jitter, rng)
                target = torch.stack([train[i].masks[k] for i, k in zip(picks, ks, strict=True)])
                yield [train[i].embedding for i in picks], box, target, None, None

    done = {"steps": 0}  # optimizer steps taken (one micro-batch each)

    def loss_fn(batch: Batch) -> Loss:
        done["steps"] += 1
        embs, box, target, stray, points = batch
        low, iou = decode(torch.stack(embs), box, points)
        loss, parts = decoder_loss(low, iou, target.to(device), stray)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss: {parts}")
        return Loss(loss, parts)

    def validate() -> dict[str, Any]:
        per = validation_dice(net, val, dtype=dtype)
        out: dict[str, Any] = {"val_mean": float(np.mean(list(per.values()))), "val_dice": per}
        if click_fraction > 0:
            was_training = decoder.training
            decoder.eval()
            clicks = click_validation_dice(val, decode, clicks=3, modalities=click_modalities, style=click_style)
            if after_box_fraction > 0:
                out["val_after_box"] = click_validation_dice(val, decode, clicks=3, modalities=click_modalities,
                                                             style=click_style, after_box=True)
            decoder.train(was_training)
            click_mean = float(np.mean([(d[0] + d[-1]) / 2 for d in clicks.values()])) if clicks else 0.0
            out.update(val_clicks=clicks, val_click_mean=click_mean, val_select=(out["val_mean"] + click_mean) / 2)
        return out

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in decoder.state_dict().items()}

    start = validate()
    log.record({"type": "initial", "epoch": -1, "global_step": 0, **start})
    log.emit({"event": "initial", "global_step": 0, **start})
    kept = {"state": snapshot(), "summary": start, "step": 0}

    def keep(summary: dict[str, Any], epoch: int) -> None:  # also after a stop, mid-"epoch"
        kept.update(state=snapshot(), summary=summary, step=done["steps"])

    metric = "val_select" if click_fraction > 0 else "val_mean"
    best = BestKeeper(metric, keep, value=start[metric], epoch=-1)
    t0 = time.perf_counter()
    with isolated_rng(device):
        outcome = run_loop(
            Schedule(epochs=steps // eval_every, steps_per_epoch=eval_every, seed=seed, log_every=1,
                     samples_per_step=batch_size, scheduler_per_step=True),
            batches,
            loss_fn,
            opt,
            sched,
            list(decoder.named_parameters()),
            EpochHooks(train_mode=decoder.train, save_last=lambda *_: None, validate=validate, best=best),
            log,
            stop=stop,
        )
    decoder.requires_grad_(False)
    decoder.eval()
    summary = {"start": start["val_dice"], "start_mean": start["val_mean"], "best": kept["summary"]["val_dice"],
               "best_mean": kept["summary"]["val_mean"], "best_step": kept["step"], "steps": outcome.global_step,
               "stopped": outcome.stopped, "seconds": time.perf_counter() - t0}
    if click_fraction > 0:
        summary.update(start_clicks=start["val_clicks"], best_clicks=kept["summary"]["val_clicks"],
                       start_select=start["val_select"], best_select=kept["summary"]["val_select"])
    return kept["state"], summary
