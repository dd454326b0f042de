"""Cat-PO oracle (vpo.oracle.catpo) against hand-worked values, the KL identity and DPO."""
import math

import pytest
import torch

from vpo.losses import dpo_loss
from vpo.oracle import (
    catpo_loss,
    image_attention_stats,
    sequence_logps,
    token_kl,
    token_logprobs,
    weighted_sequence_logps,
)
from vpo.testing import make_linear_head_inputs

F64 = torch.float64
BETA, LAM = 0.1, 0.03


def sig(x):
    return 1 / (1 + math.exp(-x))


def lsm(logits, i):
    return logits[i] - math.log(sum(math.exp(z) for z in logits))


def kl_py(zp, zq):
    """KL(softmax(zp) ‖ softmax(zq)) in plain Python."""
    return sum(math.exp(lsm(zp, v)) * (lsm(zp, v) - lsm(zq, v)) for v in range(len(zp)))


# --- image_attention_stats --------------------------------------------------------------------------------------------


def test_attention_stats_hand_worked():
    # L = 2, B = 1, H = 2, T = 3; image tokens at positions 0 and 2 (N_p = 2)
    attn = torch.zeros(2, 1, 2, 3, 3, dtype=F64)
    attn[0, 0, 0, 1] = torch.tensor([0.2, 0.5, 0.3])  # layer 0, head 0, query 1
    attn[0, 0, 1, 1] = torch.tensor([0.4, 0.5, 0.1])  # layer 0, head 1
    attn[1, 0, 0, 1] = torch.tensor([0.6, 0.2, 0.2])  # layer 1, head 0
    attn[1, 0, 1, 1] = torch.tensor([0.0, 0.2, 0.8])  # layer 1, head 1
    image = torch.tensor([[True, False, True]])
    a = image_attention_stats(attn, image)
    assert a.shape == (1, 3, 2)
    assert a[0, 1].tolist() == pytest.approx([(0.2 + 0.4 + 0.6 + 0.0) / 4, (0.3 + 0.1 + 0.2 + 0.8) / 4])
    assert a[0, 0].tolist() == [0.0, 0.0] and a[0, 2].tolist() == [0.0, 0.0]
    # one layer: heads averaged only
    assert image_attention_stats(attn, image, layers=[1])[0, 1].tolist() == pytest.approx([0.3, 0.5])
    assert image_attention_stats(attn, image, layers=[-2])[0, 1].tolist() == pytest.approx([0.3, 0.2])
    # the per-layer list form (HF's outputs.attentions) is the same
    torch.testing.assert_close(image_attention_stats([attn[0], attn[1]], image), a)
    # response_mask zeroes the queries outside it
    resp = torch.tensor([[True, False, True]])
    assert image_attention_stats(attn, image, resp)[0, 1].tolist() == [0.0, 0.0]


def test_attention_stats_per_row_image_positions():
    # rows hold their image tokens at different positions; a[b, :, j] follows row b's j-th image token
    attn = torch.softmax(torch.randn(3, 2, 4, 5, 5, dtype=F64), -1)
    image = torch.tensor([[True, True, False, False, False], [False, False, True, False, True]])
    a = image_attention_stats(attn, image)
    mean = attn.mean(dim=(0, 2))  # [B, T, T]
    torch.testing.assert_close(a[0], mean[0][:, [0, 1]])
    torch.testing.assert_close(a[1], mean[1][:, [2, 4]])
    # a causal softmax row sums to 1, so S_global = Σ_j a <= 1
    assert float(a.sum(-1).max()) <= 1 + 1e-12


def test_attention_stats_gradcheck():
    attn = torch.rand(2, 1, 2, 3, 3, dtype=F64, requires_grad=True)
    image = torch.tensor([[True, True, False]])
    torch.autograd.gradcheck(lambda x: image_attention_stats(x, image, layers=[0, 1]), (attn,))


