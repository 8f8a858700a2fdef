"""Time per click of the refine widget's point prompts, after the image embedding (CPU).

    python benchmarks/click_speed.py [--image FILE] [--size 1024] [--rounds 15] [--threads 2] [--precision fp32] [--box-aspects] \\
        [--decode-threads 1] [--json OUT.json]

One image (``--image``, else the bundled synthetic dermoscopy sample), resized to ``--size`` ×
``--size``, embedded once by ``load_refiner()`` (the widget's refiner, its fast path on this
machine); then median wall seconds over ``--rounds`` rounds (the cases take turns in each) of

* ``box``: ``segment_box`` (one box: the reference, what a Box costs);
* ``first click``: ``segment_clicks`` with one positive click and no box: one batched decoder
  call over ``refine.first_click_prompts()`` candidate boxes;
* ``further click``: ``segment_clicks`` with two clicks and what the widget sends for each
  click after the first of an object (``refine.next_click_boxes``: the box the first click chose,
  and the first mask's extent when it differs): two prompts in one call;
* ``further click, one box``: the same with the first click's box alone (the rule before);
* ``SAM point prompt``: ``segment_points`` with one click alone (SAM's raw point path).

Each case runs twice per round: as the refiner runs it (the decoder's image side cached per
image, ``BoxRefiner.prepare_prompts``, timed apart as ``image_side_s``; a first click's
candidates decoded only in the rows its clicks read) and with every prompt through
``MaskDecoder.forward`` as published (``cache_image_side = False``, "published decoder", the
code before); the two give the same masks up to rounding (the cache holds the image tokens in
memory order, so the same sums run in another order): the pixels that differ and the largest
score difference are recorded for every case. ``--decode-threads 1``
adds the cases again with the decoder on one intra-op thread (``BoxRefiner.decode_threads``;
not bit-identical: the logits of 1 and 2 threads differ in the last bits).

The load average before and after is printed with the numbers: on a shared machine other
processes slow every figure down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def _interleaved_medians(cases: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each case; the cases take turns in every round (a shared machine's load
    then weighs on all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(values)) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--box-aspects", type=float, nargs="*",
                        help="a first click's elongated candidates instead of refine.CLICK_BOX_ASPECTS (none: squares only)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the refiner's precision (auto: bf16 where the CPU computes it natively, else fp32)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--decode-threads", type=int, default=None,
                        help="also time the cached path with the decoder on this many intra-op threads")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from napari_delightsam import load_refiner, refine
    from napari_delightsam.image_files import read_image
    from napari_delightsam.refine import first_click_prompts, next_click_boxes
    from napari_delightsam.sample_data import load_sample

    torch.set_num_threads(args.threads)
    if args.box_aspects is not None:
        refine.CLICK_BOX_ASPECTS = tuple(args.box_aspects)
    if args.image is not None:
        image = read_image(args.image)
        name = args.image.name
    else:
        image = np.asarray(load_sample("synthetic_dermoscopy")[0])
        name = "synthetic_dermoscopy (bundled sample)"
    image = np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((args.size, args.size)))
    load_before = os.getloadavg()[0]
    refiner = load_refiner("cpu", precision=args.precision)
    t0 = time.perf_counter()
    refiner.set_image(image)
    embed = time.perf_counter() - t0
    s = args.size
    centre = [s / 2 + 0.5, s / 2 + 0.5]
    second = [s / 2 + s / 20 + 0.5, s / 2 + 0.5]
    box = (s * 0.3, s * 0.3, s * 0.7, s * 0.7)
    t0 = time.perf_counter()
    refiner.prepare_prompts()
    image_side = time.perf_counter() - t0
    first_mask, _, chosen = refiner.segment_clicks([centre], [1])
    further = next_click_boxes(chosen, first_mask, [centre, second], [1, 1])  # the widget's candidates
    base = {
        "box": lambda: refiner.segment_box(box),
        "first click": lambda: refiner.segment_clicks([centre], [1]),
        "further click": lambda: refiner.segment_clicks([centre, second], [1, 1], further),
        "further click, one box": lambda: refiner.segment_clicks([centre, second], [1, 1], chosen),
        "SAM point prompt": lambda: refiner.segment_points([centre], [1]),
    }

    def variant(fn, cached: bool, threads: int | None):
        def run():
            refiner.cache_image_side, refiner.decode_threads = cached, threads
            try:
                return fn()
            finally:
                refiner.cache_image_side, refiner.decode_threads = True, None
        return run

    cases = {}
    for key, fn in base.items():
        cases[key] = variant(fn, True, None)
        cases[f"{key} (published decoder)"] = variant(fn, False, None)
        if args.decode_threads is not None:
            cases[f"{key} ({args.decode_threads} decode thread(s))"] = variant(fn, True, args.decode_threads)
    agreement = {}
    for key in base:
        a, b = cases[key](), cases[f"{key} (published decoder)"]()
        a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
        pixels = sum(int(np.count_nonzero(np.asarray(x) != np.asarray(y)))
                     for x, y in zip(a, b, strict=True) if np.asarray(x).dtype == bool)
        scores = [float(np.max(np.abs(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64))))
                  for x, y in zip(a, b, strict=True) if np.asarray(x).dtype != bool]
        agreement[key] = {"pixels_differing": pixels, "max_abs_difference": max(scores, default=0.0)}
    results = _interleaved_medians(cases, args.rounds)
    record = {
        "image": name,
        "size": [s, s],
        "threads": args.threads,
        "rounds": args.rounds,
        "candidate_boxes": first_click_prompts(),
        "further_click_candidate_boxes": len(further),
        "refiner": refiner.fast_path_description(),
        "embedding_s": round(embed, 4),
        "image_side_s": round(image_side, 4),
        "agreement_with_published_decoder": agreement,
        "decode_threads": args.decode_threads,
        "median_s": {k: round(v, 4) for k, v in results.items()},
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print(f"{name} at {s}x{s}, {args.threads} threads, {refiner.fast_path_description()}")
    print(f"embedding {embed:.3f} s + decoder image side {image_side:.3f} s (once per image); "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"against the published decoder (pixels differing, largest score/box difference): {agreement}")
    for key, value in results.items():
        print(f"  {key:40s} {value:.3f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
