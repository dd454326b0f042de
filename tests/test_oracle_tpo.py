"""TPO oracle (vpo.oracle.tpo) against hand-worked values, DPO identities and the paper's ablations."""
import math

import pytest
import torch

from vpo.losses import dpo_loss
from vpo.oracle import (
    sequence_logps,
    token_logprobs,
    tpo_calibrated_reward,
    tpo_log_calibrated_reward,
    tpo_loss,
    tpo_scores,
    tpo_sequence_logps,
)
from vpo.testing import make_linear_head_inputs

F64 = torch.float64
BETA = 0.1


def sig(x):
    return 1 / (1 + math.exp(-x))


def lsm(logits, i):
    """log softmax(logits)[i] in plain Python."""
    return logits[i] - math.log(sum(math.exp(z) for z in logits))


# --- the hand-worked batch: B = 1, T = 2, V = D = 3, W = I so the logits are the hidden states -----------------------
#   chosen row:    token 0 = label 0, logits [1, 0, 0], noised [0.5, 0, 0]  -> s = 0.5
#                  token 1 = label 1, logits [0, 2, 0], noised [0, 2, 0]    -> s = 0
#   rejected row:  token 0 = label 2, logits [0, 0, 1], noised [0, 0, 0]    -> s = 1
#                  token 1 ignored
#   reference: all-zero hidden states on both images -> logp = -log 3, s_ref = 0


def _hand_batch():
    w = torch.eye(3, dtype=F64)
    h = torch.tensor([[[1.0, 0, 0], [0, 2, 0]], [[0, 0, 1], [1, 1, 0]]], dtype=F64)
    hn = torch.tensor([[[0.5, 0, 0], [0, 2, 0]], [[0, 0, 0], [1, 1, 0]]], dtype=F64)
    y = torch.tensor([[0, 1], [2, -100]])
    return w, h, hn, y


def _hand_expected(a=0.5, rewards="both"):
    lp_c = [lsm([1, 0, 0], 0), lsm([0, 2, 0], 1)]
    lp_r = lsm([0, 0, 1], 2)

    def c(s, chosen):
        rising = chosen if rewards != "opposite" else not chosen
        val = a + sig(s) if rising else a + 1 - sig(s)
        if (rewards == "only_win" and not chosen) or (rewards == "only_loss" and chosen):
            return 1.0
        return val

    def c_ref(chosen):  # s_ref = 0
        return c(0.0, chosen)

    c_c = [c(0.5, True), c(0.0, True)]
    c_r = c(1.0, False)
    chosen = sum(lp_c) + sum(math.log(x) for x in c_c)
    rejected = lp_r + math.log(c_r)
    ref_chosen = 2 * (-math.log(3)) + 2 * math.log(c_ref(True))
    ref_rejected = -math.log(3) + math.log(c_ref(False))
    margin = BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))
    loss = -math.log(sig(margin))
    return loss, dict(c_chosen=c_c, c_rejected=c_r, logps_chosen=sum(lp_c), logps_rejected=lp_r,
                      reward_chosen=BETA * (chosen - ref_chosen), margin=margin)


