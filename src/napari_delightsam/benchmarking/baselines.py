"""Baselines for the side-by-side accuracy comparison (``benchmarks/compare_baselines.py``).

Every method maps one decoded image (H,W,3 float32 in [0,255], from ``data.load_pair``) to an
(H,W) bool mask at the image's own size; all methods see the same images and are scored with
the same metrics (``training.evaluation.metrics.image_metrics``).

Methods (the names are the column names of the comparison table)
----------------------------------------------------------------
``litemedsam_gt_boxes``
    LiteMedSAM (``LiteMedSAMBoxSegmenter`` below) given one box per connected component of
    the *ground-truth* mask: the manual-prompt upper bound a user would pay for in clicks. The
    only method that sees the ground truth. Box rule (``component_boxes``): components with
    8-connectivity; a component smaller than ``min_fraction`` of the image (default 0.01 %) is
    ignored, except that the largest component is always kept; at most ``max_boxes`` boxes
    (default 200) per image, the largest components first. A box is the component's pixel-edge
    bounding box ``(x0, y0, x1, y1) = (min col, min row, max col + 1, max row + 1)``.
``litemedsam_whole_box``
    LiteMedSAM with one box covering the whole image: the naive prompt-free use.
``otsu``
    Otsu threshold of the grey image (ITU-R BT.601 luma); foreground = the side of the
    threshold with the smaller area (ties: the brighter side). One rule for every modality:
    no knowledge of the target's polarity, like the other prompt-free methods.
``delightsam_untrained`` / ``delightsam`` / ``delightsam_auto``
    Our ``Segmenter`` with random (seeded) weights / a checkpoint with the true modality given /
    a checkpoint with the modality predicted by its modality head ("auto").

The two LiteMedSAM methods share one image embedding per image (``CachedEncoder``): the result
is the same as two independent calls, and each method's time still counts the embedding in full.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..refine import DEFAULT_MAX_BOXES, DEFAULT_MIN_COMPONENT_FRACTION, ComponentBoxes, component_boxes

__all__ = [
    "DEFAULT_MAX_BOXES",
    "DEFAULT_MIN_COMPONENT_FRACTION",
    "METHOD_NAMES",
    "CachedEncoder",
    "ComponentBoxes",
    "DeLightSAMMethod",
    "LiteMedSAMBoxSegmenter",
    "LiteMedSAMGTBoxes",
    "LiteMedSAMWholeBox",
    "Method",
    "TunedRefinerGTBoxes",
    "OtsuMethod",
    "Prediction",
    "component_boxes",
    "format_comparison_markdown",
    "grey",
    "otsu_foreground",
    "run_comparison",
    "share_embedding",
    "summarise_method",
    "whole_image_box",
]

#: every method this module knows, in table order
METHOD_NAMES: tuple[str, ...] = (
    "litemedsam_gt_boxes",
    "tuned_refiner_gt_boxes",
    "litemedsam_whole_box",
    "otsu",
    "delightsam_untrained",
    "delightsam",
    "delightsam_auto",
)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


# -- LiteMedSAM with box prompts ---------------------------------------------------------------


Box = Sequence[float]


class LiteMedSAMBoxSegmenter:
    """LiteMedSAM with box prompts, as a baseline: ``segment(image, boxes) -> (H,W) bool``.

    A thin wrapper over ``refine.BoxRefiner`` (one implementation of LiteMedSAM's pre-processing
    and box decoding, ``model.litemedsam.litemedsam_box_input``): the longest side resized to 256 (area
    average), min-max scaled to [0, 1], padded bottom/right to 256²; boxes (pixel edges, clipped
    to the image) scaled by the same factor. Each box gives one mask (the 256² low-res logits
    cropped to the unpadded area, resized back to H×W bilinearly, probability > ``threshold``);
    the result is their union. ``fast=False`` (default here): plain fp32 eager, the reference
    the refiner's fast path is measured against. ``net`` is the LiteMedSAM network.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        preprocessing: str = "longest_side",
        threshold: float = 0.5,
        *,
        fast: bool = False,
        decoder: str | Path | None = None,
    ) -> None:
        if preprocessing != "longest_side":
            raise ValueError(
                "preprocessing must be 'longest_side' (LiteMedSAM's own: longest side to 256, min-max, pad)"
            )
        from ..model.litemedsam import build_litemedsam, fuse_litemedsam, load_box_decoder
        from ..refine import BoxRefiner

        net = build_litemedsam()
        self.decoder = None if decoder is None else Path(decoder)
        if self.decoder is not None:  # a tuned mask decoder (``delightsam tune-refiner``)
            load_box_decoder(self.decoder, net)
        if fast:
            fuse_litemedsam(net)
        self.refiner = BoxRefiner(net, device, fast=fast, threshold=threshold)
        self.device = self.refiner.device
        self.preprocessing = preprocessing
        self.threshold = self.refiner.threshold
        self.net = self.refiner.net

    def segment(self, image: np.ndarray, boxes: Sequence[Box] | np.ndarray) -> np.ndarray:
        """Union of the LiteMedSAM masks of all ``boxes`` ((x0,y0,x1,y1) pixel edges) -> (H,W) bool.

        The image follows the Segmenter's input rules (``preprocess.prepare_array``).
        """
        from ..preprocess import prepare_array

        if len(boxes) == 0:
            _, info = prepare_array(image, max_pixels=self.refiner.max_pixels)  # the same checks
            return np.zeros(info.size, dtype=bool)
        self.refiner.set_image(image)
        return self.refiner.segment_boxes(boxes).any(axis=0)


