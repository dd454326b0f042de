"""Method oracles (``vpo.oracle``: DPO, OViP, LPOI, mDPO from hidden states) against values worked out by hand from
The formulas of docs/methods.md, float64 gradcheck, no gradient through the reference, and argument validation."""
import math

import pytest
import torch

from vpo.oracle import dpo_loss, lpoi_loss, mdpo_loss, ovip_loss

F64 = torch.float64
IGN = -100
W = torch.eye(3, dtype=F64)  # V = D = 3: the logits are the hidden states


def nls(x: float) -> float:
    """-log σ(x) = log(1 + e^{-x})."""
    return math.log1p(math.exp(-x))


def lp(c: float) -> float:
    """Log-prob of token 0 under logits [log c, 0, 0]: c / (c + 2)."""
    return math.log(c / (c + 2))


def one_token_pass(cs, prompt: int = 0):
    """Rows of one response token with logits ``[log c, 0, 0]`` and label 0 (log-prob ``lp(c)``), after ``prompt``
    ignored positions whose hidden states are garbage (they must not count)."""
    g = torch.Generator().manual_seed(len(cs) * 10 + prompt)
    rows = len(cs)
    hidden = torch.randn(rows, prompt + 1, 3, generator=g, dtype=F64) * 1e3
    hidden[:, prompt] = torch.tensor([[math.log(c), 0.0, 0.0] for c in cs], dtype=F64)
    labels = torch.full((rows, prompt + 1), IGN, dtype=torch.long)
    labels[:, prompt] = 0
    return hidden, labels


def close(value, expected: float, tol: float = 1e-12) -> None:
    value = value.item() if isinstance(value, torch.Tensor) else value
    assert abs(value - expected) <= tol * max(1.0, abs(expected)), (value, expected)


# --- DPO -------------------------------------------------------------------------------------------------------------


def _dpo_hand_inputs():
    # B = 1, T = 2, V = D = 3, W = I.
    # chosen:   token 0 logits [0, log 2, log 3] -> p = [1, 2, 3] / 6, label 2: log(1/2)
    #           token 1 logits [0, 0, 0], label 0: log(1/3)                       -> logp(y_w) = log(1/6)
    # rejected: token 0 logits [log 3, 0, 0] -> p = [3, 1, 1] / 5, label 1: log(1/5)
    #           token 1 ignored (logits 1e4: must not matter)                     -> logp(y_l) = log(1/5)
    # reference: all logits 0 -> logp_ref(y_w) = log(1/9) (2 tokens), logp_ref(y_l) = log(1/3) (1 token)
    l2, l3 = math.log(2), math.log(3)
    hidden = torch.tensor(
        [[[0.0, l2, l3], [0.0, 0.0, 0.0]], [[l3, 0.0, 0.0], [1e4, -1e4, 3.0]]], dtype=F64, requires_grad=True
    )
    labels = torch.tensor([[2, 0], [1, IGN]])
    ref_hidden = torch.zeros(2, 2, 3, dtype=F64)
    return hidden, labels, ref_hidden


def test_dpo_hand_worked():
    hidden, labels, ref_hidden = _dpo_hand_inputs()
    # Δw = log(1/6) - log(1/9) = log 1.5, Δl = log(1/5) - log(1/3) = log 0.6; β = 1: margin log 2.5,
    # -log σ(log 2.5) = log(1 + 1/2.5) = log 1.4.
    loss, m = dpo_loss(W, hidden, labels, ref_hidden=ref_hidden, beta=1.0)
    close(loss, math.log(1.4))
    close(m["rewards/chosen"], math.log(1.5))
    close(m["rewards/rejected"], math.log(0.6))
    close(m["rewards/margins"], math.log(2.5))
    close(m["logps/chosen"], math.log(1 / 6))
    close(m["logps/rejected"], math.log(1 / 5))
    close(m["rewards/accuracies"], 1.0)
    # β = 0.5: -log σ(0.5 log 2.5) = log(1 + 2.5^{-1/2}).
    close(dpo_loss(W, hidden, labels, ref_hidden=ref_hidden, beta=0.5)[0], math.log(1 + 2.5**-0.5))
    # Conservative DPO, ε = 0.25, β = 1: 0.75 log 1.4 + 0.25 log(1 + 2.5).
    smoothed, _ = dpo_loss(W, hidden, labels, ref_hidden=ref_hidden, beta=1.0, label_smoothing=0.25)
    close(smoothed, 0.75 * math.log(1.4) + 0.25 * math.log(3.5))
    # label_smoothing = 0 is plain DPO.
    assert torch.equal(dpo_loss(W, hidden, labels, ref_hidden=ref_hidden, beta=1.0, label_smoothing=0.0)[0], loss)
    # Reference-free (no ref_hidden): margin log(1/6) - log(1/5) = log(5/6): log(1 + 6/5).
    close(dpo_loss(W, hidden, labels, beta=1.0)[0], math.log(2.2))
    # The gradient never reaches the ignored position.
    loss.backward()
    assert torch.count_nonzero(hidden.grad[1, 1]) == 0 and torch.count_nonzero(hidden.grad[0, 1]) > 0


