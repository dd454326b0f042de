"""What every loss head of :mod:`vpo.losses` shares: the :data:`Metrics` type, the checks of its ``[B]`` inputs and the
``-log σ(margin)`` reduction with its metrics.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from vpo._validate import check_float, check_like, check_range

Metrics = Dict[str, torch.Tensor]


def _check_seq(name: str, t, ref_name: Optional[str] = None, ref: Optional[torch.Tensor] = None) -> torch.Tensor:
    check_float(name, t, ndim=1)
    if ref is not None:
        check_like(name, t, ref_name, ref)
    return t


def _check_seqs(*named: Tuple[str, torch.Tensor]) -> None:
    """Every ``(name, tensor)`` is a non-empty ``[B]`` float tensor like the first one."""
    first_name, first = named[0]
    _check_seq(first_name, first)
    for name, t in named[1:]:
        _check_seq(name, t, first_name, first)


def _check_real(name: str, value: float) -> None:
    check_range(name, value, -math.inf, math.inf, lo_open=True, hi_open=True)


def _fraction(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(like.dtype).mean()


def _margin_loss(prefix: str, margin: torch.Tensor, means: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Metrics]:
    """``-log σ(margin)`` averaged over the batch, with the metrics ``{prefix}/loss``, ``{prefix}/margin`` (batch mean),
    ``{prefix}/accuracy`` (fraction of margins > 0) and the batch mean of each tensor in ``means``, under its key."""
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        metrics = {
            f"{prefix}/loss": loss.detach(),
            f"{prefix}/margin": margin.detach().mean(),
            f"{prefix}/accuracy": _fraction(margin > 0, margin),
            **{key: t.detach().mean() for key, t in means.items()},
        }
    return loss, metrics
