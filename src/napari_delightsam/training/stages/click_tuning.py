"""Clicks for the box refiner's decoder: simulated click prompts for training, and click validation.

The refine widget sends clicks the way ``refine.BoxRefiner.segment_clicks`` does: a first
positive click with one of the candidate boxes around it (``refine.click_candidate_boxes``:
squares of ``refine.CLICK_BOX_SIZES``, and elongated ones with ``refine.CLICK_BOX_ASPECTS``, an
ablation, empty by default; the one kept is the one whose mask gets the click right with the highest IoU score), further
clicks with the box the last click used, moved by the clicks (``refine.next_click_box``; the
widget also tries the last mask's extent). The bundled decoder was tuned with the squares and
the moved box alone; here every candidate is drawn from and validated at once. A
click step of :func:`box_decoder_tuning.tune_decoder` trains on exactly those prompts, in
LiteMedSAM's 256² frame: each item a random object of a random image, its first click a random
point deep inside it (:func:`click_simulation.random_interior_point`); with ``rounds`` = 0 its box
is a random candidate (so the IoU head learns which candidate fits), otherwise the candidate
that best fits the object's bounding box, and ``rounds`` further clicks follow the simulated user
(:func:`click_simulation.next_click` on the decoder's current mask, no gradient), each moving the
box. The target is always the whole object.

Every function here takes a ``decode(embeddings, boxes, points)`` callable -> (logits (B,256,256),
scores (B,)) so that it does not depend on how the decoder is run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ...click_simulation import interior_point, next_click, random_interior_point
from ...refine import click_candidate_boxes, mask_extent, next_click_box
from ..evaluation.metrics import dice_score

__all__ = ["ClickBatch", "candidate_boxes", "click_batch", "click_validation_dice", "points_tensor"]

#: LiteMedSAM's input frame (the longer side of every image is resized to it)
FRAME = 256

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


def click_batch(samples: Sequence[Any], pool: Sequence[int], batch_size: int, rounds: int,
                rng: np.random.Generator, decode: Decode) -> ClickBatch:
    """One click step's batch: ``batch_size`` objects of random images of ``pool`` (indices into
    ``samples``, :class:`box_decoder_tuning.BoxSample`), each prompted with ``1 + rounds`` clicks
    as described in the module docstring. Every item has the same number of clicks (no padding
    tokens: the prompt the decoder sees in the widget); when the mask is already exact the last
    click is repeated."""
    if not pool:
        raise ValueError("no training image of a click modality")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    embs, targets, points, labels, boxes = [], [], [], [], []
    for _ in range(batch_size):
        s = samples[pool[int(rng.integers(0, len(pool)))]]
        k = int(rng.integers(0, len(s.masks)))
        target = s.masks[k].numpy().astype(bool)
        first = random_interior_point(target, rng)
        cands = candidate_boxes(first)
        pick = int(rng.integers(0, len(cands))) if rounds == 0 else int(np.argmax(_box_iou(cands, mask_extent(target))))
        embs.append(s.embedding)
        targets.append(s.masks[k])
        points.append([first])
        labels.append([1])
        boxes.append(cands[pick])
    for _ in range(rounds):
        with torch.no_grad():
            low, _ = decode(torch.stack(embs), torch.tensor(np.stack(boxes), dtype=torch.float32),
                            points_tensor(points, labels))
        masks = (low > 0).cpu().numpy()
        for i, target in enumerate(targets):
            click = next_click(masks[i], target.numpy().astype(bool))
            point, sign = click if click is not None else (points[i][-1], labels[i][-1])
            points[i] = [*points[i], point]
            labels[i] = [*labels[i], sign]
            moved = next_click_box(boxes[i], points[i], labels[i])
            assert moved is not None  # a box was given
            boxes[i] = np.clip(moved, 0, FRAME)
    return (embs, torch.tensor(np.stack(boxes), dtype=torch.float32), points_tensor(points, labels),
            torch.stack(targets))


@torch.no_grad()
def click_validation_dice(samples: Sequence[Any], decode: Decode, *, clicks: int = 3,
                          modalities: Sequence[str], objects_per_image: int = 1,
                          images_per_modality: int | None = 24) -> dict[str, list[float]]:
    """Per modality of ``modalities``, the mean Dice (256² frame) of each object (the
    ``objects_per_image`` largest of each image; at most ``images_per_modality`` images, evenly
    spaced in the samples' order so that every dataset counts) after 1..``clicks`` simulated clicks, sent as the
    widget sends them: the first click (the object's deepest point) with every candidate box, the
    mask kept being the one that gets the click right with the highest score; each further click
    (:func:`click_simulation.next_click`) with the box the last one used, moved by the clicks."""
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
            first = interior_point(target)
            cands = candidate_boxes(first)
            n = len(cands)
            low, score = decode(s.embedding[None].expand(n, -1, -1, -1), torch.tensor(cands, dtype=torch.float32),
                                points_tensor([[first]] * n, [[1]] * n))
            r, c = int(first[1]), int(first[0])
            right = (low[:, r, c] > 0).cpu().numpy()
            best = max(range(n), key=lambda j: (bool(right[j]), float(score[j])))
            mask, box = (low[best] > 0).cpu().numpy(), cands[best]
            points, labels, dices = [first], [1], [dice_score(mask, target)]
            for _ in range(clicks - 1):
                click = next_click(mask, target)
                if click is None:
                    dices.append(dices[-1])
                    continue
                points.append(click[0])
                labels.append(click[1])
                moved = next_click_box(box, points, labels)
                assert moved is not None
                box = np.clip(moved, 0, FRAME)
                low, _ = decode(s.embedding[None], torch.tensor(box[None], dtype=torch.float32),
                                points_tensor([points], [labels]))
                mask = (low[0] > 0).cpu().numpy()
                dices.append(dice_score(mask, target))
            per.setdefault(s.modality, []).append(dices)
    return {m: [float(v) for v in np.mean(np.asarray(rows), axis=0)] for m, rows in sorted(per.items())}