@pytest.mark.parametrize("a", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("rewards", ["both", "only_win", "only_loss", "opposite"])
def test_hand_worked_loss(a, rewards):
    w, h, hn, y = _hand_batch()
    zeros = torch.zeros_like(h)
    loss, m = tpo_loss(w, h, hn, y, ref_hidden=zeros, ref_hidden_noised=zeros, beta=BETA, a=a, rewards=rewards)
    exp_loss, exp = _hand_expected(a, rewards)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(exp["reward_chosen"], rel=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(exp["margin"], rel=1e-12)
    assert m["logps/chosen"].item() == pytest.approx(exp["logps_chosen"], rel=1e-12)
    assert m["logps/rejected"].item() == pytest.approx(exp["logps_rejected"], rel=1e-12)
    assert m["tpo/c_mean_chosen"].item() == pytest.approx(sum(exp["c_chosen"]) / 2, rel=1e-12)
    assert m["tpo/c_mean_rejected"].item() == pytest.approx(exp["c_rejected"], rel=1e-12)
    assert m["tpo/s_mean"].item() == pytest.approx((0.5 + 0.0 + 1.0) / 3, rel=1e-12)


def test_hand_worked_ablations_differ():
    # every ablation changes the loss on this batch: none of them is silently the default
    losses = {r: _hand_expected(0.5, r)[0] for r in ("both", "only_win", "only_loss", "opposite")}
    assert len({round(v, 12) for v in losses.values()}) == 4


def test_scores_and_calibrated_reward_by_hand():
    assert tpo_scores(torch.tensor([3.0, -1.0]), torch.tensor([1.0, 0.5])).tolist() == [2.0, -1.5]
    s = torch.tensor([[0.0, 2.0, -1.0], [0.0, 2.0, -1.0]], dtype=F64)
    rows = torch.tensor([True, False])
    for a in (0.0, 0.5, 1.0):
        c = tpo_calibrated_reward(s, rows, a=a)
        expected = [[a + sig(x) for x in (0.0, 2.0, -1.0)], [a + 1 - sig(x) for x in (0.0, 2.0, -1.0)]]
        torch.testing.assert_close(c, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    # a = 0.5: s = 0 -> c = 1 on both sides
    assert tpo_calibrated_reward(s, rows)[:, 0].tolist() == pytest.approx([1.0, 1.0], rel=1e-15)
    # ablations: the unrewarded side is exactly 1
    assert tpo_calibrated_reward(s, rows, rewards="only_win")[1].tolist() == [1.0, 1.0, 1.0]
    assert tpo_calibrated_reward(s, rows, rewards="only_loss")[0].tolist() == [1.0, 1.0, 1.0]
    opp = tpo_calibrated_reward(s, rows, rewards="opposite")
    torch.testing.assert_close(opp, tpo_calibrated_reward(s, rows.flip(0)))
    # a per-token flag of shape s.shape works the same as a per-row flag
    torch.testing.assert_close(tpo_calibrated_reward(s, rows[:, None].expand(2, 3)), tpo_calibrated_reward(s, rows))


def test_log_calibrated_reward_is_stable_at_a_zero():
    s = torch.tensor([-1000.0, 1000.0], dtype=F64)
    log_c = tpo_log_calibrated_reward(s, torch.tensor([True, False]), a=0.0)
    assert log_c.tolist() == pytest.approx([-1000.0, -1000.0], rel=1e-12)


@pytest.mark.parametrize("a", [0.0, 0.5, 2.0])
def test_s_zero_equals_dpo(a):
    # hidden_noised == hidden (s ≡ 0 for policy and reference): log c_θ = log c_ref per token, so TPO is DPO.
    x = make_linear_head_inputs(4, 5, 6, 7, dtype=F64, bias=True, seed=1)
    ref = make_linear_head_inputs(4, 5, 6, 7, dtype=F64, seed=2, requires_grad=False)
    loss, m = tpo_loss(x.weight, x.hidden, x.hidden, x.labels, x.bias, ref.hidden, ref.hidden, a=a)
    lp = sequence_logps(token_logprobs(x.hidden, x.weight, x.labels, x.bias)[0], x.labels)
    rlp = sequence_logps(token_logprobs(ref.hidden, x.weight, x.labels, x.bias)[0], x.labels)
    d_loss, d_m = dpo_loss(lp[:2], lp[2:], rlp[:2], rlp[2:], beta=0.1)
    torch.testing.assert_close(loss, d_loss, rtol=1e-12, atol=1e-12)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        torch.testing.assert_close(m[k], d_m[k], rtol=1e-12, atol=1e-12)
    assert m["tpo/s_mean"].item() == 0.0
    assert m["tpo/c_mean_chosen"].item() == pytest.approx(a + 0.5)


def test_ref_logps_equals_ref_passes():
    x = make_linear_head_inputs(4, 5, 6, 7, dtype=F64, bias=True, seed=3)
    hn = x.hidden.detach() + 0.3 * torch.randn_like(x.hidden)
    ref = make_linear_head_inputs(4, 5, 6, 7, dtype=F64, bias=True, seed=4, requires_grad=False)
    ref_hn = ref.hidden + 0.3 * torch.randn_like(ref.hidden)
    kw = dict(a=0.5, rewards="only_loss")
    with torch.no_grad():
        cached = tpo_sequence_logps(ref.weight, ref.hidden, ref_hn, x.labels, ref.bias, **kw).logps
    l1, m1 = tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, ref.hidden, ref_hn, ref.weight, ref.bias, **kw)
    l2, m2 = tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, ref_logps=cached, **kw)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    assert m1.keys() == m2.keys()


def test_shared_reference_head():
    # ref_weight=None shares the policy head (and bias) — the same as passing copies
    x = make_linear_head_inputs(2, 4, 5, 6, dtype=F64, bias=True, seed=5)
    hn = x.hidden.detach() * 0.9
    rh = x.hidden.detach() + 0.1
    l1, _ = tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, rh, hn)
    w2, b2 = x.weight.detach().clone(), x.bias.detach().clone()
    l2, _ = tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, rh, hn, w2, b2)
    l3, _ = tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, rh, hn, x.weight.detach().clone())  # no ref bias
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    assert abs(l1.item() - l3.item()) > 1e-6
    # the shared reference head is a constant: no gradient reaches weight through the reference passes
    g1 = torch.autograd.grad(l1, x.weight)[0]
    g2 = torch.autograd.grad(l2, x.weight)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


