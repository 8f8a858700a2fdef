"""On the device: turn ``.devpack/data`` (WebP or JPEG images, PNG masks) into a dataset folder
that ``delightsam`` reads (WebP images decoded and written as PNG, level 1; JPEGs and masks copied).

    python3 scripts/device/unpack.py .devpack/data /tmp/devdata
"""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image


def _one(job: tuple[Path, Path]) -> None:
    src, dst = job
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix.lower() == ".webp":
        Image.open(src).save(dst.with_suffix(".png"), compress_level=1)
    else:
        shutil.copyfile(src, dst)


def unpack(src: Path, dst: Path, workers: int | None = None) -> int:
    """Every file of ``src`` into ``dst`` (``workers`` processes; None: one per CPU, 1: this one)."""
    jobs = [(f, dst / f.relative_to(src)) for f in sorted(src.rglob("*")) if f.is_file()]
    if workers == 1:
        for job in jobs:
            _one(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_one, jobs, chunksize=32))
    return len(jobs)


if __name__ == "__main__":
    print(f"unpacked {unpack(Path(sys.argv[1]), Path(sys.argv[2]))} files into {sys.argv[2]}")
