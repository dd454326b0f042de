"""Triton linear log-probs and target logits vs the float64 oracle (interpreter lane on CPU; ``gpu`` lane for bf16).

Every output and every gradient (h, W, bias) must have error <= 2x PyTorch's own error in the same dtype (the oracle's
code run in that dtype, logits materialized) + a small atol. Fresh allocations are NaN-filled so unwritten outputs fail.
"""
import math

import pytest
import torch

from vpo.oracle import token_logprobs
from vpo.testing import assert_close_to_oracle, make_linear_head_inputs
import vpo_kernels.target_logits as tl_mod
from vpo_kernels import (
    GatherConfig,
    LinearLogprobsConfig,
    LinearLogprobsTriton,
    TargetLogitsTriton,
    TileConfig,
    linear_logprobs_bwd,
    linear_logprobs_fwd,
    target_logits_fwd,
)
from vpo_kernels.linear_logprobs import _pick_split_v

N_, D_, V_ = 37, 24, 131  # no block size below divides any of them
# Blocks that divide nothing above; split_v=3 exercises the split combine (5 V tiles -> splits of 2, 2, 1).
ODD = LinearLogprobsConfig(sweep=TileConfig(16, 32, 16), bwd=TileConfig(16, 32, 16), gather=GatherConfig(16, 16),
                           split_v=3, group_n=2)
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    """Outputs the kernels must write fully start as NaN."""
    monkeypatch.setattr(tl_mod, "_empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                                   device=device))


def _flat_inputs(dtype, *, n=N_, d=D_, v=V_, bias=True, device="cpu", **kw):
    x = make_linear_head_inputs(1, n, d, v, dtype=dtype, bias=bias, device=device, requires_grad=False, **kw)
    h = x.hidden.reshape(n, d).detach().requires_grad_()
    W = x.weight.detach().requires_grad_()
    b = x.bias.detach().requires_grad_() if bias else None
    return h, W, x.labels.reshape(n), b


def _leaves(h, W, b, dtype):
    out = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (h, W, b)]
    return out


def _loss(logp, tgt, g1, g2, mode):
    loss = 0.0
    if mode in ("both", "logp"):
        loss = loss + (logp.to(g1.dtype) * g1).sum()
    if mode in ("both", "target"):
        loss = loss + (tgt.to(g2.dtype) * g2).sum()
    return loss


def _grads(loss, leaves):
    ts = [t for t in leaves if t is not None]
    gs = torch.autograd.grad(loss, ts)
    it = iter(gs)
    return [next(it) if t is not None else None for t in leaves]


def _reference(h, W, labels, b, dtype, g1, g2, mode):
    """PyTorch's own computation (oracle code, logits materialized) in ``dtype``: values and grads."""
    hh, WW, bb = _leaves(h, W, b, dtype)
    logp, tgt, lse = token_logprobs(hh, WW, labels, bb)
    grads = _grads(_loss(logp, tgt, g1.to(dtype), g2.to(dtype), mode), [hh, WW, bb])
    return (logp.detach(), tgt.detach(), lse.detach()), grads


def _check_all(dtype, h, W, labels, b, mode="both", config=ODD, atol=None):
    atol = ATOL[dtype] if atol is None else atol
    n = h.shape[0]
    g1 = torch.randn(n, dtype=torch.float64, device=h.device)
    g2 = torch.randn(n, dtype=torch.float64, device=h.device)
    # float64 oracle, except fp32 for the realistic GPU shape (4096 x 32064 float64 logits would be 1 GB, slow)
    oracle_dtype = torch.float64 if n * W.shape[0] <= 5e7 else torch.float32
    (o_logp, o_tgt, o_lse), o_grads = _reference(h, W, labels, b, oracle_dtype, g1, g2, mode)
    (t_logp, t_tgt, _), t_grads = _reference(h, W, labels, b, dtype, g1, g2, mode)

    logp, tgt = LinearLogprobsTriton.apply(h, W, labels, b, -100, config)
    assert logp.dtype == torch.float32 and tgt.dtype == torch.float32
    assert not torch.isnan(logp).any() and not torch.isnan(tgt).any()
    assert_close_to_oracle(logp, o_logp, t_logp, atol=atol, name="logp")
    assert_close_to_oracle(tgt, o_tgt, t_tgt, atol=atol, name="target_logit")
    grads = _grads(_loss(logp, tgt, g1.float(), g2.float(), mode), [h, W, b])
    for name, g, o, t, x in zip(("dh", "dW", "db"), grads, o_grads, t_grads, (h, W, b)):
        if x is None:
            continue
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert not torch.isnan(g).any(), name
        assert_close_to_oracle(g, o, t, atol=atol, name=name)
    ignored = labels == -100
    assert (logp[ignored] == 0).all() and (tgt[ignored] == 0).all()
    assert (grads[0][ignored] == 0).all()
    return logp, tgt, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["both", "logp", "target"])
