"""Precision of the fused losses (issue #19, item 3) and the logits transform (soft-capping, logit scale).

- No logit is rounded below fp32: fp16 inputs at logit scales >= 100 agree with the float64 oracle on the same fp16
  values within fp32-accumulation error (rounding the logits to fp16 there costs ~0.03 per token: orders above).
- Policy and reference are swept with the same rows and tiles: identical inputs give bit-identical log-probs, so the
  loss is exactly ln 2 and the rewards exactly 0, on every chunking.
- Non-finite hidden values at ignored positions (fp16 overflow in padding) never reach a loss, a metric or a gradient.
- ``logit_softcap`` / ``logit_scale`` against the oracle (``vpo.oracle.dpo_loss``, ``head_logits``), values and
  gradients.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import vpo
from vpo.fused import Chunking
from vpo.oracle.logprobs import head_logits
from vpo.testing import make_linear_head_inputs

F64 = torch.float64
CHUNKINGS = [None, Chunking(pairs=1, vocab=64), Chunking(pairs=1, vocab=64, store=False, compact=False)]
CHUNK_IDS = ["default", "tiled", "tiled-recompute-cuda-rows"]


def _scaled_fp16(scale, seed=0, B=2, T=9, D=32, V=301):
    """fp16 inputs whose logits have a spread of about ``scale`` (max |z| >= scale)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, D, generator=g)
    W = torch.randn(V, D, generator=g)
    h = h / h.norm(dim=-1, keepdim=True)
    W = W / W.norm(dim=-1, keepdim=True) * scale
    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, :3] = -100
    rh = h + 0.05 * torch.randn(h.shape, generator=g)
    return h.half(), W.half(), y, rh.half()


@pytest.mark.parametrize("scale", [100.0, 140.0])
@pytest.mark.parametrize("chunking", CHUNKINGS, ids=CHUNK_IDS)
def test_fp16_at_large_logit_scale_matches_the_float64_oracle(scale, chunking):
    h, W, y, rh = _scaled_fp16(scale)
    assert (h.float() @ W.float().T).abs().max() >= 0.5 * scale
    hf = h.clone().requires_grad_()
    loss, out = vpo.fused_dpo_loss(W, hf, y, ref_hidden=rh, chunking=chunking)
    loss.backward()
    h64 = h.to(F64).requires_grad_()
    ref_loss, m = vpo.oracle.dpo_loss(W.to(F64), h64, y, ref_hidden=rh.to(F64))
    ref_loss.backward()
    # per-sequence log-probs: ~T·|z|·2^-24 of fp32 accumulation; fp16 logits would be off by ~1e-1 here
    logps = torch.cat([out.chosen_logps, out.rejected_logps]).to(F64)
    want = torch.cat([m["logps/chosen_all"], m["logps/rejected_all"]]) if "logps/chosen_all" in m else None
    if want is None:
        from vpo.oracle.logprobs import sequence_logps, token_logprobs

        want = sequence_logps(token_logprobs(h.to(F64), W.to(F64), y)[0], y)
    torch.testing.assert_close(logps, want, rtol=0, atol=2e-3)
    torch.testing.assert_close(loss.to(F64), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    g, g64 = hf.grad.to(F64), h64.grad
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, g64, rtol=0, atol=1e-3 * g64.abs().max().item())


def test_fp16_logits_are_not_rounded_to_fp16():
    """The tolerance above can fail: rounding the logits to fp16 (what the engine did before) misses it."""
    h, W, y, _ = _scaled_fp16(140.0)
    from vpo.oracle.logprobs import sequence_logps, token_logprobs

    exact = sequence_logps(token_logprobs(h.to(F64), W.to(F64), y)[0], y)
    rounded_logits = (h.float() @ W.float().T).half().to(F64)
    lp = torch.log_softmax(rounded_logits, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
    rounded = torch.where(y != -100, lp, torch.zeros((), dtype=F64)).sum(-1)
    assert (rounded - exact).abs().max() > 2e-3


def _pair(dtype, seed=1):
    x = make_linear_head_inputs(4, 7, 16, 203, dtype=dtype, bias=True, seed=seed, prompt_len=2)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunking", CHUNKINGS, ids=CHUNK_IDS)
def test_policy_equal_to_reference_is_exact(dtype, chunking):
    x = _pair(dtype)
    ln2 = -F.logsigmoid(torch.zeros((), dtype=torch.float32))
    loss, out = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_hidden=x.hidden.detach(),
                                   chunking=chunking)
    assert loss.item() == ln2.item()
    assert (out.chosen_rewards == 0).all() and (out.rejected_rewards == 0).all()
    hn = x.hidden.detach() + 0.1
    loss, out = vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, ref_hidden=x.hidden.detach(),
                                   ref_hidden_noised=hn, chunking=chunking)
    assert loss.item() == ln2.item()
    assert (out.margins == 0).all()
    w = torch.rand(x.labels.shape) + 0.5
    loss, out = vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w.to(dtype), x.bias,
                                     ref_hidden=x.hidden.detach(), chunking=chunking)
    assert loss.item() == ln2.item() and out.metrics["catpo/kl"].item() == 0.0
    assert (out.margins == 0).all()


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
@pytest.mark.parametrize("chunking", [None, Chunking(compact=False), Chunking(pairs=1, vocab=32, compact=False)],
                         ids=["cpu-default", "all-rows", "all-rows-tiled"])
