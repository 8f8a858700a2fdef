"""Device selection for inference and training: ``auto`` = cuda -> mps -> cpu.

Also answers the questions the fast paths need: which devices exist (for the GUI's device
menu), whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX) rather than
emulating it, and when training autocasts (``autocast_dtype`` / ``autocast_context``: the one
place that decides and applies mixed precision for training, distillation and inference).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import torch

#: What a user may type: "auto", "cpu", "cuda", "cuda:N", "mps".
DEVICE_HELP = "auto (cuda -> mps -> cpu), cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Concrete devices usable here, best first, e.g. ``["cuda:0", "cuda:1", "cpu"]``."""
    devices: list[str] = []
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def device_choices() -> list[str]:
    """Entries for a device menu: ``"auto"`` followed by :func:`available_devices`."""
    return ["auto", *available_devices()]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``/``None``/a name into a usable ``torch.device``.

    Raises ``ValueError`` naming the available devices when the requested one is not usable.
    """
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = "auto" if device is None else str(device).strip().lower()
    if name in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; use {DEVICE_HELP}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} requested but CUDA is not available here; "
                f"available: {', '.join(available_devices())}"
            )
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist; "
                f"available: {', '.join(available_devices())}"
            )
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not _mps_available():
            raise ValueError(
                f"device 'mps' requested but Apple MPS is not available here; "
                f"available: {', '.join(available_devices())}"
            )
        return torch.device("mps")
    raise ValueError(f"unsupported device {name!r}; use {DEVICE_HELP}")


def describe_device(device: torch.device) -> str:
    """A human-readable name, e.g. ``"cuda:0 (NVIDIA H100 80GB HBM3)"`` or ``"cpu (AVX512)"``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    return str(device)


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_amx() -> bool:
    """True when the CPU has AMX tiles for bf16 (Intel Sapphire Rapids and later)."""
    return "amx_bf16" in _cpu_flags()


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when this CPU executes bfloat16 math natively (AVX512-BF16 or AMX).

    Without it, bf16 on CPU is emulated and slower than fp32. oneDNN's own check is used
    when torch exposes it; /proc/cpuinfo flags otherwise (Linux).
    """
    flags = _cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    try:  # non-Linux: ask oneDNN (true also for emulation-free paths it knows)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_supports_bf16(device: torch.device) -> bool:
    """True for CUDA devices with native bf16 (compute capability >= 8.0)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def choose_precision(device: torch.device, precision: str, fast: bool, *, honour_bf16: bool = False) -> str:
    """The inference precision, "fp32" or "bf16", for ``precision`` ("auto" | "fp32" | "bf16").

    "auto" is bf16 exactly where ``device`` computes it natively (and ``fast``), fp32 elsewhere.
    An explicit "bf16" where it is not native warns and falls back to fp32, or, with
    ``honour_bf16``, is kept (emulated: slower, but what an agreement check asks for).
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "fp32" or (precision == "auto" and not fast):
        return "fp32"
    if device.type == "cuda":
        native = cuda_supports_bf16(device)
    elif device.type == "cpu":
        native = cpu_supports_bf16()
    else:  # mps: bf16 autocast coverage is partial
        native = False
    if precision == "bf16" and not native:
        if honour_bf16:
            warnings.warn(f"bf16 is not native on {device}: emulated, slower than fp32", stacklevel=3)
            return "bf16"
        warnings.warn(f"bf16 is not supported natively on {device}; using fp32", stacklevel=3)
    return "bf16" if native else "fp32"


def autocast_dtype(device: torch.device, enabled: bool = True, *, cpu: bool = False) -> torch.dtype | None:
    """The autocast dtype training uses on ``device``: bf16 or None (fp32).

    ``enabled`` (``amp``) turns bf16 on for CUDA; on the CPU it also needs ``cpu`` (``amp_cpu``:
    only CPUs with native bf16 gain from it); MPS always computes in fp32 (partial bf16 coverage).
    """
    if not enabled:
        return None
    if device.type == "cuda" or (device.type == "cpu" and cpu):
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` with ``dtype``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