@pytest.mark.parametrize(
    "attn, image, kw, match",
    [
        (torch.rand(1, 2, 3, 3), torch.tensor([[True, False, False]]), {}, "attn_probs must have 5 dimensions"),
        ([], torch.tensor([[True, False, False]]), {}, "attn_probs must not be an empty list"),
        ([torch.rand(1, 2, 3, 3), torch.rand(1, 2, 4, 4)], torch.tensor([[True, False, False]]), {},
         "attn_probs\\[1\\]"),
        (torch.rand(1, 1, 2, 3, 4), torch.tensor([[True, False, False]]), {}, "square"),
        (torch.rand(1, 2, 2, 3, 3), torch.tensor([[True, False, False], [True, True, False]]), {}, "same, non-zero"),
        (torch.rand(1, 1, 2, 3, 3), torch.tensor([[False, False, False]]), {}, "same, non-zero"),
        (torch.rand(1, 1, 2, 3, 3), torch.tensor([[True, False]]), {}, "image_mask has shape"),
        (torch.rand(1, 1, 2, 3, 3), torch.tensor([[1, 0, 0]]), {}, "image_mask must have dtype"),
        (torch.rand(2, 1, 2, 3, 3), torch.tensor([[True, False, False]]), dict(layers=[2]), "layers must hold ints"),
        (torch.rand(2, 1, 2, 3, 3), torch.tensor([[True, False, False]]), dict(layers=[]), "layers must not be empty"),
        (torch.rand(1, 1, 2, 3, 3), torch.tensor([[True, False, False]]),
         dict(response_mask=torch.tensor([[True, False]])), "response_mask has shape"),
    ],
)
def test_attention_stats_bad_input(attn, image, kw, match):
    with pytest.raises(ValueError, match=match):
        image_attention_stats(attn, image, **kw)


# --- token_kl ---------------------------------------------------------------------------------------------------------


def test_token_kl_hand_worked():
    w = torch.eye(3, dtype=F64)
    h = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, -1.0]], dtype=F64)
    rh = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64)
    kl = token_kl(h, w, rh)
    assert kl.tolist() == pytest.approx([kl_py([1, 0, 0], [0, 0, 0]), kl_py([0, 2, -1], [1, 0, 0])], rel=1e-12)
    # with a bias on both heads (shared head, bias shared too)
    b = torch.tensor([0.5, -0.5, 0.0], dtype=F64)
    assert token_kl(h[:1], w, rh[:1], bias=b).item() == pytest.approx(kl_py([1.5, -0.5, 0], [0.5, -0.5, 0]), rel=1e-12)
    # a separate reference head without bias
    assert token_kl(h[:1], w, rh[:1], w, bias=b).item() == pytest.approx(kl_py([1.5, -0.5, 0], [0, 0, 0]), rel=1e-12)


def test_token_kl_zero_iff_same_and_matches_the_lse_identity():
    x = make_linear_head_inputs(3, 4, 6, 11, dtype=F64, bias=True, seed=0, ignore_frac=0.0)
    assert token_kl(x.hidden, x.weight, x.hidden.detach(), bias=x.bias).abs().max() < 1e-12
    ref_w = x.weight.detach() + 0.3 * torch.randn_like(x.weight)
    ref_h = x.hidden.detach() + 0.3 * torch.randn_like(x.hidden)
    kl = token_kl(x.hidden, x.weight, ref_h, ref_w, bias=x.bias)
    assert bool((kl > 0).all())
    # KL = E_p[z_θ - z_ref] - lse_θ + lse_ref, computed from the logits separately
    z = x.hidden.detach() @ x.weight.detach().T + x.bias.detach()
    zr = ref_h @ ref_w.T
    p = torch.softmax(z, -1)
    expected = (p * (z - zr)).sum(-1) - torch.logsumexp(z, -1) + torch.logsumexp(zr, -1)
    torch.testing.assert_close(kl, expected, rtol=1e-10, atol=1e-12)


def test_token_kl_ignored_positions():
    x = make_linear_head_inputs(2, 5, 4, 7, dtype=F64, seed=1, ignore_frac=0.5)
    ref_h = x.hidden.detach() + 1.0
    kl = token_kl(x.hidden, x.weight, ref_h, labels=x.labels)
    ignored = x.labels == -100
    assert bool(ignored.any()) and bool((~ignored).any())
    assert kl[ignored].abs().sum() == 0 and bool((kl[~ignored] > 0).all())
    kl.sum().backward()
    assert x.hidden.grad[ignored].abs().sum() == 0
    assert x.hidden.grad[~ignored].abs().sum() > 0


def test_token_kl_gradcheck():
    x = make_linear_head_inputs(2, 3, 4, 5, dtype=F64, bias=True, seed=2, ignore_frac=0.3)
    ref_h = torch.randn(2, 3, 4, dtype=F64)
    ref_w = torch.randn(5, 4, dtype=F64)
    torch.autograd.gradcheck(lambda h, w, b: token_kl(h, w, ref_h, ref_w, x.labels, b), (x.hidden, x.weight, x.bias))


def test_token_kl_bad_input():
    w, h = torch.randn(5, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="ref_hidden has shape"):
        token_kl(h, w, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"hidden.shape\[-1\] == weight.shape\[1\]"):
        token_kl(torch.randn(3, 5), w, torch.randn(3, 5))
    with pytest.raises(ValueError, match="labels has shape"):
        token_kl(h, w, h, labels=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="ref_weight has shape"):
        token_kl(h, w, h, torch.randn(6, 4))
    with pytest.raises(ValueError, match="hidden has dtype"):
        token_kl(h.double(), w, h.double())


