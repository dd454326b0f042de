"""The fused Triton token KL (``vpo_kernels.token_kl``) with a logit transform (``scale``, ``softcap``), under the
interpreter: KL and gradients (h, W, bias) against a float64 materialized oracle (error <= 2x PyTorch's own
same-dtype error + atol) and against the ops' "torch" path (``linear_token_kl(..., impl="torch", logit_softcap=,
logit_scale=)``). Shapes: N = 37, D = 24, V = 131 (no block divides them); the default interpreter config splits V.
"""
import pytest
import torch

from vpo.testing import assert_close_to_oracle, make_linear_head_inputs

ktk = pytest.importorskip("vpo_kernels.token_kl")

N_, D_, V_ = 37, 24, 131
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def _kl_oracle(h, W, hr, Wr, labels, b, br, scale, cap):
    """``KL(softmax(z') ‖ softmax(r'))`` per row, materialized, 0 on ignored rows."""
    def tr(x):
        x = x * scale
        return cap * torch.tanh(x / cap) if cap else x

    logp = tr(h @ W.T + b).log_softmax(-1)
    logq = tr(hr @ Wr.T + br).log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1) * (labels != -100)


@pytest.mark.parametrize("scale,cap", [(0.7, 0.0), (1.3, 4.0)], ids=["scale", "softcap"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_w", "separate_w"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_kl_softcap_and_scale(dtype, shared, scale, cap):
    from vpo.ops.token_kl import linear_token_kl

    x = make_linear_head_inputs(1, N_, D_, V_, bias=True, scale=4.0, requires_grad=False, seed=11)
    xr = make_linear_head_inputs(1, N_, D_, V_, bias=True, scale=4.0, requires_grad=False, seed=12)
    h64, W64, b64 = x.hidden.reshape(N_, D_).double(), x.weight.double(), x.bias.double()
    hr64 = xr.hidden.reshape(N_, D_).double()
    Wr64 = W64 if shared else xr.weight.double()
    br64 = xr.bias.double()
    labels = x.labels.reshape(N_)
    g = torch.randn(N_, dtype=torch.float64)

    ref = {}
    for rd in (torch.float64, dtype):
        leaves = [t.to(rd).requires_grad_() for t in (h64, W64, b64)]
        math_dtype = torch.float64 if rd == torch.float64 else torch.float32  # PyTorch's own fp32 math for halves
        hh, WW, bb = (t.to(math_dtype) for t in leaves)
        kl = _kl_oracle(hh, WW, hr64.to(rd).to(math_dtype), Wr64.to(rd).to(math_dtype), labels, bb,
                        br64.to(rd).to(math_dtype), scale, cap)
        ref[rd] = (kl.detach(), torch.autograd.grad((kl * g.to(math_dtype)).sum(), leaves))

    h, W, b = (t.to(dtype).requires_grad_() for t in (h64, W64, b64))
    hr, br = hr64.to(dtype), br64.to(dtype)
    Wr = W.detach() if shared else Wr64.to(dtype)
    kl = ktk.TokenKLTriton.apply(h, W, hr, Wr, labels, b, br, -100, None, scale, cap)
    atol = ATOL[dtype]
    assert kl.dtype == torch.float32 and torch.isfinite(kl).all()
    assert_close_to_oracle(kl, ref[torch.float64][0], ref[dtype][0], atol=atol, name="kl")
    grads = torch.autograd.grad((kl * g.float()).sum(), [h, W, b])
    for name, gr, o, t in zip(("dh", "dW", "db"), grads, ref[torch.float64][1], ref[dtype][1]):
        assert gr.dtype == dtype and torch.isfinite(gr).all(), name
        assert_close_to_oracle(gr, o, t, atol=atol, name=name)
    assert (kl[labels == -100] == 0).all() and (grads[0][labels == -100] == 0).all()

    # the ops' torch path (the shared epilogue) computes the same function
    t_kl = linear_token_kl(h, W, hr, Wr, labels, b, br, impl="torch", logit_softcap=cap or None, logit_scale=scale)
    assert torch.allclose(kl, t_kl, atol=10 * atol, rtol=0)
    t_grads = torch.autograd.grad((t_kl * g.float()).sum(), [h, W, b])
    for name, gr, t in zip(("dh", "dW", "db"), grads, t_grads):
        assert torch.allclose(gr.float(), t.float(), atol=10 * atol, rtol=1e-2), name


def test_policy_equals_reference_gives_zero_kl_with_softcap():
    """Identical heads and hidden states: the KL is exactly 0 under a cap and a scale (both tiles are identical)."""
    x = make_linear_head_inputs(1, N_, D_, V_, bias=True, scale=4.0, requires_grad=False, seed=13)
    h, W, b = x.hidden.reshape(N_, D_), x.weight, x.bias
    kl = ktk.TokenKLTriton.apply(h, W, h.clone(), W, x.labels.reshape(N_), b, b.clone(), -100, None, 1.7, 3.0)
    assert (kl == 0).all()
