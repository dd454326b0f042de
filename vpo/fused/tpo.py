"""Fused TPO (Token Preference Optimization with self-calibrated visual-anchored rewards; SPEC.md, TPO).

Per response token ``i`` of a row, from the clean pass (image ``v``) and the noised pass (image ``v_c``):

    s_i = z_i[y_i](v) − z_i[y_i](v_c)                       raw target logits, not log-probs
    c_i = a + σ(s_i)        on chosen rows,   a + 1 − σ(s_i) = a + σ(−s_i)   on rejected rows
    r'(y) = β Σ_i [logp_θ(y_i) + log c_θ,i − logp_ref(y_i) − log c_ref,i],   L = −log σ(r'(y_w) − r'(y_l))

so TPO is DPO on the per-sequence terms ``Σ_i (logp + log c)``: that is how it is computed here, reusing the DPO head.
The clean pass needs the full log-prob sweep (``vpo.linear_logprobs``, which also returns the raw target logit);
the noised pass needs only the target logit, an O(N·D) gather-dot (``vpo.target_logits``) — no vocab sweep.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from vpo._validate import check_choice, check_positive, check_range, check_same_shape
from vpo._heads import resolve_reference
from vpo.fused._common import PreferenceOutput, make_output, reference_head, validate_pair_batch
from vpo.losses import dpo_loss
from vpo.ops.linear_logprobs import linear_logprobs, target_logits
from vpo.ops.segment_sum import sequence_sum
from vpo.oracle.tpo import REWARD_MODES, tpo_log_calibrated_reward  # elementwise on [2B, T]: the math lives once


@dataclass(frozen=True)
class TPOOutput(PreferenceOutput):
    """:class:`PreferenceOutput` plus the per-token TPO quantities of the policy (detached).

    Attributes:
        scores: ``[2B, T]`` visual-anchored scores ``s`` (0 where ignored).
        token_rewards: ``[2B, T]`` calibrated rewards ``c`` (1 where ignored or where the ablation switches it off).
    """

    scores: torch.Tensor = None
    token_rewards: torch.Tensor = None


def _tpo_terms(weight, bias, hidden, hidden_noised, labels, B, *, a, rewards, reward_grad, ignore_index, impl):
    """One model's two passes -> (Σ_i (logp + log c) [2B], Σ_i logp [2B], s [2B, T], log c [2B, T])."""
    mask = labels != ignore_index
    logp, z = linear_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index, impl=impl)
    if reward_grad:
        z_noised = target_logits(hidden_noised, weight, labels, bias, ignore_index=ignore_index, impl=impl)
        s = z - z_noised
    else:  # c_θ is a constant: the noised pass needs no graph
        with torch.no_grad():
            z_noised = target_logits(hidden_noised.detach(), weight.detach(), labels,
                                     None if bias is None else bias.detach(), ignore_index=ignore_index, impl=impl)
        s = z.detach() - z_noised
    s = torch.where(mask, s, torch.zeros_like(s))
    is_chosen_row = torch.arange(labels.shape[0], device=labels.device) < B
    log_c = tpo_log_calibrated_reward(s, is_chosen_row, a=a, rewards=rewards)
    log_c = torch.where(mask, log_c, torch.zeros_like(log_c))  # c = 1 where there is no target
    return sequence_sum(logp + log_c), sequence_sum(logp), s, log_c


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
        beta: β. a: calibration offset (SPEC: 0.5; ablations 0 and 1).
        reward_grad: let gradients flow through ``c_θ`` (paper default); ``False`` detaches it, and no gradient
            reaches ``hidden_noised``.
        rewards: ``"both"``; ablations ``"only_win"`` (c on chosen tokens only, c ≡ 1 on rejected),
            ``"only_loss"`` (the reverse) and ``"opposite"`` (rewards swapped; the paper's negative control).
        impl: kernel choice, see :func:`vpo.linear_logprobs`.

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
    B = validate_pair_batch(hidden, labels, weight, bias)
    check_same_shape("hidden_noised", hidden_noised, "hidden", hidden)
    validate_pair_batch(hidden_noised, labels, weight, bias, hidden_name="hidden_noised")
    check_positive("beta", beta)
    check_range("a", a, 0.0, float("inf"))
    check_choice("rewards", rewards, REWARD_MODES)
    mode = resolve_reference(ref_hidden, ref_logps, hidden, extra_ref=ref_hidden_noised,
                             extra_name="ref_hidden_noised")
    kw = dict(a=a, rewards=rewards, ignore_index=ignore_index, impl=impl)

    seq, plain, s, log_c = _tpo_terms(weight, bias, hidden, hidden_noised, labels, B, reward_grad=reward_grad, **kw)
    if mode == "logps":
        ref = ref_logps.detach().to(seq.dtype)
    else:
        rw, rb = reference_head(weight, bias, ref_weight, ref_bias, ref_hidden)
        with torch.no_grad():
            ref, _, _, _ = _tpo_terms(rw, rb, ref_hidden.detach(), ref_hidden_noised.detach(), labels, B,
                                   reward_grad=False, **kw)
    loss, metrics = dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=beta)

    with torch.no_grad():
        mask = labels != ignore_index
        c = log_c.detach().exp()
        m = mask.float()
        metrics["tpo/c_mean_chosen"] = (c[:B] * m[:B]).sum() / m[:B].sum().clamp_min(1)
        metrics["tpo/c_mean_rejected"] = (c[B:] * m[B:]).sum() / m[B:].sum().clamp_min(1)
        metrics["tpo/s_mean"] = (s.detach() * m).sum() / m.sum().clamp_min(1)
        # logps/* are the plain Σ_i logp_θ (as the oracle reports them); rewards/* include the log c terms.
        metrics["logps/chosen"], metrics["logps/rejected"] = plain[:B].mean(), plain[B:].mean()
        base = make_output(seq[:B], seq[B:], ref[:B], ref[B:], beta, metrics)
    fields = {**base.__dict__, "chosen_logps": plain[:B].detach(), "rejected_logps": plain[B:].detach()}
    return loss, TPOOutput(**fields, scores=s.detach(), token_rewards=c)
