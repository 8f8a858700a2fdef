"""napari-independent logic of the segment and fine-tune widgets (no Qt, no viewer).

Everything a widget decides without drawing lives here so it can be unit-tested: which layer
data can be segmented and how (single plane or stack), the mask derived from a cached
probability map, output layer names, the fingerprint used to notice user edits, device-error
recognition, and where fine-tuning runs may write.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Suffixes of the layers the segment widget writes (``<input>_delightsam_<kind>``).
MASK_SUFFIX = "_delightsam_mask"
HEATMAP_SUFFIX = "_delightsam_heatmap"
PROBABILITY_SUFFIX = "_delightsam_probability"
#: Key of our entry in ``layer.metadata`` (provenance + edit fingerprint).
METADATA_KEY = "delightsam"

_ACCEPTED_KINDS = {"b": "bool", "u": "unsigned integer", "i": "integer", "f": "float"}


class InputError(ValueError):
    """Layer data the segment widget cannot use; the message names the problem and the fix."""


@dataclass(frozen=True)
class PreparedInput:
    """An image layer's data viewed as ``n_slices`` 2D planes (grey ``(H,W)`` or ``(H,W,C)``).

    ``data`` stays the layer's own (possibly lazy) array; ``plane(i)`` materialises one plane.
    """

    data: Any
    name: str
    rgb: bool
    stack: bool
    n_slices: int
    plane_shape: tuple[int, int]

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of the mask/heatmap/probability layers: the layer's spatial shape."""
        return (self.n_slices, *self.plane_shape) if self.stack else self.plane_shape

    def plane(self, index: int) -> np.ndarray:
        arr = self.data[index] if self.stack else self.data
        out = np.asarray(arr)
        if out.dtype == bool:
            out = out.astype(np.uint8) * 255
        return out


def prepare_layer(layer: Any, level: int = 0) -> PreparedInput:
    """``prepare_input`` of a napari Image layer (its data, rgb flag, name and multiscale flag);
    ``level`` picks a multiscale layer's pyramid level (0 = full resolution)."""
    return prepare_input(
        layer.data, bool(getattr(layer, "rgb", False)), layer.name, bool(getattr(layer, "multiscale", False)),
        level=level,
    )


def pyramid_levels(layer: Any) -> int:
    """Number of pyramid levels of an Image layer (1 when it is not multiscale)."""
    return len(layer.data) if getattr(layer, "multiscale", False) else 1


def level_scale(layer: Any, level: int) -> tuple[float, ...]:
    """The layer's ``scale`` for outputs computed at pyramid ``level``: each axis multiplied by
    how much smaller that level is than level 0 (level 0: the layer's own scale)."""
    scale = tuple(float(s) for s in layer.scale)
    if level == 0 or not getattr(layer, "multiscale", False):
        return scale
    full, low = layer.data[0].shape, layer.data[level].shape
    return tuple(s * full[i] / low[i] for i, s in enumerate(scale))


def prepare_input(
    data: Any, rgb: bool, name: str = "image", multiscale: bool = False, level: int = 0
) -> PreparedInput:
    """Check an Image layer's data and describe how to segment it; ``InputError`` otherwise.

    Accepted (napari's own reading of the axes): 2D grey ``(H,W)``, RGB/RGBA ``(H,W,3|4)``
    (``rgb=True``), and a stack of either along the first axis -> segmented slice by slice.
    Refused with a message: empty layers, complex/object/string dtypes, more than one
    non-displayed axis (e.g. time + z, or z + channels not marked RGB).
    """
    if multiscale:
        # level 0 is the full-resolution image; a coarser level when the user picks one
        if not 0 <= int(level) < len(data):
            raise InputError(f"layer '{name}' has {len(data)} pyramid levels (0-{len(data) - 1}); level {level} does not exist")
        data = data[int(level)]
    elif level:
        raise InputError(f"layer '{name}' is not multiscale: only level 0 exists")
    shape = tuple(int(s) for s in getattr(data, "shape", ()))
    try:
        dtype = np.dtype(getattr(data, "dtype", None))
    except TypeError:
        raise InputError(f"layer '{name}' has no numeric pixel data (type {type(data).__name__})") from None
    if dtype.kind not in _ACCEPTED_KINDS:
        raise InputError(
            f"layer '{name}' has dtype {dtype}, which is not an image intensity type; "
            "convert it to an unsigned integer or float image first (e.g. np.abs for complex data)"
        )
    if not shape or int(np.prod(shape)) == 0:
        raise InputError(f"layer '{name}' is empty (shape {shape}); nothing to segment")
    spatial_ndim = len(shape) - (1 if rgb else 0)
    if rgb and shape[-1] not in (3, 4):
        raise InputError(f"layer '{name}' is marked RGB but its last axis has {shape[-1]} channels (expected 3 or 4)")
    if spatial_ndim < 2:
        raise InputError(f"layer '{name}' has shape {shape}: a 2D image is needed")
    if spatial_ndim > 3:
        kind = "RGB " if rgb else ""
        raise InputError(
            f"layer '{name}' has shape {shape}: {spatial_ndim} {kind}image dimensions. De-LightSAM segments "
            "2D images (grey or RGB) or one stack of them slice by slice; "
            "split the extra axes first (Layers → right-click → Split Stack, or select a channel)"
        )
    stack = spatial_ndim == 3
    plane_axes = shape[1:3] if stack else shape[0:2]
    plane_shape = (int(plane_axes[0]), int(plane_axes[1]))
    return PreparedInput(
        data=data,
        name=name,
        rgb=bool(rgb),
        stack=stack,
        n_slices=int(shape[0]) if stack else 1,
        plane_shape=plane_shape,
    )


