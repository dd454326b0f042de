"""Per-token log-probs and target logits under a linear LM head, without materializing the logits.

docs/methods.md, "Kernel contracts": for ``h [N, D]``, ``W [V, D]``, optional ``b [V]`` and ``labels [N]``,

    z_i       = W h_i + b                                   (never held as a whole [N, V] tensor)
    lse_i     = logsumexp_v z_i[v]
    logp_i    = z_i[y_i] - lse_i
    tgt_i     = z_i[y_i] = W[y_i] · h_i + b[y_i]            (a gather-dot, O(N·D))

Forward (``impl="torch"`` and ``"gemm"``: one sweep, :mod:`vpo.ops._sweep`). The vocabulary is swept in chunks of
``C`` columns; each chunk's tile ``z_c = h @ W_c.T`` (``[N, C]``, all rows, one GEMM in the input dtype) updates an
online logsumexp::

    m' = max(m, max_v z_c)          s' = s · exp(m − m') + Σ_v exp(z_c − m')          lse = m + log s

Backward. With upstream gradients ``g_logp`` and ``g_tgt`` (either may be absent),

    ∂L/∂z_i[v] = −g_logp,i · p_i[v] + (g_logp,i + g_tgt,i) · 1[v = y_i],     p_i = exp(z_i − lse_i)

recomputed chunk by chunk, the one-hot folded into the same tile: ``dz_c``; ``dh += dz_c @ W_c`` (fp32),
``dW[v0:v1] = dz_cᵀ @ h`` (one complete GEMM per chunk, no atomics), ``db_c = Σ_rows dz_c``. When only the target
logit receives a gradient the vocabulary sweep is skipped: ``dh = g_tgt · W[y]`` and a scatter of ``g_tgt · h`` into
``dW`` rows (:func:`vpo.ops._sweep.scatter_rows`, summed in fp32, O(N·D)).

Cost, in GEMM passes over N·D·V (2·N·D·V FLOPs each): forward 1; backward 3 (recompute, dh, dW; dW skipped when the
weight needs no gradient, dh when the hidden states need none) — 4 in all, 4/3 of the 3 passes of materialized logits
(whose forward logits are kept, O(N·V) memory). ``target_logits``: no pass, O(N·D).

Extra memory: one chunk's tiles, ``N·C·(a + e)`` bytes at most (``a`` = 4, 8 for float64; ``e`` = the input element
size), plus ``[N]`` statistics and, in the backward, ``dh`` in fp32 (``N·D·4`` bytes). ``C`` comes from the budget
(:func:`vpo.ops._sweep.vocab_chunk`: ``chunk_budget_mb=``, ``VPO_CHUNK_BUDGET_MB``, default 128 MiB) or
``VPO_TORCH_CHUNK``. ``dW`` is written chunk by chunk in the weight's dtype: no fp32 ``[V, D]`` buffer.

The two impls share the sweep and differ in the elementwise steps: ``"torch"`` (plain torch, float64-capable, the
reference; on CPU the GEMMs run in the input dtype too) and ``"gemm"`` (small fused Triton kernels,
``vpo_kernels.epilogue``; cuBLAS GEMMs in bf16/fp16 with fp32 accumulation). ``"triton"`` is the fully fused kernel
(``vpo_kernels.linear_logprobs``: least memory, atomics in the backward).

Precision: statistics and outputs are float32 (float64 for float64 inputs); input gradients come back in the inputs'
dtypes. Ignored rows (``labels == ignore_index``) are computed and masked, with no host sync: they output 0 and
receive exactly zero gradient (their hidden states must be finite).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from vpo._heads import check_head_transform, check_ignore_index, check_labels_like, check_linear_head
from vpo.distributed import unshard_head
from vpo.ops._common import acc_dtype as _acc_dtype
from vpo._validate import assert_labels_in_range
from vpo.ops._common import epilogue, resolve_impl, row_targets
from vpo.ops import epilogue as ep
from vpo.ops._sweep import (  # noqa: F401  (CHUNK_ENV, DEFAULT_BUDGET_MB: part of this module's documented policy)
    BUDGET_ENV,
    operand_dtype,
    CHUNK_ENV,
    DEFAULT_BUDGET_MB,
    backward_sweep,
    forward_sweep,
    scatter_rows,
    target_dot,
    vocab_chunk,
)


def chunk_size(n_rows: int, vocab: int, override: Optional[int] = None, *, dtype: torch.dtype = torch.float32,
               tiles: int = 1, budget_mb=None) -> int:
    """Vocabulary columns per chunk (:func:`vpo.ops._sweep.vocab_chunk`): ``override``, else ``$VPO_TORCH_CHUNK``,
    else the memory budget."""
    return vocab_chunk(n_rows, vocab, dtype, tiles=tiles, chunk=override, budget_mb=budget_mb)


def _sparse_grads(h, W, b, y, coef, need_h, need_W, need_b):
    """The one-hot part alone (``dz = coef · 1[v = y]``): ``dh = coef · W[y]``, ``dW[y] += coef · h``,
    ``db[y] += coef``; O(N·D), no vocabulary sweep. ``coef`` is 0 on ignored rows."""
    acc = coef.dtype
    dh = coef[:, None] * W[y].to(acc) if need_h else None
    dW = scatter_rows(y, coef[:, None] * h.to(acc), W.shape[0], W.dtype) if need_W else None
    db = torch.zeros(W.shape[0], dtype=acc, device=h.device).index_add_(0, y, coef) if need_b else None
    return dh, dW, db


class LinearLogprobsFunction(torch.autograd.Function):
    """``(logp [N], target_logit [N])`` for flat ``h [N, D]``, ``W [V, D]``, ``labels [N]``, ``bias [V] | None``.

    ``apply(h, W, labels, bias, ignore_index, chunk=None, impl="torch", budget_mb=None, softcap=0.0, scale=1.0)``:
    ``chunk`` overrides the vocabulary chunk size, ``impl`` picks the epilogue (``"torch"`` | ``"gemm"``),
    ``budget_mb`` the chunk budget, ``softcap``/``scale`` the logits transform of :mod:`vpo.ops.epilogue` (the
    target logit returned is the transformed one). Never allocates an ``[N, V]`` tensor and never syncs with the
    host; see the module docstring.
    """

    @staticmethod
    def forward(ctx, h, W, labels, bias, ignore_index, chunk=None, impl="torch", budget_mb=None, softcap=0.0,
                scale=1.0):
        ctx.set_materialize_grads(False)
        N, V = h.shape[0], W.shape[0]
        acc = _acc_dtype(h.dtype)
        backend = epilogue(impl)
        valid, y = row_targets(labels, ignore_index, N, h.device)
        C = chunk_size(N, V, chunk, dtype=h.dtype, budget_mb=budget_mb)
        h_op = h.to(operand_dtype(h))

        st = ep.new_stats(N, acc, h.device)
        forward_sweep([(h_op, W, bias)], C, lambda tiles, bs, v0: ep.tile_stats_(
            tiles[0], y, v0, st, bias=bs[0], scale=scale, softcap=softcap, entropy=False, mean=False, impl=backend))
        f = ep.finish(st, V)
        zero = torch.zeros((), dtype=acc, device=h.device)
        logp = torch.where(valid, f["logp"], zero)
        tgt = torch.where(valid, f["z"], zero)  # the (transformed) target logit, from the same sweep

        ctx.save_for_backward(h_op, W, bias, valid, y, f["lse"], tgt)
        ctx.chunk, ctx.impl, ctx.softcap, ctx.scale, ctx.h_dtype = C, impl, softcap, scale, h.dtype
        return logp, tgt

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_tgt):
        h, W, bias, valid, y, lse, tgt = ctx.saved_tensors
        need_h, need_W, _, need_b = ctx.needs_input_grad[:4]
        need_b = need_b and bias is not None
        nones = (None,) * 6  # ignore_index, chunk, impl, budget_mb, softcap, scale
        if (g_logp is None and g_tgt is None) or not (need_h or need_W or need_b):
            return (None, None, None, None) + nones
        acc = lse.dtype
        zero = torch.zeros((), dtype=acc, device=h.device)
        gt = None if g_tgt is None else torch.where(valid, g_tgt.to(acc), zero)
        if g_logp is None:  # only the target logit has a gradient: no vocabulary sweep, an O(N·D) gather / scatter
            d = torch.full_like(tgt, ctx.scale)  # ∂z'/∂(h·W + b) at the target
            if ctx.softcap:
                d = d * (1 - (tgt / ctx.softcap) ** 2)
            dh, dW, db = _sparse_grads(h, W, bias, y, gt * d, need_h, need_W, need_b)
            return (dh.to(ctx.h_dtype) if need_h else None, dW.to(W.dtype) if need_W else None, None,
                    db.to(bias.dtype) if need_b else None) + nones
        gl = torch.where(valid, g_logp.to(acc), zero)  # [N]
        coef = gl if gt is None else gl + gt  # weight of the one-hot term [N]
        backend = epilogue(ctx.impl)
        dh, dW, db = backward_sweep(
            [(h, W, bias)], ctx.chunk,
            lambda tiles, bs, v0: ep.tile_grad(tiles[0], y, v0, lse, gl.contiguous(), coef.contiguous(),
                                               out_dtype=h.dtype, bias=bs[0], scale=ctx.scale,
                                               softcap=ctx.softcap, impl=backend),
            need_h=need_h, need_W=need_W, need_b=need_b)
        grad_h = dh.to(ctx.h_dtype) if need_h else None
        grad_W = dW.to(W.dtype) if need_W else None
        grad_b = db.to(bias.dtype) if need_b else None
        return (grad_h, grad_W, None, grad_b) + nones


LinearLogprobsTorch = LinearLogprobsFunction  # the name the tests and older callers use


class TargetLogitsTorch(torch.autograd.Function):
    """Raw target logit ``z [N] = W[y] · h + b[y]`` (0 where ignored): a gather-dot, O(N·D), no vocabulary sweep.

    ``apply(h, W, labels, bias, ignore_index)`` with flat ``h [N, D]``, ``labels [N]``. No host sync.
    """

    @staticmethod
    def forward(ctx, h, W, labels, bias, ignore_index):
        ctx.set_materialize_grads(False)
        valid, y = row_targets(labels, ignore_index, h.shape[0], h.device)
        z = target_dot(h, W, bias, y, valid)  # [N]
        ctx.save_for_backward(h, W, bias, valid, y)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h, W, bias, valid, y = ctx.saved_tensors
        need_h, need_W, _, need_b = ctx.needs_input_grad[:4]
        need_b = need_b and bias is not None
        if g is None or not (need_h or need_W or need_b):
            return None, None, None, None, None
        acc = _acc_dtype(h.dtype)
        gv = torch.where(valid, g.to(acc), torch.zeros((), dtype=acc, device=h.device))  # [N]
        dh, dW, db = _sparse_grads(h, W, bias, y, gv, need_h, need_W, need_b)
        return (dh.to(h.dtype) if need_h else None, dW if need_W else None, None,
                db.to(bias.dtype) if need_b else None, None)


# ----------------------------------------------------------------------------------------------------------------------
# Public entry points: validation, then dispatch on ``impl``.
# ----------------------------------------------------------------------------------------------------------------------


def _linear_logprobs_torch(h, W, labels, bias, ignore_index, budget_mb=None, softcap=0.0, scale=1.0):
    return LinearLogprobsFunction.apply(h, W, labels, bias, ignore_index, None, "torch", budget_mb, softcap, scale)


def _linear_logprobs_gemm(h, W, labels, bias, ignore_index, budget_mb=None, softcap=0.0, scale=1.0):
    return LinearLogprobsFunction.apply(h, W, labels, bias, ignore_index, None, "gemm", budget_mb, softcap, scale)


def _linear_logprobs_triton(h, W, labels, bias, ignore_index, budget_mb=None, softcap=0.0, scale=1.0):
    from vpo_kernels.linear_logprobs import LinearLogprobsTriton  # lazy: `import vpo` never needs triton

    return LinearLogprobsTriton.apply(h, W, labels, bias, ignore_index, None, scale, softcap)


def _target_logits_torch(h, W, labels, bias, ignore_index, budget_mb=None):
    return TargetLogitsTorch.apply(h, W, labels, bias, ignore_index)


def _target_logits_triton(h, W, labels, bias, ignore_index, budget_mb=None):
    from vpo_kernels.target_logits import TargetLogitsTriton  # lazy: `import vpo` never needs triton

    return TargetLogitsTriton.apply(h, W, labels, bias, ignore_index)


# name -> callable(h [N, D], W [V, D], labels [N], bias [V] | None, ignore_index, budget_mb) on flat, validated inputs.
# target_logits has no vocabulary sweep: "gemm" is its O(N·D) gather-dot kernel, the same as "triton".
LINEAR_LOGPROBS_IMPLS = {"torch": _linear_logprobs_torch, "gemm": _linear_logprobs_gemm,
                         "triton": _linear_logprobs_triton}
TARGET_LOGITS_IMPLS = {"torch": _target_logits_torch, "gemm": _target_logits_triton, "triton": _target_logits_triton}

_TRITON_MODULES = ("vpo_kernels.linear_logprobs", "vpo_kernels.target_logits")


def _resolve_impl(impl, registry, hidden: torch.Tensor) -> str:
    return resolve_impl(impl, registry, hidden, _TRITON_MODULES)


def _validate(hidden, weight, labels, bias, ignore_index) -> None:
    check_linear_head(hidden, weight, bias)
    check_labels_like(labels, hidden)
    check_ignore_index(ignore_index)
    assert_labels_in_range("labels", labels, weight.shape[0], ignore_index)  # device-side assert: no host sync


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_budget_mb: Optional[float] = None,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob and raw target logit under the LM head, never materializing the ``[N, V]`` logits.

    ``logp = z[y] − logsumexp(z)`` and ``target_logit = z[y]`` with ``z = hidden @ weight.T + bias`` (then
    ``z -> logit_scale · z`` and ``z -> cap · tanh(z / cap)`` when given).

    Args:
        hidden: ``[..., D]`` last hidden states (after the final norm), float16/bfloat16/float32/float64.
        weight: ``[V, D]`` LM-head weight, same dtype and device as ``hidden``.
        labels: ``hidden.shape[:-1]`` int32/int64 target ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]``, same dtype and device as ``hidden``. Default ``None``.
        ignore_index: label value marking positions without a target (output 0, zero gradient). Default ``-100``.
        impl: ``"auto"`` (default: ``"gemm"`` for CUDA tensors when triton imports, else ``"torch"``), ``"gemm"``
            (cuBLAS GEMMs in the input dtype over vocabulary chunks + small Triton kernels for the elementwise work:
            4 GEMM passes fwd+bwd, extra memory ``N·C·(4 + e)`` bytes per chunk), ``"triton"`` (fully fused kernels,
            ``vpo_kernels``: the least memory) or ``"torch"`` (the same sweep as "gemm" in plain torch). "gemm" and
            "triton" take CPU tensors only under ``TRITON_INTERPRET=1``.
        chunk_budget_mb: memory budget (MiB) of one vocabulary chunk's tiles for "torch"/"gemm". Default ``None``:
            ``$VPO_CHUNK_BUDGET_MB``, else 128. ``$VPO_TORCH_CHUNK`` fixes the chunk width instead.
        logit_softcap: final-logit soft-capping ``cap`` (Gemma 2/3: ``final_logit_softcapping``); None: none.
        logit_scale: a factor on the logits (Cohere / Aya Vision: ``logit_scale``); None: 1. Both on "torch"/"gemm".

    Returns:
        ``(logp, target_logit)``, each of shape ``labels.shape``, float32 (float64 when the inputs are float64);
        differentiable with respect to ``hidden``, ``weight`` and ``bias``.

    Raises:
        ValueError: on a bad argument (shape, dtype, device, empty input, unknown ``impl``). A label out of range
            is a ValueError on CPU or with ``VPO_DEBUG_CHECKS=1``, else a device-side assert (no host sync).

    Example:
        >>> import torch
        >>> from vpo.ops.linear_logprobs import linear_logprobs
        >>> h = torch.randn(2, 5, 16, requires_grad=True)
        >>> W = torch.randn(100, 16, requires_grad=True)
        >>> y = torch.randint(0, 100, (2, 5)); y[:, :2] = -100   # prompt positions are ignored
        >>> logp, tgt = linear_logprobs(h, W, y)
        >>> logp.shape, logp.dtype
        (torch.Size([2, 5]), torch.float32)
        >>> logp.sum().backward()
    """
    weight, bias = unshard_head(weight, bias)
    _validate(hidden, weight, labels, bias, ignore_index)
    softcap, scale = check_head_transform(logit_softcap, logit_scale)
    name = _resolve_impl(impl, LINEAR_LOGPROBS_IMPLS, hidden)
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    logp, tgt = LINEAR_LOGPROBS_IMPLS[name](h, weight, labels.reshape(-1), bias, ignore_index, chunk_budget_mb,
                                            softcap, scale)
    return logp.view(labels.shape), tgt.view(labels.shape)


