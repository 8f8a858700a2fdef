"""Put a run's results in $OUT within the device tool's limits (8 files, 16 MiB each, 64 MiB).

    python scripts/device/ship.py RUN_DIR OUT_DIR       (on the device, after a leg)
    python scripts/device/ship.py --file MODEL.safetensors OUT_DIR   (one file: parts + sha256 only)
    python scripts/device/ship.py --join FETCHED_DIR FILE.safetensors   (here, afterwards)

The best checkpoint (or ``--file``) is stored in fp16 (the bundled model's storage) and cut into 15 MiB parts;
``best.sha256`` holds the digest that ``--join`` checks. Also copied: metrics.jsonl. With the
leg's own leg.jsonl that makes 7 files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

PART = 15 * 2**20


def ship_file(best: Path, out: Path) -> list[Path]:
    """``best`` in fp16 (metadata kept) as ``best.part<i>`` files of 15 MiB + ``best.sha256``."""
    import torch

    from napari_delightsam.checkpoint import (
        RESERVED_METADATA_KEYS,
        load_checkpoint,
        read_checkpoint_info,
        save_checkpoint,
    )

    _, meta = read_checkpoint_info(best)
    meta = {k: v for k, v in meta.items() if k not in RESERVED_METADATA_KEYS}
    tmp = Path("/tmp/best_fp16.safetensors")
    save_checkpoint(tmp, load_checkpoint(best), meta, dtype=torch.float16)
    data = tmp.read_bytes()
    written = [out / "best.sha256"]
    written[0].write_text(hashlib.sha256(data).hexdigest() + "\n")
    for i in range(0, len(data), PART):
        part = out / f"best.part{i // PART}"
        part.write_bytes(data[i : i + PART])
        written.append(part)
    return written


def ship(run: Path, out: Path) -> list[Path]:
    written: list[Path] = []
    best = run / "best.safetensors"
    if best.is_file():
        written += ship_file(best, out)
    for name in ("metrics.jsonl",):  # curves: plot here from metrics.jsonl (training.loop.plot.plot_curves)
        if (run / name).is_file():
            shutil.copy(run / name, out / name)
            written.append(out / name)
    if len(written) > 8:
        raise SystemExit(f"{len(written)} files: more than the 8 that come back")
    return written


def join(fetched: Path, target: Path) -> Path:
    parts = sorted(fetched.glob("best.part*"), key=lambda p: int(p.name.removeprefix("best.part")))
    data = b"".join(p.read_bytes() for p in parts)
    digest = hashlib.sha256(data).hexdigest()
    expected = (fetched / "best.sha256").read_text().strip()
    if digest != expected:
        raise SystemExit(f"joined file digest {digest} != {expected}: a part is missing or damaged")
    target.write_bytes(data)
    return target


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--join":
        print(join(Path(argv[1]), Path(argv[2])))
        return 0
    if argv and argv[0] == "--file":
        for p in ship_file(Path(argv[1]), Path(argv[2])):
            print(f"{p.name:16s} {p.stat().st_size / 2**20:6.2f} MiB")
        return 0
    run, out = Path(argv[0]), Path(argv[1])
    for p in ship(run, out):
        print(f"{p.name:16s} {p.stat().st_size / 2**20:6.2f} MiB")
    if (run / "metrics.jsonl").is_file():
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        epochs = [r for r in rows if r.get("type") == "epoch"]
        if epochs:
            last = epochs[-1]
            print(f"epochs done {len(epochs)}; last val Dice {last.get('val_dice')}; best {last.get('best_val_dice')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
