"""Sample data for File → Open Sample: small images with their reference masks.

Two kinds:

* **real** images, one per modality whose licence allows redistribution (``REAL_SOURCES``:
  DSB2018 nuclei, CC0; BUSI breast ultrasound, CC BY 4.0), each from the test split of the
  project's protocol, downscaled; ``sample_data/README.md`` gives their source, licence and
  attribution. ``python -m napari_delightsam.sample_data --import-real ../shared/data`` makes
  their PNGs from the dataset layout;
* **synthetic** drawings (seeded numpy + scikit-image, no patient data) for the other
  modalities' look: ``python -m napari_delightsam.sample_data --regenerate`` writes their PNGs.

The napari commands read the PNG files in ``sample_data/`` (so the samples do not change with
numpy/scikit-image versions); a missing synthetic file is generated on the fly.

Each sample opens as two layers: the image and its reference mask (a Labels layer, hidden), so
"De-LightSAM segment" and "De-LightSAM fine-tune" can be tried with no files at hand.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
SIZE = 256

LayerData = tuple[np.ndarray, dict[str, Any], str]


# -- generators (pure numpy + scikit-image; deterministic for a given seed) --------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Low-frequency noise in [-1, 1]."""
    from skimage.filters import gaussian

    field = gaussian(rng.standard_normal(shape), sigma=sigma)
    peak = np.abs(field).max()
    return field / peak if peak > 0 else field


