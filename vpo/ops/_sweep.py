"""The one vocabulary sweep behind the ``"torch"`` and ``"gemm"`` paths of the LM-head ops.

Every LM-head op (``linear_logprobs``, ``linear_token_kl``) is a loop over vocabulary chunks ``[v0, v1)``:

    z_c = h @ W[v0:v1].T                        [N, D] @ [D, C] -> [N, C] fp32   one GEMM over ALL rows
    forward:   step(z_c, ...)                   the statistics pass (vpo.ops.epilogue.tile_stats_)
    backward:  dz_c = grad_step(z_c, ...)       the gradient pass (vpo.ops.epilogue.tile_grad), [N, C] in the GEMM
                                                operand dtype
               dh      += dz_c @ W[v0:v1]       [N, C] @ [C, D] -> [N, D], fp32 accumulator
               dW[v0:v1] = dz_cᵀ @ h            [C, N] @ [N, D] -> [C, D], ONE complete GEMM per chunk: no atomics,
                                                no [V, D] fp32 buffer (each chunk is written once, in W's dtype)
               db[v0:v1] = Σ_rows dz_c

The elementwise passes are the fused epilogue of :mod:`vpo.ops.epilogue`, shared with the fused losses' engine: plain
torch for ``impl="torch"``, Triton kernels (torch custom ops) for ``impl="gemm"``. The logits are never rounded below
fp32: on CUDA the GEMMs take bf16/fp16 operands and write fp32 (``torch.mm(..., out_dtype=torch.float32)``, where the
torch build has it: :func:`vpo._caps.gemm_fp32_out`); elsewhere 16-bit operands are upcast first (:func:`mm_acc`,
:func:`operand_dtype`); float64 stays float64.

GEMM passes (units of 2·N·D·V FLOPs): forward 1 per head; backward 1 recompute per head + 1 for dh + 1 for dW. No
row selection: ignored rows are computed like the others and masked (their gradient and outputs are exactly 0), so
nothing reads a count back to the host.

Chunk policy (:func:`vocab_chunk`): ``C = min(V, max(4096, B // (T · N · (a + e))))`` under the default budget
(``C = clamp(B // (T · N · (a + e)), 1, V)`` for a budget given explicitly), rounded down to a multiple of 128, where ``B`` is the budget in bytes, ``T`` the number of logits tiles per chunk (1 for log-probs, 2 for the KL's
policy and reference), ``a`` the accumulation element size (4, 8 for float64) and ``e`` the input element size: the
forward holds the ``T`` logits tiles (``T·N·C·a`` bytes at most) and the backward additionally one ``dz`` tile
(``N·C·e``). Under the default budget chunks stay at least 4096 columns wide (narrow GEMMs lose efficiency): past
``N ≈ B / (4096·T·(a + e))`` rows the memory grows with N instead. Extra memory of a call is then ``≈ max(B, 4096·T·N·(a + e))`` plus ``dh`` in
fp32 (``N·D·4``) and ``[N]`` statistics. ``B`` is ``chunk_budget_mb`` (keyword of the public ops), else
``$VPO_CHUNK_BUDGET_MB``, else :data:`DEFAULT_BUDGET_MB` = 128 MiB; ``$VPO_TORCH_CHUNK`` (or ``chunk=``) fixes ``C``
directly.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from vpo import _caps

DEFAULT_BUDGET_MB = 128  # MiB per chunk's tiles (see the module docstring for the formula)
MIN_CHUNK = 4096  # columns: narrower GEMMs lose efficiency, so the budget grows with N rather than C shrinking below
BUDGET_ENV = "VPO_CHUNK_BUDGET_MB"
CHUNK_ENV = "VPO_TORCH_CHUNK"

Head = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # (h [N, D], W [V, D], b [V] | None)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/output dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positive_int_env(name: str) -> Optional[int]:
    env = os.environ.get(name)
    if not env:
        return None
    try:
        val = int(env)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {env!r}") from None
    if val <= 0:
        raise ValueError(f"{name} must be a positive integer, got {env!r}")
    return val


def budget_bytes(budget_mb=None) -> int:
    """The chunk budget in bytes: ``budget_mb`` (argument ``chunk_budget_mb``), else ``$VPO_CHUNK_BUDGET_MB``, else
    :data:`DEFAULT_BUDGET_MB`."""
    if budget_mb is None:
        budget_mb = _positive_int_env(BUDGET_ENV) or DEFAULT_BUDGET_MB
    elif isinstance(budget_mb, bool) or not isinstance(budget_mb, (int, float)) or not budget_mb > 0:
        raise ValueError(f"chunk_budget_mb must be a positive number (MiB), got {budget_mb!r}")
    return int(budget_mb * (1 << 20))


def vocab_chunk(n_rows: int, vocab: int, dtype: torch.dtype, *, tiles: int = 1, chunk: Optional[int] = None,
                budget_mb=None) -> int:
    """Vocabulary columns per chunk: ``chunk``, else ``$VPO_TORCH_CHUNK``, else the budget rule of the module
    docstring, ``C = clamp(B // (tiles · n_rows · (a + e)), 1, vocab)`` (a multiple of 128 when ≥ 128), at least
    :data:`MIN_CHUNK` (or ``vocab``) under the default budget; a budget given explicitly is kept exactly."""
    if chunk is None:
        chunk = _positive_int_env(CHUNK_ENV)
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
            raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
        return min(chunk, vocab)
    per_col = tiles * max(n_rows, 1) * (torch.finfo(acc_dtype(dtype)).bits // 8 + torch.finfo(dtype).bits // 8)
    default = budget_mb is None and _positive_int_env(BUDGET_ENV) is None
    c = budget_bytes(budget_mb) // per_col
    if c >= 128:
        c -= c % 128
    return max(1, min(vocab, max(MIN_CHUNK, c) if default else c))


# ----------------------------------------------------------------------------------------------------------------------
# GEMMs
# ----------------------------------------------------------------------------------------------------------------------

def operand_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs' operands are in: the input dtype where cuBLAS writes fp32 from 16-bit operands
    (:func:`vpo._caps.gemm_fp32_out`), else the accumulation dtype (16-bit inputs are upcast: no logit is ever rounded
    below fp32)."""
    return t.dtype if _caps.gemm_fp32_out(t) else acc_dtype(t.dtype)


def mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in the accumulation dtype (fp32; float64 for float64): cuBLAS with fp32 output for bf16/fp16 operands
    on CUDA, where the torch build has it (:func:`vpo._caps.gemm_fp32_out`, decided from the registry, never by catching
    an error); otherwise the operands are upcast first."""
    acc = acc_dtype(a.dtype)
    if a.dtype == acc:
        return a @ b
    if _caps.gemm_fp32_out(a):
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


def mm_acc_out(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` written into ``out`` (accumulation dtype) without a temporary: the first write of an
    accumulator, so it needs no zero fill."""
    if a.dtype != out.dtype:
        if _caps.gemm_fp32_out(a) and _caps.has_mm_dtype_out(a):
            torch.mm(a, b, out_dtype=out.dtype, out=out)
            return
        a, b = a.to(out.dtype), b.to(out.dtype)
    torch.mm(a, b, out=out)


def mm_acc_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in the accumulation dtype, without an ``acc``-sized temporary: ``addmm(out=acc)``
    (with ``out_dtype`` for 16-bit operands on CUDA, :func:`vpo._caps.gemm_fp32_out`); 16-bit operands elsewhere are
    upcast first."""
    if a.dtype != acc.dtype:
        if _caps.gemm_fp32_out(a):
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        a, b = a.to(acc.dtype), b.to(acc.dtype)
    torch.addmm(acc, a, b, out=acc)  # (not addmm_, which dispatch-level FLOP counters do not see)


# ----------------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------------


def _chunks(V: int, C: int):
    for v0 in range(0, V, C):
        yield v0, min(v0 + C, V)


def _bias_slice(b: Optional[torch.Tensor], v0: int, v1: int) -> Optional[torch.Tensor]:
    return None if b is None else b[v0:v1]


def forward_sweep(heads: Sequence[Head], C: int, step: Callable) -> None:
    """For each vocabulary chunk: one fp32 logits tile per head (``[N, C]``, :func:`mm_acc`), then
    ``step(tiles, biases, v0)``. The heads' ``h`` must be in the GEMM operand dtype (:func:`operand_dtype`)."""
    V = heads[0][1].shape[0]
    for v0, v1 in _chunks(V, C):
        tiles = [mm_acc(h, _as(W[v0:v1], h.dtype).T) for h, W, _ in heads]  # [N, D] @ [D, C] -> [N, C] each
        step(tiles, [_bias_slice(b, v0, v1) for _, _, b in heads], v0)
        del tiles  # before the next chunk's GEMMs allocate theirs


def backward_sweep(heads: Sequence[Head], C: int, grad_step: Callable, *, need_h: bool, need_W: bool,
                   need_b: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients to the FIRST head's ``(h, W, b)`` with ``dz_c = grad_step(tiles, biases, v0)`` (``[N, C]``, the
    GEMM operand dtype): ``dh`` ([N, D], accumulation dtype), ``dW`` ([V, D], W's dtype, each chunk one GEMM written
    once), ``db`` ([V], accumulation dtype). A gradient not asked for is None and its GEMM is skipped."""
    h, W, b = heads[0]
    N, D = h.shape
    V = W.shape[0]
    acc = acc_dtype(h.dtype)
    dh = torch.zeros((N, D), dtype=acc, device=h.device) if need_h else None
    dW = torch.empty((V, D), dtype=W.dtype, device=W.device) if need_W else None
    db = torch.empty((V,), dtype=acc, device=h.device) if need_b else None
    if not (need_h or need_W or need_b):
        return dh, dW, db
    for v0, v1 in _chunks(V, C):
        tiles = [mm_acc(hh, _as(WW[v0:v1], hh.dtype).T) for hh, WW, _ in heads]  # recompute: [N, C] each
        dz = grad_step(tiles, [_bias_slice(bb, v0, v1) for _, _, bb in heads], v0)  # [N, C], operand dtype
        del tiles
        if need_h:
            mm_acc_into(dh, dz, _as(W[v0:v1], dz.dtype))  # dh += [N, C] @ [C, D] -> [N, D]
        if need_W:  # [C, N] @ [N, D] -> [C, D]: the whole chunk of dW in one GEMM, written once in W's dtype
            if dW.dtype == dz.dtype:
                torch.mm(dz.T, h, out=dW[v0:v1])
            else:
                dW[v0:v1] = mm_acc(dz.T, h)
        if need_b:
            db[v0:v1] = dz.sum(0, dtype=acc)
        del dz  # before the next chunk's GEMMs
    return dh, dW, db


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Sparse pieces: target logit gather-dot and the one-hot's scatter (O(N·D))
# ----------------------------------------------------------------------------------------------------------------------


def target_dot(h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], y: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
    """``W[y] · h + b[y]`` per row in the accumulation dtype, 0 where not ``valid``: ``[N, D] * [N, D] -> [N]``.
    ``y`` must be in range everywhere (ignored rows carry any valid id)."""
    acc = acc_dtype(h.dtype)
    z = (W[y].to(acc) * h.to(acc)).sum(-1)
    if b is not None:
        z = z + b[y].to(acc)
    return torch.where(valid, z, torch.zeros((), dtype=acc, device=z.device))


def scatter_rows(y: torch.Tensor, vals: torch.Tensor, V: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``out [V, D]`` in ``dtype`` with ``out[y[i]] += vals[i]`` (``vals [N, D]`` in the accumulation dtype).

    When ``dtype`` is the accumulation dtype this is one ``index_add_``. Otherwise (16-bit weights) rows sharing a
    target are first summed in the accumulation dtype over a device-side sort (segments of equal ``y``: O(N·D), no
    host sync), and each sum is rounded once into the ``dtype`` output: no ``[V, D]`` fp32 buffer.
    """
    N, D = vals.shape
    if dtype == vals.dtype:
        return torch.zeros((V, D), dtype=dtype, device=vals.device).index_add_(0, y, vals)
    ys, order = torch.sort(y)
    new = torch.ones_like(ys, dtype=torch.bool)
    new[1:] = ys[1:] != ys[:-1]
    seg = torch.cumsum(new, 0) - 1  # [N] segment id of each sorted row
    sums = torch.zeros((N, D), dtype=vals.dtype, device=vals.device).index_add_(0, seg, vals[order])
    row_of = torch.full((N,), V, dtype=torch.long, device=vals.device).scatter_(0, seg, ys)  # unused segments: V
    out = torch.zeros((V + 1, D), dtype=dtype, device=vals.device)
    out.index_copy_(0, row_of, sums.to(dtype))  # the unused segments write zeros into the spare row V
    return out[:V]
