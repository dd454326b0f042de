"""Loss heads of ``vpo.losses`` against hand-worked values (math.log / math.exp), identities between heads,
the listwise head at |S| ~ 1e4 against its exact closed form, float64 gradcheck, and argument validation."""
import doctest
import math

import pytest
import torch

from vpo import losses
from vpo.losses import (
    anchor_loss,
    bi_anchor_loss,
    dpo_loss,
    listwise_loss,
    mdpo_conditional_loss,
    ovip_base_image_loss,
    ovip_image_loss,
    ovip_symmetric_image_loss,
)

F64 = torch.float64


def t(*values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def nls(x: float) -> float:
    """-log σ(x), written out: log(1 + e^{-x})."""
    return math.log1p(math.exp(-x))


def close(value: torch.Tensor, expected: float, tol: float = 1e-12) -> None:
    assert value.dim() == 0
    assert abs(value.item() - expected) <= tol * max(1.0, abs(expected)), (value.item(), expected)


# --- hand-worked values ----------------------------------------------------------------------------------------------


def test_dpo_hand_worked():
    # Δw = -1 - (-1.5) = 0.5, Δl = -2 - (-1.5) = -0.5, β = 0.1: margin 0.1.
    loss, m = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1)
    close(loss, math.log(1 + math.exp(-0.1)))
    close(m["rewards/chosen"], 0.05)
    close(m["rewards/rejected"], -0.05)
    close(m["rewards/margins"], 0.1)
    close(m["rewards/accuracies"], 1.0)
    close(m["logps/chosen"], -1.0)
    close(m["logps/rejected"], -2.0)
    # Conservative DPO, ε = 0.2: -(0.8) log σ(0.1) - 0.2 log σ(-0.1).
    smoothed, _ = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1, label_smoothing=0.2)
    close(smoothed, 0.8 * math.log(1 + math.exp(-0.1)) + 0.2 * math.log(1 + math.exp(0.1)))
    # label_smoothing = 0 is plain DPO, bit for bit.
    plain, _ = dpo_loss(t(-1.0, 3.0), t(-2.0, 1.0), t(-1.5, 0.0), t(-1.5, 0.5), beta=0.3)
    zero, _ = dpo_loss(t(-1.0, 3.0), t(-2.0, 1.0), t(-1.5, 0.0), t(-1.5, 0.5), beta=0.3, label_smoothing=0.0)
    assert torch.equal(plain, zero)


