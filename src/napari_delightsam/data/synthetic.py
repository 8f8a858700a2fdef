"""Tiny synthetic datasets in the project layout, for tests, smoke runs and loader benchmarks.

Each image is a noisy textured background with one or two discs or boxes (the target) of a
different brightness/colour; the mask marks the targets. Learnable in a few steps, so a test
can check that training actually lowers the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_synthetic_dataset", "synthetic_pair"]


def synthetic_pair(
    rng: np.random.Generator, size: tuple[int, int] = (96, 128), colour: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(H,W,3) uint8 image and (H,W) uint8 0/255 mask."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(1, 3))):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        r = rng.uniform(0.1, 0.22) * min(h, w)
        if rng.random() < 0.5:
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        else:
            mask |= (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r * 0.8)
    base = rng.uniform(40, 90)
    fg = rng.uniform(160, 220)
    img = base + rng.normal(0, 12, (h, w)) + 10 * np.sin(xx / rng.uniform(4, 9))
    img = np.where(mask, fg + rng.normal(0, 12, (h, w)), img)
    rgb = np.stack([img, img, img], axis=-1)
    if colour:
        rgb = rgb * rng.uniform(0.7, 1.1, size=3)
    return np.clip(rgb, 0, 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def make_synthetic_dataset(
    root: str | Path,
    layout: dict[str, Sequence[str]] | None = None,
    n_per_dataset: int = 6,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    image_suffix: str = ".png",
) -> Path:
    """Write ``root/<modality>/<dataset>/{images,masks}``; default layout: two modalities."""
    root = Path(root)
    layout = layout or {"dermoscopy": ["derm_a"], "xray": ["xr_a"]}
    rng = np.random.default_rng(seed)
    for modality, datasets in layout.items():
        for ds in datasets:
            (root / modality / ds / "images").mkdir(parents=True, exist_ok=True)
            (root / modality / ds / "masks").mkdir(parents=True, exist_ok=True)
            for i in range(n_per_dataset):
                img, msk = synthetic_pair(rng, size, colour=modality not in ("xray", "ultrasound"))
                Image.fromarray(img).save(root / modality / ds / "images" / f"img_{i:03d}{image_suffix}")
                Image.fromarray(msk).save(root / modality / ds / "masks" / f"img_{i:03d}.png")
    return root
