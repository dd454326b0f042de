"""Oracle for TPO (docs/methods.md, TPO; paper 000): self-calibrated visual-anchored token rewards + token-level DPO.

For each response token ``y_i`` the policy runs twice, on the clean image ``v`` and on the noised one ``v_c``
(``vpo.noise.add_diffusion_noise``), and so does the reference::

    s_i  = z_i[y_i](v) - z_i[y_i](v_c)                      raw target logits, not log-probs
    c_i  = a + σ(s_i)          if y_i ∈ y_w                  a = 0.5, so s = 0 ⇒ c = 1
    c_i  = a + 1 - σ(s_i)      if y_i ∈ y_l
    r'(y) = β Σ_i [logp_θ(y_i) + log c_θ,i - logp_ref(y_i) - log c_ref,i]
    L_TPO = -log σ(r'(y_w) - r'(y_l))

``r'(y)`` is DPO's implicit reward with ``logp(y)`` replaced by ``Σ_i (logp(y_i) + log c_i)``, so the loss is exactly
``vpo.losses.dpo_loss`` on those sums — which is how it is computed here (the math lives once).

``log c`` is computed as ``log(a + σ(±s))`` (``logsigmoid(±s)`` when ``a == 0``, which would otherwise underflow), using
``1 - σ(s) = σ(-s)``.

Ablations (paper §4.3, Table 3 "Visual-Anchored Rewards"), option ``rewards``:

- ``"both"`` (TPO): chosen tokens get ``a + σ(s)``, rejected tokens ``a + 1 - σ(s)``.
- ``"only_win"``: the calibrated reward only on the chosen response; ``c ≡ 1`` (``log c = 0``) on the rejected one.
- ``"only_loss"``: only on the rejected response; ``c ≡ 1`` on the chosen one.
- ``"opposite"``: the paper's negative control, rewards swapped (chosen ``a + 1 - σ(s)``, rejected ``a + σ(s)``).

The paper reads "rewards are assigned separately to positive and negative samples" for only-win/only-loss; ``c ≡ 1`` is
its own "the reward does not take effect" value (§3.3.1), so that is what the unrewarded side gets.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from vpo._heads import check_pair_batch, check_reference_head, resolve_reference
from vpo._validate import check_choice, check_float, check_like, check_positive, check_same_device, check_tensor
from vpo.losses import dpo_loss
from vpo.losses.tpo_reward import REWARD_MODES, tpo_log_calibrated_reward  # noqa: F401  (re-exported)
from vpo.oracle.logprobs import sequence_logps, target_logits, token_logprobs



class TPOSequenceTerms(NamedTuple):
    """What one model's two passes give, for rows ``[R, T]`` (chosen rows first, then rejected)."""

    logps: torch.Tensor  # [R]    Σ_i (logp(y_i) + log c_i) over response tokens
    token_logps: torch.Tensor  # [R, T] logp(y_i), 0 where ignored
    s: torch.Tensor  # [R, T] visual-anchored score, 0 where ignored
    c: torch.Tensor  # [R, T] calibrated reward (1 where the ablation switches it off; also 1 where ignored)


def tpo_scores(z_clean: torch.Tensor, z_noised: torch.Tensor) -> torch.Tensor:
    """Visual-anchored score ``s = z[y](v) - z[y](v_c)`` from raw target logits of the clean and noised passes.

    Args:
        z_clean, z_noised: target logits ``z_i[y_i]``, any shape, same shape/dtype/device.

    Example:
        >>> import torch
        >>> from vpo.oracle.tpo import tpo_scores
        >>> tpo_scores(torch.tensor([2.0, 1.0]), torch.tensor([1.5, 1.0])).tolist()
        [0.5, 0.0]
    """
    check_float("z_clean", z_clean)
    check_float("z_noised", z_noised)
    check_like("z_noised", z_noised, "z_clean", z_clean)
    return z_clean - z_noised


