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
    """Out-of-range labels on CPU: the ValueError naming the value, with or without VPO_DEBUG_CHECKS=1 (on CUDA the
    default is a device-side assert, no host sync)."""
    x, ref_h = _pair("torch", torch.float32)
    bad = torch.full_like(x.labels, 131)
    monkeypatch.delenv("VPO_DEBUG_CHECKS", raising=False)
    with pytest.raises(ValueError, match=r"labels contains 131: expected values in \[0, 131\)"):
        vpo.fused_dpo_loss(x.weight, x.hidden, bad, ref_hidden=ref_h)
    monkeypatch.setenv("VPO_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match=r"labels contains 131: expected values in \[0, 131\)"):
        vpo.fused_dpo_loss(x.weight, x.hidden, bad, ref_hidden=ref_h)


# ----------------------------------------------------------------------------------------------------------------------
# The engine (policy gradient in the forward): loss types, chunking, odd shapes, which inputs get a gradient
# ----------------------------------------------------------------------------------------------------------------------

from vpo.fused import Chunking  # noqa: E402
from vpo.losses import preference_pair_losses  # noqa: E402

LOSS_TYPES = ["sigmoid", "robust", "hinge", "ipo", "apo_zero", "sigmoid_norm", "sft"]
CHUNKINGS = {
    "default": None,
    "pair_tiles": Chunking(pairs=1, vocab=17),  # V = 131 is not a multiple of 17
    "recompute": Chunking(pairs=1, vocab=50, store=False),
    "tiny_budget": Chunking(memory_budget=1),  # budget below one pair: 1 pair per chunk, tiles recomputed
    "compact": Chunking(pairs=2, vocab=40, compact=True),  # only the scored positions enter the GEMMs
}


def _oracle_dpo(weight, hidden, labels, bias, ref_h, ref_w=None, ref_b=None, **kw):
    """The materializing composition: oracle per-token log-probs -> per-sequence sums -> the per-pair loss head."""
    B = hidden.shape[0] // 2
    lp = vpo.oracle.token_logprobs(hidden, weight, labels, bias)[0].sum(-1)
    rw = weight.detach() if ref_w is None else ref_w
    rb = (None if bias is None else bias.detach()) if ref_w is None else ref_b
    with torch.no_grad():
        rl = vpo.oracle.token_logprobs(ref_h, rw, labels, rb)[0].sum(-1)
    n = (labels != -100).sum(1)
    return preference_pair_losses(lp[:B], lp[B:], rl[:B], rl[B:], chosen_tokens=n[:B], rejected_tokens=n[B:],
                                  **kw).mean()


def _leaves64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def _check_against_oracle(x, ref_h, labels, *, chunking=None, rtol=1e-10, atol=1e-12, **kw):
    w, h, b = _leaves64(x.weight, x.hidden, x.bias)
    loss, out = vpo.fused_dpo_loss(w, h, labels, b, ref_h.double(), impl="torch", chunking=chunking, **kw)
    leaves = [t for t in (w, h, b) if t is not None]
    g = torch.autograd.grad(loss, leaves)
    w2, h2, b2 = _leaves64(x.weight, x.hidden, x.bias)
    lo = _oracle_dpo(w2, h2, labels, b2, ref_h.double(), **kw)
    go = torch.autograd.grad(lo, [t for t in (w2, h2, b2) if t is not None])
    torch.testing.assert_close(loss, lo, rtol=rtol, atol=atol)
    for name, a, o in zip(("weight", "hidden", "bias"), g, go):
        torch.testing.assert_close(a, o, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")
    return loss, out


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("chunking", list(CHUNKINGS), ids=list(CHUNKINGS))
def test_engine_loss_types_float64_vs_oracle(loss_type, chunking):
    x, ref_h = _pair("torch", torch.float64, bias=True, seed=21, rows=6)
    ls = 0.2 if loss_type in ("sigmoid", "robust") else 0.0
    _check_against_oracle(x, ref_h, x.labels, chunking=CHUNKINGS[chunking], loss_type=loss_type, beta=0.7,
                          label_smoothing=ls)


def test_engine_weighted_loss_types_and_errors():
    x, ref_h = _pair("torch", torch.float64, bias=False, seed=22)
    _check_against_oracle(x, ref_h, x.labels, loss_type=["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.3, 0.05])
    with pytest.raises(ValueError, match=r"loss_type must be one of \['sigmoid', 'robust', 'hinge', 'ipo'"):
        vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, ref_hidden=ref_h, loss_type="kto")
    with pytest.raises(ValueError, match="loss_weights must be a list of 2 floats"):
        vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, ref_hidden=ref_h, loss_type=["sigmoid", "sft"],
                           loss_weights=[1.0])
    with pytest.raises(ValueError, match="chunking must be a vpo.fused.Chunking"):
        vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, ref_hidden=ref_h, chunking=3)
    with pytest.raises(ValueError, match="Chunking.vocab must be a positive int"):
        Chunking(vocab=0)


@pytest.mark.parametrize("chunking", list(CHUNKINGS), ids=list(CHUNKINGS))
def test_engine_odd_rows_ignored_pair_one_token(chunking):
    x, ref_h = _pair("torch", torch.float64, bias=True, seed=23, rows=6, seq=5)
    labels = x.labels.clone()
    labels[1] = -100
    labels[4] = -100  # pair 1: both rows without a scored token
    labels[0] = -100
    labels[0, 3] = 7  # one valid token in a chosen row
    loss, out = _check_against_oracle(x, ref_h, labels, chunking=CHUNKINGS[chunking])
    assert out.chosen_logps[1] == 0 and out.rejected_logps[1] == 0
    h = x.hidden.detach().double().requires_grad_()
    loss, _ = vpo.fused_dpo_loss(x.weight.detach().double(), h, labels, ref_hidden=ref_h.double(),
                                 chunking=CHUNKINGS[chunking])
    gh, = torch.autograd.grad(loss, h)
    assert gh[1].abs().max() == 0 and gh[4].abs().max() == 0
    assert gh[0, :3].abs().max() == 0 and gh[0, 3].abs().max() > 0


def test_engine_single_pair_and_single_position():
    for rows, seq in ((2, 9), (2, 1)):
        x = make_linear_head_inputs(rows, seq, 24, 131, dtype=torch.float64, bias=True, seed=24, ignore_frac=0.0)
        ref_h = x.hidden.detach() + 0.05
        _check_against_oracle(x, ref_h, x.labels, chunking=Chunking(pairs=1, vocab=64))


def test_engine_entropy_and_token_count_metrics():
    x, ref_h = _pair("torch", torch.float64, seed=25)
    _, out = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, ref_hidden=ref_h, chunking=Chunking(vocab=40))
    logits = x.hidden.detach() @ x.weight.detach().T  # [2B, T, V] materialized for the test only
    logp = logits.log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1)
    mask = x.labels != -100
    for name, sl in (("chosen", slice(0, 2)), ("rejected", slice(2, 4))):
        torch.testing.assert_close(out.metrics[f"entropy/{name}"], ent[sl][mask[sl]].mean())
        torch.testing.assert_close(out.metrics[f"num_tokens/{name}"], mask[sl].sum(1).double().mean())


