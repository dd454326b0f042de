"""Matmul FLOPs of the LM-head ops, counted at the dispatch level (``torch.utils.flop_counter.FlopCounterMode``).

On a machine without a GPU this count is the performance we can defend (STYLE.md, "Speed you can predict"): the
"torch" and "gemm" paths are GEMM passes over N·D·V plus elementwise work, so their time on a GPU is about
(passes) x (cuBLAS time of one pass). A pass is 2·N·D·V FLOPs; materialized logits cost 3 passes fwd+bwd (6·N·D·V).

- linear_logprobs, arbitrary upstream gradient: forward 1 + backward 3 (recompute, dh, dW) = 8·N·D·V = 4/3 x 6·N·D·V.
- linear_token_kl: the same for the policy, plus the reference's forward and its one recompute: 12·N·D·V.
- target_logits: a gather-dot, O(N·D).
- Without weight.requires_grad the dW GEMM is skipped (one pass less); with only the target logit's gradient the
  backward has no vocabulary sweep at all.
"""
import importlib.util

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vpo import linear_logprobs, linear_token_kl, target_logits
from vpo.testing import make_linear_head_inputs

N, D, V = 64, 32, 1000  # chunks of 300: 4 chunks, the last one partial
PASS = 2 * N * D * V
IMPLS = ["torch", pytest.param("gemm", marks=pytest.mark.skipif(not importlib.util.find_spec("triton"),
                                                                reason="impl='gemm' needs triton"))]


@pytest.fixture(autouse=True)
def _chunk(monkeypatch):
    monkeypatch.setenv("VPO_TORCH_CHUNK", "300")


def _inputs(weight_grad=True, bias=True, seed=0):
    x = make_linear_head_inputs(1, N, D, V, bias=bias, ignore_frac=0.25, seed=seed, requires_grad=False)
    h = x.hidden[0].requires_grad_()
    W = x.weight.requires_grad_(weight_grad)
    b = x.bias.requires_grad_() if bias else None
    return h, W, b, x.labels[0]


def _count(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weight_grad", [True, False], ids=["dW", "no_dW"])
def test_linear_logprobs_passes(impl, weight_grad):
    h, W, b, y = _inputs(weight_grad)
    g = torch.randn(N)

    def run():
        logp, tgt = linear_logprobs(h, W, y, b, impl=impl)
        (g * logp + 0.5 * g * tgt).sum().backward()

    flops = _count(run)
    passes = 4 if weight_grad else 3  # fwd + recompute + dh (+ dW)
    assert flops <= 4 / 3 * 3 * PASS  # the bound of issue 10: <= 4/3 x 6·N·D·V
    assert flops == passes * PASS, f"{flops / PASS:.3f} passes, expected {passes}"
    assert (W.grad is not None) == weight_grad and h.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_target_gradient_only_skips_the_sweep(impl):
    h, W, b, y = _inputs()
    flops = _count(lambda: linear_logprobs(h, W, y, b, impl=impl)[1].sum().backward())
    assert flops == PASS  # the forward's sweep; the backward is a gather / scatter, O(N·D)
    assert W.grad is not None and h.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weight_grad", [True, False], ids=["dW", "no_dW"])
def test_token_kl_passes(impl, weight_grad):
    h, W, b, y = _inputs(weight_grad)
    hr, Wr, br, _ = _inputs(False, seed=1)
    flops = _count(lambda: linear_token_kl(h, W, hr.detach(), Wr, y, b, br, impl=impl).sum().backward())
    policy = 4 if weight_grad else 3
    reference = 2  # its forward and the backward's recompute
    assert flops <= 4 / 3 * 3 * PASS + 2 * PASS  # the policy within 4/3 x 6·N·D·V, the reference two passes
    assert flops == (policy + reference) * PASS, f"{flops / PASS:.3f} passes, expected {policy + reference}"


@pytest.mark.parametrize("impl", ["torch", IMPLS[1]])
def test_target_logits_is_o_n_d(impl):
    h, W, b, y = _inputs()
    flops = _count(lambda: target_logits(h, W, y, b, impl=impl).sum().backward())
    assert flops <= 4 * N * D  # no matmul over V at all (elementwise gather-dot and scatter)
    assert W.grad is not None
