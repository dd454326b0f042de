"""Pieces shared by the LM-head ops (``linear_logprobs``, ``token_kl``): sync-free row masks and label checks, the
``impl=`` resolution and the epilogue (elementwise steps) of each impl. The vocabulary sweep and its chunk policy are
in :mod:`vpo.ops._sweep`. The argument checks of a linear head ``(hidden [..., D], weight [V, D], bias [V] | None)``
are in :mod:`vpo._heads`, shared with the oracle and the fused losses.

Nothing here reads a device value back to the host: no ``.item()``, ``.tolist()``, ``nonzero()`` or ``bool(tensor)``.
The label-range check is :func:`vpo._validate.assert_labels_in_range` (one check for the ops and the fused losses):
a device-side assert on CUDA, a ``ValueError`` naming the value on CPU or with ``VPO_DEBUG_CHECKS=1``.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import torch

from vpo.ops._sweep import acc_dtype  # noqa: F401  (acc_dtype: re-exported for the ops)



# ----------------------------------------------------------------------------------------------------------------------
# Rows and labels, without host syncs
# ----------------------------------------------------------------------------------------------------------------------


def row_targets(labels: Optional[torch.Tensor], ignore_index: int, N: int, device
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(valid [N] bool, y [N] int64)``: which rows count, and their targets with ignored rows set to 0 (a valid id, so
    gathers stay in range; their results are masked). ``labels=None``: every row counts (y = 0)."""
    if labels is None:
        return torch.ones(N, dtype=torch.bool, device=device), torch.zeros(N, dtype=torch.long, device=device)
    valid = labels != ignore_index
    return valid, torch.where(valid, labels, 0).long()


# ----------------------------------------------------------------------------------------------------------------------
# impl= dispatch
# ----------------------------------------------------------------------------------------------------------------------

_TRITON_IMPORTS: Dict[Tuple[str, ...], bool] = {}


def triton_imports(modules: Sequence[str]) -> bool:
    """Whether triton and every ``vpo_kernels`` module in ``modules`` import (cached per module list)."""
    key = tuple(modules)
    if key not in _TRITON_IMPORTS:
        try:
            import importlib

            import triton  # noqa: F401

            for m in key:
                importlib.import_module(m)
            _TRITON_IMPORTS[key] = True
        except Exception:  # ImportError, or a broken install raising something else
            _TRITON_IMPORTS[key] = False
    return _TRITON_IMPORTS[key]


def resolve_impl(impl, registry, hidden: torch.Tensor, triton_modules: Sequence[str]) -> str:
    """``impl`` checked against ``["auto", *registry]``. ``"auto"`` is ``"gemm"`` for CUDA tensors when the registry
    has it and ``vpo_kernels.epilogue`` imports, else ``"triton"`` for CUDA tensors when the op's ``triton_modules``
    import, else ``"torch"``. ``"triton"`` and ``"gemm"`` on CPU need ``TRITON_INTERPRET=1``."""
    names = ["auto", *registry]
    if not isinstance(impl, str) or impl not in names:
        raise ValueError(f"impl must be one of {names}, got {impl!r}")
    if impl == "auto":
        if hidden.is_cuda and "gemm" in registry and triton_imports(GEMM_MODULES):
            return "gemm"
        return "triton" if hidden.is_cuda and "triton" in registry and triton_imports(triton_modules) else "torch"
    if impl in ("triton", "gemm") and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl={impl!r} needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter), got hidden on "
            f"{hidden.device}: use impl='torch' or impl='auto'"
        )
    return impl


GEMM_MODULES = ("vpo_kernels.epilogue",)


def epilogue(name: str) -> str:
    """The :mod:`vpo.ops.epilogue` implementation for ``impl=name``: ``"triton"`` (its Triton kernels) for
    ``"gemm"``, ``"torch"`` otherwise."""
    return "triton" if name == "gemm" else "torch"
