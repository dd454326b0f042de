"""TRL's DPO loss types (``loss_type`` names and formulas) on per-sequence terms; one per-pair function that the fused
losses, the trainer's other methods and the tests share."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vpo._validate import check_positive, check_range
from vpo.losses.heads import Metrics, _check_real, _check_seqs, preference_metrics

# ---------------------------------------------------------------------------------------------------------------------
# DPO loss types (TRL's ``DPOConfig.loss_type`` names and formulas), on per-sequence terms.
#
# With Δ_w = chosen − ref_chosen, Δ_l = rejected − ref_rejected, d = Δ_w − Δ_l, ε = label_smoothing, n_w / n_l the
# response token counts (clamped to ≥ 1), every type gives a per-pair loss ``[B]``:
#
#   sigmoid        −(1−ε) log σ(βd) − ε log σ(−βd)                      (DPO; conservative DPO with ε > 0)
#   robust         (−(1−ε) log σ(βd) + ε log σ(−βd)) / (1 − 2ε)        (rDPO: unbiased under label-flip rate ε)
#   hinge          max(0, 1 − βd)                                        (RSO / SLiC)
#   ipo            (Δ_w/n_w − Δ_l/n_l − 1/(2β))²                         (IPO; per-token averages, as TRL does)
#   apo_zero       (1 − σ(βΔ_w)) + σ(βΔ_l)                               (APO-zero: chosen up, rejected down)
#   sigmoid_norm   −log σ(β (Δ_w/n_w − Δ_l/n_l))                         (length-normalized DPO)
#   sft            −Σ_t logp(y_w,t) / n̄_w                               (NLL of the chosen response; n̄_w = the
#                  batch mean of n_w, so the batch mean is the token mean over the batch's chosen tokens, TRL's
#                  cross-entropy)
#
# ``loss_type`` may be a list, with ``loss_weights`` (default all 1): the per-pair loss is Σ_k weight_k · loss_k.
# ---------------------------------------------------------------------------------------------------------------------

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "apo_zero", "sigmoid_norm", "sft")


def resolve_loss_types(loss_type="sigmoid", loss_weights=None) -> Tuple[Tuple[str, ...], Tuple[float, ...]]:
    """``loss_type`` (a name or a list of names from :data:`LOSS_TYPES`) and ``loss_weights`` (None: all 1) checked
    and returned as tuples."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type) if isinstance(loss_type, (list, tuple)) \
        else None
    if not types or not all(isinstance(t, str) for t in types):
        raise ValueError(f"loss_type must be a str or a non-empty list of str from {list(LOSS_TYPES)}, got {loss_type!r}")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {t!r}")
    if loss_weights is None:
        return types, (1.0,) * len(types)
    if isinstance(loss_weights, (int, float)) and not isinstance(loss_weights, bool):
        loss_weights = [loss_weights]
    if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(types):
        raise ValueError(
            f"loss_weights must be a list of {len(types)} floats (one per loss_type {list(types)}), got {loss_weights!r}"
        )
    for w in loss_weights:
        _check_real("loss_weights", w)
    return types, tuple(float(w) for w in loss_weights)


