"""The methods' preference loss heads on per-sequence log-probs (docs/methods.md): DPO, anchors, OViP, LPOI, mDPO.

These are the math of every method, written once: the oracle (``vpo.oracle``) and the fused losses
(``vpo.fused_dpo_loss``, ``vpo.fused_tpo_loss``, ...) reduce their tokens to per-sequence terms and call these heads.

Every head takes ``[B]`` tensors (one value per pair), returns ``(loss, metrics)``: ``loss`` the mean over the batch,
``metrics`` a dict of detached 0-dim tensors named as TRL names them (``rewards/chosen``, ``rewards/margins``, ...).

OViP's image-side heads (``ovip_image_loss`` and its appendix variants) are in :mod:`vpo.losses.image_heads`, the
checks and reductions every head shares in :mod:`vpo.losses._common`; both are re-exported here.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vpo._validate import check_choice, check_float, check_like, check_positive, check_range
from vpo.losses._common import Metrics, _check_real, _check_seq, _check_seqs, _fraction, _margin_loss
from vpo.losses.image_heads import ovip_base_image_loss, ovip_image_loss, ovip_symmetric_image_loss  # noqa: F401


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor],
    ref_rejected_logps: Optional[torch.Tensor],
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> Tuple[torch.Tensor, Metrics]:
    """DPO: ``-log σ(β (Δ(y_w) - Δ(y_l)))`` with ``Δ = logp_θ - logp_ref``, mean over the batch.

    Args:
        chosen_logps, rejected_logps: ``[B]`` policy log-probs of the chosen / rejected responses.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the reference's (may be ``None`` when ``reference_free``).
        beta: inverse temperature β > 0.
        label_smoothing: ε in [0, 0.5): conservative DPO, ``-(1-ε) log σ(βm) - ε log σ(-βm)``.
        reference_free: treat the reference log-probs as 0.

    Example:
        >>> import torch, vpo
        >>> loss, m = vpo.losses.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]),
        ...                               torch.tensor([-1.5]), torch.tensor([-1.5]))
        >>> round(loss.item(), 4), m["rewards/margins"].item()
        (0.6444, 0.10000000149011612)
    """
    _check_seq("chosen_logps", chosen_logps)
    if chosen_logps.numel() == 0:
        raise ValueError("chosen_logps must not be empty, got shape (0,)")
    _check_seq("rejected_logps", rejected_logps, "chosen_logps", chosen_logps)
    check_positive("beta", beta)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=True)
    if reference_free:
        ref_chosen = torch.zeros_like(chosen_logps)
        ref_rejected = torch.zeros_like(rejected_logps)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("ref_chosen_logps and ref_rejected_logps are required unless reference_free=True")
        ref_chosen = _check_seq("ref_chosen_logps", ref_chosen_logps, "chosen_logps", chosen_logps)
        ref_rejected = _check_seq("ref_rejected_logps", ref_rejected_logps, "chosen_logps", chosen_logps)

    chosen_rewards = beta * (chosen_logps - ref_chosen)  # [B]
    rejected_rewards = beta * (rejected_logps - ref_rejected)  # [B]
    margin = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(margin)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-margin)
    metrics = preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    return losses.mean(), metrics


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> Metrics:
    """TRL's metric names, batch means, detached."""
    with torch.no_grad():
        return {
            "rewards/chosen": chosen_rewards.detach().mean(),
            "rewards/rejected": rejected_rewards.detach().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).detach().mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
            "logps/chosen": chosen_logps.detach().mean(),
            "logps/rejected": rejected_logps.detach().mean(),
        }


# ---------------------------------------------------------------------------------------------------------------------
# Anchor, listwise (LPOI), image-side (OViP: vpo.losses.image_heads) and conditional (mDPO) heads.
#
# Conventions shared by every head below (the same as ``dpo_loss``): inputs are ``[B]`` per-sequence log-probs
# (``[B, L]`` for the listwise head), all of one dtype and device; ``Δ = logp_θ - logp_ref``; the loss is the mean over
# the batch; metrics are detached 0-dim tensors, namespaced by head (``anchor/…``, ``image/…``, ``listwise/…``,
# ``conditional/…``) so that the metrics of the heads a method adds together merge into one dict without collisions.
# ---------------------------------------------------------------------------------------------------------------------

_ANCHOR_FORMS = ("paper", "bounded")


