"""The whole annotate loop with a simulated annotator: with and without learning as you go.

    OMP_NUM_THREADS=1 python benchmarks/annotate_loop.py --data ../shared/data \\
        --splits benchmarks/protocol/splits-unseen-v1.json --split unseen --dataset colonoscopy/PolypGen \\
        --images 20 --finetune-every 10 --finetune-steps 30 --out OUT_DIR [--checkpoint FILE] [--device cpu]

The first ``--images`` images of ``--dataset`` in ``--split`` (name order) are linked into
``OUT/<arm>/images`` and annotated through ``annotate.AnnotationSession`` into ``OUT/<arm>/masks``,
in the same fixed order, by two arms:

* ``none``: every image segmented by the starting model (the bundled one, or ``--checkpoint``);
* ``finetune``: an ``annotate_learning.Learner`` with ``every=--finetune-every``: after every K saved
  masks a round fine-tunes (child process, ``--finetune-steps`` steps at ``--finetune-img-size``,
  0 = the model's own size capped at 512 on a CPU) and the next images use the new model only
  if it beats the current one on the held-out saved images (every 4th). No round is run after
  the last image (nothing would use it).

The annotator corrects each mask by the rules of ``correction_effort.py``'s "Refine all" user:
one **Refine all** (every prompt-free object redrawn by the box refiner from its own box, objects
scored below the widget's threshold removed), then one jittered box per ground-truth object still
missed (IoU < 0.5), then one fill click per stray region left (overlapping no object). The
corrected mask is what is saved, and what later rounds train on. Reported per image and per arm:
Dice before and after correction, boxes and erase clicks, seconds (segmentation, correction), the
model that segmented; per round: decision, held-out Dice, seconds. Timings are wall seconds on this
host, with its load average.

Output: ``OUT/annotate_loop.json``, ``OUT/annotate_loop.md`` and ``OUT/annotate_loop.png`` (corrections
per image against images done, a running mean over ``--window`` images, one line per arm).
``--from-json FILE`` writes the report and the plot again from an earlier run's JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import runpy
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _effort() -> Any:
    """benchmarks/correction_effort.py's functions (its correction rules) as a namespace."""
    return SimpleNamespace(**runpy.run_path(str(REPO / "benchmarks" / "correction_effort.py")))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--splits", type=Path, default=None, help="splits file (default: a seeded split)")
    p.add_argument("--split", default="unseen")
    p.add_argument("--dataset", required=True, help="<modality>/<dataset>, e.g. colonoscopy/PolypGen")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arms", nargs="+", default=["none", "finetune"], choices=("none", "finetune"))
    p.add_argument("--finetune-every", type=int, default=10)
    p.add_argument("--finetune-steps", type=int, default=30)
    p.add_argument("--finetune-img-size", type=int, default=0)
    p.add_argument("--holdout-every", type=int, default=4)
    p.add_argument("--iou", type=float, default=0.5)
    p.add_argument("--jitter", type=float, default=0.1)
    p.add_argument("--window", type=int, default=5, help="running mean over this many images in the plot")
    p.add_argument("--from-json", type=Path, default=None, help="only write OUT's report and plot from this JSON")
    return p


def _records(args: argparse.Namespace) -> list[Any]:
    from napari_delightsam.data import discover, load_splits, make_splits, select

    modality = args.dataset.split("/")[0]
    records = [r for r in discover(args.data, [modality]) if r.key == args.dataset]
    splits = load_splits(args.splits) if args.splits else make_splits(records, seed=0)
    chosen = sorted(select(records, splits, args.split), key=lambda r: r.sample_id)
    if not chosen:
        raise SystemExit(f"no images of {args.dataset} in split {args.split!r}")
    return chosen[: args.images]