def preference_pair_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type="sigmoid",
    loss_weights=None,
    chosen_tokens: Optional[torch.Tensor] = None,
    rejected_tokens: Optional[torch.Tensor] = None,
    chosen_nll: Optional[torch.Tensor] = None,
    mean_chosen_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-pair loss ``[B]`` of the given DPO loss type(s) (formulas above), differentiable in every input.

    Args:
        chosen, rejected, ref_chosen, ref_rejected: ``[B]`` per-sequence terms of the policy and the reference
            (plain ``Σ_t logp`` for DPO; TPO's ``Σ_t (logp + log c)``; Cat-PO's weighted ``Σ_t w_t logp``).
        beta: β > 0; label_smoothing: ε in [0, 0.5) (``sigmoid``, ``robust``).
        loss_type, loss_weights: see :func:`resolve_loss_types`.
        chosen_tokens, rejected_tokens: ``[B]`` response token counts (``ipo``, ``sigmoid_norm``, ``sft``).
        chosen_nll: ``[B]`` ``−Σ_t logp(y_w,t)`` for ``sft`` (default ``−chosen``).
        mean_chosen_tokens: 0-dim n̄_w for ``sft`` when ``chosen`` is a slice of a larger batch (default: the mean of
            ``chosen_tokens``).

    Returns:
        ``[B]``; the loss is its mean over the batch.

    Example:
        >>> import torch
        >>> from vpo.losses import preference_pair_losses
        >>> t = torch.tensor
        >>> preference_pair_losses(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=1.0, loss_type="hinge")
        tensor([0.])
    """
    types, weights = resolve_loss_types(loss_type, loss_weights)
    _check_seqs(("chosen", chosen), ("rejected", rejected), ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected))
    check_positive("beta", beta)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=True)
    needs_tokens = {"ipo", "sigmoid_norm", "sft"} & set(types)
    if needs_tokens and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"loss_type {sorted(needs_tokens)} needs chosen_tokens and rejected_tokens (token counts)")
    d_w, d_l = chosen - ref_chosen, rejected - ref_rejected  # [B]
    eps = label_smoothing
    total = torch.zeros_like(chosen)
    for name, weight in zip(types, weights):
        if name in ("ipo", "sigmoid_norm"):
            n_w = chosen_tokens.to(chosen.dtype).clamp_min(1)
            n_l = rejected_tokens.to(chosen.dtype).clamp_min(1)
            d_norm = d_w / n_w - d_l / n_l
        if name == "sigmoid":
            per = -(1 - eps) * F.logsigmoid(beta * (d_w - d_l))
            if eps:
                per = per - eps * F.logsigmoid(-beta * (d_w - d_l))
        elif name == "robust":
            m = beta * (d_w - d_l)
            per = (-(1 - eps) * F.logsigmoid(m) + eps * F.logsigmoid(-m)) / (1 - 2 * eps)
        elif name == "hinge":
            per = torch.relu(1 - beta * (d_w - d_l))
        elif name == "ipo":
            per = (d_norm - 1 / (2 * beta)) ** 2
        elif name == "apo_zero":
            per = (1 - torch.sigmoid(beta * d_w)) + torch.sigmoid(beta * d_l)
        elif name == "sigmoid_norm":
            per = -F.logsigmoid(beta * d_norm)
        else:  # sft
            nll = -chosen if chosen_nll is None else chosen_nll
            n_bar = chosen_tokens.to(chosen.dtype).mean() if mean_chosen_tokens is None else mean_chosen_tokens
            per = nll / n_bar.to(chosen.dtype).clamp_min(1)
        total = total + weight * per
    return total


def preference_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type="sigmoid",
    loss_weights=None,
    chosen_tokens: Optional[torch.Tensor] = None,
    rejected_tokens: Optional[torch.Tensor] = None,
    chosen_nll: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """:func:`preference_pair_losses` averaged over the batch, with :func:`preference_metrics` (``rewards/*`` are
    β (term − reference term), whatever the loss type). ``loss_type="sigmoid"`` is :func:`dpo_loss`.

    Example:
        >>> import torch
        >>> from vpo.losses import preference_loss
        >>> t = torch.tensor
        >>> loss, m = preference_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=1.0, loss_type="ipo",
        ...                           chosen_tokens=t([1]), rejected_tokens=t([1]))
        >>> loss.item()   # (0.5 - (-0.5) - 1/2)^2
        0.25
    """
    per = preference_pair_losses(
        chosen, rejected, ref_chosen, ref_rejected, beta=beta, label_smoothing=label_smoothing,
        loss_type=loss_type, loss_weights=loss_weights, chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens, chosen_nll=chosen_nll,
    )
    metrics = preference_metrics(beta * (chosen - ref_chosen), beta * (rejected - ref_rejected), chosen, rejected)
    return per.mean(), metrics
