"""The inference engine: ``load_model(...) -> Segmenter``; ``Segmenter.segment(image, modality)``.

Where a tensor is born and dies::

    numpy image (H,W[,C])  --prepare_array-->  (H,W,1|3) [0,255]             (CPU, numpy)
      --to_model_tensor-->  (1,3,S,S) normalised, on the device               (preprocess)
      --torch.cat-->        (B,3,S,S)  --DeLightSAM-->  mask_logits (B,1,S/4,S/4) (S/2 with mask_stride 2),
                            patch_logits (B,1,S/32,S/32), modality_logits (B,K)   (model)
      --to_input_size + sigmoid--> probability / patch_heatmap (H,W) float32,
                            mask = probability > threshold (H,W) bool             (postprocess)

Threshold semantics: ``mask = probability > threshold`` (strict, as SAM's ``logits > 0``):
threshold 0.5 keeps pixels the model gives more than even odds; threshold 1.0 gives an
empty mask. ``SegmentationResult.rethreshold`` applies the same rule without the network.

Fast paths (``fast=True``, the default): ``torch.inference_mode``, channels_last memory
format, bf16 autocast on CUDA GPUs with native bf16 (compute capability >= 8) and on CPUs
with native bf16 (AVX512-BF16 / AMX; see ``devices.cpu_supports_bf16``), fp32 everywhere else
and as the fallback when a bf16 forward fails. ``compile=True`` wraps the network in
``torch.compile`` and falls back to eager mode if compilation fails. ``load_model`` (not a
``Segmenter`` built around a caller's model) also folds BatchNorm into the convolutions
(``model/fusion.py``, exact up to float rounding). ``Segmenter.precision``
says what is used. The CPU thread count is left as the process has it (``set_threads``
changes it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig
from .devices import autocast_context, choose_precision, resolve_device
from .model.fusion import is_fused
from .model.image_rules import darkfield_rows
from .preprocess import (
    DEFAULT_MAX_PIXELS,
    NanPolicy,
    PrepInfo,
    describe_pseudo_colour,
    prepare_array,
    to_input_size,
    to_model_tensor,
)

#: checkpoint metadata key: "fp32" makes precision="auto" run this checkpoint in fp32 even where
#: bf16 is native (set when the fast path's masks were measured to disagree with fp32 eager)
INFERENCE_PRECISION_KEY = "inference_precision"

__all__ = [
    "AutoDecision",
    "ModalitySpec",
    "PreparedImage",
    "SegmentationResult",
    "Segmenter",
    "load_model",
    "set_threads",
    "threshold_probability",
]

log = logging.getLogger(__name__)

#: "auto", a modality name (aliases allowed, see ``ModelConfig.modality_index``) or an index
ModalitySpec = str | int

#: checkpoint metadata key that marks the modality classifier head as trained ("true")
MODALITY_HEAD_TRAINED_KEY = "modality_head_trained"
#: checkpoint metadata key: the calibrated confidence below which ``auto`` asks (a float)
AUTO_CONFIDENCE_KEY = "auto_confidence_threshold"
#: modalities whose images are colour (none of the 1,345 dermoscopy, fundus and colonoscopy images
#: of the project's data is grey): ``auto`` asks before calling a greyscale image one of them,
#: however confident (a greyscale copy of a colour image loses the head's strongest cue)
COLOUR_ONLY_MODALITIES = ("dermoscopy", "fundus", "colonoscopy")
#: the confidence threshold of models whose file names none (uncalibrated heads)
DEFAULT_AUTO_CONFIDENCE = 0.9


@dataclass(frozen=True)
class AutoDecision:
    """What ``auto`` decided for one image, and whether it should ask instead of picking silently.

    ``confidence`` is the (calibrated) probability of ``modality``; ``asks`` is True when it is
    below the model's threshold: the widget then asks the user to choose between ``modality`` and
    ``runner_up``, the command line warns (or refuses with ``--strict-auto``)."""

    modality: str
    confidence: float
    runner_up: str
    runner_up_confidence: float
    threshold: float
    asks: bool
    #: why it asks when its confidence is not the reason ("" otherwise)
    reason: str = ""

    def describe(self) -> str:
        return f"{self.modality} (p={self.confidence:.2f}) or {self.runner_up} (p={self.runner_up_confidence:.2f})"

    def why(self) -> str:
        """Why it asks, in words: ``reason``, or its confidence against the threshold."""
        return self.reason or f"p={self.confidence:.2f} is below this model's {self.threshold:.2f}"

_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


def set_threads(n: int) -> int:
    """Set the number of CPU threads torch uses for inference; returns the previous value."""
    if int(n) < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    return previous


def _check_threshold(threshold: float) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return t


def threshold_probability(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The mask rule used everywhere: ``probability > threshold`` (bool, same shape)."""
    return np.asarray(probability) > _check_threshold(threshold)


