"""Per-token log-probs under a linear LM head without materializing the logits (docs/methods.md, "linear log-probs").

Inputs (flat): ``h [N, D]``, ``W [V, D]``, ``labels [N]`` (``ignore_index`` = no target), optional ``bias [V]``;
h, W, bias share one dtype (fp32 / fp16 / bf16). Outputs, all fp32 ``[N]`` and 0 on ignored rows::

    z_n      = W h_n + b                       (never stored: [BLOCK_N, BLOCK_V] tiles live in registers)
    lse_n    = log Σ_v exp z_n[v]
    tgt_n    = z_n[y_n]                        (gather-dot, O(N·D): target_logits._gather_dot_rows)
    logp_n   = tgt_n − lse_n

Forward
-------
``_lse_partial_kernel``, a 1-D grid of ``cdiv(N, BLOCK_N) · SPLIT_V`` programs: program (i, s) owns rows
``i*BLOCK_N ...`` and the s-th contiguous run of vocabulary tiles; the program ids are grouped (``_grouped_tile``) so
that the programs resident at one time share both their h blocks and their W tiles in L2. For each tile it forms
``z = h_blk @ W_tileᵀ (+ b)`` looping over D, and keeps the online logsumexp ``(m, s)``: ``m' = max(m, max_v z)``,
``s' = s·exp(m − m') + Σ_v exp(z − m')``. It writes the split's ``(m, s)`` to ``[SPLIT_V, N]`` fp32 buffers; ``_lse_combine_kernel`` (grid over N) folds them,
``lse = M + log Σ_s s_s·exp(m_s − M)`` with ``M = max_s m_s``, computes the target logit and writes the outputs.
Splitting V lets a small N (e.g. one preference batch, N = 2B·T ~ 4k) still fill 132 SMs.

Backward
--------
With upstream gradients ``g_n = ∂L/∂logp_n`` and ``t_n = ∂L/∂tgt_n`` and ``p_n = softmax(z_n)``::

    ∂logp_n/∂z_n[v] = 1[v = y_n] − p_n[v]        ∂tgt_n/∂z_n[v] = 1[v = y_n]
    dz_n[v] = −g_n · p_n[v] + (g_n + t_n) · 1[v = y_n]
    dh_n = Σ_v dz_n[v] W[v] = dz_n @ W           dW = dzᵀ @ h            db = Σ_n dz_n

``p`` is recomputed from the saved lse: ``p = exp(z − lse)`` (one more pass of the forward's matmul). ``_lse_bwd_kernel``,
one program per (N block, V block) tile: recompute the [BLOCK_N, BLOCK_V] logits over D, form dz (the one-hot term is
folded in: it lives in exactly one V tile, and costs a compare per element), then sweep D again accumulating
``dz @ W[tile, d-chunk]`` into dh and ``dzᵀ @ h[blk, d-chunk]`` into dW with fp32 atomics (every dh element gets
``V / BLOCK_V`` adds, every dW element ``N / BLOCK_N``), and the column sums of dz into db. Accumulation is fp32
throughout (bf16 accumulation diverges, Liger #512); the fp32 buffers are cast to the input dtype at the end.
When only ``t`` flows (``g`` is None), ``dz = t · 1[v = y]`` and the backward is ``target_logits_bwd``: no vocab sweep.

Ignored rows
------------
The launchers order rows so valid rows come first (a stable argsort of ``labels == ignore_index``) and pass the valid
count as a device scalar: programs whose rows all lie past it return at once, and the others load h through the order
array. Nothing syncs with the host. Ignored rows get 0 outputs and 0 gradients.

The kernels are in :mod:`vpo_kernels.linear_logprobs_kernels` (re-exported here); this module holds the configs, the
autotuned variants, the host launchers and the autograd Function.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import triton

from vpo_kernels import target_logits as _tgt
from vpo_kernels.linear_logprobs_kernels import (  # noqa: F401
    _dot,
    _grouped_tile,
    _logits_tile,
    _lse_bwd_kernel,
    _lse_combine_kernel,
    _lse_partial_kernel,
)
from vpo_kernels.target_logits import GatherConfig, _autotuning, _check_head, _interpreting

__all__ = [
    "TileConfig",
    "LinearLogprobsConfig",
    "linear_logprobs_fwd",
    "linear_logprobs_bwd",
    "LinearLogprobsTriton",
]


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """A [block_n, block_v] logits tile built from block_d-wide chunks of h and W."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class LinearLogprobsConfig:
    """Every kernel's tile for one call. ``split_v=None`` picks the vocabulary split to fill the device."""

    sweep: TileConfig  # forward online-logsumexp kernel
    bwd: TileConfig  # backward recompute + atomics kernel
    gather: GatherConfig = field(default_factory=lambda: GatherConfig(block_n=8, block_d=512))
    split_v: Optional[int] = None
    group_n: int = 8  # N blocks per group in the tile order (forward: _grouped_tile; backward: _lse_bwd_kernel)
    min_split_v: int = 16  # forward: at least this many V splits, so a group spans ~16 W streams (see _grouped_tile)