def test_dpo_bias_and_separate_reference_head():
    hidden, labels, ref_hidden = _dpo_hand_inputs()
    expected = math.log(1.4)
    # Moving part of the logits into the bias changes nothing: z = (h - b) + b (reference: its own head, no bias).
    b = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    close(dpo_loss(W, hidden - b, labels, b, ref_hidden=ref_hidden, ref_weight=W, beta=1.0)[0], expected)
    # A separate reference head: W_ref = 2 I with half the hidden states, plus a bias shifting every logit equally.
    ref_w, ref_b = 2 * W, torch.full((3,), 7.0, dtype=F64)
    loss, _ = dpo_loss(W, hidden, labels, ref_hidden=ref_hidden / 2 - 3.5, ref_weight=ref_w, ref_bias=ref_b, beta=1.0)
    close(loss, expected)
    # ... and with the shared head (ref_weight None) the policy's bias is the reference's too.
    close(dpo_loss(W, hidden - b, labels, b, ref_hidden=ref_hidden - b, beta=1.0)[0], expected)


def test_dpo_no_gradient_through_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=F64, requires_grad=True)
    h = torch.randn(4, 3, 4, generator=g, dtype=F64, requires_grad=True)
    ref_h = torch.randn(4, 3, 4, generator=g, dtype=F64, requires_grad=True)
    y = torch.randint(0, 7, (4, 3), generator=g)
    # Shared head: the reference uses W and b, but only as constants.
    dpo_loss(w, h, y, b, ref_hidden=ref_h)[0].backward()
    assert ref_h.grad is None
    shared = (w.grad.clone(), b.grad.clone())
    w.grad = b.grad = None
    dpo_loss(w, h, y, b, ref_hidden=ref_h, ref_weight=w.detach().clone(), ref_bias=b.detach().clone())[0].backward()
    torch.testing.assert_close(w.grad, shared[0], rtol=0, atol=0)
    torch.testing.assert_close(b.grad, shared[1], rtol=0, atol=0)
    # (If the reference pass were differentiated the gradient to W would change: check that it can.)
    w.grad = None
    detached_ref = w.detach().clone().requires_grad_()
    dpo_loss(w, h, y, ref_hidden=ref_h, ref_weight=detached_ref)[0].backward()
    assert detached_ref.grad is None


# --- OViP ------------------------------------------------------------------------------------------------------------

# B = 2. c values per row (log-prob lp(c)); "A+" rows first, then "A-" rows where a pass has 2B rows.
P_IMG, R_IMG = [4.0, 1.0, 2.0, 6.0], [2.0, 2.0, 1.0, 3.0]
P_NOIMG, R_NOIMG = [3.0, 0.5, 1.0, 2.0], [1.0, 1.0, 2.0, 2.0]
P_NEG, R_NEG = [0.25, 2.0, 5.0, 0.5], [1.0, 3.0, 2.0, 1.0]


def _d(p, r):
    return [lp(a) - lp(b) for a, b in zip(p, r)]