# -- ground-truth boxes -------------------------------------------------------------------------


def whole_image_box(shape: tuple[int, ...]) -> np.ndarray:
    """(1,4) box ``(0, 0, W, H)`` covering an image of shape (H,W[,C])."""
    h, w = int(shape[0]), int(shape[1])
    return np.array([[0.0, 0.0, float(w), float(h)]])


# -- Otsu ---------------------------------------------------------------------------------------


def grey(image: np.ndarray) -> np.ndarray:
    """(H,W) float64 grey image: BT.601 luma of RGB(A), the image itself when it is (H,W)."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[2] == 1:
        return arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return arr[:, :, :3] @ _LUMA
    raise ValueError(f"expected an (H,W) or (H,W,1|3|4) image, got shape {arr.shape}")


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """(H,W) bool: the smaller side of the grey image's Otsu threshold (ties: the brighter side).

    A constant image has no threshold: the mask is empty.
    """
    from skimage.filters import threshold_otsu

    g = grey(image)
    if g.size == 0 or float(g.min()) == float(g.max()):
        return np.zeros(g.shape, dtype=bool)
    bright = g > threshold_otsu(g)
    n_bright = int(bright.sum())
    return bright if n_bright <= g.size - n_bright else ~bright


# -- shared LiteMedSAM embedding ----------------------------------------------------------------


class CachedEncoder(nn.Module):
    """Wraps an image encoder: a call with exactly the previous input returns the previous output.

    ``last_hit`` says whether the latest call was served from the cache (reset it to False
    before a call that may not reach the encoder); ``compute_seconds`` is the time the cached
    output took to compute, so a caller can charge it to every user of the embedding.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self._key: torch.Tensor | None = None
        self._out: Any = None
        self.compute_seconds = 0.0
        self.last_hit = False
        self.hits = 0
        self.misses = 0

    def forward(self, x: torch.Tensor) -> Any:
        key = self._key
        if (
            key is not None
            and key.shape == x.shape
            and key.dtype == x.dtype
            and key.device == x.device
            and torch.equal(key, x)
        ):
            self.last_hit = True
            self.hits += 1
            return self._out
        t0 = time.perf_counter()
        out = self.encoder(x)
        self.compute_seconds = time.perf_counter() - t0
        self._key, self._out = x.detach().clone(), out
        self.last_hit = False
        self.misses += 1
        return out


def share_embedding(box_segmenter: Any) -> CachedEncoder:
    """Put a ``CachedEncoder`` around ``box_segmenter.net.image_encoder`` (once) and return it."""
    net = box_segmenter.net
    if not isinstance(net.image_encoder, CachedEncoder):
        net.image_encoder = CachedEncoder(net.image_encoder)
    return net.image_encoder


# -- methods ------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One method's answer for one image."""

    mask: np.ndarray
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    name: str
    description: str

    def predict(self, image: np.ndarray, gt: np.ndarray, modality: str) -> Prediction: ...


class _LiteMedSAMMethod:
    def __init__(self, box_segmenter: Any) -> None:
        self.segmenter = box_segmenter
        self.cache = share_embedding(box_segmenter)

    def _segment(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, float]:
        self.cache.last_hit = False
        t0 = time.perf_counter()
        mask = np.asarray(self.segmenter.segment(image, boxes), dtype=bool)
        seconds = time.perf_counter() - t0
        if self.cache.last_hit:  # charge the shared embedding to this method too
            seconds += self.cache.compute_seconds
        return mask, seconds