def test_anchor_hand_worked():
    # β Δ = 0.5 * (-1 - (-3)) = 1 for pair 0; 0.5 * (-2 - (-1)) = -0.5 for pair 1.
    chosen, ref = t(-1.0, -2.0), t(-3.0, -1.0)
    loss, m = anchor_loss(chosen, ref, beta=0.5)
    close(loss, (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 2)
    close(m["anchor/loss"], loss.item())
    close(m["rewards/anchor"], 0.25)
    close(m["anchor/accuracy"], 0.5)
    # δ shifts the argument: -log σ(βΔ - δ).
    loss_d, m_d = anchor_loss(chosen, ref, beta=0.5, delta=0.75)
    close(loss_d, (math.log(1 + math.exp(-0.25)) + math.log(1 + math.exp(1.25))) / 2)
    close(m_d["anchor/accuracy"], 0.5)
    _, m_big = anchor_loss(chosen, ref, beta=0.5, delta=1.5)
    close(m_big["anchor/accuracy"], 0.0)
    # δ and a shift of the reference by δ/β are the same thing.
    shifted, _ = anchor_loss(chosen, ref + 0.75 / 0.5, beta=0.5)
    close(loss_d, shifted.item())


def test_ovip_image_hand_worked():
    # Δ(A+|I+) = -1 - (-2) = 1, Δ(A+|Q) = -4 - (-3) = -1, Δ(A+|I-) = -6 - (-3) = -3.
    # margin = 0.2 * (1 - (-1)) + 0.5 * (-1 - (-3)) = 0.4 + 1.0 = 1.4
    args = (t(-1.0), t(-4.0), t(-6.0), t(-2.0), t(-3.0), t(-3.0))
    loss, m = ovip_image_loss(*args, beta1=0.2, beta2=0.5)
    close(loss, math.log(1 + math.exp(-1.4)))
    close(m["image/margin"], 1.4)
    close(m["image/accuracy"], 1.0)
    close(m["image/loss"], loss.item())
    close(m["image/logps_img"], -1.0)
    close(m["image/logps_noimg"], -4.0)
    close(m["image/logps_negimg"], -6.0)
    # Swapping β1 and β2: 0.5 * 2 + 0.2 * 2 = 1.4 as well here; change the image-free pass to break the tie:
    # Δ(A+|Q) = -2 - (-3) = 1: margin = 0.2 * 0 + 0.5 * 4 = 2.0.
    loss2, m2 = ovip_image_loss(t(-1.0), t(-2.0), t(-6.0), t(-2.0), t(-3.0), t(-3.0), beta1=0.2, beta2=0.5)
    close(m2["image/margin"], 2.0)
    close(loss2, math.log(1 + math.exp(-2.0)))


def test_ovip_image_equal_betas_is_base_and_ignores_image_free_pass():
    g = torch.Generator().manual_seed(1)
    img, negimg, ref_img, ref_negimg = (torch.randn(5, generator=g, dtype=F64) for _ in range(4))
    base, mb = ovip_base_image_loss(img, negimg, ref_img, ref_negimg, beta=0.3)
    for _ in range(2):
        noimg, ref_noimg = torch.randn(5, generator=g, dtype=F64) * 10, torch.randn(5, generator=g, dtype=F64)
        full, mf = ovip_image_loss(img, noimg, negimg, ref_img, ref_noimg, ref_negimg, beta1=0.3, beta2=0.3)
        torch.testing.assert_close(full, base, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mf["image/margin"], mb["image/margin"], rtol=1e-12, atol=1e-12)
    # ... and with β1 != β2 the image-free pass matters.
    other, _ = ovip_image_loss(img, noimg, negimg, ref_img, ref_noimg, ref_negimg, beta1=0.3, beta2=0.1)
    assert abs(other.item() - base.item()) > 1e-3


def test_ovip_base_hand_worked():
    # Δ(A+|I+) = 1, Δ(A+|I-) = -1: margin = 0.1 * 2 = 0.2; minimizing must prefer I+ (the paper's sign typo fixed).
    loss, m = ovip_base_image_loss(t(-1.0), t(-5.0), t(-2.0), t(-4.0), beta=0.1)
    close(loss, math.log(1 + math.exp(-0.2)))
    close(m["image/margin"], 0.2)
    img = t(-1.0).requires_grad_()
    ovip_base_image_loss(img, t(-5.0), t(-2.0), t(-4.0))[0].backward()
    assert img.grad.item() < 0  # gradient descent raises logp(A+|I+)


def test_ovip_symmetric_hand_worked():
    z = t(0.0)
    # Chosen term: Δ(A+|I+) = 1, Δ(A+|Q) = 0, Δ(A+|I-) = -1 -> margin β1 * 1 + β2 * 1.
    # Rejected term (images swapped): Δ(A-|I-) = 2, Δ(A-|Q) = 1, Δ(A-|I+) = -3
    #   -> margin β1 * (2 - 1) + β2 * (1 - (-3)) = β1 + 4 β2.
    b1, b2 = 0.2, 0.3
    loss, m = ovip_symmetric_image_loss(
        t(1.0), t(0.0), t(-1.0),  # A+ given I+, Q, I-
        t(-3.0), t(1.0), t(2.0),  # A- given I+, Q, I-
        z, z, z, z, z, z,
        beta1=b1, beta2=b2,
    )  # fmt: skip
    close(m["image/margin"], b1 + b2)
    close(m["image/margin_rejected"], b1 + 4 * b2)
    close(loss, math.log(1 + math.exp(-(b1 + b2))) + math.log(1 + math.exp(-(b1 + 4 * b2))))
    close(m["image/accuracy"], 1.0)
    close(m["image/accuracy_rejected"], 1.0)


def test_ovip_symmetric_is_sum_of_two_image_losses():
    g = torch.Generator().manual_seed(2)
    x = [torch.randn(4, generator=g, dtype=F64) for _ in range(12)]
    sym, _ = ovip_symmetric_image_loss(*x, beta1=0.2, beta2=0.7)
    pos, _ = ovip_image_loss(x[0], x[1], x[2], x[6], x[7], x[8], beta1=0.2, beta2=0.7)
    # A-: its positive image is I- (x[5]), its negative image I+ (x[3]).
    neg, _ = ovip_image_loss(x[5], x[4], x[3], x[11], x[10], x[9], beta1=0.2, beta2=0.7)
    torch.testing.assert_close(sym, pos + neg, rtol=1e-12, atol=1e-12)


def test_bi_anchor_hand_worked():
    # β Δ(A+) = 0.5 * (0 - (-2)) = 1, β Δ(A-) = 0.5 * (-1 - 0) = -0.5.
    args = (t(0.0), t(-1.0), t(-2.0), t(0.0))
    paper, m = bi_anchor_loss(*args, beta=0.5)
    # -log σ(1) + log σ(-0.5)
    close(paper, math.log(1 + math.exp(-1.0)) - math.log(1 + math.exp(0.5)))
    bounded, _ = bi_anchor_loss(*args, beta=0.5, form="bounded")
    # -log σ(1) - log σ(0.5)
    close(bounded, math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-0.5)))
    close(m["rewards/anchor"], 1.0)
    close(m["rewards/anchor_rejected"], -0.5)
    close(m["bi_anchor/loss"], paper.item())
    # The chosen half of either form is the anchor loss.
    anchor, _ = anchor_loss(t(0.0), t(-2.0), beta=0.5)
    close(paper - (-math.log(1 + math.exp(0.5))), anchor.item())
    # Both forms push Δ(A-) down (positive gradient: descent lowers it); the paper's never saturates (→ β), the
    # bounded one does (→ 0).
    for form, far_limit in (("paper", 0.5), ("bounded", 0.0)):
        for rejected, expected_grad in ((1.0, None), (-200.0, far_limit)):
            rej = t(rejected).requires_grad_()
            bi_anchor_loss(t(0.0), rej, t(0.0), t(0.0), beta=0.5, form=form)[0].backward()
            if expected_grad is None:
                assert rej.grad.item() > 0.1
            else:
                assert abs(rej.grad.item() - expected_grad) < 1e-12


