"""vpo.fused_catpo_loss against the materializing oracle (vpo.oracle.catpo_loss): loss, metrics, every gradient."""
import math

import pytest
import torch

import vpo
from vpo.testing import assert_close_to_oracle, make_linear_head_inputs

IMPLS = ["torch", "triton"]


def _inputs(dtype, *, bias=False, seed=0, scale=1.0):
    x = make_linear_head_inputs(4, 9, 24, 131, dtype=dtype, bias=bias, seed=seed, scale=scale, prompt_len=2)
    g = torch.Generator().manual_seed(seed + 7)
    ref_h = x.hidden.detach() + 0.2 * torch.randn(x.hidden.shape, generator=g, dtype=dtype)
    w = (0.5 + torch.rand(x.labels.shape, generator=g, dtype=torch.float64)).to(dtype)  # weights in [0.5, 1.5)
    return x, ref_h, w


def _as64(ts):
    return [t.detach().double().requires_grad_() if t is not None else None for t in ts]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kl_coef", [0.0, 0.03, 1.0])
def test_matches_oracle_float32(impl, bias, kl_coef):
    x, ref_h, w = _inputs(torch.float32, bias=bias, seed=1)
    leaves = [t for t in (x.weight, x.hidden, x.bias) if t is not None]
    loss, out = vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w, x.bias, ref_h, impl=impl, beta=0.3,
                                     kl_coef=kl_coef)
    g = torch.autograd.grad(loss, leaves)
    W, H, Bb = _as64((x.weight, x.hidden, x.bias))
    lo, mo = vpo.oracle.catpo_loss(W, H, x.labels, w.double(), Bb, ref_h.double(), beta=0.3, kl_coef=kl_coef)
    go = torch.autograd.grad(lo, [t for t in (W, H, Bb) if t is not None])
    torch.testing.assert_close(loss.double(), lo, rtol=1e-5, atol=1e-6)
    for k, v in mo.items():
        torch.testing.assert_close(out.metrics[k].double(), v.double(), rtol=1e-4, atol=1e-5, msg=k)
    for a, b in zip(g, go):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    assert out.kl.shape == (2,) and (out.kl >= -1e-6).all()


def test_torch_path_float64_tight_and_identities():
    x, ref_h, w = _inputs(torch.float64, bias=True, seed=2)
    loss, out = vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w, x.bias, ref_h, impl="torch", kl_coef=0.5)
    lo, _ = vpo.oracle.catpo_loss(x.weight, x.hidden, x.labels, w, x.bias, ref_h, kl_coef=0.5)
    torch.testing.assert_close(loss, lo, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(loss, (x.weight, x.hidden, x.bias))
    gb = torch.autograd.grad(lo, (x.weight, x.hidden, x.bias))
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    # weights ≡ 1 and kl_coef = 0: plain DPO
    ones = torch.ones_like(w)
    cat, _ = vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, ones, x.bias, ref_h, impl="torch", kl_coef=0.0)
    dpo, _ = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_h, impl="torch")
    torch.testing.assert_close(cat, dpo, rtol=1e-12, atol=1e-12)
    # policy == reference: KL = 0 and the loss is log 2
    same, o = vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w, x.bias, x.hidden.detach(), impl="torch")
    assert abs(same.item() - math.log(2.0)) < 1e-12
    assert o.kl.abs().max().item() < 1e-10


@pytest.mark.parametrize("impl", IMPLS)
def test_float16_within_twice_torch_own_error(impl):
    x, ref_h, w = _inputs(torch.float16, seed=3)
    loss, _ = vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w, None, ref_h, impl=impl, kl_coef=0.5)
    g = torch.autograd.grad(loss, (x.weight, x.hidden))
    W, H = _as64((x.weight, x.hidden))
    lo, _ = vpo.oracle.catpo_loss(W, H, x.labels, w.double(), None, ref_h.double(), kl_coef=0.5)
    go = torch.autograd.grad(lo, (W, H))
    W16, H16 = (t.detach().clone().requires_grad_() for t in (x.weight, x.hidden))
    l16, _ = vpo.oracle.catpo_loss(W16, H16, x.labels, w, None, ref_h, kl_coef=0.5)
    g16 = torch.autograd.grad(l16, (W16, H16))
    assert_close_to_oracle(loss, lo, l16, atol=1e-4, name="loss")
    for a, b, c, n in zip(g, go, g16, ("weight", "hidden")):
        assert_close_to_oracle(a, b, c, atol=1e-4, name=f"grad {n}")


def test_ref_logps_path_and_ignored_weights():
    x, ref_h, w = _inputs(torch.float64, seed=4)
    with torch.no_grad():
        ref_lp = vpo.oracle.token_logprobs(ref_h, x.weight, x.labels)[0]
        ref = (ref_lp * w).sum(-1)
    l1, _ = vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w, None, ref_h, impl="torch", kl_coef=0.0)
    w_nan = w.clone()
    w_nan[x.labels == -100] = float("nan")  # values at ignored positions are unused
    l2, _ = vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w_nan, ref_logps=ref, impl="torch", kl_coef=0.0)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)


