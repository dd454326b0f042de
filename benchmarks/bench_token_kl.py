"""Per-token KL under the LM head and the Cat-PO loss, forward + backward, never materializing ``[N, V]`` logits.

``test_token_kl``: ``vpo.linear_token_kl`` (Triton on GPU, chunked torch everywhere; fwd+bwd of ``kl.sum()``, the
reference sharing the policy's head with its own hidden states) against the naive materializing KL (both models'
logits, fp32 ``log_softmax`` each, ``Σ p·(log p − log q)``: ``_harness.naive_token_kl``) and against
``vpo.linear_logprobs`` on the same backend and shape. The results table gives ``kl/<backend>``'s time over
``logprobs/<backend>``'s (the project's GPU target: ``kl/triton`` ≤ 1.6× ``logprobs/triton``) and its memory over the
naive KL's; ``extra_info`` holds the same ratios (``time_ratio``, ``memory_ratio``) and ``target_met``.

``test_catpo``: ``vpo.fused_catpo_loss`` (weighted DPO + 0.03 · weighted KL, with the reference's hidden states)
against ``vpo.fused_dpo_loss`` on the same backend (the price of the KL term) and the oracle
``vpo.oracle.catpo_loss`` (full logits in the input dtype).

Shapes: the log-prob benchmarks' (GPU: LLaVA-1.5 D=4096 V=32064 and Qwen2-VL D=3584 V=152064 heads, N ∈ {2048, 8192,
16384}, bf16; CPU: ``cpu-small``, ``cpu-medium`` fp32), except that on GPU the torch paths run at N=2048 only and on
CPU Cat-PO runs at ``cpu-small`` only (``_harness._measured_at``: seconds per step otherwise). FLOPs: 8·N·D·V for the
KL and the losses (policy fwd+bwd, reference fwd), 6·N·D·V for the log-probs. Speed is measured, never asserted.
"""
import pytest

import _harness as H


@pytest.mark.parametrize("case", H.cases("token_kl"), ids=lambda c: c.id)
def test_token_kl(benchmark, case):
    H.run_benchmark(benchmark, case)


@pytest.mark.parametrize("case", H.cases("catpo"), ids=lambda c: c.id)
def test_catpo(benchmark, case):
    H.run_benchmark(benchmark, case)