def tpo_calibrated_reward(
    s: torch.Tensor, is_chosen_row: torch.Tensor, *, a: float = 0.5, rewards: str = "both"
) -> torch.Tensor:
    """Calibrated reward ``c = a + σ(s)`` on chosen tokens, ``a + 1 - σ(s)`` on rejected tokens (``c ∈ (a, a + 1)``).

    Args:
        s: ``[R, T]`` (or any shape ``[R, ...]``) visual-anchored scores.
        is_chosen_row: bool, ``[R]`` (one flag per row, broadcast over the rest) or ``s.shape``.
        a: the offset ``a >= 0`` (0.5: ``s = 0 ⇒ c = 1``; the paper's ablation uses 0, 0.5, 1).
        rewards: ``"both"``, ``"only_win"``, ``"only_loss"`` or ``"opposite"`` (module docstring).

    Example:
        >>> import torch
        >>> from vpo.oracle.tpo import tpo_calibrated_reward
        >>> s = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
        >>> c = tpo_calibrated_reward(s, torch.tensor([True, False]))
        >>> [[round(x, 4) for x in row] for row in c.tolist()]
        [[1.0, 1.3808], [1.0, 0.6192]]
    """
    return torch.exp(tpo_log_calibrated_reward(s, is_chosen_row, a=a, rewards=rewards))


def tpo_sequence_logps(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    hidden_noised: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    a: float = 0.5,
    rewards: str = "both",
    reward_grad: bool = True,
    ignore_index: int = -100,
) -> TPOSequenceTerms:
    """One model's clean and noised passes → ``Σ_i (logp(y_i) + log c_i)`` per row, plus the token-level terms.

    Use it on the reference, under ``torch.no_grad()``, to precompute ``ref_logps`` for :func:`tpo_loss` (valid as long
    as the noise ε is fixed per example, docs/methods.md's option).

    Args:
        weight: ``[V, D]`` LM-head weight; bias: optional ``[V]``.
        hidden: ``[2B, T, D]`` hidden states of the clean-image pass, chosen rows first then rejected.
        hidden_noised: ``[2B, T, D]`` the same positions from the noised-image pass.
        labels: ``[2B, T]`` targets aligned with ``hidden``, ``ignore_index`` where there is none.
        a, rewards: see :func:`tpo_calibrated_reward`.
        reward_grad: let the gradient flow through ``c`` (to ``hidden``, ``hidden_noised``, ``weight``); with False
            ``c`` is a constant and the noised pass runs under ``no_grad``.
    """
    check_pair_batch(weight, hidden, labels, bias, ignore_index=ignore_index)
    check_like("hidden_noised", hidden_noised, "hidden", hidden)
    return _tpo_terms(weight, bias, hidden, hidden_noised, labels, a, rewards, reward_grad, ignore_index)


