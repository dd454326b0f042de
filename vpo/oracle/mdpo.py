"""Oracle for mDPO's loss from last hidden states (docs/methods.md "mDPO", the baseline the other methods compare to).

``L_mDPO = L_DPO + L_cond + L_anchor``: ``L_cond`` prefers the chosen response given the full image over given a
corrupted one (a random crop removing 0–20% of the image; ONE crop for policy and reference **[choice]**: the caller
feeds both models the same ``x_crop``). The math is in :mod:`vpo.losses` (``dpo_loss``, ``mdpo_conditional_loss``,
``anchor_loss``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vpo import losses
from vpo._validate import check_even_batch, check_float
from vpo._heads import check_reference_passes, check_rows
from vpo.oracle.dpo import Metrics, heads, merge_metrics, pass_logps


def mdpo_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    corrupt_hidden: torch.Tensor,
    corrupt_labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_corrupt_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    delta: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tuple[torch.Tensor, Metrics]:
    """mDPO: ``L_DPO + L_cond + L_anchor`` from hidden states, materializing the logits.

    Args:
        weight, bias: the policy's LM head ``[V, D]``, ``[V]`` (optional).
        hidden, labels: ``[2B, T, D]``, ``[2B, T]`` with the image x: chosen rows first, then rejected.
        corrupt_hidden, corrupt_labels: ``[B, T', D]``, ``[B, T']``: the chosen response given the corrupted image.
        ref_hidden, ref_corrupt_hidden: the reference's hidden states for the same passes (same shapes; they share
            the policy's labels), both or neither (reference-free: Δ = logp_θ).
        ref_weight, ref_bias: the reference's head; None: the policy's (a shared frozen head).
        beta: β of all three terms (0.1). delta: the anchor's δ (0).
        label_smoothing: of the DPO term.
        ignore_index: label of positions without a target.

    Returns:
        ``(loss, metrics)``: the metrics of the three heads (``rewards/*``, ``logps/*``, ``conditional/*``,
        ``anchor/*``) plus ``dpo/loss``.

    Example:
        >>> import torch
        >>> from vpo.oracle.mdpo import mdpo_loss
        >>> W = torch.eye(3, dtype=torch.float64)
        >>> h, y = torch.zeros(2, 1, 3, dtype=torch.float64), torch.tensor([[0], [1]])
        >>> loss, m = mdpo_loss(W, h, y, h[:1], y[:1], ref_hidden=h, ref_corrupt_hidden=h[:1])
        >>> round(loss.item(), 4)  # 3 log 2: every Δ is 0
        2.0794
    """
    head = heads(weight, bias, ref_weight, ref_bias)
    n_pairs = check_even_batch("hidden", check_float("hidden", hidden, ndim=3))
    check_rows(
        "corrupt_hidden", check_float("corrupt_hidden", corrupt_hidden, ndim=3), (n_pairs,),
        f"B={n_pairs} (the chosen response of each pair)",
    )  # fmt: skip
    check_reference_passes(
        [("ref_hidden", ref_hidden), ("ref_corrupt_hidden", ref_corrupt_hidden)], ref_weight, ref_bias
    )

    logps, ref_logps = pass_logps(
        "hidden", hidden, "labels", labels, "ref_hidden", ref_hidden, head, ignore_index=ignore_index
    )  # [2B]
    corrupt, ref_corrupt = pass_logps(
        "corrupt_hidden", corrupt_hidden, "corrupt_labels", corrupt_labels, "ref_corrupt_hidden", ref_corrupt_hidden,
        head, ignore_index=ignore_index,
    )  # [B]
    pos, rej = slice(0, n_pairs), slice(n_pairs, 2 * n_pairs)

    dpo, dpo_metrics = losses.dpo_loss(
        logps[pos], logps[rej], ref_logps[pos], ref_logps[rej], beta=beta, label_smoothing=label_smoothing
    )
    cond, cond_metrics = losses.mdpo_conditional_loss(logps[pos], corrupt, ref_logps[pos], ref_corrupt, beta=beta)
    anchor, anchor_metrics = losses.anchor_loss(logps[pos], ref_logps[pos], beta=beta, delta=delta)
    total = dpo + cond + anchor
    return total, merge_metrics(dpo_metrics, {"dpo/loss": dpo.detach()}, cond_metrics, anchor_metrics)
