"""Oracle for LPOI's loss from last hidden states (docs/methods.md "LPOI"; paper 004, Algorithm 1 and eq. 1).

``L_LPOI = L_DPO + L_anchor + L_list``. The list scores the chosen response w under L images ranked best first:
x_1 the original image, x_2 … x_L the interpolated (progressively masked, visually prompted) negatives. x_1's pass is
the chosen rows of the DPO pass, so only the L − 1 other images need passes of their own (``list_hidden``). The math
is in :mod:`vpo.losses` (``dpo_loss``, ``anchor_loss``, ``listwise_loss``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vpo import losses
from vpo._validate import check_even_batch, check_float
from vpo._heads import check_reference_passes, check_rows
from vpo.oracle.dpo import Metrics, heads, merge_metrics, pass_logps


def lpoi_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    list_hidden: torch.Tensor,
    list_labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_list_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    delta: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tuple[torch.Tensor, Metrics]:
    """LPOI: ``L_DPO + L_anchor + L_list`` from hidden states, materializing the logits.

    Args:
        weight, bias: the policy's LM head ``[V, D]``, ``[V]`` (optional).
        hidden, labels: ``[2B, T, D]``, ``[2B, T]`` with the original image x_1: chosen rows first, then rejected.
        list_hidden, list_labels: ``[B, L-1, T', D]``, ``[B, L-1, T']``: the chosen response w given the images
            x_2 … x_L of the list (more masked to the right). The list has L = 1 + list_hidden.shape[1] images.
        ref_hidden, ref_list_hidden: the reference's hidden states for the same passes (same shapes; they share the
            policy's labels), both or neither (reference-free: Δ = logp_θ).
        ref_weight, ref_bias: the reference's head; None: the policy's (a shared frozen head).
        beta: β of all three terms (0.1). delta: the anchor's δ (0).
        label_smoothing: of the DPO term.
        ignore_index: label of positions without a target.

    Returns:
        ``(loss, metrics)``: the metrics of the three heads (``rewards/*``, ``logps/*``, ``anchor/*``, ``listwise/*``)
        plus ``dpo/loss``.

    Example:
        >>> import torch
        >>> from vpo.oracle.lpoi import lpoi_loss
        >>> W = torch.eye(3, dtype=torch.float64)
        >>> h, y = torch.zeros(2, 1, 3, dtype=torch.float64), torch.tensor([[0], [1]])
        >>> hl, yl = torch.zeros(1, 4, 1, 3, dtype=torch.float64), torch.zeros(1, 4, 1, dtype=torch.long)
        >>> loss, m = lpoi_loss(W, h, y, hl, yl, ref_hidden=h, ref_list_hidden=hl)
        >>> round(loss.item(), 4)  # log 2 + log 2 + (log 5 + log 4 + log 3 + log 2): every S_k is 0
        6.1738
    """
    head = heads(weight, bias, ref_weight, ref_bias)
    n_pairs = check_even_batch("hidden", check_float("hidden", hidden, ndim=3))
    check_rows(
        "list_hidden", check_float("list_hidden", list_hidden, ndim=4), (n_pairs,), f"B={n_pairs} (one list per pair)"
    )
    check_reference_passes([("ref_hidden", ref_hidden), ("ref_list_hidden", ref_list_hidden)], ref_weight, ref_bias)

    logps, ref_logps = pass_logps(
        "hidden", hidden, "labels", labels, "ref_hidden", ref_hidden, head, ignore_index=ignore_index
    )  # [2B]
    list_logps, ref_list_logps = pass_logps(
        "list_hidden", list_hidden, "list_labels", list_labels, "ref_list_hidden", ref_list_hidden, head,
        ignore_index=ignore_index, ndim=4,
    )  # [B, L-1]
    pos, rej = slice(0, n_pairs), slice(n_pairs, 2 * n_pairs)

    dpo, dpo_metrics = losses.dpo_loss(
        logps[pos], logps[rej], ref_logps[pos], ref_logps[rej], beta=beta, label_smoothing=label_smoothing
    )
    anchor, anchor_metrics = losses.anchor_loss(logps[pos], ref_logps[pos], beta=beta, delta=delta)
    # Column 0 of the list is the original image: the chosen rows of the DPO pass.
    full_list = torch.cat([logps[pos, None], list_logps], dim=1)  # [B, L]
    ref_full_list = torch.cat([ref_logps[pos, None], ref_list_logps], dim=1)  # [B, L]
    listwise, list_metrics = losses.listwise_loss(full_list, ref_full_list, beta=beta)
    total = dpo + anchor + listwise
    return total, merge_metrics(dpo_metrics, {"dpo/loss": dpo.detach()}, anchor_metrics, list_metrics)
