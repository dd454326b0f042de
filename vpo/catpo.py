"""Cat-PO token weights (docs/methods.md, Cat-PO; paper 001, §3.2–3.3).

For each response token ``t`` with head/layer-averaged attention ``a_t ∈ R^{N_p}`` on the ``N_p`` image tokens::

    S_global(t) = Σ_j a_{t,j}
    P_{t,j}     = a_{t,j} / Σ_k a_{t,k}
    H_t         = -Σ_j P_{t,j} log(P_{t,j} + 1e-12)
    S_local(t)  = 1 - H_t / log N_p
    S_sem(t)    = cos(e(y_t), Σ_j P_{t,j} u_j)
    s_t         = α (0.5 S_global + 0.5 S_local) + (1 - α) S_sem
    T_t         = tanh(s_t)
    w_t         = λ_ref + T_t (chosen)   |   λ_ref + (1 - T_t) (rejected)

Edge cases the paper leaves open (docs/methods.md defines ``S_local`` only for ``N_p > 1``), chosen so nothing is NaN:

- ``N_p == 1``: the attention on the image is trivially concentrated on one patch, so ``S_local = 1`` (the limit of
  ``1 - H / log N_p`` for a one-hot distribution); ``P = 1`` and ``S_sem = cos(e, u_1)``.
- a row with ``Σ_j a_{t,j} == 0`` (the token attends to no image token): ``S_global = 0``, and there is no attention
  distribution, so ``S_local = 0`` (no focus) and ``S_sem = 0`` (no attended visual vector); ``P`` is taken as 0.
- ``cos(x, y) = x·y / max(‖x‖ ‖y‖, 1e-12)``, so a zero vector gives 0.

The weights are meant to be computed once from the reference (initial) model and held fixed: call under
``torch.no_grad()``. The functions themselves are differentiable (checked with ``gradcheck`` in float64) except at the
``Σ a == 0`` rows, whose outputs are constants.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

from vpo._validate import check_float, check_positive, check_range, check_same_device, check_tensor

ENTROPY_EPS = 1e-12  # the paper's ϵ inside log(P + ϵ)
COS_EPS = 1e-12


@dataclass(frozen=True)
class CatPOTokenScores:
    """Per-token Cat-PO scores, each of shape ``image_attn.shape[:-1]`` (``[..., N]``)."""

    s_global: torch.Tensor  # Σ_j a_{t,j}
    s_local: torch.Tensor  # 1 - H(P_t) / log N_p
    s_sem: torch.Tensor  # cos(e(y_t), Σ_j P_{t,j} u_j)
    s: torch.Tensor  # α (0.5 S_global + 0.5 S_local) + (1 - α) S_sem
    t: torch.Tensor  # tanh(s)


def catpo_token_scores(
    image_attn: torch.Tensor,
    token_embeds: torch.Tensor,
    image_feats: torch.Tensor,
    *,
    alpha: float = 0.5,
) -> CatPOTokenScores:
    """Global, local and semantic relevance of each response token to the image, fused and squashed.

    Args:
        image_attn: ``[..., N, N_p]`` non-negative attention of each of the N response tokens on the N_p image tokens,
            averaged over heads and layers (``vpo.oracle.image_attention_stats`` builds it).
        token_embeds: ``[..., N, D]`` the LM's input embedding ``e(y_t)`` of each response token.
        image_feats: ``[..., N_p, D]`` the projected image features ``u_j`` fed to the LM (same space as ``e``).
        alpha: α in ``[0, 1]``, the share of the attention branch (global & local) against the semantic branch.

    Leading dims ``...`` (e.g. a batch) must agree across the three inputs. Inputs must share a device; the scores are
    computed and returned in ``promote_types(image_attn.dtype, float32)`` (16-bit inputs are upcast).

    Example:
        >>> import torch
        >>> from vpo.catpo import catpo_token_scores
        >>> a = torch.tensor([[0.25, 0.25], [0.5, 0.0]])          # 2 tokens, 2 image tokens
        >>> sc = catpo_token_scores(a, torch.eye(2), torch.eye(2))
        >>> [round(x, 6) for x in sc.s_local.tolist()], sc.s_global.tolist()  # uniform -> 0, one-hot -> 1
        ([0.0, 1.0], [0.5, 0.5])
    """
    a, e, u = _check_inputs(image_attn, token_embeds, image_feats)
    check_range("alpha", alpha, 0.0, 1.0)
    n_p = a.shape[-1]

    s_global = a.sum(-1)  # [..., N, N_p] -> [..., N]
    has_attn = s_global > 0
    denom = torch.where(has_attn, s_global, torch.ones_like(s_global))
    p = a / denom.unsqueeze(-1)  # [..., N, N_p], rows sum to 1 (0 where Σa == 0)

    if n_p > 1:
        entropy = -(p * torch.log(p + ENTROPY_EPS)).sum(-1)  # [..., N]
        s_local = 1.0 - entropy / math.log(n_p)
    else:
        s_local = torch.ones_like(s_global)  # one patch: fully concentrated
    s_local = torch.where(has_attn, s_local, torch.zeros_like(s_local))

    v_c = p @ u  # [..., N, N_p] @ [..., N_p, D] -> [..., N, D], the attended visual vector
    norms = torch.linalg.vector_norm(e, dim=-1) * torch.linalg.vector_norm(v_c, dim=-1)  # [..., N]
    s_sem = (e * v_c).sum(-1) / norms.clamp_min(COS_EPS)

    s = alpha * (0.5 * s_global + 0.5 * s_local) + (1.0 - alpha) * s_sem
    return CatPOTokenScores(s_global=s_global, s_local=s_local, s_sem=s_sem, s=s, t=torch.tanh(s))


def catpo_token_weights(
    image_attn: torch.Tensor,
    token_embeds: torch.Tensor,
    image_feats: torch.Tensor,
    is_chosen: Union[torch.Tensor, bool],
    *,
    alpha: float = 0.5,
    lambda_ref: float = 0.5,
) -> torch.Tensor:
    """Cat-PO token weights ``w_t = λ_ref + tanh(s_t)`` on chosen tokens, ``λ_ref + 1 - tanh(s_t)`` on rejected ones.

    Args:
        image_attn, token_embeds, image_feats, alpha: as in :func:`catpo_token_scores`.
        is_chosen: bool tensor of shape ``image_attn.shape[:-1]`` (``[..., N]``), True for tokens of the chosen
            response; or a Python bool for all tokens.
        lambda_ref: the base weight λ_ref > 0.

    Returns:
        ``[..., N]`` weights, to pass to ``catpo_loss`` as constants (compute them under ``torch.no_grad()`` from the
        reference model, once).

    Example:
        >>> import torch
        >>> from vpo.catpo import catpo_token_weights
        >>> a = torch.tensor([[0.5, 0.0], [0.5, 0.0]])
        >>> w = catpo_token_weights(a, torch.eye(2), torch.eye(2), torch.tensor([True, False]), alpha=1.0)
        >>> [round(x, 4) for x in w.tolist()]                      # s = 0.5 (0.5 + 1) = 0.75, tanh = 0.6351
        [1.1351, 0.8649]
    """
    check_positive("lambda_ref", lambda_ref)
    scores = catpo_token_scores(image_attn, token_embeds, image_feats, alpha=alpha)
    t = scores.t
    if isinstance(is_chosen, bool):
        is_chosen = torch.full(t.shape, is_chosen, dtype=torch.bool, device=t.device)
    check_tensor("is_chosen", is_chosen, dtypes=(torch.bool,))
    if is_chosen.shape != t.shape:
        raise ValueError(
            f"is_chosen has shape {tuple(is_chosen.shape)} but image_attn has shape {tuple(image_attn.shape)}: "
            f"expected is_chosen.shape == image_attn.shape[:-1]"
        )
    check_same_device("is_chosen", is_chosen, "image_attn", image_attn)
    return lambda_ref + torch.where(is_chosen, t, 1.0 - t)


def _check_inputs(image_attn, token_embeds, image_feats):
    check_float("image_attn", image_attn)
    check_float("token_embeds", token_embeds)
    check_float("image_feats", image_feats)
    if image_attn.dim() < 2:
        raise ValueError(f"image_attn must have shape [..., N, N_p], got shape {tuple(image_attn.shape)}")
    if token_embeds.dim() != image_attn.dim() or token_embeds.shape[:-1] != image_attn.shape[:-1]:
        raise ValueError(
            f"token_embeds has shape {tuple(token_embeds.shape)} but image_attn has shape {tuple(image_attn.shape)}: "
            f"expected token_embeds.shape[:-1] == image_attn.shape[:-1] ([..., N])"
        )
    expected = (*image_attn.shape[:-2], image_attn.shape[-1], token_embeds.shape[-1])
    if tuple(image_feats.shape) != expected:
        raise ValueError(
            f"image_feats has shape {tuple(image_feats.shape)} but image_attn has shape {tuple(image_attn.shape)} and "
            f"token_embeds {tuple(token_embeds.shape)}: expected image_feats.shape == {expected} ([..., N_p, D])"
        )
    check_same_device("token_embeds", token_embeds, "image_attn", image_attn)
    check_same_device("image_feats", image_feats, "image_attn", image_attn)
    dtype = torch.promote_types(image_attn.dtype, torch.float32)
    return image_attn.to(dtype), token_embeds.to(dtype), image_feats.to(dtype)
