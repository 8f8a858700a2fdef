"""Evaluate a segmenter on a dataset split: per image, per dataset, per modality.

Metrics are those of ``metrics.py`` (Dice, HD, HD95 on the original grid and on the paper's
1024 grid; empty cases counted). The model sees each image as a user's image would be seen
(``Segmenter.segment`` on the decoded image, mask mapped back to the image's own size); the
time of that call is the reported time per image (file decoding and metrics excluded).

``--overlays DIR`` writes, per dataset, the best and worst cases by Dice as side-by-side PNGs:
image | prediction (red) | ground truth (green).
"""

from __future__ import annotations

import heapq
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...data import BadSampleError, SampleRecord, load_pair
from ...data.splits import Splits, load_splits, make_splits, select
from .metrics import aggregate, image_metrics

__all__ = ["EvalReport", "evaluate_records", "format_markdown", "resolve_eval_splits", "write_overlay"]

_OVERLAY_MAX_SIDE = 384
_OVERLAY_MIN_SIDE = 192


@dataclass
class EvalReport:
    images: list[dict[str, Any]]
    datasets: dict[str, dict[str, Any]]
    modalities: dict[str, dict[str, Any]]
    overall: dict[str, Any]
    mean_seconds_per_image: float | None
    skipped: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: undefined values (NaN HD of empty cases) become None."""
        return _clean(
            {
                **self.info,
                "mean_seconds_per_image": self.mean_seconds_per_image,
                "overall": self.overall,
                "datasets": self.datasets,
                "modalities": self.modalities,
                "skipped": self.skipped,
                "images": self.images,
            }
        )


def _clean(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def resolve_eval_splits(
    records: Sequence[SampleRecord],
    splits_path: str | Path | None,
    checkpoint: str | Path | None,
    seed: int | None,
    ratios: tuple[float, float, float] | None = None,
) -> tuple[Splits, str]:
    """The split to evaluate on, and where it came from.

    Order: an explicit ``splits_path``; the ``splits.json`` of the checkpoint's run folder; the
    deterministic split recomputed with the checkpoint's training seed and ratios (metadata),
    or ``seed`` / 0 — the same function ``train`` uses, so a model's held-out test images are
    the ones evaluated.
    """
    if splits_path is not None:
        return load_splits(splits_path), str(splits_path)
    meta: dict[str, str] = {}
    if checkpoint is not None:
        beside = Path(checkpoint).expanduser().parent / "splits.json"
        if beside.is_file():
            return load_splits(beside), str(beside)
        from ...checkpoint import read_checkpoint_info

        _, meta = read_checkpoint_info(checkpoint)
    use_seed = seed
    use_ratios = ratios
    if use_seed is None and "split_seed" in meta:
        use_seed = int(meta["split_seed"])
    if use_ratios is None and "train_config" in meta:
        try:
            use_ratios = tuple(json.loads(meta["train_config"]).get("split_ratios"))  # type: ignore[assignment]
        except (ValueError, TypeError):
            use_ratios = None
    use_seed = 0 if use_seed is None else use_seed
    use_ratios = use_ratios or (0.8, 0.1, 0.1)
    return make_splits(
        records, seed=use_seed, ratios=use_ratios
    ), f"recomputed (seed {use_seed}, ratios {list(use_ratios)})"


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(image), 0, 255).astype(np.uint8)


def _small(image: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlay-sized copies: big images subsampled to <= 384 px, tiny ones enlarged (nearest)."""
    h, w = gt.shape
    step = max(1, math.ceil(max(h, w) / _OVERLAY_MAX_SIDE))
    img, p, g = _to_uint8_rgb(image[::step, ::step]), pred[::step, ::step].copy(), gt[::step, ::step].copy()
    up = max(1, _OVERLAY_MIN_SIDE // max(img.shape[:2]))
    if up > 1:
        img, p, g = (np.repeat(np.repeat(a, up, axis=0), up, axis=1) for a in (img, p, g))
    return img, p, g


def write_overlay(path: Path, image: np.ndarray, pred: np.ndarray, gt: np.ndarray, caption: str = "") -> Path:
    """Side-by-side PNG: image | prediction in red | ground truth in green (contours filled 40%)."""
    from PIL import Image, ImageDraw

    from ...atomic_files import atomic_write

    img = _to_uint8_rgb(image).astype(np.float32)

    def tint(mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
        out = img.copy()
        out[mask] = 0.6 * out[mask] + 0.4 * np.array(colour, dtype=np.float32)
        return out.astype(np.uint8)

    gap = np.full((img.shape[0], 4, 3), 255, dtype=np.uint8)
    panel = np.concatenate(
        [img.astype(np.uint8), gap, tint(pred, (255, 0, 0)), gap, tint(gt, (0, 255, 0))], axis=1
    )
    pic = Image.fromarray(panel)
    if caption:
        canvas = Image.new("RGB", (pic.width, pic.height + 14), "white")
        canvas.paste(pic, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), caption, fill="black")
        pic = canvas
    return atomic_write(path, lambda tmp: pic.save(tmp, format="PNG"))


def evaluate_records(
    segmenter: Any,
    records: Sequence[SampleRecord],
    *,
    grid: int | None = 1024,
    modality_mode: str = "given",
    threshold: float = 0.5,
    overlays_dir: str | Path | None = None,
    overlays_per_dataset: int = 2,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    tiling: str = "auto",
) -> EvalReport:
    """Segment every record with ``segmenter`` (a ``Segmenter``) and score it.

    ``modality_mode``: "given" passes the dataset's modality (the paper's setting); "auto"
    lets the model's modality head choose and reports its accuracy. ``tiling``: the
    Segmenter's "auto" (its default: tiled only where ``tiling.AUTO_TILING`` says so), "on" or
    "off"; a tiled image's row has ``tiles``.
    """
    if modality_mode not in ("given", "auto"):
        raise ValueError(f"modality_mode must be 'given' or 'auto', got {modality_mode!r}")
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    times: list[float] = []
    # per dataset: min-heap of best (dice, n, arrays) and of worst (-dice, n, arrays)
    best: dict[str, list[tuple[float, int, Any]]] = {}
    worst: dict[str, list[tuple[float, int, Any]]] = {}
    for n, rec in enumerate(records):
        try:
            image, gt = load_pair(rec)
        except BadSampleError as exc:
            skipped.append(str(exc))
            warnings.warn(f"skipped: {exc}", UserWarning, stacklevel=2)
            continue
        modality = rec.modality if modality_mode == "given" else "auto"
        # the decoded pixels as uint8 (what a user's 8-bit file holds); a float array could be
        # re-scaled by the segmenter's own intensity rules
        pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        t0 = time.perf_counter()
        extra = {} if tiling == "auto" else {"tiling": tiling}  # "auto" is the Segmenter's default
        result = segmenter.segment(pixels, modality=modality, threshold=threshold, **extra)
        dt = time.perf_counter() - t0
        times.append(dt)
        pred = np.asarray(result.mask, dtype=bool)
        if pred.shape != gt.shape:
            raise RuntimeError(f"{rec.name}: prediction shape {pred.shape} != mask shape {gt.shape}")
        row: dict[str, Any] = {"key": rec.key, "modality": rec.modality, "id": rec.sample_id, "seconds": dt}
        if getattr(result, "tiling", None):
            row["tiles"] = int(result.tiling["tiles"])
        row.update(image_metrics(pred, gt, grid=grid))
        predicted = _predicted_modality(result)
        if predicted is not None:
            row["predicted_modality"] = predicted
        rows.append(row)
        if overlays_dir is not None and overlays_per_dataset > 0:
            arrays = _small(image, pred, gt)
            for heap, score in (
                (best.setdefault(rec.key, []), row["dice"]),
                (worst.setdefault(rec.key, []), -row["dice"]),
            ):
                item = (score, -n, (arrays, rec.sample_id, row["dice"]))
                if len(heap) < overlays_per_dataset:
                    heapq.heappush(heap, item)
                else:
                    heapq.heappushpop(heap, item)
        if progress is not None:
            progress(n + 1, len(records), row)

    report = summarise(rows)
    report.skipped = skipped
    report.mean_seconds_per_image = float(np.mean(times)) if times else None
    if overlays_dir is not None:
        _write_overlays(Path(overlays_dir), best, worst)
    return report


def _predicted_modality(result: Any) -> str | None:
    probs = getattr(result, "modality_probabilities", None)
    if probs:
        return max(probs.items(), key=lambda kv: kv[1])[0]
    return None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_overlays(folder: Path, best: dict[str, list], worst: dict[str, list]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, heaps in (("best", best), ("worst", worst)):
        for key, heap in heaps.items():
            ranked = sorted(heap, reverse=True)
            for rank, (_, _, ((img, pred, gt), sid, dice)) in enumerate(ranked, start=1):
                name = f"{_safe(key.replace('/', '__'))}__{kind}{rank}__{_safe(sid)}.png"
                caption = f"{key} {sid}  Dice {dice:.3f}   image | prediction | ground truth"
                write_overlay(folder / name, img, pred, gt, caption)


def summarise(rows: Sequence[dict[str, Any]]) -> EvalReport:
    by_key: dict[str, list[dict[str, Any]]] = {}
    by_mod: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r)
        by_mod.setdefault(r["modality"], []).append(r)
    datasets = {
        k: {"modality": v[0]["modality"], **aggregate(v), **_head_accuracy(v)}
        for k, v in sorted(by_key.items())
    }
    modalities = {m: {**aggregate(v), **_head_accuracy(v)} for m, v in sorted(by_mod.items())}
    mod_dice = [v["dice"] for v in modalities.values() if v.get("dice") is not None]
    overall = {
        **aggregate(rows),
        "mean_modality_dice": float(np.mean(mod_dice)) if mod_dice else None,
        **_head_accuracy(rows),
    }
    return EvalReport(list(rows), datasets, modalities, overall, None)


def _head_accuracy(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    known = [r for r in rows if "predicted_modality" in r]
    if not known:
        return {}
    return {"modality_accuracy": float(np.mean([r["predicted_modality"] == r["modality"] for r in known]))}


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.2f}" if pct else f"{v:.2f}"


def format_markdown(report: EvalReport, grid: int | None = 1024) -> str:
    """Two markdown tables (datasets, modalities): Dice in %, HD/HD95 in pixels."""
    g = grid is not None and grid > 0
    head = (
        "| {} | n | Dice % | HD px | HD95 px |"
        + (f" Dice@{grid} % | HD@{grid} | HD95@{grid} |" if g else "")
        + " HD excl. | empty pred | empty GT |"
    )
    cols = head.count("|") - 1
    lines = []
    for title, table in (("dataset", report.datasets), ("modality", report.modalities)):
        lines.append(head.format(title))
        lines.append("|" + "---|" * 1 + "---:|" * (cols - 1))
        for name, s in table.items():
            cells = [name, str(s["n"]), _fmt(s.get("dice"), True), _fmt(s.get("hd")), _fmt(s.get("hd95"))]
            if g:
                cells += [_fmt(s.get("dice_1024"), True), _fmt(s.get("hd_1024")), _fmt(s.get("hd95_1024"))]
            cells += [
                str(s.get("n_hd_excluded", 0)),
                str(s.get("n_empty_pred", 0)),
                str(s.get("n_empty_gt", 0)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    o = report.overall
    lines.append(
        f"mean Dice over modalities: {_fmt(o.get('mean_modality_dice'), True)} %; images: {o.get('n', 0)}; "
        f"mean time per image: {_fmt((report.mean_seconds_per_image or float('nan')) * 1000)} ms"
        + (
            f"; modality-head accuracy: {_fmt(o['modality_accuracy'], True)} %"
            if "modality_accuracy" in o
            else ""
        )
    )
    return "\n".join(lines)


def select_records(
    records: Sequence[SampleRecord], splits: Splits, split: str, max_per_dataset: int | None
) -> list[SampleRecord]:
    return select(records, splits, split, max_per_dataset)