def _ovip_inputs(rows_noimg=2, rows_neg=2, ref=True):
    """The three OViP passes built from the c tables above; the image-free / negative-image passes keep their first
    ``rows_*`` rows (2 = A+ only, 4 = A+ then A-). Prompt lengths differ per pass (2, 0, 1 ignored positions)."""
    h, y = one_token_pass(P_IMG, prompt=2)
    hn, yn = one_token_pass(P_NOIMG[:rows_noimg], prompt=0)
    hg, yg = one_token_pass(P_NEG[:rows_neg], prompt=1)
    kw = {}
    if ref:
        kw = dict(
            ref_hidden=one_token_pass(R_IMG, prompt=2)[0],
            ref_noimg_hidden=one_token_pass(R_NOIMG[:rows_noimg], prompt=0)[0],
            ref_negimg_hidden=one_token_pass(R_NEG[:rows_neg], prompt=1)[0],
        )
    return [W, h, y, hn, yn, hg, yg], kw


def _expected_text(beta, d_img):
    return sum(nls(beta * (d_img[i] - d_img[2 + i])) for i in range(2)) / 2


def _expected_image(b1, b2, d_img, d_noimg, d_neg, rows=(0, 1)):
    # SPEC: -log σ(β1 [Δ(A|I+) - Δ(A|Q)] + β2 [Δ(A|Q) - Δ(A|I-)])
    return sum(nls(b1 * (d_img[i] - d_noimg[i]) + b2 * (d_noimg[i] - d_neg[i])) for i in rows) / len(rows)


def test_ovip_hand_worked():
    args, kw = _ovip_inputs()
    d_img, d_noimg, d_neg = _d(P_IMG, R_IMG), _d(P_NOIMG, R_NOIMG), _d(P_NEG, R_NEG)
    loss, m = ovip_loss(*args, **kw, beta=0.5, beta1=0.3, beta2=0.7)
    text, image = _expected_text(0.5, d_img), _expected_image(0.3, 0.7, d_img, d_noimg, d_neg)
    close(loss, text + image)
    close(m["dpo/loss"], text)
    close(m["image/loss"], image)
    close(m["rewards/chosen"], 0.5 * (d_img[0] + d_img[1]) / 2)
    close(m["image/logps_noimg"], (lp(3.0) + lp(0.5)) / 2)
    # Reference-free: every Δ is the policy log-prob.
    loss_rf, _ = ovip_loss(*args, beta=0.5, beta1=0.3, beta2=0.7)
    p_img, p_noimg, p_neg = (list(map(lp, x)) for x in (P_IMG, P_NOIMG, P_NEG))
    close(loss_rf, _expected_text(0.5, p_img) + _expected_image(0.3, 0.7, p_img, p_noimg, p_neg))


def test_ovip_variants_hand_worked():
    d_img, d_noimg, d_neg = _d(P_IMG, R_IMG), _d(P_NOIMG, R_NOIMG), _d(P_NEG, R_NEG)
    beta, b1, b2 = 0.5, 0.3, 0.7
    text = _expected_text(beta, d_img)

    # Base image loss (appendix B.1): -log σ(β [Δ(A+|I+) - Δ(A+|I-)]); the image-free pass is not needed.
    args, kw = _ovip_inputs()
    base = sum(nls(beta * (d_img[i] - d_neg[i])) for i in range(2)) / 2
    loss, m = ovip_loss(*args, **kw, beta=beta, beta1=b1, beta2=b2, image_loss="base")
    close(loss, text + base)
    args_nn = list(args)
    args_nn[3] = args_nn[4] = None
    kw_nn = dict(kw, ref_noimg_hidden=None)
    close(ovip_loss(*args_nn, **kw_nn, beta=beta, image_loss="base")[0], text + base)
    # ... which is eq. 5 with β1 = β2 = β.
    close(ovip_loss(*args, **kw, beta=beta, beta1=beta, beta2=beta)[0], text + base)

    # Symmetric (2B rows in the image-free and negative-image passes): eq. 5 for A+, and for A- with I+ and I- swapped.
    args4, kw4 = _ovip_inputs(rows_noimg=4, rows_neg=4)
    sym = _expected_image(b1, b2, d_img, d_noimg, d_neg) + sum(
        nls(b1 * (d_neg[2 + i] - d_noimg[2 + i]) + b2 * (d_noimg[2 + i] - d_img[2 + i])) for i in range(2)
    ) / 2
    loss, m = ovip_loss(*args4, **kw4, beta=beta, beta1=b1, beta2=b2, image_loss="symmetric")
    close(loss, text + sym)
    # The extra A- rows change nothing for the default loss.
    loss, _ = ovip_loss(*args4, **kw4, beta=beta, beta1=b1, beta2=b2)
    close(loss, text + _expected_image(b1, b2, d_img, d_noimg, d_neg))

    image = _expected_image(b1, b2, d_img, d_noimg, d_neg)
    # Anchor: + -log σ(β Δ(A+|I+)).
    anchor = sum(nls(beta * d_img[i]) for i in range(2)) / 2
    loss, m = ovip_loss(*args, **kw, beta=beta, beta1=b1, beta2=b2, anchor="anchor")
    close(loss, text + image + anchor)
    close(m["anchor/loss"], anchor)
    # Bi-anchor, as printed: -log σ(β Δ(A+|I+,Q)) + log σ(β Δ(A-|Q)); A-'s image-free pass is needed.
    bi_paper = anchor - sum(nls(beta * d_noimg[2 + i]) for i in range(2)) / 2
    loss, m = ovip_loss(*args4, **kw4, beta=beta, beta1=b1, beta2=b2, anchor="bi-anchor")
    close(loss, text + image + bi_paper)
    close(m["bi_anchor/loss"], bi_paper)
    # Bounded form: -log σ(β Δ(A+|I+,Q)) - log σ(-β Δ(A-|Q)).
    bi_bounded = anchor + sum(nls(-beta * d_noimg[2 + i]) for i in range(2)) / 2
    loss, _ = ovip_loss(*args4, **kw4, beta=beta, beta1=b1, beta2=b2, anchor="bi-anchor", bi_anchor_form="bounded")
    close(loss, text + image + bi_bounded)
    # A- given the image instead (no A- rows needed in the image-free pass).
    bi_img = anchor - sum(nls(beta * d_img[2 + i]) for i in range(2)) / 2
    loss, _ = ovip_loss(*args, **kw, beta=beta, beta1=b1, beta2=b2, anchor="bi-anchor", bi_anchor_rejected="img")
    close(loss, text + image + bi_img)