def test_engine_gradients_only_where_asked():
    x, ref_h = _pair("torch", torch.float64, bias=True, seed=26)
    # a separate reference head that requires grad must not receive any
    ref_w = (x.weight.detach() + 0.1).requires_grad_()
    ref_hidden = ref_h.clone().requires_grad_()
    loss, _ = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_hidden, ref_w, impl="torch")
    loss.backward()
    assert ref_w.grad is None and ref_hidden.grad is None
    assert x.weight.grad is not None and x.bias.grad is not None and x.hidden.grad is not None
    # shared head (ref_weight None): the weight's gradient is the policy's alone, as in the oracle
    w, h, b = _leaves64(x.weight, x.hidden, x.bias)
    loss, _ = vpo.fused_dpo_loss(w, h, x.labels, b, ref_h, impl="torch")
    w2, h2, b2 = _leaves64(x.weight, x.hidden, x.bias)
    lo, _ = vpo.oracle.dpo_loss(w2, h2, x.labels, b2, ref_h, w2.detach(), b2.detach())
    for a, o in zip(torch.autograd.grad(loss, (w, b)), torch.autograd.grad(lo, (w2, b2))):
        torch.testing.assert_close(a, o)
    # frozen head (LoRA): no weight gradient, the hidden one unchanged
    wf, hf = x.weight.detach().double(), x.hidden.detach().double().requires_grad_()
    loss_f, _ = vpo.fused_dpo_loss(wf, hf, x.labels, ref_hidden=ref_h)
    h3 = x.hidden.detach().double().requires_grad_()
    lo3, _ = vpo.oracle.dpo_loss(wf, h3, x.labels, ref_hidden=ref_h)
    torch.testing.assert_close(torch.autograd.grad(loss_f, hf)[0], torch.autograd.grad(lo3, h3)[0])


