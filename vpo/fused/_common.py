"""Shared pieces of the fused preference losses: argument checks, the reference side, the output dataclass.

Layout (Liger-Kernel's convention): ``hidden`` ``[2B, T, D]`` holds the B chosen rows first, then the B rejected rows;
``labels`` ``[2B, T]`` is aligned with it (``hidden[:, t]`` predicts ``labels[:, t]``; the caller shifts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

import vpo.distributed
from vpo._heads import check_head_transform, check_labels_like, check_linear_head, default_reference_head  # noqa: F401
from vpo._validate import (assert_labels_in_range, check_choice, check_even_batch, check_float, check_labels,
                           check_range)
from vpo.losses import ld_dpo_logps, wpo_weights

IMPLS = ("auto", "torch", "triton")


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


def unshard(weight, bias, ref_weight, ref_bias):
    """The sharded-head hook (:func:`vpo.distributed.unshard_head`) for the policy's head and, when given, the
    reference's."""
    weight, bias = vpo.distributed.unshard_head(weight, bias)
    if ref_weight is not None:
        ref_weight, ref_bias = vpo.distributed.unshard_head(ref_weight, ref_bias)
    return weight, bias, ref_weight, ref_bias


def resolve_path(impl, labels, vocab_size: int, ignore_index: int) -> str:
    """``"engine"`` (``impl`` = ``"auto"`` or ``"torch"``: :mod:`vpo.fused._engine`, on CPU and CUDA) or ``"triton"``
    (the composition through :func:`vpo.linear_logprobs` with ``impl="triton"``). Also checks the label range without a
    host sync (:func:`vpo._validate.assert_labels_in_range`)."""
    check_choice("impl", impl, IMPLS)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    assert_labels_in_range("labels", labels, vocab_size, ignore_index)
    return "triton" if impl == "triton" else "engine"


def wanted_grads(**tensors) -> tuple:
    """Names of the given tensors that need a gradient in this call (none under ``torch.no_grad()``)."""
    if not torch.is_grad_enabled():
        return ()
    return tuple(name for name, t in tensors.items() if t is not None and t.requires_grad)


def token_metrics(tok, mask: torch.Tensor, B: int) -> Dict[str, torch.Tensor]:
    """Per-token metrics over the scored tokens, from the vocabulary sweep's statistics (nothing materialized).

    TRL's names and meanings: ``logits/chosen``, ``logits/rejected`` (the mean logit over the vocabulary, averaged
    over the chosen / rejected scored tokens), ``mean_token_accuracy`` (fraction of the chosen rows' scored tokens whose
    target is the argmax, as TRL 1.16 counts it), ``entropy`` (mean per-token entropy in nats, pooled). vpo's split metrics:
    ``entropy/chosen``, ``entropy/rejected``; ``num_tokens/chosen``, ``num_tokens/rejected`` (the mean number of
    scored tokens per chosen / rejected row, float, as the trainer's ``token_count_metrics``). A metric whose
    per-token statistic the path did not compute (``impl="triton"`` computes no entropy, mean logit or argmax) is left
    out."""
    with torch.no_grad():
        m = mask.to(tok["logp"].dtype)
        out = {}
        n_all = m.sum().clamp_min(1)
        if "entropy" in tok:
            out["entropy"] = (tok["entropy"] * m).sum() / n_all
        if "is_argmax" in tok:  # TRL 1.16 counts the chosen rows' tokens only
            out["mean_token_accuracy"] = (tok["is_argmax"][:B] * m[:B]).sum() / m[:B].sum().clamp_min(1)
        for name, sl in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
            n = m[sl].sum()
            if "entropy" in tok:
                out[f"entropy/{name}"] = (tok["entropy"][sl] * m[sl]).sum() / n.clamp_min(1)
            if "mean_logit" in tok:
                out[f"logits/{name}"] = (tok["mean_logit"][sl] * m[sl]).sum() / n.clamp_min(1)
            out[f"num_tokens/{name}"] = n / (sl.stop - sl.start)
        return out


def check_trl_terms(path: str, use_weighting, ld_alpha) -> None:
    """``use_weighting`` (WPO) must be a bool and needs the engine's ``log Σ p²`` (not ``impl="triton"``); ``ld_alpha``
    None or in [0, 1]."""
    if not isinstance(use_weighting, bool):
        raise ValueError(f"use_weighting must be a bool, got {use_weighting!r}")
    if use_weighting and path == "triton":
        raise ValueError("use_weighting needs impl='auto' or 'torch' (its log Σ p² comes from the engine's vocabulary "
                         "sweep); impl='triton' does not compute it")
    if ld_alpha is not None:
        check_range("ld_alpha", ld_alpha, 0.0, 1.0)


def row_sums(terms: torch.Tensor, mask: torch.Tensor, ld_alpha) -> torch.Tensor:
    """``[2P, T] -> [2P]``: the per-row sums of per-token terms (0 at ignored positions), or LD-DPO's
    length-desensitized sums with ``ld_alpha`` (:func:`vpo.losses.ld_dpo_logps`; rows laid out chosen first)."""
    return terms.sum(1) if ld_alpha is None else ld_dpo_logps(terms, mask, ld_alpha)


def wpo_pair_weights(tok, mask: torch.Tensor, P: int) -> torch.Tensor:
    """WPO's ``[P]`` pair weights ``w(y_w) · w(y_l)`` from the sweep's ``logp`` and ``log_sum_p2`` ``[2P, T]``."""
    w = wpo_weights(tok["logp"], tok["log_sum_p2"], mask)
    return w[:P] * w[P:]
