"""The oracle: plain, readable PyTorch for every item of SPEC.md.

Everything here materializes whatever it needs (full ``[N, V]`` logits, full attention maps) and works in float64, so
the fast paths (``vpo.ops``, ``vpo_kernels``, ``csrc``) can be tested against it. Nothing here is meant to be fast.
"""
from vpo.oracle.logprobs import sequence_logps, token_logprobs, target_logits

__all__ = ["token_logprobs", "target_logits", "sequence_logps"]
