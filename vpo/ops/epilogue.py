"""The fused epilogue: what is done to each logits tile between the GEMMs, for every LM-head op and fused loss.

Every vocabulary sweep in vpo (the ops :func:`vpo.linear_logprobs` / :func:`vpo.linear_token_kl` on their ``"torch"``
and ``"gemm"`` paths, and the fused losses' engine :mod:`vpo.fused._engine`) computes a logits tile
``z = h @ W[v0:v1]ᵀ`` (``[R, C]``, **fp32**: a cuBLAS GEMM with fp32 output on CUDA, an upcast GEMM on CPU) and then
runs at most two elementwise passes over it:

* :func:`tile_stats_` — the **statistics pass**: one read of the tile (and of the reference's tile, for the KL),
  per-row running statistics updated in place;
* :func:`tile_grad` — the **gradient pass**: one read of the tile (and of the reference's), ``dz`` written once in the
  dtype of the next GEMM's operand.

Each logit is first transformed as the model's head does (Gemma's final-logit soft-capping, Cohere's logit scale)::

    z' = scale · (z + b)                 b: the head's bias slice [C] (optional)
    z' = cap · tanh(z' / cap)            only when softcap > 0

Row statistics ``stats [STAT_ROWS, R]`` (fp32; float64 for float64 inputs), one row each (module constants)::

    M   running max of z'                       S   Σ exp(z' − M)          T   z'[y]  (the tile holding y adds it)
    U   Σ exp(z' − M) · z'   (entropy)          Z   Σ z'   (mean logit)    Q   Σ exp(2 (z' − M))   (log Σ p²)
    MR, SR, TR: M, S, T of the reference tile r'     UD  Σ exp(z' − M) · (z' − r')   (KL)

from which, after the last tile (:func:`finish`): ``lse = M + log S``, ``logp = T − lse``, ``entropy = lse − U/S``,
``mean logit = Z/V``, ``target is argmax = T ≥ M``, ``log Σ_v p_v² = log Q − 2 log S``, and
``KL(p‖q) = UD/S − (M − MR) − (log S − log SR)``. ``M``, ``S``, ``T`` (and ``MR``, ``SR``, ``TR``) are computed by the
same statements whichever optional moments are asked for, so a policy and a reference with identical inputs get
bit-identical log-probs.

The gradient pass (``p = exp(z' − lse)``, ``log q = r' − lse_r``)::

    dz' = −g_logp · p + coef · 1[v = y] + g_kl · p · ((z' − lse) − log q − kl)
    dz  = dz' · scale · (1 − (z'/cap)²)         (the chain rule through the transform; the last factor only with a cap)

Rows whose coefficients are all 0 (ignored positions) get exact zeros. Two implementations with the same signature:
plain torch here (the CPU path, float64-capable, the reference for the kernels), and Triton kernels registered as torch
custom ops (``torch.ops.vpo.tile_stats_`` / ``torch.ops.vpo.tile_grad``, ``vpo_kernels.epilogue``) on CUDA; the
custom ops carry fake implementations, so FLOP/byte counters, ``torch.compile`` and the meta device see them.
:func:`backend` picks one per device, explicitly (:mod:`vpo._caps`).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from vpo import _caps

STAT_ROWS = 10
M, S, T, U, Z, Q, MR, SR, TR, UD = range(STAT_ROWS)

__all__ = ["STAT_ROWS", "new_stats", "tile_stats_", "tile_grad", "finish", "backend"]


def new_stats(R: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Fresh row statistics ``[STAT_ROWS, R]``: maxima at −inf, sums at 0."""
    st = torch.zeros((STAT_ROWS, R), dtype=dtype, device=device)
    st[M] = float("-inf")
    st[MR] = float("-inf")
    return st


def backend(t: torch.Tensor) -> str:
    """``"triton"`` where the tensor is on CUDA (or traced as CUDA on the meta device, :func:`vpo._caps.assume_cuda`)
    and the kernels import; ``"torch"`` otherwise."""
    return "triton" if _caps.is_cuda(t) and _caps.triton_epilogue() else "torch"


# ----------------------------------------------------------------------------------------------------------------------
# Public entry points (dispatch)
# ----------------------------------------------------------------------------------------------------------------------