# --- LPOI ------------------------------------------------------------------------------------------------------------


def test_lpoi_hand_worked():
    # B = 2, L = 3: x_1 is the chosen rows of the DPO pass, x_2 and x_3 come from list_hidden.
    pol, ref = [4.0, 1.0, 2.0, 6.0], [2.0, 2.0, 1.0, 3.0]
    pol_list, ref_list = [[1.0, 0.5], [3.0, 0.25]], [[1.0, 2.0], [1.0, 1.0]]
    h, y = one_token_pass(pol, prompt=1)
    ref_h, _ = one_token_pass(ref, prompt=1)
    hl, yl = one_token_pass([c for row in pol_list for c in row], prompt=2)
    ref_hl, _ = one_token_pass([c for row in ref_list for c in row], prompt=2)
    hl, yl, ref_hl = hl.view(2, 2, 3, 3), yl.view(2, 2, 3), ref_hl.view(2, 2, 3, 3)
    beta, delta = 0.5, 0.3

    d = _d(pol, ref)
    dpo = sum(nls(beta * (d[i] - d[2 + i])) for i in range(2)) / 2
    anchor = sum(nls(beta * d[i] - delta) for i in range(2)) / 2
    listwise = 0.0
    for i in range(2):
        s = [beta * d[i]] + [beta * (lp(p) - lp(r)) for p, r in zip(pol_list[i], ref_list[i])]
        listwise += -sum(s[k] - math.log(sum(math.exp(x) for x in s[k:])) for k in range(3)) / 2
    loss, m = lpoi_loss(W, h, y, hl, yl, ref_hidden=ref_h, ref_list_hidden=ref_hl, beta=beta, delta=delta)
    close(loss, dpo + anchor + listwise)
    close(m["dpo/loss"], dpo)
    close(m["anchor/loss"], anchor)
    close(m["listwise/loss"], listwise)
    close(m["listwise/rewards_first"], beta * (d[0] + d[1]) / 2)


# --- mDPO ------------------------------------------------------------------------------------------------------------


