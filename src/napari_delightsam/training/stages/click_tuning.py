"""Clicks for the box refiner's decoder: simulated click prompts for training, and click validation.

The refine widget sends clicks the way ``refine.BoxRefiner.segment_clicks`` does: a first
positive click with the candidate boxes around it (``refine.click_candidate_boxes``: squares of
``refine.CLICK_BOX_SIZES``, and elongated ones with ``refine.CLICK_BOX_ASPECTS``, an ablation, empty
by default), the mask kept being the one that gets the clicks right with the highest IoU score;
each further click with two candidates (``refine.next_click_boxes``: the box the last click used,
moved by the clicks, and the last mask's extent), kept by the same rule; clicks after a drawn box
likewise, from that box. A click step of :func:`box_decoder_tuning.tune_decoder` trains on those
prompts (style "widget"), in LiteMedSAM's 256² frame: each item a random object of a random
image, its first click a random point deep inside it (:func:`click_simulation.random_interior_point`)
-- or, in an after-box step, a rough box around it -- then ``rounds`` further clicks by the
simulated user (:func:`click_simulation.next_click` on the mask the widget would show, no
gradient). The trained prompt is a random candidate of the last click (with ``rounds`` = 0 a
random first-click candidate), so the IoU head learns which candidate fits. The target is always
the whole object. The bundled decoder was tuned with the earlier style "moved-box" (the first
click's candidate that best fits the object, then the box moved by the clicks alone).

Every function here takes a ``decode(embeddings, boxes, points)`` callable -> (logits (B,256,256),
scores (B,)) so that it does not depend on how the decoder is run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ...click_simulation import interior_point, next_click, random_interior_point
from ...refine import _clicked_pixel, click_candidate_boxes, mask_extent, next_click_box, next_click_boxes
from ..evaluation.metrics import dice_score

__all__ = [
    "CLICK_PROMPT_STYLES", "ClickBatch", "candidate_boxes", "click_batch", "click_validation_dice", "keep_by_rule",
    "points_tensor",
]

#: LiteMedSAM's input frame (the longer side of every image is resized to it)
FRAME = 256
#: how click steps and the click validation send further clicks: "widget" (what the refine widget
#: sends: each click's candidate boxes decoded, the one its rule keeps followed) or "moved-box"
#: (how the bundled decoder was tuned: the first click's candidate that best fits the object, then
#: the box moved by the clicks alone)
CLICK_PROMPT_STYLES = ("widget", "moved-box")

#: ``decode(embeddings (B,256,64,64), boxes (B,4), points ((B,N,2) pixel edges, (B,N) labels) | None)``
Decode = Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]
#: a batch of click prompts: embeddings, (B,4) boxes, ((B,N,2) points, (B,N) labels), (B,256,256) targets
ClickBatch = tuple[list[torch.Tensor], torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]


def candidate_boxes(point: tuple[float, float], size: int = FRAME) -> np.ndarray:
    """The first click's candidate boxes (:func:`refine.click_candidate_boxes`) in LiteMedSAM's
    ``size``² frame, where the image's longer side is ``size``."""
    return click_candidate_boxes([point], (size, size))


def _box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    iy = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = ix * iy
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return inter / np.maximum(area, 1e-9)