def test_mdpo_conditional_hand_worked():
    # β Δ(w|x) = 0.1 * 1, β Δ(w|x_crop) = 0.1 * (-1): margin 0.2.
    loss, m = mdpo_conditional_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.1)
    close(loss, math.log(1 + math.exp(-0.2)))
    close(m["conditional/margin"], 0.2)
    close(m["conditional/accuracy"], 1.0)
    close(m["rewards/corrupt"], -0.1)
    close(m["conditional/loss"], loss.item())
    loss2, m2 = mdpo_conditional_loss(t(-1.0, -5.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -2.0), beta=1.0)
    close(loss2, (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(4.0))) / 2)
    close(m2["conditional/accuracy"], 0.5)


def test_listwise_hand_worked():
    # β = 1, ref 0: S = [1, 0, -1].
    # L = -[(1 - log(e + 1 + 1/e)) + (0 - log(1 + 1/e)) + (-1 - (-1))]
    loss, m = listwise_loss(t(1.0, 0.0, -1.0).view(1, 3), torch.zeros(1, 3, dtype=F64), beta=1.0)
    expected = -((1 - math.log(math.e + 1 + 1 / math.e)) + (0 - math.log(1 + 1 / math.e)))
    close(loss, expected)
    close(m["listwise/loss"], expected)
    close(m["listwise/accuracy"], 1.0)
    close(m["listwise/rewards_first"], 1.0)
    close(m["listwise/rewards_last"], -1.0)
    # β scales the scores, the reference is subtracted: β (logp - ref) = 2 ([2, 1, 1.5] - [1.5, 1, 2]) = [1, 0, -1].
    loss_b, _ = listwise_loss(t(2.0, 1.0, 1.5).view(1, 3), t(1.5, 1.0, 2.0).view(1, 3), beta=2.0)
    close(loss_b, expected)
    # A wrongly ranked list: S = [0, 1, -1] -> accuracy 1/2, loss -[(0 - log(1 + e + 1/e)) + (1 - log(e + 1/e))].
    loss_w, m_w = listwise_loss(t(0.0, 1.0, -1.0).view(1, 3), torch.zeros(1, 3, dtype=F64), beta=1.0)
    close(loss_w, math.log(1 + math.e + 1 / math.e) - 1 + math.log(math.e + 1 / math.e))
    close(m_w["listwise/accuracy"], 0.5)