def test_no_gradient_into_weights_or_reference():
    x, ref_h, w = _inputs(torch.float64, seed=5)
    w = w.clone().requires_grad_()
    ref_h = ref_h.clone().requires_grad_()
    loss, _ = vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w, None, ref_h, impl="torch")
    loss.backward()
    assert w.grad is None and ref_h.grad is None
    assert x.hidden.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(ref_hidden=None), "ref_hidden is required when kl_coef > 0"),
        (lambda a: a.update(ref_logps=torch.zeros(4)), "not both"),
        (lambda a: a.update(ref_hidden=None, kl_coef=0.0), "give ref_hidden"),
        (lambda a: a.update(token_weights=a["token_weights"][:, :-1]), r"token_weights has shape \(4, 8\)"),
        (lambda a: a.update(kl_coef=-1.0), "kl_coef must be >= 0"),
        (lambda a: a.update(ref_hidden=a["ref_hidden"][:, :-1]), "ref_hidden has shape"),
    ],
)
def test_bad_input_raises_value_error(mutate, match):
    x, ref_h, w = _inputs(torch.float32)
    args = dict(weight=x.weight, hidden=x.hidden, labels=x.labels, token_weights=w, ref_hidden=ref_h)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        vpo.fused_catpo_loss(**args)


# ----------------------------------------------------------------------------------------------------------------------
# The engine: loss types on the weighted terms, the reference tile swept with the policy's, chunking, odd shapes
# ----------------------------------------------------------------------------------------------------------------------

from vpo.fused import Chunking  # noqa: E402
from vpo.losses import preference_pair_losses  # noqa: E402


def _oracle_catpo(W, H, labels, w, b, ref_h, ref_w=None, ref_b=None, *, kl_coef, **kw):
    """Oracle log-probs and KL -> weighted per-row terms -> the per-pair loss head + λ · weighted KL."""
    B = H.shape[0] // 2
    rw = W.detach() if ref_w is None else ref_w
    rb = (None if b is None else b.detach()) if ref_w is None else ref_b
    lp = vpo.oracle.token_logprobs(H, W, labels, b)[0]
    with torch.no_grad():
        rl = vpo.oracle.token_logprobs(ref_h, rw, labels, rb)[0]
    kl = vpo.oracle.token_kl(H, W, ref_h, rw, labels, b, rb)
    mask = labels != -100
    wm = torch.where(mask, w, torch.zeros_like(w))
    seq, ref = (wm * lp).sum(1), (wm * rl).sum(1)
    n = mask.sum(1)
    per = preference_pair_losses(seq[:B], seq[B:], ref[:B], ref[B:], chosen_tokens=n[:B], rejected_tokens=n[B:],
                                 chosen_nll=-lp[:B].sum(1), **kw)
    klr = (wm * kl).sum(1)
    return (per + kl_coef * (klr[:B] + klr[B:])).mean()


ENGINE_CASES = [(lt, Chunking(pairs=1, vocab=17)) for lt in ("sigmoid", "ipo", "hinge", "robust", "apo_zero",
                                                              "sigmoid_norm", "sft")] \
    + [("sigmoid", None), ("sigmoid", Chunking(pairs=1, vocab=50, store=False)), ("sigmoid", Chunking(memory_budget=1)),
       ("sigmoid", Chunking(vocab=50, compact=True)), ("sft", Chunking(pairs=1, compact=True, store=False))]


@pytest.mark.parametrize("loss_type, chunking", ENGINE_CASES)
def test_engine_loss_types_float64_vs_oracle(loss_type, chunking):
    x, ref_h, w = _inputs(torch.float64, bias=True, seed=41)
    labels = x.labels.clone()
    labels[1] = -100
    labels[3] = -100  # pair 1: no scored token on either side
    labels[0] = -100
    labels[0, 5] = 3  # one token
    kw = dict(beta=0.4, loss_type=loss_type, kl_coef=0.5, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    leaves = _as64((x.weight, x.hidden, x.bias))
    loss, out = vpo.fused_catpo_loss(leaves[0], leaves[1], labels, w, leaves[2], ref_h, impl="torch",
                                     chunking=chunking, **kw)
    g = torch.autograd.grad(loss, leaves)
    o = _as64((x.weight, x.hidden, x.bias))
    lo = _oracle_catpo(o[0], o[1], labels, w, o[2], ref_h, **kw)
    go = torch.autograd.grad(lo, o)
    torch.testing.assert_close(loss, lo, rtol=1e-10, atol=1e-12)
    for name, p, q in zip(("weight", "hidden", "bias"), g, go):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=lambda m: f"grad {name}: {m}")
    assert out.kl[1] == 0 and out.chosen_logps[1] == 0


def test_engine_separate_reference_single_pair_frozen_head():
    x, ref_h, w = _inputs(torch.float64, bias=True, seed=42)
    x2 = make_linear_head_inputs(2, 4, 24, 131, dtype=torch.float64, bias=True, seed=43, ignore_frac=0.0)
    ref_w = (x2.weight.detach() * 0.9).requires_grad_()
    ref_b = (x2.bias.detach() + 0.1).requires_grad_()
    rh = (x2.hidden.detach() + 0.1).requires_grad_()
    tw = torch.full(x2.labels.shape, 0.7, dtype=torch.float64)
    Wf = x2.weight.detach()  # frozen policy head, bias trains
    loss, out = vpo.fused_catpo_loss(Wf, x2.hidden, x2.labels, tw, x2.bias, rh, ref_w, ref_b, kl_coef=0.2,
                                     chunking=Chunking(pairs=1, vocab=64))
    loss.backward()
    assert ref_w.grad is None and ref_b.grad is None and rh.grad is None
    h, b = _as64((x2.hidden, x2.bias))
    lo = _oracle_catpo(Wf, h, x2.labels, tw, b, rh.detach(), ref_w.detach(), ref_b.detach(), kl_coef=0.2)
    gh, gb = torch.autograd.grad(lo, (h, b))
    torch.testing.assert_close(x2.hidden.grad, gh)
    torch.testing.assert_close(x2.bias.grad, gb)
    assert out.metrics["num_tokens/chosen"] == 4 and out.metrics["entropy/chosen"] > 0
