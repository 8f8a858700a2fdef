"""De-LightSAM checkpoints: safetensors files that describe their own architecture.

File layout: a plain safetensors file (``safetensors.torch.save_file``) whose string metadata
holds

* ``format`` = ``"napari-delightsam"`` and ``format_version`` (``CHECKPOINT_FORMAT_VERSION``),
* ``config``: ``ModelConfig.to_json()`` — the exact architecture to rebuild,
* ``dtype``: the storage dtype of the floating-point tensors (float32 unless asked otherwise),
* any user metadata (``str -> str``: training recipe, data, metrics...).

Loading never unpickles anything: the bytes are checked to be a safetensors file before
``safe_open`` reads them, and PyTorch ``.pt``/``.pth`` files (zip or legacy pickle) are refused
with a message saying so. The state dict must match the architecture of the stored config
exactly; a mismatch lists the missing and unexpected keys and the shape differences.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic_files import atomic_write
from .config import CHECKPOINT_FORMAT_VERSION, ModelConfig

__all__ = [
    "BUNDLED_CHECKPOINT_NAME",
    "FORMAT_NAME",
    "CheckpointError",
    "bundled_checkpoint_path",
    "load_checkpoint",
    "read_checkpoint_info",
    "save_checkpoint",
]

FORMAT_NAME = "napari-delightsam"
BUNDLED_CHECKPOINT_NAME = "delightsam_default.safetensors"
#: metadata keys written by ``save_checkpoint`` itself; user metadata may not use them
RESERVED_METADATA_KEYS = frozenset({"format", "format_version", "config", "dtype"})
_STORAGE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_LIST_LIMIT = 5


class CheckpointError(ValueError):
    """A checkpoint file is missing, not a De-LightSAM safetensors file, or does not match."""


# -- locating the bundled model ---------------------------------------------------------------


def bundled_weights_file(name: str) -> Path | None:
    """A file shipped in ``weights/``, or None: looked up in the installed package
    (``napari_delightsam/weights/``) first, then in the source checkout's top-level ``weights/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "weights" / name, here.parents[1] / "weights" / name):
        if candidate.is_file():
            return candidate
    return None


def bundled_checkpoint_path() -> Path | None:
    """The default model shipped with the package, or None while none is bundled
    (:func:`bundled_weights_file`)."""
    return bundled_weights_file(BUNDLED_CHECKPOINT_NAME)