def anchor_loss(
    chosen_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    delta: float = 0.0,
) -> Tuple[torch.Tensor, Metrics]:
    """Anchor loss ``-log σ(β Δ(y_w) - δ)`` (mDPO; LPOI's ``L_anchor``; OViP appendix B.1 ``L_Anchor`` with δ = 0).

    Pushes the chosen response's reward ``β Δ(y_w)`` above the anchor δ, so that DPO cannot lower the chosen
    likelihood while it widens the margin.

    Args:
        chosen_logps, ref_chosen_logps: ``[B]`` policy / reference log-probs of the chosen response (given the image).
        beta: inverse temperature β > 0.
        delta: the anchor δ (any finite real; 0 in mDPO, LPOI and OViP).

    Returns:
        ``(loss, metrics)``: the batch mean, and ``anchor/loss``, ``rewards/anchor`` (mean β Δ(y_w)) and
        ``anchor/accuracy`` (fraction with β Δ(y_w) > δ).

    Example:
        >>> import torch
        >>> from vpo.losses import anchor_loss
        >>> loss, m = anchor_loss(torch.tensor([-1.0]), torch.tensor([-1.0]))  # Δ = 0: -log σ(0) = log 2
        >>> round(loss.item(), 4), m["anchor/accuracy"].item()
        (0.6931, 0.0)
    """
    _check_seqs(("chosen_logps", chosen_logps), ("ref_chosen_logps", ref_chosen_logps))
    check_positive("beta", beta)
    _check_real("delta", delta)

    rewards = beta * (chosen_logps - ref_chosen_logps)  # [B]
    logits = rewards - delta  # [B]
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        metrics = {
            "anchor/loss": loss.detach(),
            "rewards/anchor": rewards.detach().mean(),
            "anchor/accuracy": _fraction(logits > 0, logits),
        }
    return loss, metrics


def bi_anchor_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    form: str = "paper",
) -> Tuple[torch.Tensor, Metrics]:
    """OViP's bi-directional anchor (appendix B.1, ``L_Bi-Anchor``): anchor the chosen up, push the rejected down.

    ``form="paper"`` (default) is the equation as printed::

        L = -log σ(β Δ(A⁺|I⁺,Q)) + log σ(β Δ(A⁻|Q))

    Its second term is unbounded below (its gradient tends to β, not 0, as Δ(A⁻) → -∞). ``form="bounded"``
    replaces it with the saturating ``-log σ(-β Δ(A⁻))``, what "makes the negative response probability lower"
    means in a DPO-style loss; the two have the same gradient sign everywhere. **[choice: "paper" by default]**

    The head does not care which pass the rejected log-probs come from: the paper's equation uses the image-free pass
    ``(A⁻|Q)``; ``vpo.oracle.ovip_loss(bi_anchor_rejected=…)`` picks ``"noimg"`` (the paper's) or ``"img"``.

    Args:
        chosen_logps, ref_chosen_logps: ``[B]`` log-probs of A⁺ given (I⁺, Q), policy / reference.
        rejected_logps, ref_rejected_logps: ``[B]`` log-probs of A⁻ (given Q alone in the paper), policy / reference.
        beta: β > 0.
        form: ``"paper"`` or ``"bounded"``.

    Returns:
        ``(loss, metrics)`` with ``bi_anchor/loss``, ``rewards/anchor`` (mean β Δ(A⁺)) and
        ``rewards/anchor_rejected`` (mean β Δ(A⁻)).

    Example:
        >>> import torch
        >>> from vpo.losses import bi_anchor_loss
        >>> z = torch.zeros(1)
        >>> round(bi_anchor_loss(z, z, z, z)[0].item(), 4)  # log 2 + log(1/2)
        0.0
        >>> round(bi_anchor_loss(z, z, z, z, form="bounded")[0].item(), 4)  # 2 log 2
        1.3863
    """
    _check_seqs(
        ("chosen_logps", chosen_logps),
        ("rejected_logps", rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    )
    check_positive("beta", beta)
    check_choice("form", form, _ANCHOR_FORMS)

    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)  # [B]
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)  # [B]
    if form == "paper":
        losses = -F.logsigmoid(chosen_rewards) + F.logsigmoid(rejected_rewards)
    else:
        losses = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    loss = losses.mean()
    with torch.no_grad():
        metrics = {
            "bi_anchor/loss": loss.detach(),
            "rewards/anchor": chosen_rewards.detach().mean(),
            "rewards/anchor_rejected": rejected_rewards.detach().mean(),
        }
    return loss, metrics




