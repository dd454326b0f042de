"""Per-token KL between the policy's and the reference's next-token distributions under linear LM heads, without
materializing either ``[N, V]`` logits tensor (docs/methods.md, Cat-PO and "token KL"). The math is derived once in
:mod:`vpo.ops.token_kl`; in short, with ``z = W h + b`` (policy), ``r = W_ref h_ref + b_ref`` (reference),
``d = z − r``, ``p = softmax(z)``::

    KL_n = E_p[d] − lse_z + lse_r                       ∂KL_n/∂z_n[v] = p[v] · (d[v] − E_p[d])

Inputs (flat): ``h, h_ref [N, D]``, ``W, W_ref [V, D]``, optional ``bias, ref_bias [V]``, optional ``labels [N]`` (used
only as a mask: ``ignore_index`` rows give 0 and zero gradient); one dtype (fp32 / fp16 / bf16) for all of them.
Gradients flow to h, W and bias only: the reference is frozen.

Forward
-------
``_kl_partial_kernel``, a 1-D grid of ``cdiv(N, BLOCK_N) · SPLIT_V`` programs in the grouped (L2-friendly) order of
``linear_logprobs._grouped_tile``, is ``linear_logprobs._lse_partial_kernel`` with two
logits tiles per ``[BLOCK_N, BLOCK_V]`` tile: ``z`` and ``r`` are built in ONE loop over D (``_logits_pair_tile``; when
the reference shares the policy's head, the common case in Cat-PO, each W chunk is loaded once and feeds both GEMMs).
One online sweep keeps five fp32 running statistics per row::

    m' = max(m, max_v z)       α = exp(m − m')       e = exp(z − m')
    s' = s·α + Σ_v e           u' = u·α + Σ_v e·d            (E_p[d] = u / s: u is rescaled with the policy's max)
    m_r' = max(m_r, max_v r)   s_r' = s_r·exp(m_r − m_r') + Σ_v exp(r − m_r')

and writes them to a ``[5, SPLIT_V, N]`` fp32 buffer; ``_kl_combine_kernel`` folds the splits (rescaling s, u by
``exp(m_s − M)``) and writes ``kl``, plus ``lse_z`` and ``E = E_p[d]`` for the backward. ``kl`` is formed as
``E − (M − M_r) − (log S − log S_r)``: the maxima cancel before the logs are added, which keeps fp32 accuracy at
|z| ~ 1e3, and gives 0 when policy == reference (both tiles are then identical and d = 0).

Backward
--------
``_kl_bwd_kernel``, one program per (N block, V block) tile, as ``linear_logprobs._lse_bwd_kernel``: recompute both
tiles over D, ``p = exp(z − lse_z)``, ``dz = g · p · (d − E)`` (no one-hot term), then sweep D again accumulating
``dz @ W`` into dh and ``dzᵀ @ h`` into dW with fp32 atomics, and the column sums of dz into db.

Cost, and the "≤ 1.6× the log-prob op" target: the work is GEMMs over [N, V, D]. linear_logprobs does 1 (forward) +
3 (backward: recompute, dh, dW) = 4 GEMM units; token KL does 2 + 4 = 6, i.e. 1.5×, and nothing else grows except
one more exp per element in the forward. The design keeps it there by (a) sharing the D loop (and, for a shared head,
the W tile loads) between the two GEMMs, (b) getting lse_z, lse_r and E_p[d] from one sweep instead of one sweep each,
(c) saving only ``lse_z`` and ``E`` ([N] each) for the backward, so the backward needs no third reduction, and (d) the
log-prob kernels' V split, backward tile and atomic grouping (the forward tile is narrower in V: two accumulators).

Ignored rows are handled as in ``linear_logprobs``: valid rows first (a stable argsort, no host sync), programs past the
valid count return at once.

The kernels are in :mod:`vpo_kernels.token_kl_kernels` (re-exported here); this module holds the config, the autotuned
variants, the host launchers and the autograd Function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton

from vpo_kernels import target_logits as _tgt
from vpo_kernels.linear_logprobs import TileConfig, _pick_split_v, _valid_rows_first
from vpo_kernels.target_logits import _autotuning, _interpreting
from vpo_kernels.token_kl_kernels import (  # noqa: F401
    _kl_bwd_kernel,
    _kl_combine_kernel,
    _kl_partial_kernel,
    _logits_pair_tile,
)

__all__ = ["TokenKLConfig", "token_kl_fwd", "token_kl_bwd", "TokenKLTriton"]

_N_STATS = 5  # m, s, u (policy) and m_r, s_r (reference) per row and V split


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenKLConfig:
    """Every kernel's tile for one call (field names as ``LinearLogprobsConfig``; no gather kernel here).
    ``split_v=None`` picks the vocabulary split to fill the device."""

    sweep: TileConfig  # forward online sweep (two logits tiles)
    bwd: TileConfig  # backward recompute (two logits tiles) + atomics
    split_v: Optional[int] = None
    group_n: int = 8  # N blocks per group in the tile order (forward: linear_logprobs._grouped_tile; backward)
    min_split_v: int = 16  # forward: at least this many V splits (see linear_logprobs._grouped_tile)
    block_n_combine: int = 128  # rows per program of the split-combine kernel (elementwise over [SPLIT_V, N])


def default_config(dtype: torch.dtype, N: int, V: int, D: int) -> TokenKLConfig:
    """The pinned configs. Not measured (no GPU in this session): the log-prob kernels' tiles, with the register and
    shared-memory budgets redone for the second GEMM (with or without a separate W_ref: the same tiles fit both);
    ``VPO_AUTOTUNE=1`` retunes BLOCK_D / warps / stages."""
    if _interpreting():
        # ~2 ms per program iteration whatever the tile: few programs, wide tiles; tl.dot needs every dim >= 16.
        bn = max(16, min(32, triton.next_power_of_2(N)))
        bv = max(16, min(64, triton.next_power_of_2(V)))
        bd = max(16, min(32, triton.next_power_of_2(D)))
        tile = TileConfig(bn, bv, bd)
        return TokenKLConfig(sweep=tile, bwd=tile, split_v=2, block_n_combine=64)
    # Every tile below was checked by tests/test_aot_compile.py (Triton 3.9, separate reference head with biases,
    # sm_80 and sm_90, registers and stack frame from the cubin). The earlier tiles (bf16 sweep 128x64x64, backward
    # 128x128x64; fp32 64x64x32 with 4 warps) spilled 400-3000 B per thread: two fp32 accumulators (z and r) plus
    # the exp / d temporaries do not fit next to 128-row tiles.
    if dtype == torch.float32:
        # fp32 runs in "ieee" precision (no tensor cores): a correctness path. Sweep 220 / 255 registers (sm_90 /
        # sm_80), backward 160 / 166, no spills.
        return TokenKLConfig(sweep=TileConfig(64, 64, 16, num_warps=8, num_stages=2),
                             bwd=TileConfig(32, 32, 16, num_warps=4, num_stages=2))
    # bf16/fp16 forward: two [64, 64] fp32 accumulators over 8 warps (wgmma m64n64 on sm_90): 186 / 244 registers,
    # no spills, 12 KB shared memory.
    sweep = TileConfig(64, 64, 32, num_warps=8, num_stages=3)
    # Backward: the same [64, 64] tile, then dz @ W and dzᵀ @ h per 32-wide D chunk: 243 registers on sm_90 (clean),
    # 24 B per thread of spills on sm_80 (listed in vpo_kernels/_aot.py known_spills).
    bwd = TileConfig(64, 64, 32, num_warps=8, num_stages=2)
    return TokenKLConfig(sweep=sweep, bwd=bwd)


# ----------------------------------------------------------------------------------------------------------------------
# Autotuned kernels (the kernels: vpo_kernels/token_kl_kernels.py)
# ----------------------------------------------------------------------------------------------------------------------


_autotuned = {}


def autotune_configs():
    """The ``VPO_AUTOTUNE=1`` search space of the sweep and backward kernels (also compiled by the AOT test)."""
    # 4 warps or BLOCK_D = 64 spilled at every tile (tests/test_aot_compile.py with VPO_AOT_FULL=1, Triton 3.9).
    return [triton.Config({"BLOCK_D": bd}, num_warps=8, num_stages=s) for bd in (16, 32) for s in (2, 3)]


def _tuned(name: str):
    """Autotuned variants (``VPO_AUTOTUNE=1``), as in linear_logprobs: only BLOCK_D / num_warps / num_stages vary
    (BLOCK_N, BLOCK_V fix the grid and the split buffers); the backward restores its atomic accumulators between
    trials."""
    if name not in _autotuned:
        cfgs = autotune_configs()
        if name == "sweep":
            _autotuned[name] = triton.autotune(cfgs, key=["V", "D"])(_kl_partial_kernel)
        else:
            _autotuned[name] = triton.autotune(cfgs, key=["V", "D"], restore_value=["dh_ptr", "dw_ptr", "db_ptr"])(
                _kl_bwd_kernel)
    return _autotuned[name]


# ----------------------------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------------------------


def _check_inputs(h, W, hr, Wr, labels, bias, ref_bias):
    """The launchers' own checks (the public wrapper validates the rest); returns contiguous tensors and whether the
    reference shares the policy's weight storage (then each W chunk is loaded once for both GEMMs)."""
    if h.dim() != 2 or W.dim() != 2 or hr.shape != h.shape or Wr.shape != W.shape or h.shape[1] != W.shape[1]:
        raise ValueError(
            f"expected flat inputs h, h_ref [N, D] and W, W_ref [V, D]; got h {tuple(h.shape)}, h_ref "
            f"{tuple(hr.shape)}, W {tuple(W.shape)}, W_ref {tuple(Wr.shape)}"
        )
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != h.shape[0]):
        raise ValueError(f"labels has shape {tuple(labels.shape)} but h has shape {tuple(h.shape)}: expected [N]")
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"h must have dtype float32, float16 or bfloat16, got {h.dtype}")
    for name, t in (("W", W), ("h_ref", hr), ("W_ref", Wr), ("labels", labels), ("bias", bias),
                    ("ref_bias", ref_bias)):
        if t is None:
            continue
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}: expected the same device")
        if name != "labels" and t.dtype != h.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but h has dtype {h.dtype}: expected the same dtype")
        if name in ("bias", "ref_bias") and (t.dim() != 1 or t.shape[0] != W.shape[0]):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but W has shape {tuple(W.shape)}: expected [V]")
    h, W, hr, Wr = h.contiguous(), W.contiguous(), hr.contiguous(), Wr.contiguous()
    shared = Wr.data_ptr() == W.data_ptr()  # same storage, both contiguous, same shape: the same matrix
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return h, W, hr, Wr, c(labels), c(bias), c(ref_bias), shared