class LiteMedSAMGTBoxes(_LiteMedSAMMethod):
    name = "litemedsam_gt_boxes"

    def __init__(
        self,
        box_segmenter: Any,
        min_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
        max_boxes: int = DEFAULT_MAX_BOXES,
    ) -> None:
        super().__init__(box_segmenter)
        self.min_fraction = float(min_fraction)
        self.max_boxes = int(max_boxes)
        self.description = (
            "LiteMedSAM, one ground-truth box per 8-connected component (pixel-edge bounding box); "
            f"components < {100 * self.min_fraction:g} % of the image ignored (the largest always kept); "
            f"at most {self.max_boxes} boxes per image, largest first"
        )

    def predict(self, image: np.ndarray, gt: np.ndarray, modality: str) -> Prediction:
        cb = component_boxes(gt, min_fraction=self.min_fraction, max_boxes=self.max_boxes)
        mask, seconds = self._segment(image, cb.boxes)
        info = {
            "n_boxes": int(len(cb.boxes)),
            "n_components": cb.n_components,
            "n_small_ignored": cb.n_small,
            "n_capped": cb.n_capped,
        }
        return Prediction(mask, seconds, info)


class TunedRefinerGTBoxes(LiteMedSAMGTBoxes):
    """``LiteMedSAMGTBoxes`` with the box refiner's tuned mask decoder (``box_segmenter`` built
    with ``decoder=FILE``): the same boxes, the tool's own refiner."""

    name = "tuned_refiner_gt_boxes"

    def __init__(self, box_segmenter: Any, min_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
                 max_boxes: int = DEFAULT_MAX_BOXES) -> None:
        super().__init__(box_segmenter, min_fraction, max_boxes)
        name = getattr(box_segmenter, "decoder", None)
        self.description = self.description.replace(
            "LiteMedSAM,", f"LiteMedSAM with the tuned mask decoder ({getattr(name, 'name', name)}),", 1)


class LiteMedSAMWholeBox(_LiteMedSAMMethod):
    name = "litemedsam_whole_box"
    description = "LiteMedSAM, one box covering the whole image (no manual prompt)"

    def predict(self, image: np.ndarray, gt: np.ndarray, modality: str) -> Prediction:
        mask, seconds = self._segment(image, whole_image_box(image.shape))
        return Prediction(mask, seconds)


class OtsuMethod:
    name = "otsu"
    description = (
        "Otsu threshold of the grey (BT.601 luma) image; foreground = the side with the smaller "
        "area (one rule for every modality)"
    )

    def predict(self, image: np.ndarray, gt: np.ndarray, modality: str) -> Prediction:
        t0 = time.perf_counter()
        mask = otsu_foreground(image)
        return Prediction(mask, time.perf_counter() - t0)


class DeLightSAMMethod:
    """A ``Segmenter`` scored as ``delightsam evaluate`` scores it (``segment(image, modality)``)."""

    def __init__(
        self, name: str, segmenter: Any, description: str, *, auto: bool = False, threshold: float = 0.5
    ) -> None:
        self.name = name
        self.segmenter = segmenter
        self.description = description
        self.auto = bool(auto)
        self.threshold = float(threshold)

    def predict(self, image: np.ndarray, gt: np.ndarray, modality: str) -> Prediction:
        t0 = time.perf_counter()
        result = self.segmenter.segment(
            image, modality="auto" if self.auto else modality, threshold=self.threshold
        )
        seconds = time.perf_counter() - t0
        info = {"predicted_modality": str(result.modality)} if self.auto else {}
        return Prediction(np.asarray(result.mask, dtype=bool), seconds, info)


# -- the comparison loop ------------------------------------------------------------------------


