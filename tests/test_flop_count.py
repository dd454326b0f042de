"""GEMM FLOPs of the fused losses, counted at the dispatch level on the torch path (forward + backward).

One pass over the vocabulary is a GEMM of 2·N·D·V FLOPs (N = 2B·T positions: the engine sweeps every position, so the
inputs here score every position). The materialized baseline does 3 policy passes (logits, dh, dW) + 1 reference pass:
8·N·D·V. The engine (vpo/fused/_engine.py) forms the policy gradient in the forward, so:

    DPO / TPO / Cat-PO with a reference     policy 3 + reference 1 = 4 passes = 8NDV   -> bound 1.05 × 8NDV
    (TPO's noised pass is an O(N·D) gather-dot, Cat-PO's reference tile is swept once with the policy's: no extra pass)
    frozen head (weight.requires_grad False) policy 2 (no dW) + reference 1   = 6NDV   -> bound 1.05 × 6NDV
    no grad (eval)                           policy 1 + reference 1            = 4NDV   -> bound 1.05 × 4NDV
    logits not kept (Chunking(store=False))  policy 4 + reference 1            = 10NDV  -> bound 1.05 × 10NDV
    Chunking(compact=True)                   the policy's 3 passes over the scored tokens only: 6·N_scored·D·V

The composition this replaced (linear_logprobs forward, recompute + dh + dW in its backward, plus the reference) did
10NDV = 1.25 × 8NDV for DPO, and fails the first bound. The 5% slack covers nothing today (the O(N·D) terms are not
GEMMs); it is there so a future O(N·D) GEMM does not break the test.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vpo
from vpo.fused import Chunking
from vpo.testing import make_linear_head_inputs

aten = torch.ops.aten
B, T, D, V = 2, 8, 16, 257
N = 2 * B * T
PASS = 2 * N * D * V  # FLOPs of one GEMM pass over the vocabulary


class GemmFlops(TorchDispatchMode):
    """Counts 2·M·K·N for every matrix product that reaches the dispatcher (mm, addmm and their in-place, out_dtype
    and batched forms)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in (aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.baddbmm_):
            a, b = (args[0], args[1]) if packet in (aten.mm, aten.bmm) else (args[1], args[2])
            batch = a.shape[0] if a.dim() == 3 else 1
            self.flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        elif packet in (aten.matmul, aten.linear, aten.addmv, aten.mv, aten.dot):
            raise AssertionError(f"uncounted product {func}")  # decomposes into mm above under dispatch
        return func(*args, **(kwargs or {}))


def _inputs(seed=0, weight_grad=True):
    x = make_linear_head_inputs(2 * B, T, D, V, dtype=torch.float32, bias=True, seed=seed, ignore_frac=0.0)
    x.weight.requires_grad_(weight_grad)
    g = torch.Generator().manual_seed(seed + 1)
    noise = lambda: 0.1 * torch.randn(x.hidden.shape, generator=g)  # noqa: E731
    hn = (x.hidden.detach() + noise()).requires_grad_()
    return x, hn, x.hidden.detach() + noise(), hn.detach() + noise()


def _count(fn, backward=True):
    with GemmFlops() as mode:
        loss = fn()
        if backward:
            loss.backward()
    return mode.flops


def _dpo(x, hn, rh, rhn, **kw):
    return vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, rh, impl="torch", **kw)[0]


def _tpo(x, hn, rh, rhn, **kw):
    return vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, rh, rhn, impl="torch", **kw)[0]


def _catpo(x, hn, rh, rhn, **kw):
    w = torch.rand(x.labels.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    return vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w, x.bias, rh, impl="torch", **kw)[0]


@pytest.mark.parametrize("loss_fn", [_dpo, _tpo, _catpo], ids=["dpo", "tpo", "catpo"])
@pytest.mark.parametrize("chunking", [None, Chunking(pairs=1, vocab=100)], ids=["default", "tiled"])
def test_fwd_bwd_within_1_05_of_8ndv(loss_fn, chunking):
    flops = _count(lambda: loss_fn(*_inputs(), chunking=chunking))
    assert flops <= 1.05 * 4 * PASS, f"{flops / PASS:.3f} GEMM passes, expected <= 4.2 (policy 3 + reference 1)"
    assert flops >= 4 * PASS  # the count sees the GEMMs at all


@pytest.mark.parametrize("loss_fn", [_dpo, _tpo, _catpo], ids=["dpo", "tpo", "catpo"])
def test_frozen_head_skips_the_dw_pass(loss_fn):
    args = _inputs(weight_grad=False)
    flops = _count(lambda: loss_fn(*args))
    assert flops <= 1.05 * 3 * PASS, f"{flops / PASS:.3f} passes, expected <= 3.15 (logits, dh; reference)"
    assert args[0].weight.grad is None and args[0].hidden.grad is not None


def test_no_grad_is_one_pass_per_model():
    with torch.no_grad():
        flops = _count(lambda: _dpo(*_inputs()), backward=False)
    assert flops <= 1.05 * 2 * PASS


def test_recompute_mode_costs_one_more_pass():
    flops = _count(lambda: _dpo(*_inputs(), chunking=Chunking(pairs=1, vocab=100, store=False)))
    assert 5 * PASS <= flops <= 1.05 * 5 * PASS


def test_compact_sweeps_only_the_scored_tokens():
    x, hn, rh, rhn = _inputs()
    labels = x.labels.clone()
    labels[:, : T // 2] = -100  # a prompt: half the positions are not scored
    n_scored = int((labels != -100).sum())
    flops = _count(lambda: vpo.fused_dpo_loss(x.weight, x.hidden, labels, x.bias, ref_logps=torch.zeros(2 * B),
                                              chunking=Chunking(compact=True))[0])
    assert flops == 3 * 2 * n_scored * D * V
