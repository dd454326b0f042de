"""Cat-PO token scores and weights (vpo.catpo) against hand-worked values and the formulas' own invariances."""
import math

import pytest
import torch

from vpo.catpo import catpo_token_scores, catpo_token_weights

F64 = torch.float64


def _t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def test_hand_worked_two_patches():
    # one token, N_p = 2, D = 2: a = [0.3, 0.1], e = [1, 0], u_1 = [1, 0], u_2 = [0, 1]
    a, e, u = _t([[0.3, 0.1]]), _t([[1.0, 0.0]]), _t([[1.0, 0.0], [0.0, 1.0]])
    s_global = 0.4
    p = [0.75, 0.25]
    h = -sum(q * math.log(q + 1e-12) for q in p)
    s_local = 1 - h / math.log(2)  # 0.18872...
    s_sem = 0.75 / math.sqrt(0.75**2 + 0.25**2)  # cos([1, 0], [0.75, 0.25]) = 0.94868...
    s = 0.5 * (0.5 * s_global + 0.5 * s_local) + 0.5 * s_sem
    sc = catpo_token_scores(a, e, u)
    assert sc.s_global.item() == pytest.approx(s_global, rel=1e-12)
    assert sc.s_local.item() == pytest.approx(s_local, rel=1e-9)
    assert sc.s_sem.item() == pytest.approx(s_sem, rel=1e-12)
    assert sc.s.item() == pytest.approx(s, rel=1e-9)
    assert sc.t.item() == pytest.approx(math.tanh(s), rel=1e-9)

    w = catpo_token_weights(a.expand(2, 2), e.expand(2, 2), u, _t([True, False], torch.bool), lambda_ref=0.3)
    assert w.tolist() == pytest.approx([0.3 + math.tanh(s), 0.3 + 1 - math.tanh(s)], rel=1e-9)


def test_hand_worked_alpha_extremes():
    a, e, u = _t([[0.3, 0.1]]), _t([[0.0, 2.0]]), _t([[1.0, 0.0], [0.0, 1.0]])
    s_sem = 0.25 / math.sqrt(0.75**2 + 0.25**2)
    p = [0.75, 0.25]
    s_local = 1 + sum(q * math.log(q + 1e-12) for q in p) / math.log(2)
    assert catpo_token_scores(a, e, u, alpha=0.0).s.item() == pytest.approx(s_sem, rel=1e-12)
    assert catpo_token_scores(a, e, u, alpha=1.0).s.item() == pytest.approx(0.5 * 0.4 + 0.5 * s_local, rel=1e-9)


def test_uniform_attention_gives_zero_local_and_one_hot_gives_one():
    n_p = 5
    a = torch.cat([torch.full((1, n_p), 0.1, dtype=F64), _t([[0.0, 0.0, 0.7, 0.0, 0.0]])])  # [2, 5]
    e, u = torch.randn(2, 3, dtype=F64), torch.randn(n_p, 3, dtype=F64)
    sc = catpo_token_scores(a, e, u)
    assert sc.s_local[0].item() == pytest.approx(0.0, abs=1e-9)
    assert sc.s_local[1].item() == pytest.approx(1.0, abs=1e-9)
    assert sc.s_global.tolist() == pytest.approx([0.5, 0.7], rel=1e-12)
    # one-hot: the attended visual vector is u_3 itself
    cos = torch.nn.functional.cosine_similarity(e[1], u[2], dim=0).item()
    assert sc.s_sem[1].item() == pytest.approx(cos, rel=1e-9)
    # uniform: the attended visual vector is the mean of u
    cos_mean = torch.nn.functional.cosine_similarity(e[0], u.mean(0), dim=0).item()
    assert sc.s_sem[0].item() == pytest.approx(cos_mean, rel=1e-9)


def test_single_image_token():
    # N_p = 1: S_local := 1 (documented), S_sem = cos(e, u_1)
    a, e, u = _t([[0.4], [0.9]]), _t([[1.0, 1.0], [1.0, 0.0]]), _t([[1.0, 0.0]])
    sc = catpo_token_scores(a, e, u)
    assert sc.s_local.tolist() == [1.0, 1.0]
    assert sc.s_sem.tolist() == pytest.approx([1 / math.sqrt(2), 1.0], rel=1e-12)
    assert sc.s_global.tolist() == pytest.approx([0.4, 0.9])
    assert torch.isfinite(sc.s).all()


def test_zero_attention_rows_are_finite_with_documented_values():
    a = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    e = torch.randn(2, 4, dtype=F64, requires_grad=True)
    u = torch.randn(3, 4, dtype=F64, requires_grad=True)
    sc = catpo_token_scores(a, e, u)
    assert sc.s_global.tolist() == [0.0, 0.0]
    assert sc.s_local.tolist() == [0.0, 0.0]
    assert sc.s_sem.tolist() == [0.0, 0.0]
    w = catpo_token_weights(a, e, u, _t([True, False], torch.bool), lambda_ref=0.5)
    assert w.tolist() == [0.5, 1.5]  # λ + tanh(0), λ + 1 - tanh(0)
    w.sum().backward()
    for x in (a, e, u):
        assert torch.isfinite(x.grad).all()
    # also with N_p = 1
    sc1 = catpo_token_scores(torch.zeros(1, 1, dtype=F64), torch.randn(1, 4, dtype=F64), torch.randn(1, 4, dtype=F64))
    assert sc1.s_local.item() == 0.0 and sc1.s_sem.item() == 0.0


