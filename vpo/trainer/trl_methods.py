"""LD-DPO (``ld_alpha``) in the trainer where the fused losses do not take it yet: DPO's term on the LD-weighted
per-sequence log-probs (:func:`vpo.losses.ld_dpo_logps`) of the policy and the reference, from per-token log-probs
(:func:`vpo.linear_logprobs`: one policy pass, no ``[tokens × vocab]`` logits kept), through the same per-pair
function. Used by :mod:`vpo.trainer.methods` for ``dpo``/``csr`` and for the DPO term of OViP, LPOI and mDPO; a fused
loss that takes ``ld_alpha`` is used instead once it does.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from vpo import losses
from vpo.ops.linear_logprobs import linear_logprobs
from vpo.trainer.passes import IGNORE_INDEX, MAIN, Passes

Metrics = Dict[str, torch.Tensor]


def ld_sequence_logps(p: Passes, ld_alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(policy [2B], reference [2B])`` LD-weighted per-sequence log-probs of the main pass."""
    if p.precomputed:
        raise ValueError("ld_alpha needs the reference's per-token log-probs: it does not work with "
                         "ref_mode='precomputed' (the stored terms are plain sums)")
    labels = p.labels(MAIN)
    mask = labels != IGNORE_INDEX
    kw = p.head_kw(linear_logprobs) if hasattr(p, "head_kw") else {}
    logp, _ = linear_logprobs(p.hidden(MAIN), p.weight, labels, p.bias, impl=p.impl, **kw)  # [2B, T]
    with torch.no_grad():
        w = p.weight.detach() if p.ref_weight is None else p.ref_weight
        b = (None if p.bias is None else p.bias.detach()) if p.ref_weight is None else p.ref_bias
        ref_logp, _ = linear_logprobs(p.ref_hidden(MAIN), w, labels, b, impl=p.impl, **kw)
        ref = losses.ld_dpo_logps(ref_logp.to(logp.dtype), mask, ld_alpha)
    return losses.ld_dpo_logps(logp, mask, ld_alpha), ref


def ld_dpo_term(p: Passes, cfg, loss_kwargs: dict) -> Tuple[torch.Tensor, Metrics, torch.Tensor, torch.Tensor]:
    """``(loss, metrics, logps [2B], ref [2B])`` of the DPO term with LD-DPO's weighting (``cfg.ld_alpha``); the
    metrics are TRL's, on the weighted terms as TRL logs them."""
    logps, ref = ld_sequence_logps(p, cfg.ld_alpha)
    B = p.B
    labels = p.labels(MAIN)
    n = (labels != IGNORE_INDEX).sum(-1)
    kw = {k: v for k, v in loss_kwargs.items() if k not in ("ld_alpha", "chunking")}
    loss = losses.preference_pair_losses(logps[:B], logps[B:], ref[:B], ref[B:], beta=cfg.beta,
                                         label_smoothing=cfg.label_smoothing, chosen_tokens=n[:B],
                                         rejected_tokens=n[B:], n_pairs=B, **kw).mean()
    metrics = losses.preference_metrics(cfg.beta * (logps[:B] - ref[:B]), cfg.beta * (logps[B:] - ref[B:]),
                                        logps[:B], logps[B:])
    return loss, metrics, logps, ref


# Positions per chunk of the WPO weight pass: [chunk, V] fp32 logits at a time (1024 × 152k × 4 B ≈ 0.6 GB at
# Qwen's vocabulary).
WPO_CHUNK = 1024


@torch.no_grad()
def wpo_pair_weights(p: Passes, chunk: int = WPO_CHUNK) -> torch.Tensor:
    """WPO's ``[B]`` pair weights ``w(y_w)·w(y_l)`` (:func:`vpo.losses.wpo_weights`) of the main pass, without
    gradient: one extra policy pass over the scored positions, ``chunk`` positions of ``[chunk, V]`` logits at a time
    (with the model's soft-cap / logit scale), for the per-token ``logp`` and ``log Σ_v p_v²``. Used until the fused
    losses' vocabulary sweep returns ``log Σ p²`` itself."""
    labels = p.labels(MAIN)
    mask = labels != IGNORE_INDEX
    h = p.hidden(MAIN).detach()
    W = p.weight.detach()
    b = None if p.bias is None else p.bias.detach()
    softcap, scale = getattr(p, "transform", (None, None))
    rows, cols = mask.nonzero(as_tuple=True)  # host sync: the count of scored positions
    logp = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    lsp2 = torch.zeros_like(logp)
    for s in range(0, rows.numel(), chunk):
        r, c = rows[s:s + chunk], cols[s:s + chunk]
        z = (h[r, c] @ W.T).float()  # [n, D] @ [D, V] -> [n, V]
        if b is not None:
            z = z + b.float()
        if scale is not None:
            z = z * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        lp = torch.log_softmax(z, -1)
        logp[r, c] = lp.gather(-1, labels[r, c][:, None])[:, 0]
        lsp2[r, c] = torch.logsumexp(2 * lp, -1)
    w = losses.wpo_weights(logp, lsp2, mask)  # [2B]
    B = p.B
    return w[:B] * w[B:]


def wpo_dpo_term(p: Passes, cfg, loss_kwargs: dict) -> Tuple[torch.Tensor, Metrics, torch.Tensor, torch.Tensor]:
    """``(loss, metrics, logps [2B], ref [2B])`` of the DPO term with WPO's pair weights (``use_weighting``) on the
    per-sequence log-probs (LD-DPO's when ``cfg.ld_alpha`` is set)."""
    if getattr(cfg, "ld_alpha", None) is not None:
        logps, ref = ld_sequence_logps(p, cfg.ld_alpha)
    else:
        logps, ref = p.logps(MAIN), p.ref_logps(MAIN).to(p.weight.dtype)
    B = p.B
    n = (p.labels(MAIN) != IGNORE_INDEX).sum(-1)
    kw = {k: v for k, v in loss_kwargs.items() if k not in ("ld_alpha", "use_weighting", "chunking")}
    weights = wpo_pair_weights(p).to(logps.dtype)
    loss = losses.preference_pair_losses(logps[:B], logps[B:], ref[:B].to(logps.dtype), ref[B:].to(logps.dtype),
                                         beta=cfg.beta, label_smoothing=cfg.label_smoothing, chosen_tokens=n[:B],
                                         rejected_tokens=n[B:], n_pairs=B, pair_weights=weights, **kw).mean()
    metrics = losses.preference_metrics(cfg.beta * (logps[:B] - ref[:B]), cfg.beta * (logps[B:] - ref[B:]),
                                        logps[:B], logps[B:])
    metrics["wpo/weight"] = weights.mean()
    return loss, metrics, logps, ref
