"""Triton kernels for vpo. Each module holds one op: its kernels, host launchers and autograd Function — for the two
largest (``linear_logprobs``, ``token_kl``) the ``@triton.jit`` kernels sit in a sibling ``*_kernels`` module.

Importing this package imports Triton; set ``TRITON_INTERPRET=1`` before importing it to run on CPU.

``epilogue`` holds the two per-tile kernels of every vocabulary sweep (the contract of ``vpo.ops.epilogue``: the ops'
``impl="gemm"`` path and the fused losses on CUDA; the GEMMs are cuBLAS), registered as the custom ops
``torch.ops.vpo.tile_stats_`` / ``tile_grad``.
Every kernel is listed, with its configs, in ``_aot.KERNELS``: ``tests/test_aot_compile.py`` compiles each one for
sm_80 and sm_90 without a GPU; a new kernel is one line there.
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
