"""Loads the optional compiled extension ``vpo._C`` and says what is available.

``import vpo`` never requires the extension: every op has a PyTorch path. ``vpo.AVAILABLE`` is the one flag to read:

    >>> import vpo
    >>> sorted(vpo.AVAILABLE)
    ['cpp', 'cuda_ext', 'cuda_device', 'triton']
"""
from __future__ import annotations

import importlib
import importlib.util
from types import MappingProxyType
from typing import Optional

import torch

_C = None
EXT_IMPORT_ERROR: Optional[str] = None
try:
    _C = importlib.import_module("vpo._C")
except ImportError as err:  # not built (no compiler), removed, or built for another Python
    EXT_IMPORT_ERROR = str(err)


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


AVAILABLE = MappingProxyType(
    {
        "cpp": _C is not None,  # C++ CPU kernels in vpo._C
        "cuda_ext": bool(_C is not None and getattr(_C, "with_cuda", False)),  # CUDA kernels compiled into vpo._C
        "cuda_device": torch.cuda.is_available(),
        "triton": _triton_importable(),
    }
)


def require_ext(what: str):
    """Return the extension module or raise a RuntimeError saying how to get it."""
    if _C is None:
        raise RuntimeError(
            f"{what} needs the compiled extension vpo._C, which is not available ({EXT_IMPORT_ERROR}). "
            "Reinstall with `pip install -e .` on a machine with a C++ compiler and CMake, or use impl='torch'."
        )
    return _C
