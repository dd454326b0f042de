"""Fused preference losses, forward + backward, from last hidden states and the LM head: vpo's fused DPO and TPO
(Triton on GPU, chunked torch everywhere) against the materializing oracles (``vpo.oracle.dpo_loss`` /
``vpo.oracle.tpo_loss``: full ``[N, V]`` logits in the input dtype) and Liger's ``LigerFusedLinearDPOLoss`` when
installed.

Batch: B preference pairs, ``hidden [2B, T, D]`` (chosen rows, then rejected), so N = 2B·T tokens; the reference model
has its own hidden states (and TPO both models' noised-image passes), sharing the head. FLOPs: 8·N·D·V (the policy's
fwd+bwd and the reference's forward). The results table compares TPO's time with DPO's on the same backend
(the project's GPU target: TPO <= 1.15x DPO) and every loss's memory with its naive version.
"""
import pytest

import _harness as H


@pytest.mark.parametrize("case", H.cases("fused_losses"), ids=lambda c: c.id)
def test_fused_losses(benchmark, case):
    H.run_benchmark(benchmark, case)
