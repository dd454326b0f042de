"""vpo.fused_tpo_loss against the materializing oracle (vpo.oracle.tpo_loss): loss, metrics, s, c, every gradient."""
import pytest
import torch

import vpo
from vpo.testing import assert_close_to_oracle, make_linear_head_inputs

IMPLS = ["torch", "triton"]


def _inputs(dtype, *, bias=False, seed=0, rows=4, seq=9, dim=24, vocab=131, scale=1.0, noise=0.3):
    x = make_linear_head_inputs(rows, seq, dim, vocab, dtype=dtype, bias=bias, seed=seed, scale=scale, prompt_len=2)
    g = torch.Generator().manual_seed(seed + 100)
    hn = (x.hidden.detach() + noise * scale * torch.randn(x.hidden.shape, generator=g, dtype=dtype)).requires_grad_()
    ref_h = x.hidden.detach() + 0.05 * torch.randn(x.hidden.shape, generator=g, dtype=dtype)
    ref_hn = hn.detach() + 0.05 * torch.randn(x.hidden.shape, generator=g, dtype=dtype)
    return x, hn, ref_h, ref_hn


def _leaves(*ts):
    return [t for t in ts if t is not None]


def _as64(ts):
    return [t.detach().double().requires_grad_() if t is not None else None for t in ts]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reward_grad", [True, False])
def test_matches_oracle_float32(impl, bias, reward_grad):
    x, hn, ref_h, ref_hn = _inputs(torch.float32, bias=bias, seed=1)
    kw = dict(beta=0.2, a=0.5, reward_grad=reward_grad)
    loss, out = vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, ref_h, ref_hn, impl=impl, **kw)
    leaves = _leaves(x.weight, x.hidden, hn, x.bias)
    g = torch.autograd.grad(loss, leaves, allow_unused=True)
    w, h, n, b = _as64((x.weight, x.hidden, hn, x.bias))
    lo, mo = vpo.oracle.tpo_loss(w, h, n, x.labels, b, ref_h.double(), ref_hn.double(), **kw)
    go = torch.autograd.grad(lo, _leaves(w, h, n, b), allow_unused=True)
    torch.testing.assert_close(loss.double(), lo, rtol=1e-5, atol=1e-6)
    for k, v in mo.items():
        torch.testing.assert_close(out.metrics[k].double(), v.double(), rtol=1e-4, atol=1e-5, msg=k)
    for i, (a, o) in enumerate(zip(g, go)):
        if o is None:  # reward_grad=False: no gradient reaches hidden_noised in the oracle either
            assert a is None or a.abs().max().item() == 0.0
        else:
            torch.testing.assert_close(a.double(), o, rtol=1e-4, atol=1e-6, msg=f"grad {i}")
    # per-token s and c of the policy
    terms = vpo.oracle.tpo_sequence_logps(w.detach(), h.detach(), n.detach(), x.labels, None if b is None else b.detach())
    torch.testing.assert_close(out.scores.double(), terms.s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.token_rewards.double(), terms.c, rtol=1e-4, atol=1e-5)


def test_reward_grad_controls_the_noised_pass():
    x, hn, ref_h, ref_hn = _inputs(torch.float64, seed=2)
    loss_on, _ = vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, None, ref_h, ref_hn, impl="torch")
    g_on, = torch.autograd.grad(loss_on, hn)
    assert g_on.abs().max().item() > 1e-6
    loss_off, _ = vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, None, ref_h, ref_hn, impl="torch",
                                     reward_grad=False)
    assert not loss_off.grad_fn is None
    torch.testing.assert_close(loss_on, loss_off)  # same value, different graph
    g_off = torch.autograd.grad(loss_off, hn, allow_unused=True)[0]
    assert g_off is None or g_off.abs().max().item() == 0.0