# -- masks from probabilities -------------------------------------------------------------------


def threshold_mask(probability: np.ndarray, threshold: float, instances: bool = False) -> np.ndarray:
    """Mask from a probability map (``(H,W)`` or a stack ``(N,H,W)``) -- no model call.

    Foreground is ``probability > threshold`` (the Segmenter's rule). Binary masks are uint8
    {0, 1}; ``instances=True`` labels 8-connected components per plane, with ids unique across
    the stack (int32).
    """
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    prob = np.asarray(probability)
    fg = prob > float(threshold)
    if not instances:
        return fg.astype(np.uint8)
    from skimage.measure import label

    if fg.ndim == 2:
        return label(fg, connectivity=2).astype(np.int32)
    out = np.zeros(fg.shape, dtype=np.int32)
    offset = 0
    for i in range(fg.shape[0]):
        plane = label(fg[i], connectivity=2).astype(np.int32)
        n = int(plane.max())
        out[i] = np.where(plane > 0, plane + offset, 0)
        offset += n
    return out


# -- layer naming and edit detection --------------------------------------------------------------


def output_names(input_name: str) -> dict[str, str]:
    return {
        "mask": f"{input_name}{MASK_SUFFIX}",
        "heatmap": f"{input_name}{HEATMAP_SUFFIX}",
        "probability": f"{input_name}{PROBABILITY_SUFFIX}",
    }


def unique_name(base: str, existing: set[str] | list[str]) -> str:
    """``base``, or ``base [2]``, ``base [3]``... -- the first one not in ``existing``."""
    taken = set(existing)
    if base not in taken:
        return base
    k = 2
    while f"{base} [{k}]" in taken:
        k += 1
    return f"{base} [{k}]"


def fingerprint(data: Any) -> str:
    """Content hash of an array (shape + dtype + bytes); changes when a user paints."""
    arr = np.ascontiguousarray(np.asarray(data))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((arr.shape, arr.dtype.str)).encode())
    digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


def was_edited(data: Any, metadata: dict[str, Any] | None) -> bool:
    """True when a Labels layer's data no longer matches what the widget last wrote.

    A layer without our fingerprint (made by the user, or by another tool) counts as edited:
    it is never overwritten.
    """
    written = (metadata or {}).get(METADATA_KEY, {}).get("fingerprint")
    if not written:
        return True
    return fingerprint(data) != written


# -- running the Segmenter (called inside a worker thread) ---------------------------------------


@dataclass
class SegmentationRun:
    """All outputs of one widget run, stacked like the input (``(H,W)`` or ``(N,H,W)``)."""

    probability: np.ndarray
    heatmap: np.ndarray
    modalities: list[str]
    modality_probabilities: list[dict[str, float] | None]
    timings: list[dict[str, float]]
    seconds: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)
    #: per plane: the tile layout of a tiled run (``SegmentationResult.tiling``), None when whole
    tilings: list[dict[str, Any] | None] = field(default_factory=list)
    #: with modality "auto": the one decision for the image or stack (``inference.AutoDecision``)
    auto_decision: Any = None
    #: per plane: what the appearance head changed before segmenting (None: nothing)
    colour_corrections: list[str | None] = field(default_factory=list)
    #: per plane: the refiner that corrected the mask (``SegmentationResult.refiner``)
    refiners: list[str | None] = field(default_factory=list)

    @property
    def modality_summary(self) -> str:
        names = sorted(set(self.modalities))
        return names[0] if len(names) == 1 else ", ".join(names)