def default_config(dtype: torch.dtype, N: int, V: int, D: int) -> LinearLogprobsConfig:
    """The pinned configs. None was timed (no GPU in the session that wrote them): the GPU tiles were checked by
    compiling ahead of time for sm_90 with Triton 3.9 (``triton.compile(..., target=GPUTarget("cuda", 90, 32))``) for
    wgmma use, cp.async pipelining, shared memory and register counts without spills; ``VPO_AUTOTUNE=1`` retunes
    BLOCK_D / warps / stages on the real device."""
    gather = _tgt.default_gather_config(D)
    if _interpreting():
        # ~2 ms per program iteration whatever the tile: few programs, wide tiles; tl.dot needs every dim >= 16.
        bn = max(16, min(32, triton.next_power_of_2(N)))
        bv = max(16, min(64, triton.next_power_of_2(V)))
        bd = max(16, min(32, triton.next_power_of_2(D)))
        tile = TileConfig(bn, bv, bd)
        return LinearLogprobsConfig(sweep=tile, bwd=tile, gather=gather, split_v=2)
    if dtype == torch.float32:
        # fp32 runs in "ieee" precision (FMA, no tensor cores): a correctness path. 64x64x32 with 8 warps compiles to
        # ~115-130 registers; with 4 warps the backward spilled 4.5 KB to local memory.
        tile = TileConfig(64, 64, 32, num_warps=8, num_stages=2)
        return LinearLogprobsConfig(sweep=tile, bwd=tile, gather=gather)
    # Checked by tests/test_aot_compile.py (Triton 3.9, HAS_BIAS, sm_80 and sm_90; registers / stack frame from the
    # cubin): the earlier 128x128x64 sweep (8 warps, 3 stages) and 128x128x32 backward spilled 256-544 B per thread
    # (255 registers) on both architectures.
    # bf16/fp16 sweep: [128, 128] fp32 accumulator over 32-wide D chunks, 8 warps = two m64n128 wgmma warpgroups on
    # sm_90: 237 registers (sm_90) / 254 (sm_80), no spills, 16 KB shared memory.
    sweep = TileConfig(128, 128, 32, num_warps=8, num_stages=3)
    # Backward: dz [128, 64] live in registers (operand of dz @ W) and shared memory (dzᵀ for dzᵀ @ h) while the
    # [128, 32] / [64, 32] products are formed per D chunk: 254-255 registers, no spills, 32 KB shared. BLOCK_V = 128
    # spilled; the price of 64 is 2x the dh atomics (each dh element gets V / BLOCK_V adds) — impl="gemm" has none.
    bwd = TileConfig(128, 64, 32, num_warps=8, num_stages=3)
    return LinearLogprobsConfig(sweep=sweep, bwd=bwd, gather=gather)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _pick_split_v(cfg: LinearLogprobsConfig, N: int, V: int, device: torch.device) -> int:
    """V splits so that (N blocks) x (splits) is about two waves; every split gets at least one V tile."""
    n_vtiles = triton.cdiv(V, cfg.sweep.block_v)
    if cfg.split_v is not None:
        split = cfg.split_v
    else:
        split = max(cfg.min_split_v, triton.cdiv(2 * _num_sms(device), triton.cdiv(N, cfg.sweep.block_n)))
    split = max(1, min(split, n_vtiles))
    return triton.cdiv(n_vtiles, triton.cdiv(n_vtiles, split))  # drop splits that would own no tile