def test_torch_path_float64_tight_with_ablations():
    x, hn, ref_h, ref_hn = _inputs(torch.float64, bias=True, seed=3)
    for rewards in ("both", "only_win", "only_loss", "opposite"):
        for a in (0.0, 0.5, 1.0):
            kw = dict(a=a, rewards=rewards)
            loss, _ = vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, ref_h, ref_hn, impl="torch", **kw)
            lo, _ = vpo.oracle.tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, ref_h, ref_hn, **kw)
            torch.testing.assert_close(loss, lo, rtol=1e-12, atol=1e-12, msg=f"{rewards}, a={a}")
            ga = torch.autograd.grad(loss, (x.weight, x.hidden, hn, x.bias))
            gb = torch.autograd.grad(lo, (x.weight, x.hidden, hn, x.bias))
            for p, q in zip(ga, gb):
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_no_noise_equals_dpo():
    """s ≡ 0 (noised pass == clean pass) gives c ≡ 1, so TPO is DPO."""
    x, _, ref_h, _ = _inputs(torch.float64, seed=4)
    tpo, _ = vpo.fused_tpo_loss(x.weight, x.hidden, x.hidden, x.labels, None, ref_h, ref_h, impl="torch")
    dpo, _ = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, None, ref_h, impl="torch")
    torch.testing.assert_close(tpo, dpo, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_ref_logps_path_equals_reference_passes(impl):
    x, hn, ref_h, ref_hn = _inputs(torch.float32, seed=5)
    with torch.no_grad():
        terms = vpo.oracle.tpo_sequence_logps(x.weight.double(), ref_h.double(), ref_hn.double(), x.labels)
    l1, o1 = vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, None, ref_h, ref_hn, impl=impl)
    l2, o2 = vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, ref_logps=terms.logps.float(), impl=impl)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o1.margins, o2.margins, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_float16_within_twice_torch_own_error(impl):
    x, hn, ref_h, ref_hn = _inputs(torch.float16, seed=6)
    loss, _ = vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, None, ref_h, ref_hn, impl=impl)
    g = torch.autograd.grad(loss, (x.weight, x.hidden, hn))
    w, h, n = _as64((x.weight, x.hidden, hn))
    lo, _ = vpo.oracle.tpo_loss(w, h, n, x.labels, None, ref_h.double(), ref_hn.double())
    go = torch.autograd.grad(lo, (w, h, n))
    w16, h16, n16 = (t.detach().clone().requires_grad_() for t in (x.weight, x.hidden, hn))
    l16, _ = vpo.oracle.tpo_loss(w16, h16, n16, x.labels, None, ref_h, ref_hn)
    g16 = torch.autograd.grad(l16, (w16, h16, n16))
    assert_close_to_oracle(loss, lo, l16, atol=1e-4, name="loss")
    for a, b, c, name in zip(g, go, g16, ("weight", "hidden", "hidden_noised")):
        assert_close_to_oracle(a, b, c, atol=1e-4, name=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_edge_rows_and_huge_logits(impl):
    x, hn, ref_h, ref_hn = _inputs(torch.float32, seed=8, scale=1e3, noise=1e-3)
    labels = x.labels.clone()
    labels[2] = -100  # an empty rejected response
    labels[0, :] = -100
    labels[0, 8] = 7  # a one-token chosen response
    loss, out = vpo.fused_tpo_loss(x.weight, x.hidden, hn, labels, None, ref_h, ref_hn, impl=impl)
    lo, _ = vpo.oracle.tpo_loss(x.weight.double(), x.hidden.double(), hn.double(), labels, None, ref_h.double(),
                                ref_hn.double())
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), lo, rtol=1e-4, atol=1e-4)
    assert (out.token_rewards[2] == 1).all() and (out.scores[2] == 0).all()
    gh, gn = torch.autograd.grad(loss, (x.hidden, hn))
    assert torch.isfinite(gh).all() and torch.isfinite(gn).all()
    assert gh[2].abs().max().item() == 0.0 and gn[2].abs().max().item() == 0.0


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(hidden_noised=a["hidden_noised"][:, :-1]), "hidden_noised has shape"),
        (lambda a: a.update(ref_hidden_noised=None), "ref_hidden was given without ref_hidden_noised"),
        (lambda a: a.update(ref_hidden=None), "ref_hidden_noised was given without ref_hidden"),
        (lambda a: a.update(ref_hidden=None, ref_hidden_noised=None), "got neither"),
        (lambda a: a.update(ref_logps=torch.zeros(4)), "got both"),
        (lambda a: a.update(rewards="win"), r"rewards must be one of \['both', 'only_win', 'only_loss', 'opposite'\]"),
        (lambda a: a.update(a=-0.5), r"a must be in \[0.0, inf\]"),
        (lambda a: a.update(hidden=a["hidden"][:3], hidden_noised=a["hidden_noised"][:3], labels=a["labels"][:3]),
         "even, non-zero 2B rows"),
    ],
)
def test_bad_input_raises_value_error(mutate, match):
    x, hn, ref_h, ref_hn = _inputs(torch.float32)
    args = dict(weight=x.weight, hidden=x.hidden, hidden_noised=hn, labels=x.labels, ref_hidden=ref_h,
                ref_hidden_noised=ref_hn)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        vpo.fused_tpo_loss(**args)


# ----------------------------------------------------------------------------------------------------------------------
# The engine: loss types on the TPO terms, chunking, odd shapes, gradients to hidden_noised / weight / bias
# ----------------------------------------------------------------------------------------------------------------------

from vpo.fused import Chunking  # noqa: E402
from vpo.losses import preference_pair_losses  # noqa: E402