def iterate_segmentation(
    segmenter: Any, prepared: PreparedInput, modality: str, threshold: float, tiling: str = "auto"
) -> Generator[tuple[int, ...], None, SegmentationRun]:
    """Segment every plane; yields ``(done, total)`` after each so a worker can report and stop,
    and ``(plane, planes, tiles done, tiles)`` after each batch of tiles of a tiled plane
    (``Segmenter.segment_steps``; ``tiling`` is "auto", "on" or "off"), so a large image can be
    cancelled between tiles.

    The generator's return value (``StopIteration.value``) is the :class:`SegmentationRun`.
    """
    import time

    start = time.perf_counter()
    n = prepared.n_slices
    prob = np.zeros((n, *prepared.plane_shape), dtype=np.float32)
    heat = np.zeros((n, *prepared.plane_shape), dtype=np.float32)
    modalities: list[str] = []
    mod_probs: list[dict[str, float] | None] = []
    timings: list[dict[str, float]] = []
    tilings: list[dict[str, Any] | None] = []
    corrections: list[str | None] = []
    refiners: list[str | None] = []
    steps = getattr(segmenter, "segment_steps", None)
    decision = None
    if modality == "auto" and n > 1 and getattr(segmenter, "auto_available", False):
        # one modality for the whole stack, from up to 16 evenly spread slices
        picks = sorted({int(round(k)) for k in np.linspace(0, n - 1, min(n, 16))})
        decision = segmenter.decide_modality([prepared.plane(k) for k in picks])
        modality = decision.modality
    for i in range(n):
        if steps is None:
            result = segmenter.segment(prepared.plane(i), modality=modality, threshold=threshold)
        else:
            gen = steps(prepared.plane(i), modality, threshold, tiling=tiling)
            while True:
                try:
                    done, total = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                yield i, n, done, total
        prob[i] = result.probability
        heat[i] = result.patch_heatmap
        modalities.append(str(result.modality))
        mod_probs.append(result.modality_probabilities)
        timings.append(dict(result.timings))
        tilings.append(getattr(result, "tiling", None))
        corrections.append(getattr(result, "colour_correction", None))
        refiners.append(getattr(result, "refiner", None))
        if modality == "auto" and n == 1 and result.modality_probabilities:
            decision = segmenter.auto_decision(result)
        yield i + 1, n
    if not prepared.stack:
        prob, heat = prob[0], heat[0]
    return SegmentationRun(prob, heat, modalities, mod_probs, timings, time.perf_counter() - start, tilings=tilings,
                           auto_decision=decision, colour_corrections=corrections, refiners=refiners)


# -- errors from workers and devices --------------------------------------------------------------


class WorkerError(Exception):
    """A RuntimeError raised inside a worker, re-raised under another type.

    superqt's worker treats a ``RuntimeError`` as "the worker object was deleted" and ends
    silently, without ``errored`` or ``finished``; torch reports most failures (CUDA out of
    memory included) as RuntimeError, so worker bodies re-raise them as this.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def guard_worker(gen: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
    """Run a worker generator, turning RuntimeError into :class:`WorkerError`."""
    try:
        return (yield from gen)
    except RuntimeError as exc:
        raise WorkerError(exc) from exc


def device_error_kind(exc: BaseException) -> str | None:
    """"out of memory" / "device unavailable" for errors worth a retry on CPU, else None."""
    exc = getattr(exc, "original", exc)
    text = f"{type(exc).__name__}: {exc}".lower()
    if "out of memory" in text or "outofmemory" in text:
        return "out of memory"
    markers = ("cuda", "mps", "no kernel image", "device-side", "cudnn", "nccl", "hip error")
    if any(m in text for m in markers):
        return "device unavailable"
    return None


# -- provenance and output folders ----------------------------------------------------------------


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


def protected_dirs() -> list[Path]:
    """Folders a fine-tune run must never write into: the installed package and bundled weights."""
    dirs = [package_dir()]
    repo_weights = package_dir().parents[1] / "weights"
    if repo_weights.is_dir():
        dirs.append(repo_weights.resolve())
    try:
        from ..checkpoint import bundled_checkpoint_path

        bundled = bundled_checkpoint_path()
        if bundled is not None:
            dirs.append(Path(bundled).resolve().parent)
    except Exception:  # noqa: BLE001 -- a broken checkpoint module must not break the GUI
        pass
    return dirs


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def default_run_dir(source_path: str | os.PathLike[str] | None, home: Path | None = None) -> Path:
    """Where a fine-tune run writes by default.

    Next to the image's source file (``<its folder>/delightsam-runs/<timestamp>``) when the
    layer came from a file in a writable folder outside the package, else
    ``~/delightsam-runs/<timestamp>``.
    """
    stamp = timestamp()
    if source_path:
        src = Path(source_path).expanduser()
        folder = src if src.is_dir() else src.parent
        if folder.is_dir() and os.access(folder, os.W_OK):
            candidate = folder / "delightsam-runs" / stamp
            try:
                return check_output_dir(candidate)
            except ValueError:
                pass
    base = home if home is not None else Path.home()
    return base / "delightsam-runs" / stamp


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """The folder resolved, or ``ValueError`` when it is inside the package/bundled weights or a file."""
    out = Path(path).expanduser().resolve()
    for protected in protected_dirs():
        if out == protected or protected in out.parents:
            raise ValueError(
                f"output folder {out} is inside {protected} (the installed package or its bundled "
                "weights); choose a folder of your own"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} exists and is a file")
    return out