def _valid_rows_first(labels: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order [N] int64 with valid rows first, n_valid as a 0-dim int32 device tensor). No host sync."""
    ignored = labels == ignore_index
    order = torch.argsort(ignored.to(torch.int8), stable=True)
    n_valid = (~ignored).sum(dtype=torch.int32)
    return order, n_valid


# ----------------------------------------------------------------------------------------------------------------------
# Autotuned kernels (the kernels: vpo_kernels/linear_logprobs_kernels.py)
# ----------------------------------------------------------------------------------------------------------------------


_autotuned = {}


def autotune_configs():
    """The ``VPO_AUTOTUNE=1`` search space of the sweep and backward kernels (also compiled by the AOT test)."""
    # 4 warps or BLOCK_D = 64 spilled 250-2600 B per thread at the pinned tiles (tests/test_aot_compile.py with
    # VPO_AOT_FULL=1, Triton 3.9, sm_80 and sm_90): the space is the D chunk and the pipeline depth at 8 warps.
    return [triton.Config({"BLOCK_D": bd}, num_warps=8, num_stages=s) for bd in (16, 32) for s in (2, 3, 4)]


def _tuned(name: str):
    """Autotuned variants (``VPO_AUTOTUNE=1``). Only BLOCK_D / num_warps / num_stages vary: BLOCK_N and BLOCK_V fix
    the grid and the split buffers, so they stay pinned. The backward restores its atomic accumulators between trials
    (``restore_value``: correct whether or not the Triton version resets after the last trial)."""
    if name not in _autotuned:
        cfgs = autotune_configs()
        if name == "sweep":
            _autotuned[name] = triton.autotune(cfgs, key=["V", "D"])(_lse_partial_kernel)
        else:
            _autotuned[name] = triton.autotune(cfgs, key=["V", "D"], restore_value=["dh_ptr", "dw_ptr", "db_ptr"])(
                _lse_bwd_kernel)
    return _autotuned[name]


# ----------------------------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------------------------


def linear_logprobs_fwd(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        ignore_index: int = -100, *, config: Optional[LinearLogprobsConfig] = None,
                        scale: float = 1.0, softcap: float = 0.0,
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, target_logit, lse)``, each ``[N]`` fp32 and 0 where ``labels == ignore_index``, of the transformed
    logits ``z' = scale·z``, ``z' = softcap·tanh(z'/softcap)`` when ``softcap > 0`` (``vpo.ops.epilogue``).

    h ``[N, D]``, W ``[V, D]``, labels ``[N]``, bias ``[V]`` or None. Extra memory: two ``[SPLIT_V, N]`` fp32 buffers
    and the row order; nothing O(N·V). No host sync.
    """
    h, W, labels, bias = _check_head(h, W, labels, bias)
    N, D = h.shape
    V = W.shape[0]
    dev = h.device
    logp = _tgt._empty((N,), torch.float32, dev)
    tgt = _tgt._empty((N,), torch.float32, dev)
    lse = _tgt._empty((N,), torch.float32, dev)
    if N == 0:
        return logp, tgt, lse
    cfg = config or default_config(h.dtype, N, V, D)
    order, n_valid = _valid_rows_first(labels, ignore_index)
    split = _pick_split_v(cfg, N, V, dev)
    m_part = _tgt._empty((split, N), torch.float32, dev)
    s_part = _tgt._empty((split, N), torch.float32, dev)
    b_arg = bias if bias is not None else h  # never read when HAS_BIAS is False
    ieee = h.dtype == torch.float32
    sw = cfg.sweep
    grid = (triton.cdiv(N, sw.block_n) * split,)
    cap = float(softcap) if softcap else 1.0
    args = (h, W, b_arg, order, n_valid, m_part, s_part, N, V, D, split, float(scale), cap)
    meta = dict(HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), IEEE=ieee, GROUP_N=cfg.group_n,
                BLOCK_N=sw.block_n, BLOCK_V=sw.block_v)
    if _autotuning():
        _tuned("sweep")[grid](*args, **meta)
    else:
        _lse_partial_kernel[grid](*args, **meta, BLOCK_D=sw.block_d, num_warps=sw.num_warps,
                                  num_stages=sw.num_stages)
    gc = cfg.gather
    _lse_combine_kernel[(triton.cdiv(N, gc.block_n),)](
        m_part, s_part, h, W, b_arg, labels, logp, tgt, lse, N, D, ignore_index, split, float(scale), cap,
        HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), BLOCK_N=gc.block_n, BLOCK_D=gc.block_d,
        num_warps=gc.num_warps, num_stages=gc.num_stages,
    )
    return logp, tgt, lse


