"""Fast paths for the kernel contracts of docs/methods.md, one module per op, each with an ``impl=`` choice:

- :mod:`vpo.ops.linear_logprobs` — per-token log-prob and target logit under the LM head without ``[N, V]`` logits
  (``linear_logprobs``, ``target_logits``; ``impl="torch" | "gemm" | "triton"``).
- :mod:`vpo.ops.token_kl` — per-token KL between the policy's and the reference's next-token distributions.
- :mod:`vpo.ops._sweep` — the vocabulary sweep both share on the "torch" and "gemm" paths (GEMMs per chunk, pluggable
  elementwise steps, the chunk budget).
- :mod:`vpo.ops.segment_sum` — the segmented preference-head reduction (C++/CUDA in ``csrc``).

The public functions are exported from the top-level package (``vpo.linear_logprobs``, ...); this package re-exports
nothing so that ``vpo.ops.<op>`` always names the module.
"""
