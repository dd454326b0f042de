"""Target logits ``z_n[y_n] = W[y_n] · h_n + b[y_n]`` as an O(N·D) gather-dot (docs/methods.md, "target logits").

TPO's noised pass needs only the raw logit of the target token, so there is no sweep over the vocabulary: each row reads
its hidden state and ONE row of the LM head. Ignored rows (``labels == ignore_index``) read nothing and give 0.

Backward, with upstream gradient ``g [N]``::

    dh_n    = g_n · W[y_n]                  (a gather, written once per row: no atomics)
    dW[y]  += Σ_{n : y_n = y} g_n · h_n     (a scatter-add: several rows can share a target, so fp32 atomics)
    db[y]  += Σ_{n : y_n = y} g_n

dW and db are accumulated in fp32 (bf16 accumulation drifts, Liger #512), without a second ``[V, D]`` buffer:

- a caller that already holds an fp32 ``[V, D]`` accumulator (a fused loss whose clean pass wrote its dW there: the
  TPO noised pass) passes it as ``dw_acc`` (and ``db_acc``): the scatter adds into it and nothing ``[V, D]`` is
  allocated;
- fp32 inputs without ``dw_acc``: one fp32 ``[V, D]`` buffer, which is the output;
- 16-bit inputs without ``dw_acc``: the rows ``g_n · h_n`` (``[N, D]`` fp32, O(N·D)) are summed per target over a
  device-side sort and each sum is rounded once into the ``[V, D]`` output in the input dtype
  (``vpo.ops._sweep.scatter_rows``): no fp32 ``[V, D]`` buffer. :func:`target_logits_grad_rows` returns those rows
  for a caller that index_adds them itself.

Layout: ``h [N, D]``, ``W [V, D]``, ``labels [N]`` (int64 or int32), optional ``bias [V]``; h, W and bias share one dtype
(fp32, fp16 or bf16). Every tensor is made contiguous by the launchers, so row strides are ``D``.

The gather-dot itself is the ``@triton.jit`` helper ``_gather_dot_rows``; ``linear_logprobs.py`` reuses it for its
target logit, fused into the kernel that combines the vocabulary splits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["GatherConfig", "target_logits_fwd", "target_logits_bwd", "target_logits_grad_rows", "TargetLogitsTriton"]


# ----------------------------------------------------------------------------------------------------------------------
# Host-side helpers shared with linear_logprobs.py
# ----------------------------------------------------------------------------------------------------------------------


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output that a kernel fully writes is allocated here (the tests replace it by a NaN fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotuning() -> bool:
    """Autotune only when asked (``VPO_AUTOTUNE=1``) and never under the interpreter (multi-config autotune fails)."""
    return os.environ.get("VPO_AUTOTUNE", "0") == "1" and not _interpreting()


def _check_head(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor]):
    """The launchers' own checks (the public wrapper validates the rest): ranks, matching devices and dtypes."""
    if h.dim() != 2 or W.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"expected flat inputs h [N, D], W [V, D], labels [N]; got h {tuple(h.shape)}, W {tuple(W.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if h.shape[1] != W.shape[1] or labels.shape[0] != h.shape[0]:
        raise ValueError(
            f"h has shape {tuple(h.shape)}, W {tuple(W.shape)}, labels {tuple(labels.shape)}: expected "
            f"h.shape[1] == W.shape[1] and labels.shape[0] == h.shape[0]"
        )
    for name, t in (("W", W), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}: expected the same device")
    for name, t in (("W", W), ("bias", bias)):
        if t is not None and t.dtype != h.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but h has dtype {h.dtype}: expected the same dtype")
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"h must have dtype float32, float16 or bfloat16, got {h.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != W.shape[0]):
        raise ValueError(f"bias has shape {tuple(bias.shape)} but W has shape {tuple(W.shape)}: expected [V]")
    return (h.contiguous(), W.contiguous(), labels.contiguous(), None if bias is None else bias.contiguous())


@dataclass(frozen=True)
class GatherConfig:
    """Tile of the gather-dot kernels: ``block_n`` rows x ``block_d`` features per step."""

    block_n: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2


