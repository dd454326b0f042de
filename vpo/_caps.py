"""What this process can do, decided once and explicitly from the device, the dtype and the installed torch — never by
catching an error from the real call (an out-of-memory error must reach the caller, not switch paths).

``assume_cuda()`` makes the meta device count as CUDA, so a trace on ``device="meta"`` takes the CUDA branches: the
benchmarks' performance model (``python -m benchmarks.model``) and ``tests/test_counted_traffic.py`` count FLOPs,
bytes and kernel launches of the real CUDA code path at real shapes without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch

_ASSUME_CUDA = [False]


@contextlib.contextmanager
def assume_cuda(on: bool = True):
    """Within the block, meta tensors are treated as CUDA tensors by :func:`is_cuda` (tracing only)."""
    old = _ASSUME_CUDA[0]
    _ASSUME_CUDA[0] = on
    try:
        yield
    finally:
        _ASSUME_CUDA[0] = old


def is_cuda(t: torch.Tensor) -> bool:
    """``t`` is on CUDA, or on meta inside :func:`assume_cuda`."""
    return t.is_cuda or (_ASSUME_CUDA[0] and t.is_meta)


@functools.lru_cache(maxsize=None)
def _has_kernel(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, key))
    except RuntimeError:  # the operator itself does not exist in this torch
        return False


def gemm_fp32_out(t: torch.Tensor) -> bool:
    """Whether a GEMM on 16-bit ``t`` can write fp32 directly (``torch.mm(..., out_dtype=torch.float32)``: cuBLAS with
    fp32 output, accumulation in fp32 inside the GEMM): CUDA (or traced as CUDA on meta), bf16/fp16, and a torch whose
    dispatcher has a CUDA kernel for ``aten::mm.dtype`` (checked once, by name, from the registry)."""
    if t.dtype not in (torch.float16, torch.bfloat16) or not is_cuda(t):
        return False
    key = "Meta" if t.is_meta else "CUDA"
    return _has_kernel("aten::mm.dtype", key) and _has_kernel("aten::addmm.dtype_out", key)


@functools.lru_cache(maxsize=None)
def triton_epilogue() -> bool:
    """Whether triton is installed (the epilogue kernels import lazily, on first CUDA use)."""
    return importlib.util.find_spec("triton") is not None


def has_mm_dtype_out(t: torch.Tensor) -> bool:
    """Whether ``torch.mm(..., out_dtype=..., out=...)`` has a kernel for ``t``'s device (from the registry)."""
    return _has_kernel("aten::mm.dtype_out", "Meta" if t.is_meta else "CUDA")


def has_kernel_for(t: torch.Tensor, op: str) -> bool:
    """Whether the dispatcher has a kernel for ``op`` on ``t``'s device (CUDA, or Meta when traced as CUDA)."""
    return _has_kernel(op, "Meta" if t.is_meta else "CUDA")
