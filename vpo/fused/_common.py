"""Shared pieces of the fused preference losses: argument checks, the reference side, the output dataclass.

Layout (Liger-Kernel's convention): ``hidden`` ``[2B, T, D]`` holds the B chosen rows first, then the B rejected rows;
``labels`` ``[2B, T]`` is aligned with it (``hidden[:, t]`` predicts ``labels[:, t]``; the caller shifts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from vpo._validate import (
    check_even_batch,
    check_float,
    check_labels,
    check_like,
    check_same_device,
    check_same_dtype,
    check_same_shape,
)


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
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but {hidden_name} has shape {tuple(hidden.shape)}: "
            f"expected labels.shape == {hidden_name}.shape[:-1]"
        )
    check_same_device("labels", labels, hidden_name, hidden)
    B = check_even_batch(hidden_name, hidden)
    check_float("weight", weight, ndim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but {hidden_name} has shape {tuple(hidden.shape)}: "
            f"expected weight.shape[1] == {hidden_name}.shape[-1]"
        )
    check_same_device("weight", weight, hidden_name, hidden)
    check_same_dtype("weight", weight, hidden_name, hidden)
    if bias is not None:
        check_float("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}: expected ({weight.shape[0]},) = (weight.shape[0],)")
        check_same_device("bias", bias, "weight", weight)
        check_same_dtype("bias", bias, "weight", weight)
    return B


def resolve_reference(ref_hidden, ref_logps, hidden: torch.Tensor, *, extra_ref=None, extra_name: str = "") -> str:
    """Exactly one of the reference passes (``ref_hidden``…) and ``ref_logps`` must be given.

    Returns ``"logps"`` or ``"hidden"``.
    """
    given_hidden = ref_hidden is not None or extra_ref is not None
    if given_hidden == (ref_logps is not None):
        names = "ref_hidden" + (f"/{extra_name}" if extra_name else "")
        raise ValueError(
            f"give exactly one of {names} (reference passes) and ref_logps (precomputed per-sequence reference terms), "
            f"got {'both' if given_hidden else 'neither'}"
        )
    if ref_logps is not None:
        check_float("ref_logps", ref_logps, ndim=1)
        if ref_logps.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"ref_logps has shape {tuple(ref_logps.shape)}: expected ({hidden.shape[0]},) = one value per row of hidden"
            )
        check_same_device("ref_logps", ref_logps, "hidden", hidden)
        return "logps"
    if ref_hidden is None:
        raise ValueError(f"{extra_name} was given without ref_hidden: give both reference passes")
    if extra_name and extra_ref is None:
        raise ValueError(f"ref_hidden was given without {extra_name}: give both reference passes")
    check_float("ref_hidden", ref_hidden, ndim=3)
    check_same_shape("ref_hidden", ref_hidden, "hidden", hidden)
    check_same_device("ref_hidden", ref_hidden, "hidden", hidden)
    if extra_ref is not None:
        check_like(extra_name, extra_ref, "ref_hidden", ref_hidden)
    return "hidden"


def reference_head(weight, bias, ref_weight, ref_bias, ref_hidden):
    """The reference LM head, detached: ``ref_weight``/``ref_bias`` if given; ``ref_weight=None`` shares the policy's
    ``weight`` and ``bias`` (then ``ref_bias`` must be None too, as in the oracle)."""
    if ref_weight is None:
        if ref_bias is not None:
            raise ValueError(
                "ref_bias is given but ref_weight is None: expected both (a separate reference head) "
                "or neither (the reference shares the policy's weight and bias)"
            )
        return weight.detach(), None if bias is None else bias.detach()
    check_float("ref_weight", ref_weight, ndim=2)
    if ref_weight.shape[1] != ref_hidden.shape[-1]:
        raise ValueError(
            f"ref_weight has shape {tuple(ref_weight.shape)} but ref_hidden has shape {tuple(ref_hidden.shape)}: "
            "expected ref_weight.shape[1] == ref_hidden.shape[-1]"
        )
    check_same_device("ref_weight", ref_weight, "ref_hidden", ref_hidden)
    if ref_bias is not None:
        check_float("ref_bias", ref_bias, ndim=1)
        if ref_bias.shape[0] != ref_weight.shape[0]:
            raise ValueError(f"ref_bias has shape {tuple(ref_bias.shape)}: expected ({ref_weight.shape[0]},)")
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
