"""Triton kernels for vpo. Each module holds one op: its kernels, host launchers and autograd Function.

Importing this package imports Triton; set ``TRITON_INTERPRET=1`` before importing it to run on CPU.
"""
from vpo_kernels.linear_logprobs import (
    LinearLogprobsConfig,
    LinearLogprobsTriton,
    TileConfig,
    linear_logprobs_bwd,
    linear_logprobs_fwd,
)
from vpo_kernels.target_logits import GatherConfig, TargetLogitsTriton, target_logits_bwd, target_logits_fwd

__all__ = [
    "linear_logprobs_fwd",
    "linear_logprobs_bwd",
    "LinearLogprobsTriton",
    "LinearLogprobsConfig",
    "TileConfig",
    "target_logits_fwd",
    "target_logits_bwd",
    "TargetLogitsTriton",
    "GatherConfig",
]
