"""The elementwise steps of the GEMM-bound path (``impl="gemm"``) as small fused Triton kernels.

``vpo.ops._sweep`` runs the vocabulary sweep: every logits tile ``z_c = h @ W[v0:v1].T`` (``[N, C]``) is a cuBLAS GEMM
in the input dtype; what is done to the tile between the GEMMs is one of the kernels below, each reading the tile once
(and writing ``dz`` once): a memory-bound pass over ``N·C`` elements next to a ``2·N·C·D``-FLOP GEMM. The same math in
plain torch is ``vpo.ops._sweep.TorchEpilogue``; :class:`TritonEpilogue` has the same methods.

    _lse_update_kernel      m' = max(m, max_v z),  s' = s·exp(m − m') + Σ_v exp(z − m')             (online logsumexp)
    _logprob_grad_kernel    dz = −g·exp(z − lse) + coef·1[v = y]                (softmax grad + one-hot)
    _kl_update_kernel       the token-KL sweep's five statistics (m, s, u = Σ exp(z − m)·(z − r), m_r, s_r)
    _kl_grad_kernel         dz = g·exp(z − lse)·(z − r − E_p[z − r])

Layout: tiles ``[N, C]`` with a row stride (any float dtype; bias ``[C]`` slices added in fp32), row statistics
``[N]`` fp32, ``dz`` ``[N, C]`` in the input dtype (the next GEMM's operand). Grid: ``(cdiv(N, BLOCK_N),)``; a program
owns BLOCK_N rows and walks the C columns in BLOCK_C blocks, so its row statistics stay in registers. Rows whose
gradient coefficients are both 0 (ignored rows) get exact zeros. float64 inputs use the torch steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vpo.ops._sweep import TorchEpilogue
from vpo_kernels.target_logits import _interpreting, target_logits_fwd

__all__ = ["EpilogueConfig", "TritonEpilogue", "default_epilogue_config"]


@dataclass(frozen=True)
class EpilogueConfig:
    block_n: int
    block_c: int
    num_warps: int = 4


def default_epilogue_config() -> EpilogueConfig:
    if _interpreting():
        return EpilogueConfig(block_n=64, block_c=64)  # ~2 ms per program iteration: few, wide programs
    # Memory bound: 8 rows x 256 columns = 2048 elements per iteration (16 per thread at 4 warps), 16-byte loads
    # along C; N = 16384 rows give 2048 programs. Not measured (no GPU in the session that wrote it).
    return EpilogueConfig(block_n=8, block_c=256, num_warps=4)


@triton.jit
def _tile_block(z_ptr, stride_z, b_ptr, rows, rmask, cols, cmask, HAS_BIAS: tl.constexpr):
    """``z[rows, cols] (+ b[cols])`` as fp32 ``[BLOCK_N, BLOCK_C]``; 0 outside the masks."""
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _lse_update_kernel(z_ptr, stride_z, b_ptr, m_ptr, s_ptr, N, C,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows = rows.to(tl.int64)
    m = tl.load(m_ptr + rows, mask=rmask, other=0.0)  # [BLOCK_N] running max (−inf before the first chunk)
    s = tl.load(s_ptr + rows, mask=rmask, other=0.0)  # [BLOCK_N] running Σ exp(z − m)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        z = _tile_block(z_ptr, stride_z, b_ptr, rows, rmask, cols, cmask, HAS_BIAS)  # [BLOCK_N, BLOCK_C]
        z = tl.where(cmask[None, :], z, float("-inf"))  # padding columns add exp(−inf) = 0
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every column block has a real column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    tl.store(m_ptr + rows, m, mask=rmask)
    tl.store(s_ptr + rows, s, mask=rmask)


@triton.jit
def _logprob_grad_kernel(z_ptr, stride_z, b_ptr, lse_ptr, g_ptr, coef_ptr, y_ptr, dz_ptr, stride_dz, N, C, v0,
                         HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows = rows.to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)  # ∂L/∂logp (0 on ignored rows)
    coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)  # weight of the one-hot: g + ∂L/∂target
    col_y = tl.load(y_ptr + rows, mask=rmask, other=0) - v0  # target column inside this chunk
    live = (g != 0.0) | (coef != 0.0)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        z = _tile_block(z_ptr, stride_z, b_ptr, rows, rmask, cols, cmask, HAS_BIAS)
        dz = -g[:, None] * tl.exp(z - lse[:, None]) + tl.where(cols[None, :] == col_y[:, None], coef[:, None], 0.0)
        dz = tl.where(live[:, None], dz, 0.0)
        tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _kl_update_kernel(z_ptr, r_ptr, stride_z, b_ptr, br_ptr, stats_ptr, N, C,
                      HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # stats: [5, N] fp32 = m, s, u (policy), m_r, s_r (reference); see vpo.ops.token_kl for the math.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows = rows.to(tl.int64)
    m = tl.load(stats_ptr + rows, mask=rmask, other=0.0)
    s = tl.load(stats_ptr + N + rows, mask=rmask, other=0.0)
    u = tl.load(stats_ptr + 2 * N + rows, mask=rmask, other=0.0)
    m_r = tl.load(stats_ptr + 3 * N + rows, mask=rmask, other=0.0)
    s_r = tl.load(stats_ptr + 4 * N + rows, mask=rmask, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        z = _tile_block(z_ptr, stride_z, b_ptr, rows, rmask, cols, cmask, HAS_BIAS)  # [BLOCK_N, BLOCK_C]
        r = _tile_block(r_ptr, stride_z, br_ptr, rows, rmask, cols, cmask, HAS_REF_BIAS)
        d = z - r  # 0 on padding columns (both loaded as 0)
        r = tl.where(cmask[None, :], r, float("-inf"))
        m_r_new = tl.maximum(m_r, tl.max(r, axis=1))
        s_r = s_r * tl.exp(m_r - m_r_new) + tl.sum(tl.exp(r - m_r_new[:, None]), axis=1)
        m_r = m_r_new
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # 0 on the first chunk (m = −inf)
        e = tl.exp(z - m_new[:, None])  # [BLOCK_N, BLOCK_C]
        s = s * alpha + tl.sum(e, axis=1)
        u = u * alpha + tl.sum(e * d, axis=1)
        m = m_new
    tl.store(stats_ptr + rows, m, mask=rmask)
    tl.store(stats_ptr + N + rows, s, mask=rmask)
    tl.store(stats_ptr + 2 * N + rows, u, mask=rmask)
    tl.store(stats_ptr + 3 * N + rows, m_r, mask=rmask)
    tl.store(stats_ptr + 4 * N + rows, s_r, mask=rmask)


@triton.jit
def _kl_grad_kernel(z_ptr, r_ptr, stride_z, b_ptr, br_ptr, lse_ptr, e_ptr, g_ptr, dz_ptr, stride_dz, N, C,
                    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows = rows.to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    e_d = tl.load(e_ptr + rows, mask=rmask, other=0.0)  # E_p[z − r]
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)  # ∂L/∂KL (0 on ignored rows)
    live = g != 0.0
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        z = _tile_block(z_ptr, stride_z, b_ptr, rows, rmask, cols, cmask, HAS_BIAS)
        r = _tile_block(r_ptr, stride_z, br_ptr, rows, rmask, cols, cmask, HAS_REF_BIAS)
        dz = g[:, None] * tl.exp(z - lse[:, None]) * (z - r - e_d[:, None])
        dz = tl.where(live[:, None], dz, 0.0)
        tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Host side: the TorchEpilogue interface
# ----------------------------------------------------------------------------------------------------------------------


def _meta(N: int, cfg: EpilogueConfig):
    return (triton.cdiv(N, cfg.block_n),), dict(BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)


class TritonEpilogue:
    """``vpo.ops._sweep.TorchEpilogue``'s methods as Triton kernels (float64 statistics fall back to torch).
    Tiles must have unit column stride; statistics are contiguous fp32 ``[N]``."""

    name = "gemm"

    @staticmethod
    def lse_update(z, b, m, s) -> None:
        if m.dtype == torch.float64:
            return TorchEpilogue.lse_update(z, b, m, s)
        N, C = z.shape
        grid, meta = _meta(N, default_epilogue_config())
        _lse_update_kernel[grid](z, z.stride(0), z if b is None else b, m, s, N, C, HAS_BIAS=b is not None, **meta)

    @staticmethod
    def logprob_grad(z, b, lse, g, coef, y, v0, out_dtype) -> torch.Tensor:
        if lse.dtype == torch.float64:
            return TorchEpilogue.logprob_grad(z, b, lse, g, coef, y, v0, out_dtype)
        N, C = z.shape
        dz = torch.empty((N, C), dtype=out_dtype, device=z.device)
        grid, meta = _meta(N, default_epilogue_config())
        _logprob_grad_kernel[grid](z, z.stride(0), z if b is None else b, lse, g, coef, y, dz, dz.stride(0), N, C, v0,
                                   HAS_BIAS=b is not None, **meta)
        return dz

    @staticmethod
    def kl_update(z, r, b, br, stats) -> None:
        """``stats [5, N]`` (m, s, u, m_r, s_r) updated in place from the policy tile ``z`` and reference tile ``r``."""
        if stats.dtype == torch.float64:
            return TorchEpilogue.kl_update(z, r, b, br, stats)
        N, C = z.shape
        if r.stride(0) != z.stride(0):
            r = r.contiguous()
            z = z.contiguous()
        grid, meta = _meta(N, default_epilogue_config())
        _kl_update_kernel[grid](z, r, z.stride(0), z if b is None else b, z if br is None else br, stats, N, C,
                                HAS_BIAS=b is not None, HAS_REF_BIAS=br is not None, **meta)

    @staticmethod
    def kl_grad(z, r, b, br, lse, e_d, g, out_dtype) -> torch.Tensor:
        if lse.dtype == torch.float64:
            return TorchEpilogue.kl_grad(z, r, b, br, lse, e_d, g, out_dtype)
        N, C = z.shape
        if r.stride(0) != z.stride(0):
            r = r.contiguous()
            z = z.contiguous()
        dz = torch.empty((N, C), dtype=out_dtype, device=z.device)
        grid, meta = _meta(N, default_epilogue_config())
        _kl_grad_kernel[grid](z, r, z.stride(0), z if b is None else b, z if br is None else br, lse, e_d, g, dz,
                              dz.stride(0), N, C, HAS_BIAS=b is not None, HAS_REF_BIAS=br is not None, **meta)
        return dz

    @staticmethod
    def target_dot(h, W, b, labels, ignore_index, y, valid) -> torch.Tensor:
        """The target logit by the O(N·D) gather-dot kernel (``vpo_kernels.target_logits``): no [N, D] temporaries."""
        if h.dtype == torch.float64:
            return TorchEpilogue.target_dot(h, W, b, labels, ignore_index, y, valid)
        return target_logits_fwd(h, W, labels, b, ignore_index)