# --- weighted_sequence_logps and catpo_loss ---------------------------------------------------------------------------


def test_weighted_sequence_logps_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], dtype=F64)
    wt = torch.tensor([[2.0, 0.5, 9.0], [1.0, 1.0, 1.0]], dtype=F64)
    y = torch.tensor([[1, 2, -100], [-100, -100, -100]])
    assert weighted_sequence_logps(lp, wt, y).tolist() == [-3.0, 0.0]
    with pytest.raises(ValueError, match="token_weights has shape"):
        weighted_sequence_logps(lp, wt[:, :2], y)


def _hand_batch():
    # B = 1, T = 2, V = D = 3, W = I (logits = hidden); reference: all-zero hidden (uniform, logp = -log 3)
    w = torch.eye(3, dtype=F64)
    h = torch.tensor([[[1.0, 0, 0], [0, 0, 0]], [[0, 1, 0], [0, 0, 5]]], dtype=F64)
    y = torch.tensor([[0, 2], [1, -100]])
    tw = torch.tensor([[2.0, 0.5], [1.5, 7.0]], dtype=F64)  # 7.0 sits on an ignored position: unused
    return w, h, y, tw


@pytest.mark.parametrize("kl_coef", [0.0, LAM, 1.0])
def test_catpo_hand_worked(kl_coef):
    w, h, y, tw = _hand_batch()
    loss, m = catpo_loss(w, h, y, tw, ref_hidden=torch.zeros_like(h), beta=BETA, kl_coef=kl_coef)
    l3 = -math.log(3)
    pol_c = 2.0 * lsm([1, 0, 0], 0) + 0.5 * lsm([0, 0, 0], 2)
    ref_c = 2.0 * l3 + 0.5 * l3
    pol_r = 1.5 * lsm([0, 1, 0], 1)
    ref_r = 1.5 * l3
    margin = BETA * ((pol_c - ref_c) - (pol_r - ref_r))
    k1 = kl_py([1, 0, 0], [0, 0, 0])  # softmax([0, 1, 0]) vs uniform: the same by symmetry
    kl = 2.0 * k1 + 0.5 * 0.0 + 1.5 * k1
    assert loss.item() == pytest.approx(-math.log(sig(margin)) + kl_coef * kl, rel=1e-12)
    assert m["catpo/kl"].item() == pytest.approx(kl, rel=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(margin, rel=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(BETA * (pol_c - ref_c), rel=1e-12)
    # logps/* are the plain (unweighted) log-probs
    assert m["logps/chosen"].item() == pytest.approx(lsm([1, 0, 0], 0) + l3, rel=1e-12)
    assert m["logps/rejected"].item() == pytest.approx(lsm([0, 1, 0], 1), rel=1e-12)


def test_unit_weights_no_kl_equals_dpo():
    x = make_linear_head_inputs(6, 5, 4, 9, dtype=F64, bias=True, seed=3)
    ref = make_linear_head_inputs(6, 5, 4, 9, dtype=F64, bias=True, seed=4, requires_grad=False)
    ones = torch.ones(6, 5, dtype=F64)
    loss, m = catpo_loss(x.weight, x.hidden, x.labels, ones, x.bias, ref.hidden, ref.weight, ref.bias, kl_coef=0.0)
    lp = sequence_logps(token_logprobs(x.hidden, x.weight, x.labels, x.bias)[0], x.labels)
    rlp = sequence_logps(token_logprobs(ref.hidden, ref.weight, x.labels, ref.bias)[0], x.labels)
    d_loss, d_m = dpo_loss(lp[:3], lp[3:], rlp[:3], rlp[3:])
    torch.testing.assert_close(loss, d_loss, rtol=1e-12, atol=1e-12)
    for k in d_m:
        torch.testing.assert_close(m[k], d_m[k], rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(loss, x.hidden)[0]
    g2 = torch.autograd.grad(d_loss, x.hidden)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)


def test_ref_logps_equals_ref_hidden_without_kl():
    x = make_linear_head_inputs(4, 5, 4, 9, dtype=F64, seed=5)
    ref = make_linear_head_inputs(4, 5, 4, 9, dtype=F64, seed=6, requires_grad=False)
    tw = torch.rand(4, 5, dtype=F64) + 0.5
    l1, _ = catpo_loss(x.weight, x.hidden, x.labels, tw, ref_hidden=ref.hidden, ref_weight=ref.weight, kl_coef=0.0)
    cached = weighted_sequence_logps(token_logprobs(ref.hidden, ref.weight, x.labels)[0], tw, x.labels)
    l2, m2 = catpo_loss(x.weight, x.hidden, x.labels, tw, ref_logps=cached, kl_coef=0.0)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    assert "catpo/kl" not in m2  # no reference distribution, no KL


def test_loss_is_a_mean_over_pairs():
    # B = 2 at once equals the mean of the two single-pair losses (KL term included)
    x = make_linear_head_inputs(4, 5, 4, 9, dtype=F64, seed=7)
    ref_h = x.hidden.detach() + 0.5 * torch.randn_like(x.hidden)
    tw = torch.rand(4, 5, dtype=F64) + 0.5
    both, m = catpo_loss(x.weight, x.hidden, x.labels, tw, ref_hidden=ref_h, kl_coef=0.5)
    singles, kls = [], []
    for b in range(2):
        rows = [b, 2 + b]
        lb, mb = catpo_loss(x.weight, x.hidden[rows], x.labels[rows], tw[rows], ref_hidden=ref_h[rows], kl_coef=0.5)
        singles.append(lb.item())
        kls.append(mb["catpo/kl"].item())
    assert both.item() == pytest.approx(sum(singles) / 2, rel=1e-12)
    assert m["catpo/kl"].item() == pytest.approx(sum(kls) / 2, rel=1e-12)


def test_weights_are_constants_and_kl_pulls_toward_reference():
    x = make_linear_head_inputs(2, 4, 4, 7, dtype=F64, seed=8, ignore_frac=0.0)
    tw = (torch.rand(2, 4, dtype=F64) + 0.5).requires_grad_()
    loss, _ = catpo_loss(x.weight, x.hidden, x.labels, tw, ref_hidden=x.hidden.detach(), kl_coef=1.0)
    loss.backward()
    assert tw.grad is None
    # at θ == ref the KL is at its minimum: its gradient vanishes, so kl_coef does not change the gradient there
    x.hidden.grad = None
    g0 = torch.autograd.grad(catpo_loss(x.weight, x.hidden, x.labels, tw, ref_hidden=x.hidden.detach(),
                                        kl_coef=0.0)[0], x.hidden)[0]
    g1 = torch.autograd.grad(catpo_loss(x.weight, x.hidden, x.labels, tw, ref_hidden=x.hidden.detach(),
                                        kl_coef=5.0)[0], x.hidden)[0]
    torch.testing.assert_close(g0, g1, rtol=1e-9, atol=1e-12)


def test_catpo_gradcheck():
    x = make_linear_head_inputs(2, 3, 4, 5, dtype=F64, bias=True, seed=9, ignore_frac=0.3)
    ref = make_linear_head_inputs(2, 3, 4, 5, dtype=F64, bias=True, seed=10, requires_grad=False)
    tw = torch.rand(2, 3, dtype=F64) + 0.5
    torch.autograd.gradcheck(
        lambda w, h, b: catpo_loss(w, h, x.labels, tw, b, ref.hidden, ref.weight, ref.bias, kl_coef=0.7)[0],
        (x.weight, x.hidden, x.bias),
    )


def _good():
    w, h, y, tw = _hand_batch()
    return dict(weight=w, hidden=h, labels=y, token_weights=tw, ref_hidden=torch.zeros_like(h))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(kl_coef=0.03, ref_hidden=None, ref_logps=torch.zeros(2, dtype=F64)),
         "ref_hidden is required when kl_coef"),
        (dict(ref_logps=torch.zeros(2, dtype=F64)), "give ref_hidden or ref_logps, not both"),
        (dict(ref_hidden=None, kl_coef=0.0), "give ref_hidden .* or ref_logps"),
        (dict(ref_hidden=None, kl_coef=0.0, ref_logps=torch.zeros(3, dtype=F64)), "ref_logps has shape"),
        (dict(token_weights=torch.ones(2, 3, dtype=F64)), "token_weights has shape"),
        (dict(token_weights=torch.ones(2, 2, dtype=torch.int64)), "token_weights must have dtype"),
        (dict(hidden=torch.zeros(3, 2, 3, dtype=F64)), "hidden has 3 rows"),
        (dict(hidden=torch.zeros(2, 2, 3)), "hidden has dtype float32"),
        (dict(labels=torch.tensor([[0, 3], [1, -100]])), "labels contains 3"),
        (dict(labels=torch.tensor([[0, -5], [1, -100]])), "labels contains -5"),
        (dict(labels=torch.tensor([[0, 1, 2], [1, 1, 1]])), "labels has shape"),
        (dict(ref_hidden=torch.zeros(2, 2, 4, dtype=F64)), "ref_hidden has shape"),
        (dict(bias=torch.zeros(2, dtype=F64)), "bias has shape"),
        (dict(kl_coef=-1.0), "kl_coef must be >= 0"),
        (dict(beta=-0.1), "beta must be > 0"),
    ],
)
def test_catpo_bad_input(change, match):
    kw = _good()
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        catpo_loss(**kw)
