"""Per-token log-probs and target logits under a linear LM head, without materializing the logits.

SPEC.md, "Kernel contracts": for ``h [N, D]``, ``W [V, D]``, optional ``b [V]`` and ``labels [N]``,

    z_i       = W h_i + b                                   (never held as a whole [N, V] tensor)
    lse_i     = logsumexp_v z_i[v]
    logp_i    = z_i[y_i] - lse_i
    tgt_i     = z_i[y_i] = W[y_i] · h_i + b[y_i]            (a gather-dot, O(N·D))

Forward (torch path). The vocabulary is swept in chunks of ``C`` columns; each chunk's tile
``z_c = h_valid @ W_c.T + b_c`` (``[M, C]``, M = number of non-ignored rows) updates an online logsumexp::

    m' = max(m, max_v z_c)          s' = s · exp(m − m') + Σ_v exp(z_c − m')          lse = m + log s

so only ``[M]`` running statistics and one ``[M, C]`` tile are alive at a time.

Backward. With upstream gradients ``g_logp`` and ``g_tgt`` (either may be absent),

    ∂L/∂z_i[v] = −g_logp,i · p_i[v] + (g_logp,i + g_tgt,i) · 1[v = y_i],     p_i = exp(z_i − lse_i)

The dense part is recomputed chunk by chunk (``dz_c = −g_logp · p_c``; ``dh += dz_c @ W_c``, ``dW_c = dz_cᵀ @ h``,
``db_c = Σ_rows dz_c``); the sparse one-hot part is a gather (``dh += coef · W[y]``) and a scatter
(``dW.index_add_(0, y, coef · h)``, ``db.index_add_(0, y, coef)``). When only the target logit receives a gradient
the vocabulary sweep is skipped entirely.

Precision: tiles and accumulators are float32 for half/float32 inputs and float64 for float64 inputs; outputs are
in that accumulation dtype and input gradients are returned in the inputs' dtypes.

Chunk policy: ``C = clamp(TILE_BUDGET // M, 1, V)`` with ``TILE_BUDGET = 2**24`` elements (64 MiB in float32) per
``[M, C]`` tile; the environment variable ``VPO_TORCH_CHUNK`` (a positive integer) overrides ``C``. The sweep keeps
at most two such tiles alive at once (the matmul result and its exponential in the forward, which are computed in
place in the backward).

Ignored rows (``labels == ignore_index``) are selected out once per call (``nonzero``, a host sync — acceptable on
this reference/CPU path): they do no work, output 0 and receive zero gradient.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from vpo._heads import check_ignore_index, check_labels_like, check_linear_head
from vpo.ops._common import acc_dtype as _acc_dtype
from vpo.ops._common import chunk_logits as _chunk_logits
from vpo.ops._common import resolve_impl
from vpo.ops._common import scatter_back as _scatter_back
from vpo.ops._common import select_valid as _select_valid

TILE_BUDGET = 1 << 24  # elements in one [M, C] logits tile: 64 MiB in float32
CHUNK_ENV = "VPO_TORCH_CHUNK"


def chunk_size(n_valid: int, vocab: int, override: Optional[int] = None) -> int:
    """Vocabulary columns per chunk for ``n_valid`` rows: ``override``, else ``$VPO_TORCH_CHUNK``, else the budget rule."""
    if override is None:
        env = os.environ.get(CHUNK_ENV)
        if env:
            try:
                override = int(env)
            except ValueError:
                raise ValueError(f"{CHUNK_ENV} must be a positive integer, got {env!r}") from None
            if override <= 0:
                raise ValueError(f"{CHUNK_ENV} must be a positive integer, got {env!r}")
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {override!r}")
        return min(override, vocab)
    return max(1, min(vocab, TILE_BUDGET // max(n_valid, 1)))


def _target_dot(hv: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """``W[y] · h + b[y]`` for ``hv [M, D]`` in the accumulation dtype: ``[M, D] * [M, D] -> sum -> [M]``."""
    z = (W[y].to(hv.dtype) * hv).sum(-1)
    if b is not None:
        z = z + b[y].to(hv.dtype)
    return z


class LinearLogprobsTorch(torch.autograd.Function):
    """Chunked ``(logp [N], target_logit [N])`` for flat ``h [N, D]``, ``W [V, D]``, ``labels [N]``, ``bias [V] | None``.

    ``apply(h, W, labels, bias, ignore_index, chunk=None)``; ``chunk`` overrides the vocabulary chunk size
    (see :func:`chunk_size`). Never allocates an ``[N, V]`` tensor; see the module docstring for the math.
    """

    @staticmethod
    def forward(ctx, h, W, labels, bias, ignore_index, chunk=None):
        ctx.set_materialize_grads(False)
        N, V = h.shape[0], W.shape[0]
        acc = _acc_dtype(h.dtype)
        idx, y = _select_valid(labels, ignore_index)
        M = idx.numel()
        C = chunk_size(M, V, chunk)

        hv = h[idx].to(acc)  # [M, D]
        m = torch.full((M,), float("-inf"), dtype=acc, device=h.device)  # running max
        s = torch.zeros((M,), dtype=acc, device=h.device)  # running Σ exp(z − m)
        if M > 0:
            for v0 in range(0, V, C):
                zc, _ = _chunk_logits(hv, W, bias, v0, min(v0 + C, V))  # [M, C]
                m_new = torch.maximum(m, zc.amax(1))
                s = s * torch.exp(m - m_new) + zc.sub_(m_new[:, None]).exp_().sum(1)
                m = m_new
        lse = m + torch.log(s)  # [M]
        tgt = _target_dot(hv, W, bias, y)  # [M]

        ctx.save_for_backward(h, W, bias, idx, y, lse)
        ctx.chunk = C
        logp = _scatter_back((N,), idx, tgt - lse, acc)
        target = _scatter_back((N,), idx, tgt, acc)
        return logp, target

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_tgt):
        h, W, bias, idx, y, lse = ctx.saved_tensors
        need_h, need_W, _, need_b = ctx.needs_input_grad[:4]
        need_b = need_b and bias is not None
        N, D = h.shape
        V = W.shape[0]
        acc = lse.dtype
        M, C = idx.numel(), ctx.chunk

        gl = g_logp[idx].to(acc) if g_logp is not None else None  # [M]
        gt = g_tgt[idx].to(acc) if g_tgt is not None else None  # [M]
        hv = h[idx].to(acc)  # [M, D]
        dh = torch.zeros((M, D), dtype=acc, device=h.device) if need_h else None
        dW = torch.zeros((V, D), dtype=acc, device=h.device) if need_W else None
        db = torch.zeros((V,), dtype=acc, device=h.device) if need_b else None

        if M > 0 and (need_h or need_W or need_b):
            # Dense part: dz_c = −g_logp · softmax tile, recomputed chunk by chunk.
            if gl is not None:
                neg_gl = -gl[:, None]  # [M, 1]
                for v0 in range(0, V, C):
                    v1 = min(v0 + C, V)
                    zc, Wc = _chunk_logits(hv, W, bias, v0, v1)  # [M, C], [C, D]
                    dz = zc.sub_(lse[:, None]).exp_().mul_(neg_gl)  # in place: p_c, then dz_c  [M, C]
                    if need_h:
                        dh.addmm_(dz, Wc)  # [M, C] @ [C, D] -> [M, D]
                    if need_W:
                        dW[v0:v1] = dz.T @ hv  # [C, M] @ [M, D] -> [C, D]
                    if need_b:
                        db[v0:v1] = dz.sum(0)
            # Sparse part: the one-hot at the target, coefficient g_logp + g_tgt.
            coef = gl if gt is None else (gt if gl is None else gl + gt)  # [M]
            if coef is not None:
                if need_h:
                    dh.add_(coef[:, None] * W[y].to(acc))
                if need_W:
                    dW.index_add_(0, y, coef[:, None] * hv)
                if need_b:
                    db.index_add_(0, y, coef)

        grad_h = _scatter_back((N, D), idx, dh, h.dtype) if need_h else None
        grad_W = dW.to(W.dtype) if need_W else None
        grad_b = db.to(bias.dtype) if need_b else None
        return grad_h, grad_W, None, grad_b, None, None


class TargetLogitsTorch(torch.autograd.Function):
    """Raw target logit ``z [N] = W[y] · h + b[y]`` (0 where ignored): a gather-dot, O(N·D), no vocabulary sweep.

    ``apply(h, W, labels, bias, ignore_index)`` with flat ``h [N, D]``, ``labels [N]``.
    """

    @staticmethod
    def forward(ctx, h, W, labels, bias, ignore_index):
        ctx.set_materialize_grads(False)
        acc = _acc_dtype(h.dtype)
        idx, y = _select_valid(labels, ignore_index)
        z = _target_dot(h[idx].to(acc), W, bias, y)  # [M]
        ctx.save_for_backward(h, W, bias, idx, y)
        return _scatter_back((h.shape[0],), idx, z, acc)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h, W, bias, idx, y = ctx.saved_tensors
        need_h, need_W, _, need_b = ctx.needs_input_grad[:4]
        need_b = need_b and bias is not None
        if g is None:
            return None, None, None, None, None
        acc = _acc_dtype(h.dtype)
        gv = g[idx].to(acc)  # [M]
        grad_h = grad_W = grad_b = None
        if need_h:
            grad_h = _scatter_back(tuple(h.shape), idx, gv[:, None] * W[y].to(acc), h.dtype)
        if need_W:
            dW = torch.zeros(W.shape, dtype=acc, device=W.device)
            dW.index_add_(0, y, gv[:, None] * h[idx].to(acc))
            grad_W = dW.to(W.dtype)
        if need_b:
            db = torch.zeros(bias.shape, dtype=acc, device=bias.device)
            db.index_add_(0, y, gv)
            grad_b = db.to(bias.dtype)
        return grad_h, grad_W, None, grad_b, None


# ----------------------------------------------------------------------------------------------------------------------
# Public entry points: validation, then dispatch on ``impl``.
# ----------------------------------------------------------------------------------------------------------------------


def _linear_logprobs_torch(h, W, labels, bias, ignore_index):
    return LinearLogprobsTorch.apply(h, W, labels, bias, ignore_index)


def _linear_logprobs_triton(h, W, labels, bias, ignore_index):
    from vpo_kernels.linear_logprobs import LinearLogprobsTriton  # lazy: `import vpo` never needs triton

    return LinearLogprobsTriton.apply(h, W, labels, bias, ignore_index)


def _target_logits_torch(h, W, labels, bias, ignore_index):
    return TargetLogitsTorch.apply(h, W, labels, bias, ignore_index)


def _target_logits_triton(h, W, labels, bias, ignore_index):
    from vpo_kernels.target_logits import TargetLogitsTriton  # lazy: `import vpo` never needs triton

    return TargetLogitsTriton.apply(h, W, labels, bias, ignore_index)


# name -> callable(h [N, D], W [V, D], labels [N], bias [V] | None, ignore_index) on flat, validated inputs.
LINEAR_LOGPROBS_IMPLS = {"torch": _linear_logprobs_torch, "triton": _linear_logprobs_triton}
TARGET_LOGITS_IMPLS = {"torch": _target_logits_torch, "triton": _target_logits_triton}

_TRITON_MODULES = ("vpo_kernels.linear_logprobs", "vpo_kernels.target_logits")


def _resolve_impl(impl, registry, hidden: torch.Tensor) -> str:
    return resolve_impl(impl, registry, hidden, _TRITON_MODULES)


def _validate(hidden, weight, labels, bias, ignore_index) -> None:
    from vpo._validate import check_labels_in_range

    check_linear_head(hidden, weight, bias)
    check_labels_like(labels, hidden)
    check_ignore_index(ignore_index)
    check_labels_in_range("labels", labels, weight.shape[0], ignore_index)  # one host sync


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob and raw target logit under the LM head, never materializing the ``[N, V]`` logits.

    ``logp = z[y] − logsumexp(z)`` and ``target_logit = z[y]`` with ``z = hidden @ weight.T + bias``.

    Args:
        hidden: ``[..., D]`` last hidden states (after the final norm), float16/bfloat16/float32/float64.
        weight: ``[V, D]`` LM-head weight, same dtype and device as ``hidden``.
        labels: ``hidden.shape[:-1]`` int32/int64 target ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]``, same dtype and device as ``hidden``. Default ``None``.
        ignore_index: label value marking positions without a target (output 0, zero gradient). Default ``-100``.
        impl: ``"auto"`` (default: ``"triton"`` for CUDA tensors when triton imports, else ``"torch"``),
            ``"triton"`` (``vpo_kernels``; CPU tensors only under ``TRITON_INTERPRET=1``) or ``"torch"``
            (chunked PyTorch; chunk size from ``VPO_TORCH_CHUNK`` or a 2**24-element tile budget).

    Returns:
        ``(logp, target_logit)``, each of shape ``labels.shape``, float32 (float64 when the inputs are float64);
        differentiable with respect to ``hidden``, ``weight`` and ``bias``.

    Raises:
        ValueError: on a bad argument (shape, dtype, device, label out of range, empty input, unknown ``impl``).

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
    _validate(hidden, weight, labels, bias, ignore_index)
    name = _resolve_impl(impl, LINEAR_LOGPROBS_IMPLS, hidden)
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    logp, tgt = LINEAR_LOGPROBS_IMPLS[name](h, weight, labels.reshape(-1), bias, ignore_index)
    return logp.view(labels.shape), tgt.view(labels.shape)


def target_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
) -> torch.Tensor:
    """Raw target logit ``z[y] = weight[y] · hidden + bias[y]``: a gather-dot, O(N·D), no sweep over the vocabulary.

    This is all the TPO noised-image pass needs (SPEC.md, TPO step 2).

    Args:
        hidden: ``[..., D]`` last hidden states, float16/bfloat16/float32/float64.
        weight: ``[V, D]`` LM-head weight, same dtype and device as ``hidden``.
        labels: ``hidden.shape[:-1]`` int32/int64 target ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]``. Default ``None``.
        ignore_index: label value marking positions without a target (output 0, zero gradient). Default ``-100``.
        impl: ``"auto"`` (default), ``"triton"`` or ``"torch"``, as for :func:`linear_logprobs`.

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
    _validate(hidden, weight, labels, bias, ignore_index)
    name = _resolve_impl(impl, TARGET_LOGITS_IMPLS, hidden)
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    z = TARGET_LOGITS_IMPLS[name](h, weight, labels.reshape(-1), bias, ignore_index)
    return z.view(labels.shape)
