"""`delightsam benchmark`: speed, memory, params and FLOPs of De-LightSAM next to SAM-family peers.

The measurement code is ``napari_delightsam.benchmarking``; this module only parses options,
prints the table (stdout) and writes the JSON.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..cli import CommandError

_PEER_FLAGS = {
    "sam_vit_b_encoder": "skip_sam",
    "sam_vit_b_amg": "skip_amg",
    "litemedsam_encoder": "skip_litemedsam",
}


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HxW (e.g. 1024x1024), got {text!r}") from None
    if not (16 <= h <= 8192 and 16 <= w <= 8192):
        raise argparse.ArgumentTypeError(f"size {text!r} outside 16..8192 px")
    return h, w


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "benchmark",
        help="speed, memory, params and FLOPs vs SAM ViT-B and LiteMedSAM",
        description=(
            "End-to-end speed of De-LightSAM through the public Segmenter API (uint8 image -> mask at the "
            "input size): the bundled model, and the paper's 1024² architecture as a second row; load time, cold and steady-state latency, batch throughput, peak memory, the fast "
            "path vs fp32 eager (with mask Dice), training throughput, and the same process's peers with "
            "random weights: SAM ViT-B image encoder alone, SAM ViT-B automatic mask generator, LiteMedSAM "
            "encoder. Peers are timed in rounds alternating with ours. The defaults take about 4.5 minutes "
            "on an idle 2-core CPU, 2.5 of them in SAM's automatic mask generator (--amg-points 16 or "
            "--skip-amg for a shorter run)."
        ),
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: physical cores)")
    p.add_argument(
        "--checkpoint",
        default="bundled",
        help="'bundled' (the default model, default), 'untrained' (random weights of the paper's 1024² "
        "architecture), 'tiny' (a very small test config) or a .safetensors file",
    )
    p.add_argument(
        "--architecture-row",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the paper's 1024² architecture (random weights) end to end at the first size, "
        "as a second row (default: on, unless --checkpoint is untrained or tiny, or --quick)",
    )
    p.add_argument(
        "--modality", default="dermoscopy", help="modality of the benchmark images (default dermoscopy)"
    )
    p.add_argument(
        "--sizes",
        type=_size,
        nargs="+",
        default=None,
        metavar="HxW",
        help="end-to-end image sizes (default 1024x1024 768x1365)",
    )
    p.add_argument(
        "--repeats", type=_positive, default=None, help="steady-state calls of ours per size (default 20)"
    )
    p.add_argument(
        "--peer-repeats",
        type=_positive,
        default=None,
        help="steady-state calls per peer after its cold call (default 1 on CPU, 20 on CUDA)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="segment_batch size (default 4 on CPU, 32 on CUDA)"
    )
    p.add_argument(
        "--amg-points",
        type=int,
        default=None,
        help="SAM automatic mask generator grid side (default 32: SAM's own 32×32 grid, the paper's "
        "prompt-free comparison; one image on CPU, where it alone takes about 2.5 minutes)",
    )
    p.add_argument("--skip-sam", action="store_true", help="skip the SAM ViT-B encoder peer")
    p.add_argument(
        "--skip-amg", action="store_true", help="skip SAM's automatic mask generator (slow on CPU)"
    )
    p.add_argument("--skip-litemedsam", action="store_true", help="skip the LiteMedSAM encoder peer")
    p.add_argument(
        "--tiny-peers",
        action="store_true",
        help="(tests) SAM peers as a tiny 2-block ViT: checks the code path; figures are meaningless",
    )
    p.add_argument("--no-fast-path", action="store_true", help="skip the fp32-vs-fast-path comparison")
    p.add_argument("--compile", action="store_true", help="also wrap our network in torch.compile")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="real data root for the fast-path Dice (default: "
        "$DELIGHTSAM_DATA or ../shared/data beside the repository, when present)",
    )
    p.add_argument("--no-train", action="store_true", help="skip the training-throughput measurement")
    p.add_argument(
        "--train-size", type=int, default=None, help="training image side (default 512 CPU, 1024 CUDA)"
    )
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default 2 CPU, 8 CUDA)")
    p.add_argument(
        "--train-steps", type=int, default=3, help="timed training steps after one warm-up (default 3)"
    )
    p.add_argument(
        "--no-segment-process",
        action="store_true",
        help="skip measuring the peak RSS of a `delightsam segment` child process",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="few repeats, one size, no AMG (a smoke run; figures are not for reporting)",
    )
    p.add_argument("--markdown", action="store_true", help="also print the results as a Markdown table")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    return p


def options_from_args(args: argparse.Namespace):
    from ..benchmarking.speed import DEFAULT_SIZES, PEERS, BenchmarkOptions

    cuda = str(args.device).startswith("cuda") or (args.device == "auto" and _cuda_available())
    quick = bool(args.quick)
    peers = tuple(p for p in PEERS if not getattr(args, _PEER_FLAGS[p]))
    if quick and "sam_vit_b_amg" in peers and not cuda:
        peers = tuple(p for p in peers if p != "sam_vit_b_amg")
    sizes = tuple(args.sizes) if args.sizes else (DEFAULT_SIZES[:1] if quick else DEFAULT_SIZES)

    def pick(value, quick_v, cpu_v, cuda_v):
        if value is not None:
            return value
        return quick_v if quick else (cuda_v if cuda else cpu_v)

    if args.json is not None and not args.json.parent.is_dir():
        raise CommandError(f"--json: folder {args.json.parent} does not exist")
    if args.checkpoint not in ("untrained", "bundled", "tiny") and not Path(args.checkpoint).is_file():
        raise CommandError(f"checkpoint {args.checkpoint} not found")
    if args.checkpoint == "bundled":
        from ..checkpoint import bundled_checkpoint_path

        if bundled_checkpoint_path() is None:
            raise CommandError("no bundled model is installed; use --checkpoint untrained or a file")
    architecture_row = args.architecture_row
    if architecture_row is None:
        architecture_row = not quick and args.checkpoint not in ("untrained", "tiny")
    if args.threads is not None and args.threads < 1:
        raise CommandError("--threads must be >= 1")
    return BenchmarkOptions(
        device=args.device,
        threads=args.threads,
        checkpoint=args.checkpoint,
        architecture="untrained" if architecture_row else None,
        modality=args.modality,
        sizes=sizes,
        repeats=pick(args.repeats, 3, 20, 50),
        peer_repeats=pick(args.peer_repeats, 1, 1, 20),
        batch_size=pick(args.batch_size, 2, 4, 32),
        batch_repeats=pick(None, 1, 2, 10),
        fast_repeats=pick(None, 3, 5, 20),
        peers=peers,
        amg_points=args.amg_points or 32,
        tiny_peers=bool(args.tiny_peers),
        amg_repeats=0 if not cuda else 3,
        fast_path=not args.no_fast_path,
        compile=bool(args.compile),
        data_dir=args.data,
        train=not args.no_train,
        train_size=args.train_size,
        train_batch=args.train_batch,
        train_steps=1 if quick else args.train_steps,
        segment_process=not args.no_segment_process,
        command=_command_line(),
    )


def _command_line() -> str:
    """The command as typed, when this process is `delightsam benchmark ...`."""
    argv = sys.argv[1:]
    if argv and argv[0] == "benchmark":
        return "delightsam " + " ".join(shlex.quote(a) for a in argv)
    return ""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    from ..benchmarking.speed import format_markdown, format_report, run_benchmark, write_json

    opts = options_from_args(args)
    if not opts.command:
        opts.command = "delightsam benchmark"
    report = run_benchmark(opts)
    print(format_report(report))
    if args.markdown:
        print()
        print(format_markdown(report))
    if args.json is not None:
        path = write_json(report, args.json)
        print(f"results written to {path}")
    return 0