CHUNKINGS = {"default": None, "pair_tiles": Chunking(pairs=1, vocab=17),
             "recompute": Chunking(pairs=2, vocab=50, store=False), "compact": Chunking(vocab=50, compact=True)}


def _oracle_tpo(w, h, n, labels, b, ref_h, ref_hn, *, a=0.5, rewards="both", reward_grad=True, **kw):
    """Oracle TPO terms -> the per-pair loss head (sft on the plain chosen log-probs)."""
    B = h.shape[0] // 2
    pol = vpo.oracle.tpo_sequence_logps(w, h, n, labels, b, a=a, rewards=rewards, reward_grad=reward_grad)
    with torch.no_grad():
        ref = vpo.oracle.tpo_sequence_logps(w.detach(), ref_h, ref_hn, labels, None if b is None else b.detach(),
                                            a=a, rewards=rewards).logps
    cnt = (labels != -100).sum(1)
    seq = pol.logps
    return preference_pair_losses(seq[:B], seq[B:], ref[:B], ref[B:], chosen_tokens=cnt[:B], rejected_tokens=cnt[B:],
                                  chosen_nll=-pol.token_logps[:B].sum(1), **kw).mean()


ENGINE_CASES = [(lt, "pair_tiles", True) for lt in ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "sigmoid_norm",
                                                      "sft", ("sigmoid", "sft"))] \
    + [("sigmoid", ch, rg) for ch in ("default", "recompute", "compact") for rg in (True, False)] \
    + [("ipo", "default", False)]


@pytest.mark.parametrize("loss_type, chunking, reward_grad", ENGINE_CASES)
def test_engine_loss_types_float64_vs_oracle(loss_type, chunking, reward_grad):
    x, hn, ref_h, ref_hn = _inputs(torch.float64, bias=True, seed=31)
    labels = x.labels.clone()
    labels[1] = -100
    labels[3] = -100  # pair 1: both rows without a scored token
    lt = list(loss_type) if isinstance(loss_type, tuple) else loss_type
    kw = dict(beta=0.5, loss_type=lt, a=0.5, rewards="both", reward_grad=reward_grad,
              label_smoothing=0.1 if lt in ("sigmoid", "robust") else 0.0)
    leaves = _as64((x.weight, x.hidden, hn, x.bias))
    loss, out = vpo.fused_tpo_loss(leaves[0], leaves[1], leaves[2], labels, leaves[3], ref_h, ref_hn, impl="torch",
                                   chunking=CHUNKINGS[chunking], **kw)
    g = torch.autograd.grad(loss, leaves, allow_unused=True)
    o_leaves = _as64((x.weight, x.hidden, hn, x.bias))
    lo = _oracle_tpo(*o_leaves[:3], labels, o_leaves[3], ref_h, ref_hn, **kw)
    go = torch.autograd.grad(lo, o_leaves, allow_unused=True)
    torch.testing.assert_close(loss, lo, rtol=1e-10, atol=1e-12)
    for name, p, q in zip(("weight", "hidden", "hidden_noised", "bias"), g, go):
        if q is None:  # reward_grad=False: nothing reaches hidden_noised
            assert p is None or p.abs().max() == 0, name
        else:
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=lambda m: f"grad {name}: {m}")
    assert (out.token_rewards[1] == 1).all() and out.chosen_logps[1] == 0


def test_engine_single_pair_frozen_head_and_reference_grads():
    x, hn, ref_h, ref_hn = _inputs(torch.float64, seed=32, rows=2, seq=3)
    ref_w = (x.weight.detach() * 1.1).requires_grad_()
    rh = ref_h.clone().requires_grad_()
    w = x.weight.detach()  # frozen head
    loss, _ = vpo.fused_tpo_loss(w, x.hidden, hn, x.labels, None, rh, ref_hn, ref_w, impl="torch",
                                 chunking=Chunking(pairs=1, vocab=7))
    loss.backward()
    assert ref_w.grad is None and rh.grad is None
    h2, n2 = _as64((x.hidden, hn))
    lo, _ = vpo.oracle.tpo_loss(w, h2, n2, x.labels, None, ref_h, ref_hn, ref_w.detach())
    gh, gn = torch.autograd.grad(lo, (h2, n2))
    torch.testing.assert_close(x.hidden.grad, gh)
    torch.testing.assert_close(hn.grad, gn)


def test_engine_entropy_metrics():
    x, hn, ref_h, ref_hn = _inputs(torch.float64, seed=33)
    _, out = vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, None, ref_h, ref_hn)
    logp = (x.hidden.detach() @ x.weight.detach().T).log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1)
    mask = x.labels != -100
    torch.testing.assert_close(out.metrics["entropy/rejected"], ent[2:][mask[2:]].mean())
    torch.testing.assert_close(out.metrics["num_tokens/chosen"], mask[:2].sum(1).double().mean())