def test_engine_grad_output_scaling_and_backward_twice():
    x, ref_h = _pair("torch", torch.float64, seed=27)
    h = x.hidden.detach().double().requires_grad_()
    W = x.weight.detach().double()
    loss, _ = vpo.fused_dpo_loss(W, h, x.labels, ref_hidden=ref_h)
    g1, = torch.autograd.grad(loss, h, retain_graph=True)
    g3, = torch.autograd.grad(3.0 * loss, h, retain_graph=True)  # grad_output = 3 scales the stored grads
    torch.testing.assert_close(g3, 3 * g1)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    # under no_grad: a plain value, no graph, same number
    with torch.no_grad():
        l2, _ = vpo.fused_dpo_loss(W, h, x.labels, ref_hidden=ref_h)
    assert not l2.requires_grad
    torch.testing.assert_close(l2, loss.detach())


@pytest.mark.parametrize("which", ["dpo", "tpo", "catpo"])
def test_every_fused_loss_calls_the_unshard_hook(monkeypatch, which):
    """vpo.distributed.unshard_head is called on the policy's head and, when given, the reference's."""
    seen = []

    def hook(weight, bias=None):
        seen.append((weight, bias))
        return weight, bias

    monkeypatch.setattr(vpo.distributed, "unshard_head", hook)
    x, ref_h = _pair("torch", torch.float32, bias=True)
    ref_w, ref_b = x.weight.detach() + 0.1, x.bias.detach()
    if which == "dpo":
        vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_h, ref_w, ref_b)
    elif which == "tpo":
        vpo.fused_tpo_loss(x.weight, x.hidden, x.hidden, x.labels, x.bias, ref_h, ref_h, ref_w, ref_b)
    else:
        vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, torch.ones_like(ref_h[..., 0]), x.bias, ref_h, ref_w, ref_b)
    assert [(w is x.weight, b is x.bias) for w, b in seen[:1]] == [(True, True)]
    assert len(seen) == 2 and seen[1][0] is ref_w and seen[1][1] is ref_b


def test_engine_plan_at_lm_shapes(monkeypatch):
    """The default budget (4 GiB) keeps a 2 × 2048-token pair's fp32 logits at V = 152064 (3 policy passes); longer
    pairs recompute their tiles; a smaller vocab packs several pairs per chunk; Cat-PO keeps two tiles per row."""
    from vpo.fused._engine import plan

    monkeypatch.delenv("VPO_FUSED_BUDGET_MB", raising=False)
    assert plan(Chunking(), 8, 2048, 152064, 1) == (1, 8192, True)
    assert plan(Chunking(), 8, 4096, 152064, 1)[2] is False
    assert plan(Chunking(), 8, 2048, 152064, 2)[2] is False
    assert plan(Chunking(), 8, 512, 32064, 1)[0] > 1
    monkeypatch.setenv("VPO_FUSED_BUDGET_MB", "8192")
    assert plan(Chunking(), 8, 4096, 152064, 1)[2] is True


def test_fused_losses_do_not_import_the_oracle():
    """The oracle stays an independent check: no module of vpo/fused imports vpo.oracle (shared argument rules and
    the TPO reward live in product modules: vpo._heads, vpo.losses.tpo_reward)."""
    import ast
    import pathlib

    import vpo.fused

    for path in pathlib.Path(vpo.fused.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n == "vpo.oracle" or n.startswith("vpo.oracle.") for n in names), (path.name, names)