def _blob(shape: tuple[int, int], center: tuple[float, float], radius: float, rng: np.random.Generator,
          wobble: float = 0.18, harmonics: int = 5, aspect: float = 1.0) -> np.ndarray:
    """Signed distance-like field (>0 inside) of an irregular star-shaped blob.

    ``aspect`` > 1 stretches it horizontally.
    """
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    dy, dx = yy - center[0], (xx - center[1]) / aspect
    theta = np.arctan2(dy, dx)
    r = np.hypot(dy, dx)
    boundary = np.ones_like(theta)
    for k in range(2, 2 + harmonics):
        boundary += wobble / k * rng.uniform(0.5, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return radius * boundary - r


def make_dermoscopy(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic dermoscopy: a brown, irregular pigmented lesion on skin, with a few hairs.

    Returns (image (256, 256, 3) uint8 RGB, mask (256, 256) uint8 {0, 255}).
    """
    from skimage.draw import bezier_curve
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)
    shape = (SIZE, SIZE)
    skin = np.array([226.0, 178.0, 160.0])
    shade = 1.0 + 0.06 * _smooth_noise(rng, shape, 24)[..., None]
    yy, xx = np.mgrid[: SIZE, : SIZE]
    vignette = 1.0 - 0.35 * (np.hypot(yy - SIZE / 2, xx - SIZE / 2) / (SIZE * 0.72)) ** 2
    img = skin * shade * vignette[..., None]

    field = _blob(shape, (SIZE * 0.52, SIZE * 0.48), SIZE * 0.27, rng)
    inside = np.clip(field / 6.0, 0.0, 1.0)  # soft 6-px border
    depth = np.clip(field / (SIZE * 0.27), 0.0, 1.0)
    lesion = np.array([150.0, 95.0, 70.0]) * (1 - 0.55 * depth[..., None])
    texture = 1.0 + 0.12 * _smooth_noise(rng, shape, 3)[..., None]
    img = img * (1 - inside[..., None]) + lesion * texture * inside[..., None]

    hairs = np.zeros(shape, dtype=np.float64)
    for _ in range(4):
        pts = rng.uniform(0, SIZE - 1, size=6).astype(int)
        rr, cc = bezier_curve(pts[0], pts[1], pts[2], pts[3], pts[4], pts[5], weight=1.5, shape=shape)
        hairs[rr, cc] = 1.0
    hairs = np.clip(gaussian(hairs, 0.8) * 3, 0, 1)
    img = img * (1 - 0.7 * hairs[..., None]) + 40 * 0.7 * hairs[..., None]

    image = np.clip(img, 0, 255).astype(np.uint8)
    mask = np.where(field > 0, 255, 0).astype(np.uint8)
    return image, mask


def make_microscopy(seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic fluorescence microscopy: ~30 bright nuclei on a dark background.

    Returns (image (256, 256) uint8 grey, mask (256, 256) uint8 {0, 255}).
    """
    from skimage.draw import ellipse
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)
    shape = (SIZE, SIZE)
    signal = np.zeros(shape, dtype=np.float64)
    mask = np.zeros(shape, dtype=bool)
    placed: list[tuple[float, float, float]] = []
    attempts = 0
    while len(placed) < 30 and attempts < 2000:
        attempts += 1
        r_major, r_minor = rng.uniform(7, 13), rng.uniform(5, 9)
        cy, cx = rng.uniform(12, SIZE - 12, size=2)
        if any(np.hypot(cy - y, cx - x) < (r_major + r) * 0.95 for y, x, r in placed):
            continue
        placed.append((cy, cx, r_major))
        rr, cc = ellipse(cy, cx, r_major, r_minor, shape=shape, rotation=rng.uniform(0, np.pi))
        brightness = rng.uniform(0.45, 1.0)
        nucleus = np.zeros(shape, dtype=np.float64)
        nucleus[rr, cc] = 1.0
        signal += brightness * gaussian(nucleus, 1.2) * (1 + 0.25 * _smooth_noise(rng, shape, 2))
        mask[rr, cc] = True
    background = 0.06 + 0.03 * _smooth_noise(rng, shape, 40)
    img = background + signal + rng.normal(0, 0.02, shape)
    image = np.clip(img * 220, 0, 255).astype(np.uint8)
    return image, np.where(mask, 255, 0).astype(np.uint8)


def make_ultrasound(seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic breast ultrasound: speckle in a fan-shaped field, one dark oval lesion.

    Returns (image (256, 256) uint8 grey, mask (256, 256) uint8 {0, 255}).
    """
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)
    shape = (SIZE, SIZE)
    yy, xx = np.mgrid[: SIZE, : SIZE].astype(np.float64)
    # fan: apex above the image centre, +-40 degrees
    ang = np.degrees(np.arctan2(xx - SIZE / 2, yy + SIZE * 0.25))
    fan = (np.abs(ang) < 40) & (np.hypot(xx - SIZE / 2, yy + SIZE * 0.25) < SIZE * 1.22)
    speckle = gaussian(rng.rayleigh(1.0, shape), 1.0)
    tissue = 0.55 + 0.25 * _smooth_noise(rng, shape, 12) + 0.15 * np.sin(yy / 9.0 + _smooth_noise(rng, shape, 20))
    # lesions are wider than tall: stretch the blob 1.6x horizontally
    field = _blob(shape, (SIZE * 0.55, SIZE * 0.5), SIZE * 0.13, rng, wobble=0.12, harmonics=3, aspect=1.6)
    lesion = np.clip(field / 4.0, 0, 1)
    below = np.clip((yy - SIZE * 0.55) / (SIZE * 0.3), 0, 1) * np.exp(-((xx - SIZE * 0.5) / (SIZE * 0.14)) ** 2)
    img = tissue * speckle * (1 - 0.8 * lesion) * (1 + 0.35 * below * (field <= 0))
    img = img * fan * (1 - 0.45 * yy / SIZE)
    image = np.clip(img * 150, 0, 255).astype(np.uint8)
    return image, np.where(field > 0, 255, 0).astype(np.uint8)


@dataclass(frozen=True)
class RealSource:
    """Where a real sample comes from: ``<root>/<dataset>/{images,masks}/<image_id>.*``."""

    dataset: str
    image_id: str
    #: the longer side of the shipped PNG
    max_side: int
    licence: str


@dataclass(frozen=True)
class Sample:
    key: str
    modality: str
    display_name: str
    make: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
    source: RealSource | None = None

    @property
    def synthetic(self) -> bool:
        return self.source is None

    @property
    def image_file(self) -> Path:
        return SAMPLE_DIR / f"{self.key}.png"

    @property
    def mask_file(self) -> Path:
        return SAMPLE_DIR / f"{self.key}_mask.png"


SAMPLES: dict[str, Sample] = {
    s.key: s
    for s in (
        Sample(
            "nuclei_dsb2018",
            "microscopy",
            "Nuclei, fluorescence microscopy (DSB2018, CC0)",
            source=RealSource("microscopy/DSB2018", "df33b11184427e05", 256, "CC0 1.0"),
        ),
        Sample(
            "breast_ultrasound_busi",
            "ultrasound",
            "Breast ultrasound (BUSI, CC BY 4.0)",
            source=RealSource("ultrasound/BUSI", "benign_358", 384, "CC BY 4.0"),
        ),
        Sample("synthetic_dermoscopy", "dermoscopy", "Synthetic dermoscopy lesion (De-LightSAM)", make_dermoscopy),
        Sample("synthetic_microscopy", "microscopy", "Synthetic nuclei, microscopy (De-LightSAM)", make_microscopy),
        Sample("synthetic_ultrasound", "ultrasound", "Synthetic breast ultrasound (De-LightSAM)", make_ultrasound),
    )
}


def load_sample(key: str) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask {0,255}) of one sample: the shipped PNGs (a synthetic one is generated if
    its files are missing)."""
    sample = SAMPLES[key]
    if sample.image_file.is_file() and sample.mask_file.is_file():
        from PIL import Image

        with Image.open(sample.image_file) as im:
            image = np.asarray(im).copy()
        with Image.open(sample.mask_file) as im:
            mask = np.asarray(im).copy()
        return image, mask
    if sample.make is None:
        raise FileNotFoundError(f"sample {key!r}: {sample.image_file} is missing from the installation")
    return sample.make()


def _layers(key: str) -> list[LayerData]:
    sample = SAMPLES[key]
    image, mask = load_sample(key)
    meta: dict[str, Any] = {"modality": sample.modality, "synthetic": sample.synthetic}
    if sample.source is not None:
        meta.update(dataset=sample.source.dataset, image_id=sample.source.image_id, licence=sample.source.licence)
    meta = {"delightsam_sample": meta}
    return [
        (image, {"name": key, "rgb": image.ndim == 3, "metadata": meta}, "image"),
        (
            (mask > 0).astype(np.uint8),
            {"name": f"{key}_reference_mask", "opacity": 0.5, "visible": False, "metadata": meta},
            "labels",
        ),
    ]


# napari sample-data commands (named in napari.yaml)
def nuclei_dsb2018_sample() -> list[LayerData]:
    return _layers("nuclei_dsb2018")


def breast_ultrasound_busi_sample() -> list[LayerData]:
    return _layers("breast_ultrasound_busi")


def dermoscopy_sample() -> list[LayerData]:
    return _layers("synthetic_dermoscopy")


def microscopy_sample() -> list[LayerData]:
    return _layers("synthetic_microscopy")


def ultrasound_sample() -> list[LayerData]:
    return _layers("synthetic_ultrasound")


def _write_pair(folder: Path, key: str, image: np.ndarray, mask: np.ndarray) -> list[Path]:
    from PIL import Image

    from .atomic_files import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    return [
        atomic_write(folder / name, lambda tmp, a=arr: Image.fromarray(a).save(tmp, format="PNG", optimize=True))
        for arr, name in ((image, f"{key}.png"), (mask, f"{key}_mask.png"))
    ]


def regenerate(folder: Path = SAMPLE_DIR) -> list[Path]:
    """Write every synthetic sample's image and mask PNG into ``folder`` (atomic writes)."""
    written: list[Path] = []
    for sample in SAMPLES.values():
        if sample.make is not None:
            written += _write_pair(folder, sample.key, *sample.make())
    return written


def real_sample_from(data_root: Path, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """A real sample's (image uint8, mask {0,255}) from the dataset layout under ``data_root``,
    downscaled so the longer side is ``max_side`` (image: area average; mask: the area-averaged
    mask thresholded at one half)."""
    from PIL import Image

    src = sample.source
    if src is None:
        raise ValueError(f"{sample.key} is synthetic")
    folder = Path(data_root) / src.dataset
    found = {kind: sorted((folder / kind).glob(f"{src.image_id}.*")) for kind in ("images", "masks")}
    if not found["images"] or not found["masks"]:
        raise FileNotFoundError(f"{folder}: no image or mask named {src.image_id}")
    with Image.open(found["images"][0]) as im:
        image = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
    with Image.open(found["masks"][0]) as im:
        mask = im.convert("L")
    scale = src.max_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image = image.resize(size, Image.Resampling.BOX)
        mask = mask.resize(size, Image.Resampling.BOX)
    return np.asarray(image).copy(), np.where(np.asarray(mask) >= 128, 255, 0).astype(np.uint8)


def import_real(data_root: Path, folder: Path = SAMPLE_DIR) -> list[Path]:
    """Write every real sample's image and mask PNG into ``folder`` from ``data_root``."""
    written: list[Path] = []
    for sample in SAMPLES.values():
        if sample.source is not None:
            written += _write_pair(folder, sample.key, *real_sample_from(data_root, sample))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="(Re)make the sample images.")
    parser.add_argument("--regenerate", action="store_true", help="write the synthetic samples' PNGs into --out")
    parser.add_argument("--import-real", type=Path, metavar="DATA_ROOT",
                        help="write the real samples' PNGs into --out from this dataset-layout folder")
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR)
    args = parser.parse_args(argv)
    if not args.regenerate and args.import_real is None:
        parser.print_help()
        return 0
    paths = regenerate(args.out) if args.regenerate else []
    if args.import_real is not None:
        paths += import_real(args.import_real, args.out)
    for path in paths:
        print(f"{path}  {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
