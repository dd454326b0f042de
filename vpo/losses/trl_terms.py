"""The per-sequence terms TRL's ``DPOConfig`` options change, written once for the oracle, the fused losses and the
trainer: f-divergence scores (``f_divergence_type``), WPO weights (``use_weighting``) and LD-DPO's length-desensitized
sums (``ld_alpha``).

f-divergence (f-DPO): the implicit reward ``Δ = logp_θ − logp_ref`` of a response is replaced by ``f'(exp Δ)``::

    reverse_kl        Δ                                     (DPO)
    forward_kl        1 − exp(−Δ)
    js_divergence     log 2 + log σ(Δ)
    alpha_divergence  (exp((α−1) Δ) − 1) / (α−1)            (α = f_alpha_divergence_coef; α = 1 is reverse_kl;
                                                             (α−1) Δ is clamped at 80, 11 in float16, as TRL does)

Only the loss types built on the chosen − rejected difference take them (:data:`F_DIVERGENCE_LOSS_TYPES`): the others
keep a ``log Z(x)`` term that f-DPO's derivation cancels only in that difference.

WPO (Zhou et al. 2024, Eq. 2): a pair's loss is multiplied by ``w(y_w) · w(y_l)``, with, per response,
``w(y) = exp( (1/n) Σ_t [logp(y_t) − log Σ_v p_v²] )`` — the response's mean token log-prob relative to the policy's
own "greedy-ish" sampling probability ``Σ_v p_v²`` at that position — computed without gradient. ``log Σ_v p_v²`` needs
the whole vocabulary at each position: the fused losses get it from their vocabulary sweep.

LD-DPO (Liu et al. 2024): with ``ℓ = min(n_w, n_l)`` the pair's shared length, a row's term is
``Σ_{t ≤ ℓ} logp_t + α Σ_{t > ℓ} logp_t`` over its response tokens in order (α = 1: plain DPO; α = 0: the tail beyond
the shorter response is dropped), for the policy and the reference alike.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vpo._validate import check_choice, check_float, check_range, check_same_shape

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def f_divergence_scores(
    logratio: torch.Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> torch.Tensor:
    """``f'(exp Δ)`` of the implicit rewards ``Δ`` (any shape, same shape out; formulas in the module docstring).

    Example:
        >>> import torch
        >>> from vpo.losses import f_divergence_scores
        >>> f_divergence_scores(torch.tensor([0.0, 1.0]), "forward_kl")
        tensor([0.0000, 0.6321])
    """
    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)
    if f_divergence_type == "reverse_kl":
        return logratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    a = float(f_alpha_divergence_coef)
    if not math.isfinite(a):
        raise ValueError(f"f_alpha_divergence_coef must be a finite number, got {f_alpha_divergence_coef!r}")
    if abs(a - 1.0) < 1e-6:  # the α → 1 limit of (t^(α−1) − 1)/(α−1) is log t
        return logratio
    cap = 11.0 if logratio.dtype == torch.float16 else 80.0  # exp(cap) stays finite in the dtype
    return torch.expm1(((a - 1.0) * logratio).clamp(max=cap)) / (a - 1.0)


def check_f_divergence(f_divergence_type: str, loss_types: Tuple[str, ...]) -> None:
    """ValueError when a non-default ``f_divergence_type`` meets a loss type outside :data:`F_DIVERGENCE_LOSS_TYPES`."""
    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)
    bad = [t for t in loss_types if t not in F_DIVERGENCE_LOSS_TYPES]
    if f_divergence_type != "reverse_kl" and bad:
        raise ValueError(f"f_divergence_type={f_divergence_type!r} applies only to loss types "
                         f"{list(F_DIVERGENCE_LOSS_TYPES)}; loss_type {bad} has no f-divergence form: use "
                         "f_divergence_type='reverse_kl' with it")


def wpo_weights(logp: torch.Tensor, log_sum_p2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO's per-row weights ``[N]`` (no gradient), ``exp(mean over scored tokens of (logp − log Σ_v p_v²))``.

    Args:
        logp: ``[N, T]`` per-token log-probs of the targets (any value where ``mask`` is False).
        log_sum_p2: ``[N, T]`` ``log Σ_v p_v²`` of the policy's next-token distribution at each position.
        mask: ``[N, T]`` bool, the scored (response) tokens.

    Returns:
        ``[N]`` weights in (0, ∞); a row without scored tokens gets ``exp(0) = 1``. A pair's weight is
        ``w[chosen] · w[rejected]`` (pass it as ``pair_weights`` to :func:`vpo.losses.preference_pair_losses`).

    Example:
        >>> import torch
        >>> from vpo.losses import wpo_weights
        >>> lp = torch.log(torch.tensor([[0.5, 0.5]]))          # two tokens at p = 0.5, uniform over 2 words
        >>> wpo_weights(lp, torch.log(torch.tensor([[0.5, 0.5]])), torch.tensor([[True, True]]))
        tensor([1.])
    """
    check_float("logp", logp, ndim=2)
    check_same_shape("log_sum_p2", log_sum_p2, "logp", logp)
    check_same_shape("mask", mask, "logp", logp)
    with torch.no_grad():
        m = mask.to(logp.dtype)
        aligned = torch.where(mask, logp.detach() - log_sum_p2.detach().to(logp.dtype), torch.zeros_like(logp))
        return torch.exp(aligned.sum(-1) / m.sum(-1).clamp_min(1))


def log_sum_p2_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V] -> [...]``: ``log Σ_v p_v²`` with ``p = softmax(logits)`` (the oracle's materialized form)."""
    logp = torch.log_softmax(logits, dim=-1)
    return torch.logsumexp(2 * logp, dim=-1)


def ld_dpo_logps(logp: torch.Tensor, mask: torch.Tensor, ld_alpha: Optional[float]) -> torch.Tensor:
    """LD-DPO per-row terms ``[2B]`` from per-token log-probs ``[2B, T]`` (chosen rows first, then rejected):
    ``Σ_{k ≤ ℓ} logp + α Σ_{k > ℓ} logp`` with ``k`` the rank of a token among its row's scored tokens and
    ``ℓ = min(n_chosen, n_rejected)`` of the pair. ``ld_alpha=None`` is the plain sum.

    Example:
        >>> import torch
        >>> from vpo.losses import ld_dpo_logps
        >>> lp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]]); m = torch.tensor([[1, 1, 1], [1, 0, 0]]) > 0
        >>> ld_dpo_logps(lp, m, 0.5)                  # chosen: 1 shared token + 0.5 × 2 tail tokens
        tensor([-2., -2.])
    """
    check_float("logp", logp, ndim=2)
    check_same_shape("mask", mask, "logp", logp)
    mask = mask.bool()
    live = torch.where(mask, logp, torch.zeros_like(logp))
    if ld_alpha is None:
        return live.sum(-1)
    check_range("ld_alpha", ld_alpha, 0.0, 1.0)
    if logp.shape[0] % 2:
        raise ValueError(f"logp has {logp.shape[0]} rows: expected 2B (chosen rows, then rejected)")
    rank = mask.long().cumsum(-1)  # [2B, T]: 1-based rank of each scored token within its row
    n = mask.sum(-1)  # [2B]
    B = logp.shape[0] // 2
    shared = torch.minimum(n[:B], n[B:]).repeat(2)  # [2B]
    tail = rank > shared[:, None]
    return torch.where(tail, ld_alpha * live, live).sum(-1)
