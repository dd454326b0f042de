"""Oracle for Cat-PO (docs/methods.md, Cat-PO; paper 001): image-attention stats, token KL, weighted DPO + weighted KL.

Token weights ``w_t`` come from ``vpo.catpo.catpo_token_weights`` (computed once from the reference model, held fixed).
With ``logp`` the per-token log-probs and rows ``[2B, T]`` (chosen first)::

    π^(w)    = Σ_t w⁺_t logp(y⁺_t) - Σ_t w⁻_t logp(y⁻_t)                      for θ and ref
    L_wDPO   = -log σ(β (π^(w)_θ - π^(w)_ref))
    L_KL     = λ (Σ_t w⁺_t KL_t⁺ + Σ_t w⁻_t KL_t⁻),    KL_t = KL[π_θ(·|h_t) ‖ π_ref(·|h_t)] over the full vocab
    L_CatPO  = mean over the B pairs of (L_wDPO + L_KL)

``L_wDPO`` is exactly ``vpo.losses.dpo_loss`` on the weighted sums ``Σ_t w_t logp(y_t)`` (chosen and rejected,
policy and reference), which is how it is computed. ``L_KL`` is per pair, like ``L_wDPO``, so the batch loss adds
``λ · (Σ over all 2B rows and their response tokens of w_t KL_t) / B``.

Per-token KL, derivation (why the fast path needs only three per-token reductions): with ``p = softmax(z_θ)``,
``log p = z_θ - lse_θ`` and ``log q = z_ref - lse_ref``::

    KL(p ‖ q) = Σ_v p_v (log p_v - log q_v) = Σ_v p_v (z_θ,v - z_ref,v) - lse_θ + lse_ref
              = E_p[z_θ - z_ref] - lse_θ + lse_ref

(``Σ_v p_v = 1``), all three computable in one online sweep over the vocab. The oracle below materializes
``log_softmax`` of both and sums ``p (log p - log q)`` directly.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from vpo._heads import check_catpo_arguments  # noqa: F401  (re-exported)
from vpo._heads import check_bias, check_pair_batch, check_ref_hidden, check_ref_logps, check_reference_head
from vpo._validate import check_float, check_positive, check_same_device, check_same_dtype, check_tensor
from vpo.losses import dpo_loss
from vpo.oracle.logprobs import sequence_logps, token_logprobs


def image_attention_stats(
    attn_probs: Union[torch.Tensor, Sequence[torch.Tensor]],
    image_mask: torch.Tensor,
    response_mask: Optional[torch.Tensor] = None,
    layers: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Attention of every query position on the image tokens, averaged over heads and layers: ``a [B, T, N_p]``.

    Args:
        attn_probs: materialized attention probabilities, ``[L, B, H, T, T]`` or a list/tuple of per-layer
            ``[B, H, T, T]`` (what HF models return as ``outputs.attentions``); ``[..., query, key]``.
        image_mask: ``[B, T]`` bool, True at the image-token positions (the keys kept). Every row must hold the same
            number ``N_p`` of image tokens; ``a[b, :, j]`` is the attention on the ``j``-th image token of row ``b`` in
            position order (the order of the projected image features ``u_j``).
        response_mask: optional ``[B, T]`` bool; query positions where it is False get ``a = 0``.
        layers: indices (negative allowed) of the layers to average over; ``None`` = all layers (docs/methods.md's
        choice).

    Returns:
        ``a``, ``[B, T, N_p]``, in ``promote_types(attn dtype, float32)``.

    Alignment: ``a[:, t]`` belongs to the QUERY at position ``t``. Cat-PO takes "the representation of token ``y_t``"
    as the query, i.e. the position where ``y_t`` is the input token; with the shifted convention
    (``labels[:, t] = input_ids[:, t + 1]``, ``hidden[:, t]`` predicts it) the row for ``labels[:, t]`` is
    ``a[:, t + 1]``. Feed those rows, with ``e(labels)``, to ``vpo.catpo.catpo_token_weights``.

    Example:
        >>> import torch
        >>> from vpo.oracle import image_attention_stats
        >>> attn = torch.softmax(torch.randn(2, 1, 4, 6, 6), -1)            # L=2, B=1, H=4, T=6
        >>> img = torch.tensor([[False, True, True, True, False, False]])  # N_p = 3
        >>> image_attention_stats(attn, img).shape
        torch.Size([1, 6, 3])
    """
    if isinstance(attn_probs, (list, tuple)):
        if len(attn_probs) == 0:
            raise ValueError("attn_probs must not be an empty list: expected one [B, H, T, T] tensor per layer")
        for i, t in enumerate(attn_probs):
            check_float(f"attn_probs[{i}]", t, ndim=4)
            if t.shape != attn_probs[0].shape:
                raise ValueError(
                    f"attn_probs[{i}] has shape {tuple(t.shape)} but attn_probs[0] has shape "
                    f"{tuple(attn_probs[0].shape)}: expected every layer to have the same shape"
                )
            check_same_device(f"attn_probs[{i}]", t, "attn_probs[0]", attn_probs[0])
        attn = torch.stack(list(attn_probs))  # L x [B, H, T, T] -> [L, B, H, T, T]
    else:
        attn = check_float("attn_probs", attn_probs, ndim=5)
    n_layers, batch, _, seq_q, seq_k = attn.shape
    if seq_q != seq_k:
        raise ValueError(f"attn_probs has shape {tuple(attn.shape)}: expected square [..., T, T] attention maps")

    check_tensor("image_mask", image_mask, ndim=2, dtypes=(torch.bool,))
    if image_mask.shape != (batch, seq_k):
        raise ValueError(
            f"image_mask has shape {tuple(image_mask.shape)} but attn_probs has shape {tuple(attn.shape)}: expected "
            f"image_mask.shape == ({batch}, {seq_k}) ([B, T])"
        )
    check_same_device("image_mask", image_mask, "attn_probs", attn)
    counts = image_mask.sum(-1)  # [B]
    n_p = int(counts[0].item())
    if n_p == 0 or bool((counts != n_p).any()):
        raise ValueError(
            f"image_mask must mark the same, non-zero number of image tokens in every row, got counts {counts.tolist()}"
        )
    if response_mask is not None:
        check_tensor("response_mask", response_mask, ndim=2, dtypes=(torch.bool,))
        if response_mask.shape != image_mask.shape:
            raise ValueError(
                f"response_mask has shape {tuple(response_mask.shape)} but image_mask has shape "
                f"{tuple(image_mask.shape)}: expected the same [B, T]"
            )
        check_same_device("response_mask", response_mask, "attn_probs", attn)

    if layers is not None:
        idx = list(layers)
        if len(idx) == 0:
            raise ValueError("layers must not be empty: expected layer indices, or None for all layers")
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, int) or not -n_layers <= i < n_layers:
                raise ValueError(f"layers must hold ints in [{-n_layers}, {n_layers}), got {i!r}")
        attn = attn[torch.tensor(idx, device=attn.device)]

    dtype = torch.promote_types(attn.dtype, torch.float32)
    avg = attn.to(dtype).mean(dim=(0, 2))  # [L, B, H, T, T] -> [B, T(query), T(key)]
    key_pos = image_mask.nonzero()[:, 1].reshape(batch, n_p)  # [B, N_p] image key positions, in order
    a = avg.gather(-1, key_pos.unsqueeze(1).expand(batch, seq_q, n_p))  # [B, T, N_p]
    if response_mask is not None:
        a = a * response_mask.unsqueeze(-1).to(dtype)
    return a