def test_listwise_two_images_is_pairwise():
    g = torch.Generator().manual_seed(3)
    logps, ref = torch.randn(6, 2, generator=g, dtype=F64) * 5, torch.randn(6, 2, generator=g, dtype=F64) * 5
    loss, _ = listwise_loss(logps, ref, beta=0.7)
    s = 0.7 * (logps - ref)
    expected = sum(nls((s[i, 0] - s[i, 1]).item()) for i in range(6)) / 6
    close(loss, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_listwise_huge_scores_exact_and_finite(dtype):
    # Gaps >= 2000 between scores: every suffix log-sum-exp is exactly its max (e^-2000 underflows to 0), so
    # L = Σ_k (max_{j>=k} S_j - S_k) and dL/dS_j = -1 + #{k <= j : j = argmax_{i>=k} S_i}  (the last column's 1 - 1).
    rows = [[3000.0, -10000.0, 9000.0, 1000.0, -5000.0], [10000.0, 8000.0, -2000.0, -4000.0, -10000.0]]
    s = torch.tensor(rows, dtype=dtype, requires_grad=True)
    loss, m = listwise_loss(s, torch.zeros_like(s), beta=1.0)
    expected, grads = [], []
    for row in rows:
        total, grad = 0.0, [-1.0] * len(row)
        for k in range(len(row)):
            best = max(range(k, len(row)), key=lambda j: row[j])
            total += row[best] - row[k]
            grad[best] += 1.0
        expected.append(total)
        grads.append([g / len(rows) for g in grad])
    assert expected == [(9000 - 3000) + (9000 + 10000) + 0 + 0 + 0, 0.0]
    close(loss, sum(expected) / 2, tol=0.0)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad.tolist() == grads
    close(m["listwise/accuracy"], (3 / 4 + 1) / 2, tol=0.0)  # row 0: only -1e4 > 9e3 fails


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_listwise_two_images_huge_gap(dtype):
    # L = 2: -log σ(S1 - S2) = log(1 + e^{-(S1 - S2)}); at a gap of 2e4 that is 0 one way and exactly 2e4 the other.
    s = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], dtype=dtype, requires_grad=True)
    loss, _ = listwise_loss(s, torch.zeros_like(s), beta=1.0)
    close(loss, (0.0 + 2e4) / 2, tol=0.0)
    loss.backward()
    assert s.grad.tolist() == [[0.0, 0.0], [-0.5, 0.5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_listwise_shift_invariant_at_1e4(dtype):
    # A list of moderate scores shifted by 2e4 (exactly representable in float32: the shift's ulp is 2^-9) has the
    # loss and gradient of the unshifted list, to the dtype's precision at O(1) — not at O(1e4), where a float32
    # log-sum-exp is only good to ~1e-3.
    base = [0.5, 1.25, -0.75, 0.0]
    suffix = [math.log(sum(math.exp(x) for x in base[k:])) for k in range(4)]
    expected = -sum(base[k] - suffix[k] for k in range(4))
    grad = [-1.0 + sum(math.exp(base[j] - suffix[k]) for k in range(j + 1)) for j in range(4)]
    tol = 1e-12 if dtype == F64 else 2e-6
    for shift in (2e4, -2e4):
        s = torch.tensor([[b + shift for b in base]], dtype=dtype, requires_grad=True)
        loss, _ = listwise_loss(s, torch.zeros_like(s), beta=1.0)
        assert abs(loss.item() - expected) <= tol
        loss.backward()
        assert max(abs(a - b) for a, b in zip(s.grad[0].tolist(), grad)) <= tol
    # Through β and the reference, in float64: S = 0.1 (10 (b + 1e4) + 1e5) = b + 2e4.
    logps = torch.tensor([[10 * (b + 1e4) for b in base]], dtype=F64, requires_grad=True)
    loss, _ = listwise_loss(logps, torch.full((1, 4), -1e5, dtype=F64), beta=0.1)
    assert abs(loss.item() - expected) <= 1e-10
    loss.backward()
    assert max(abs(a - 0.1 * b) for a, b in zip(logps.grad[0].tolist(), grad)) <= 1e-10


# --- metrics are detached 0-dim tensors ------------------------------------------------------------------------------


def _all_heads(requires_grad=False):
    g = torch.Generator().manual_seed(4)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).requires_grad_(requires_grad)

    return {
        "anchor": (anchor_loss, [r(3), r(3)], dict(beta=0.2, delta=0.1)),
        "bi_anchor": (bi_anchor_loss, [r(3) for _ in range(4)], dict(beta=0.2)),
        "bi_anchor_bounded": (bi_anchor_loss, [r(3) for _ in range(4)], dict(beta=0.2, form="bounded")),
        "ovip_image": (ovip_image_loss, [r(3) for _ in range(6)], dict(beta1=0.2, beta2=0.4)),
        "ovip_base": (ovip_base_image_loss, [r(3) for _ in range(4)], dict(beta=0.2)),
        "ovip_symmetric": (ovip_symmetric_image_loss, [r(3) for _ in range(12)], dict(beta1=0.2, beta2=0.4)),
        "listwise": (listwise_loss, [r(3, 4), r(3, 4)], dict(beta=0.5)),
        "mdpo_conditional": (mdpo_conditional_loss, [r(3) for _ in range(4)], dict(beta=0.2)),
        "dpo": (dpo_loss, [r(3) for _ in range(4)], dict(beta=0.2, label_smoothing=0.1)),
    }


@pytest.mark.parametrize("name", list(_all_heads()))
def test_metrics_detached_scalars(name):
    fn, args, kw = _all_heads(requires_grad=True)[name]
    loss, metrics = fn(*args, **kw)
    assert loss.dim() == 0 and loss.requires_grad
    assert metrics
    for key, value in metrics.items():
        assert "/" in key
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, key
        assert torch.isfinite(value), key


@pytest.mark.parametrize("name", list(_all_heads()))
def test_gradcheck(name):
    fn, args, kw = _all_heads(requires_grad=True)[name]
    assert torch.autograd.gradcheck(lambda *a: fn(*a, **kw)[0], args)


# --- argument validation ---------------------------------------------------------------------------------------------

_SEQ_HEADS = {
    "anchor_loss": (anchor_loss, ["chosen_logps", "ref_chosen_logps"]),
    "bi_anchor_loss": (bi_anchor_loss, ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]),
    "ovip_image_loss": (
        ovip_image_loss,
        ["logps_img", "logps_noimg", "logps_negimg", "ref_logps_img", "ref_logps_noimg", "ref_logps_negimg"],
    ),
    "ovip_base_image_loss": (ovip_base_image_loss, ["logps_img", "logps_negimg", "ref_logps_img", "ref_logps_negimg"]),
    "ovip_symmetric_image_loss": (
        ovip_symmetric_image_loss,
        [
            f"{ref}{side}_logps_{p}"
            for ref in ("", "ref_")
            for side in ("chosen", "rejected")
            for p in ("img", "noimg", "negimg")
        ],
    ),
    "mdpo_conditional_loss": (
        mdpo_conditional_loss,
        ["chosen_logps", "corrupt_logps", "ref_chosen_logps", "ref_corrupt_logps"],
    ),
}
_BETAS = {
    "anchor_loss": ["beta"],
    "bi_anchor_loss": ["beta"],
    "ovip_image_loss": ["beta1", "beta2"],
    "ovip_base_image_loss": ["beta"],
    "ovip_symmetric_image_loss": ["beta1", "beta2"],
    "mdpo_conditional_loss": ["beta"],
}


