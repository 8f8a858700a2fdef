"""`delightsam` command line: segment | annotate | train | recipe | evaluate | distill | tune-refiner | train-appearance-head |
benchmark | info.

Each subcommand lives in ``napari_delightsam.commands.<name>`` with two functions:
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int`` (exit code).
This module only wires them together and turns expected errors into one-line messages.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: tuple[str, ...] = (
    "segment", "annotate", "train", "recipe", "evaluate", "distill", "tune-refiner", "train-appearance-head", "benchmark", "info"
)


class CommandError(Exception):
    """An expected failure (bad input, missing file...): printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="delightsam",
        description="De-LightSAM: prompt-free medical image segmentation (6 modalities).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"napari_delightsam.commands.{name.replace('-', '_')}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CommandError as exc:
        print(f"delightsam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"delightsam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"delightsam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
