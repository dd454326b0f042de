"""Per-token KL between the policy's and the reference's next-token distributions, without ``[N, V]`` logits.

docs/methods.md, Cat-PO and "Kernel contracts / token KL": for policy ``h [N, D]``, ``W [V, D]``, ``b [V]?`` and
reference ``h_ref [N, D]``, ``W_ref [V, D]``, ``b_ref [V]?``,

    z = W h + b,   r = W_ref h_ref + b_ref,   p = softmax(z),   q = softmax(r)        (never held as [N, V])
    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) = Σ_v p_v ((z_v − lse_z) − (r_v − lse_r))
              = E_p[d] − lse_z + lse_r,        d = z − r                             (Σ_v p_v = 1)

so the KL needs three per-row reductions over the vocabulary, all from ONE online sweep: the policy's running max
``m`` and ``s = Σ exp(z − m)``, ``u = Σ exp(z − m) · d`` (rescaled by ``exp(m − m')`` exactly like ``s`` when the max
grows, so ``E_p[d] = u / s``), and the reference's own running max ``m_r`` and ``s_r = Σ exp(r − m_r)``. Then
``lse_z = m + log s``, ``lse_r = m_r + log s_r``, and the KL is formed as ``u/s − (m − m_r) − (log s − log s_r)``
(the maxima cancel before the logs are added: fp32-accurate at |z| ~ 1e3, and 0 when policy == reference).

Backward (the reference is frozen: no gradient to h_ref, W_ref, b_ref). With ``E = E_p[d]`` and upstream ``g``::

    ∂KL/∂z_v = ∂/∂z_v [Σ_w p_w d_w] − p_v = p_v (d_v − E) + p_v − p_v = p_v (d_v − E)
    dz = g · p · (d − E);   dh = dz @ W,   dW = dzᵀ @ h,   db = Σ_rows dz

Both logits tiles are recomputed chunk by chunk from the saved ``lse_z`` and ``E`` ([N] each). Accumulation is in
float32 (float64 for float64 inputs).

``impl="torch"`` and ``"gemm"``: the vocabulary sweep of :mod:`vpo.ops._sweep` over all rows (ignored rows are
computed and masked: no host sync), with two heads per chunk — ``z_c = h @ W_c.T`` and ``r_c = h_ref @ W_ref,c.T``,
GEMMs in the input dtype — and the elementwise steps in plain torch (``"torch"``) or small Triton kernels
(``"gemm"``, ``vpo_kernels.epilogue``). ``dW[v0:v1] = dz_cᵀ @ h`` is one complete GEMM per chunk (no atomics).

Cost, in GEMM passes over N·D·V: forward 2 (policy + reference); backward 4 (recompute of both, dh, dW) — 6 in all:
the policy's 4 of ``linear_logprobs`` plus the reference's forward and its one recompute. Extra memory: the chunk's
two tiles and ``dz``, ``N·C·(2a + e)`` bytes at most (``a`` = 4, 8 for float64; ``e`` = input element size), chunk
width from the budget with ``tiles=2`` (:func:`vpo.ops._sweep.vocab_chunk`), plus ``dh`` in fp32 (``N·D·4``).

``impl="triton"``: ``vpo_kernels.token_kl.TokenKLTriton`` (the same math, fully fused, tiled; see that module).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from vpo._heads import (
    check_bias,
    check_head_transform,
    check_ignore_index,
    check_labels_like,
    check_linear_head,
    check_ref_hidden,
    default_reference_head,
)
from vpo._validate import check_float, check_same_device, check_same_dtype, check_same_shape
from vpo.distributed import unshard_head
from vpo.ops._common import acc_dtype, epilogue, resolve_impl, row_targets
from vpo.ops import epilogue as ep
from vpo.ops._sweep import backward_sweep, forward_sweep, operand_dtype, vocab_chunk

__all__ = ["linear_token_kl", "TokenKLFunction", "TokenKLTorch", "TOKEN_KL_IMPLS"]


class TokenKLFunction(torch.autograd.Function):
    """Chunked ``KL [N]`` for flat ``h, h_ref [N, D]``, ``W, W_ref [V, D]``, ``labels [N] | None``, biases ``[V]?``.

    ``apply(h, W, hr, Wr, labels, bias, ref_bias, ignore_index, chunk=None, impl="torch", budget_mb=None, softcap=0.0,
    scale=1.0)`` (the public argument order, with the reference's defaults already applied); ``chunk`` overrides the
    vocabulary chunk size, ``impl`` picks the epilogue (``"torch"`` | ``"gemm"``), ``softcap``/``scale`` the logits
    transform (both models). Never allocates an ``[N, V]`` tensor, never syncs with the host; gradients flow to h, W
    and bias only. See the module docstring for the math.
    """

    @staticmethod
    def forward(ctx, h, W, hr, Wr, labels, bias, ref_bias, ignore_index, chunk=None, impl="torch", budget_mb=None,
                softcap=0.0, scale=1.0):
        ctx.set_materialize_grads(False)
        N, V = h.shape[0], W.shape[0]
        acc = acc_dtype(h.dtype)
        backend = epilogue(impl)
        valid, y = row_targets(labels, ignore_index, N, h.device)
        C = vocab_chunk(N, V, h.dtype, tiles=2, chunk=chunk, budget_mb=budget_mb)  # z and r share the budget
        opd = operand_dtype(h)
        h_op, hr_op = h.to(opd), hr.to(opd)

        st = ep.new_stats(N, acc, h.device)  # the policy's M, S, UD and the reference's MR, SR in one read
        forward_sweep([(h_op, W, bias), (hr_op, Wr, ref_bias)], C, lambda tiles, bs, v0: ep.tile_stats_(
            tiles[0], y, v0, st, bias=bs[0], ref=tiles[1], ref_bias=bs[1], scale=scale, softcap=softcap,
            entropy=False, mean=False, impl=backend))
        f = ep.finish(st, V, ref=True)
        zero = torch.zeros((), dtype=acc, device=h.device)
        kl = torch.where(valid, f["kl"], zero)  # = E_p[d] − lse_z + lse_r, maxima cancelled first

        ctx.save_for_backward(h_op, W, hr_op, Wr, bias, ref_bias, valid, y, f["lse"], f["ref_lse"], f["kl"])
        ctx.chunk, ctx.impl, ctx.softcap, ctx.scale, ctx.h_dtype = C, impl, softcap, scale, h.dtype
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h, W, hr, Wr, bias, ref_bias, valid, y, lse, lse_r, kl = ctx.saved_tensors
        need_h, need_W = ctx.needs_input_grad[:2]
        need_b = ctx.needs_input_grad[5] and bias is not None
        if g is None or not (need_h or need_W or need_b):
            return (None,) * 13
        acc = lse.dtype
        zero = torch.zeros((), dtype=acc, device=h.device)
        gv = torch.where(valid, g.to(acc), zero)  # [N], 0 on ignored rows
        none = torch.zeros_like(gv)
        backend = epilogue(ctx.impl)
        dh, dW, db = backward_sweep(
            [(h, W, bias), (hr, Wr, ref_bias)], ctx.chunk,
            lambda tiles, bs, v0: ep.tile_grad(tiles[0], y, v0, lse, none, none, out_dtype=h.dtype, bias=bs[0],
                                               ref=tiles[1], ref_bias=bs[1], lse_ref=lse_r, g_kl=gv, kl=kl,
                                               scale=ctx.scale, softcap=ctx.softcap, impl=backend),
            need_h=need_h, need_W=need_W, need_b=need_b)
        grad_h = dh.to(ctx.h_dtype) if need_h else None
        grad_W = dW.to(W.dtype) if need_W else None
        grad_b = db.to(bias.dtype) if need_b else None
        return (grad_h, grad_W, None, None, None, grad_b) + (None,) * 7


TokenKLTorch = TokenKLFunction  # the name the tests and older callers use


# ----------------------------------------------------------------------------------------------------------------------
# Public entry point: validation, then dispatch on ``impl``.
# ----------------------------------------------------------------------------------------------------------------------


def _token_kl_torch(h, W, hr, Wr, labels, bias, ref_bias, ignore_index, budget_mb=None, softcap=0.0, scale=1.0):
    return TokenKLFunction.apply(h, W, hr, Wr, labels, bias, ref_bias, ignore_index, None, "torch", budget_mb,
                                 softcap, scale)


def _token_kl_gemm(h, W, hr, Wr, labels, bias, ref_bias, ignore_index, budget_mb=None, softcap=0.0, scale=1.0):
    return TokenKLFunction.apply(h, W, hr, Wr, labels, bias, ref_bias, ignore_index, None, "gemm", budget_mb,
                                 softcap, scale)


def _token_kl_triton(h, W, hr, Wr, labels, bias, ref_bias, ignore_index, budget_mb=None, softcap=0.0, scale=1.0):
    from vpo_kernels.token_kl import TokenKLTriton  # lazy: `import vpo` never needs triton

    return TokenKLTriton.apply(h, W, hr, Wr, labels, bias, ref_bias, ignore_index, None, scale, softcap)


# name -> callable(h [N, D], W [V, D], hr [N, D], Wr [V, D], labels [N] | None, bias [V] | None, ref_bias [V] | None,
# ignore_index, budget_mb) on flat, validated inputs, with the reference's defaults applied and the reference detached.
TOKEN_KL_IMPLS = {"torch": _token_kl_torch, "gemm": _token_kl_gemm, "triton": _token_kl_triton}
_TRITON_MODULES = ("vpo_kernels.token_kl",)


def _resolve_impl(impl, registry, hidden: torch.Tensor) -> str:
    return resolve_impl(impl, registry, hidden, _TRITON_MODULES)


def _validate(hidden, weight, ref_hidden, ref_weight, labels, bias, ref_bias, ignore_index):
    """Check every argument; return the reference's head ``(ref_weight, ref_bias)`` (the policy's when shared)."""
    check_linear_head(hidden, weight, bias)
    check_ref_hidden(ref_hidden, hidden)
    check_same_dtype("ref_hidden", ref_hidden, "hidden", hidden)
    ref_w, ref_b, shared = default_reference_head(weight, bias, ref_weight, ref_bias)
    if not shared:
        check_float("ref_weight", ref_weight, ndim=2)
        check_same_shape("ref_weight", ref_weight, "weight", weight)
        check_same_dtype("ref_weight", ref_weight, "hidden", hidden)
        check_same_device("ref_weight", ref_weight, "hidden", hidden)
        if ref_bias is not None:
            check_bias("ref_bias", ref_bias, "weight", weight, like_name="hidden", like=hidden)
    if labels is not None:
        check_labels_like(labels, hidden)
    check_ignore_index(ignore_index)
    return ref_w, ref_b


def linear_token_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_budget_mb: Optional[float] = None,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
) -> torch.Tensor:
    """Per-position ``KL(π_θ(·|h) ‖ π_ref(·|h_ref))`` over the full vocabulary, never materializing ``[N, V]`` logits.

    ``π_θ = softmax(hidden @ weight.T + bias)``, ``π_ref = softmax(ref_hidden @ ref_weight.T + ref_bias)``; the Cat-PO
    KL term (docs/methods.md). The reference is frozen: gradients flow to ``hidden``, ``weight`` and ``bias`` only
    (reference tensors may require grad, they receive none).

    Args:
        hidden: ``[..., D]`` the policy's last hidden states, float16/bfloat16/float32/float64.
        weight: ``[V, D]`` the policy's LM-head weight, same dtype and device as ``hidden``.
        ref_hidden: the reference's hidden states, same shape, dtype and device as ``hidden``.
        ref_weight: ``[V, D]`` the reference's LM-head weight. Default ``None``: ``weight``, detached.
        labels: optional ``hidden.shape[:-1]`` int32/int64, used only as a mask: KL is 0 (zero gradient) where
            ``labels == ignore_index``; other values are not read. Default ``None``: every position counts.
        bias: optional ``[V]`` policy bias.
        ref_bias: optional ``[V]`` reference bias, only with ``ref_weight`` (a separate head: ``None`` = no bias).
            With ``ref_weight=None`` the reference uses ``bias`` (detached) and ``ref_bias`` must be None.
        ignore_index: label value marking positions without a target. Default ``-100``.
        impl: ``"auto"`` (default: ``"gemm"`` for CUDA tensors when triton imports, else ``"torch"``), ``"gemm"``
            (cuBLAS GEMMs over vocabulary chunks + small Triton kernels; 6 GEMM passes fwd+bwd), ``"triton"`` (fully
            fused, ``vpo_kernels.token_kl``: the least memory) or ``"torch"`` (the "gemm" sweep in plain torch).
            "gemm" and "triton" take CPU tensors only under ``TRITON_INTERPRET=1``.
        chunk_budget_mb: memory budget (MiB) of one vocabulary chunk's tiles for "torch"/"gemm". Default ``None``:
            ``$VPO_CHUNK_BUDGET_MB``, else 128. ``$VPO_TORCH_CHUNK`` fixes the chunk width instead.
        logit_softcap, logit_scale: the models' logits transform (both models), as in :func:`vpo.linear_logprobs`.

    Returns:
        ``kl`` of shape ``hidden.shape[:-1]``, float32 (float64 for float64 inputs).

    Raises:
        ValueError: on a bad argument (shape, dtype, device, empty input, unknown ``impl``), naming it.

    Example:
        >>> import torch
        >>> from vpo.ops.token_kl import linear_token_kl
        >>> h, W = torch.randn(2, 5, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
        >>> h_ref = h.detach() + 0.1 * torch.randn(2, 5, 16)
        >>> y = torch.randint(0, 100, (2, 5)); y[:, :2] = -100   # prompt positions are ignored
        >>> kl = linear_token_kl(h, W, h_ref, labels=y)
        >>> kl.shape, kl.dtype, bool((kl[:, 2:] > 0).all()), bool((kl[:, :2] == 0).all())
        (torch.Size([2, 5]), torch.float32, True, True)
        >>> kl.sum().backward()
        >>> bool(linear_token_kl(h, W, h.detach()).abs().max() == 0)   # π_θ == π_ref
        True
    """
    weight, bias = unshard_head(weight, bias)
    if ref_weight is not None:
        ref_weight, ref_bias = unshard_head(ref_weight, ref_bias)
    # ref_weight=None: the shared head, the policy's weight and bias as constants
    ref_weight, ref_bias = _validate(hidden, weight, ref_hidden, ref_weight, labels, bias, ref_bias, ignore_index)
    ref_weight = ref_weight.detach()
    ref_bias = ref_bias.detach() if ref_bias is not None else None
    softcap, scale = check_head_transform(logit_softcap, logit_scale)
    name = _resolve_impl(impl, TOKEN_KL_IMPLS, hidden)
    D = hidden.shape[-1]
    kl = TOKEN_KL_IMPLS[name](
        hidden.reshape(-1, D),  # [N, D]
        weight,
        ref_hidden.detach().reshape(-1, D),  # [N, D]
        ref_weight,
        None if labels is None else labels.reshape(-1),
        bias,
        ref_bias,
        ignore_index,
        chunk_budget_mb,
        softcap,
        scale,
    )
    return kl.view(hidden.shape[:-1])