def test_zero_token_embedding_gives_zero_similarity():
    sc = catpo_token_scores(_t([[0.5, 0.5]]), torch.zeros(1, 3, dtype=F64), torch.randn(2, 3, dtype=F64))
    assert sc.s_sem.item() == 0.0


def test_scale_invariances():
    # S_local and S_sem depend on P = a / Σa only; S_global scales with a; S_sem ignores the norms of e and u.
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 6, generator=g, dtype=F64)
    e, u = torch.randn(4, 5, generator=g, dtype=F64), torch.randn(6, 5, generator=g, dtype=F64)
    base, scaled = catpo_token_scores(a, e, u), catpo_token_scores(3 * a, 2 * e, 7 * u)
    torch.testing.assert_close(scaled.s_local, base.s_local)
    torch.testing.assert_close(scaled.s_sem, base.s_sem)
    torch.testing.assert_close(scaled.s_global, 3 * base.s_global)


def test_chosen_and_rejected_weights_sum_to_constant():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(5, 4, generator=g, dtype=F64)
    e, u = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    wc = catpo_token_weights(a, e, u, True, lambda_ref=0.25)
    wr = catpo_token_weights(a, e, u, False, lambda_ref=0.25)
    torch.testing.assert_close(wc + wr, torch.full((5,), 1.5, dtype=F64))
    # chosen weights grow with the score
    sc = catpo_token_scores(a, e, u)
    order = sc.s.argsort()
    assert bool((wc[order][1:] >= wc[order][:-1]).all())


def test_batched_equals_per_example():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(3, 4, 6, generator=g, dtype=F64)  # [B, N, N_p]
    e = torch.randn(3, 4, 5, generator=g, dtype=F64)
    u = torch.randn(3, 6, 5, generator=g, dtype=F64)
    chosen = torch.rand(3, 4, generator=g) < 0.5
    w = catpo_token_weights(a, e, u, chosen)
    for b in range(3):
        torch.testing.assert_close(w[b], catpo_token_weights(a[b], e[b], u[b], chosen[b]))


def test_half_inputs_are_upcast():
    a = torch.rand(3, 4).to(torch.bfloat16)
    w = catpo_token_weights(a, torch.randn(3, 2).to(torch.bfloat16), torch.randn(4, 2).to(torch.bfloat16), True)
    assert w.dtype == torch.float32 and torch.isfinite(w).all()


def test_gradcheck_scores_and_weights():
    g = torch.Generator().manual_seed(3)
    a = (torch.rand(3, 4, generator=g, dtype=F64) + 0.05).requires_grad_()
    e = torch.randn(3, 2, generator=g, dtype=F64, requires_grad=True)
    u = torch.randn(4, 2, generator=g, dtype=F64, requires_grad=True)
    chosen = torch.tensor([True, False, True])
    torch.autograd.gradcheck(lambda *x: catpo_token_weights(*x, chosen, alpha=0.3, lambda_ref=0.7), (a, e, u))

    def all_scores(*x):
        sc = catpo_token_scores(*x, alpha=0.6)
        return sc.s_global, sc.s_local, sc.s_sem, sc.s, sc.t

    torch.autograd.gradcheck(all_scores, (a, e, u))


def _args():
    return [torch.rand(3, 4), torch.randn(3, 2), torch.randn(4, 2), torch.tensor([True, False, True])]


@pytest.mark.parametrize(
    "index, value, match",
    [
        (0, torch.rand(4), r"image_attn must have shape \[..., N, N_p\]"),
        (0, torch.ones(3, 4, dtype=torch.int64), "image_attn must have dtype"),
        (0, torch.rand(0, 4), "image_attn must not be empty"),
        (1, torch.randn(2, 2), "token_embeds has shape"),
        (1, torch.randn(1, 3, 2), "token_embeds has shape"),
        (2, torch.randn(5, 2), "image_feats has shape"),
        (2, torch.randn(4, 3), "image_feats has shape"),
        (2, torch.randn(4, 2, device="meta"), "image_feats is on meta but image_attn is on cpu"),
        (3, torch.tensor([True, False]), "is_chosen has shape"),
        (3, torch.tensor([1, 0, 1]), "is_chosen must have dtype"),
    ],
)
def test_bad_input(index, value, match):
    args = _args()
    args[index] = value
    with pytest.raises(ValueError, match=match):
        catpo_token_weights(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=1.5), r"alpha must be in \[0.0, 1.0\]"),
        (dict(alpha=-0.1), "alpha must be in"),
        (dict(lambda_ref=0.0), "lambda_ref must be > 0"),
        (dict(lambda_ref="0.5"), "lambda_ref must be a number"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        catpo_token_weights(*_args(), **kwargs)
