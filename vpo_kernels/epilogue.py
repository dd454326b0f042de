"""The fused epilogue of every vocabulary sweep as two Triton kernels, registered as torch custom ops.

The contract, its math and its plain-torch reference are :mod:`vpo.ops.epilogue`; this module implements
``tile_stats_`` and ``tile_grad`` of that contract on CUDA (and on CPU under ``TRITON_INTERPRET=1``):

    _tile_stats_kernel   the statistics pass: one read of z (and of the reference's tile r), the rows of
                         ``stats [STAT_ROWS, R]`` read once and written once (M, S, T; U, Z, Q when asked; MR, SR, TR,
                         UD with a reference)
    _tile_grad_kernel    the gradient pass: one read of z (and r), ``dz [R, C]`` written once in ``out_dtype``

Layout: tiles ``[R, C]`` of any float dtype with unit column stride and their own row stride (z and r may differ),
bias slices ``[C]`` (any float dtype), ``y [R]`` int64, per-row vectors and statistics fp32. Every element is upcast
to fp32 on load. Grid ``(cdiv(R, BLOCK_N),)``: a program owns BLOCK_N rows and walks the C columns in BLOCK_C
blocks, its row statistics in registers. float64 inputs run :func:`vpo.ops.epilogue.torch_tile_stats_` /
``torch_tile_grad`` inside the same custom ops.

The transform ``z' = softcap · tanh(scale · (z + b) / softcap)`` uses a tanh built from ``exp`` (libdevice is not
available under the interpreter): an odd Taylor polynomial for ``|u| < 1/8``, ``(1 − e^{−2|u|}) / (1 + e^{−2|u|})``
with the sign restored above — no overflow, within 5 ulp (relative) of tanh under the interpreter. M, S, T of the
policy and MR, SR, TR of the reference come from the same jitted helpers (:func:`_transform`, :func:`_online`),
whatever the optional flags, so identical inputs give bit-identical statistics (tested under the interpreter; on a GPU
this also assumes z and r have row strides of the same alignment, so that Triton specializes both loads alike, as for
two contiguous ``[R, C]`` GEMM outputs).

Custom ops: ``torch.ops.vpo.tile_stats_`` (mutates ``stats``) and ``torch.ops.vpo.tile_grad`` (returns ``dz``), each
with a fake implementation, so TorchDispatchMode counters, ``torch.compile`` and the meta device see one op per pass
(on meta no kernel is launched). :func:`triton_tile_stats_` / :func:`triton_tile_grad` are the entry points that
:mod:`vpo.ops.epilogue` imports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from vpo.ops import epilogue as _contract
from vpo_kernels.target_logits import _interpreting

__all__ = ["EpilogueConfig", "default_epilogue_config", "triton_tile_stats_", "triton_tile_grad"]

# Statistics rows (the contract's layout), as constexprs the kernels can read.
_M, _S, _T, _U, _Z, _Q, _MR, _SR, _TR, _UD = (tl.constexpr(i) for i in (
    _contract.M, _contract.S, _contract.T, _contract.U, _contract.Z, _contract.Q, _contract.MR, _contract.SR,
    _contract.TR, _contract.UD))


@dataclass(frozen=True)
class EpilogueConfig:
    block_n: int
    block_c: int
    num_warps: int = 4


def default_epilogue_config() -> EpilogueConfig:
    if _interpreting():
        return EpilogueConfig(block_n=64, block_c=64)  # ~2 ms per program iteration: few, wide programs
    # Memory bound: 4 rows x 256 columns = 1024 elements per tile and iteration (8 per thread at 4 warps); R = 16384
    # rows give 4096 programs. Each thread keeps the statistics of the rows its elements lie on, so BLOCK_N is small:
    # 8 x 256 needed 255 registers for the statistics pass with every flag on (tests/test_aot_compile.py, Triton 3.9),
    # 4 x 256 needs 110 (sm_80) / 122 (sm_90), the gradient pass 56 / 59, no spills. Not timed (no GPU in the session
    # that wrote it).
    return EpilogueConfig(block_n=4, block_c=256, num_warps=4)


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(u):
    """tanh from exp only: odd Taylor series to u⁷ below |u| = 1/8 (truncation < 2e-9 relative), else
    (1 − e)/(1 + e) with e = exp(−2|u|) ≤ 0.78 (never overflows; ±1 for large |u|), the sign restored."""
    a = tl.abs(u)
    u2 = u * u
    small = u * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 + u2 * -0.05396825396825397)))
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(u < 0.0, -big, big)
    return tl.where(a < 0.125, small, big)


@triton.jit
def _head_transform(x, scale, softcap, inv_cap, SOFTCAP: tl.constexpr):
    """``(z', t)`` of fp32 logits ``x = z + b``: ``z' = scale·x``, capped ``z' = cap·t`` with ``t = tanh(scale·x/cap)``
    when SOFTCAP (``t`` is z' itself otherwise); ``∂z'/∂x = scale·(1 − t²)``. Also used by the fully fused kernels."""
    x = x * scale
    th = x
    if SOFTCAP:
        th = _tanh(x * inv_cap)
        x = softcap * th
    return x, th


@triton.jit
def _transform(ptr, stride, b_ptr, rows, rmask, cols, cmask, scale, softcap, inv_cap,
               HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """:func:`_head_transform` of ``ptr[rows, cols] (+ b[cols])``, fp32 ``[BLOCK_N, BLOCK_C]``. Masked positions load
    0 and so transform to exactly 0."""
    x = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return _head_transform(x, scale, softcap, inv_cap, SOFTCAP)


@triton.jit
def _online(x, cmask, cols, col_y, m, s, t):
    """One block of the online log-sum-exp and the target logit: the new ``(M, S, T)``, ``e = exp(x − M')``
    (0 on padding columns) and ``alpha = exp(M − M')`` (0 on the first block, where M = −inf)."""
    m_new = tl.maximum(m, tl.max(tl.where(cmask[None, :], x, float("-inf")), axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.where(cmask[None, :], tl.exp(x - m_new[:, None]), 0.0)
    s = s * alpha + tl.sum(e, axis=1)
    t = t + tl.sum(tl.where(cols[None, :] == col_y[:, None], x, 0.0), axis=1)
    return m_new, s, t, e, alpha


@triton.jit
def _tile_stats_kernel(z_ptr, stride_z, b_ptr, r_ptr, stride_r, br_ptr, y_ptr, stats_ptr, stride_st, R, C, v0,
                       scale, softcap,
                       HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                       SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, MEAN: tl.constexpr, SUMSQ: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < R
    rows = rows.to(tl.int64)
    col_y = tl.load(y_ptr + rows, mask=rmask, other=0) - v0  # the target's column in this tile (if 0 <= . < C)
    inv_cap = 1.0 / softcap  # softcap is 1.0 when there is none
    st = stats_ptr + rows
    m = tl.load(st + _M * stride_st, mask=rmask, other=0.0)
    s = tl.load(st + _S * stride_st, mask=rmask, other=0.0)
    t = tl.load(st + _T * stride_st, mask=rmask, other=0.0)
    u = tl.zeros_like(m)  # the optional moments: loaded only when asked for
    zs = u
    q = u
    mr = u
    sr = u
    tr = u
    ud = u
    if ENTROPY:
        u = tl.load(st + _U * stride_st, mask=rmask, other=0.0)
    if MEAN:
        zs = tl.load(st + _Z * stride_st, mask=rmask, other=0.0)
    if SUMSQ:
        q = tl.load(st + _Q * stride_st, mask=rmask, other=0.0)
    if HAS_REF:
        mr = tl.load(st + _MR * stride_st, mask=rmask, other=0.0)
        sr = tl.load(st + _SR * stride_st, mask=rmask, other=0.0)
        tr = tl.load(st + _TR * stride_st, mask=rmask, other=0.0)
        ud = tl.load(st + _UD * stride_st, mask=rmask, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        x, _ = _transform(z_ptr, stride_z, b_ptr, rows, rmask, cols, cmask, scale, softcap, inv_cap, HAS_BIAS, SOFTCAP)
        m, s, t, e, alpha = _online(x, cmask, cols, col_y, m, s, t)
        if ENTROPY:
            u = u * alpha + tl.sum(e * x, axis=1)  # x = 0 and e = 0 on padding columns
        if MEAN:
            zs += tl.sum(x, axis=1)
        if SUMSQ:
            q = q * alpha * alpha + tl.sum(e * e, axis=1)
        if HAS_REF:
            r, _ = _transform(r_ptr, stride_r, br_ptr, rows, rmask, cols, cmask, scale, softcap, inv_cap,
                              HAS_REF_BIAS, SOFTCAP)
            mr, sr, tr, _, _ = _online(r, cmask, cols, col_y, mr, sr, tr)
            ud = ud * alpha + tl.sum(e * (x - r), axis=1)  # exactly 0 where r == x
    tl.store(st + _M * stride_st, m, mask=rmask)
    tl.store(st + _S * stride_st, s, mask=rmask)
    tl.store(st + _T * stride_st, t, mask=rmask)
    if ENTROPY:
        tl.store(st + _U * stride_st, u, mask=rmask)
    if MEAN:
        tl.store(st + _Z * stride_st, zs, mask=rmask)
    if SUMSQ:
        tl.store(st + _Q * stride_st, q, mask=rmask)
    if HAS_REF:
        tl.store(st + _MR * stride_st, mr, mask=rmask)
        tl.store(st + _SR * stride_st, sr, mask=rmask)
        tl.store(st + _TR * stride_st, tr, mask=rmask)
        tl.store(st + _UD * stride_st, ud, mask=rmask)


@triton.jit
def _tile_grad_kernel(z_ptr, stride_z, b_ptr, r_ptr, stride_r, br_ptr, y_ptr, lse_ptr, g_ptr, coef_ptr, lser_ptr,
                      gkl_ptr, kl_ptr, dz_ptr, stride_dz, R, C, v0, scale, softcap,
                      HAS_BIAS: tl.constexpr, HAS_KL: tl.constexpr, HAS_REF_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < R
    rows = rows.to(tl.int64)
    col_y = tl.load(y_ptr + rows, mask=rmask, other=0) - v0
    inv_cap = 1.0 / softcap  # softcap is 1.0 when there is none
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)  # ∂L/∂logp
    coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)  # the one-hot's coefficient
    live = (g != 0.0) | (coef != 0.0)
    gkl = g  # placeholders without a KL term
    shift = g
    if HAS_KL:
        gkl = tl.load(gkl_ptr + rows, mask=rmask, other=0.0)  # ∂L/∂KL
        shift = tl.load(lser_ptr + rows, mask=rmask, other=0.0) - tl.load(kl_ptr + rows, mask=rmask, other=0.0)
        live = live | (gkl != 0.0)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        x, th = _transform(z_ptr, stride_z, b_ptr, rows, rmask, cols, cmask, scale, softcap, inv_cap, HAS_BIAS,
                           SOFTCAP)
        logp = x - lse[:, None]
        p = tl.exp(logp)
        if HAS_KL:
            r, _ = _transform(r_ptr, stride_r, br_ptr, rows, rmask, cols, cmask, scale, softcap, inv_cap,
                              HAS_REF_BIAS, SOFTCAP)
            # g_kl · p · (logp − log q − kl) − g_logp · p  with  log q = r − lse_r
            dz = p * ((logp - r + shift[:, None]) * gkl[:, None] - g[:, None])
        else:
            dz = p * -g[:, None]
        dz += tl.where(cols[None, :] == col_y[:, None], coef[:, None], 0.0)
        if SOFTCAP:
            dz = dz * (1.0 - th * th)
        dz = tl.where(live[:, None], dz * scale, 0.0)  # exact zeros on ignored rows, whatever z holds
        tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Host side: launchers, custom ops, the contract's entry points
# ----------------------------------------------------------------------------------------------------------------------


def _unit_cols(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` with unit column stride (a copy only when it has none)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _launch_meta(R: int):
    cfg = default_epilogue_config()
    return (triton.cdiv(R, cfg.block_n),), dict(BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)


def _stats_kernel_call(z, y, v0, stats, bias, ref, ref_bias, scale, softcap, entropy, mean, sumsq) -> None:
    R, C = z.shape
    if R == 0 or C == 0:
        return
    z, ref, bias, ref_bias = _unit_cols(z), _unit_cols(ref), _unit_cols(bias), _unit_cols(ref_bias)
    out = stats if stats.stride(1) == 1 else stats.contiguous()
    grid, meta = _launch_meta(R)
    has_ref = ref is not None
    _tile_stats_kernel[grid](
        z, z.stride(0), z if bias is None else bias, z if ref is None else ref, ref.stride(0) if has_ref else 0,
        z if ref_bias is None else ref_bias, y.contiguous(), out, out.stride(0), R, C, int(v0), float(scale),
        float(softcap) if softcap else 1.0, HAS_BIAS=bias is not None, HAS_REF=has_ref,
        HAS_REF_BIAS=has_ref and ref_bias is not None, SOFTCAP=bool(softcap), ENTROPY=bool(entropy),
        MEAN=bool(mean), SUMSQ=bool(sumsq), **meta)
    if out is not stats:
        stats.copy_(out)


def _grad_kernel_call(z, y, v0, lse, g_logp, coef, out_dtype, bias, ref, ref_bias, lse_ref, g_kl, kl, scale,
                      softcap) -> torch.Tensor:
    R, C = z.shape
    dz = torch.empty((R, C), dtype=out_dtype, device=z.device)
    if R == 0 or C == 0:
        return dz
    has_kl = g_kl is not None
    z, bias = _unit_cols(z), _unit_cols(bias)
    ref, ref_bias = (_unit_cols(ref), _unit_cols(ref_bias)) if has_kl else (None, None)
    vec = [t.contiguous() for t in (y, lse, g_logp, coef)]
    kl_vec = [t.contiguous() for t in (lse_ref, g_kl, kl)] if has_kl else [lse] * 3
    grid, meta = _launch_meta(R)
    _tile_grad_kernel[grid](
        z, z.stride(0), z if bias is None else bias, z if ref is None else ref, ref.stride(0) if has_kl else 0,
        z if ref_bias is None else ref_bias, *vec, *kl_vec, dz, dz.stride(0), R, C, int(v0), float(scale),
        float(softcap) if softcap else 1.0, HAS_BIAS=bias is not None, HAS_KL=has_kl,
        HAS_REF_BIAS=has_kl and ref_bias is not None, SOFTCAP=bool(softcap), **meta)
    return dz


@torch.library.custom_op("vpo::tile_stats_", mutates_args=("stats",))
def _tile_stats_op(z: torch.Tensor, y: torch.Tensor, v0: int, stats: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, ref: Optional[torch.Tensor] = None,
                   ref_bias: Optional[torch.Tensor] = None, *, scale: float = 1.0, softcap: float = 0.0,
                   entropy: bool = True, mean: bool = True, sumsq: bool = False) -> None:
    """:func:`vpo.ops.epilogue.tile_stats_` (z ``[R, C]``, y ``[R]``, stats ``[STAT_ROWS, R]`` updated in place)."""
    if stats.dtype == torch.float64 or z.dtype == torch.float64:
        _contract.torch_tile_stats_(z, y, v0, stats, bias=bias, ref=ref, ref_bias=ref_bias, scale=scale,
                                    softcap=softcap, entropy=entropy, mean=mean, sumsq=sumsq)
        return
    _stats_kernel_call(z, y, v0, stats, bias, ref, ref_bias, scale, softcap, entropy, mean, sumsq)


@_tile_stats_op.register_fake
def _tile_stats_fake(z, y, v0, stats, bias=None, ref=None, ref_bias=None, *, scale=1.0, softcap=0.0, entropy=True,
                     mean=True, sumsq=False) -> None:
    return None


@torch.library.custom_op("vpo::tile_grad", mutates_args=())
def _tile_grad_op(z: torch.Tensor, y: torch.Tensor, v0: int, lse: torch.Tensor, g_logp: torch.Tensor,
                  coef: torch.Tensor, bias: Optional[torch.Tensor] = None, ref: Optional[torch.Tensor] = None,
                  ref_bias: Optional[torch.Tensor] = None, lse_ref: Optional[torch.Tensor] = None,
                  g_kl: Optional[torch.Tensor] = None, kl: Optional[torch.Tensor] = None, *, out_dtype: torch.dtype,
                  scale: float = 1.0, softcap: float = 0.0) -> torch.Tensor:
    """:func:`vpo.ops.epilogue.tile_grad`: ``dz [R, C]`` in ``out_dtype``."""
    if lse.dtype == torch.float64 or z.dtype == torch.float64:
        return _contract.torch_tile_grad(z, y, v0, lse, g_logp, coef, out_dtype=out_dtype, bias=bias, ref=ref,
                                         ref_bias=ref_bias, lse_ref=lse_ref, g_kl=g_kl, kl=kl, scale=scale,
                                         softcap=softcap)
    return _grad_kernel_call(z, y, v0, lse, g_logp, coef, out_dtype, bias, ref, ref_bias, lse_ref, g_kl, kl, scale,
                             softcap)


@_tile_grad_op.register_fake
def _tile_grad_fake(z, y, v0, lse, g_logp, coef, bias=None, ref=None, ref_bias=None, lse_ref=None, g_kl=None,
                    kl=None, *, out_dtype, scale=1.0, softcap=0.0) -> torch.Tensor:
    return torch.empty(z.shape, dtype=out_dtype, device=z.device)


def triton_tile_stats_(z: torch.Tensor, y: torch.Tensor, v0: int, stats: torch.Tensor, *,
                       bias: Optional[torch.Tensor] = None, ref: Optional[torch.Tensor] = None,
                       ref_bias: Optional[torch.Tensor] = None, scale: float = 1.0, softcap: float = 0.0,
                       entropy: bool = True, mean: bool = True, sumsq: bool = False) -> None:
    """:func:`vpo.ops.epilogue.tile_stats_` by ``torch.ops.vpo.tile_stats_`` (on meta: the fake, no launch)."""
    torch.ops.vpo.tile_stats_(z, y, int(v0), stats, bias, ref, ref_bias, scale=float(scale),
                              softcap=float(softcap or 0.0), entropy=bool(entropy), mean=bool(mean),
                              sumsq=bool(sumsq))


def triton_tile_grad(z: torch.Tensor, y: torch.Tensor, v0: int, lse: torch.Tensor, g_logp: torch.Tensor,
                     coef: torch.Tensor, *, out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None,
                     ref: Optional[torch.Tensor] = None, ref_bias: Optional[torch.Tensor] = None,
                     lse_ref: Optional[torch.Tensor] = None, g_kl: Optional[torch.Tensor] = None,
                     kl: Optional[torch.Tensor] = None, scale: float = 1.0, softcap: float = 0.0) -> torch.Tensor:
    """:func:`vpo.ops.epilogue.tile_grad` by ``torch.ops.vpo.tile_grad`` (on meta: the fake, no launch)."""
    if g_kl is None:
        ref = ref_bias = lse_ref = kl = None  # unused without the KL term: keep them out of the op's inputs
    elif ref is None or lse_ref is None or kl is None:
        raise ValueError("tile_grad: g_kl needs ref, lse_ref and kl")
    return torch.ops.vpo.tile_grad(z, y, int(v0), lse, g_logp, coef, bias, ref, ref_bias, lse_ref, g_kl, kl,
                                   out_dtype=out_dtype, scale=float(scale), softcap=float(softcap or 0.0))