def _good(n):
    return [torch.zeros(3) for _ in range(n)]


@pytest.mark.parametrize("head", list(_SEQ_HEADS))
def test_seq_heads_reject_bad_tensors(head):
    fn, names = _SEQ_HEADS[head]
    fn(*_good(len(names)))  # the good call works
    for i, name in enumerate(names):
        cases = [
            (torch.zeros(3, 1), rf"{name} must have 1 dimensions"),  # wrong rank
            # mismatched shape / dtype / device: the first argument is the one the others are compared with
            (torch.zeros(4), rf"{name} has shape \(4,\) but" if i else rf"\(3,\) but {name} has shape \(4,\)"),
            (torch.zeros(3, dtype=F64), rf"{name} has dtype float64 but" if i else rf"but {name} has dtype float64"),
            (torch.zeros(3, dtype=torch.long), rf"{name} must have dtype in"),
            (torch.zeros(3, device="meta"), rf"{name} is on meta" if i else rf"is on cpu but {name} is on meta"),
            ([0.0, 0.0, 0.0], rf"{name} must be a torch.Tensor"),
        ]
        for bad, pattern in cases:
            args = _good(len(names))
            args[i] = bad
            with pytest.raises(ValueError, match=pattern):
                fn(*args)
    # Empty batch: every tensor empty.
    with pytest.raises(ValueError, match=rf"{names[0]} must not be empty"):
        fn(*[torch.zeros(0) for _ in names])