def test_sequence_terms_at_ignored_positions():
    # s = 0 and c = 1 where there is no target, whatever a is
    x = make_linear_head_inputs(2, 6, 4, 5, dtype=F64, seed=11, ignore_frac=0.5)
    ignored = x.labels == -100
    assert bool(ignored.any())
    terms = tpo_sequence_logps(x.weight, x.hidden, x.hidden * 0.5, x.labels, a=1.0)
    assert terms.s[ignored].abs().sum() == 0 and bool((terms.c[ignored] == 1).all())
    assert terms.token_logps[ignored].abs().sum() == 0
    assert bool((terms.c[~ignored] > 1).all())  # a = 1: c in (1, 2) on response tokens


def test_reward_grad_false_detaches_c():
    x = make_linear_head_inputs(4, 5, 6, 7, dtype=F64, seed=6)
    ref = make_linear_head_inputs(4, 5, 6, 7, dtype=F64, seed=7, requires_grad=False)
    hn = (x.hidden.detach() + 0.5 * torch.randn_like(x.hidden)).requires_grad_()

    loss_t, _ = tpo_loss(x.weight, x.hidden, hn, x.labels, ref_hidden=ref.hidden, ref_hidden_noised=ref.hidden)
    g_h_t, g_hn_t = torch.autograd.grad(loss_t, (x.hidden, hn))
    assert g_hn_t.abs().sum() > 0  # the paper's choice: c_θ carries gradient, also to the noised pass

    loss_f, _ = tpo_loss(x.weight, x.hidden, hn, x.labels, ref_hidden=ref.hidden, ref_hidden_noised=ref.hidden,
                         reward_grad=False)
    assert loss_f.item() == pytest.approx(loss_t.item(), rel=1e-14)
    g_h_f, g_hn_f = torch.autograd.grad(loss_f, (x.hidden, hn), allow_unused=True)
    assert g_hn_f is None or g_hn_f.abs().sum() == 0

    # with c detached, the gradient on hidden is DPO's with Σ log c as a constant offset
    logp = token_logprobs(x.hidden, x.weight, x.labels)[0]
    with torch.no_grad():
        terms = tpo_sequence_logps(x.weight, x.hidden, hn, x.labels)
        offset = terms.logps - sequence_logps(terms.token_logps, x.labels)
        ref_lp = tpo_sequence_logps(x.weight, ref.hidden, ref.hidden, x.labels).logps
    seq = sequence_logps(logp, x.labels) + offset
    d_loss, _ = dpo_loss(seq[:2], seq[2:], ref_lp[:2], ref_lp[2:])
    (g_dpo,) = torch.autograd.grad(d_loss, (x.hidden,))
    torch.testing.assert_close(g_h_f, g_dpo, rtol=1e-10, atol=1e-12)
    assert (g_h_t - g_h_f).abs().max() > 1e-6  # and the two options really differ


def test_all_ignored_rows_and_one_token_responses():
    x = make_linear_head_inputs(4, 3, 5, 6, dtype=F64, seed=8, ignore_frac=0.0)
    labels = x.labels.clone()
    labels[1] = -100  # an all-ignored chosen row
    labels[2, 1:] = -100  # a one-token rejected response
    ref = x.hidden.detach() * 0.5
    loss, m = tpo_loss(x.weight, x.hidden, x.hidden * 1.1, labels, ref_hidden=ref, ref_hidden_noised=ref)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())
    assert x.hidden.grad[1].abs().sum() == 0  # no target: no gradient
    assert x.hidden.grad[2, 1:].abs().sum() == 0


def test_gradcheck_loss():
    x = make_linear_head_inputs(2, 3, 4, 5, dtype=F64, bias=True, seed=9, ignore_frac=0.2)
    hn = (x.hidden.detach() + 0.4 * torch.randn_like(x.hidden)).requires_grad_()
    ref = make_linear_head_inputs(2, 3, 4, 5, dtype=F64, seed=10, requires_grad=False)
    for a, rewards, fast in ((0.5, "both", False), (0.0, "only_win", True), (1.0, "opposite", True)):
        torch.autograd.gradcheck(
            lambda w, h, n, b: tpo_loss(w, h, n, x.labels, b, ref.hidden, ref.hidden * 0.8, ref.weight,
                                        a=a, rewards=rewards)[0],
            (x.weight, x.hidden, hn, x.bias),
            fast_mode=fast,
        )
    # reward_grad=False is a stop-gradient (not the derivative of the loss), so no gradcheck for it: its gradient is
    # checked against DPO with a constant offset in test_reward_grad_false_detaches_c.