def correct_image(fx: Any, image: np.ndarray, pf: np.ndarray, gt: np.ndarray, refiner: Any, modality: str,
                  key: str, args: argparse.Namespace) -> dict[str, Any]:
    """The "Refine all" annotator on one image: Refine all, a box per object still missed, erase."""
    from napari_delightsam.refine import refine_objects
    from napari_delightsam.training.evaluation.metrics import dice_score

    start = time.perf_counter()
    _, objects = fx.gt_objects(gt)
    rng = np.random.default_rng([0, zlib.crc32(key.encode())])
    boxes = [fx.jittered_box(p, gt.shape, args.jitter, rng) for p in objects]
    refiner.set_image(image)
    refined = refine_objects(refiner, pf.astype(np.uint8), min_score=fx.refine_min_score(None, modality, refiner.decoder))
    auto = refined.labels > 0
    missed = [i for i, iou in enumerate(fx.object_ious(auto, objects)) if iou < args.iou]
    masks = [refiner.segment_box(boxes[i]) for i in missed]
    after = fx.correct(auto, masks, [boxes[i] for i in missed])
    final, erased = fx.erase_stray(after, gt)
    return {"boxes": len(missed), "erase_clicks": erased, "objects": len(objects),
            "dice_before": dice_score(pf, gt), "dice_refine_all": dice_score(auto, gt),
            "dice_after": dice_score(final, gt), "correct_s": time.perf_counter() - start, "mask": final}


