"""Fused Cat-PO (cross-modal adaptive token rewards; docs/methods.md, Cat-PO), without vocab logits.

    π^(w) = Σ_t w⁺_t logp(y⁺_t) − Σ_t w⁻_t logp(y⁻_t)             for policy and reference
    L_wDPO = −log σ(β (π^(w)_θ − π^(w)_ref))                       = DPO on the weighted per-sequence sums
    L_KL   = λ (Σ_t w⁺_t KL_t⁺ + Σ_t w⁻_t KL_t⁻)                   mean over pairs, KL over the full vocab
    L      = L_wDPO + L_KL

The weights ``w`` are constants (computed once from the reference model, e.g. with
:func:`vpo.integrations.catpo_weights_for_batch`). The engine (:mod:`vpo.fused._engine`) sweeps the reference's logits
tile by tile alongside the policy's: one sweep gives both log-probs and ``KL_t = E_p[z_θ − z_ref] − lse_θ + lse_ref``,
and the policy's gradient (wDPO and KL) is formed in the forward.

Loss types (``loss_type``) replace L_wDPO and act on the weighted per-row terms ``Σ_t w_t logp`` (chosen: the w⁺ sum,
rejected: the w⁻ sum, so the ``sigmoid`` margin is π^(w)_θ − π^(w)_ref); ``ipo``/``sigmoid_norm`` divide those terms by
the token counts; ``sft`` is the chosen response's plain (unweighted) NLL. L_KL is added unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from vpo._heads import check_catpo_arguments
from vpo._validate import check_range
from vpo.fused import _composed, _engine
from vpo.fused._common import (PreferenceOutput, check_head_transform, check_trl_terms, make_output, reference_head,
                               resolve_path, row_sums, token_metrics, unshard, validate_pair_batch, wanted_grads,
                               wpo_pair_weights)
from vpo.losses import preference_metrics, preference_pair_losses, resolve_loss_types


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
    loss_type="sigmoid",
    loss_weights=None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: Optional[torch.Tensor] = None,
    use_weighting: bool = False,
    ld_alpha: Optional[float] = None,
    label_smoothing: float = 0.0,
    chunking: Optional[_engine.Chunking] = None,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
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
        beta: β > 0. kl_coef: λ ≥ 0 (docs/methods.md: 0.03).
        impl: ``"auto"``/``"torch"`` (the engine) or ``"triton"`` (composed from the Triton ops).
        loss_type, loss_weights, label_smoothing: DPO loss types on the weighted terms (module docstring).
        use_weighting, ld_alpha: WPO's pair weights (from the policy's plain log-probs and the sweep's log Σ p²)
            and LD-DPO's α on the per-token terms, as in :func:`vpo.fused_dpo_loss`.
        chunking: :class:`vpo.fused.Chunking`.
        logit_softcap, logit_scale: the model's logits transform, see :func:`vpo.fused_dpo_loss`.

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
    weight, bias, ref_weight, ref_bias = unshard(weight, bias, ref_weight, ref_bias)
    B = validate_pair_batch(hidden, labels, weight, bias)
    check_catpo_arguments(hidden, labels, token_weights, ref_hidden, ref_logps, beta=beta, kl_coef=kl_coef)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=True)
    resolve_loss_types(loss_type, loss_weights)
    has_ref = ref_hidden is not None
    rw, rb = reference_head(weight, bias, ref_weight, ref_bias, ref_hidden) if has_ref else (None, None)
    path = resolve_path(impl, labels, weight.shape[0], ignore_index)
    check_trl_terms(path, use_weighting, ld_alpha)
    chunking = _engine.check_chunking(chunking)
    softcap, scale = check_head_transform(logit_softcap, logit_scale)
    tr = dict(logit_softcap=logit_softcap, logit_scale=logit_scale)  # for impl="triton"'s ops

    mask = labels != ignore_index
    ntok = mask.sum(1)
    acc = _engine.acc_dtype(hidden.dtype)
    w_all = torch.where(mask, token_weights.detach().to(acc), torch.zeros((), dtype=acc, device=hidden.device))
    ref_given = None if has_ref else ref_logps.detach().to(acc)
    kw = dict(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, loss_weights=loss_weights,
              mean_chosen_tokens=ntok[:B].to(acc).mean(), n_pairs=B, f_divergence_type=f_divergence_type,
              f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, bco_delta=bco_delta)

    def pair_loss(tok, rows, P):
        """The chunk's share of the mean loss (pairs ``rows[:P]`` / ``rows[P:]``): wDPO (+ λ · weighted KL)."""
        w = w_all.index_select(0, rows)
        m = mask.index_select(0, rows) if ld_alpha is not None or use_weighting else None
        seq = row_sums(w * tok["logp"], m, ld_alpha)  # [2P] Σ_t w_t logp_t
        r = row_sums(w * tok["ref_logp"], m, ld_alpha) if has_ref else ref_given.index_select(0, rows)
        n = ntok.index_select(0, rows)
        pw = wpo_pair_weights(tok, m, P) if use_weighting else None
        per = preference_pair_losses(seq[:P], seq[P:], r[:P], r[P:], chosen_tokens=n[:P], rejected_tokens=n[P:],
                                     chosen_nll=-tok["logp"][:P].sum(1), pair_weights=pw, **kw)
        if has_ref and kl_coef > 0:
            kl_rows = (w * tok["kl"]).sum(1)
            per = per + kl_coef * (kl_rows[:P] + kl_rows[P:])
        return per.sum() / B

    ref_arg = (ref_hidden.detach(), rw, rb) if has_ref else None
    if path == "triton":
        tok = _composed.token_terms(hidden, weight, bias, labels, ignore_index=ignore_index, **tr, ref=ref_arg,
                                    kl_grad=kl_coef > 0)
        loss = pair_loss(tok, torch.arange(2 * B, device=hidden.device), B)
    else:
        need = wanted_grads(hidden=hidden, weight=weight, bias=bias)
        with torch.no_grad():
            res = _engine.sweep(hidden=hidden.detach(), weight=weight.detach(),
                                bias=None if bias is None else bias.detach(), labels=labels,
                                ignore_index=ignore_index, chunking=chunking, ref=ref_arg, ref_kl=True,
                                pair_loss=pair_loss, need=need, softcap=softcap, scale=scale,
                                stats=("log_sum_p2",) if use_weighting else ())
            tok, loss = res.tok, res.loss
        loss = _engine.attach(loss, [(hidden, res.grads["hidden"]), (weight, res.grads["weight"]),
                                     (bias, res.grads["bias"])])
    extra = token_metrics(tok, mask, B)

    with torch.no_grad():
        logp = tok["logp"].detach()
        seq = row_sums(w_all * logp, mask, ld_alpha)
        ref = row_sums(w_all * tok["ref_logp"].detach(), mask, ld_alpha) if has_ref else ref_given
        plain = logp.sum(1)
        metrics = preference_metrics(beta * (seq[:B] - ref[:B]), beta * (seq[B:] - ref[B:]), seq[:B], seq[B:])
        metrics["logps/chosen"], metrics["logps/rejected"] = plain[:B].mean(), plain[B:].mean()
        kl_pair = None
        if has_ref:
            kl_rows = (w_all * tok["kl"].detach()).sum(1)
            kl_pair = kl_rows[:B] + kl_rows[B:]
            metrics["catpo/kl"] = kl_pair.mean()
        metrics.update(extra)
        base = make_output(seq[:B], seq[B:], ref[:B], ref[B:], beta, metrics)
        fields = {**base.__dict__, "chosen_logps": plain[:B], "rejected_logps": plain[B:]}
        return loss, CatPOOutput(**fields, kl=kl_pair)