def test_non_finite_values_at_ignored_positions_never_reach_anything(bad, chunking):
    x = _pair(torch.float32, seed=3)
    ignored = x.labels == -100
    assert ignored.any() and (~ignored).any()

    def run(fill):
        h = x.hidden.detach().clone()
        h[ignored] = fill
        hn = (h + 0.1).detach()
        rh = h * 0.9
        h.requires_grad_(), hn.requires_grad_()
        W = x.weight.detach().clone().requires_grad_()
        w = torch.rand(x.labels.shape, generator=torch.Generator().manual_seed(0)) + 0.5
        outs = []
        for fn in (lambda: vpo.fused_dpo_loss(W, h, x.labels, ref_hidden=rh, chunking=chunking),
                   lambda: vpo.fused_tpo_loss(W, h, hn, x.labels, ref_hidden=rh, ref_hidden_noised=rh + 0.1,
                                              chunking=chunking),
                   lambda: vpo.fused_catpo_loss(W, h, x.labels, w, ref_hidden=rh, chunking=chunking)):
            for t in (h, hn, W):
                t.grad = None
            loss, out = fn()
            loss.backward()
            outs.append((loss.detach(), {k: v.detach() for k, v in out.metrics.items()},
                         h.grad.clone(), W.grad.clone(), None if hn.grad is None else hn.grad.clone()))
        return outs

    clean, dirty = run(0.0), run(bad)
    for a, b in zip(clean, dirty):
        assert torch.isfinite(b[0]) and all(torch.isfinite(v).all() for v in b[1].values())
        torch.testing.assert_close(b[0], a[0])
        for k in a[1]:
            torch.testing.assert_close(b[1][k], a[1][k], msg=k)
        for ga, gb in zip(a[2:], b[2:]):
            if ga is not None:
                assert torch.isfinite(gb).all()
                torch.testing.assert_close(gb, ga)


# ----------------------------------------------------------------------------------------------------------------------
# Soft-capping and logit scale
# ----------------------------------------------------------------------------------------------------------------------

TRANSFORMS = [dict(logit_softcap=3.0), dict(logit_scale=0.37), dict(logit_softcap=2.0, logit_scale=4.0)]
T_IDS = ["softcap", "scale", "both"]


@pytest.mark.parametrize("kw", TRANSFORMS, ids=T_IDS)
@pytest.mark.parametrize("chunking", CHUNKINGS, ids=CHUNK_IDS)
def test_fused_dpo_transform_matches_the_oracle(kw, chunking):
    x = make_linear_head_inputs(4, 6, 16, 150, dtype=F64, bias=True, seed=5, prompt_len=2)
    rh = (x.hidden.detach() * 0.8)
    loss, out = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_hidden=rh, chunking=chunking, **kw)
    loss.backward()
    got = (loss.detach(), x.hidden.grad.clone(), x.weight.grad.clone(), x.bias.grad.clone())
    for t in (x.hidden, x.weight, x.bias):
        t.grad = None
    ref, _ = vpo.oracle.dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_hidden=rh, **kw)
    ref.backward()
    want = (ref.detach(), x.hidden.grad, x.weight.grad, x.bias.grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the transform matters: without it the loss differs
    plain, _ = vpo.oracle.dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_hidden=rh)
    assert abs(plain.item() - ref.item()) > 1e-4