def listwise_loss(
    list_logps: torch.Tensor,
    ref_list_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> Tuple[torch.Tensor, Metrics]:
    """LPOI's listwise (Plackett–Luce) loss over a list of images ranked best first (LPOI eq. 1; docs/methods.md
    "LPOI")::

        S_k = β Δ(y_w | x_k, q),   L_list = -Σ_{k=1}^{L} [ S_k - log Σ_{j=k}^{L} exp(S_j) ]

    the negative log-likelihood of the ranking S_1 > S_2 > … > S_L (the k = L term is 0).

    Numerics: the loss is invariant to shifting a row of S by a constant, so each row is first centred on its (detached)
    maximum; the suffix log-sum-exps are then ``torch.logsumexp`` over a ``[B, L, L]`` upper-triangular mask (L is a
    handful of images). Its backward is the exact softmax ``exp(S_j - lse_k)``; ``torch.logcumsumexp`` on the flipped
    row gives the same forward but its backward loses ~1e-3 relative in float32 when |S| ~ 1e4. Finite for any finite
    S: for a large gap the loss is the exact linear value (e.g. L = 2: ``max(S_2 - S_1, 0)``).

    Args:
        list_logps: ``[B, L]`` policy log-probs of the chosen response given each image of the list, L ≥ 2;
            column 0 is the original image x_1, column L-1 the hardest negative.
        ref_list_logps: ``[B, L]`` the reference's.
        beta: β > 0.

    Returns:
        ``(loss, metrics)``: the batch mean, and ``listwise/loss``, ``listwise/accuracy`` (fraction of adjacent pairs
        ranked right, S_k > S_{k+1}), ``listwise/rewards_first`` (mean S_1), ``listwise/rewards_last`` (mean S_L).

    Example:
        >>> import torch
        >>> from vpo.losses import listwise_loss
        >>> loss, m = listwise_loss(torch.zeros(1, 2), torch.zeros(1, 2))  # L = 2: -log σ(S_1 - S_2) = log 2
        >>> round(loss.item(), 4), m["listwise/accuracy"].item()
        (0.6931, 0.0)
    """
    check_float("list_logps", list_logps, ndim=2)
    check_float("ref_list_logps", ref_list_logps, ndim=2)
    check_like("ref_list_logps", ref_list_logps, "list_logps", list_logps)
    if list_logps.shape[1] < 2:
        raise ValueError(
            f"list_logps has shape {tuple(list_logps.shape)}: expected [B, L] with a list of L >= 2 images"
        )
    check_positive("beta", beta)

    scores = beta * (list_logps - ref_list_logps)  # S: [B, L]
    length = scores.shape[1]
    centred = scores - scores.detach().amax(dim=1, keepdim=True)  # [B, L], max 0 per row
    later = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu()  # [k, j]: j >= k
    suffix = centred.unsqueeze(1).expand(-1, length, -1).masked_fill(~later, -math.inf)  # [B, L(k), L(j)]
    suffix_lse = torch.logsumexp(suffix, dim=-1)  # [B, L]: log Σ_{j>=k} exp(S_j)
    losses = -(centred - suffix_lse).sum(dim=1)  # [B]
    loss = losses.mean()
    with torch.no_grad():
        metrics = {
            "listwise/loss": loss.detach(),
            "listwise/accuracy": _fraction(scores[:, :-1] > scores[:, 1:], scores),
            "listwise/rewards_first": scores[:, 0].detach().mean(),
            "listwise/rewards_last": scores[:, -1].detach().mean(),
        }
    return loss, metrics


def mdpo_conditional_loss(
    chosen_logps: torch.Tensor,
    corrupt_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_corrupt_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> Tuple[torch.Tensor, Metrics]:
    """mDPO's conditional preference loss (docs/methods.md "mDPO"): the chosen response is preferred given the full
    image over given a corrupted (cropped) one::

        L_cond = -log σ( β Δ(y_w | x, q) - β Δ(y_w | x_crop, q) )

    Args:
        chosen_logps, ref_chosen_logps: ``[B]`` policy / reference log-probs of y_w given the image x.
        corrupt_logps, ref_corrupt_logps: ``[B]`` the same given the corrupted image x_crop (one crop for both models).
        beta: β > 0.

    Returns:
        ``(loss, metrics)`` with ``conditional/loss``, ``conditional/margin`` (mean argument of σ),
        ``conditional/accuracy`` (fraction with margin > 0), ``rewards/corrupt`` (mean β Δ(y_w | x_crop)).

    Example:
        >>> import torch
        >>> from vpo.losses import mdpo_conditional_loss
        >>> t = torch.tensor
        >>> loss, m = mdpo_conditional_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]))
        >>> round(m["conditional/margin"].item(), 4)  # 0.1 * 1 - 0.1 * (-1)
        0.2
    """
    _check_seqs(
        ("chosen_logps", chosen_logps),
        ("corrupt_logps", corrupt_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_corrupt_logps", ref_corrupt_logps),
    )
    check_positive("beta", beta)

    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)  # [B]
    corrupt_rewards = beta * (corrupt_logps - ref_corrupt_logps)  # [B]
    margin = chosen_rewards - corrupt_rewards
    return _margin_loss("conditional", margin, {"rewards/corrupt": corrupt_rewards})