@dataclass
class SegmentationResult:
    """One image's segmentation, every map at the input's own (H,W)."""

    #: (H,W) bool, ``probability > threshold``
    mask: np.ndarray
    #: (H,W) float32 in [0,1]: sigmoid of the QM-Decoder's low-res logits resized to (H,W)
    probability: np.ndarray
    #: (H,W) float32 in [0,1]: sigmoid of the SP-Generator patch logits resized to (H,W)
    patch_heatmap: np.ndarray
    #: the modality whose controller/query produced the mask (given, or predicted by "auto")
    modality: str
    #: softmax of the modality head, when the model has a trained one; else None
    modality_probabilities: dict[str, float] | None
    #: seconds: preprocess, model (this image's share of its batch), postprocess, total
    timings: dict[str, float]
    threshold: float = 0.5
    #: how the input was read (layout, intensity window...)
    info: PrepInfo | None = None
    #: what was changed before segmenting: the appearance head's correction (e.g. "channels BGR
    #: -> RGB", "hue -24°") or a false-colour channel taken as grey (``preprocess.pseudo_colour``);
    #: None when nothing
    colour_correction: str | None = None
    #: None for a whole-image run; for a tiled run (``tiling.py``) its layout: tiles, grid
    #: (rows, columns), tile, scale, overlap, working_size
    tiling: dict[str, Any] | None = None
    #: the refiner that corrected the mask ("fundus", "microscopy", "microscopy_darkfield" for a
    #: dark-field image: ``model/image_rules.py``), None when the modality has none
    refiner: str | None = None

    def rethreshold(self, threshold: float) -> np.ndarray:
        """The mask at another threshold, without running the network again."""
        return threshold_probability(self.probability, threshold)


@dataclass
class PreparedImage:
    """An image ready for the network: ``tensor`` (1,3,S,S) on the device plus its PrepInfo."""

    tensor: torch.Tensor
    info: PrepInfo
    seconds: float = 0.0


@dataclass
class _BatchOutput:
    mask_logits: torch.Tensor
    patch_logits: torch.Tensor
    modality: torch.Tensor
    modality_logits: torch.Tensor | None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: (B,3,3) colour corrections the appearance head applied (None without one)
    colour_matrix: torch.Tensor | None = None
    #: (B,) bool: which inputs are dark-field (``model/image_rules.py``; None: the model has no
    #: dark-field refiner)
    darkfield: torch.Tensor | None = None


def _merge_outputs(parts: Sequence[_BatchOutput], order: torch.Tensor | None = None) -> _BatchOutput:
    """The outputs of sub-batches as one, in ``order`` (indices into their concatenation)."""

    def cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        if any(t is None for t in tensors):
            return None
        joined = torch.cat(tensors)  # type: ignore[arg-type]
        return joined if order is None else joined[order]

    return _BatchOutput(
        cat([p.mask_logits for p in parts]),  # type: ignore[arg-type]
        cat([p.patch_logits for p in parts]),  # type: ignore[arg-type]
        cat([p.modality for p in parts]),  # type: ignore[arg-type]
        cat([p.modality_logits for p in parts]),
        colour_matrix=cat([p.colour_matrix for p in parts]),
        darkfield=cat([p.darkfield for p in parts]),
    )