@pytest.mark.parametrize("head", list(_SEQ_HEADS))
@pytest.mark.parametrize("value", [0.0, -0.1, float("nan"), "0.1"])
def test_seq_heads_reject_bad_beta(head, value):
    fn, names = _SEQ_HEADS[head]
    for beta in _BETAS[head]:
        with pytest.raises(ValueError, match=rf"{beta} must be"):
            fn(*_good(len(names)), **{beta: value})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), None])
def test_anchor_rejects_bad_delta(value):
    with pytest.raises(ValueError, match="delta must be"):
        anchor_loss(torch.zeros(2), torch.zeros(2), delta=value)


def test_bi_anchor_rejects_unknown_form():
    with pytest.raises(ValueError, match=r"form must be one of \['paper', 'bounded'\], got 'unbounded'"):
        bi_anchor_loss(*_good(4), form="unbounded")


def test_listwise_rejects_bad_input():
    good = torch.zeros(2, 3)
    listwise_loss(good, good)
    with pytest.raises(ValueError, match=r"list_logps must have 2 dimensions"):
        listwise_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"ref_list_logps must have 2 dimensions"):
        listwise_loss(good, torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match=r"ref_list_logps has shape \(2, 4\) but list_logps has shape \(2, 3\)"):
        listwise_loss(good, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"ref_list_logps has dtype float64 but list_logps has dtype float32"):
        listwise_loss(good, torch.zeros(2, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"ref_list_logps is on meta but list_logps is on cpu"):
        listwise_loss(good, torch.zeros(2, 3, device="meta"))
    with pytest.raises(ValueError, match=r"list_logps must have dtype in"):
        listwise_loss(good.long(), good.long())
    with pytest.raises(ValueError, match=r"list_logps has shape \(2, 1\): expected \[B, L\] with a list of L >= 2"):
        listwise_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"list_logps must not be empty"):
        listwise_loss(torch.zeros(0, 3), torch.zeros(0, 3))
    for beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"beta must be > 0"):
            listwise_loss(good, good, beta=beta)


def test_docstring_examples():
    from vpo.losses import heads, image_heads, loss_types

    for module, least in ((heads, 8), (image_heads, 3), (loss_types, 2)):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted >= least and result.failed == 0, module.__name__


# --- DPO loss types (TRL's names) on per-sequence terms ----------------------------------------------------------------

from vpo.losses import (LOSS_TYPES, SMOOTHED_LOSS_TYPES, f_divergence_scores, ld_dpo_logps,  # noqa: E402
                        preference_loss, preference_pair_losses, wpo_weights)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# One pair: chosen -1, rejected -2, references -1.5 / -1.5 -> Δw = 0.5, Δl = -0.5, d = 1; n_w = 2, n_l = 4 tokens,
# so the per-token difference is 0.5/2 - (-0.5)/4 = 0.375. β = 0.5, ε = 0.2.
_HAND = {
    "sigmoid": 0.8 * nls(0.5) + 0.2 * nls(-0.5),
    "robust": (0.8 * nls(0.5) - 0.2 * nls(-0.5)) / 0.6,
    "hinge": 1 - 0.5,
    "ipo": (0.375 - 1 / (2 * 0.5)) ** 2,
    "apo_zero": (1 - _sig(0.25)) + _sig(-0.25),
    "sigmoid_norm": nls(0.5 * 0.375),
    "sft": 1.0 / 2,  # NLL 1 over 2 chosen tokens
    # q = σ(βd) = σ(0.5) against the smoothed label (1 - ε, ε)
    "exo_pair": _sig(0.5) * math.log(_sig(0.5) / 0.8) + _sig(-0.5) * math.log(_sig(-0.5) / 0.2),
    "nca_pair": nls(0.25) + 0.5 * nls(-0.25) + 0.5 * nls(0.25),
    "bco_pair": nls(0.25) + nls(0.25),
    "sppo_hard": (0.5 - 1.0) ** 2 + (-0.5 + 1.0) ** 2,
    # one pair: the sorted differences are the pair's own, 1 - 0 (aot) and 0.5 - (-0.5) (aot_unpaired)
    "aot": 0.8 * nls(0.5) + 0.2 * nls(-0.5),
    "aot_unpaired": 0.8 * nls(0.5) + 0.2 * nls(-0.5),
    "apo_down": _sig(0.25) + (1 - _sig(0.5)),
    # x = 0.5, m = σ(x / 0.05) = σ(10)
    "discopop": nls(0.5) * (1 - _sig(10.0)) + math.exp(-0.5) * _sig(10.0),
}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_types_hand_worked(loss_type):
    kw = dict(beta=0.5, label_smoothing=0.2 if loss_type in SMOOTHED_LOSS_TYPES else 0.0, loss_type=loss_type,
              chosen_tokens=t(2), rejected_tokens=t(4))
    loss, m = preference_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), **kw)
    close(loss, _HAND[loss_type])
    close(m["rewards/margins"], 0.5)