def test_gradcheck_calibrated_reward_and_scores():
    s = torch.randn(2, 3, dtype=F64, requires_grad=True)
    rows = torch.tensor([True, False])
    for a in (0.0, 0.5):
        for rewards in ("both", "only_win", "only_loss", "opposite"):
            torch.autograd.gradcheck(lambda t: tpo_calibrated_reward(t, rows, a=a, rewards=rewards), (s,))
    z1, z2 = torch.randn(4, dtype=F64, requires_grad=True), torch.randn(4, dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(tpo_scores, (z1, z2))


# --- bad input --------------------------------------------------------------------------------------------------------


def _good():
    w, h, hn, y = _hand_batch()
    return dict(weight=w, hidden=h, hidden_noised=hn, labels=y, ref_hidden=torch.zeros_like(h),
                ref_hidden_noised=torch.zeros_like(h))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(hidden=torch.zeros(2, 3, dtype=F64)), "hidden must have 3 dimensions"),
        (dict(hidden=torch.zeros(3, 2, 3, dtype=F64)), "hidden has 3 rows"),
        (dict(hidden=torch.zeros(2, 0, 3, dtype=F64)), "hidden must not be empty"),
        (dict(hidden=torch.zeros(2, 2, 4, dtype=F64)), r"expected hidden.shape\[-1\] == weight.shape\[1\]"),
        (dict(hidden=torch.zeros(2, 2, 3)), "hidden has dtype float32 but weight has dtype float64"),
        (dict(weight=torch.eye(3, dtype=F64, device="meta")), "hidden is on cpu but weight is on meta"),
        (dict(weight=torch.ones(3, dtype=F64)), "weight must have 2 dimensions"),
        (dict(labels=torch.tensor([[0, 1, 2], [0, 1, 2]])), r"labels has shape \(2, 3\)"),
        (dict(labels=torch.tensor([[0, 3], [0, 1]])), r"labels contains 3: expected values in \[0, 3\)"),
        (dict(labels=torch.tensor([[0, -1], [0, 1]])), "labels contains -1"),
        (dict(labels=torch.tensor([[0.0, 1.0], [0.0, 1.0]])), "labels must have dtype"),
        (dict(hidden_noised=torch.zeros(2, 3, 3, dtype=F64)), "hidden_noised has shape"),
        (dict(hidden_noised=torch.zeros(2, 2, 3)), "hidden_noised has dtype"),
        (dict(bias=torch.zeros(4, dtype=F64)), r"bias has shape \(4,\)"),
        (dict(ref_hidden=None, ref_hidden_noised=None), "give exactly one of ref_hidden"),
        (dict(ref_logps=torch.zeros(2, dtype=F64)), "give exactly one of ref_hidden"),
        (dict(ref_hidden_noised=None), "ref_hidden and ref_hidden_noised go together"),
        (dict(ref_hidden=torch.zeros(2, 3, 3, dtype=F64)), "ref_hidden has shape"),
        (dict(ref_hidden_noised=torch.zeros(2, 3, 3, dtype=F64)), "ref_hidden_noised has shape"),
        (dict(ref_weight=torch.eye(4, dtype=F64)), "ref_weight has shape"),
        (dict(ref_weight=torch.eye(3)), "ref_hidden has dtype float64 but ref_weight has dtype float32"),
        (dict(ref_hidden=None, ref_hidden_noised=None, ref_logps=torch.zeros(3, dtype=F64)), "ref_logps has shape"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(a=-0.5), "a must be >= 0"),
        (dict(rewards="win"), "rewards must be one of"),
        (dict(reward_grad="yes"), "reward_grad must be a bool"),
    ],
)
def test_bad_input(change, match):
    kw = _good()
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        tpo_loss(**kw)


def test_bad_input_small_functions():
    with pytest.raises(ValueError, match="z_noised has shape"):
        tpo_scores(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="is_chosen_row has shape"):
        tpo_calibrated_reward(torch.zeros(2, 3), torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="is_chosen_row must have dtype"):
        tpo_calibrated_reward(torch.zeros(2, 3), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="rewards must be one of"):
        tpo_calibrated_reward(torch.zeros(2, 3), torch.tensor([True, False]), rewards="none")
    w, h, hn, y = _hand_batch()
    with pytest.raises(ValueError, match="hidden_noised has shape"):
        tpo_sequence_logps(w, h, hn[:, :1], y)
