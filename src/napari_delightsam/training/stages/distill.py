"""Multi-domain knowledge distillation, MDKD (paper §III-E, Eq. 9, Fig. 3), one stage per function.

(a) ``distill_common``   — a frozen segment-anything ViT image encoder teaches the *shared*
    DC-Encoder with the modality controllers switched off: ``MSE(E_s(x; no controller), E_SAM(x))``
    on the 256×64×64 embeddings, natural images from any folder. Only non-controller encoder
    parameters train.
(b) ``train_medical_teacher`` — ViT-Med: the SAM encoder with a parallel adapter in every FFN
    (``AdaptedMLP``) + our SP-Generator + QM-Decoder, trained on the source domains with the
    segmentation loss; only adapters, SP-Generator and QM-Decoder train (PEFT).
(c) ``distill_domain``   — a medical teacher (ViT-Med, or LiteMedSAM's encoder) teaches
    modality controller k on modality-k images: ``MSE(E_s(x; controller k), E_T(x))``; the backbone
    is frozen, only controller parameters train (a sample's gradient reaches only its own
    modality's controller slice).
(d) segmentation training of the whole model is ``training.train``.

Every stage runs the training loop of ``loop.py`` (the one ``train`` uses); what differs is
passed in: the network that trains and what of it, the loss, the images. Every stage writes a
run folder like ``train`` does — ``distill.json``, ``last.safetensors`` (a De-LightSAM checkpoint
for (a)/(c), usable as ``train --init``; the ViT-Med trainable parts for (b)),
``last_state.safetensors`` (resume without pickle) and ``metrics.jsonl`` — and resumes with
``resume=True``.

Progress events: ``warning`` {message}; ``start`` {stage, epochs, start_epoch, steps_per_epoch,
n_images}; ``step`` {epoch, step, steps, global_step, loss}; ``epoch`` {epoch, global_step,
train_loss, lr, epoch_seconds}; ``end`` {status: finished|stopped, checkpoint}.

Teachers are fed the same SAM-normalised batch as the student, resized to their own input size;
their embeddings are resized (area) to the student's grid when the sizes differ.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...atomic_files import atomic_write, sha256_file
from ...config import ModelConfig, tiny_config
from ...data import SampleRecord, SegmentationDataset, discover, discover_images, normalise
from ...devices import autocast_context, autocast_dtype, resolve_device
from ...model import DeLightSAM, delightsam_loss
from ...model.decoder import QMDecoder
from ...model.prompt_generator import SPGenerator
from ..config import TrainConfig, require_positive_int
from ..errors import TrainingError
from ..loop.batches import EpochBatches, cache_cap, relayed_warnings, steps_per_epoch
from ..loop.optim import adam_exponential, train_only
from ..loop.run import EpochHooks, Loss, LossFn, Schedule, StopFlag, isolated_rng, run_loop
from ..loop.runfolder import (
    LAST,
    METRICS,
    ProgressFn,
    RunLog,
    SaveModel,
    load_resumable,
    prepare_run_folder,
    require_resumable,
    save_resumable,
    write_json,
)
from ..model_setup import build_model

__all__ = [
    "SAM_TYPES",
    "AdaptedMLP",
    "DistillConfig",
    "DistillResult",
    "ResizingTeacher",
    "ViTMedTeacher",
    "distill_common",
    "distill_domain",
    "load_sam_image_encoder",
    "load_vitmed",
    "train_medical_teacher",
]

SAM_TYPES = ("vit_b", "vit_l", "vit_h")
_SAM_WIDTH = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
RUN_FILE = "distill.json"
VITMED_FORMAT = "napari-delightsam-vitmed"


@dataclass
class DistillConfig:
    epochs: int = 10
    steps_per_epoch: int | None = None
    batch_size: int = 4
    lr: float = 1e-4
    gamma: float = 0.98
    #: student input size (and ViT-Med's input size in stage b)
    img_size: int = 1024
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"
    amp: bool = True
    cache: bool = True
    augment: bool = True
    log_every: int = 10
    #: student initialisation for (a) and (c): "none" | "litemedsam" | checkpoint path
    init: str = "none"
    model_preset: str = "default"
    model: dict[str, Any] = field(default_factory=dict)
    modalities: tuple[str, ...] | None = None
    max_per_dataset: int | None = None
    max_images: int | None = None
    #: ViT-Med adapter hidden width as a fraction of the block width
    adapter_ratio: float = 0.25
    patch_weight: float = 0.7

    def __post_init__(self) -> None:
        if isinstance(self.modalities, list):
            self.modalities = tuple(self.modalities)
        require_positive_int(self, "epochs", "batch_size", "img_size")
        if self.img_size % 64:
            raise ValueError(f"img_size must be a multiple of 64, got {self.img_size}")
        if not self.lr > 0 or not 0 < self.gamma <= 1:
            raise ValueError("lr must be > 0 and gamma in (0, 1]")
        if self.adapter_ratio <= 0:
            raise ValueError(f"adapter_ratio must be > 0, got {self.adapter_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_config(self) -> TrainConfig:
        """The student-building part as a TrainConfig (model preset, overrides, init, seed)."""
        return TrainConfig(
            img_size=self.img_size,
            model_preset=self.model_preset,
            model=dict(self.model),
            init=self.init,
            seed=self.seed,
        )


@dataclass
class DistillResult:
    out_dir: Path
    checkpoint: Path | None
    epochs_completed: int
    stopped: bool
    final_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    #: the student (DeLightSAM) or the ViT-Med teacher, in memory
    model: nn.Module | None = field(default=None, repr=False)


# -- teachers ----------------------------------------------------------------------------------


def load_sam_image_encoder(checkpoint: str | Path, sam_type: str = "auto") -> nn.Module:
    """The frozen image encoder of a segment-anything checkpoint (``sam_vit_b_01ec64.pth``...).

    segment-anything's builder would ``torch.load`` the file without ``weights_only``; here the
    network is built with ``checkpoint=None`` and the state dict is read with
    ``torch.load(weights_only=True)`` (tensors only, no code). ``sam_type`` "auto" infers
    vit_b/l/h from the patch-embedding width. Accepts a full SAM state dict
    (``image_encoder.*`` keys) or an encoder-only one.
    """
    from segment_anything import sam_model_registry

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path.name}: cannot read a SAM state dict with weights_only=True ({exc})") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path.name} does not hold a state dict")
    if any(k.startswith("image_encoder.") for k in state):
        state = {k[len("image_encoder.") :]: v for k, v in state.items() if k.startswith("image_encoder.")}
    if sam_type == "auto":
        w = state.get("patch_embed.proj.weight")
        if w is None or int(w.shape[0]) not in _SAM_WIDTH:
            raise ValueError(
                f"{path.name}: cannot tell the SAM type (no patch_embed.proj.weight of width 768/1024/1280)"
            )
        sam_type = _SAM_WIDTH[int(w.shape[0])]
    if sam_type not in SAM_TYPES:
        raise ValueError(f"sam_type must be one of {', '.join(SAM_TYPES)} or auto, got {sam_type!r}")
    encoder = sam_model_registry[sam_type](checkpoint=None).image_encoder
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{path.name} does not match the segment-anything {sam_type} image encoder: {str(exc)[:300]}"
        ) from exc
    return freeze(encoder)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


class ResizingTeacher(nn.Module):
    """Wrap an encoder that expects ``size``×``size`` normalised input: (B,3,S,S) -> its embedding."""

    def __init__(self, encoder: nn.Module, size: int) -> None:
        super().__init__()
        self.encoder = freeze(encoder)
        self.size = int(size)

    def train(self, mode: bool = True) -> ResizingTeacher:  # noqa: ARG002 - a teacher stays frozen
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(
                x,
                size=(self.size, self.size),
                mode="bilinear",
                align_corners=False,
                antialias=x.shape[-1] > self.size,
            )
        return self.encoder(x)


class AdaptedMLP(nn.Module):
    """A frozen FFN with a parallel bottleneck adapter: ``mlp(x) + W_up·GELU(W_down·x)``.

    ``W_up`` starts at zero, so the adapted encoder first computes exactly what SAM did.
    """

    def __init__(self, mlp: nn.Module, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = mlp
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.up(self.act(self.down(x)))


class ViTMedTeacher(nn.Module):
    """ViT-Med (paper Fig. 3b): SAM ViT encoder with FFN adapters + SP-Generator + QM-Decoder.

    ``encoder``: a segment-anything ``ImageEncoderViT``; its own weights stay frozen.
    forward(images (B,3,T,T) normalised, modality (B,)) -> (mask logits (B,1,T/4,T/4),
    patch logits, embedding (B,C,T/16,T/16)).
    """

    def __init__(self, encoder: nn.Module, cfg: ModelConfig, adapter_ratio: float = 0.25) -> None:
        super().__init__()
        blocks = getattr(encoder, "blocks", None)
        if blocks is None:
            raise TypeError("ViT-Med needs a segment-anything ImageEncoderViT (with .blocks)")
        freeze(encoder)
        for block in blocks:
            dim = block.norm2.normalized_shape[0]
            block.mlp = AdaptedMLP(block.mlp, dim, max(1, int(round(dim * adapter_ratio))))
        self.encoder = encoder
        self.config = cfg
        self.adapter_ratio = adapter_ratio
        self.prompt_generator = SPGenerator(cfg)
        self.decoder = QMDecoder(cfg)

    @property
    def img_size(self) -> int:
        return int(self.encoder.img_size)

    def train(self, mode: bool = True) -> ViTMedTeacher:
        super().train(mode)
        self.encoder.eval()  # frozen weights; adapters have no dropout/BN
        return self

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (n, p)
            for n, p in self.named_parameters()
            if ".mlp.down." in n or ".mlp.up." in n or n.startswith(("prompt_generator.", "decoder."))
        ]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(
        self, images: torch.Tensor, modality: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(images)
        patch_logits, dense = self.prompt_generator(h)
        return self.decoder(h + dense, modality), patch_logits, h


def _vitmed_config(encoder: nn.Module, cfg: DistillConfig) -> ModelConfig:
    base = tiny_config() if cfg.model_preset == "tiny" else ModelConfig()
    out_chans = int(encoder.neck[0].out_channels)
    try:
        return ModelConfig.from_dict(
            {**base.to_dict(), **cfg.model, "img_size": int(encoder.img_size), "embed_dim": out_chans}
        )
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"invalid ViT-Med settings: {exc}") from exc


def save_vitmed(path: Path, teacher: ViTMedTeacher, meta: dict[str, str]) -> Path:
    """Only the trained parts (adapters, SP-Generator, QM-Decoder) + what rebuilds the rest."""
    from safetensors.torch import save_file

    tensors = {n: p.detach().cpu().contiguous().clone() for n, p in teacher.trainable_named_parameters()}
    metadata = {
        "format": VITMED_FORMAT,
        "config": teacher.config.to_json(),
        "adapter_ratio": str(teacher.adapter_ratio),
        **meta,
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_vitmed(path: str | Path, sam_checkpoint: str | Path, sam_type: str = "auto") -> ViTMedTeacher:
    """Rebuild a ViT-Med teacher: the SAM encoder from ``sam_checkpoint`` + the trained parts."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"ViT-Med teacher not found: {p}")
    with safe_open(str(p), framework="pt", device="cpu") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta.get("format") != VITMED_FORMAT:
        raise ValueError(f"{p.name} is not a ViT-Med teacher file (format {meta.get('format')!r})")
    encoder = load_sam_image_encoder(sam_checkpoint, sam_type)
    expected = meta.get("sam_checkpoint_sha256")
    if expected and expected != sha256_file(sam_checkpoint):
        warnings.warn(
            f"{Path(sam_checkpoint).name} is not the SAM checkpoint {p.name} was trained on",
            UserWarning,
            stacklevel=2,
        )
    teacher = ViTMedTeacher(
        encoder, ModelConfig.from_dict(json.loads(meta["config"])), float(meta["adapter_ratio"])
    )
    missing, unexpected = teacher.load_state_dict(tensors, strict=False)
    trained = {n for n, _ in teacher.trainable_named_parameters()}
    if unexpected or [k for k in missing if k in trained]:
        raise ValueError(f"{p.name} does not fit this SAM encoder ({len(unexpected)} unexpected tensors)")
    return freeze(teacher)  # type: ignore[return-value]


