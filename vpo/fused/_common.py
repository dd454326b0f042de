"""Shared pieces of the fused preference losses: argument checks, the reference side, the output dataclass.

Layout (Liger-Kernel's convention): ``hidden`` ``[2B, T, D]`` holds the B chosen rows first, then the B rejected rows;
``labels`` ``[2B, T]`` is aligned with it (``hidden[:, t]`` predicts ``labels[:, t]``; the caller shifts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from vpo._heads import check_labels_like, check_linear_head, default_reference_head
from vpo._validate import check_even_batch, check_float, check_labels


@dataclass(frozen=True)
class PreferenceOutput:
    """What a fused preference loss reports besides the loss. All tensors are detached.

    Attributes:
        chosen_logps, rejected_logps: ``[B]`` the policy's per-sequence log-probs ``Σ_i logp_θ(y_i)``.
        chosen_rewards, rejected_rewards: ``[B]`` β (policy − reference) per sequence.
        margins: ``[B]`` chosen_rewards − rejected_rewards.
        accuracy: 0-dim, fraction of pairs with margin > 0.
        metrics: TRL-named batch means (``rewards/chosen``, ``rewards/margins``, ``logps/chosen``, …) for logging.
    """

    chosen_logps: torch.Tensor  # [B] plain Σ_i logp_θ(y_i)
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


def validate_pair_batch(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], *, hidden_name: str = "hidden") -> int:
    """Check the ``[2B, T, D]`` / ``[2B, T]`` preference layout and the head; return B."""
    check_float(hidden_name, hidden, ndim=3)
    check_labels("labels", labels, ndim=2)
    check_labels_like(labels, hidden, hidden_name=hidden_name)
    B = check_even_batch(hidden_name, hidden)
    check_linear_head(hidden, weight, bias, names=(hidden_name, "weight", "bias"))
    return B


def reference_head(weight, bias, ref_weight, ref_bias, ref_hidden):
    """The reference LM head, detached: ``ref_weight``/``ref_bias`` if given, checked against ``ref_hidden``;
    ``ref_weight=None`` shares the policy's ``weight`` and ``bias`` (then ``ref_bias`` must be None too, as in the
    oracle)."""
    ref_weight, ref_bias, shared = default_reference_head(weight, bias, ref_weight, ref_bias)
    if not shared:
        check_linear_head(ref_hidden, ref_weight, ref_bias, names=("ref_hidden", "ref_weight", "ref_bias"))
    return ref_weight.detach(), None if ref_bias is None else ref_bias.detach()


def make_output(chosen, rejected, ref_chosen, ref_rejected, beta: float, metrics) -> PreferenceOutput:
    with torch.no_grad():
        cr = beta * (chosen.detach() - ref_chosen.detach())
        rr = beta * (rejected.detach() - ref_rejected.detach())
        margins = cr - rr
        return PreferenceOutput(
            chosen_logps=chosen.detach(), rejected_logps=rejected.detach(), chosen_rewards=cr, rejected_rewards=rr,
            margins=margins, accuracy=(margins > 0).float().mean(), metrics=dict(metrics),
        )
