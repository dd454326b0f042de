"""Sharded LM heads (FSDP2 DTensor, DeepSpeed ZeRO-3) for the fused losses and ops.

:func:`unshard_head` is called at the top of every public entry that takes an LM-head weight (``vpo.fused_*_loss``,
``vpo.linear_logprobs``, ``vpo.target_logits``, ``vpo.linear_token_kl``). For a plain tensor it returns its argument
unchanged. (Being filled in: DTensor gather with a sharded, rank-reduced gradient.)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def unshard_head(weight: torch.Tensor, bias: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The full ``[V, D]`` head (and ``[V]`` bias) for one call; plain tensors pass through unchanged."""
    return weight, bias