def test_linear_logprobs_matches_oracle(dtype, bias, mode):
    h, W, labels, b = _flat_inputs(dtype, bias=bias)
    _check_all(dtype, h, W, labels, b, mode=mode)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.float16, 1e3)])
def test_huge_logits(dtype, scale):
    h, W, labels, b = _flat_inputs(dtype, bias=True, scale=scale, seed=1)
    logp, _, _ = _check_all(dtype, h, W, labels, b, atol=ATOL[dtype] * scale)
    assert torch.isfinite(logp).all()


def test_lse_output_matches_oracle():
    h, W, labels, b = _flat_inputs(torch.float32)
    logp, tgt, lse = linear_logprobs_fwd(h.detach(), W.detach(), labels, b.detach(), -100, config=ODD)
    o_logp, o_tgt, o_lse = token_logprobs(h.detach().double(), W.detach().double(), labels, b.detach().double())
    t_lse = token_logprobs(h.detach(), W.detach(), labels, b.detach())[2]
    assert_close_to_oracle(lse, o_lse, t_lse, name="lse")


def test_all_rows_ignored():
    h, W, labels, b = _flat_inputs(torch.float32, bias=True)
    labels = torch.full_like(labels, -100)
    logp, tgt = LinearLogprobsTriton.apply(h, W, labels, b, -100, ODD)
    assert (logp == 0).all() and (tgt == 0).all()
    dh, dW, db = torch.autograd.grad((logp * 2 + tgt * 3).sum(), [h, W, b])
    assert (dh == 0).all() and (dW == 0).all() and (db == 0).all()
    z = TargetLogitsTriton.apply(h, W, labels, b, -100, ODD.gather)
    assert (z == 0).all()
    dh, dW, db = torch.autograd.grad(z.sum(), [h, W, b])
    assert (dh == 0).all() and (dW == 0).all() and (db == 0).all()


def test_prompt_rows_and_shared_targets():
    """Leading ignored rows (a prompt), and a tiny vocab so many rows share a target (colliding atomics)."""
    x = make_linear_head_inputs(2, 19, D_, 17, bias=True, prompt_len=7, requires_grad=False, seed=3)
    h = x.hidden.reshape(38, D_).requires_grad_()
    W, b = x.weight.requires_grad_(), x.bias.requires_grad_()
    cfg = LinearLogprobsConfig(sweep=TileConfig(16, 16, 16), bwd=TileConfig(16, 16, 16), gather=GatherConfig(16, 16),
                               split_v=2)
    _check_all(torch.float32, h, W, x.labels.reshape(38), b, config=cfg)


def test_default_config_and_int32_labels():
    h, W, labels, b = _flat_inputs(torch.float32, n=21, d=40, v=70, bias=True, seed=4)
    _check_all(torch.float32, h, W, labels.to(torch.int32), b, config=None)


