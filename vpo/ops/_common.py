"""Pieces shared by the LM-head ops (``linear_logprobs``, ``token_kl``): the chunked torch paths' tile helpers and the
``impl=`` resolution. The argument checks of a linear head ``(hidden [..., D], weight [V, D], bias [V] | None)`` are in
:mod:`vpo._heads`, shared with the oracle and the fused losses.

The torch paths' chunk policy (``chunk_size``, ``TILE_BUDGET``, ``VPO_TORCH_CHUNK``) stays in
:mod:`vpo.ops.linear_logprobs`, where it is documented; ``token_kl`` imports it from there, so one knob sets both.
"""
from __future__ import annotations

import os
from typing import Dict, Sequence, Tuple

import torch


# ----------------------------------------------------------------------------------------------------------------------
# Chunked torch paths
# ----------------------------------------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/output dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def select_valid(labels: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[M]`` of the non-ignored rows and their labels ``[M]`` (int64). One host sync (``nonzero``)."""
    idx = (labels != ignore_index).nonzero().squeeze(1)
    return idx, labels[idx].long()


def chunk_logits(hv, W, b, v0, v1):
    """One logits tile ``z_c = h @ W[v0:v1].T + b[v0:v1]``: ``[M, D] @ [D, C] -> [M, C]`` in ``hv.dtype``.

    Returns ``(z_c, W_c)`` with ``W_c = W[v0:v1]`` in ``hv.dtype`` (the backward reuses it for ``dz_c @ W_c``).
    """
    Wc = W[v0:v1].to(hv.dtype)  # [C, D]
    if b is None:
        return hv @ Wc.T, Wc
    return torch.addmm(b[v0:v1].to(hv.dtype), hv, Wc.T), Wc


def scatter_back(full_shape, idx, values, dtype):
    """Zeros of ``full_shape`` with ``values`` written at rows ``idx`` (ignored rows stay 0)."""
    out = torch.zeros(full_shape, dtype=dtype, device=values.device)
    out[idx] = values.to(dtype)
    return out


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
    """``impl`` checked against ``["auto", *registry]``; ``"auto"`` is ``"triton"`` for CUDA tensors when the op's
    ``triton_modules`` import, else ``"torch"``. ``"triton"`` on CPU needs ``TRITON_INTERPRET=1``."""
    names = ["auto", *registry]
    if not isinstance(impl, str) or impl not in names:
        raise ValueError(f"impl must be one of {names}, got {impl!r}")
    if impl == "auto":
        return "triton" if hidden.is_cuda and "triton" in registry and triton_imports(triton_modules) else "torch"
    if impl == "triton" and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter), got hidden on "
            f"{hidden.device}: use impl='torch' or impl='auto'"
        )
    return impl
