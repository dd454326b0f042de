"""TRL's 15 DPO loss types, f-divergences, WPO and LD-DPO: vpo's oracle (vpo.oracle.dpo_loss) against TRL's own
``DPOTrainer._compute_loss`` (loss, every gradient, the metrics), run on a stand-in model that returns exactly what
TRL's fused LM head returns, computed from materialized logits. Skipped when TRL is not installed; the formulas
themselves are checked by hand in tests/test_losses.py."""
import math
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", exc_type=ImportError)

import vpo  # noqa: E402
from vpo.losses import LOSS_TYPES  # noqa: E402

F64 = torch.float64
B, L, D, V = 3, 9, 5, 11  # odd sizes; the prompt is 3 tokens, responses 1-6 tokens


class _Outputs(SimpleNamespace):
    pass


class _StandIn(torch.nn.Module):
    """A "model" whose last hidden states are a tensor: ``forward(input_ids, labels, fused_lm_head=True)`` returns
    TRL's fused-head outputs (per-token log-probs, entropy, mean logit, is-top-1, log Σ p²) for ``labels[:, 1:]``."""

    is_gradient_checkpointing = False

    def __init__(self, hidden, weight):
        super().__init__()
        self.hidden, self.weight = hidden, weight

    def forward(self, input_ids=None, labels=None, fused_lm_head=True, **_):
        logits = self.hidden[:, :-1] @ self.weight.T  # [2B, L-1, V]
        y = labels[:, 1:]
        mask = y != -100
        safe = torch.where(mask, y, torch.zeros_like(y))
        logp_all = torch.log_softmax(logits, -1)
        zero = torch.zeros((), dtype=logits.dtype)
        logp = torch.where(mask, logp_all.gather(-1, safe[..., None])[..., 0], zero)
        with torch.no_grad():
            ent = torch.where(mask, -(logp_all.exp() * logp_all).sum(-1), zero)
            lsp2 = torch.where(mask, torch.logsumexp(2 * logp_all, -1), zero)
            mean_logits = torch.where(mask, logits.mean(-1), zero)
            top1 = (logits.argmax(-1) == safe) & mask
        return _Outputs(log_probs=logp, entropy=ent, log_sum_sq_probs=lsp2, mean_logits=mean_logits, is_top1=top1)


class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x.reshape(-1) if torch.is_tensor(x) else x

    gather = gather_for_metrics

    @staticmethod
    def unwrap_model(m):
        return m


def _batch(seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2 * B, L), generator=g)
    completion = torch.zeros(2 * B, L, dtype=torch.long)
    lengths = [6, 2, 4, 1, 5, 3]  # chosen 6, 2, 4; rejected 1, 5, 3: every pair has a shared part and a tail
    for r, n in enumerate(lengths):
        completion[r, 3:3 + n] = 1
    attention = torch.ones_like(completion)
    for r, n in enumerate(lengths):
        attention[r, 3 + n:] = 0  # right padding
    h = torch.randn(2 * B, L, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype)
    ref_h = h + 0.3 * torch.randn(h.shape, generator=g, dtype=dtype)
    return ids, completion, attention, h, w, ref_h


def trl_loss(loss_type, *, beta=0.1, label_smoothing=0.0, loss_weights=None, f_divergence_type="reverse_kl",
             f_alpha_divergence_coef=0.5, use_weighting=False, ld_alpha=None, discopop_tau=0.05, dtype=F64):
    """TRL's loss, gradient w.r.t. the policy's hidden states, and logged metrics."""
    ids, completion, attention, h, w, ref_h = _batch(dtype=dtype)
    h = h.clone().requires_grad_()
    policy = _StandIn(h, w).train()
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    fake = SimpleNamespace(
        model=policy, ref_model=_StandIn(ref_h, w), accelerator=_Acc(), aux_loss_enabled=False, ld_alpha=ld_alpha,
        precompute_ref_logps=False, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=types,
        loss_weights=loss_weights or [1.0] * len(types), beta=beta, label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        maybe_activation_offload_context=nullcontext(),
    )
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    loss = trl_dpo.DPOTrainer._compute_loss(fake, policy, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in fake._metrics["train"].items()}
    return loss.detach(), h.grad, metrics, fake


def vpo_loss(loss_type, *, dtype=F64, **kw):
    ids, completion, attention, h, w, ref_h = _batch(dtype=dtype)
    labels = ids.masked_fill(completion == 0, -100)[:, 1:]
    h = h.clone().requires_grad_()
    if isinstance(loss_type, (list, tuple)):
        loss_type = list(loss_type)
    loss, metrics = vpo.oracle.dpo_loss(w, h[:, :-1], labels, ref_hidden=ref_h[:, :-1], loss_type=loss_type,
                                   trl_metrics=True, **kw)
    loss.backward()
    return loss.detach(), h.grad, metrics


def _close(a, b, tol=1e-12):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=tol, atol=tol)