def _rows(labels: Optional[torch.Tensor], ignore_index: int, N: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order [N] with valid rows first, n_valid as a 0-dim int32 device tensor); every row counts without labels."""
    if labels is None:
        return torch.arange(N, device=device), torch.full((), N, dtype=torch.int32, device=device)
    return _valid_rows_first(labels, ignore_index)


def token_kl_fwd(h: torch.Tensor, W: torch.Tensor, hr: torch.Tensor, Wr: Optional[torch.Tensor] = None,
                 labels: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 ref_bias: Optional[torch.Tensor] = None, ignore_index: int = -100, *,
                 config: Optional[TokenKLConfig] = None, scale: float = 1.0, softcap: float = 0.0,
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kl, lse, e)``, each ``[N]`` fp32 and 0 where ``labels == ignore_index``: the KL, the policy's logsumexp
    and ``E_p[z − r]`` (the last two are what the backward needs), of the transformed logits of both heads
    (``z' = scale·z``, then ``z' = softcap·tanh(z'/softcap)`` when ``softcap > 0``; ``vpo.ops.epilogue``).

    h, hr ``[N, D]``; W, Wr ``[V, D]`` (``Wr=None``: the policy's W); labels ``[N]`` or None (every row counts);
    bias, ref_bias ``[V]`` or None (taken as given: the public wrapper applies the defaults). Extra memory: a
    ``[5, SPLIT_V, N]`` fp32 buffer and the row order; nothing O(N·V). No host sync.
    """
    h, W, hr, Wr, labels, bias, ref_bias, shared = _check_inputs(h, W, hr, W if Wr is None else Wr, labels, bias,
                                                                 ref_bias)
    N, D = h.shape
    V = W.shape[0]
    dev = h.device
    kl = _tgt._empty((N,), torch.float32, dev)
    lse = _tgt._empty((N,), torch.float32, dev)
    e_d = _tgt._empty((N,), torch.float32, dev)
    if N == 0:
        return kl, lse, e_d
    cfg = config or default_config(h.dtype, N, V, D)
    order, n_valid = _rows(labels, ignore_index, N, dev)
    split = _pick_split_v(cfg, N, V, dev)
    part = _tgt._empty((_N_STATS, split, N), torch.float32, dev)
    sw = cfg.sweep
    grid = (triton.cdiv(N, sw.block_n) * split,)
    args = (h, W, bias if bias is not None else h, hr, Wr, ref_bias if ref_bias is not None else h,
            order, n_valid, part, N, V, D, split, float(scale), float(softcap) if softcap else 1.0)
    # (a bias pointer is never read when its HAS_* flag is False)
    meta = dict(HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, SHARED_W=shared,
                SOFTCAP=bool(softcap), IEEE=h.dtype == torch.float32, GROUP_N=cfg.group_n, BLOCK_N=sw.block_n,
                BLOCK_V=sw.block_v)
    if _autotuning():
        _tuned("sweep")[grid](*args, **meta)
    else:
        _kl_partial_kernel[grid](*args, **meta, BLOCK_D=sw.block_d, num_warps=sw.num_warps, num_stages=sw.num_stages)
    bnc = cfg.block_n_combine
    _kl_combine_kernel[(triton.cdiv(N, bnc),)](
        part, labels if labels is not None else order, kl, lse, e_d, N, ignore_index, split,
        HAS_LABELS=labels is not None, BLOCK_N=bnc, num_warps=4,
    )
    return kl, lse, e_d