def token_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token ``KL[π_θ(·|h) ‖ π_ref(·|h_ref)]`` over the full vocabulary, materializing both softmaxes.

    Args:
        hidden: ``[..., D]`` the policy's hidden states; weight: ``[V, D]``; bias: optional ``[V]``.
        ref_hidden: the reference's hidden states, same shape as ``hidden``.
        ref_weight, ref_bias: the reference's head; ``ref_weight=None`` shares the policy's (``weight`` and, unless
            ``ref_bias`` is given, ``bias``), detached.
        labels: optional ``[...]`` targets, used only as a mask: the KL is 0 (with 0 gradient) where
            ``labels == ignore_index``.

    Returns:
        ``[...]`` KL per position, in ``hidden.dtype``. The gradient flows to ``hidden``, ``weight`` and ``bias``; the
        reference side is a constant (computed under ``no_grad``).

    Example:
        >>> import torch
        >>> from vpo.oracle import token_kl
        >>> w, h = torch.randn(7, 4), torch.randn(3, 4)
        >>> token_kl(h, w, h).abs().max() < 1e-6                             # π_θ == π_ref
        tensor(True)
    """
    check_float("weight", weight, ndim=2)
    check_float("hidden", hidden)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} but weight has shape {tuple(weight.shape)}: expected "
            "hidden.shape[-1] == weight.shape[1] (D)"
        )
    check_same_device("hidden", hidden, "weight", weight)
    check_same_dtype("hidden", hidden, "weight", weight)
    if bias is not None:
        check_bias("bias", bias, "weight", weight)
    ref_weight, ref_bias = check_reference_head(weight, bias, ref_weight, ref_bias, ref_hidden, hidden, ndim=None)
    if labels is not None:
        check_tensor("labels", labels, dtypes=(torch.int32, torch.int64), allow_empty=False)
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(
                f"labels has shape {tuple(labels.shape)} but hidden has shape {tuple(hidden.shape)}: expected "
                "labels.shape == hidden.shape[:-1]"
            )
        check_same_device("labels", labels, "hidden", hidden)
    return _token_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index)


def weighted_sequence_logps(
    token_logps: torch.Tensor, token_weights: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """``Σ_t w_t logp(y_t)`` over response tokens: ``[R, T] -> [R]`` (ignored positions contribute 0).

    Example:
        >>> import torch
        >>> from vpo.oracle import weighted_sequence_logps
        >>> weighted_sequence_logps(torch.tensor([[-1.0, -2.0]]), torch.tensor([[2.0, 9.0]]), torch.tensor([[5, -100]]))
        tensor([-2.])
    """
    check_float("token_logps", token_logps)
    check_float("token_weights", token_weights)
    if token_weights.shape != token_logps.shape:
        raise ValueError(
            f"token_weights has shape {tuple(token_weights.shape)} but token_logps has shape "
            f"{tuple(token_logps.shape)}: expected the same shape"
        )
    if labels.shape != token_logps.shape:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but token_logps has shape {tuple(token_logps.shape)}: expected "
            "the same shape"
        )
    return sequence_logps(token_weights * token_logps, labels, ignore_index=ignore_index)


def catpo_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    kl_coef: float = 0.03,
    ignore_index: int = -100,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Cat-PO loss: token-weighted DPO + λ · token-weighted KL, mean over the B pairs (module docstring).

    Args:
        weight: ``[V, D]`` the policy's LM-head weight; bias: optional ``[V]``.
        hidden: ``[2B, T, D]`` the policy's hidden states, chosen rows first then rejected.
        labels: ``[2B, T]`` aligned targets, ``ignore_index`` where there is none.
        token_weights: ``[2B, T]`` Cat-PO weights ``w_t`` (``vpo.catpo.catpo_token_weights``); used as constants (no
            gradient flows into them); values at ignored positions are unused.
        ref_hidden: ``[2B, T, D]`` the reference's hidden states; required when ``kl_coef > 0`` (the KL needs the
            reference's full distribution).
        ref_weight, ref_bias: the reference's head; ``ref_weight=None`` shares the policy's, detached.
        ref_logps: ``[2B]`` precomputed ``Σ_t w_t logp_ref(y_t)``, instead of ``ref_hidden``; only with
            ``kl_coef == 0``.
        beta: β > 0. kl_coef: λ >= 0.

    Returns:
        ``(loss, metrics)``: ``vpo.losses.dpo_loss``'s metrics, where ``rewards/*`` are ``β (Σ w logp_θ - Σ w
        logp_ref)`` and ``logps/chosen``, ``logps/rejected`` are the PLAIN (unweighted) policy log-probs; plus
        ``catpo/kl``, the batch mean over pairs of ``Σ_t w_t KL_t`` (chosen + rejected tokens; so
        ``loss = L_wDPO + kl_coef · catpo/kl``), present whenever ``ref_hidden`` is given.

    Example:
        >>> import torch
        >>> from vpo.oracle import catpo_loss
        >>> g = torch.Generator().manual_seed(0)
        >>> w, h = torch.randn(11, 4, generator=g), torch.randn(2, 3, 4, generator=g)
        >>> y = torch.randint(0, 11, (2, 3), generator=g)
        >>> loss, m = catpo_loss(w, h, y, torch.ones(2, 3), ref_hidden=h)      # θ == ref: log 2, KL 0
        >>> round(loss.item(), 4), round(m["catpo/kl"].item(), 6)
        (0.6931, 0.0)
    """
    n_pairs = check_pair_batch(weight, hidden, labels, bias, ignore_index=ignore_index)
    check_catpo_arguments(hidden, labels, token_weights, ref_hidden, ref_logps, beta=beta, kl_coef=kl_coef)

    w = token_weights.detach().to(hidden.dtype)  # constants: the weights are held fixed
    logp, _, _ = token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index)  # [2B, T]
    policy = weighted_sequence_logps(logp, w, labels, ignore_index=ignore_index)  # [2B]

    kl_per_pair = None
    if ref_hidden is not None:
        ref_weight, ref_bias = check_reference_head(weight, bias, ref_weight, ref_bias, ref_hidden, hidden)
        with torch.no_grad():
            ref_logp, _, _ = token_logprobs(ref_hidden, ref_weight, labels, ref_bias, ignore_index=ignore_index)
            ref = weighted_sequence_logps(ref_logp.to(hidden.dtype), w, labels, ignore_index=ignore_index)
        with torch.set_grad_enabled(torch.is_grad_enabled() and kl_coef > 0):  # kl_coef == 0: a metric only
            kl = _token_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index)  # [2B, T]
            kl_rows = weighted_sequence_logps(kl, w, labels, ignore_index=ignore_index)  # [2B]  Σ_t w_t KL_t
            kl_per_pair = kl_rows[:n_pairs] + kl_rows[n_pairs:]  # [B]
    else:
        ref = ref_logps.detach().to(hidden.dtype)

    loss, metrics = dpo_loss(policy[:n_pairs], policy[n_pairs:], ref[:n_pairs], ref[n_pairs:], beta=beta)
    if kl_per_pair is not None:
        if kl_coef > 0:
            loss = loss + kl_coef * kl_per_pair.mean()
        metrics["catpo/kl"] = kl_per_pair.detach().mean()
    with torch.no_grad():
        plain = sequence_logps(logp, labels, ignore_index=ignore_index)
        metrics["logps/chosen"] = plain[:n_pairs].mean()
        metrics["logps/rejected"] = plain[n_pairs:].mean()
    return loss, metrics


# --- internals --------------------------------------------------------------------------------------------------------


def _token_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index) -> torch.Tensor:
    logits = hidden @ weight.T  # [..., D] @ [D, V] -> [..., V]
    if bias is not None:
        logits = logits + bias
    log_p = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        ref_logits = ref_hidden @ ref_weight.T
        if ref_bias is not None:
            ref_logits = ref_logits + ref_bias
        log_q = torch.log_softmax(ref_logits, dim=-1).to(log_p.dtype)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [...]
    if labels is not None:
        kl = torch.where(labels != ignore_index, kl, torch.zeros_like(kl))
    return kl