def tpo_loss(
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
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """TPO loss ``-log σ(r'(y_w) - r'(y_l))``, mean over the B pairs, materializing the logits.

    Args:
        weight: ``[V, D]`` the policy's LM-head weight; bias: optional ``[V]``.
        hidden, hidden_noised: ``[2B, T, D]`` the policy's hidden states on the clean / noised image, chosen rows first.
        labels: ``[2B, T]`` aligned targets (``ignore_index`` = no target), shared by all passes.
        ref_hidden, ref_hidden_noised: ``[2B, T, D]`` the reference's two passes (both or neither).
        ref_weight, ref_bias: the reference's head; ``ref_weight=None`` (and ``ref_bias=None``) means it shares the
            policy's ``weight`` and ``bias``, used detached.
        ref_logps: ``[2B]`` precomputed ``Σ_i (logp_ref + log c_ref)`` (e.g. from :func:`tpo_sequence_logps`), instead
            of the reference passes. Give exactly one of ``ref_hidden`` and ``ref_logps``.
        beta: β > 0. a, rewards: see :func:`tpo_calibrated_reward`.
        reward_grad: let the gradient flow through ``c_θ`` (paper's choice); False detaches it.

    Returns:
        ``(loss, metrics)``: ``vpo.losses.dpo_loss``'s metrics, where ``rewards/*`` are ``r'(y)`` (with the ``log c``
        terms) and ``logps/chosen``, ``logps/rejected`` are the PLAIN policy log-probs ``Σ_i logp_θ(y_i)``; plus
        ``tpo/c_mean_chosen``, ``tpo/c_mean_rejected`` (the policy's ``c_θ`` averaged over response tokens of the
        chosen / rejected rows) and ``tpo/s_mean`` (``s_θ`` averaged over all response tokens).

    The reference passes run under ``no_grad``.

    Example:
        >>> import torch
        >>> from vpo.oracle import tpo_loss
        >>> g = torch.Generator().manual_seed(0)
        >>> w, h = torch.randn(11, 4, generator=g), torch.randn(2, 3, 4, generator=g)
        >>> hn = torch.randn(2, 3, 4, generator=g)
        >>> y = torch.randint(0, 11, (2, 3), generator=g)
        >>> loss, m = tpo_loss(w, h, hn, y, ref_hidden=h + 0.1, ref_hidden_noised=hn)
        >>> loss.shape, sorted(k for k in m if k.startswith("tpo/"))
        (torch.Size([]), ['tpo/c_mean_chosen', 'tpo/c_mean_rejected', 'tpo/s_mean'])
    """
    n_pairs = check_pair_batch(weight, hidden, labels, bias, ignore_index=ignore_index)
    check_like("hidden_noised", hidden_noised, "hidden", hidden)
    check_positive("beta", beta)
    check_positive("a", a, allow_zero=True)
    check_choice("rewards", rewards, REWARD_MODES)
    if not isinstance(reward_grad, bool):
        raise ValueError(f"reward_grad must be a bool, got {type(reward_grad).__name__}")
    mode = resolve_reference(ref_hidden, ref_logps, hidden, extra_ref=ref_hidden_noised, extra_name="ref_hidden_noised")

    policy = _tpo_terms(weight, bias, hidden, hidden_noised, labels, a, rewards, reward_grad, ignore_index)

    if mode == "logps":
        ref = ref_logps.detach().to(hidden.dtype)
    else:
        ref_weight, ref_bias = check_reference_head(weight, bias, ref_weight, ref_bias, ref_hidden, hidden)
        with torch.no_grad():
            ref = _tpo_terms(
                ref_weight, ref_bias, ref_hidden, ref_hidden_noised, labels, a, rewards, False, ignore_index
            ).logps.to(hidden.dtype)

    loss, metrics = dpo_loss(
        policy.logps[:n_pairs], policy.logps[n_pairs:], ref[:n_pairs], ref[n_pairs:], beta=beta
    )
    with torch.no_grad():
        plain = sequence_logps(policy.token_logps, labels, ignore_index=ignore_index)
        mask = labels != ignore_index
        metrics["logps/chosen"] = plain[:n_pairs].mean()
        metrics["logps/rejected"] = plain[n_pairs:].mean()
        metrics["tpo/c_mean_chosen"] = _masked_mean(policy.c[:n_pairs], mask[:n_pairs])
        metrics["tpo/c_mean_rejected"] = _masked_mean(policy.c[n_pairs:], mask[n_pairs:])
        metrics["tpo/s_mean"] = _masked_mean(policy.s, mask)
    return loss, metrics


# --- internals --------------------------------------------------------------------------------------------------------


def _tpo_terms(weight, bias, hidden, hidden_noised, labels, a, rewards, reward_grad, ignore_index) -> TPOSequenceTerms:
    logp, z_clean, _ = token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index)  # [R, T] each
    if reward_grad:
        z_noised = target_logits(hidden_noised, weight, labels, bias, ignore_index=ignore_index)  # [R, T]
        s = tpo_scores(z_clean, z_noised)
    else:
        with torch.no_grad():
            z_noised = target_logits(hidden_noised, weight, labels, bias, ignore_index=ignore_index)
            s = tpo_scores(z_clean.detach(), z_noised)
    is_chosen_row = torch.arange(hidden.shape[0], device=hidden.device) < hidden.shape[0] // 2  # [R]
    log_c = tpo_log_calibrated_reward(s, is_chosen_row, a=a, rewards=rewards)  # [R, T]
    mask = labels != ignore_index
    log_c = torch.where(mask, log_c, torch.zeros_like(log_c))
    logps = sequence_logps(logp + log_c, labels, ignore_index=ignore_index)  # [R]
    return TPOSequenceTerms(logps=logps, token_logps=logp, s=s, c=torch.exp(log_c))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; 0 when the mask is empty."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)