def run_arm(arm: str, records: list[Any], args: argparse.Namespace, refiner: Any, fx: Any) -> dict[str, Any]:
    from napari_delightsam.annotate import AnnotationSession
    from napari_delightsam.annotate_batch import load_segmenter, provenance
    from napari_delightsam.annotate_learning import BUNDLED, LearnConfig, Learner, default_finetune
    from napari_delightsam.data import load_pair

    folder = args.out / arm
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for r in records:
        link = images / r.image_path.name
        if not link.exists():
            link.symlink_to(r.image_path.resolve())
    session = AnnotationSession(images, folder / "masks")
    learner = None
    if arm == "finetune":
        ft = default_finetune()
        ft.epochs, ft.steps_per_epoch, ft.img_size = 2, max(1, args.finetune_steps // 2), args.finetune_img_size
        learner = Learner(session, LearnConfig(every=args.finetune_every, holdout_every=args.holdout_every,
                                               device=args.device, finetune=ft))
    base = BUNDLED if args.checkpoint is None else str(Path(args.checkpoint).resolve())
    by_name = {r.image_path.name: r for r in records}
    rows: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    loaded: dict[str, Any] = {}
    for n, entry in enumerate(session.entries, 1):
        index = session.index_of(entry.name)
        if session.is_done(index):
            continue
        rec = by_name[entry.name]
        spec = learner.model_for(base) if learner is not None else base
        if spec not in loaded:
            loaded.clear()
            loaded[spec] = load_segmenter(spec, args.device)
        image = session.load_image(index)
        _, gt = load_pair(rec)
        start = time.perf_counter()
        result = loaded[spec].segment(image, rec.modality, 0.5)
        seg_s = time.perf_counter() - start
        row = correct_image(fx, image, result.mask, gt, refiner, rec.modality, f"{rec.key}/{rec.sample_id}", args)
        mask = row.pop("mask")
        name = learner.describe(spec) if learner is not None else spec
        session.save(index, mask.astype(np.uint8),
                     provenance={**provenance(spec, loaded[spec], result, rec.modality, image, seg_s, name),
                                 "edited_after_segmentation": True})
        row.update(image=entry.name, n=n, model=name, segment_s=seg_s, load_average=os.getloadavg()[0])
        rows.append(row)
        print(f"[{arm} {n}/{len(records)}] {entry.name}: Dice {100 * row['dice_before']:.1f} -> "
              f"{100 * row['dice_after']:.1f}, {row['boxes']} boxes + {row['erase_clicks']} erase; "
              f"{seg_s:.1f} + {row['correct_s']:.1f} s; {name}", file=sys.stderr, flush=True)
        if learner is not None and learner.due() and n < len(records):
            res = learner.run_round_blocking(base)
            if res.status == "skipped":
                continue
            rounds.append({**{k: v for k, v in res.__dict__.items() if k not in ("train", "holdout")},
                           "after_image": n, "n_train": len(res.train), "n_holdout": len(res.holdout),
                           "load_average": os.getloadavg()[0]})
            print(f"[{arm}] round {res.round}: {res.status} ({res.message}); {res.seconds:.0f} s",
                  file=sys.stderr, flush=True)
    return {"rows": rows, "rounds": rounds}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(part: list[dict[str, Any]]) -> dict[str, Any]:
        if not part:
            return {}
        return {
            "images": len(part),
            "dice_before": float(np.mean([r["dice_before"] for r in part])),
            "dice_after": float(np.mean([r["dice_after"] for r in part])),
            "boxes_per_image": float(np.mean([r["boxes"] for r in part])),
            "erase_per_image": float(np.mean([r["erase_clicks"] for r in part])),
            "corrections_per_image": float(np.mean([r["boxes"] + r["erase_clicks"] for r in part])),
            "seconds_per_image": float(np.mean([r["segment_s"] + r["correct_s"] for r in part])),
        }

    half = len(rows) // 2
    return {"all": stats(rows), "first_half": stats(rows[:half]), "second_half": stats(rows[half:])}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Annotate loop: {result['dataset']} ({result['split']}), {result['images']} images", "",
             f"`{result['command']}`", "", f"{result['date']}; load average {result['load_average_start']:.1f} at the start; "
             f"OMP_NUM_THREADS={result['omp_threads']}", "",
             "| arm | part | images | Dice before | Dice after | boxes/img | erase/img | corrections/img | s/img |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, data in result["arms"].items():
        for part, s in data["summary"].items():
            if s:
                lines.append(f"| {arm} | {part} | {s['images']} | {100 * s['dice_before']:.1f} | {100 * s['dice_after']:.1f} | "
                             f"{s['boxes_per_image']:.2f} | {s['erase_per_image']:.2f} | {s['corrections_per_image']:.2f} | "
                             f"{s['seconds_per_image']:.1f} |")
    for arm, data in result["arms"].items():
        for r in data["rounds"]:
            lines.append(f"\n{arm}: round {r['round']} after image {r['after_image']} ({r['n_train']} train, "
                         f"{r['n_holdout']} held out): **{r['status']}**: {r['message']}; {r['seconds']:.0f} s "
                         f"(load average {r['load_average']:.1f})")
    return "\n".join(lines) + "\n"


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [float(np.mean(values[max(0, i + 1 - window): i + 1])) for i in range(len(values))]


def plot(result: dict[str, Any], path: Path, window: int) -> Path:
    from napari_delightsam.training.loop.plot import plot_lines

    series = []
    for arm, data in result["arms"].items():
        rows = data["rows"]
        per_image = [float(r["boxes"] + r["erase_clicks"]) for r in rows]
        series.append((arm, [float(r["n"]) for r in rows], running_mean(per_image, window)))
    top = max((y for _, _, ys in series for y in ys), default=1.0)
    return plot_lines(series, path, title=f"{result['dataset']}: corrections per image (mean of the last {window})",
                      xlabel="images done", y_range=(0.0, float(np.ceil(top))))


def _command_args(argv: list[str]) -> str:
    """The arguments as typed, with the output folder as ``OUT`` and other absolute paths as file names."""
    out = []
    for i, a in enumerate(argv):
        if i > 0 and argv[i - 1] == "--out":
            out.append("OUT")
        else:
            out.append(Path(a).name if a.startswith("/") else a)
    return " ".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text(encoding="utf-8"))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "annotate_loop.md").write_text(markdown(result), encoding="utf-8")
        plot(result, args.out / "annotate_loop.png", args.window)
        return 0
    from napari_delightsam.refine import load_refiner

    done = [arm for arm in args.arms if any((args.out / arm / "masks").glob("*"))]
    if done:  # the annotator skips images that have a mask: a reused --out would measure nothing
        print(f"error: {args.out} already holds masks of an earlier run ({', '.join(done)}); "
              "choose a new --out (or --from-json to redraw its report)", file=sys.stderr)
        return 2
    fx = _effort()
    records = _records(args)
    args.out.mkdir(parents=True, exist_ok=True)
    refiner = load_refiner(args.device)
    load_start = os.getloadavg()[0]
    arms = {}
    for arm in args.arms:
        out = run_arm(arm, records, args, refiner, fx)
        arms[arm] = {**out, "summary": summarise(out["rows"])}
    result = {
        "command": "python benchmarks/annotate_loop.py " + _command_args(argv if argv is not None else sys.argv[1:]),
        "dataset": args.dataset, "split": args.split, "images": len(records),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_start": load_start, "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "arms": arms,
    }
    text = json.dumps(result, indent=1, default=str).replace(str(args.out.resolve()), "OUT")  # no machine paths
    (args.out / "annotate_loop.json").write_text(text, encoding="utf-8")
    (args.out / "annotate_loop.md").write_text(markdown(result), encoding="utf-8")
    plot(result, args.out / "annotate_loop.png", args.window)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
