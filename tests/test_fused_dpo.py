"""vpo.fused_dpo_loss against the materializing oracle (vpo.oracle.dpo_loss): loss, metrics, every gradient."""
import pytest
import torch

import vpo
from vpo.testing import assert_close_to_oracle, make_linear_head_inputs

IMPLS = ["torch", "triton"]


def _pair(impl, dtype, *, bias=False, seed=0, rows=4, seq=9, dim=24, vocab=131, scale=1.0, prompt_len=2):
    x = make_linear_head_inputs(rows, seq, dim, vocab, dtype=dtype, bias=bias, seed=seed, scale=scale,
                                prompt_len=prompt_len)
    ref_h = (x.hidden.detach() + 0.05 * torch.randn_like(x.hidden)).to(dtype)
    return x, ref_h


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_oracle_float32(impl, bias):
    x, ref_h = _pair(impl, torch.float32, bias=bias)
    loss, out = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_h, impl=impl, beta=0.3)
    gl = _grads(loss, (x.weight, x.hidden, x.bias))
    x64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x.weight, x.hidden, x.bias)]
    lo, mo = vpo.oracle.dpo_loss(x64[0], x64[1], x.labels, x64[2], ref_h.double(), beta=0.3)
    go = _grads(lo, x64)
    torch.testing.assert_close(loss.double(), lo, rtol=1e-5, atol=1e-6)
    for k, v in mo.items():
        torch.testing.assert_close(out.metrics[k].double(), v.double(), rtol=1e-4, atol=1e-5, msg=k)
    for a, b in zip(gl, go):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    B = x.hidden.shape[0] // 2
    assert out.margins.shape == (B,) and out.chosen_rewards.shape == (B,)
    torch.testing.assert_close(out.margins, out.chosen_rewards - out.rejected_rewards)


def test_torch_path_float64_tight():
    x, ref_h = _pair("torch", torch.float64, bias=True, seed=3)
    loss, _ = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_h, impl="torch", label_smoothing=0.2)
    lo, _ = vpo.oracle.dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_h, label_smoothing=0.2)
    torch.testing.assert_close(loss, lo, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(loss, (x.weight, x.hidden, x.bias)), _grads(lo, (x.weight, x.hidden, x.bias))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_float16_error_within_twice_torch_own(impl):
    x, ref_h = _pair(impl, torch.float16, seed=5)
    loss, _ = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, ref_hidden=ref_h, impl=impl)
    g = _grads(loss, (x.weight, x.hidden))
    w64, h64 = (t.detach().double().requires_grad_() for t in (x.weight, x.hidden))
    lo, _ = vpo.oracle.dpo_loss(w64, h64, x.labels, ref_hidden=ref_h.double())
    go = _grads(lo, (w64, h64))
    w16, h16 = (t.detach().clone().requires_grad_() for t in (x.weight, x.hidden))
    l16, _ = vpo.oracle.dpo_loss(w16, h16, x.labels, ref_hidden=ref_h)  # PyTorch's own fp16 computation
    g16 = _grads(l16, (w16, h16))
    assert_close_to_oracle(loss, lo, l16, atol=1e-4, name="loss")
    for a, b, c, n in zip(g, go, g16, ("weight", "hidden")):
        assert a.dtype == torch.float16
        assert_close_to_oracle(a, b, c, atol=1e-4, name=f"grad {n}")


@pytest.mark.parametrize("impl", IMPLS)
def test_edge_rows_huge_logits_and_ref_logps(impl):
    x, ref_h = _pair(impl, torch.float32, scale=2e3, seed=7)
    labels = x.labels.clone()
    labels[1] = -100  # a chosen response with no scored token
    labels[3, :] = -100
    labels[3, 4] = 5  # a one-token rejected response
    lo, mo = vpo.oracle.dpo_loss(x.weight.double(), x.hidden.double(), labels, ref_hidden=ref_h.double())
    ref = vpo.oracle.token_logprobs(ref_h.double(), x.weight.double(), labels)[0].sum(-1)
    for kw in ({"ref_hidden": ref_h}, {"ref_logps": ref.float()}):
        loss, out = vpo.fused_dpo_loss(x.weight, x.hidden, labels, impl=impl, **kw)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), lo, rtol=1e-4, atol=1e-4)
        assert out.chosen_logps[1].item() == 0.0
        gh, = torch.autograd.grad(loss, x.hidden)
        assert torch.isfinite(gh).all()
        assert gh[1].abs().max().item() == 0.0  # no token, no gradient
        assert gh[3, :4].abs().max().item() == 0.0 and gh[3, 4].abs().max().item() > 0


def test_reference_head_defaults_and_separate_reference():
    x, ref_h = _pair("torch", torch.float64, bias=True, seed=11)
    ref_w = x.weight.detach() + 0.1
    loss, _ = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_h, ref_w, impl="torch")
    lo, _ = vpo.oracle.dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_h, ref_w)
    torch.testing.assert_close(loss, lo)
    # default: the reference shares weight and bias
    loss2, _ = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_h, impl="torch")
    lo2, _ = vpo.oracle.dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_h, x.weight.detach(), x.bias.detach())
    torch.testing.assert_close(loss2, lo2)
    assert not torch.allclose(loss, loss2)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(hidden=a["hidden"][:3], labels=a["labels"][:3], ref_hidden=a["ref_hidden"][:3]),
         "even, non-zero 2B rows"),
        (lambda a: a.update(labels=a["labels"][:, :-1]), r"labels has shape \(4, 8\) but hidden has shape \(4, 9, 24\)"),
        (lambda a: a.update(weight=a["weight"].double()), "weight has dtype float64 but hidden has dtype float32"),
        (lambda a: a.update(weight=a["weight"][:, :5]), r"expected weight.shape\[1\] == hidden.shape\[-1\]"),
        (lambda a: a.update(ref_hidden=None), "give exactly one of ref_hidden"),
        (lambda a: a.update(ref_logps=torch.zeros(4)), "got both"),
        (lambda a: a.update(labels=a["labels"].float()), "labels must have dtype"),
        (lambda a: a.update(beta=0.0), "beta must be > 0"),
        (lambda a: a.update(ref_bias=torch.zeros(131)), "ref_bias is given but ref_weight is None"),
        (lambda a: a.update(impl="cuda"), "impl must be one of"),
        (lambda a: a.update(hidden=a["hidden"][:0], labels=a["labels"][:0], ref_hidden=a["ref_hidden"][:0]),
         "hidden must not be empty"),
    ],
)
def test_bad_input_raises_value_error(mutate, match):
    x, ref_h = _pair("torch", torch.float32)
    args = dict(weight=x.weight, hidden=x.hidden, labels=x.labels, ref_hidden=ref_h)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        vpo.fused_dpo_loss(**args)


def test_label_range_device_assert_or_debug_value_error(monkeypatch):
    """Out-of-range labels: a device-side assert by default (RuntimeError on CPU, no host sync), the ValueError naming
    the value with VPO_DEBUG_CHECKS=1."""
    x, ref_h = _pair("torch", torch.float32)
    bad = torch.full_like(x.labels, 131)
    monkeypatch.delenv("VPO_DEBUG_CHECKS", raising=False)
    with pytest.raises(RuntimeError, match=r"labels contains a value outside \[0, 131\)"):
        vpo.fused_dpo_loss(x.weight, x.hidden, bad, ref_hidden=ref_h)
    monkeypatch.setenv("VPO_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match=r"labels contains 131: expected values in \[0, 131\)"):
        vpo.fused_dpo_loss(x.weight, x.hidden, bad, ref_hidden=ref_h)