def tile_stats_(z: torch.Tensor, y: torch.Tensor, v0: int, stats: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                ref: Optional[torch.Tensor] = None, ref_bias: Optional[torch.Tensor] = None, scale: float = 1.0,
                softcap: float = 0.0, entropy: bool = True, mean: bool = True, sumsq: bool = False,
                impl: Optional[str] = None) -> None:
    """The statistics pass over one tile, in place on ``stats [STAT_ROWS, R]``.

    Args:
        z: ``[R, C]`` logits of columns ``[v0, v0 + C)`` (fp32, or float64; unit column stride).
        y: ``[R]`` int64 targets, each in ``[0, V)`` (ignored rows carry any valid id; their statistics are unused).
        v0: the tile's first column.
        stats: ``[STAT_ROWS, R]`` running statistics (:func:`new_stats`), z's accumulation dtype.
        bias: ``[C]`` the head's bias slice. ref, ref_bias: the reference's tile ``[R, C]`` and bias slice: the rows
            ``MR``, ``SR``, ``TR``, ``UD`` are updated from it in the same read.
        scale, softcap: the logit transform (module docstring; ``softcap = 0``: none).
        entropy, mean, sumsq: update ``U``, ``Z``, ``Q`` (the other moments are left untouched).
        impl: ``"torch"`` or ``"triton"``; None: :func:`backend` (the ops' ``impl=`` picks it explicitly).
    """
    if (impl or backend(z)) == "triton":
        from vpo_kernels.epilogue import triton_tile_stats_  # lazy: `import vpo` never needs triton

        return triton_tile_stats_(z, y, v0, stats, bias=bias, ref=ref, ref_bias=ref_bias, scale=scale,
                                  softcap=softcap, entropy=entropy, mean=mean, sumsq=sumsq)
    return torch_tile_stats_(z, y, v0, stats, bias=bias, ref=ref, ref_bias=ref_bias, scale=scale, softcap=softcap,
                             entropy=entropy, mean=mean, sumsq=sumsq)


def tile_grad(z: torch.Tensor, y: torch.Tensor, v0: int, lse: torch.Tensor, g_logp: torch.Tensor,
              coef: torch.Tensor, *, out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None,
              ref: Optional[torch.Tensor] = None, ref_bias: Optional[torch.Tensor] = None,
              lse_ref: Optional[torch.Tensor] = None, g_kl: Optional[torch.Tensor] = None,
              kl: Optional[torch.Tensor] = None, scale: float = 1.0, softcap: float = 0.0,
              impl: Optional[str] = None) -> torch.Tensor:
    """The gradient pass over one tile: ``dz [R, C]`` in ``out_dtype`` (module docstring).

    Args:
        z, y, v0, bias, scale, softcap: as in :func:`tile_stats_`.
        lse: ``[R]`` the policy's log-sum-exp (of the transformed logits).
        g_logp: ``[R]`` ∂L/∂logp. coef: ``[R]`` the one-hot's coefficient (∂L/∂logp + ∂L/∂z'[y]).
        ref, ref_bias, lse_ref, g_kl, kl: the KL term (all given, or ``g_kl`` None): the reference's tile, its bias
            slice and log-sum-exp ``[R]``, ∂L/∂KL ``[R]`` and the KL itself ``[R]``.
        impl: as in :func:`tile_stats_`.
    """
    if g_kl is not None and (ref is None or lse_ref is None or kl is None):
        raise ValueError("tile_grad: g_kl needs ref, lse_ref and kl")
    if (impl or backend(z)) == "triton":
        from vpo_kernels.epilogue import triton_tile_grad

        return triton_tile_grad(z, y, v0, lse, g_logp, coef, out_dtype=out_dtype, bias=bias, ref=ref,
                                ref_bias=ref_bias, lse_ref=lse_ref, g_kl=g_kl, kl=kl, scale=scale, softcap=softcap)
    return torch_tile_grad(z, y, v0, lse, g_logp, coef, out_dtype=out_dtype, bias=bias, ref=ref, ref_bias=ref_bias,
                           lse_ref=lse_ref, g_kl=g_kl, kl=kl, scale=scale, softcap=softcap)


def finish(stats: torch.Tensor, V: int, *, ref: bool = False) -> Dict[str, torch.Tensor]:
    """Per-row results from the statistics after the last tile (``[R]`` each): ``lse``, ``logp``, ``z`` (the target's
    transformed logit), ``entropy``, ``mean_logit``, ``is_argmax`` (float 0/1), ``log_sum_p2``; with a reference tile
    (``ref=True``) also ``ref_lse``, ``ref_logp`` and ``kl``. Moments that were not accumulated give meaningless values: use only
    those asked for."""
    log_s = torch.log(stats[S])
    lse = stats[M] + log_s
    out = {
        "lse": lse,
        "logp": stats[T] - lse,
        "z": stats[T],
        "entropy": lse - stats[U] / stats[S],
        "mean_logit": stats[Z] / V,
        "is_argmax": (stats[T] >= stats[M]).to(stats.dtype),
        "log_sum_p2": torch.log(stats[Q]) - 2 * log_s,
    }
    if ref:
        log_sr = torch.log(stats[SR])
        out["ref_lse"] = stats[MR] + log_sr
        out["ref_logp"] = stats[TR] - out["ref_lse"]
        out["kl"] = stats[UD] / stats[S] - (stats[M] - stats[MR]) - (log_s - log_sr)  # maxima cancelled first
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The torch implementation (CPU; float64; the reference the kernels are tested against)
# ----------------------------------------------------------------------------------------------------------------------


