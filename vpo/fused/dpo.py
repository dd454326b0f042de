"""Fused DPO: per-sequence log-probs straight from last hidden states and the LM head, never building
``[tokens × vocab]`` logits (``vpo.linear_logprobs``), then the DPO head (``vpo.losses.dpo_loss``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vpo._validate import check_positive, check_range
from vpo._heads import resolve_reference
from vpo.fused._common import PreferenceOutput, make_output, reference_head, validate_pair_batch
from vpo.losses import dpo_loss
from vpo.ops.linear_logprobs import linear_logprobs
from vpo.ops.segment_sum import sequence_sum


def fused_dpo_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    impl: str = "auto",
) -> Tuple[torch.Tensor, PreferenceOutput]:
    """DPO loss from last hidden states, without materializing vocab logits.

    Args:
        weight: ``[V, D]`` LM-head weight (``model.lm_head.weight``).
        hidden: ``[2B, T, D]`` policy last hidden states (post final norm); rows ``0..B-1`` chosen, ``B..2B-1`` rejected.
        labels: ``[2B, T]`` int target ids aligned with ``hidden`` (already shifted); ``ignore_index`` = no target.
        bias: optional ``[V]`` LM-head bias.
        ref_hidden: ``[2B, T, D]`` reference last hidden states (no gradient flows into the reference).
        ref_weight, ref_bias: the reference head; default: ``weight`` and ``bias`` (detached).
        ref_logps: ``[2B]`` precomputed reference per-sequence log-probs, instead of ``ref_hidden``.
        beta, label_smoothing: as in :func:`vpo.losses.dpo_loss`.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"`` for the log-prob kernel (see :func:`vpo.linear_logprobs`).

    Returns:
        ``(loss, out)``: scalar mean loss over the B pairs, and a :class:`PreferenceOutput`.

    Example:
        >>> import torch, vpo
        >>> W = torch.randn(50, 16, requires_grad=True); h = torch.randn(4, 6, 16, requires_grad=True)
        >>> y = torch.randint(0, 50, (4, 6)); y[:, :2] = -100           # the prompt is not scored
        >>> loss, out = vpo.fused_dpo_loss(W, h, y, ref_hidden=h.detach() + 0.01 * torch.randn_like(h))
        >>> loss.backward(); tuple(out.margins.shape), h.grad.shape
        ((2,), torch.Size([4, 6, 16]))
    """
    B = validate_pair_batch(hidden, labels, weight, bias)
    check_positive("beta", beta)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=True)
    mode = resolve_reference(ref_hidden, ref_logps, hidden)

    logp, _ = linear_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index, impl=impl)  # [2B, T] fp32
    seq = sequence_sum(logp)  # [2B]
    if mode == "logps":
        ref = ref_logps.detach().to(seq.dtype)
    else:
        rw, rb = reference_head(weight, bias, ref_weight, ref_bias, ref_hidden)
        with torch.no_grad():
            ref_logp, _ = linear_logprobs(ref_hidden.detach(), rw, labels, rb, ignore_index=ignore_index, impl=impl)
            ref = sequence_sum(ref_logp)
    loss, metrics = dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=beta, label_smoothing=label_smoothing)
    return loss, make_output(seq[:B], seq[B:], ref[:B], ref[B:], beta, metrics)