def run_comparison(
    records: Sequence[Any],
    methods: Sequence[Method],
    *,
    load: Callable[[Any], tuple[np.ndarray, np.ndarray]],
    grid: int | None = None,
    on_image: Callable[[int, int, list[dict[str, Any]]], None] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Every method on every record (each image decoded once); per-image rows per method.

    ``load(record) -> (image, gt)`` decodes a record (``data.load_pair``); a record it refuses
    with ``ValueError`` (``BadSampleError``) is skipped for all methods and listed. Row keys:
    ``key, modality, id, seconds`` + ``image_metrics`` + the method's ``info``.
    """
    from ..training.evaluation.metrics import image_metrics

    rows: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    skipped: list[str] = []
    for n, rec in enumerate(records):
        try:
            image, gt = load(rec)
        except ValueError as exc:
            skipped.append(str(exc))
            continue
        image_rows = []
        for method in methods:
            pred = method.predict(image, gt, rec.modality)
            if pred.mask.shape != gt.shape:
                raise RuntimeError(
                    f"{method.name} on {rec.key}/{rec.sample_id}: mask shape {pred.mask.shape} != {gt.shape}"
                )
            row: dict[str, Any] = {
                "method": method.name,
                "key": rec.key,
                "modality": rec.modality,
                "id": rec.sample_id,
                "seconds": pred.seconds,
            }
            row.update(image_metrics(pred.mask, gt, grid=grid))
            row.update(pred.info)
            rows[method.name].append(row)
            image_rows.append(row)
        if on_image is not None:
            on_image(n + 1, len(records), image_rows)
    return rows, skipped


def _head_accuracy(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    known = [r for r in rows if "predicted_modality" in r]
    if not known:
        return {}
    return {"modality_accuracy": float(np.mean([r["predicted_modality"] == r["modality"] for r in known]))}


def _box_counts(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not rows or "n_boxes" not in rows[0]:
        return {}
    boxes = [int(r["n_boxes"]) for r in rows]
    return {
        "boxes_total": int(sum(boxes)),
        "boxes_max": int(max(boxes)),
        "boxes_mean": float(np.mean(boxes)),
        "images_capped": int(sum(1 for r in rows if r["n_capped"] > 0)),
        "components_capped": int(sum(r["n_capped"] for r in rows)),
        "components_small_ignored": int(sum(r["n_small_ignored"] for r in rows)),
    }


def summarise_method(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per dataset, per modality and overall means (``metrics.aggregate``), plus time, box counts
    (GT-box method) and the modality head's accuracy and confusion (auto method)."""
    from ..training.evaluation.metrics import aggregate

    by_key: dict[str, list[dict[str, Any]]] = {}
    by_mod: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r)
        by_mod.setdefault(r["modality"], []).append(r)

    def stats(group: Sequence[dict[str, Any]]) -> dict[str, Any]:
        secs = [float(r["seconds"]) for r in group]
        return {
            **aggregate(group),
            "seconds_per_image": float(np.mean(secs)) if secs else None,
            **_box_counts(group),
            **_head_accuracy(group),
        }

    datasets = {k: {"modality": v[0]["modality"], **stats(v)} for k, v in sorted(by_key.items())}
    modalities = {m: stats(v) for m, v in sorted(by_mod.items())}
    mod_dice = [v["dice"] for v in modalities.values() if v.get("dice") is not None]
    overall = {
        **stats(rows),
        "mean_modality_dice": float(np.mean(mod_dice)) if mod_dice else None,
        "seconds_total": float(sum(float(r["seconds"]) for r in rows)),
    }
    out: dict[str, Any] = {"overall": overall, "datasets": datasets, "modalities": modalities}
    if any("predicted_modality" in r for r in rows):
        confusion: dict[str, dict[str, int]] = {}
        for r in rows:
            row = confusion.setdefault(r["modality"], {})
            row[r["predicted_modality"]] = row.get(r["predicted_modality"], 0) + 1
        out["modality_confusion"] = {k: dict(sorted(v.items())) for k, v in sorted(confusion.items())}
    return out


# -- markdown -----------------------------------------------------------------------------------