def test_mdpo_hand_worked():
    pol, ref = [4.0, 1.0, 2.0, 6.0], [2.0, 2.0, 1.0, 3.0]
    pol_c, ref_c = [0.5, 3.0], [1.0, 1.5]
    h, y = one_token_pass(pol, prompt=1)
    ref_h, _ = one_token_pass(ref, prompt=1)
    hc, yc = one_token_pass(pol_c, prompt=3)
    ref_hc, _ = one_token_pass(ref_c, prompt=3)
    beta, delta = 0.5, -0.2
    d, dc = _d(pol, ref), _d(pol_c, ref_c)
    dpo = sum(nls(beta * (d[i] - d[2 + i])) for i in range(2)) / 2
    cond = sum(nls(beta * d[i] - beta * dc[i]) for i in range(2)) / 2
    anchor = sum(nls(beta * d[i] - delta) for i in range(2)) / 2
    loss, m = mdpo_loss(W, h, y, hc, yc, ref_hidden=ref_h, ref_corrupt_hidden=ref_hc, beta=beta, delta=delta)
    close(loss, dpo + cond + anchor)
    close(m["dpo/loss"], dpo)
    close(m["conditional/loss"], cond)
    close(m["anchor/loss"], anchor)
    close(m["rewards/corrupt"], beta * (dc[0] + dc[1]) / 2)


# --- gradcheck -------------------------------------------------------------------------------------------------------


def _rand_pass(g, rows, seq, dim=4, vocab=5, prompt=1, extra=()):
    h = torch.randn(*extra, rows, seq, dim, generator=g, dtype=F64)
    y = torch.randint(0, vocab, (*extra, rows, seq), generator=g)
    y[..., :prompt] = IGN
    return h, y


def test_gradcheck_dpo():
    g = torch.Generator().manual_seed(10)
    w = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=F64, requires_grad=True)
    h, y = _rand_pass(g, 4, 3)
    h.requires_grad_()
    ref_h, _ = _rand_pass(g, 4, 3)
    ref_w = torch.randn(5, 4, generator=g, dtype=F64)

    def f(w, h, b):
        return dpo_loss(w, h, y, b, ref_h, ref_w, beta=0.7, label_smoothing=0.1)[0]

    assert torch.autograd.gradcheck(f, (w, h, b), fast_mode=True)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(image_loss="symmetric", anchor="bi-anchor", bi_anchor_form="bounded"),
     dict(image_loss="base", anchor="anchor"), dict(anchor="bi-anchor")],
)  # fmt: skip
def test_gradcheck_ovip(options):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=F64, requires_grad=True)
    h, y = _rand_pass(g, 4, 3, prompt=2)
    hn, yn = _rand_pass(g, 4, 2, prompt=0)
    hg, yg = _rand_pass(g, 4, 3, prompt=2)
    # A separate reference head: with a shared one, gradcheck's finite differences in W would move the (frozen)
    # reference too, which the analytical gradient rightly ignores.
    refs = [_rand_pass(g, 4, 3)[0], _rand_pass(g, 4, 2)[0], _rand_pass(g, 4, 3)[0]]
    refs.append(torch.randn(5, 4, generator=g, dtype=F64))  # ref_weight
    kw = dict(beta=0.3, beta1=0.2, beta2=0.6, **options)

    def f(w, b, h, hn, hg):
        return ovip_loss(w, h, y, hn, yn, hg, yg, b, *refs, **kw)[0]

    assert torch.autograd.gradcheck(f, tuple(x.requires_grad_() for x in (w, b, h, hn, hg)), fast_mode=True)


def test_gradcheck_lpoi_and_mdpo():
    g = torch.Generator().manual_seed(12)
    w = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=F64, requires_grad=True)
    h, y = _rand_pass(g, 4, 3)
    hl, yl = _rand_pass(g, 3, 2, extra=(2,))  # [B=2, L-1=3, T=2, D]
    hc, yc = _rand_pass(g, 2, 3)
    ref_h, ref_hl, ref_hc = _rand_pass(g, 4, 3)[0], _rand_pass(g, 3, 2, extra=(2,))[0], _rand_pass(g, 2, 3)[0]
    ref_w = torch.randn(5, 4, generator=g, dtype=F64)

    def f_lpoi(w, b, h, hl):
        return lpoi_loss(w, h, y, hl, yl, b, ref_h, ref_hl, ref_w, beta=0.4, delta=0.1)[0]

    def f_mdpo(w, b, h, hc):
        return mdpo_loss(w, h, y, hc, yc, b, ref_h, ref_hc, ref_w, beta=0.4, delta=0.1)[0]

    assert torch.autograd.gradcheck(f_lpoi, tuple(x.requires_grad_() for x in (w, b, h, hl)), fast_mode=True)
    assert torch.autograd.gradcheck(f_mdpo, tuple(x.requires_grad_() for x in (w, b, h, hc)), fast_mode=True)


