"""Fused TPO (Token Preference Optimization with self-calibrated visual-anchored rewards; docs/methods.md, TPO).

Per response token ``i`` of a row, from the clean pass (image ``v``) and the noised pass (image ``v_c``):

    s_i = z_i[y_i](v) − z_i[y_i](v_c)                       raw target logits, not log-probs
    c_i = a + σ(s_i)        on chosen rows,   a + 1 − σ(s_i) = a + σ(−s_i)   on rejected rows
    r'(y) = β Σ_i [logp_θ(y_i) + log c_θ,i − logp_ref(y_i) − log c_ref,i],   L = −log σ(r'(y_w) − r'(y_l))

so TPO is DPO on the per-sequence terms ``Σ_i (logp + log c)``: that is how it is computed here, and every DPO loss type
applies to those terms (``ipo``/``sigmoid_norm`` divide them by the token counts; ``sft`` is the chosen response's
plain NLL, without ``log c``). The clean pass is the engine's vocab sweep (:mod:`vpo.fused._engine`, policy gradient in
the forward); the noised pass needs only the target logit, an O(N·D) gather-dot — no vocab sweep.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from vpo._heads import resolve_reference
from vpo._validate import check_choice, check_positive, check_range, check_same_shape
from vpo.fused import _composed, _engine
from vpo.fused._common import (PreferenceOutput, check_head_transform, check_trl_terms, make_output, reference_head,
                               resolve_path, row_sums, token_metrics, unshard, validate_pair_batch, wanted_grads,
                               wpo_pair_weights)
from vpo.losses import preference_metrics, preference_pair_losses, resolve_loss_types
from vpo.losses.tpo_reward import REWARD_MODES, tpo_log_calibrated_reward  # elementwise on [2B, T]


@dataclass(frozen=True)
class TPOOutput(PreferenceOutput):
    """:class:`PreferenceOutput` plus the per-token TPO quantities of the policy (detached).

    Attributes:
        scores: ``[2B, T]`` visual-anchored scores ``s`` (0 where ignored).
        token_rewards: ``[2B, T]`` calibrated rewards ``c`` (1 where ignored or where the ablation switches it off).
    """

    scores: torch.Tensor = None
    token_rewards: torch.Tensor = None


def _log_c(s, mask, P, *, a, rewards):
    """``log c`` ``[2P, T]`` of a chunk laid out chosen rows first (0 where ignored)."""
    is_chosen_row = torch.arange(2 * P, device=s.device) < P
    log_c = tpo_log_calibrated_reward(s, is_chosen_row, a=a, rewards=rewards)
    return torch.where(mask, log_c, torch.zeros_like(log_c))


def fused_tpo_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    hidden_noised: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_hidden_noised: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    a: float = 0.5,
    reward_grad: bool = True,
    rewards: str = "both",
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
) -> Tuple[torch.Tensor, TPOOutput]:
    """TPO loss from the last hidden states of the clean- and noised-image passes, without vocab logits.

    Args:
        weight: ``[V, D]`` LM-head weight.
        hidden: ``[2B, T, D]`` policy last hidden states with the clean image (chosen rows first, then rejected).
        hidden_noised: ``[2B, T, D]`` the same with the noised image (see :func:`vpo.add_diffusion_noise`).
        labels: ``[2B, T]`` aligned target ids, ``ignore_index`` = no target.
        bias: optional ``[V]``.
        ref_hidden, ref_hidden_noised: the reference model's two passes (both or neither).
        ref_weight, ref_bias: reference head, default ``weight``/``bias`` detached.
        ref_logps: ``[2B]`` precomputed ``Σ_i (logp_ref + log c_ref)`` instead of the reference passes.
        beta: β. a: calibration offset (docs/methods.md: 0.5; ablations 0 and 1).
        reward_grad: let gradients flow through ``c_θ`` (paper default); ``False`` detaches it, and no gradient
            reaches ``hidden_noised``.
        rewards: ``"both"``; ablations ``"only_win"`` (c on chosen tokens only, c ≡ 1 on rejected),
            ``"only_loss"`` (the reverse) and ``"opposite"`` (rewards swapped; the paper's negative control).
        impl: ``"auto"``/``"torch"`` (the engine) or ``"triton"`` (composed from the Triton ops), see
            :func:`vpo.fused_dpo_loss`.
        loss_type, loss_weights, label_smoothing: DPO loss types on the TPO terms (module docstring).
        use_weighting, ld_alpha: WPO's pair weights (from the policy's plain log-probs and the sweep's log Σ p²)
            and LD-DPO's α on the per-token terms, as in :func:`vpo.fused_dpo_loss`.
        chunking: :class:`vpo.fused.Chunking`.
        logit_softcap, logit_scale: the model's logits transform, see :func:`vpo.fused_dpo_loss` (``s`` is a
            difference of transformed target logits).

    Returns:
        ``(loss, out)`` with ``out`` a :class:`TPOOutput` (``scores`` s and ``token_rewards`` c of the policy).

    Example:
        >>> import torch, vpo
        >>> W = torch.randn(50, 16, requires_grad=True); h = torch.randn(4, 6, 16, requires_grad=True)
        >>> hn = (h.detach() + 0.1 * torch.randn_like(h)).requires_grad_()
        >>> y = torch.randint(0, 50, (4, 6)); y[:, :2] = -100
        >>> loss, out = vpo.fused_tpo_loss(W, h, hn, y, ref_hidden=h.detach(), ref_hidden_noised=hn.detach())
        >>> loss.backward(); tuple(out.token_rewards.shape), bool(hn.grad.abs().sum() > 0)
        ((4, 6), True)
    """
    weight, bias, ref_weight, ref_bias = unshard(weight, bias, ref_weight, ref_bias)
    B = validate_pair_batch(hidden, labels, weight, bias)
    check_same_shape("hidden_noised", hidden_noised, "hidden", hidden)
    validate_pair_batch(hidden_noised, labels, weight, bias, hidden_name="hidden_noised")
    check_positive("beta", beta)
    check_range("a", a, 0.0, float("inf"))
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=True)
    check_choice("rewards", rewards, REWARD_MODES)
    resolve_loss_types(loss_type, loss_weights)
    mode = resolve_reference(ref_hidden, ref_logps, hidden, extra_ref=ref_hidden_noised,
                             extra_name="ref_hidden_noised")
    rw, rb = reference_head(weight, bias, ref_weight, ref_bias, ref_hidden) if mode == "hidden" else (None, None)
    path = resolve_path(impl, labels, weight.shape[0], ignore_index)
    check_trl_terms(path, use_weighting, ld_alpha)
    chunking = _engine.check_chunking(chunking)
    softcap, scale = check_head_transform(logit_softcap, logit_scale)
    tr = dict(logit_softcap=logit_softcap, logit_scale=logit_scale)  # for impl="triton"'s ops

    mask = labels != ignore_index
    ntok = mask.sum(1)
    acc = _engine.acc_dtype(hidden.dtype)
    ref_given = ref_logps.detach().to(acc) if mode == "logps" else None
    kw = dict(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, loss_weights=loss_weights,
              mean_chosen_tokens=ntok[:B].to(acc).mean(), n_pairs=B, f_divergence_type=f_divergence_type,
              f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, bco_delta=bco_delta)

    def ref_terms(tok, m, P):
        """``Σ_i (logp_ref + log c_ref)`` ``[2P]`` of the reference swept with the chunk."""
        return row_sums(tok["ref_logp"] + _log_c(tok["ref_s"], m, P, a=a, rewards=rewards), m, ld_alpha)  # as θ's

    def pair_loss(tok, rows, P):
        """The chunk's share of the mean loss (pairs ``rows[:P]`` / ``rows[P:]``)."""
        m = mask.index_select(0, rows)
        s = tok["s"] if reward_grad else tok["s"].detach()
        plain = tok["logp"].sum(1)  # [2P]
        seq = row_sums(tok["logp"] + _log_c(s, m, P, a=a, rewards=rewards), m, ld_alpha)
        r = ref_terms(tok, m, P) if ref_given is None else ref_given.index_select(0, rows)
        n = ntok.index_select(0, rows)
        pw = wpo_pair_weights(tok, m, P) if use_weighting else None
        return preference_pair_losses(seq[:P], seq[P:], r[:P], r[P:], chosen_tokens=n[:P], rejected_tokens=n[P:],
                                      chosen_nll=-plain[:P], pair_weights=pw, **kw).sum() / B

    all_rows = torch.arange(2 * B, device=hidden.device)
    if path == "triton":
        tok = _composed.token_terms(hidden, weight, bias, labels, ignore_index=ignore_index, **tr, noised=hidden_noised,
                                    reward_grad=reward_grad)
        if ref_given is None:
            with torch.no_grad():
                rt = _composed.token_terms(ref_hidden.detach(), rw, rb, labels, ignore_index=ignore_index, **tr,
                                           noised=ref_hidden_noised.detach(), reward_grad=False)
            tok["ref_logp"], tok["ref_s"] = rt["logp"], rt["s"]
        loss = pair_loss(tok, all_rows, B)
    else:
        need = wanted_grads(hidden=hidden, weight=weight, bias=bias,
                            noised=hidden_noised if reward_grad else None)
        with torch.no_grad():
            res = _engine.sweep(hidden=hidden.detach(), weight=weight.detach(),
                                bias=None if bias is None else bias.detach(), labels=labels,
                                ignore_index=ignore_index, chunking=chunking,
                                ref=None if ref_given is not None else (ref_hidden.detach(), rw, rb),
                                noised=hidden_noised.detach(),
                                ref_noised=None if ref_given is not None else ref_hidden_noised.detach(),
                                noised_grad=reward_grad, pair_loss=pair_loss, need=need, softcap=softcap,
                                scale=scale, stats=("log_sum_p2",) if use_weighting else ())
            tok, loss = res.tok, res.loss
        g = res.grads
        loss = _engine.attach(loss, [(hidden, g["hidden"]), (hidden_noised, g["noised"]), (weight, g["weight"]),
                                     (bias, g["bias"])])
    extra = token_metrics(tok, mask, B)
    ref = ref_given if ref_given is not None else ref_terms(tok, mask, B).detach()  # [2B]

    with torch.no_grad():
        s = tok["s"].detach()
        log_c = _log_c(s, mask, B, a=a, rewards=rewards)
        plain = tok["logp"].detach().sum(1)
        seq = row_sums(tok["logp"].detach() + log_c, mask, ld_alpha)
        c = log_c.exp()
        m = mask.to(c.dtype)
        # rewards/* include the log c terms; logps/* are the plain Σ_i logp_θ (as the oracle reports them)
        metrics = preference_metrics(beta * (seq[:B] - ref[:B]), beta * (seq[B:] - ref[B:]), plain[:B], plain[B:])
        metrics["tpo/c_mean_chosen"] = (c[:B] * m[:B]).sum() / m[:B].sum().clamp_min(1)
        metrics["tpo/c_mean_rejected"] = (c[B:] * m[B:]).sum() / m[B:].sum().clamp_min(1)
        metrics["tpo/s_mean"] = (s * m).sum() / m.sum().clamp_min(1)
        metrics.update(extra)
        base = make_output(seq[:B], seq[B:], ref[:B], ref[B:], beta, metrics)
        fields = {**base.__dict__, "chosen_logps": plain[:B], "rejected_logps": plain[B:]}
        return loss, TPOOutput(**fields, scores=s, token_rewards=c)