def default_gather_config(D: int) -> GatherConfig:
    if _interpreting():
        # The interpreter costs ~2 ms per program iteration whatever the tile: few, wide programs.
        return GatherConfig(block_n=32, block_d=min(128, triton.next_power_of_2(D)))
    # Memory bound: 8 rows x 512 features = 4096 fp32 products in flight per program (32 registers / thread at
    # 4 warps), 16-byte loads along D; N=4096 gives 512 programs. Not measured (no GPU in this session).
    return GatherConfig(block_n=8, block_d=min(512, triton.next_power_of_2(D)), num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _gather_dot_rows(h_ptr, w_ptr, b_ptr, offs_n, y, valid, D,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``z[n] = W[y[n]] · h[n] + b[y[n]]`` for a block of rows, fp32, 0 where ``valid`` is False.

    offs_n: [BLOCK_N] row indices into h; y: [BLOCK_N] int64 target ids (anything where not valid).
    """
    rows = offs_n.to(tl.int64)
    y = tl.where(valid, y, 0)  # keep masked-off addresses in range
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = valid[:, None] & (offs_d[None, :] < D)
        hv = tl.load(h_ptr + rows[:, None] * D + offs_d[None, :], mask=m, other=0.0)  # [BLOCK_N, BLOCK_D]
        wv = tl.load(w_ptr + y[:, None] * D + offs_d[None, :], mask=m, other=0.0)  # [BLOCK_N, BLOCK_D] rows W[y]
        acc += hv.to(tl.float32) * wv.to(tl.float32)  # products exact in fp32 for 16-bit inputs
    z = tl.sum(acc, axis=1)  # [BLOCK_N, BLOCK_D] -> [BLOCK_N]
    if HAS_BIAS:
        z += tl.load(b_ptr + y, mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, z, 0.0)


@triton.jit
def _target_logits_fwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, z_ptr, N, D, ignore_index,
                              HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N),) on axis 0, which has no 65535 limit.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    y = tl.load(labels_ptr + offs_n, mask=in_n, other=ignore_index).to(tl.int64)
    valid = in_n & (y != ignore_index)
    z = _gather_dot_rows(h_ptr, w_ptr, b_ptr, offs_n, y, valid, D, HAS_BIAS, BLOCK_N, BLOCK_D)
    tl.store(z_ptr + offs_n, z, mask=in_n)  # ignored rows get an explicit 0


@triton.jit
def _target_logits_bwd_kernel(g_ptr, h_ptr, w_ptr, labels_ptr, dh_ptr, dw_ptr, db_ptr, N, D, ignore_index,
                              COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N), cdiv(D, BLOCK_D)); D / BLOCK_D is small, well under axis 1's 65535.
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_n = offs_n < N
    in_d = offs_d < D
    y = tl.load(labels_ptr + offs_n, mask=in_n, other=ignore_index).to(tl.int64)
    valid = in_n & (y != ignore_index)
    y = tl.where(valid, y, 0)
    rows = offs_n.to(tl.int64)
    g = tl.load(g_ptr + offs_n, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_N]
    m = valid[:, None] & in_d[None, :]
    if COMPUTE_DH:
        # dh[n, d] = g[n] * W[y[n], d]; every row (ignored ones too, as 0) is written exactly once: no atomics.
        wv = tl.load(w_ptr + y[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        tl.store(dh_ptr + rows[:, None] * D + offs_d[None, :], g[:, None] * wv, mask=in_n[:, None] & in_d[None, :])
    if COMPUTE_DW:
        # dW[y[n], d] += g[n] * h[n, d]; rows sharing a target collide, hence fp32 atomics (relaxed: only the sum
        # matters, no ordering).
        hv = tl.load(h_ptr + rows[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        tl.atomic_add(dw_ptr + y[:, None] * D + offs_d[None, :], g[:, None] * hv, mask=m, sem="relaxed")
    if COMPUTE_DB:
        if pid_d == 0:
            tl.atomic_add(db_ptr + y, g, mask=valid, sem="relaxed")  # db[y[n]] += g[n]


_bwd_autotuned = None


def autotune_configs():
    """The ``VPO_AUTOTUNE=1`` search space of the backward kernel (also compiled by the AOT test)."""
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (1, 2, 3)]


def _get_bwd_autotuned():
    """Autotuned variant (``VPO_AUTOTUNE=1``): only num_warps/num_stages vary, so the grid stays the launcher's."""
    global _bwd_autotuned
    if _bwd_autotuned is None:
        _bwd_autotuned = triton.autotune(autotune_configs(), key=["D"], restore_value=["dw_ptr", "db_ptr"])(
            _target_logits_bwd_kernel)
    return _bwd_autotuned


# ----------------------------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------------------------


def target_logits_fwd(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      ignore_index: int = -100, *, config: Optional[GatherConfig] = None) -> torch.Tensor:
    """``z [N] fp32`` with ``z[n] = W[y_n]·h_n + b[y_n]`` (0 where ``labels == ignore_index``); O(N·D).

    h ``[N, D]``, W ``[V, D]``, labels ``[N]``, bias ``[V]`` or None. No host sync.
    """
    h, W, labels, bias = _check_head(h, W, labels, bias)
    N, D = h.shape
    z = _empty((N,), torch.float32, h.device)
    if N == 0:
        return z
    cfg = config or default_gather_config(D)
    grid = (triton.cdiv(N, cfg.block_n),)
    _target_logits_fwd_kernel[grid](
        h, W, bias if bias is not None else h, labels, z, N, D, ignore_index,
        HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return z


def target_logits_grad_rows(grad: torch.Tensor, h: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weight gradient of ``Σ_n grad[n] · z[n]`` as sparse rows: ``(rows [N] int64, values [N, D] fp32)`` with
    ``dW = zeros.index_add_(0, rows, values)`` (ignored rows: row 0, values 0). O(N·D); no host sync."""
    valid = labels != ignore_index
    rows = torch.where(valid, labels, 0).long()
    g = torch.where(valid, grad.to(torch.float32), torch.zeros((), device=grad.device))
    return rows, g[:, None] * h.to(torch.float32)


def target_logits_bwd(grad: torch.Tensor, h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, ignore_index: int = -100, *,
                      compute_dh: bool = True, compute_dw: bool = True, compute_db: Optional[bool] = None,
                      config: Optional[GatherConfig] = None, dw_acc: Optional[torch.Tensor] = None,
                      db_acc: Optional[torch.Tensor] = None,
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``Σ_n grad[n] · z[n]``: ``(dh [N, D], dW [V, D], db [V] or None)`` in the inputs' dtype.

    ``dh = grad · W[y]`` row by row; ``dW[y] += grad · h`` and ``db[y] += grad`` summed in fp32. Ignored rows get zero
    gradient and contribute nothing. A gradient whose ``compute_*`` flag is False is returned as None (``compute_db``
    defaults to ``bias is not None``). ``dw_acc`` / ``db_acc``: the caller's fp32 ``[V, D]`` / ``[V]`` accumulators,
    added into in place (fp32 atomics) and returned as they are — no ``[V, D]`` allocation (see the module docstring).
    """
    h, W, labels, bias = _check_head(h, W, labels, bias)
    if grad.device != h.device:
        raise ValueError(f"grad is on {grad.device} but h is on {h.device}: expected the same device")
    N, D = h.shape
    V = W.shape[0]
    compute_db = (bias is not None) if compute_db is None else (compute_db and bias is not None)
    grad = grad.contiguous().to(torch.float32)
    f32 = h.dtype == torch.float32
    for name, acc, shape in (("dw_acc", dw_acc, (V, D)), ("db_acc", db_acc, (V,))):
        if acc is not None and (acc.dtype != torch.float32 or tuple(acc.shape) != shape or acc.device != h.device
                                or not acc.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape {shape} on {h.device}, got "
                             f"{acc.dtype} {tuple(acc.shape)} on {acc.device}")
    dh = _empty((N, D), h.dtype, h.device) if compute_dh else None  # fully written (0 on ignored rows)
    # 16-bit weights without a caller accumulator: the sorted-segment sum below, not an fp32 [V, D] scatter target.
    rows_path = compute_dw and dw_acc is None and not f32
    dw = None
    if compute_dw and not rows_path:
        dw = dw_acc if dw_acc is not None else torch.zeros((V, D), dtype=torch.float32, device=h.device)
    db = None
    if compute_db:
        db = db_acc if db_acc is not None else torch.zeros((V,), dtype=torch.float32, device=h.device)
    if rows_path:
        from vpo.ops._sweep import scatter_rows  # the one fp32-summed, once-rounded scatter (shared with vpo.ops)

        rows, vals = target_logits_grad_rows(grad, h, labels, ignore_index)
        dw_out = scatter_rows(rows, vals, V, h.dtype)
        compute_dw = False
    if N > 0 and (compute_dh or compute_dw or compute_db):
        cfg = config or default_gather_config(D)
        grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(D, cfg.block_d))
        args = (grad, h, W, labels, dh if dh is not None else h, dw if dw is not None else grad,
                db if db is not None else grad, N, D, ignore_index)
        meta = dict(COMPUTE_DH=compute_dh, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
                    BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d)
        if _autotuning():
            _get_bwd_autotuned()[grid](*args, **meta)
        else:
            _target_logits_bwd_kernel[grid](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if rows_path:
        dw = dw_out
    elif not f32 and dw is not None and dw_acc is None:
        dw = dw.to(h.dtype)
    if not f32 and db is not None and db_acc is None:
        db = db.to(h.dtype)
    return dh, dw, db


class TargetLogitsTriton(torch.autograd.Function):
    """``TargetLogitsTriton.apply(h, W, labels, bias, ignore_index) -> z [N] fp32``; gradients to h, W, bias."""

    @staticmethod
    def forward(ctx, h, W, labels, bias=None, ignore_index=-100, config=None):
        z = target_logits_fwd(h, W, labels, bias, ignore_index, config=config)
        ctx.save_for_backward(h, W, labels, bias)
        ctx.ignore_index = ignore_index
        ctx.config = config
        ctx.set_materialize_grads(False)
        return z

    @staticmethod
    def backward(ctx, grad):
        h, W, labels, bias = ctx.saved_tensors
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        if grad is None or not (need_h or need_w or need_b):
            return None, None, None, None, None, None
        dh, dw, db = target_logits_bwd(grad, h, W, labels, bias, ctx.ignore_index, compute_dh=need_h,
                                       compute_dw=need_w, compute_db=need_b, config=ctx.config)
        return dh, dw, None, db, None, None