def token_kl_bwd(grad_kl: torch.Tensor, h: torch.Tensor, W: torch.Tensor, hr: torch.Tensor, Wr: Optional[torch.Tensor],
                 labels: Optional[torch.Tensor], bias: Optional[torch.Tensor], ref_bias: Optional[torch.Tensor],
                 lse: torch.Tensor, e_d: torch.Tensor, ignore_index: int = -100, *, compute_dh: bool = True,
                 compute_dw: bool = True, compute_db: Optional[bool] = None, config: Optional[TokenKLConfig] = None,
                 scale: float = 1.0, softcap: float = 0.0,
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients ``(dh [N, D], dW [V, D], db [V])`` of ``Σ_n grad_kl[n] · kl[n]`` with respect to the POLICY's h, W,
    bias (``lse``, ``e_d`` from :func:`token_kl_fwd`). Returned in the inputs' dtype; a gradient whose ``compute_*``
    flag is False (``compute_db`` defaults to ``bias is not None``) is None. Ignored rows get zero gradient. Extra
    memory: fp32 accumulators for dh / dW / db (cast at the end for 16-bit inputs). ``scale``, ``softcap``: the
    forward's logit transform.
    """
    h, W, hr, Wr, labels, bias, ref_bias, shared = _check_inputs(h, W, hr, W if Wr is None else Wr, labels, bias,
                                                                 ref_bias)
    N, D = h.shape
    V = W.shape[0]
    dev = h.device
    compute_db = (bias is not None) if compute_db is None else (compute_db and bias is not None)
    for name, t in (("grad_kl", grad_kl), ("lse", lse), ("e_d", e_d)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but h is on {dev}: expected the same device")
    grad_kl = grad_kl.contiguous().to(torch.float32)
    lse = lse.contiguous().to(torch.float32)
    e_d = e_d.contiguous().to(torch.float32)
    # fp32 accumulators (atomics need a zero start); for fp32 inputs they are the outputs.
    dh = torch.zeros((N, D), dtype=torch.float32, device=dev) if compute_dh else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=dev) if compute_dw else None
    db = torch.zeros((V,), dtype=torch.float32, device=dev) if compute_db else None
    if N > 0 and (compute_dh or compute_dw or compute_db):
        cfg = config or default_config(h.dtype, N, V, D)
        bw = cfg.bwd
        order, n_valid = _rows(labels, ignore_index, N, dev)
        grid = (triton.cdiv(N, bw.block_n) * triton.cdiv(V, bw.block_v),)
        args = (h, W, bias if bias is not None else h, hr, Wr, ref_bias if ref_bias is not None else h,
                order, n_valid, lse, e_d, grad_kl,
                dh if dh is not None else lse, dw if dw is not None else lse, db if db is not None else lse,
                N, V, D, float(scale), float(softcap) if softcap else 1.0)
        meta = dict(HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, SHARED_W=shared,
                    SOFTCAP=bool(softcap), IEEE=h.dtype == torch.float32, COMPUTE_DH=compute_dh, COMPUTE_DW=compute_dw,
                    COMPUTE_DB=compute_db, BLOCK_N=bw.block_n, BLOCK_V=bw.block_v, GROUP_N=cfg.group_n)
        if _autotuning():
            _tuned("bwd")[grid](*args, **meta)
        else:
            _kl_bwd_kernel[grid](*args, **meta, BLOCK_D=bw.block_d, num_warps=bw.num_warps, num_stages=bw.num_stages)
    if h.dtype != torch.float32:
        dh = dh.to(h.dtype) if dh is not None else None
        dw = dw.to(h.dtype) if dw is not None else None
        db = db.to(h.dtype) if db is not None else None
    return dh, dw, db


class TokenKLTriton(torch.autograd.Function):
    """``TokenKLTriton.apply(h, W, hr, Wr, labels, bias, ref_bias, ignore_index, config=None, scale=1.0, softcap=0.0)
    -> kl [N] fp32`` (of the transformed logits, see :func:`token_kl_fwd`).

    Argument order as the public ``linear_token_kl`` (flat); ``labels`` may be None. Saves ``lse`` and ``E_p[z − r]``
    ([N] fp32 each) for the backward; gradients flow to h, W and bias only (None for the frozen reference's tensors).
    """

    @staticmethod
    def forward(ctx, h, W, hr, Wr, labels=None, bias=None, ref_bias=None, ignore_index=-100, config=None, scale=1.0,
                softcap=0.0):
        scale, softcap = float(scale), float(softcap or 0.0)
        kl, lse, e_d = token_kl_fwd(h, W, hr, Wr, labels, bias, ref_bias, ignore_index, config=config, scale=scale,
                                    softcap=softcap)
        ctx.save_for_backward(h, W, hr, Wr, labels, bias, ref_bias, lse, e_d)
        ctx.ignore_index = ignore_index
        ctx.config = config
        ctx.scale, ctx.softcap = scale, softcap
        ctx.set_materialize_grads(False)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        h, W, hr, Wr, labels, bias, ref_bias, lse, e_d = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        need_b = ctx.needs_input_grad[5]
        if grad_kl is None or not (need_h or need_w or need_b):
            return (None,) * 11
        dh, dw, db = token_kl_bwd(grad_kl, h, W, hr, Wr, labels, bias, ref_bias, lse, e_d, ctx.ignore_index,
                                  compute_dh=need_h, compute_dw=need_w, compute_db=need_b, config=ctx.config,
                                  scale=ctx.scale, softcap=ctx.softcap)
        return dh, dw, None, None, None, db, None, None, None, None, None