def _eps(loss_type):
    return 1e-3 if loss_type == "exo_pair" else 0.2 if loss_type in ("robust", "aot", "aot_unpaired") else 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_trl(loss_type):
    eps = _eps(loss_type)
    lt, gt, mt, _ = trl_loss(loss_type, beta=0.7, label_smoothing=eps)
    lv, gv, mv = vpo_loss(loss_type, beta=0.7, label_smoothing=eps)
    assert lt.abs() > 1e-3 and gt.abs().sum() > 0
    tol = 1e-7 if loss_type == "exo_pair" else 1e-12  # TRL takes log ε of a float32 ε
    _close(lv, lt, tol)
    _close(gv, gt, tol)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected", "mean_token_accuracy", "entropy"):
        _close(mv[key], mt[key], 1e-6)  # TRL divides counts in float32


def test_sigmoid_with_label_smoothing_is_conservative_dpo_not_trl():
    """TRL 1.16 ignores label_smoothing on 'sigmoid'; vpo applies conservative DPO (documented in docs/trl.md)."""
    lt, _, _, _ = trl_loss("sigmoid", beta=0.7, label_smoothing=0.2)
    l0, _, _ = vpo_loss("sigmoid", beta=0.7)
    l2, _, _ = vpo_loss("sigmoid", beta=0.7, label_smoothing=0.2)
    _close(l0, lt)
    assert abs(float(l2 - lt)) > 1e-3


@pytest.mark.parametrize("f_div,coef", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
                                        ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "discopop"])
def test_f_divergences_match_trl(f_div, coef, loss_type):
    # TRL's alpha_divergence clamps per dtype and has no float64 entry: compare in float32 there
    dtype = torch.float32 if f_div == "alpha_divergence" else F64
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    kw = dict(beta=0.5, f_divergence_type=f_div, f_alpha_divergence_coef=coef)
    lt, gt, _, _ = trl_loss(loss_type, dtype=dtype, **kw)
    lv, gv, _ = vpo_loss(loss_type, dtype=dtype, **kw)
    _close(lv, lt, tol)
    _close(gv, gt, tol)


# (TRL 1.16 cannot weight 'sft': it scales its expanded per-pair tensor in place, a RuntimeError)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair", ("sigmoid", "apo_down")])
def test_wpo_weighting_matches_trl(loss_type):
    lt, gt, _, _ = trl_loss(loss_type, beta=0.5, use_weighting=True)
    lv, gv, _ = vpo_loss(loss_type, beta=0.5, use_weighting=True)
    plain, _, _ = vpo_loss(loss_type, beta=0.5)
    assert abs(float(lv - plain)) > 1e-6  # the weights change the loss
    _close(lv, lt)
    _close(gv, gt)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "aot", "sppo_hard"])
def test_ld_alpha_matches_trl(ld_alpha, loss_type):
    eps = _eps(loss_type)
    lt, gt, mt, _ = trl_loss(loss_type, beta=0.5, ld_alpha=ld_alpha, label_smoothing=eps)
    lv, gv, mv = vpo_loss(loss_type, beta=0.5, ld_alpha=ld_alpha, label_smoothing=eps)
    _close(lv, lt)
    _close(gv, gt)
    _close(mv["logps/chosen"], mt["logps/chosen"])


def test_weighted_list_and_discopop_tau_match_trl():
    types, weights = ["exo_pair", "nca_pair", "discopop"], [0.5, 2.0, 1.5]
    lt, gt, _, _ = trl_loss(types, loss_weights=weights, label_smoothing=1e-3, discopop_tau=0.3)
    lv, gv, _ = vpo_loss(types, loss_weights=weights, label_smoothing=1e-3, discopop_tau=0.3)
    _close(lv, lt, 1e-7)  # exo_pair: TRL's log ε in float32
    _close(gv, gt, 1e-7)


def test_num_tokens_is_trls_running_total_of_attended_tokens():
    """TRL's num_tokens: the running total, over training steps, of attention_mask.sum() of the concatenated
    chosen + rejected batch (prompt tokens counted once per row). vpo.trainer.metrics.count_tokens counts the same."""
    from vpo.trainer.metrics import count_tokens

    _, _, mt, fake = trl_loss("sigmoid")
    ids, completion, attention, *_ = _batch()
    ours = int(count_tokens({"input_ids": ids, "attention_mask": attention}))
    assert mt["num_tokens"] == int(attention.sum()) == ours
    assert math.isfinite(mt["entropy"])


def test_sync_ref_model_mixing_matches_trl():
    from trl.trainer.callbacks import SyncRefModelCallback

    from vpo.trainer.trl_options import mix_reference

    g = torch.Generator().manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    ours, theirs = (torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double() for _ in range(2))
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
        for a, b in zip(ours.parameters(), theirs.parameters()):
            b.copy_(a)
    mix_reference(policy, ours, 0.3)
    SyncRefModelCallback._sync_target_model(policy, theirs, 0.3)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