def points_tensor(points: Sequence[Sequence[tuple[float, float]]], labels: Sequence[Sequence[int]],
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """((B,N,2) float32 pixel-edge coordinates, (B,N) int64 labels) of B prompts of N clicks each."""
    return (torch.tensor(np.asarray(points, dtype=np.float32), device=device),
            torch.tensor(np.asarray(labels, dtype=np.int64), device=device))


def _pixel_right(mask: np.ndarray, points: Sequence[tuple[float, float]], labels: Sequence[int]) -> int:
    """How many of the clicks ``mask`` ((256, 256) bool) gets right (a positive click inside it, a
    negative one outside)."""
    return sum(bool(mask[_clicked_pixel(x, y, mask.shape)]) == bool(sign)
               for (x, y), sign in zip(points, labels, strict=True))


def keep_by_rule(decode: Decode, embeddings: Sequence[torch.Tensor], candidates: Sequence[np.ndarray],
                 points: Sequence[Sequence[tuple[float, float]]], labels: Sequence[Sequence[int]],
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per item, (the kept box, its (256, 256) bool mask) among its ``candidates`` ((k, 4) boxes),
    each decoded with the item's clicks -- the refine widget's rule (``BoxRefiner.segment_clicks``):
    the most clicks right, then the decoder's highest score. One decoder call for every item's
    candidates; the items have the same number of clicks (none: box prompts alone)."""
    owner = [i for i, c in enumerate(candidates) for _ in range(len(c))]
    boxes = torch.tensor(np.concatenate([np.asarray(c, dtype=np.float32) for c in candidates]))
    clicks = points_tensor([points[i] for i in owner], [labels[i] for i in owner]) if len(points[0]) else None
    low, score = decode(torch.stack([embeddings[i] for i in owner]), boxes, clicks)
    masks, scores = (low > 0).cpu().numpy(), score.float().cpu().numpy()
    kept, start = [], 0
    for i, c in enumerate(candidates):
        best = max(range(len(c)), key=lambda k: (_pixel_right(masks[start + k], points[i], labels[i]),
                                                 float(scores[start + k])))
        kept.append((np.asarray(c[best], dtype=np.float64), masks[start + best]))
        start += len(c)
    return kept


def _further_candidates(box: np.ndarray, mask: np.ndarray, points: Sequence[tuple[float, float]],
                        labels: Sequence[int], style: str, after_box: bool) -> np.ndarray:
    """The candidate boxes (k, 4) of an object's next click, in the frame: ``style`` "widget" --
    :func:`refine.next_click_boxes` (the box moved by the clicks and the last mask's extent) --
    or "moved-box" (the moved box alone, as the bundled decoder was tuned)."""
    if style == "moved-box":
        moved = next_click_box(box, points, labels)
        assert moved is not None  # a box was given
        return np.clip(moved[None], 0, FRAME)
    candidates = next_click_boxes(box, mask, points, labels, largest_region_without_positive=after_box)
    assert candidates is not None
    return np.clip(candidates, 0, FRAME)


def _drawn_box(target: np.ndarray, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """A user's rough box around ``target``: its tight box, each coordinate moved by up to
    ``jitter`` × the box's side (:func:`box_decoder_tuning.jitter_boxes`, the box steps' rule)."""
    from .box_decoder_tuning import jitter_boxes

    tight = torch.tensor(mask_extent(target)[None], dtype=torch.float32)
    return jitter_boxes(tight, jitter, rng, size=FRAME)[0].numpy().astype(np.float64)


def click_batch(samples: Sequence[Any], pool: Sequence[int], batch_size: int, rounds: int,
                rng: np.random.Generator, decode: Decode, *, style: str = "widget", after_box: bool = False,
                box_jitter: float = 0.1) -> ClickBatch:
    """One click step's batch: ``batch_size`` objects of random images of ``pool`` (indices into
    ``samples``, :class:`box_decoder_tuning.BoxSample`), each prompted as the module docstring
    says: a first click and ``rounds`` further ones or, with ``after_box``, a rough box drawn
    around it (:func:`_drawn_box`) and ``rounds`` (≥ 1) clicks after it. ``style`` "widget": every
    candidate the widget tries is decoded (no gradient) and the one its rule keeps is followed
    (:func:`keep_by_rule`); the trained prompt is one of the last click's candidates at random (the
    IoU head learns which fits). "moved-box": the earlier rule (the first click's candidate that
    best fits the object, the box moved by each click). Every item has the same number of clicks
    (no padding tokens: the prompt the decoder sees in the widget); when the mask is already
    exact the last click is repeated."""
    if not pool:
        raise ValueError("no training image of a click modality")
    if rounds < 0 or (after_box and rounds < 1):
        raise ValueError(f"rounds must be >= 0 (>= 1 after a box), got {rounds}")
    if style not in CLICK_PROMPT_STYLES:
        raise ValueError(f"style must be one of {', '.join(CLICK_PROMPT_STYLES)}, got {style!r}")
    embs, targets, points, labels, boxes, firsts = [], [], [], [], [], []
    for _ in range(batch_size):
        s = samples[pool[int(rng.integers(0, len(pool)))]]
        k = int(rng.integers(0, len(s.masks)))
        target = s.masks[k].numpy().astype(bool)
        embs.append(s.embedding)
        targets.append(s.masks[k])
        if after_box:
            points.append([])
            labels.append([])
            boxes.append(_drawn_box(target, box_jitter, rng))
            continue
        first = random_interior_point(target, rng)
        cands = candidate_boxes(first)
        points.append([first])
        labels.append([1])
        firsts.append(cands)
        if rounds == 0:
            boxes.append(cands[int(rng.integers(0, len(cands)))])
        elif style == "moved-box":
            boxes.append(cands[int(np.argmax(_box_iou(cands, mask_extent(target))))])
        else:  # the widget's rule picks among ``firsts`` below
            boxes.append(None)
    masks: list[np.ndarray] = []
    if rounds and style == "widget":
        with torch.no_grad():
            kept = keep_by_rule(decode, embs, [b[None] for b in boxes] if after_box else firsts, points, labels)
        boxes, masks = [b for b, _ in kept], [m for _, m in kept]
    for r in range(rounds):
        if style == "moved-box":
            with torch.no_grad():
                low, _ = decode(torch.stack(embs), torch.tensor(np.stack(boxes), dtype=torch.float32),
                                points_tensor(points, labels) if len(points[0]) else None)
            masks = list((low > 0).cpu().numpy())
        candidates = []
        for i, target in enumerate(targets):
            click = next_click(masks[i], target.numpy().astype(bool))
            if click is None:  # exact: repeat the last click (after a box: a positive click at the middle)
                click = (points[i][-1], labels[i][-1]) if points[i] else (interior_point(target.numpy()), 1)
            points[i] = [*points[i], click[0]]
            labels[i] = [*labels[i], click[1]]
            candidates.append(_further_candidates(boxes[i], masks[i], points[i], labels[i], style, after_box))
        if style == "moved-box" or r == rounds - 1:
            # (one candidate: no draw, so "moved-box" keeps the earlier runs' random stream)
            boxes = [c[int(rng.integers(0, len(c)))] if len(c) > 1 else c[0] for c in candidates]
        else:
            with torch.no_grad():
                kept = keep_by_rule(decode, embs, candidates, points, labels)
            boxes, masks = [b for b, _ in kept], [m for _, m in kept]
    return (embs, torch.tensor(np.stack(boxes), dtype=torch.float32), points_tensor(points, labels),
            torch.stack(targets))


@torch.no_grad()
def click_validation_dice(samples: Sequence[Any], decode: Decode, *, clicks: int = 3,
                          modalities: Sequence[str], objects_per_image: int = 1,
                          images_per_modality: int | None = 24, style: str = "widget",
                          after_box: bool = False, box_jitter: float = 0.1, seed: int = 1,
                          ) -> dict[str, list[float]]:
    """Per modality of ``modalities``, the mean Dice (256² frame) of each object (the
    ``objects_per_image`` largest of each image; at most ``images_per_modality`` images, evenly
    spaced in the samples' order so that every dataset counts) after 1..``clicks`` simulated clicks, sent as the
    widget sends them: the first click (the object's deepest point) with every candidate box, the
    mask kept by the widget's rule (:func:`keep_by_rule`); each further click
    (:func:`click_simulation.next_click`) with the candidates of ``style`` (:func:`_further_candidates`),
    kept by the same rule. With ``after_box``: a rough box (``box_jitter``, seeded by ``seed``)
    first, then ``clicks`` clicks; the list is then Dice with the box alone, after 1..``clicks``."""
    rng = np.random.default_rng(seed)
    per: dict[str, list[list[float]]] = {}
    chosen: list[int] = []
    for modality in modalities:
        of = [i for i, s in enumerate(samples) if s.modality == modality]
        if images_per_modality is not None and len(of) > images_per_modality:
            of = [of[int(j)] for j in np.linspace(0, len(of) - 1, images_per_modality).round()]
        chosen += of
    for s in (samples[i] for i in sorted(chosen)):
        for k in range(min(objects_per_image, len(s.masks))):
            target = s.masks[k].numpy().astype(bool)
            emb = [s.embedding]
            if after_box:
                points: list[tuple[float, float]] = []
                labels: list[int] = []
                (box, mask), = keep_by_rule(decode, emb, [_drawn_box(target, box_jitter, rng)[None]], [[]], [[]])
            else:
                first = interior_point(target)
                points, labels = [first], [1]
                (box, mask), = keep_by_rule(decode, emb, [candidate_boxes(first)], [points], [labels])
            dices = [dice_score(mask, target)]
            for _ in range(clicks - (0 if after_box else 1)):
                click = next_click(mask, target)
                if click is None:
                    dices.append(dices[-1])
                    continue
                points, labels = [*points, click[0]], [*labels, click[1]]
                candidates = _further_candidates(box, mask, points, labels, style, after_box)
                (box, mask), = keep_by_rule(decode, emb, [candidates], [points], [labels])
                dices.append(dice_score(mask, target))
            per.setdefault(s.modality, []).append(dices)
    return {m: [float(v) for v in np.mean(np.asarray(rows), axis=0)] for m, rows in sorted(per.items())}