# --- argument validation ---------------------------------------------------------------------------------------------


def _small():
    g = torch.Generator().manual_seed(13)
    w = torch.randn(5, 4, generator=g, dtype=F64)
    h, y = _rand_pass(g, 4, 3)
    return g, w, h, y


def test_dpo_rejects_bad_input():
    g, w, h, y = _small()
    ref_h = h.clone()
    dpo_loss(w, h, y, ref_hidden=ref_h)
    cases = [
        (dict(hidden=h[:3], labels=y[:3]), r"hidden has 3 rows .*expected an even, non-zero 2B rows"),
        (dict(hidden=h[:0], labels=y[:0]), r"hidden must not be empty"),
        (dict(hidden=h[0]), r"hidden must have 3 dimensions"),
        (dict(labels=y[:, :2]), r"labels has shape \(4, 2\) but hidden has shape \(4, 3, 4\): expected labels.shape"),
        (dict(labels=y.float()), r"labels must have dtype in"),
        (dict(labels=torch.full_like(y, 5)), r"labels contains 5: expected values in \[0, 5\)"),
        (dict(hidden=h.float()), r"hidden has dtype float32 but weight has dtype float64"),
        (dict(weight=w[:, :3]), r"hidden has shape \(4, 3, 4\) but weight has shape \(5, 3\)"),
        (dict(weight=w[0]), r"weight must have 2 dimensions"),
        (dict(bias=torch.zeros(4, dtype=F64)), r"bias has shape \(4,\) but weight has shape \(5, 4\)"),
        (dict(bias=torch.zeros(5)), r"bias has dtype float32 but weight has dtype float64"),
        (dict(ref_hidden=ref_h[:2]), r"labels has shape \(4, 3\) but ref_hidden has shape \(2, 3, 4\)"),
        (dict(ref_hidden=ref_h.float()), r"ref_hidden has dtype float32 but weight has dtype float64"),
        (dict(ref_weight=w[:3]), r"ref_weight has shape \(3, 4\) but weight has shape \(5, 4\)"),
        (dict(ref_bias=torch.zeros(5, dtype=F64)), r"ref_bias is given but ref_weight is None"),
        (dict(ref_hidden=None, ref_weight=w), r"ref_weight/ref_bias given but ref_hidden is None"),
        (dict(beta=0.0), r"beta must be > 0, got 0.0"),
        (dict(beta=-1.0), r"beta must be > 0"),
        (dict(label_smoothing=0.5), r"label_smoothing must be in \[0.0, 0.5\)"),
    ]
    for change, pattern in cases:
        kw = dict(weight=w, hidden=h, labels=y, ref_hidden=ref_h)
        kw.update(change)
        with pytest.raises(ValueError, match=pattern):
            dpo_loss(**kw)