def transform(z: torch.Tensor, bias: Optional[torch.Tensor], scale: float, softcap: float, acc: torch.dtype
              ) -> torch.Tensor:
    """``z'`` in ``acc`` (module docstring). Returns ``z`` itself when there is nothing to do (it is not modified)."""
    if bias is None and scale == 1.0 and not softcap and z.dtype == acc:
        return z
    x = z.to(acc, copy=True)
    if bias is not None:
        x.add_(bias.to(acc))
    if scale != 1.0:
        x.mul_(scale)
    if softcap:
        x.div_(softcap).tanh_().mul_(softcap)
    return x


def _target(x: torch.Tensor, y: torch.Tensor, v0: int) -> torch.Tensor:
    """``x[r, y_r − v0]`` where ``y_r`` lies in this tile, else 0: ``[R]`` (an O(R) gather)."""
    C = x.shape[1]
    col = y - v0
    inside = (col >= 0) & (col < C)
    got = x.gather(1, col.clamp(0, C - 1)[:, None]).squeeze(1)
    return torch.where(inside, got, torch.zeros((), dtype=x.dtype, device=x.device))


def _lse_rows(x: torch.Tensor, st: torch.Tensor, m_row: int, s_row: int, t_row: int, y, v0):
    """M, S, T of one tile; returns ``(e = exp(x − M'), alpha = exp(M − M'))`` for the moments."""
    m_new = torch.maximum(st[m_row], x.amax(1))
    alpha = torch.exp(st[m_row] - m_new)  # 0 on the first tile (M = −inf)
    e = torch.exp(x - m_new[:, None])
    st[s_row] = st[s_row] * alpha + e.sum(1)
    st[m_row] = m_new
    st[t_row] += _target(x, y, v0)
    return e, alpha


def torch_tile_stats_(z, y, v0, stats, *, bias=None, ref=None, ref_bias=None, scale=1.0, softcap=0.0, entropy=True,
                      mean=True, sumsq=False) -> None:
    """:func:`tile_stats_` in plain torch."""
    acc = stats.dtype
    x = transform(z, bias, scale, softcap, acc)
    e, alpha = _lse_rows(x, stats, M, S, T, y, v0)
    ex = torch.linalg.vecdot(e, x) if entropy or ref is not None else None  # Σ e·z'
    if entropy:
        stats[U] = stats[U] * alpha + ex
    if mean:
        stats[Z] += x.sum(1)
    if sumsq:
        stats[Q] = stats[Q] * alpha * alpha + torch.linalg.vecdot(e, e)
    if ref is not None:
        r = transform(ref, ref_bias, scale, softcap, acc)
        _lse_rows(r, stats, MR, SR, TR, y, v0)
        stats[UD] = stats[UD] * alpha + (ex - torch.linalg.vecdot(e, r))


def torch_tile_grad(z, y, v0, lse, g_logp, coef, *, out_dtype, bias=None, ref=None, ref_bias=None, lse_ref=None,
                    g_kl=None, kl=None, scale=1.0, softcap=0.0) -> torch.Tensor:
    """:func:`tile_grad` in plain torch."""
    acc = lse.dtype
    x = transform(z, bias, scale, softcap, acc)
    logp = x - lse[:, None]  # a new [R, C] tensor: x (possibly the kept tile) is not modified
    p = torch.exp(logp)
    if g_kl is not None:
        r = transform(ref, ref_bias, scale, softcap, acc)
        # g_kl · p · (logp − log q − kl) − g_logp · p  =  p · (g_kl · (logp − r + lse_r − kl) − g_logp)
        w = logp.sub_(r).add_((lse_ref - kl)[:, None]).mul_(g_kl[:, None]).sub_(g_logp[:, None])
        dz = p.mul_(w)
    else:
        dz = p.mul_(-g_logp[:, None])
    C = dz.shape[1]
    col = y - v0
    inside = (col >= 0) & (col < C)
    dz.scatter_add_(1, col.clamp(0, C - 1)[:, None], torch.where(inside, coef, 0.0)[:, None])
    if softcap:
        t = x / softcap
        dz.mul_(t.mul_(t).neg_().add_(1.0))  # 1 − tanh²
    if scale != 1.0:
        dz.mul_(scale)
    return dz.to(out_dtype)