def target_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
) -> torch.Tensor:
    """Raw target logit ``z[y] = weight[y] · hidden + bias[y]``: a gather-dot, O(N·D), no sweep over the vocabulary.

    This is all the TPO noised-image pass needs (docs/methods.md, TPO step 2).

    Args:
        hidden: ``[..., D]`` last hidden states, float16/bfloat16/float32/float64.
        weight: ``[V, D]`` LM-head weight, same dtype and device as ``hidden``.
        labels: ``hidden.shape[:-1]`` int32/int64 target ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]``. Default ``None``.
        ignore_index: label value marking positions without a target (output 0, zero gradient). Default ``-100``.
        impl: ``"auto"`` (default), ``"gemm"``, ``"triton"`` or ``"torch"``, as for :func:`linear_logprobs` ("gemm"
            and "triton" are the same O(N·D) gather-dot kernels here).
        logit_softcap, logit_scale: the head's logits transform, as in :func:`linear_logprobs` (elementwise on the
            ``[N]`` target logits, through autograd).

    Returns:
        ``z`` of shape ``labels.shape``, float32 (float64 when the inputs are float64), differentiable with respect to
        ``hidden``, ``weight`` and ``bias``.

    Example:
        >>> import torch
        >>> from vpo.ops.linear_logprobs import target_logits
        >>> h, W = torch.randn(3, 16), torch.randn(100, 16)
        >>> z = target_logits(h, W, torch.tensor([5, -100, 7]))
        >>> torch.allclose(z, torch.stack([W[5] @ h[0], torch.tensor(0.0), W[7] @ h[2]]))
        True
    """
    weight, bias = unshard_head(weight, bias)
    _validate(hidden, weight, labels, bias, ignore_index)
    softcap, scale = check_head_transform(logit_softcap, logit_scale)
    name = _resolve_impl(impl, TARGET_LOGITS_IMPLS, hidden)
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    z = TARGET_LOGITS_IMPLS[name](h, weight, labels.reshape(-1), bias, ignore_index)  # 0 where ignored
    if scale != 1.0:
        z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)  # tanh(0) = 0: ignored positions stay 0
    return z.view(labels.shape)