def test_no_grad_for_weight_or_bias():
    h, W, labels, b = _flat_inputs(torch.float32, bias=True)
    W.requires_grad_(False)
    b.requires_grad_(False)
    logp, tgt = LinearLogprobsTriton.apply(h, W, labels, b, -100, ODD)
    (dh,) = torch.autograd.grad((logp + tgt).sum(), [h])
    hd = h.detach().double().requires_grad_()
    o_logp, o_tgt, _ = token_logprobs(hd, W.double(), labels, b.double())
    (o_dh,) = torch.autograd.grad((o_logp + o_tgt).sum(), [hd])
    assert (dh.double() - o_dh).abs().max() < 1e-5
    # and the launcher skips what is not asked for
    _, _, lse = linear_logprobs_fwd(h.detach(), W, labels, b, -100, config=ODD)
    out = linear_logprobs_bwd(torch.ones(N_), None, h.detach(), W, labels, b, lse, -100, compute_dh=False,
                              compute_dw=True, compute_db=False, config=ODD)
    assert out[0] is None and out[1] is not None and out[2] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_target_logits_matches_oracle(dtype, bias):
    h, W, labels, b = _flat_inputs(dtype, bias=bias, seed=5)
    g = torch.randn(N_, dtype=torch.float64)
    o_tgt = token_logprobs(*[t.detach().double() if t is not None else None for t in (h, W)], labels,
                           b.detach().double() if bias else None)[1]
    ref = {}
    for rd in (torch.float64, dtype):
        hh, WW, bb = _leaves(h, W, b, rd)
        z = token_logprobs(hh, WW, labels, bb)[1]
        ref[rd] = (z.detach(), _grads((z * g.to(rd)).sum(), [hh, WW, bb]))
    z = TargetLogitsTriton.apply(h, W, labels, b, -100, GatherConfig(16, 16))
    assert z.dtype == torch.float32 and not torch.isnan(z).any()
    assert_close_to_oracle(z, o_tgt, ref[dtype][0], atol=ATOL[dtype], name="z")
    grads = _grads((z * g.float()).sum(), [h, W, b])
    for name, gr, o, t in zip(("dh", "dW", "db"), grads, ref[torch.float64][1], ref[dtype][1]):
        if gr is None:
            continue
        assert gr.dtype == dtype and not torch.isnan(gr).any()
        assert_close_to_oracle(gr, o, t, atol=ATOL[dtype], name=name)
    assert (z[labels == -100] == 0).all()
    # the default (no override) config agrees
    z2 = target_logits_fwd(h.detach(), W.detach(), labels, None if b is None else b.detach())
    assert torch.allclose(z2, z.detach(), atol=1e-6, rtol=0)


def _transformed_logprobs(h, W, labels, b, scale, cap):
    """Materialized ``(logp, target)`` of ``z' = cap·tanh(scale·(h Wᵀ + b)/cap)`` (no cap: ``scale·z``); 0 on ignored
    rows."""
    z = (h @ W.T + (0 if b is None else b)) * scale
    if cap:
        z = cap * torch.tanh(z / cap)
    valid = labels != -100
    y = labels.clamp(min=0)[:, None]
    return z.log_softmax(-1).gather(1, y)[:, 0] * valid, z.gather(1, y)[:, 0] * valid