@pytest.mark.parametrize("kw", TRANSFORMS, ids=T_IDS)
@pytest.mark.parametrize("impl", ["torch", "gemm"])
def test_ops_transform_against_materialized_logits(kw, impl):
    x = make_linear_head_inputs(1, 13, 8, 97, dtype=torch.float32, bias=True, seed=6, prompt_len=3)
    h = x.hidden[0].detach().clone().requires_grad_()
    W, b, y = x.weight, x.bias, x.labels[0]
    hr = (h.detach() * 0.7 + 0.1)
    logp, tgt = vpo.linear_logprobs(h, W, y, b, impl=impl, chunk_budget_mb=13 * 40 * 8 / 2**20, **kw)
    kl = vpo.linear_token_kl(h, W, hr, labels=y, bias=b, impl=impl, chunk_budget_mb=13 * 40 * 16 / 2**20, **kw)
    tz = vpo.target_logits(h, W, y, b, impl=impl, **kw)
    torch.testing.assert_close(tz, tgt)  # the gather-dot op applies the same transform
    (logp.sum() + 0.3 * tgt.sum() + 0.7 * kl.sum() + 0.2 * tz.sum()).backward()
    got = (logp.detach(), tgt.detach(), kl.detach(), h.grad.clone(), W.grad.clone(), b.grad.clone())
    for t in (h, W, b):
        t.grad = None
    h64, W64, b64 = (t.detach().to(F64).requires_grad_() for t in (h, W, b))
    z = head_logits(h64, W64, b64, **kw)
    zr = head_logits(hr.to(F64), W64.detach(), b64.detach(), **kw)
    lp, lq = z.log_softmax(-1), zr.log_softmax(-1)
    m = y != -100
    yy = y.clamp_min(0)[:, None]
    e_logp = torch.where(m, lp.gather(1, yy)[:, 0], 0.0)
    e_tgt = torch.where(m, z.gather(1, yy)[:, 0], 0.0)
    e_kl = torch.where(m, (lp.exp() * (lp - lq)).sum(-1), 0.0)
    (e_logp.sum() + 0.5 * e_tgt.sum() + 0.7 * e_kl.sum()).backward()
    want = (e_logp, e_tgt, e_kl, h64.grad, W64.grad, b64.grad)
    for a, w_ in zip(got, want):
        torch.testing.assert_close(a.to(F64), w_, rtol=2e-4, atol=2e-5)


def test_tpo_logit_scale_is_scaling_the_hidden_states():
    """Without a bias, z' = s·(h·W) = (s·h)·W: TPO with logit_scale equals TPO on scaled hidden states (values and
    gradients, chain rule through the scale)."""
    x = make_linear_head_inputs(4, 6, 16, 90, dtype=F64, bias=False, seed=8, prompt_len=2)
    hn = (x.hidden.detach() + 0.2 * torch.randn_like(x.hidden)).requires_grad_()
    rh, rhn = x.hidden.detach() * 0.9, hn.detach() * 0.9
    s = 1.7
    loss, out = vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, ref_hidden=rh, ref_hidden_noised=rhn,
                                   logit_scale=s)
    loss.backward()
    got = (loss.detach(), x.hidden.grad.clone(), hn.grad.clone(), x.weight.grad.clone(), out.scores)
    h2, hn2 = (t.detach().clone().requires_grad_() for t in (x.hidden, hn))
    W2 = x.weight.detach().clone().requires_grad_()
    loss2, out2 = vpo.fused_tpo_loss(W2, h2 * s, hn2 * s, x.labels, ref_hidden=rh * s, ref_hidden_noised=rhn * s)
    loss2.backward()
    for a, b in zip(got, (loss2.detach(), h2.grad, hn2.grad, W2.grad, out2.scores)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True, "3"])
def test_bad_transform_is_a_value_error(bad):
    x = _pair(torch.float32)
    for name in ("logit_softcap", "logit_scale"):
        with pytest.raises(ValueError, match=name):
            vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, ref_hidden=x.hidden.detach(), **{name: bad})
        with pytest.raises(ValueError, match=name):
            vpo.linear_logprobs(x.hidden, x.weight, x.labels, **{name: bad})


def test_ln2_is_what_the_exactness_test_compares_with():
    assert math.isclose(-F.logsigmoid(torch.zeros(())).item(), math.log(2), rel_tol=1e-7)


@pytest.mark.parametrize("kw", TRANSFORMS, ids=T_IDS)
def test_triton_composition_applies_the_transform(kw):
    """impl="triton" composes the Triton ops, which apply the same transform: its loss equals the engine's."""
    x = make_linear_head_inputs(4, 5, 8, 70, dtype=torch.float32, bias=True, seed=9, prompt_len=2)
    rh = x.hidden.detach() * 0.9
    hn = x.hidden.detach() + 0.1
    w = torch.rand(x.labels.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    for fn in (lambda impl: vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_hidden=rh, impl=impl, **kw),
               lambda impl: vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, ref_hidden=rh,
                                               ref_hidden_noised=rh + 0.1, impl=impl, **kw),
               lambda impl: vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w, x.bias, ref_hidden=rh, impl=impl,
                                                 **kw)):
        torch.testing.assert_close(fn("triton")[0], fn("torch")[0], rtol=1e-5, atol=1e-6)