def linear_logprobs_bwd(grad_logp: Optional[torch.Tensor], grad_target: Optional[torch.Tensor], h: torch.Tensor,
                        W: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor], lse: torch.Tensor,
                        ignore_index: int = -100, *, compute_dh: bool = True, compute_dw: bool = True,
                        compute_db: Optional[bool] = None, config: Optional[LinearLogprobsConfig] = None,
                        scale: float = 1.0, softcap: float = 0.0, target: Optional[torch.Tensor] = None,
                        ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients ``(dh [N, D], dW [V, D], db [V])`` of ``Σ_n grad_logp[n]·logp[n] + grad_target[n]·tgt[n]``.

    ``scale``, ``softcap``: the forward's logit transform (``dz = dz'·scale·(1 − (z'/cap)²)``); with a cap, the
    target-only backward (``grad_logp`` None) needs ``target`` ``[N]``, the forward's (transformed) target logits.

    Either upstream gradient may be None (treated as 0); ``lse`` is the forward's. Returned in the inputs' dtype;
    a gradient whose ``compute_*`` flag is False (``compute_db`` defaults to ``bias is not None``) is None. Ignored rows
    get zero gradient. Extra memory: fp32 accumulators for dh / dW / db (cast at the end for 16-bit inputs).
    """
    h, W, labels, bias = _check_head(h, W, labels, bias)
    N, D = h.shape
    V = W.shape[0]
    dev = h.device
    compute_db = (bias is not None) if compute_db is None else (compute_db and bias is not None)
    for name, t in (("grad_logp", grad_logp), ("grad_target", grad_target), ("lse", lse)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but h is on {dev}: expected the same device")
    if grad_logp is None:
        if grad_target is None:
            grad_target = torch.zeros((N,), dtype=torch.float32, device=dev)
        elif softcap or scale != 1.0:  # ∂z'_y/∂z_y per row, O(N)
            grad_target = grad_target.to(torch.float32) * scale
            if softcap:
                if target is None:
                    raise ValueError("linear_logprobs_bwd: softcap needs the forward's target logits (target=)")
                grad_target = grad_target * (1.0 - (target.to(torch.float32) / softcap) ** 2)
        # dz = t · 1[v = y]: the target-logit gather backward, O(N·D), no vocabulary sweep.
        return _tgt.target_logits_bwd(grad_target, h, W, labels, bias, ignore_index, compute_dh=compute_dh,
                                      compute_dw=compute_dw, compute_db=compute_db,
                                      config=None if config is None else config.gather)
    grad_logp = grad_logp.contiguous().to(torch.float32)
    grad_target = None if grad_target is None else grad_target.contiguous().to(torch.float32)
    lse = lse.contiguous().to(torch.float32)
    # fp32 accumulators (atomics need a zero start); for fp32 inputs they are the outputs.
    dh = torch.zeros((N, D), dtype=torch.float32, device=dev) if compute_dh else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=dev) if compute_dw else None
    db = torch.zeros((V,), dtype=torch.float32, device=dev) if compute_db else None
    if N > 0 and (compute_dh or compute_dw or compute_db):
        cfg = config or default_config(h.dtype, N, V, D)
        bw = cfg.bwd
        order, n_valid = _valid_rows_first(labels, ignore_index)
        grid = (triton.cdiv(N, bw.block_n) * triton.cdiv(V, bw.block_v),)
        args = (h, W, bias if bias is not None else h, labels, order, n_valid, lse, grad_logp,
                grad_target if grad_target is not None else grad_logp,
                dh if dh is not None else lse, dw if dw is not None else lse, db if db is not None else lse,
                N, V, D, float(scale), float(softcap) if softcap else 1.0)
        meta = dict(HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), HAS_T=grad_target is not None,
                    IEEE=h.dtype == torch.float32,
                    COMPUTE_DH=compute_dh, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
                    BLOCK_N=bw.block_n, BLOCK_V=bw.block_v, GROUP_N=cfg.group_n)
        if _autotuning():
            _tuned("bwd")[grid](*args, **meta)
        else:
            _lse_bwd_kernel[grid](*args, **meta, BLOCK_D=bw.block_d, num_warps=bw.num_warps,
                                  num_stages=bw.num_stages)
    if h.dtype != torch.float32:
        dh = dh.to(h.dtype) if dh is not None else None
        dw = dw.to(h.dtype) if dw is not None else None
        db = db.to(h.dtype) if db is not None else None
    return dh, dw, db


class LinearLogprobsTriton(torch.autograd.Function):
    """``LinearLogprobsTriton.apply(h, W, labels, bias, ignore_index, config=None, scale=1.0, softcap=0.0)
    -> (logp [N] fp32, target_logit [N] fp32)`` of the transformed logits (see :func:`linear_logprobs_fwd`).

    Saves lse and the target logits ([N] fp32 each) for the backward; gradients flow to h, W and bias (None where not
    required). Either output's gradient may be absent.
    """

    @staticmethod
    def forward(ctx, h, W, labels, bias=None, ignore_index=-100, config=None, scale=1.0, softcap=0.0):
        scale, softcap = float(scale), float(softcap or 0.0)
        logp, tgt, lse = linear_logprobs_fwd(h, W, labels, bias, ignore_index, config=config, scale=scale,
                                             softcap=softcap)
        ctx.save_for_backward(h, W, labels, bias, lse, tgt)
        ctx.ignore_index = ignore_index
        ctx.config = config
        ctx.scale, ctx.softcap = scale, softcap
        ctx.set_materialize_grads(False)  # a None gradient means: skip that term (and the vocab sweep if logp's)
        return logp, tgt

    @staticmethod
    def backward(ctx, grad_logp, grad_target):
        h, W, labels, bias, lse, tgt = ctx.saved_tensors
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        nones = (None,) * 4  # ignore_index, config, scale, softcap
        if (grad_logp is None and grad_target is None) or not (need_h or need_w or need_b):
            return (None,) * 4 + nones
        dh, dw, db = linear_logprobs_bwd(grad_logp, grad_target, h, W, labels, bias, lse, ctx.ignore_index,
                                         compute_dh=need_h, compute_dw=need_w, compute_db=need_b, config=ctx.config,
                                         scale=ctx.scale, softcap=ctx.softcap, target=tgt)
        return (dh, dw, None, db) + nones