class Segmenter:
    """A De-LightSAM network on a device, ready to segment numpy images.

    Build it with :func:`load_model` or :meth:`from_model`. Attributes: ``config``,
    ``device``, ``precision`` ("fp32" | "bf16"), ``checkpoint_path`` (None when untrained or
    built from a live model), ``checkpoint_sha256``, ``metadata``, ``auto_available``.

    ``fast`` turns on the fast paths (module docstring); ``precision`` forces "fp32" or
    "bf16" (bf16 falls back to fp32 with a warning where it is not native); ``channels_last``
    overrides the memory-format choice (default: follows ``fast``). The model is used in
    place: it is moved to ``device`` and put in eval mode, not copied.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device | None = "auto",
        *,
        fast: bool = True,
        precision: str = "auto",
        compile: bool = False,
        channels_last: bool | None = None,
        metadata: dict[str, str] | None = None,
        checkpoint_path: Path | None = None,
        checkpoint_sha256: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        cfg = getattr(model, "config", None)
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"Segmenter needs a DeLightSAM model, got {type(model).__name__}")
        self.device = resolve_device(device)
        self.fast = bool(fast)
        self.channels_last = self.fast if channels_last is None else bool(channels_last)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        # the model is used in place (not copied); only the channels_last path reformats its weights
        model = model.eval().to(self.device)
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.config: ModelConfig = cfg
        self.metadata: dict[str, str] = dict(metadata or {})
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.checkpoint_sha256 = checkpoint_sha256
        self.max_pixels = int(max_pixels)
        if precision == "auto" and self.metadata.get(INFERENCE_PRECISION_KEY) == "fp32":
            # the checkpoint says its bf16 masks do not match fp32 closely enough (its model card
            # measures it): "auto" keeps fp32 (folding and channels_last stay); "bf16" still forces it
            precision = "fp32"
        self.precision = choose_precision(self.device, precision, self.fast)
        self._compiled: Any = None
        if compile:
            try:
                self._compiled = torch.compile(self.model)
            except Exception as exc:  # pragma: no cover - depends on the platform
                warnings.warn(f"torch.compile unavailable ({exc}); using eager mode", stacklevel=2)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        device: str | torch.device | None = "auto",
        **kwargs: Any,
    ) -> Segmenter:
        """Wrap a live ``DeLightSAM`` (moved to ``device``, eval mode; weights not copied)."""
        return cls(model, device, **kwargs)

    def __repr__(self) -> str:
        src = self.checkpoint_path.name if self.checkpoint_path else "in-memory/untrained"
        return (
            f"Segmenter({self.config.variant}, {src}, device={self.device}, precision={self.precision}, "
            f"auto={'yes' if self.auto_available else 'no'})"
        )

    # -- configuration ---------------------------------------------------------------------

    def fast_path_description(self) -> str:
        parts = ["inference_mode", "bf16 autocast" if self.precision == "bf16" else "fp32"]
        if is_fused(self.model):
            parts.append("conv-BN fused")
        if self.channels_last:
            parts.append("channels_last")
        if self.compiled:
            parts.append("torch.compile")
        return f"{' + '.join(parts)} on {self.device}"

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

    @property
    def auto_available(self) -> bool:
        """True when the model has a modality head that its checkpoint marks as trained."""
        trained = self.metadata.get(MODALITY_HEAD_TRAINED_KEY, "").strip().lower() == "true"
        return self.model.modality_head is not None and trained

    @property
    def auto_confidence_threshold(self) -> float:
        """Calibrated confidence below which ``auto`` asks (checkpoint metadata, else the default)."""
        try:
            return float(self.metadata.get(AUTO_CONFIDENCE_KEY, DEFAULT_AUTO_CONFIDENCE))
        except ValueError:
            return DEFAULT_AUTO_CONFIDENCE

    def auto_decision(self, result: SegmentationResult) -> AutoDecision:
        """The ``auto`` decision behind a result: its modality's probability, the runner-up and
        whether that probability is below the model's confidence threshold (see ``AutoDecision``).
        Refused for a result without modality probabilities (no trained modality head)."""
        probs = result.modality_probabilities
        if not probs:
            raise ValueError("this result has no modality probabilities: the model's modality head is not trained")
        return self._decision(probs, result.modality, greyscale=result.info is not None and result.info.greyscale)

    def _decision(self, probs: dict[str, float], chosen: str | None = None, *, greyscale: bool = False) -> AutoDecision:
        """The decision for modality probabilities: ``chosen`` (default: the most likely), the
        runner-up, and whether it asks: ``chosen``'s probability is below the model's threshold,
        or the image is ``greyscale`` and ``chosen`` is a modality whose images are colour
        (``COLOUR_ONLY_MODALITIES``)."""
        ranked = sorted(probs.items(), key=lambda kv: kv[1], reverse=True)
        first = chosen if chosen in probs else ranked[0][0]
        runner = next((kv for kv in ranked if kv[0] != first), (first, 0.0))
        threshold = self.auto_confidence_threshold
        conf = float(probs[first])
        unlikely = greyscale and first in COLOUR_ONLY_MODALITIES and conf >= threshold
        reason = f"a greyscale image is rarely {first}" if unlikely else ""
        return AutoDecision(first, conf, runner[0], float(runner[1]), threshold, conf < threshold or unlikely, reason)

    def decide_modality(self, images: Sequence[Any], *, nan_policy: NanPolicy = "raise") -> AutoDecision:
        """One ``auto`` decision for several images (a stack's slices): the modality head's
        probabilities averaged over them (stage 0 and the head only, no segmentation)."""
        self.resolve_modality("auto")  # refuses models without a trained head
        if not len(images):
            raise ValueError("decide_modality needs at least one image")
        total = torch.zeros(len(self.modalities), dtype=torch.float64)
        greyscale = True
        with torch.inference_mode(), self._autocast():
            for image in images:
                prepared = self.prepare(image, nan_policy=nan_policy)
                greyscale &= prepared.info.greyscale
                _, _, logits, _ = self.model.stage0(prepared.tensor.contiguous(memory_format=self.memory_format))
                total += torch.softmax(logits.float()[0], 0).double().cpu()
        return self._decision(dict(zip(self.modalities, (total / len(images)).tolist(), strict=True)),
                              greyscale=greyscale)

    def resolve_modality(self, modality: ModalitySpec | None) -> int | None:
        """Index for a name/alias/index; None for "auto" (refused when the head is untrained)."""
        if modality is None or (isinstance(modality, str) and modality.strip().lower() == "auto"):
            if self.model.modality_head is None:
                raise ValueError(
                    "modality='auto' is unavailable: this model has no modality classifier; "
                    f"pass one of {', '.join(self.modalities)}"
                )
            if not self.auto_available:
                raise ValueError(
                    "modality='auto' is unavailable for this model: its modality classifier head is "
                    f"not trained (checkpoint metadata {MODALITY_HEAD_TRAINED_KEY} is not 'true'); "
                    f"pass the modality explicitly, one of {', '.join(self.modalities)}"
                )
            return None
        if isinstance(modality, np.integer):
            modality = int(modality)
        if isinstance(modality, bool) or not isinstance(modality, (str, int)):
            raise ValueError(f"modality must be 'auto', a name or an index, got {modality!r}")
        return self.config.modality_index(modality)

    # -- stages ----------------------------------------------------------------------------

    def prepare(self, image: Any, *, nan_policy: NanPolicy = "raise") -> PreparedImage:
        """Validate and preprocess one image (``ValueError`` with the reason when unusable)."""
        t0 = time.perf_counter()
        arr, info = prepare_array(image, max_pixels=self.max_pixels, nan_policy=nan_policy)
        tensor = to_model_tensor(arr, self.config.img_size, self.device)
        return PreparedImage(tensor, info, time.perf_counter() - t0)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, torch.bfloat16 if self.precision == "bf16" else None)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward_once(
        self, x: torch.Tensor, modality: torch.Tensor | None, run_head: bool = True, darkfield: torch.Tensor | None = None
    ) -> _BatchOutput:
        kw: dict[str, Any] = {} if run_head else {"run_head": False}  # the plain call unless the head is skipped
        if darkfield is not None:
            kw["darkfield"] = darkfield
        with torch.inference_mode():
            with self._autocast():
                if self._compiled is not None:
                    try:
                        out = self._compiled(x, modality, **kw)
                    except _OOM_ERRORS:
                        raise
                    except Exception as exc:
                        warnings.warn(
                            f"torch.compile failed ({type(exc).__name__}: {exc}); using eager mode",
                            stacklevel=2,
                        )
                        self._compiled = None
                        out = self.model(x, modality, **kw)
                else:
                    out = self.model(x, modality, **kw)
            self._sync()
        logits = out.modality_logits.float() if out.modality_logits is not None else None
        colour = getattr(out, "colour_matrix", None)
        return _BatchOutput(out.mask_logits.float(), out.patch_logits.float(), out.modality, logits,
                            colour_matrix=None if colour is None else colour.float())

    def _forward_guarded(
        self, x: torch.Tensor, modality: torch.Tensor | None, run_head: bool = True, darkfield: torch.Tensor | None = None
    ) -> _BatchOutput:
        """One forward with the fallbacks: bf16 -> fp32 on failure; CUDA OOM -> smaller batches."""
        try:
            return self._forward_once(x, modality, run_head, darkfield)
        except _OOM_ERRORS:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            n = x.shape[0]
            if n == 1:
                raise RuntimeError(
                    f"out of memory on {self.device} while segmenting one {self.config.img_size}² image; "
                    "close other GPU programs or use device='cpu'"
                ) from None
            half = n // 2
            log.warning("out of memory with a batch of %d on %s; retrying with %d", n, self.device, half)
            return _merge_outputs([
                self._forward_guarded(x[:half], None if modality is None else modality[:half], run_head,
                                      None if darkfield is None else darkfield[:half]),
                self._forward_guarded(x[half:], None if modality is None else modality[half:], run_head,
                                      None if darkfield is None else darkfield[half:]),
            ])
        except RuntimeError as exc:
            if "can't allocate memory" in str(exc) or "not enough memory" in str(exc):
                raise RuntimeError(
                    f"out of memory on {self.device} with a batch of {x.shape[0]}: use a smaller batch size"
                ) from None
            if self.precision != "bf16":
                raise
            warnings.warn(f"bf16 inference failed ({exc}); falling back to fp32", stacklevel=2)
            self.precision = "fp32"
            return self._forward_once(x, modality, run_head, darkfield)

    def _run(
        self, batch: list[PreparedImage], modality: list[int | None], *, run_head: bool = True, darkfield: bool | None = None
    ) -> _BatchOutput:
        """One network call over ``batch``; ``run_head=False`` (every modality given) skips the
        modality/appearance head (no modality logits, no colour correction). ``darkfield`` (the
        tiles of one image) sends the whole batch through a dark-field refiner or not (None: each
        input's own pixels decide, ``model/image_rules.py``, once here for the network and the report)."""
        x = torch.cat([p.tensor for p in batch]).contiguous(memory_format=self.memory_format)
        t0 = time.perf_counter()
        # decided here once, for the decoder and the report alike (a grey image is never recoloured)
        dark = None
        if darkfield is not None:
            dark = torch.full((len(batch),), bool(darkfield), device=self.device)
        elif self.config.darkfield_refiners:
            dark = darkfield_rows(x)
        if not run_head:
            if any(m is None for m in modality):
                raise ValueError("run_head=False needs every modality given")
            mod = torch.tensor(modality, dtype=torch.long, device=self.device)
            out = self._forward_guarded(x, mod, run_head=False, darkfield=dark)
        elif all(m is None for m in modality):
            out = self._forward_guarded(x, None, darkfield=dark)
        elif any(m is None for m in modality):
            # a chunk mixing "auto" with given modalities: two forwards, merged back in order
            auto = [i for i, m in enumerate(modality) if m is None]
            given = [i for i, m in enumerate(modality) if m is not None]
            mod = torch.tensor([modality[i] for i in given], dtype=torch.long, device=self.device)
            a = self._forward_guarded(x[auto], None, darkfield=None if dark is None else dark[auto])
            g = self._forward_guarded(x[given], mod, darkfield=None if dark is None else dark[given])
            out = _merge_outputs([a, g], torch.tensor(auto + given, device=self.device).argsort())
        else:
            mod = torch.tensor(modality, dtype=torch.long, device=self.device)
            out = self._forward_guarded(x, mod, darkfield=dark)
        out.darkfield = dark
        out.seconds = time.perf_counter() - t0
        return out

    def _upsample(self, lowres: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """(h,w) logits -> (H,W) float32 probabilities (sigmoid after the resize, like SAM)."""
        try:
            up = to_input_size(lowres, size)
        except _OOM_ERRORS:  # a huge image on a full GPU: finish this one on the CPU
            torch.cuda.empty_cache()
            up = to_input_size(lowres.cpu(), size)
        return up.sigmoid_().cpu().numpy()

    def _postprocess(
        self, out: _BatchOutput, i: int, prepared: PreparedImage, threshold: float, share: float
    ):
        t0 = time.perf_counter()
        with torch.inference_mode():
            size = prepared.info.size
            probability = self._upsample(out.mask_logits[i, 0], size)
            heatmap = self._upsample(out.patch_logits[i, 0], size)
            probs = None
            if out.modality_logits is not None and self.auto_available:
                p = torch.softmax(out.modality_logits[i], dim=0).cpu().tolist()
                probs = {name: float(v) for name, v in zip(self.modalities, p, strict=True)}
            correction = None
            if out.colour_matrix is not None:
                from .model.appearance_head import describe_correction

                correction = describe_correction(out.colour_matrix[i].cpu().numpy())
            if correction is None and prepared.info.pseudo_colour is not None:
                correction = describe_pseudo_colour(prepared.info.pseudo_colour)
        mask = probability > threshold
        post = time.perf_counter() - t0
        timings = {
            "preprocess": prepared.seconds,
            "model": share,
            "postprocess": post,
            "total": prepared.seconds + share + post,
        }
        return SegmentationResult(
            mask=mask,
            probability=probability,
            patch_heatmap=heatmap,
            modality=self.modalities[int(out.modality[i])],
            modality_probabilities=probs,
            timings=timings,
            threshold=threshold,
            info=prepared.info,
            colour_correction=correction,
            refiner=self.config.refiner_for(
                self.modalities[int(out.modality[i])], bool(out.darkfield[i]) if out.darkfield is not None else False
            ),
        )

    # -- public entry points ---------------------------------------------------------------

    def _modality_list(
        self, modality: ModalitySpec | Sequence[ModalitySpec] | None, n: int
    ) -> list[int | None]:
        if isinstance(modality, (list, tuple)):
            if len(modality) != n:
                raise ValueError(f"got {len(modality)} modalities for {n} images")
            return [self.resolve_modality(m) for m in modality]
        return [self.resolve_modality(modality)] * n  # type: ignore[arg-type]

    def segment_prepared(
        self,
        prepared: Sequence[PreparedImage],
        modality: ModalitySpec | Sequence[ModalitySpec] | None = "auto",
        threshold: float = 0.5,
        *,
        batch_size: int = 8,
    ) -> list[SegmentationResult]:
        """Run the network on already prepared images, ``batch_size`` at a time, stacked."""
        threshold = _check_threshold(threshold)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        mods = self._modality_list(modality, len(prepared))
        results: list[SegmentationResult] = []
        for start in range(0, len(prepared), int(batch_size)):
            chunk = list(prepared[start : start + int(batch_size)])
            out = self._run(chunk, mods[start : start + len(chunk)])
            share = out.seconds / len(chunk)
            results += [self._postprocess(out, i, p, threshold, share) for i, p in enumerate(chunk)]
        return results

    def segment_batch(
        self,
        images: Sequence[Any],
        modality: ModalitySpec | Sequence[ModalitySpec] | None = "auto",
        threshold: float = 0.5,
        *,
        batch_size: int = 8,
        nan_policy: NanPolicy = "raise",
        auto_per_image: bool = False,
        tiling: str = "auto",
        tile_scale: float | None = None,
        tile_overlap: int | None = None,
    ) -> list[SegmentationResult]:
        """Segment many images (any sizes): preprocessed one by one, run ``batch_size`` at a
        time as one stacked tensor on the device. ``modality`` is one spec or one per image.

        A single ``"auto"`` picks one modality for all the images (the slices of a stack, the
        frames of one examination: ``decide_modality``), unless ``auto_per_image``.
        ``tiling`` as in :meth:`segment`: images it may tile go through ``segment`` one by one,
        the others are batched.
        """
        threshold = _check_threshold(threshold)
        mods = self._modality_list(modality, len(images))  # fail before any work
        if len(images) > 1 and not auto_per_image and not isinstance(modality, (list, tuple)) and mods[0] is None:
            shared = self.decide_modality(images, nan_policy=nan_policy)
            mods = [self.modalities.index(shared.modality)] * len(images)
        from .preprocess import infer_layout
        from .tiling import may_tile

        done: dict[int, SegmentationResult] = {}
        batched: list[int] = []
        for i, image in enumerate(images):
            try:
                size = infer_layout(getattr(image, "shape", None) or np.shape(image))[:2]
                name = None if mods[i] is None else self.modalities[mods[i]]  # type: ignore[index]
                if not may_tile(tiling, name, size, self.config.img_size):
                    batched.append(i)
                    continue
                done[i] = self.segment(
                    image, "auto" if mods[i] is None else mods[i], threshold, nan_policy=nan_policy,
                    tiling=tiling, tile_scale=tile_scale, tile_overlap=tile_overlap,
                )
            except ValueError as exc:  # say which image of the batch is unusable
                raise ValueError(f"image {i} of the batch ({len(images)} images): {exc}") from None
        step = max(1, int(batch_size))
        for start in range(0, len(batched), step):
            chunk = batched[start : start + step]
            prepared = []
            for i in chunk:
                try:
                    prepared.append(self.prepare(images[i], nan_policy=nan_policy))
                except ValueError as exc:  # say which image of the batch is unusable
                    raise ValueError(f"image {i} of the batch ({len(images)} images): {exc}") from None
            out = self.segment_prepared(prepared, [mods[i] for i in chunk], threshold, batch_size=step)
            done.update(zip(chunk, out, strict=True))
        results = [done[i] for i in range(len(images))]
        return results

    def segment(
        self,
        image: Any,
        modality: ModalitySpec | None = "auto",
        threshold: float = 0.5,
        *,
        nan_policy: NanPolicy = "raise",
        tiling: str = "auto",
        tile_scale: float | None = None,
        tile_overlap: int | None = None,
        tile_batch_size: int | None = None,
    ) -> SegmentationResult:
        """Segment one 2D image (see ``preprocess`` for accepted layouts and dtypes).

        ``modality``: "auto" (needs a trained modality head), a name such as "dermoscopy"
        (aliases: "x-ray", "cxr", "endoscopy", "us") or an index into ``config.modalities``.
        ``tiling``: "auto" (tiled where ``tiling.AUTO_TILING`` says so: large microscopy and
        fundus images), "on" (always tiled) or "off" (the whole image resized to the network's
        input); ``tile_scale`` (resize factor before tiling), ``tile_overlap`` (working pixels)
        and ``tile_batch_size`` (tiles per network call) default to the modality's policy. A
        tiled result has ``result.tiling`` (its layout) and ``timings["tiles"]``.
        """
        threshold = _check_threshold(threshold)
        self.resolve_modality(modality)  # refuse a bad modality before preprocessing
        if tiling == "off":
            prepared = self.prepare(image, nan_policy=nan_policy)
            return self.segment_prepared([prepared], modality, threshold)[0]
        steps = self.segment_steps(
            image, modality, threshold, nan_policy=nan_policy, tiling=tiling, tile_scale=tile_scale,
            tile_overlap=tile_overlap, tile_batch_size=tile_batch_size,
        )
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value

    def segment_steps(
        self,
        image: Any,
        modality: ModalitySpec | None = "auto",
        threshold: float = 0.5,
        *,
        nan_policy: NanPolicy = "raise",
        tiling: str = "auto",
        tile_scale: float | None = None,
        tile_overlap: int | None = None,
        tile_batch_size: int | None = None,
    ):
        """``segment`` as a generator: yields ``(tiles done, tiles)`` after each batch of tiles
        (nothing for a whole-image run) and returns the :class:`SegmentationResult`; closing it
        between tiles cancels the run (``tiling.iter_segment``)."""
        from .tiling import iter_segment

        return iter_segment(
            self, image, modality, threshold, tiling=tiling, tile_scale=tile_scale,
            tile_overlap=tile_overlap, batch_size=tile_batch_size, nan_policy=nan_policy,
        )


def load_model(
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = "auto",
    *,
    fast: bool = True,
    precision: str = "auto",
    compile: bool = False,
    channels_last: bool | None = None,
    config: ModelConfig | None = None,
    seed: int = 0,
) -> Segmenter:
    """A ready :class:`Segmenter`.

    ``checkpoint``: None = the bundled default model (``weights/``); ``"untrained"`` = the
    default architecture (or ``config``) with fresh weights from ``seed`` (tests and
    benchmarks; its modality head is untrained, so "auto" is refused); otherwise a
    ``.safetensors`` file written by ``save_checkpoint``. ``device``: "auto" (cuda -> mps ->
    cpu), "cpu", "cuda", "cuda:N", "mps". Raises ``CheckpointError`` (a ``ValueError``) for a
    missing or invalid checkpoint and ``ValueError`` for an unusable device.
    """
    from .atomic_files import sha256_file
    from .checkpoint import CheckpointError, bundled_checkpoint_path, load_checkpoint, read_checkpoint_info
    from .model import DeLightSAM
    from .model.fusion import fuse_conv_bn

    kwargs: dict[str, Any] = dict(
        fast=fast, precision=precision, compile=compile, channels_last=channels_last
    )
    dev = resolve_device(device)  # a bad device fails before any loading
    if isinstance(checkpoint, str) and checkpoint.strip().lower() == "untrained":
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
            torch.manual_seed(seed)
            model = DeLightSAM(config or ModelConfig())
        if fast:
            fuse_conv_bn(model.eval())
        meta = {MODALITY_HEAD_TRAINED_KEY: "false", "weights": "untrained"}
        return Segmenter(model, dev, metadata=meta, **kwargs)
    if config is not None:
        raise ValueError("config= is only used with checkpoint='untrained' (a checkpoint stores its own)")
    if checkpoint is None:
        path = bundled_checkpoint_path()
        if path is None:
            raise CheckpointError(
                "no bundled model is installed yet (weights/delightsam_default.safetensors); pass a "
                "checkpoint file, or checkpoint='untrained' for random weights (tests and benchmarks)"
            )
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {path} does not exist" if not path.exists() else f"{path} is not a file"
            )
    _, meta = read_checkpoint_info(path)
    model = load_checkpoint(path, map_location="cpu")
    if fast:
        fuse_conv_bn(model.eval())  # our own copy: nobody else holds it
    return Segmenter(
        model, dev, metadata=meta, checkpoint_path=path, checkpoint_sha256=sha256_file(path), **kwargs
    )
