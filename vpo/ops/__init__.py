"""Fast paths for the kernel contracts of docs/methods.md, one module per op, each with an ``impl=`` choice:

- :mod:`vpo.ops.linear_logprobs` — per-token log-prob and target logit under the LM head without ``[N, V]`` logits
  (``linear_logprobs``, ``target_logits``; chunked PyTorch Functions; Triton in ``vpo_kernels``).
- :mod:`vpo.ops.segment_sum` — the segmented preference-head reduction (C++/CUDA in ``csrc``).

The public functions are exported from the top-level package (``vpo.linear_logprobs``, ...); this package re-exports
nothing so that ``vpo.ops.<op>`` always names the module.
"""