# -- saving -------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare network behind DDP / DataParallel / torch.compile wrappers."""
    for _ in range(4):
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            break
    return model


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    metadata: dict[str, str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` (a ``DeLightSAM``) to ``path`` as safetensors, atomically.

    ``dtype`` is the storage type of floating-point tensors (float32, float16 or bfloat16);
    loading casts them back to float32. ``overwrite=False`` refuses an existing file. The
    bundled default model is never overwritten.
    """
    model = _unwrap(model)
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(
            f"save_checkpoint expects a DeLightSAM model with a ModelConfig, got {type(model).__name__}"
        )
    from .model.fusion import is_fused

    if is_fused(model):
        raise ValueError(
            "this model had its BatchNorm folded into its convolutions for inference (load_model's fast "
            "path) and no longer has the checkpoint's layout; save the model it was loaded from, or load "
            "with load_model(..., fast=False)"
        )
    if dtype not in _STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of float32, float16, bfloat16, got {dtype}")
    user_meta = dict(metadata or {})
    for key, value in user_meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"checkpoint metadata must map str to str; got {key!r}: {type(value).__name__}")
        if key in RESERVED_METADATA_KEYS:
            raise ValueError(f"metadata key {key!r} is reserved for the checkpoint format")
    target = Path(path)
    bundled = bundled_checkpoint_path()
    if bundled is not None and target.exists() and target.resolve() == bundled.resolve():
        raise CheckpointError(
            f"refusing to overwrite the bundled default model {bundled}; choose another path"
        )
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")

    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous().clone()  # no shared storage: safetensors refuses aliasing
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(CHECKPOINT_FORMAT_VERSION),
        "config": cfg.to_json(),
        "dtype": _STORAGE_DTYPES[dtype],
        **user_meta,
    }

    from safetensors.torch import save_file

    def _write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=meta)

    return atomic_write(target, _write)


# -- validating and loading ----------------------------------------------------------------------


def _short_list(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return f"{shown}, ... (+{more} more)" if more > 0 else shown


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (not a bool, float or string)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_file(path: Path) -> dict[str, Any]:
    """Check that ``path`` is a complete safetensors file; return its parsed header.

    Never unpickles: PyTorch zip archives and raw pickles are recognised by their first bytes
    and refused.
    """
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(9)
            # a safetensors file starts with its header length (8 bytes, little-endian) and then
            # "{"; the length's first byte is 0x80 for 1 in 32 valid headers, so the pickle magic
            # byte alone would refuse good checkpoints: a JSON start at byte 8 decides first
            magic = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"
            if magic and head[8:9] != b"{":
                kind = (
                    "a PyTorch zip archive (.pt/.pth)" if head[:2] == b"PK" else "a Python pickle (.pth/.pkl)"
                )
                raise CheckpointError(
                    f"{path.name} is {kind}, not a safetensors checkpoint; refusing to unpickle it "
                    "(pickles can run arbitrary code). Use a .safetensors file saved by napari-delightsam"
                )
            if len(head) < 8:
                raise CheckpointError(f"{path.name} is not a safetensors checkpoint (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head[:8])
            if header_len < 2 or header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path.name} is not a safetensors checkpoint (no valid header: wrong file type or truncated)"
                )
            fh.seek(8)
            raw = fh.read(header_len)
    except PermissionError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    if raw[:1] != b"{":
        raise CheckpointError(f"{path.name} is not a safetensors checkpoint (no JSON header)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path.name} is not a safetensors checkpoint (unreadable header: {exc})"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is not a safetensors checkpoint (header is not a JSON object)")
    data_len = size - 8 - header_len
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]
            and isinstance(shape, list)
            and all(_is_count(n) for n in shape)
            and isinstance(dtype, str)
        ):
            raise CheckpointError(
                f"{path.name}: malformed safetensors header entry {name!r} (needs dtype, shape and data_offsets)"
            )
        end = max(end, offsets[1])
    if end > data_len:
        raise CheckpointError(
            f"{path.name} is truncated: the header describes {end} bytes of tensor data but the file holds {data_len}"
        )
    return header


def _parse_metadata(path: Path, header: dict[str, Any]) -> tuple[ModelConfig, dict[str, str]]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else None
        what = f"its format is {found!r}" if found else "it has no napari-delightsam metadata"
        raise CheckpointError(
            f"{path.name} is a safetensors file but not a napari-delightsam checkpoint ({what}); "
            "foreign weights need a converter (e.g. napari_delightsam.litemedsam for LiteMedSAM)"
        )
    try:
        version = int(meta.get("format_version", ""))
    except ValueError as exc:
        raise CheckpointError(f"{path.name}: invalid format_version {meta.get('format_version')!r}") from exc
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path.name} uses checkpoint format {version}, newer than this napari-delightsam supports "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade napari-delightsam"
        )
    if version < 1:
        raise CheckpointError(f"{path.name}: unsupported checkpoint format version {version}")
    try:
        cfg = ModelConfig.from_dict(json.loads(meta["config"]))
    except KeyError as exc:
        raise CheckpointError(f"{path.name} has no model config in its metadata") from exc
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path.name}: the stored model config is invalid: {exc}") from exc
    info = {k: str(v) for k, v in meta.items() if k != "config"}
    return cfg, info


def read_checkpoint_info(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, str]]:
    """The model config and metadata (format, version, dtype and user keys; no tensors read)."""
    p = Path(path)
    header = _check_file(p)
    return _parse_metadata(p, header)


def _match_report(
    path: Path, expected: dict[str, torch.Tensor], found: dict[str, tuple[int, ...]]
) -> str | None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: file {tuple(found[k])} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_short_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_short_list(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {_short_list(mismatched)}")
    return f"{path.name} does not match the architecture in its config: " + "; ".join(parts)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the ``DeLightSAM`` stored in ``path`` (eval mode, float32, on ``map_location``).

    Raises ``CheckpointError`` with a precise message for a missing/unreadable file, a file that
    is not safetensors (pickles are refused, never loaded), a truncated file, an unsupported
    format version, an invalid config, or tensors that do not match the architecture.
    """
    from safetensors import SafetensorError, safe_open

    from .model import DeLightSAM

    p = Path(path)
    header = _check_file(p)
    cfg, _ = _parse_metadata(p, header)
    found_shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    # compare shapes on a weightless ("meta") model first: a config that does not match the
    # tensors (e.g. a corrupt or hostile one asking for billions of parameters) is refused
    # before any memory is allocated for it
    try:
        with torch.device("meta"):
            skeleton = DeLightSAM(cfg)
    except Exception:  # fall back to the real build below, which reports the problem
        skeleton = None
    if skeleton is not None:
        problem = _match_report(p, skeleton.state_dict(), found_shapes)
        if problem:
            raise CheckpointError(problem)
    try:
        model = DeLightSAM(cfg)
    except Exception as exc:  # a config that parses but cannot be built
        raise CheckpointError(f"{p.name}: cannot build the model from its config: {exc}") from exc
    expected = model.state_dict()
    problem = _match_report(p, expected, found_shapes)
    if problem:
        raise CheckpointError(problem)

    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                tensor = fh.get_tensor(key)
                want = expected[key]
                if want.is_floating_point():
                    if not tensor.is_floating_point():
                        raise CheckpointError(
                            f"{p.name}: tensor {key} has dtype {tensor.dtype}, expected floating point"
                        )
                    tensor = tensor.to(want.dtype)
                    if not bool(torch.isfinite(tensor).all()):
                        raise CheckpointError(f"{p.name}: tensor {key} contains NaN or infinite values")
                elif tensor.dtype != want.dtype:
                    raise CheckpointError(
                        f"{p.name}: tensor {key} has dtype {tensor.dtype}, expected {want.dtype}"
                    )
                state[key] = tensor
    except SafetensorError as exc:
        raise CheckpointError(f"{p.name}: corrupt safetensors file ({exc})") from exc
    model.load_state_dict(state, strict=True)
    model.eval()
    return model.to(map_location)
