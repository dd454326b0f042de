"""Fused Cat-PO (cross-modal adaptive token rewards; SPEC.md, Cat-PO), without vocab logits.

    π^(w) = Σ_t w⁺_t logp(y⁺_t) − Σ_t w⁻_t logp(y⁻_t)             for policy and reference
    L_wDPO = −log σ(β (π^(w)_θ − π^(w)_ref))                       = DPO on the weighted per-sequence sums
    L_KL   = λ (Σ_t w⁺_t KL_t⁺ + Σ_t w⁻_t KL_t⁻)                   mean over pairs, KL over the full vocab
    L      = L_wDPO + L_KL

The weights ``w`` are constants (computed once from the reference model, e.g. with
:func:`vpo.integrations.catpo_weights_for_batch`). The log-probs come from :func:`vpo.linear_logprobs` and the per-token
KL from :func:`vpo.linear_token_kl`, one online sweep over the vocab each; nothing ``[tokens × vocab]`` is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from vpo.fused._common import PreferenceOutput, make_output, reference_head, validate_pair_batch
from vpo.losses import dpo_loss
from vpo.ops.linear_logprobs import linear_logprobs
from vpo.ops.segment_sum import sequence_sum
from vpo.ops.token_kl import linear_token_kl
from vpo.oracle.catpo import check_catpo_arguments  # Cat-PO's argument rules live once, with the oracle


@dataclass(frozen=True)
class CatPOOutput(PreferenceOutput):
    """:class:`PreferenceOutput` plus ``kl``: ``[B]`` per pair ``Σ_t w_t KL_t`` over chosen + rejected tokens
    (``None`` without ``ref_hidden``). ``chosen_logps``/``rejected_logps`` are the plain, unweighted log-probs; the
    rewards are β times the weighted differences."""

    kl: Optional[torch.Tensor] = None


def fused_catpo_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    kl_coef: float = 0.03,
    ignore_index: int = -100,
    impl: str = "auto",
) -> Tuple[torch.Tensor, CatPOOutput]:
    """Cat-PO loss from last hidden states: token-weighted DPO + ``kl_coef`` · token-weighted KL.

    Args:
        weight: ``[V, D]`` LM-head weight; bias: optional ``[V]``.
        hidden: ``[2B, T, D]`` policy last hidden states, chosen rows first then rejected.
        labels: ``[2B, T]`` aligned target ids, ``ignore_index`` = no target.
        token_weights: ``[2B, T]`` Cat-PO weights (constants; values at ignored positions are unused).
        ref_hidden: ``[2B, T, D]`` reference last hidden states; required when ``kl_coef > 0``.
        ref_weight, ref_bias: the reference head (default: the policy's, detached).
        ref_logps: ``[2B]`` precomputed ``Σ_t w_t logp_ref``, instead of ``ref_hidden`` (only with ``kl_coef == 0``).
        beta: β > 0. kl_coef: λ ≥ 0 (SPEC: 0.03).
        impl: kernel choice for the log-prob and KL sweeps (``"auto"`` | ``"triton"`` | ``"torch"``).

    Returns:
        ``(loss, out)``, ``out`` a :class:`CatPOOutput`; ``out.metrics["catpo/kl"]`` is the mean over pairs of
        ``Σ_t w_t KL_t`` (so ``loss = L_wDPO + kl_coef · catpo/kl``).

    Example:
        >>> import torch, vpo
        >>> W = torch.randn(50, 16, requires_grad=True); h = torch.randn(4, 6, 16, requires_grad=True)
        >>> y = torch.randint(0, 50, (4, 6)); y[:, :2] = -100
        >>> loss, out = vpo.fused_catpo_loss(W, h, y, torch.ones(4, 6), ref_hidden=h.detach())
        >>> round(loss.item(), 4), round(out.metrics["catpo/kl"].item(), 6)   # policy == reference
        (0.6931, 0.0)
    """
    B = validate_pair_batch(hidden, labels, weight, bias)
    check_catpo_arguments(hidden, labels, token_weights, ref_hidden, ref_logps, beta=beta, kl_coef=kl_coef)

    mask = labels != ignore_index
    logp, _ = linear_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index, impl=impl)  # [2B, T] fp32
    w = torch.where(mask, token_weights.detach().to(logp.dtype), torch.zeros_like(logp))  # constants
    policy = sequence_sum(logp, w)  # [2B] Σ_t w_t logp_t

    kl_pair = None
    if ref_hidden is not None:
        rw, rb = reference_head(weight, bias, ref_weight, ref_bias, ref_hidden)
        with torch.no_grad():
            ref_logp, _ = linear_logprobs(ref_hidden.detach(), rw, labels, rb, ignore_index=ignore_index, impl=impl)
            ref = sequence_sum(ref_logp, w)
        with torch.set_grad_enabled(torch.is_grad_enabled() and kl_coef > 0):  # kl_coef == 0: a metric only
            kl = linear_token_kl(hidden, weight, ref_hidden.detach(), rw, labels, bias, rb,
                                 ignore_index=ignore_index, impl=impl)  # [2B, T]
            kl_rows = sequence_sum(kl, w)  # [2B]
            kl_pair = kl_rows[:B] + kl_rows[B:]  # [B]
    else:
        ref = ref_logps.detach().to(policy.dtype)

    loss, metrics = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], beta=beta)
    if kl_pair is not None and kl_coef > 0:
        loss = loss + kl_coef * kl_pair.mean()
    with torch.no_grad():
        plain = sequence_sum(logp.detach())
        metrics["logps/chosen"], metrics["logps/rejected"] = plain[:B].mean(), plain[B:].mean()
        if kl_pair is not None:
            metrics["catpo/kl"] = kl_pair.detach().mean()
        base = make_output(policy[:B], policy[B:], ref[:B], ref[B:], beta, metrics)
    fields = {**base.__dict__, "chosen_logps": plain[:B], "rejected_logps": plain[B:]}
    return loss, CatPOOutput(**fields, kl=None if kl_pair is None else kl_pair.detach())
