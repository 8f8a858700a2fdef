"""`delightsam annotate --input DIR --output DIR --modality M [--finetune-every K]`: the annotate
loop without a person.

Segments every readable image of ``--input`` that has no mask in ``--output`` yet (name order),
writing ``<stem>.png`` (or ``.tif``) + ``<mask>.json`` provenance atomically, exactly as
napari's "De-LightSAM annotate" saves them; the session file lets napari (or this command) go on
where it ended. ``--finetune-every K`` fine-tunes after every K saved masks in a lower-priority
child process and segments the next images with the new model only if it beats the current one
on the saved images kept out of training (``annotate_learning``); the models are written under
``OUTPUT/.delightsam/finetune/``. Without corrections the masks trained on are the model's own;
see docs/annotating.md. Exit codes: 0 done; 1 some images could not be read (listed); 2 nothing
could start.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..cli import CommandError


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from ..config import MODALITIES

    p = subparsers.add_parser(
        "annotate",
        help="segment every image of a folder without a mask yet into an output folder (resumable)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--input", "-i", required=True, type=Path, help="folder of images")
    p.add_argument("--output", "-o", required=True, type=Path, help="folder of masks (not the input folder)")
    p.add_argument("--modality", "-m", required=True, help=f"one of {', '.join(MODALITIES)}, or 'auto'")
    p.add_argument("--checkpoint", default=None,
                   help="a .safetensors checkpoint or 'untrained'; omitted = the bundled model")
    p.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--mask-format", choices=("png", "tiff"), default="png")
    p.add_argument("--finetune-every", type=_count, default=0, metavar="K",
                   help="fine-tune after every K saved masks (0 = never; default)")
    p.add_argument("--holdout-every", type=_count, default=4, metavar="N",
                   help="every N-th saved mask is kept out of training to decide whether a new model wins (default 4)")
    p.add_argument("--finetune-steps", type=_count, default=20, help="optimizer steps per fine-tune (default 20)")
    p.add_argument("--finetune-img-size", type=_count, default=0,
                   help="fine-tune image size (default 0: the model's own, at most 512 on a CPU)")
    p.add_argument("--json", action="store_true", help="one JSON object per saved image / round on stdout")
    return p


def run(args: argparse.Namespace) -> int:
    from ..annotate import AnnotationSession
    from ..annotate_batch import annotate_all
    from ..annotate_learning import BUNDLED, LearnConfig, Learner, default_finetune
    from ..config import MODALITIES

    modality = str(args.modality)
    if modality != "auto" and modality not in MODALITIES:
        raise CommandError(f"--modality must be one of {', '.join(MODALITIES)} or auto, got {modality!r}")
    try:
        session = AnnotationSession(args.input, args.output, mask_format=args.mask_format)
    except (OSError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    if modality != "auto":
        session.set_setting("modality", modality)
    base = BUNDLED if args.checkpoint is None else str(args.checkpoint)
    if base not in (BUNDLED, "untrained"):
        base = str(Path(base).expanduser().resolve())
    learner = None
    if args.finetune_every:
        finetune = default_finetune()
        finetune.epochs, finetune.steps_per_epoch = 2, max(1, (args.finetune_steps + 1) // 2)
        finetune.img_size = args.finetune_img_size
        config = LearnConfig(every=args.finetune_every, holdout_every=max(2, args.holdout_every),
                             device=args.device, finetune=finetune)
        learner = Learner(session, config)
    print(f"{session.summary()}; segmenting the rest with {learner.describe(learner.model_for(base)) if learner else base}",
          file=sys.stderr)

    def progress(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event, default=str), flush=True)
        elif event["event"] == "saved":
            print(f"{event['image']} -> {event['mask']} ({event['model']}; {event['summary']})", flush=True)
        elif event["event"] == "round":
            print(f"fine-tune round {event['round']}: {event['status']}: {event['message']}", flush=True)

    summary = annotate_all(session, base, device=args.device, modality=modality, learner=learner, progress=progress)
    for name, reason in session.unreadable.items():
        print(f"{name}: cannot be read ({reason})", file=sys.stderr)
    print(f"{summary['saved']} masks written; {session.summary()}", file=sys.stderr)
    return 1 if session.unreadable else 0
