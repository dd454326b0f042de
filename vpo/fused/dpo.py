"""Fused DPO (and TRL's other DPO loss types): per-sequence log-probs straight from last hidden states and the LM head,
the policy's gradient formed in the forward, chunk by chunk of pairs (:mod:`vpo.fused._engine`), never building
``[tokens × vocab]`` logits. The loss head is :func:`vpo.losses.preference_pair_losses`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vpo._heads import resolve_reference
from vpo._validate import check_positive, check_range
from vpo.fused import _composed, _engine
from vpo.fused._common import (PreferenceOutput, check_head_transform, check_trl_terms, make_output, reference_head,
                               resolve_path, row_sums, token_metrics, unshard, validate_pair_batch, wanted_grads,
                               wpo_pair_weights)
from vpo.losses import preference_metrics, preference_pair_losses, resolve_loss_types


def fused_dpo_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    impl: str = "auto",
    loss_type="sigmoid",
    loss_weights=None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: Optional[torch.Tensor] = None,
    use_weighting: bool = False,
    ld_alpha: Optional[float] = None,
    chunking: Optional[_engine.Chunking] = None,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
) -> Tuple[torch.Tensor, PreferenceOutput]:
    """DPO loss from last hidden states, without materializing vocab logits.

    Args:
        weight: ``[V, D]`` LM-head weight (``model.lm_head.weight``).
        hidden: ``[2B, T, D]`` policy last hidden states (post final norm); rows ``0..B-1`` chosen, ``B..2B-1`` rejected.
        labels: ``[2B, T]`` int target ids aligned with ``hidden`` (already shifted); ``ignore_index`` = no target.
        bias: optional ``[V]`` LM-head bias.
        ref_hidden: ``[2B, T, D]`` reference last hidden states (no gradient flows into the reference).
        ref_weight, ref_bias: the reference head; default: ``weight`` and ``bias`` (detached).
        ref_logps: ``[2B]`` precomputed reference per-sequence log-probs, instead of ``ref_hidden``.
        beta, label_smoothing: as in :func:`vpo.losses.dpo_loss`.
        impl: ``"auto"``/``"torch"``: the engine (GEMMs through torch/cuBLAS, policy gradient in the forward; 3 policy
            + 1 reference GEMM passes for fwd+bwd); ``"triton"``: composed from :func:`vpo.linear_logprobs`'s Triton
            kernels (4 + 1 passes, least memory).
        loss_type, loss_weights: TRL's loss types (``"sigmoid"`` default, ``"ipo"``, ``"hinge"``, ``"robust"``,
            ``"apo_zero"``, ``"sigmoid_norm"``, ``"sft"``; a list is a weighted sum), see :mod:`vpo.losses`.
        f_divergence_type, f_alpha_divergence_coef, discopop_tau, bco_delta: TRL's options of those loss types
            (:func:`vpo.losses.preference_pair_losses`).
        use_weighting: WPO's pair weights (:func:`vpo.losses.wpo_weights`; the per-token ``log Σ_v p_v²`` comes
            from the same vocabulary sweep, no extra pass).
        ld_alpha: LD-DPO's α (:func:`vpo.losses.ld_dpo_logps`) on the policy's and the reference's sums (a given
            ``ref_logps`` must already be such sums); None: plain sums.
        chunking: :class:`vpo.fused.Chunking` (memory budget, pairs per chunk, vocab tile); the extra memory is
            stated in :mod:`vpo.fused._engine`.
        logit_softcap: the model's final-logit soft-capping ``z -> cap·tanh(z/cap)`` (Gemma 2/3: the config's
            ``final_logit_softcapping``); None: none. Applied to the policy's and the reference's logits.
        logit_scale: a factor on the logits (Cohere / Aya Vision: the config's ``logit_scale``), before the cap.

    Returns:
        ``(loss, out)``: scalar mean loss over the B pairs, and a :class:`PreferenceOutput` (its ``metrics`` add the
        per-token metrics of :func:`vpo.fused._common.token_metrics`: ``logits/chosen``, ``mean_token_accuracy``,
        ``entropy``, ``entropy/chosen``, ``num_tokens/chosen``, ...).

    Example:
        >>> import torch, vpo
        >>> W = torch.randn(50, 16, requires_grad=True); h = torch.randn(4, 6, 16, requires_grad=True)
        >>> y = torch.randint(0, 50, (4, 6)); y[:, :2] = -100           # the prompt is not scored
        >>> loss, out = vpo.fused_dpo_loss(W, h, y, ref_hidden=h.detach() + 0.01 * torch.randn_like(h))
        >>> loss.backward(); tuple(out.margins.shape), h.grad.shape
        ((2,), torch.Size([4, 6, 16]))
    """
    weight, bias, ref_weight, ref_bias = unshard(weight, bias, ref_weight, ref_bias)
    B = validate_pair_batch(hidden, labels, weight, bias)
    check_positive("beta", beta)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=True)
    resolve_loss_types(loss_type, loss_weights)
    mode = resolve_reference(ref_hidden, ref_logps, hidden)
    rw, rb = reference_head(weight, bias, ref_weight, ref_bias, ref_hidden) if mode == "hidden" else (None, None)
    path = resolve_path(impl, labels, weight.shape[0], ignore_index)
    check_trl_terms(path, use_weighting, ld_alpha)
    chunking = _engine.check_chunking(chunking)
    softcap, scale = check_head_transform(logit_softcap, logit_scale)
    tr = dict(logit_softcap=logit_softcap, logit_scale=logit_scale)  # for impl="triton"'s ops

    mask = labels != ignore_index
    ntok = mask.sum(1)  # [2B]
    acc = _engine.acc_dtype(hidden.dtype)
    ref_given = ref_logps.detach().to(acc) if mode == "logps" else None
    mean_n = ntok[:B].to(acc).mean()
    kw = dict(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, loss_weights=loss_weights,
              mean_chosen_tokens=mean_n, n_pairs=B, f_divergence_type=f_divergence_type,
              f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, bco_delta=bco_delta)

    def pair_loss(tok, rows, P):
        """The chunk's share of the mean loss: pairs ``rows[:P]`` (chosen) / ``rows[P:]`` (rejected)."""
        m = mask.index_select(0, rows) if ld_alpha is not None or use_weighting else None
        seq = row_sums(tok["logp"], m, ld_alpha)  # [2P]
        r = row_sums(tok["ref_logp"], m, ld_alpha) if ref_given is None else ref_given.index_select(0, rows)
        n = ntok.index_select(0, rows)
        pw = wpo_pair_weights(tok, m, P) if use_weighting else None
        return preference_pair_losses(seq[:P], seq[P:], r[:P], r[P:], chosen_tokens=n[:P], rejected_tokens=n[P:],
                                      pair_weights=pw, **kw).sum() / B

    all_rows = torch.arange(2 * B, device=hidden.device)
    if path == "triton":
        tok = _composed.token_terms(hidden, weight, bias, labels, ignore_index=ignore_index, **tr)
        if ref_given is None:
            with torch.no_grad():
                tok["ref_logp"] = _composed.token_terms(ref_hidden.detach(), rw, rb, labels,
                                                        ignore_index=ignore_index, **tr)["logp"]
        loss = pair_loss(tok, all_rows, B)
    else:
        need = wanted_grads(hidden=hidden, weight=weight, bias=bias)
        with torch.no_grad():
            res = _engine.sweep(hidden=hidden.detach(), weight=weight.detach(),
                                bias=None if bias is None else bias.detach(), labels=labels,
                                ignore_index=ignore_index, chunking=chunking,
                                ref=None if ref_given is not None else (ref_hidden.detach(), rw, rb),
                                pair_loss=pair_loss, need=need, softcap=softcap, scale=scale,
                                stats=("log_sum_p2",) if use_weighting else ())
            tok, loss = res.tok, res.loss
        loss = _engine.attach(loss, [(hidden, res.grads["hidden"]), (weight, res.grads["weight"]),
                                     (bias, res.grads["bias"])])
    extra = token_metrics(tok, mask, B)
    with torch.no_grad():
        ref = ref_given if ref_given is not None else row_sums(tok["ref_logp"].detach(), mask, ld_alpha)  # [2B]
        seq = row_sums(tok["logp"].detach(), mask, ld_alpha)
        metrics = preference_metrics(beta * (seq[:B] - ref[:B]), beta * (seq[B:] - ref[B:]), seq[:B], seq[B:])
        metrics.update(extra)
        return loss, make_output(seq[:B], seq[B:], ref[:B], ref[B:], beta, metrics)