@pytest.mark.parametrize("scale,cap", [(0.7, 0.0), (1.3, 4.0)], ids=["scale", "softcap"])
@pytest.mark.parametrize("mode", ["both", "target"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_logit_softcap_and_scale(dtype, mode, scale, cap):
    """The fused kernels' logit transform (fwd and bwd, the target-only backward included) against a float64
    materialized oracle, with PyTorch's own same-dtype error as the scale, and against the ops' "torch" path."""
    from vpo.ops.linear_logprobs import linear_logprobs

    h, W, labels, b = _flat_inputs(dtype, bias=True, scale=4.0, seed=7)
    g1, g2 = torch.randn(N_, dtype=torch.float64), torch.randn(N_, dtype=torch.float64)
    ref = {}
    for rd in (torch.float64, dtype):
        hh, WW, bb = _leaves(h, W, b, rd)
        hx, Wx, bx = (hh.float(), WW.float(), bb.float()) if rd == dtype else (hh, WW, bb)  # fp32 math for halves
        logp, tgt = _transformed_logprobs(hx, Wx, labels, bx, scale, cap)
        ref[rd] = (logp.detach(), tgt.detach(), _grads(_loss(logp, tgt, g1.to(logp.dtype), g2.to(logp.dtype), mode),
                                                       [hh, WW, bb]))
    logp, tgt = LinearLogprobsTriton.apply(h, W, labels, b, -100, ODD, scale, cap)
    atol = ATOL[dtype]
    assert_close_to_oracle(logp, ref[torch.float64][0], ref[dtype][0], atol=atol, name="logp")
    assert_close_to_oracle(tgt, ref[torch.float64][1], ref[dtype][1], atol=atol, name="target_logit")
    grads = _grads(_loss(logp, tgt, g1.float(), g2.float(), mode), [h, W, b])
    for name, g, o, t in zip(("dh", "dW", "db"), grads, ref[torch.float64][2], ref[dtype][2]):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert_close_to_oracle(g, o, t, atol=atol, name=name)
    # the ops' torch path (the shared epilogue) computes the same function
    t_logp, t_tgt = linear_logprobs(h, W, labels, b, impl="torch", logit_softcap=cap or None, logit_scale=scale)
    assert torch.allclose(logp, t_logp, atol=10 * atol, rtol=0) and torch.allclose(tgt, t_tgt, atol=10 * atol, rtol=0)
    t_grads = _grads(_loss(t_logp, t_tgt, g1.float(), g2.float(), mode), [h, W, b])
    for name, g, t in zip(("dh", "dW", "db"), grads, t_grads):
        assert torch.allclose(g.float(), t.float(), atol=10 * atol, rtol=1e-2), name


def test_split_v_choice():
    cfg = LinearLogprobsConfig(sweep=TileConfig(128, 128, 64), bwd=TileConfig(128, 128, 64))
    cpu = torch.device("cpu")
    for N, V in [(1, 1), (37, 131), (4096, 32064), (10 ** 6, 32064), (5, 300)]:
        s = _pick_split_v(cfg, N, V, cpu)
        tiles = -(-V // 128)
        per = -(-tiles // s)
        assert 1 <= s <= tiles and (s - 1) * per < tiles  # every split owns at least one tile


def test_launchers_reject_mixed_dtypes():
    h, W, labels, b = _flat_inputs(torch.float32)
    with pytest.raises(ValueError, match="W has dtype"):
        linear_logprobs_fwd(h.detach(), W.detach().half(), labels, None)


# ----------------------------------------------------------------------------------------------------------------------
# GPU lane: compiled kernels, bf16, realistic shapes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_realistic_shape(dtype):
    """Error <= 2x PyTorch's own same-dtype error vs an fp32 oracle, values and every gradient."""
    n, d, v = (4096, 4096, 32064) if dtype == torch.bfloat16 else (1024, 1024, 5003)
    h, W, labels, b = _flat_inputs(dtype, n=n, d=d, v=v, bias=True, device="cuda", prompt_len=0)
    _check_all(dtype, h, W, labels, b, config=None, atol={torch.float32: 1e-4}.get(dtype, 1e-2))


@pytest.mark.gpu
def test_gpu_more_than_65535_row_blocks():
    """N blocks sit on grid axis 0, which has no 65535 limit: 2^16 + 1 blocks of 16 rows."""
    n = 65536 * 16 + 37
    h, W, labels, b = _flat_inputs(torch.bfloat16, n=n, d=32, v=64, bias=True, device="cuda")
    cfg = LinearLogprobsConfig(sweep=TileConfig(16, 64, 32), bwd=TileConfig(16, 64, 32), gather=GatherConfig(16, 32))
    _check_all(torch.bfloat16, h, W, labels, b, config=cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_target_logits_bwd_into_caller_buffers(dtype):
    """The TPO noised pass's scatter adds into the caller's fp32 dW / db (no second [V, D] buffer); the sparse rows
    and the default (16-bit: sorted-segment sum, rounded once) give the same gradient."""
    h, W, labels, b = (t.detach() if t is not None else None for t in _flat_inputs(dtype, bias=True))
    labels[3] = labels[5]  # two rows sharing a target
    g = torch.randn(N_)
    dh_ref, dw_ref, db_ref = tl_mod.target_logits_bwd(g, h, W, labels, b)
    dw_acc = torch.randn(V_, D_)
    db_acc = torch.randn(V_)
    dw0, db0 = dw_acc.clone(), db_acc.clone()
    dh, dw, db = tl_mod.target_logits_bwd(g, h, W, labels, b, dw_acc=dw_acc, db_acc=db_acc)
    assert dw is dw_acc and db is db_acc  # accumulated in place, returned as given
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw - dw0, dw_ref.float(), **tol)
    torch.testing.assert_close(db - db0, db_ref.float(), **tol)
    torch.testing.assert_close(dh, dh_ref)
    rows, vals = tl_mod.target_logits_grad_rows(g, h, labels)
    torch.testing.assert_close(torch.zeros(V_, D_).index_add_(0, rows, vals), dw_ref.float(), **tol)
    with pytest.raises(ValueError, match="dw_acc must be a contiguous float32 tensor"):
        tl_mod.target_logits_bwd(g, h, W, labels, b, dw_acc=dw_acc.half())
