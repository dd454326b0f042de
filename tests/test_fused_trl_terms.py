"""TRL's per-token options on the fused path: WPO (``use_weighting``, its ``log Σ_v p_v²`` from the vocabulary sweep),
LD-DPO (``ld_alpha``), and TRL's token metrics (``logits/*``, ``mean_token_accuracy``, ``entropy``) from the statistics
pass — against the oracle (``vpo.oracle.dpo_loss``, which materializes the logits), on several chunkings."""
import pytest
import torch
import torch.nn.functional as F

import vpo
from vpo.fused import Chunking
from vpo.losses import log_sum_p2_from_logits, wpo_weights
from vpo.oracle.dpo import trl_token_metrics
from vpo.oracle.logprobs import head_logits, token_logprobs
from vpo.testing import make_linear_head_inputs

F64 = torch.float64
CHUNKINGS = [None, Chunking(pairs=1, vocab=40), Chunking(pairs=2, vocab=64, store=False, compact=False)]
IDS = ["default", "tiled", "recompute-all-rows"]


def _x(seed=0):
    x = make_linear_head_inputs(6, 7, 12, 130, dtype=F64, bias=True, seed=seed, prompt_len=2)
    x.labels[1, -2:] = -100  # rows of different lengths (LD-DPO's shared length matters)
    x.labels[4, -4:] = -100
    return x, x.hidden.detach() * 0.8 + 0.05


@pytest.mark.parametrize("kw", [dict(use_weighting=True), dict(ld_alpha=0.3), dict(use_weighting=True, ld_alpha=0.0),
                                dict(use_weighting=True, logit_softcap=2.5)], ids=["wpo", "ld", "both", "wpo-cap"])
@pytest.mark.parametrize("chunking", CHUNKINGS, ids=IDS)
def test_fused_dpo_trl_terms_match_the_oracle(kw, chunking):
    x, rh = _x()
    loss, out = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_hidden=rh, chunking=chunking, **kw)
    loss.backward()
    got = (loss.detach(), x.hidden.grad.clone(), x.weight.grad.clone())
    for t in (x.hidden, x.weight, x.bias):
        t.grad = None
    ref, m = vpo.oracle.dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_hidden=rh, **kw)
    ref.backward()
    for a, b in zip(got, (ref.detach(), x.hidden.grad, x.weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    plain, _ = vpo.oracle.dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_hidden=rh,
                                   logit_softcap=kw.get("logit_softcap"))
    assert abs(plain.item() - ref.item()) > 1e-6  # the option changes the loss: the comparison can fail


def _expected_wpo(x, out, kw):
    """The sigmoid loss on the output's margins, weighted by WPO's pair weights from materialized logits."""
    with torch.no_grad():
        logits = head_logits(x.hidden, x.weight, x.bias)
        logp = token_logprobs(x.hidden, x.weight, x.labels, x.bias)[0]
        mask = x.labels != -100
        w = wpo_weights(logp, log_sum_p2_from_logits(logits), mask)
        B = x.hidden.shape[0] // 2
        return (-F.logsigmoid(out.margins) * w[:B] * w[B:]).mean()


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=IDS)
def test_fused_tpo_and_catpo_wpo_weights(chunking):
    x, rh = _x(seed=2)
    hn = x.hidden.detach() + 0.1
    loss, out = vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, ref_hidden=rh, ref_hidden_noised=rh + 0.1,
                                   use_weighting=True, chunking=chunking)
    torch.testing.assert_close(loss.detach(), _expected_wpo(x, out, {}), rtol=1e-9, atol=1e-12)
    w = torch.rand(x.labels.shape, dtype=F64, generator=torch.Generator().manual_seed(1)) + 0.5
    loss, out = vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w, x.bias, ref_hidden=rh, kl_coef=0.0,
                                     use_weighting=True, chunking=chunking)
    torch.testing.assert_close(loss.detach(), _expected_wpo(x, out, {}), rtol=1e-9, atol=1e-12)
    loss.backward()
    assert torch.isfinite(x.hidden.grad).all()


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=IDS)
def test_trl_token_metrics_from_the_statistics_pass(chunking):
    x, rh = _x(seed=3)
    with torch.no_grad():  # every other scored target is the argmax: a mix of hits and misses
        top = head_logits(x.hidden, x.weight, x.bias).argmax(-1)
        pick = (x.labels != -100) & (torch.arange(x.labels.shape[1]) % 2 == 0)
        x.labels[pick] = top[pick]
    _, out = vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_hidden=rh, chunking=chunking)
    logits = head_logits(x.hidden.detach(), x.weight.detach(), x.bias.detach())
    want = trl_token_metrics(logits, x.labels, x.hidden.shape[0] // 2)
    assert set(want) <= set(out.metrics)
    for k, v in want.items():
        torch.testing.assert_close(out.metrics[k].to(F64), v.to(F64), rtol=1e-9, atol=1e-12, msg=k)
    assert 0 < out.metrics["mean_token_accuracy"] < 1  # a real mix of hits and misses at these inputs


@pytest.mark.parametrize("bad", [dict(use_weighting=1), dict(ld_alpha=1.5), dict(ld_alpha=-0.1)])
def test_bad_trl_terms_are_value_errors(bad):
    x, rh = _x()
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_hidden=rh, **bad)
