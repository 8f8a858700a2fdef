"""Keep triton's LLVM out of a napari process that already runs Mesa's LLVM.

On Linux, napari's OpenGL canvas on a software or AMD Mesa driver (llvmpipe, radeonsi: VMs,
remote desktops, Xvfb, many laptops) loads ``libLLVM-*.so``. Importing the model then imports
``segment_anything`` -> torchvision -> ``torch._dynamo`` -> ``triton``, whose ``libtriton.so``
carries its own LLVM; loading it into a process that already holds Mesa's LLVM crashes the
whole napari window with a segmentation fault (reproduced under Xvfb with napari 0.9 and
torch 2.14). The widgets never use triton (no ``torch.compile`` in the GUI process; training
runs in a child process), so when LLVM is already mapped and triton is not yet imported, we
make ``import triton`` fail cleanly: torch then simply reports that triton is unavailable.
"""

from __future__ import annotations

import sys


def avoid_triton_llvm_clash() -> bool:
    """Block ``import triton`` in this process if Mesa's LLVM is loaded; True when blocked."""
    if not sys.platform.startswith("linux") or "triton" in sys.modules:
        return sys.modules.get("triton", False) is None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            loaded = any("libLLVM" in line for line in fh)
    except OSError:
        return False
    if loaded:
        sys.modules["triton"] = None  # type: ignore[assignment]  # `import triton` -> ImportError
    return loaded