# -- the stage runner: one loop, what differs passed in -------------------------------------------


@dataclass
class _Stage:
    """What one MDKD stage trains, on what, with which loss."""

    name: str
    #: the network that trains and is saved (the De-LightSAM student or ViT-Med)
    module: nn.Module
    trainable: list[tuple[str, nn.Parameter]]
    loss_fn: LossFn
    #: (path, metadata) -> the written ``last`` file
    save_model: SaveModel
    #: extra fields of distill.json
    run_info: dict[str, Any]
    records: Sequence[SampleRecord]
    modalities: Sequence[str]
    #: modality-balanced sampling (source domains) or uniform (natural images)
    balanced: bool
    #: training mode for the loop; None: ``module.train()``
    train_mode: Callable[[], Any] | None = None


def _run_stage(
    stage: _Stage,
    cfg: DistillConfig,
    out: Path,
    device: torch.device,
    resume: bool,
    progress: ProgressFn | None,
    stop_event: StopFlag | None,
    show_progress: bool,
) -> DistillResult:
    log = RunLog(out / METRICS, progress)
    if not stage.trainable:
        raise TrainingError(f"{stage.name}: no trainable parameters")
    with relayed_warnings(log):
        ds = SegmentationDataset(
            stage.records,
            cfg.img_size,
            stage.modalities,
            augment=cfg.augment,
            cache=cfg.cache,
            cache_max_bytes=cache_cap(),
            any_modality=True,
        )
    steps = steps_per_epoch(len(ds), cfg.batch_size, cfg.steps_per_epoch)
    batches = EpochBatches(
        ds,
        batch_size=cfg.batch_size,
        steps=steps,
        seed=cfg.seed,
        balanced=stage.balanced,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    opt = adam_exponential([(stage.trainable, 1.0)], cfg.lr, cfg.gamma)
    start = 0
    if resume:
        info = load_resumable(out, opt.optimizer, opt.scheduler, opt.param_names)
        start = int(info["epoch"]) + 1
        log.resume_at(start)
    else:
        write_json(
            out / RUN_FILE,
            {
                "stage": stage.name,
                "config": cfg.to_dict(),
                "n_images": len(ds),
                "skipped": ds.skipped,
                **stage.run_info,
            },
        )
    log.emit(
        {
            "event": "start",
            "stage": stage.name,
            "epochs": cfg.epochs,
            "start_epoch": start,
            "steps_per_epoch": steps,
            "n_images": len(ds),
        }
    )

    def save_last(epoch: int, global_step: int, row: dict[str, Any]) -> None:
        meta = {"distill_stage": stage.name, "epoch": str(epoch), "distill_config": json.dumps(cfg.to_dict())}
        info = {"epoch": epoch, "stage": stage.name}
        save_resumable(out, opt.optimizer, opt.scheduler, opt.param_names, info, stage.save_model, meta)

    outcome = run_loop(
        Schedule(cfg.epochs, steps, start_epoch=start, seed=cfg.seed, log_every=cfg.log_every),
        batches,
        stage.loss_fn,
        opt.optimizer,
        opt.scheduler,
        stage.trainable,
        EpochHooks(train_mode=stage.train_mode or stage.module.train, save_last=save_last),
        log,
        stop=stop_event,
        show_progress=show_progress,
        step_details=False,  # the MDKD rows as they were: no per-step lr or timing
        oom_message=lambda: (
            f"out of memory on {device} at batch size {cfg.batch_size}, image size {cfg.img_size}: "
            "reduce --batch-size or --img-size"
        ),
    )
    stage.module.eval()
    result = DistillResult(
        out,
        (out / LAST) if (out / LAST).is_file() else None,
        outcome.epochs_completed,
        outcome.stopped,
        outcome.last_loss,
        log.history,
        stage.module,
    )
    log.emit(
        {
            "event": "end",
            "status": "stopped" if outcome.stopped else "finished",
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        }
    )
    return result


def _prepare(out_dir: str | Path, resume: bool) -> Path:
    out = Path(out_dir).expanduser()
    prepare_run_folder(out, resume, RUN_FILE)
    if resume:
        require_resumable(out)
    return out


def _source_records(data: str | Path | Sequence[SampleRecord], cfg: DistillConfig) -> list[SampleRecord]:
    """The source-domain images of stages (b) and (c): a data folder's training split (capped
    per dataset) or the given records."""
    if not isinstance(data, (str, Path)):
        return list(data)
    records = discover(data, cfg.modalities)
    if cfg.max_per_dataset is not None:
        from ...data import make_splits, select

        records = select(records, make_splits(records, seed=cfg.seed), "train", cfg.max_per_dataset)
    return records


# -- the student (stages a and c) ------------------------------------------------------------------


def _student(
    cfg: DistillConfig, out: Path, resume: bool, device: torch.device
) -> tuple[DeLightSAM, dict[str, Any]]:
    if resume:
        from ...checkpoint import load_checkpoint, read_checkpoint_info

        _, meta = read_checkpoint_info(out / LAST)
        model = load_checkpoint(out / LAST)
        report: dict[str, Any] = {
            "init": "resume",
            "source_modality_head_trained": meta.get("modality_head_trained", "false"),
        }
    else:
        model, report = build_model(cfg.train_config())
    return model.to(device), report


def _student_saver(
    model: DeLightSAM, report: dict[str, Any], teacher_info: dict[str, Any] | None
) -> SaveModel:
    """Writes the student as a De-LightSAM checkpoint. Distillation never trains the modality
    head: the flag of the checkpoint it started from is kept."""
    from ...checkpoint import save_checkpoint

    base = {
        "modality_head_trained": str(report.get("source_modality_head_trained", "false")) or "false",
        "teacher": json.dumps(teacher_info or {}, default=str),
        "init": json.dumps(report, default=str),
    }
    return lambda path, meta: save_checkpoint(path, model, {**base, **meta})


def _match_grid(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.shape[-2:] != like.shape[-2:]:
        t = F.interpolate(
            t.float(), size=like.shape[-2:], mode="area" if t.shape[-1] > like.shape[-1] else "bilinear"
        )
    return t


def _check_channels(t: torch.Tensor, s: torch.Tensor, what: str) -> None:
    if t.shape[1] != s.shape[1]:
        raise TrainingError(
            f"{what} embedding has {t.shape[1]} channels but the student's has {s.shape[1]}; "
            "use a student whose embed_dim matches the teacher's output channels"
        )


def _embedding_kd_loss(
    teacher: nn.Module, model: DeLightSAM, device: torch.device, cfg: DistillConfig, route_modality: bool
) -> LossFn:
    """MSE between the frozen teacher's and the DC-Encoder's embeddings (Eq. 9).

    ``route_modality=False``: controllers off (common KD); True: each image through its own
    modality's controller (domain KD).
    """
    amp_dtype = autocast_dtype(device, cfg.amp)

    def loss_fn(batch: dict[str, torch.Tensor]) -> Loss:
        x = normalise(batch["image"].to(device, non_blocking=True))
        modality = batch["modality"].to(device, non_blocking=True) if route_modality else None
        with torch.no_grad(), autocast_context(device, amp_dtype):
            t = teacher(x)
        with autocast_context(device, amp_dtype):
            s = model.encoder(x, modality)
        _check_channels(t, s, "teacher")
        return Loss(F.mse_loss(s.float(), _match_grid(t, s).float()))

    return loss_fn


def _encoder_kd_stage(
    name: str,
    group: str,
    teacher: nn.Module,
    records: Sequence[SampleRecord],
    cfg: DistillConfig,
    out: Path,
    device: torch.device,
    resume: bool,
    teacher_info: dict[str, Any] | None,
    balanced: bool,
) -> _Stage:
    """Stages (a) and (c): the student's ``group`` ("backbone" or "controllers") learns the
    teacher's embedding; controllers are routed by modality only when they are what trains."""
    model, report = _student(cfg, out, resume, device)
    teacher = freeze(teacher).to(device)
    trainable = train_only(model, group)
    if not trainable and group == "controllers":
        raise TrainingError("this model has no modality controllers to distil into")
    return _Stage(
        name,
        model,
        trainable,
        _embedding_kd_loss(teacher, model, device, cfg, route_modality=group == "controllers"),
        _student_saver(model, report, teacher_info),
        {"teacher": teacher_info or {}, "init": report},
        records,
        model.config.modalities,
        balanced=balanced,
        # domain KD: the frozen backbone's BatchNorm statistics stay fixed (controllers have no BN)
        train_mode=model.eval if group == "controllers" else None,
    )


# -- stage (a): common KD ----------------------------------------------------------------------


def distill_common(
    teacher: nn.Module,
    images: str | Path | Sequence[SampleRecord],
    out_dir: str | Path,
    cfg: DistillConfig,
    *,
    teacher_info: dict[str, Any] | None = None,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    stop_event: Any = None,
    show_progress: bool = True,
) -> DistillResult:
    """(a) SAM encoder -> shared DC-Encoder (controllers off). ``teacher``: normalised (B,3,S,S)
    -> (B,C,g,g), e.g. ``ResizingTeacher(load_sam_image_encoder(ckpt), 1024)``."""
    out = _prepare(out_dir, resume)
    device = resolve_device(cfg.device)
    records = discover_images(images) if isinstance(images, (str, Path)) else list(images)
    if cfg.max_images is not None:
        records = records[: cfg.max_images]
    with isolated_rng(device):
        stage = _encoder_kd_stage(
            "common", "backbone", teacher, records, cfg, out, device, resume, teacher_info, balanced=False
        )
        return _run_stage(stage, cfg, out, device, resume, progress, stop_event, show_progress)


# -- stage (b): ViT-Med teacher --------------------------------------------------------------------


def train_medical_teacher(
    sam_encoder: nn.Module,
    data: str | Path | Sequence[SampleRecord],
    out_dir: str | Path,
    cfg: DistillConfig,
    *,
    teacher_info: dict[str, Any] | None = None,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    stop_event: Any = None,
    show_progress: bool = True,
) -> DistillResult:
    """(b) PEFT of ViT-Med on the source domains: adapters + SP-Generator + QM-Decoder train.

    Images are fed at the SAM encoder's own input size (``cfg.img_size`` is set to it).
    """
    out = _prepare(out_dir, resume)
    device = resolve_device(cfg.device)
    cfg = dataclasses.replace(cfg, img_size=int(sam_encoder.img_size))
    records = _source_records(data, cfg)
    with isolated_rng(device):
        torch.manual_seed(cfg.seed)
        teacher = ViTMedTeacher(sam_encoder, _vitmed_config(sam_encoder, cfg), cfg.adapter_ratio)
        if resume:
            from safetensors.torch import load_file

            teacher.load_state_dict(load_file(str(out / LAST)), strict=False)
        teacher.to(device)
        amp_dtype = autocast_dtype(device, cfg.amp)

        def loss_fn(batch: dict[str, torch.Tensor]) -> Loss:
            x = normalise(batch["image"].to(device, non_blocking=True))
            masks = batch["mask"].to(device, non_blocking=True).float()
            modality = batch["modality"].to(device, non_blocking=True)
            with autocast_context(device, amp_dtype):
                mask_logits, patch_logits, _ = teacher(x, modality)
            return Loss(
                delightsam_loss(mask_logits, patch_logits, masks, patch_weight=cfg.patch_weight).total
            )

        info = dict(teacher_info or {})
        meta = {
            k: str(v) for k, v in info.items() if k in ("sam_type", "sam_checkpoint", "sam_checkpoint_sha256")
        }
        stage = _Stage(
            "medical-teacher",
            teacher,
            teacher.trainable_named_parameters(),
            loss_fn,
            lambda path, extra: save_vitmed(path, teacher, {**meta, **extra}),
            {"teacher": info},
            records,
            teacher.config.modalities,
            balanced=True,
        )
        return _run_stage(stage, cfg, out, device, resume, progress, stop_event, show_progress)


# -- stage (c): domain KD ---------------------------------------------------------------------------


def distill_domain(
    teacher: nn.Module,
    data: str | Path | Sequence[SampleRecord],
    out_dir: str | Path,
    cfg: DistillConfig,
    *,
    teacher_info: dict[str, Any] | None = None,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    stop_event: Any = None,
    show_progress: bool = True,
) -> DistillResult:
    """(c) medical teacher -> modality controller k on modality-k images; backbone frozen.

    ``teacher``: normalised (B,3,S,S) -> (B,C,g,g): ``LiteMedSAMTeacher()``, or
    ``ResizingTeacher(load_vitmed(...).encoder, size)``.
    """
    out = _prepare(out_dir, resume)
    device = resolve_device(cfg.device)
    records = _source_records(data, cfg)
    with isolated_rng(device):
        stage = _encoder_kd_stage(
            "domain", "controllers", teacher, records, cfg, out, device, resume, teacher_info, balanced=True
        )
        return _run_stage(stage, cfg, out, device, resume, progress, stop_event, show_progress)