def test_ovip_rejects_bad_input():
    g, w, h, y = _small()
    hn, yn = _rand_pass(g, 2, 2, prompt=0)
    hg, yg = _rand_pass(g, 2, 3)
    ok = dict(weight=w, hidden=h, labels=y, noimg_hidden=hn, noimg_labels=yn, negimg_hidden=hg, negimg_labels=yg)
    ovip_loss(**ok)
    refs = dict(ref_hidden=h, ref_noimg_hidden=hn, ref_negimg_hidden=hg)
    ovip_loss(**ok, **refs)
    cases = [
        (dict(hidden=h[:3], labels=y[:3]), r"hidden has 3 rows"),
        (dict(noimg_hidden=hn[:1], noimg_labels=yn[:1]), r"noimg_hidden has 1 rows .*expected 2 or 4"),
        (dict(negimg_hidden=hg[:1], negimg_labels=yg[:1]), r"negimg_hidden has 1 rows .*expected 2 or 4"),
        (dict(image_loss="symmetric"), r"noimg_hidden has 2 rows .*expected 4 \(B=2 A⁺ rows, then the B A⁻ rows\)"),
        (dict(anchor="bi-anchor"), r"noimg_hidden has 2 rows .*expected 4"),
        (dict(noimg_hidden=None, noimg_labels=None), r"noimg_hidden and noimg_labels are required with image_loss="),
        (dict(noimg_hidden=None), r"noimg_hidden is None but noimg_labels is given: expected both"),
        (dict(noimg_labels=yn[:, :1]), r"noimg_labels has shape \(2, 1\) but noimg_hidden has shape \(2, 2, 4\)"),
        (dict(negimg_hidden=hg.float()), r"negimg_hidden has dtype float32 but weight has dtype float64"),
        (dict(negimg_hidden=hg[0]), r"negimg_hidden must have 3 dimensions"),
        (dict(ref_hidden=h), r"ref_hidden given but ref_noimg_hidden, ref_negimg_hidden is None"),
        (dict(ref_hidden=h, ref_noimg_hidden=hn, ref_negimg_hidden=hg[:, :2]),
         r"negimg_labels has shape \(2, 3\) but ref_negimg_hidden has shape \(2, 2, 4\)"),
        (dict(image_loss="sym"), r"image_loss must be one of \['ovip', 'base', 'symmetric'\], got 'sym'"),
        (dict(anchor="anchors"), r"anchor must be one of \[None, 'anchor', 'bi-anchor'\]"),
        (dict(bi_anchor_form="x"), r"bi_anchor_form must be one of"),
        (dict(bi_anchor_rejected="x"), r"bi_anchor_rejected must be one of"),
        (dict(beta=0.0), r"beta must be > 0"),
        (dict(beta1=-0.1), r"beta1 must be > 0"),
        (dict(beta2=float("nan")), r"beta2 must be > 0"),
    ]
    for change, pattern in cases:
        kw = dict(ok)
        kw.update(change)
        with pytest.raises(ValueError, match=pattern):
            ovip_loss(**kw)


def test_lpoi_and_mdpo_reject_bad_input():
    g, w, h, y = _small()
    hl, yl = _rand_pass(g, 4, 2, extra=(2,))
    hc, yc = _rand_pass(g, 2, 3)
    lpoi_loss(w, h, y, hl, yl)
    mdpo_loss(w, h, y, hc, yc)
    lpoi_cases = [
        (dict(hidden=h[:1], labels=y[:1]), r"hidden has 1 rows"),
        (dict(list_hidden=hl[:1], list_labels=yl[:1]), r"list_hidden has 1 rows .*expected B=2 \(one list per pair\)"),
        (dict(list_hidden=hl[0]), r"list_hidden must have 4 dimensions"),
        (dict(list_labels=yl[..., :1]), r"list_labels has shape \(2, 4, 1\) but list_hidden has shape \(2, 4, 2, 4\)"),
        (dict(list_labels=yl[0]), r"list_labels must have 3 dimensions"),
        (dict(ref_hidden=h), r"ref_hidden given but ref_list_hidden is None"),
        (dict(ref_list_hidden=hl), r"ref_list_hidden given but ref_hidden is None"),
        (dict(beta=0), r"beta must be > 0"),
        (dict(delta=float("inf")), r"delta must be in"),
    ]
    for change, pattern in lpoi_cases:
        kw = dict(weight=w, hidden=h, labels=y, list_hidden=hl, list_labels=yl)
        kw.update(change)
        with pytest.raises(ValueError, match=pattern):
            lpoi_loss(**kw)
    mdpo_cases = [
        (dict(hidden=h[:3], labels=y[:3]), r"hidden has 3 rows"),
        (dict(corrupt_hidden=h, corrupt_labels=y), r"corrupt_hidden has 4 rows .*expected B=2"),
        (dict(corrupt_labels=yc[:, :2]), r"corrupt_labels has shape \(2, 2\) but corrupt_hidden has shape \(2, 3, 4\)"),
        (dict(corrupt_hidden=hc.float()), r"corrupt_hidden has dtype float32 but weight has dtype float64"),
        (dict(ref_corrupt_hidden=hc), r"ref_corrupt_hidden given but ref_hidden is None"),
        (dict(beta=-1.0), r"beta must be > 0"),
    ]
    for change, pattern in mdpo_cases:
        kw = dict(weight=w, hidden=h, labels=y, corrupt_hidden=hc, corrupt_labels=yc)
        kw.update(change)
        with pytest.raises(ValueError, match=pattern):
            mdpo_loss(**kw)
