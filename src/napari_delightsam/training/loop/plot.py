"""Training curves as a PNG, drawn with Pillow (no matplotlib dependency).

Left panel: training loss per logged step (or per epoch); right panel: validation Dice per
modality and their mean, per epoch. Input: the rows of ``metrics.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ...atomic_files import atomic_write

__all__ = ["plot_curves", "plot_lines"]

_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
_W, _H = 520, 360
_M = dict(left=58, right=16, top=30, bottom=40)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + 1e-9 * step:
        out.append(round(v, 10))
        v += step
    return out


def _panel(
    title: str,
    xlabel: str,
    series: list[tuple[str, list[float], list[float]]],
    y_range: tuple[float, float] | None = None,
) -> Image.Image:
    img = Image.new("RGB", (_W, _H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, y0 = _M["left"], _M["top"]
    x1, y1 = _W - _M["right"], _H - _M["bottom"]
    d.text((x0, 8), title, fill="black", font=font)
    d.text(((x0 + x1) // 2 - 20, _H - 16), xlabel, fill="black", font=font)
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy if math.isfinite(y)]
    if not xs or not ys:
        d.text((x0 + 10, (y0 + y1) // 2), "no data yet", fill="grey", font=font)
        d.rectangle([x0, y0, x1, y1], outline="black")
        return img
    xlo, xhi = min(xs), max(xs)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    ylo, yhi = y_range if y_range else (min(ys), max(ys))
    if yhi == ylo:
        ylo, yhi = ylo - 0.5, yhi + 0.5

    def px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for t in _ticks(ylo, yhi):
        _, yy = px(xlo, t)
        d.line([x0, yy, x1, yy], fill="#e6e6e6")
        d.text((4, yy - 6), f"{t:.3g}", fill="black", font=font)
    for t in _ticks(xlo, xhi):
        xx, _ = px(t, ylo)
        d.line([xx, y1, xx, y1 + 4], fill="black")
        d.text((xx - 8, y1 + 6), f"{t:g}", fill="black", font=font)
    d.rectangle([x0, y0, x1, y1], outline="black")
    for i, (name, sx, sy) in enumerate(series):
        colour = _COLOURS[i % len(_COLOURS)]
        pts = [px(x, y) for x, y in zip(sx, sy, strict=True) if math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2 if name == "mean" else 1)
        for p in pts if len(pts) < 40 else []:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        d.text((x1 - 110, y0 + 4 + 12 * i), name, fill=colour, font=font)
    return img


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write the loss and validation-Dice curves of ``rows`` (metrics.jsonl lines) to ``path``."""
    steps = [r for r in rows if r.get("type") == "step"]
    epochs = [r for r in rows if r.get("type") in ("epoch", "initial")]
    if steps:
        loss = [("train loss", [float(r["global_step"]) for r in steps], [float(r["loss"]) for r in steps])]
        xlabel = "optimizer step"
    else:
        trained = [r for r in epochs if r.get("train_loss") is not None]
        loss = [
            ("train loss", [float(r["epoch"]) for r in trained], [float(r["train_loss"]) for r in trained])
        ]
        xlabel = "epoch"
    val_rows = [r for r in epochs if r.get("val_dice") is not None]
    names = sorted({m for r in val_rows for m in (r.get("val_dice_per_modality") or {})})
    dice = [
        (
            m,
            [float(r["epoch"]) for r in val_rows if m in r["val_dice_per_modality"]],
            [float(r["val_dice_per_modality"][m]) for r in val_rows if m in r["val_dice_per_modality"]],
        )
        for m in names
    ]
    dice.append(("mean", [float(r["epoch"]) for r in val_rows], [float(r["val_dice"]) for r in val_rows]))
    left = _panel("training loss", xlabel, loss)
    right = _panel("validation Dice (epoch -1: before training)", "epoch", dice, (0.0, 1.0))
    canvas = Image.new("RGB", (2 * _W, _H), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (_W, 0))
    return atomic_write(Path(path), lambda tmp: canvas.save(tmp, format="PNG"))


def plot_lines(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    y_range: tuple[float, float] | None = None,
) -> Path:
    """One panel of named (x, y) series as a PNG at ``path`` (written atomically)."""
    panel = _panel(title, xlabel, [(n, [float(x) for x in xs], [float(y) for y in ys]) for n, xs, ys in series],
                   y_range)
    return atomic_write(Path(path), lambda tmp: panel.save(tmp, format="PNG"))
