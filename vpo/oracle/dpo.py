"""Oracle for DPO from last hidden states (docs/methods.md "DPO"), and the pieces the other method oracles share.

Logits are materialized in full by :func:`vpo.oracle.logprobs.token_logprobs`, summed per sequence by
:func:`vpo.oracle.logprobs.sequence_logps`, and the per-sequence values go through the loss head
:func:`vpo.losses.dpo_loss` — the math lives there, once.

Batch convention (Liger's): chosen rows first, then rejected, on dim 0: ``hidden [2B, T, D]``, ``labels [2B, T]``,
already aligned (``hidden[:, t]`` predicts ``labels[:, t]``), ``ignore_index`` on prompt and padding positions.

The reference pass is computed under ``torch.no_grad()`` — the reference is frozen, so no gradient reaches
``ref_hidden``, ``ref_weight`` or ``ref_bias`` (nor ``weight`` through the reference when the head is shared).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from vpo import losses
from vpo._heads import check_head, check_pass, check_reference_passes, default_reference_head
from vpo._validate import check_even_batch, check_float, check_same_device, check_same_dtype
from vpo.oracle.logprobs import head_logits, sequence_logps, token_logprobs

Metrics = Dict[str, torch.Tensor]


def reference_head(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ref_weight: Optional[torch.Tensor],
    ref_bias: Optional[torch.Tensor],
) -> Tuple[str, torch.Tensor, Optional[torch.Tensor]]:
    """The reference's LM head: ``(ref_weight, ref_bias)``, or the policy's ``(weight, bias)`` when ``ref_weight`` is
    None (a frozen head shared by both models, as with LoRA). Returns ``(name for messages, W_ref, b_ref)``."""
    ref_weight, ref_bias, shared = default_reference_head(weight, bias, ref_weight, ref_bias)
    if shared:
        return "weight", weight, bias
    check_head("ref_weight", ref_weight, "ref_bias", ref_bias)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"ref_weight has shape {tuple(ref_weight.shape)} but weight has shape {tuple(weight.shape)}: "
            f"expected the same vocabulary size (shape[0])"
        )
    check_same_dtype("ref_weight", ref_weight, "weight", weight)
    check_same_device("ref_weight", ref_weight, "weight", weight)
    return "ref_weight", ref_weight, ref_bias


def sequence_logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    ignore_index: int,
) -> torch.Tensor:
    """``[..., T, D] -> [...]``: per-token log-probs via the full logits, summed over response tokens."""
    logp, _, _ = token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index)  # [..., T]
    return sequence_logps(logp, labels, ignore_index=ignore_index)  # [...]


def reference_sequence_logps(
    ref_hidden: Optional[torch.Tensor],
    labels: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: Optional[torch.Tensor],
    *,
    like: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    """Reference per-sequence log-probs without gradient; zeros shaped like ``like`` when ``ref_hidden`` is None."""
    if ref_hidden is None:
        return torch.zeros_like(like).detach()
    with torch.no_grad():
        return sequence_logps_from_hidden(ref_hidden, ref_weight, labels, ref_bias, ignore_index=ignore_index)


@dataclass(frozen=True)
class Heads:
    """The policy's and the reference's LM heads, validated (see :func:`heads`)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    ref_weight_name: str
    ref_weight: torch.Tensor
    ref_bias: Optional[torch.Tensor]


def heads(weight, bias, ref_weight, ref_bias) -> Heads:
    check_head("weight", weight, "bias", bias)
    ref_name, ref_w, ref_b = reference_head(weight, bias, ref_weight, ref_bias)
    return Heads(weight, bias, ref_name, ref_w, ref_b)


