"""TRL's DPO loss types (``loss_type`` names and formulas) on per-sequence terms; one per-pair function that the fused
losses, the trainer's other methods and the tests share."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vpo._validate import check_positive, check_range
from vpo.losses._common import Metrics, _check_real, _check_seqs
from vpo.losses.heads import preference_metrics
from vpo.losses.trl_terms import check_f_divergence, f_divergence_scores

# ---------------------------------------------------------------------------------------------------------------------
# DPO loss types (TRL's ``DPOConfig.loss_type`` names and formulas), on per-sequence terms.
#
# With Δ_w = chosen − ref_chosen, Δ_l = rejected − ref_rejected, s_w, s_l their f-divergence scores
# (:func:`vpo.losses.f_divergence_scores`; s = Δ for the default reverse_kl), d = s_w − s_l, ε = label_smoothing,
# n_w / n_l the response token counts (clamped to ≥ 1), every type gives a per-pair loss ``[B]``:
#
#   sigmoid        −(1−ε) log σ(βd) − ε log σ(−βd)                      (DPO; conservative DPO with ε > 0 — TRL 1.16
#                                                                        ignores ε here, docs/trl.md)
#   robust         (−(1−ε) log σ(βd) + ε log σ(−βd)) / (1 − 2ε)        (rDPO: unbiased under label-flip rate ε)
#   hinge          max(0, 1 − βd)                                        (RSO / SLiC)
#   ipo            (s_w/n_w − s_l/n_l − 1/(2β))²                         (IPO; per-token averages, as TRL does)
#   exo_pair       q log(q/(1−ε)) + (1−q) log((1−q)/ε),  q = σ(βd)      (EXO, K = 2: KL to the smoothed label; ε > 0)
#   nca_pair       −log σ(βΔ_w) − ½ log σ(−βΔ_w) − ½ log σ(−βΔ_l)       (NCA)
#   bco_pair       −log σ(βΔ_w − δ) − log σ(−(βΔ_l − δ))                 (BCO; δ = bco_delta, the running mean of the
#                                                                        rewards in the BCO paper; 0 = TRL 1.16)
#   sppo_hard      (Δ_w − 1/(2β))² + (Δ_l + 1/(2β))²                     (SPPO with hard 1/0 win probabilities)
#   aot            cDPO form on sort(chosen − rejected) − sort(ref_chosen − ref_rejected), sorted over the batch
#   aot_unpaired   cDPO form on sort(Δ_w) − sort(Δ_l)                    (AOT: the batch's order statistics)
#   apo_zero       (1 − σ(βΔ_w)) + σ(βΔ_l)                               (APO-zero: chosen up, rejected down)
#   apo_down       σ(βΔ_w) + (1 − σ(β(Δ_w − Δ_l)))                       (APO-down: both down, rejected more)
#   discopop       (1−m)·(−log σ(x)) + m·exp(−x),  x = βd, m = σ(x/τ)    (DiscoPOP; τ = discopop_tau)
#   sigmoid_norm   −log σ(β (s_w/n_w − s_l/n_l))                         (length-normalized DPO)
#   sft            −Σ_t logp(y_w,t) / n̄_w                               (NLL of the chosen response; n̄_w = the
#                  batch mean of n_w, so the batch mean is the token mean over the batch's chosen tokens, TRL's
#                  cross-entropy)
#
# ``aot``/``aot_unpaired`` couple the pairs of a batch (sorting): they need every pair in one call, and their ``[B]``
# entries are per sorted position (only the mean is meaningful). ``loss_type`` may be a list, with ``loss_weights``
# (default all 1): the per-pair loss is Σ_k weight_k · loss_k, times ``pair_weights`` (WPO) when given.
# ---------------------------------------------------------------------------------------------------------------------

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "apo_zero", "sigmoid_norm", "sft", "exo_pair", "nca_pair",
              "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_down", "discopop")
# The types that read label_smoothing (ε); the others ignore it.
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
# The types whose per-pair loss depends on the other pairs of the batch.
BATCH_LOSS_TYPES = ("aot", "aot_unpaired")


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


def _smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The conservative (cDPO) form ``−(1−ε) log σ(x) − ε log σ(−x)``."""
    out = -(1 - eps) * F.logsigmoid(x)
    return out - eps * F.logsigmoid(-x) if eps else out