def test_loss_types_sigmoid_is_dpo_and_weighted_sum():
    args = (t(-1.0, 3.0), t(-2.0, 1.0), t(-1.5, 0.0), t(-1.5, 0.5))
    dpo, _ = dpo_loss(*args, beta=0.3, label_smoothing=0.1)
    sig, _ = preference_loss(*args, beta=0.3, label_smoothing=0.1)
    torch.testing.assert_close(sig, dpo, rtol=0, atol=1e-15)
    n = dict(chosen_tokens=t(2, 5), rejected_tokens=t(4, 1))
    mix = preference_pair_losses(*args, beta=0.3, loss_type=["hinge", "ipo"], loss_weights=[2.0, 0.5], **n)
    hinge = preference_pair_losses(*args, beta=0.3, loss_type="hinge")
    ipo = preference_pair_losses(*args, beta=0.3, loss_type="ipo", **n)
    torch.testing.assert_close(mix, 2 * hinge + 0.5 * ipo)


def test_sft_is_the_token_mean_over_the_batch():
    # chosen NLLs 1 and 5 over 2 and 3 tokens: the batch token mean (1 + 5) / 5, as TRL's cross-entropy
    loss, _ = preference_loss(t(-1.0, -5.0), t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), loss_type="sft",
                              chosen_tokens=t(2, 3), rejected_tokens=t(1, 1))
    close(loss, 6 / 5)
    # as a slice of a larger batch: the mean token count is passed in
    per = preference_pair_losses(t(-1.0), t(0.0), t(0.0), t(0.0), loss_type="sft", chosen_tokens=t(2),
                                 rejected_tokens=t(1), mean_chosen_tokens=torch.tensor(2.5, dtype=F64))
    close(per[0], 1 / 2.5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_types_gradcheck(loss_type):
    g = torch.Generator().manual_seed(5)
    args = [torch.randn(3, generator=g, dtype=F64, requires_grad=True) for _ in range(4)]
    n = dict(chosen_tokens=t(2, 3, 1), rejected_tokens=t(4, 1, 2))
    assert torch.autograd.gradcheck(
        lambda *a: preference_pair_losses(*a, beta=0.4, label_smoothing=0.1, loss_type=loss_type, **n), args)


def test_loss_types_bad_arguments():
    args = (t(-1.0), t(-2.0), t(-1.5), t(-1.5))
    with pytest.raises(ValueError, match=r"loss_type must be one of \['sigmoid', 'robust', 'hinge', 'ipo', "
                                         r"'apo_zero', 'sigmoid_norm', 'sft', 'exo_pair', .*'discopop'\], got 'kto'"):
        preference_pair_losses(*args, loss_type="kto")
    with pytest.raises(ValueError, match="loss_type must be a str or a non-empty list"):
        preference_pair_losses(*args, loss_type=[])
    with pytest.raises(ValueError, match=r"loss_weights must be a list of 2 floats"):
        preference_pair_losses(*args, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"loss_weights must be in"):
        preference_pair_losses(*args, loss_type=["sigmoid"], loss_weights=[float("nan")])
    with pytest.raises(ValueError, match=r"needs chosen_tokens and rejected_tokens"):
        preference_pair_losses(*args, loss_type="ipo")


def test_trl_loss_options_bad_arguments():
    args = (t(-1.0, 0.0), t(-2.0, 1.0), t(-1.5, 0.0), t(-1.5, 0.0))
    with pytest.raises(ValueError, match=r"'exo_pair' needs label_smoothing > 0"):
        preference_pair_losses(*args, loss_type="exo_pair")
    with pytest.raises(ValueError, match=r"discopop_tau must be > 0, got 0"):
        preference_pair_losses(*args, loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match=r"f_divergence_type='forward_kl' applies only to .* \['nca_pair'\]"):
        preference_pair_losses(*args, loss_type=["sigmoid", "nca_pair"], f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match=r"f_divergence_type must be one of \['reverse_kl'"):
        preference_pair_losses(*args, f_divergence_type="kl")
    with pytest.raises(ValueError, match=r"sorts over the whole batch: it needs all 4 pairs in one call, got 2"):
        preference_pair_losses(*args, loss_type="aot", n_pairs=4)
    with pytest.raises(ValueError, match=r"pair_weights .* cannot weight loss_type \['aot_unpaired'\]"):
        preference_pair_losses(*args, loss_type="aot_unpaired", pair_weights=t(1.0, 1.0))
    with pytest.raises(ValueError, match=r"ld_alpha must be in \[0.0, 1.0\], got 1.5"):
        ld_dpo_logps(torch.zeros(2, 3, dtype=F64), torch.ones(2, 3, dtype=torch.bool), 1.5)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 2\) but logp has shape \(2, 3\)"):
        wpo_weights(torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64), torch.ones(2, 2, dtype=torch.bool))


