"""Oracle for per-token log-probs under a linear LM head (docs/methods.md, Notation and "linear log-probs").

``z = h @ W.T + b`` is materialized in full (``[N, V]``); ``logp(y) = z[y] - logsumexp(z)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                logit_softcap: Optional[float] = None, logit_scale: Optional[float] = None) -> torch.Tensor:
    """The full logits ``[..., V]`` as the model's head makes them: ``hidden @ weight.T + bias``, times
    ``logit_scale`` (Cohere), then ``cap · tanh(z / cap)`` with ``cap = logit_softcap`` (Gemma 2/3)."""
    logits = hidden @ weight.T  # [..., D] @ [D, V] -> [..., V]
    if bias is not None:
        logits = logits + bias
    return transform_logits(logits, logit_softcap=logit_softcap, logit_scale=logit_scale)


def transform_logits(z: torch.Tensor, *, logit_softcap: Optional[float] = None,
                     logit_scale: Optional[float] = None) -> torch.Tensor:
    """The head's elementwise logit transform on raw logits ``z`` (any shape, e.g. ``[..., V]`` or gathered target
    logits ``[...]``): times ``logit_scale``, then ``cap · tanh(z / cap)`` with ``cap = logit_softcap``."""
    if logit_scale is not None:
        z = z * logit_scale
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    return z


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-prob, raw target logit and logsumexp, materializing the logits.

    Args:
        hidden: ``[..., D]`` last hidden states (post final norm).
        weight: ``[V, D]`` LM-head weight.
        labels: ``[...]`` target ids, ``ignore_index`` where there is no target.
        bias: optional ``[V]``.
        logit_softcap, logit_scale: the head's logits transform (:func:`head_logits`).

    Returns:
        ``(logp, target_logit, lse)``, each of shape ``labels.shape`` and dtype ``hidden.dtype``; all three are 0 where
        ``labels == ignore_index`` (and carry no gradient there).
    """
    logits = head_logits(hidden, weight, bias, logit_softcap=logit_softcap, logit_scale=logit_scale)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(logits, dim=-1)
    tgt = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    logp = torch.where(mask, tgt - lse, zero)
    return logp, torch.where(mask, tgt, zero), torch.where(mask, lse, zero)


def target_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Raw target logit ``z[y] = W[y]·h + b[y]`` (0 where ignored), via the full logits."""
    return token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index)[1]


def sequence_logps(token_values: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Sum of per-token values over response tokens: ``[R, T] -> [R]`` (ignored positions contribute 0)."""
    mask = (labels != ignore_index).to(token_values.dtype)
    return (token_values * mask).sum(-1)