def _sorted_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sort(a, dim=0).values - torch.sort(b, dim=0).values


def check_loss_options(types, *, beta: float, label_smoothing: float, f_divergence_type: str = "reverse_kl",
                       discopop_tau: float = 0.05) -> None:
    """The scalar options of :func:`preference_pair_losses` for ``types``; ValueError naming the argument."""
    check_positive("beta", beta)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=True)
    if "exo_pair" in types and label_smoothing == 0:
        raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (its ε; the EXO paper uses 1e-3), got 0")
    if "discopop" in types:
        check_positive("discopop_tau", discopop_tau)
    check_f_divergence(f_divergence_type, types)


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
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: Optional[torch.Tensor] = None,
    pair_weights: Optional[torch.Tensor] = None,
    n_pairs: Optional[int] = None,
) -> torch.Tensor:
    """Per-pair loss ``[B]`` of the given DPO loss type(s) (formulas above), differentiable in every input.

    Args:
        chosen, rejected, ref_chosen, ref_rejected: ``[B]`` per-sequence terms of the policy and the reference
            (plain ``Σ_t logp`` for DPO; TPO's ``Σ_t (logp + log c)``; Cat-PO's weighted ``Σ_t w_t logp``; LD-DPO's
            :func:`vpo.losses.ld_dpo_logps`).
        beta: β > 0; label_smoothing: ε in [0, 0.5) (read by :data:`SMOOTHED_LOSS_TYPES`; ``exo_pair`` needs ε > 0).
        loss_type, loss_weights: see :func:`resolve_loss_types`.
        chosen_tokens, rejected_tokens: ``[B]`` response token counts (``ipo``, ``sigmoid_norm``, ``sft``).
        chosen_nll: ``[B]`` ``−Σ_t logp(y_w,t)`` for ``sft`` (default ``−chosen``).
        mean_chosen_tokens: 0-dim n̄_w for ``sft`` when ``chosen`` is a slice of a larger batch (default: the mean of
            ``chosen_tokens``).
        f_divergence_type, f_alpha_divergence_coef: f-DPO's scores (:func:`vpo.losses.f_divergence_scores`), for
            the types in :data:`vpo.losses.F_DIVERGENCE_LOSS_TYPES` only.
        discopop_tau: τ > 0 of ``discopop`` (0.05, TRL's and the paper's default).
        bco_delta: 0-dim reward shift δ of ``bco_pair`` (default 0, as TRL 1.16; no gradient flows into it).
        pair_weights: ``[B]`` per-pair factors (WPO: ``w(y_w) · w(y_l)`` from :func:`vpo.losses.wpo_weights`),
            detached; not with ``aot``/``aot_unpaired`` (their entries are sorted positions, not pairs).
        n_pairs: the batch's pair count when known; ``aot``/``aot_unpaired`` raise unless all of them are here.

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
    check_loss_options(types, beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
                       discopop_tau=discopop_tau)
    needs_tokens = {"ipo", "sigmoid_norm", "sft"} & set(types)
    if needs_tokens and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"loss_type {sorted(needs_tokens)} needs chosen_tokens and rejected_tokens (token counts)")
    coupled = [t for t in types if t in BATCH_LOSS_TYPES]
    if coupled and n_pairs is not None and n_pairs != chosen.shape[0]:
        raise ValueError(f"loss_type {coupled} sorts over the whole batch: it needs all {n_pairs} pairs in one call, "
                         f"got {chosen.shape[0]} (fused losses: Chunking(pairs=B))")
    if coupled and pair_weights is not None:
        raise ValueError(f"pair_weights (WPO's use_weighting) cannot weight loss_type {coupled}: they sort the batch, "
                         "so their entries are not pairs")
    if pair_weights is not None:
        _check_seqs(("pair_weights", pair_weights), ("chosen", chosen))
    d_w, d_l = chosen - ref_chosen, rejected - ref_rejected  # [B]
    s_w = f_divergence_scores(d_w, f_divergence_type, f_alpha_divergence_coef)
    s_l = f_divergence_scores(d_l, f_divergence_type, f_alpha_divergence_coef)
    d = s_w - s_l
    eps = label_smoothing
    total = torch.zeros_like(chosen)
    for name, weight in zip(types, weights):
        if name in ("ipo", "sigmoid_norm"):
            n_w = chosen_tokens.to(chosen.dtype).clamp_min(1)
            n_l = rejected_tokens.to(chosen.dtype).clamp_min(1)
            d_norm = s_w / n_w - s_l / n_l
        if name == "sigmoid":
            per = _smoothed(beta * d, eps)
        elif name == "robust":
            m = beta * d
            per = (-(1 - eps) * F.logsigmoid(m) + eps * F.logsigmoid(-m)) / (1 - 2 * eps)
        elif name == "hinge":
            per = torch.relu(1 - beta * d)
        elif name == "ipo":
            per = (d_norm - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            x = beta * d
            per = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) \
                + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps))
        elif name == "nca_pair":
            per = -F.logsigmoid(beta * d_w) - 0.5 * F.logsigmoid(-beta * d_w) - 0.5 * F.logsigmoid(-beta * d_l)
        elif name == "bco_pair":
            delta = 0.0 if bco_delta is None else bco_delta.detach().to(chosen.dtype)
            per = -F.logsigmoid(beta * d_w - delta) - F.logsigmoid(-(beta * d_l - delta))
        elif name == "sppo_hard":
            per = (d_w - 0.5 / beta) ** 2 + (d_l + 0.5 / beta) ** 2
        elif name == "aot":
            per = _smoothed(beta * _sorted_delta(chosen - rejected, ref_chosen - ref_rejected), eps)
        elif name == "aot_unpaired":
            per = _smoothed(beta * _sorted_delta(d_w, d_l), eps)
        elif name == "apo_zero":
            per = (1 - torch.sigmoid(beta * d_w)) + torch.sigmoid(beta * d_l)
        elif name == "apo_down":
            per = torch.sigmoid(beta * d_w) + (1 - torch.sigmoid(beta * (d_w - d_l)))
        elif name == "discopop":
            x = beta * d
            m = torch.sigmoid(x / discopop_tau)
            per = -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m
        elif name == "sigmoid_norm":
            per = -F.logsigmoid(beta * d_norm)
        else:  # sft
            nll = -chosen if chosen_nll is None else chosen_nll
            n_bar = chosen_tokens.to(chosen.dtype).mean() if mean_chosen_tokens is None else mean_chosen_tokens
            per = nll / n_bar.to(chosen.dtype).clamp_min(1)
        total = total + weight * per
    if pair_weights is not None:
        total = total * pair_weights.detach()
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
    **options,
) -> Tuple[torch.Tensor, Metrics]:
    """:func:`preference_pair_losses` averaged over the batch, with :func:`preference_metrics` (``rewards/*`` are
    β (term − reference term), whatever the loss type). ``loss_type="sigmoid"`` is :func:`dpo_loss`. ``options``:
    the other keywords of :func:`preference_pair_losses` (``f_divergence_type``, ``discopop_tau``, ...).

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
        rejected_tokens=rejected_tokens, chosen_nll=chosen_nll, **options,
    )
    metrics = preference_metrics(beta * (chosen - ref_chosen), beta * (rejected - ref_rejected), chosen, rejected)
    return per.mean(), metrics