def pass_logps(
    hidden_name: str,
    hidden: torch.Tensor,
    labels_name: str,
    labels: torch.Tensor,
    ref_hidden_name: str,
    ref_hidden: Optional[torch.Tensor],
    head: Heads,
    *,
    ignore_index: int,
    ndim: int = 3,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate one forward pass (policy and, if given, reference on the same labels) and return its per-sequence
    ``(logps, ref_logps)``, each ``hidden.shape[:-2]``; ``ref_logps`` is zeros when ``ref_hidden`` is None."""
    check_pass(hidden_name, hidden, labels_name, labels, "weight", head.weight, ignore_index=ignore_index, ndim=ndim)
    if ref_hidden is not None:
        check_pass(
            ref_hidden_name, ref_hidden, labels_name, labels, head.ref_weight_name, head.ref_weight,
            ignore_index=ignore_index, ndim=ndim,
        )  # fmt: skip
    logps = sequence_logps_from_hidden(hidden, head.weight, labels, head.bias, ignore_index=ignore_index)
    ref_logps = reference_sequence_logps(
        ref_hidden, labels, head.ref_weight, head.ref_bias, like=logps, ignore_index=ignore_index
    )
    return logps, ref_logps


def merge_metrics(*parts: Metrics) -> Metrics:
    out: Metrics = {}
    for part in parts:
        out.update(part)
    return out


def trl_token_metrics(logits: torch.Tensor, labels: torch.Tensor, n_pairs: int, *, ignore_index: int = -100) -> Metrics:
    """TRL's token metrics from materialized logits ``[2B, T, V]`` (chosen rows first) and ``labels [2B, T]``:

    - ``logits/chosen``, ``logits/rejected``: the mean over the vocabulary of each scored position's logits, averaged
      over the scored tokens of the chosen (rejected) rows;
    - ``mean_token_accuracy``: the fraction of the chosen rows' scored tokens whose target is the argmax (TRL 1.16
      counts the chosen rows only);
    - ``entropy``: the next-token entropy averaged over all scored tokens, chosen and rejected pooled.
    """
    with torch.no_grad():
        mask = labels != ignore_index
        mean_logit = logits.float().mean(-1) if logits.dtype in (torch.float16, torch.bfloat16) else logits.mean(-1)
        logp = torch.log_softmax(logits.to(mean_logit.dtype), -1)
        entropy = -(logp.exp() * logp).sum(-1)  # [2B, T]
        safe = torch.where(mask, labels, torch.zeros_like(labels))
        top1 = logits.argmax(-1) == safe
        B = n_pairs
        m = mask.to(mean_logit.dtype)

        def avg(x, rows):
            return (x[rows] * m[rows]).sum() / m[rows].sum().clamp_min(1)

        c, r = slice(0, B), slice(B, 2 * B)
        return {"logits/chosen": avg(mean_logit, c), "logits/rejected": avg(mean_logit, r),
                "mean_token_accuracy": avg(top1.to(m.dtype), c), "entropy": avg(entropy, slice(None))}


def dpo_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    loss_type="sigmoid",
    loss_weights=None,
    use_weighting: bool = False,
    ld_alpha: Optional[float] = None,
    trl_metrics: bool = False,
    **options,
) -> Tuple[torch.Tensor, Metrics]:
    """DPO and TRL's DPO variants from last hidden states, materializing the logits (the oracle for the fused DPO loss).

    Args:
        weight: ``[V, D]`` policy LM-head weight; ``bias``: optional ``[V]``.
        hidden: ``[2B, T, D]`` policy hidden states, chosen rows first then rejected.
        labels: ``[2B, T]`` int targets aligned with ``hidden``, ``ignore_index`` where there is none.
        ref_hidden: ``[2B, T, D]`` the reference's hidden states on the same inputs, or None for reference-free DPO.
        ref_weight, ref_bias: the reference's head; None: the policy's ``weight``/``bias`` (a shared frozen head).
        beta, label_smoothing: as in :func:`vpo.losses.dpo_loss`.
        ignore_index: label of positions without a target (-100).
        logit_softcap, logit_scale: the heads' logits transform (:func:`vpo.oracle.logprobs.head_logits`).
        loss_type, loss_weights: TRL's loss types (:func:`vpo.losses.preference_pair_losses`).
        use_weighting: WPO's pair weights (:func:`vpo.losses.wpo_weights`, ``log Σ p²`` from the full logits).
        ld_alpha: LD-DPO's α (:func:`vpo.losses.ld_dpo_logps`), for the policy and the reference; None: plain sums.
        trl_metrics: add :func:`trl_token_metrics` (``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``,
            ``entropy``) to the metrics.
        options: ``f_divergence_type``, ``f_alpha_divergence_coef``, ``discopop_tau``, ``bco_delta`` of
            :func:`vpo.losses.preference_pair_losses`.

    Returns:
        ``(loss, metrics)``: :func:`vpo.losses.preference_metrics` (plus :func:`trl_token_metrics`). Gradients reach
        ``hidden``, ``weight`` and ``bias`` only.

    Example:
        >>> import torch
        >>> from vpo.oracle.dpo import dpo_loss
        >>> W = torch.eye(3, dtype=torch.float64)            # logits = hidden
        >>> h = torch.zeros(2, 1, 3, dtype=torch.float64)    # uniform: logp = -log 3 for both rows
        >>> loss, m = dpo_loss(W, h, torch.tensor([[0], [1]]), ref_hidden=h)
        >>> round(loss.item(), 4)                             # -log σ(0)
        0.6931
    """
    head = heads(weight, bias, ref_weight, ref_bias)
    n_pairs = check_even_batch("hidden", check_float("hidden", hidden, ndim=3))
    check_reference_passes([("ref_hidden", ref_hidden)], ref_weight, ref_bias)
    check_pass("hidden", hidden, "labels", labels, "weight", head.weight, ignore_index=ignore_index, ndim=3)
    if ref_hidden is not None:
        check_pass("ref_hidden", ref_hidden, "labels", labels, head.ref_weight_name, head.ref_weight,
                   ignore_index=ignore_index, ndim=3)
    mask = labels != ignore_index
    tr = dict(logit_softcap=logit_softcap, logit_scale=logit_scale)
    logits = head_logits(hidden, head.weight, head.bias, **tr)  # [2B, T, D] @ [D, V] -> [2B, T, V]
    logp, _, _ = token_logprobs(hidden, head.weight, labels, head.bias, ignore_index=ignore_index, **tr)  # [2B, T]
    logps = losses.ld_dpo_logps(logp, mask, ld_alpha)  # [2B]
    if ref_hidden is None:
        ref_logps = torch.zeros_like(logps)
    else:
        with torch.no_grad():
            ref_logp, _, _ = token_logprobs(ref_hidden, head.ref_weight, labels, head.ref_bias,
                                            ignore_index=ignore_index, **tr)
            ref_logps = losses.ld_dpo_logps(ref_logp, mask, ld_alpha)
    B = n_pairs
    n = mask.sum(-1)
    pair_weights = None
    if use_weighting:
        w = losses.wpo_weights(logp, losses.log_sum_p2_from_logits(logits), mask)  # [2B]
        pair_weights = w[:B] * w[B:]
    per = losses.preference_pair_losses(
        logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=beta, label_smoothing=label_smoothing,
        loss_type=loss_type, loss_weights=loss_weights, chosen_tokens=n[:B], rejected_tokens=n[B:],
        chosen_nll=-logp[:B].sum(-1), pair_weights=pair_weights, n_pairs=B, **options,
    )  # fmt: skip
    metrics = losses.preference_metrics(beta * (logps[:B] - ref_logps[:B]), beta * (logps[B:] - ref_logps[B:]),
                                        logps[:B], logps[B:])
    if trl_metrics:
        metrics.update(trl_token_metrics(logits, labels, B, ignore_index=ignore_index))
    return per.mean(), metrics