def _cell(value: Any, scale: float = 1.0, excluded: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "–"
    else:
        text = f"{scale * float(value):.1f}"
    return f"{text} ({excluded})" if excluded else text


def _metric_table(
    result: dict[str, Any], names: Sequence[str], metric: str, scale: float, with_excluded: bool
) -> list[str]:
    methods = result["methods"]
    first = methods[names[0]]
    lines = ["| dataset | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]

    def line(label: str, n: Any, getter: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
        cells = []
        for name in names:
            s = getter(methods[name]) or {}
            exc = int(s.get("n_hd_excluded", 0) or 0) if with_excluded else 0
            cells.append(_cell(s.get(metric), scale, exc))
        return f"| {label} | {n} | " + " | ".join(cells) + " |"

    for key, s in first["datasets"].items():
        lines.append(line(key, s["n"], lambda m, k=key: m["datasets"].get(k)))
    if len(first["modalities"]) != len(first["datasets"]):
        for mod, s in first["modalities"].items():
            lines.append(line(f"modality {mod}", s["n"], lambda m, k=mod: m["modalities"].get(k)))
    if metric == "dice":
        lines.append(
            f"| **mean over modalities** | {first['overall']['n']} | "
            + " | ".join(_cell(methods[n]["overall"].get("mean_modality_dice"), 100) for n in names)
            + " |"
        )
    lines.append(line("all images", first["overall"]["n"], lambda m: m["overall"]))
    return lines


def format_comparison_markdown(result: dict[str, Any]) -> str:
    """The comparison as markdown: Dice, HD95 and HD tables, time, box counts, head accuracy."""
    names = list(result["methods"])
    if not names:
        return "no methods were run"
    info = result["info"]
    out = [
        f"# Side-by-side accuracy: {info.get('split')} split",
        "",
        "```",
        info.get("command", ""),
        "```",
        "",
        f"- data: `{info.get('data')}`; split `{info.get('split')}` from {info.get('split_source')}; "
        f"{result['methods'][names[0]]['overall']['n']} images"
        + (f" (at most {info['max_per_dataset']} per dataset)" if info.get("max_per_dataset") else ""),
        f"- device {info.get('device')} ({info.get('cpu_count')} CPUs, process niceness {info.get('niceness')}), "
        f"torch threads {info.get('threads')}, "
        f"De-LightSAM precision {info.get('precision')}; code {info.get('code_version')}; {info.get('date')}",
        f"- metrics at each image's original resolution{info.get('grid_note', '')}; "
        "Dice 1 when prediction and ground truth are both empty",
        "",
        "## Dice % (mean over images)",
        "",
        *_metric_table(result, names, "dice", 100.0, False),
        "",
        "## HD95 px (mean over images; in parentheses: images left out because the prediction or "
        "the ground truth is empty)",
        "",
        *_metric_table(result, names, "hd95", 1.0, True),
        "",
        "## HD px (maximum boundary distance; same exclusions)",
        "",
        *_metric_table(result, names, "hd", 1.0, True),
        "",
        "## Time per image",
        "",
        "| method | s / image | total s | load s |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        o = result["methods"][name]["overall"]
        load = result["methods"][name].get("load_seconds")
        spi = o.get("seconds_per_image")
        out.append(
            f"| {name} | {'–' if spi is None else f'{spi:.2f}'} | {o.get('seconds_total', 0.0):.0f} "
            f"| {'–' if load is None else f'{load:.1f}'} |"
        )
    out += ["", "## Methods", ""]
    for name in names:
        out.append(f"- `{name}`: {result['methods'][name]['description']}")
    gt = result["methods"].get("litemedsam_gt_boxes")
    if gt is not None:
        out += ["", "### Ground-truth boxes given to `litemedsam_gt_boxes`", ""]
        out += [
            "| dataset | boxes | mean / image | max / image | images capped | small components ignored |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for key, s in [*gt["datasets"].items(), ("all images", gt["overall"])]:
            out.append(
                f"| {key} | {s.get('boxes_total', 0)} | {s.get('boxes_mean', 0.0):.1f} | {s.get('boxes_max', 0)} "
                f"| {s.get('images_capped', 0)} | {s.get('components_small_ignored', 0)} |"
            )
    auto = result["methods"].get("delightsam_auto")
    if auto is not None:
        out += ["", "### Modality head (`delightsam_auto`): accuracy per modality", ""]
        out += ["| modality | n | accuracy % | predicted as |", "|---|---:|---:|---|"]
        for mod, s in auto["modalities"].items():
            conf = auto.get("modality_confusion", {}).get(mod, {})
            spread = ", ".join(f"{k} {v}" for k, v in conf.items())
            out.append(f"| {mod} | {s['n']} | {_cell(s.get('modality_accuracy'), 100)} | {spread} |")
        out.append(
            f"| **all** | {auto['overall']['n']} | {_cell(auto['overall'].get('modality_accuracy'), 100)} | |"
        )
    if result.get("skipped"):
        out += ["", f"Skipped (unreadable) images: {len(result['skipped'])}"]
        out += [f"- {s}" for s in result["skipped"]]
    return "\n".join(out) + "\n"
