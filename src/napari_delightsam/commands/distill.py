"""`delightsam distill common|medical-teacher|domain`: the MDKD stages (paper §III-E).

    common           frozen SAM ViT encoder (--teacher-sam, a user-supplied segment-anything
                     checkpoint) -> shared DC-Encoder, controllers off; natural images (--images)
    medical-teacher  ViT-Med = SAM encoder + FFN adapters + SP-Generator + QM-Decoder, adapters/
                     prompt/decoder trained on the source domains (--data)
    domain           medical teacher (LiteMedSAM's encoder, or a ViT-Med file + --teacher-sam)
                     -> modality controller k on modality-k images, backbone frozen (--data)

Each writes a run folder (refused when not empty unless --resume) whose last.safetensors is
the next stage's input: ``train --init RUN/last.safetensors`` after (a) or (c).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cli import CommandError


def _common_args(p: argparse.ArgumentParser, student: bool = True) -> None:
    p.add_argument(
        "--out", type=Path, required=True, help="run folder (new or empty; existing with --resume)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps-per-epoch", type=int, help="steps per epoch (default: one pass over the images)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="decode images on the fly instead of caching them")
    p.add_argument("--progress-jsonl", action="store_true", help="machine-readable progress on stdout")
    if student:
        p.add_argument("--img-size", type=int, default=1024, help="student input size (default 1024)")
        p.add_argument(
            "--init", default="none", help="student init: none | litemedsam | checkpoint (default none)"
        )
        p.add_argument("--model-preset", choices=("default", "tiny"), default="default")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill",
        help="MDKD distillation stages (common, medical-teacher, domain)",
        description=__doc__.split("\n\n")[0],
    )
    sub = p.add_subparsers(dest="stage", metavar="STAGE")
    sub.required = True

    c = sub.add_parser("common", help="SAM ViT encoder -> shared DC-Encoder (controllers off)")
    c.add_argument(
        "--teacher-sam", type=Path, required=True, help="segment-anything checkpoint (sam_vit_b/l/h .pth)"
    )
    c.add_argument("--sam-type", choices=("auto", "vit_b", "vit_l", "vit_h"), default="auto")
    c.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    c.add_argument("--max-images", type=int)
    _common_args(c)

    m = sub.add_parser(
        "medical-teacher", help="PEFT of ViT-Med (SAM encoder + adapters + SP-Generator + QM-Decoder)"
    )
    m.add_argument("--teacher-sam", type=Path, required=True, help="segment-anything checkpoint to adapt")
    m.add_argument("--sam-type", choices=("auto", "vit_b", "vit_l", "vit_h"), default="auto")
    m.add_argument("--data", type=Path, required=True, help="data root: <modality>/<dataset>/images|masks")
    m.add_argument(
        "--adapter-ratio", type=float, default=0.25, help="adapter width / block width (default 0.25)"
    )
    m.add_argument("--max-per-dataset", type=int)
    m.add_argument("--modalities", nargs="+", metavar="M")
    _common_args(m, student=False)
    m.add_argument(
        "--model-preset", choices=("default", "tiny"), default="default", help="SP-Generator/QM-Decoder sizes"
    )

    d = sub.add_parser("domain", help="medical teacher -> modality controllers (backbone frozen)")
    d.add_argument(
        "--teacher", default="litemedsam", help="litemedsam | a ViT-Med file from 'distill medical-teacher'"
    )
    d.add_argument("--teacher-sam", type=Path, help="the SAM checkpoint a ViT-Med teacher was built on")
    d.add_argument("--sam-type", choices=("auto", "vit_b", "vit_l", "vit_h"), default="auto")
    d.add_argument("--data", type=Path, required=True, help="data root: <modality>/<dataset>/images|masks")
    d.add_argument("--max-per-dataset", type=int)
    d.add_argument("--modalities", nargs="+", metavar="M")
    _common_args(d)
    return p


def _config(args: argparse.Namespace):
    from ..training.stages.distill import DistillConfig

    fields: dict[str, Any] = {
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "device": args.device,
        "num_workers": args.num_workers,
        "seed": args.seed,
        "cache": not args.no_cache,
        "model_preset": args.model_preset,
    }
    for name in ("img_size", "init", "max_per_dataset", "max_images", "adapter_ratio"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "modalities", None):
        fields["modalities"] = tuple(args.modalities)
    try:
        return DistillConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"invalid settings: {exc}") from exc


def _sam_info(path: Path, sam_type: str) -> dict[str, Any]:
    from ..atomic_files import sha256_file

    return {"sam_checkpoint": str(path), "sam_type": sam_type, "sam_checkpoint_sha256": sha256_file(path)}


def run(args: argparse.Namespace) -> int:
    from ..training.stages import distill as D
    from .train import jsonl_progress, reported_failures

    cfg = _config(args)
    if not args.resume and args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise CommandError(f"{args.out} exists and is not empty; choose a new --out folder or pass --resume")
    progress = jsonl_progress(args.progress_jsonl)
    common = dict(resume=args.resume, progress=progress, show_progress=not args.progress_jsonl)
    with reported_failures(progress):
        if args.stage in ("common", "medical-teacher"):
            if not args.teacher_sam.is_file():
                raise CommandError(f"--teacher-sam {args.teacher_sam}: file not found")
            encoder = D.load_sam_image_encoder(args.teacher_sam, args.sam_type)
            info = _sam_info(args.teacher_sam, args.sam_type)
            if args.stage == "common":
                teacher = D.ResizingTeacher(encoder, int(encoder.img_size))
                result = D.distill_common(teacher, args.images, args.out, cfg, teacher_info=info, **common)
            else:
                result = D.train_medical_teacher(
                    encoder, args.data, args.out, cfg, teacher_info=info, **common
                )
        else:
            if args.teacher == "litemedsam":
                from ..model.litemedsam import LiteMedSAMUnavailableError
                from ..training.litemedsam_init import LiteMedSAMTeacher

                try:
                    teacher = LiteMedSAMTeacher()
                except LiteMedSAMUnavailableError as exc:
                    raise CommandError(str(exc)) from exc
                info = {"teacher": "litemedsam"}
            else:
                if args.teacher_sam is None:
                    raise CommandError(
                        "a ViT-Med --teacher needs --teacher-sam (the SAM checkpoint it was built on)"
                    )
                vitmed = D.load_vitmed(args.teacher, args.teacher_sam, args.sam_type)
                teacher = D.ResizingTeacher(vitmed.encoder, vitmed.img_size)
                info = {
                    "teacher": "vit-med",
                    "path": str(args.teacher),
                    **_sam_info(args.teacher_sam, args.sam_type),
                }
            result = D.distill_domain(teacher, args.data, args.out, cfg, teacher_info=info, **common)
    if not args.progress_jsonl:
        loss = f"{result.final_loss:.6f}" if result.final_loss is not None else "n/a"
        print(
            f"distill {args.stage}: {'stopped' if result.stopped else 'finished'} after {result.epochs_completed} epoch(s); "
            f"final loss {loss}; checkpoint: {result.checkpoint}"
        )
    return 0