def test_aot_sorts_over_the_batch():
    # policy log-ratios chosen - rejected: 3, -1; reference: 0, 2 -> sorted (-1, 3) - (0, 2) = (-1, 1)
    per = preference_pair_losses(t(1.0, 0.0), t(-2.0, 1.0), t(0.0, 1.0), t(0.0, -1.0), beta=1.0, loss_type="aot")
    close(per.mean(), (nls(-1.0) + nls(1.0)) / 2)
    # unpaired: Δ_w = (1, -1), Δ_l = (-2, 2) -> sorted (-1, 1) - (-2, 2) = (1, -1)
    per = preference_pair_losses(t(1.0, 0.0), t(-2.0, 1.0), t(0.0, 1.0), t(0.0, -1.0), beta=1.0,
                                 loss_type="aot_unpaired")
    close(per.mean(), (nls(1.0) + nls(-1.0)) / 2)


def test_f_divergence_scores_and_bco_delta_hand_worked():
    x = t(0.5)
    close(f_divergence_scores(x, "forward_kl")[0], 1 - math.exp(-0.5))
    close(f_divergence_scores(x, "js_divergence")[0], math.log(2) - nls(0.5))
    close(f_divergence_scores(x, "alpha_divergence", 0.25)[0], (math.exp(-0.75 * 0.5) - 1) / -0.75)
    close(f_divergence_scores(x, "alpha_divergence", 1.0)[0], 0.5)
    # forward_kl on sigmoid: d = (1 - e^-0.5) - (1 - e^0.5)
    d = math.exp(0.5) - math.exp(-0.5)
    close(preference_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5, f_divergence_type="forward_kl")[0],
          nls(0.5 * d))
    close(preference_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5, loss_type="bco_pair",
                          bco_delta=torch.tensor(0.1, dtype=F64))[0], nls(0.25 - 0.1) + nls(0.25 + 0.1))


def test_wpo_weights_and_ld_dpo_hand_worked():
    # row 0: two tokens, logp = log 0.5 each, Σp² = 0.5 -> weight exp(0) = 1; row 1: one token p = 0.25 of
    # Σp² = 0.5 -> exp(log 0.5) = 0.5; the ignored token's value does not count
    lp = torch.log(t(0.5, 0.5)).expand(2, 2).clone()
    lp[1, 0] = math.log(0.25)
    lp[1, 1] = 123.0
    w = wpo_weights(lp, torch.log(torch.full((2, 2), 0.5, dtype=F64)), torch.tensor([[1, 1], [1, 0]]) > 0)
    torch.testing.assert_close(w, t(1.0, 0.5))
    per = preference_pair_losses(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5, pair_weights=w[:1] * w[1:])
    close(per[0], 0.5 * nls(0.5))
    # LD-DPO: chosen has 3 scored tokens, rejected 1 (shared length 1): chosen = -1 + 0.25 * (-2 - 3)
    lp = t(-1.0, -2.0, -3.0, -4.0, -5.0, -6.0).reshape(2, 3)
    mask = torch.tensor([[1, 1, 1], [0, 1, 0]]) > 0
    torch.testing.assert_close(ld_dpo_logps(lp, mask, 0.25), t(-1.0 - 0.25 * 5.0, -5.0))
    torch.testing.assert_close(ld_dpo_logps(lp, mask, None), t(-6.0, -5.0))
