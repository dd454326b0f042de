"""One function per method: ``(passes, config) -> (loss, metrics)``, the loss from the passes of one batch.

Every function reads the policy's and the reference's last hidden states from a :class:`vpo.trainer.passes.Passes`
(which runs each forward pass once, on demand) and hands them to the fused losses with the LM-head weight — never
the models' ``[tokens × vocab]`` logits. Sub-batches (noised image, crop, image-free, negative image, image list) are
reduced to per-sequence log-probs with :func:`vpo.linear_logprobs` + :func:`vpo.sequence_sum` and combined by the loss
heads of :mod:`vpo.losses`, the same heads the oracle (:mod:`vpo.oracle`) uses.

=======  ===================================================  =====================================================
method   passes (policy; the reference runs the same ones)     loss
=======  ===================================================  =====================================================
dpo      main [2B]                                            ``vpo.fused_dpo_loss``
csr      main [2B]; reference = the previous iterate           ``vpo.fused_dpo_loss``
tpo      main [2B], ``sub["noised"]`` [2B] (no_grad for the   ``vpo.fused_tpo_loss``
         policy when ``reward_grad`` is False)
catpo    main [2B] (+ token weights from the batch, the       ``vpo.fused_catpo_loss``
         table, or the reference's attention)
ovip     main [2B], ``sub["noimg"]`` [B], ``sub["negimg"]``   DPO + ``ovip_image_loss`` (+ anchor variants)
         [B] (2B rows for the symmetric variant)
lpoi     main [2B], ``sub["list"]`` [B·L] minus x_1 rows      DPO + ``anchor_loss`` + ``listwise_loss``
mdpo     main [2B], ``sub["crop"]`` [B]                       DPO + ``mdpo_conditional_loss`` + ``anchor_loss``
=======  ===================================================  =====================================================

Metrics are TRL's names (``rewards/chosen``, ``rewards/margins``, ``logps/chosen``…) plus each head's namespaced ones
(``tpo/c_mean_chosen``, ``catpo/kl``, ``listwise/loss``, ``image/margin``, ``conditional/margin``, ``anchor/…``) and
``dpo/loss`` where DPO is one term of several.

:func:`reference_terms` gives what ``ref_mode="precomputed"`` stores for each method (see :mod:`.reference`).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, Tuple

import torch

from vpo import losses
from vpo.fused import fused_dpo_loss, fused_tpo_loss
from vpo.ops.linear_logprobs import linear_logprobs, target_logits
from vpo.ops.segment_sum import sequence_sum
from vpo.oracle.tpo import tpo_log_calibrated_reward
from vpo.trainer.passes import IGNORE_INDEX, MAIN, Passes
from vpo.trainer.trl_options import loss_option_kwargs

Metrics = Dict[str, torch.Tensor]


def _ref_kwargs(p: Passes, *names: str) -> dict:
    """Reference arguments of a fused loss: the reference hidden states of the passes, or the precomputed terms."""
    if p.precomputed:
        return {"ref_logps": p.ref_terms(MAIN)}
    out = {"ref_hidden": p.ref_hidden(MAIN), "ref_weight": p.ref_weight, "ref_bias": p.ref_bias}
    for name, key in names:
        out[key] = p.ref_hidden(name)
    return out


@functools.lru_cache(maxsize=None)
def _takes_loss_type(fn) -> bool:
    try:
        return "loss_type" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _loss_type_kwargs(fn, cfg) -> dict:
    """``loss_type`` / ``loss_weights`` for a loss head (TRL's DPO variants, ``cfg.loss_type_list()``) and TRL's
    other options where set (:func:`vpo.trainer.trl_options.loss_option_kwargs`); nothing for the default plain
    sigmoid loss. A head without the keywords and a non-default choice raise ValueError."""
    types, weights = cfg.loss_type_list() if hasattr(cfg, "loss_type_list") else (["sigmoid"], [1.0])
    extra = loss_option_kwargs(fn, cfg, _takes) if hasattr(cfg, "f_divergence_type") else {}
    if types == ["sigmoid"] and weights == [1.0]:
        return extra
    name = getattr(fn, "__name__", repr(fn))
    if not _takes_loss_type(fn):
        raise ValueError(f"loss_type={types} is not available for method {cfg.method!r} in this build ({name} takes "
                         f"no loss_type)")
    return {"loss_type": types if len(types) > 1 else types[0], "loss_weights": weights, **extra}


class _NoLD:
    """``cfg`` seen without ``ld_alpha`` and ``use_weighting`` (the LD-DPO / WPO paths apply them themselves)."""

    def __init__(self, cfg):
        self._cfg = cfg

    def __getattr__(self, name):
        if name == "ld_alpha":
            return None
        if name == "use_weighting":
            return False
        return getattr(self._cfg, name)


def _check_same_labels(p: Passes, name: str) -> None:
    main, other = p.labels(MAIN), p.labels(name)
    if main.shape != other.shape or not torch.equal(main, other):
        raise ValueError(f"sub-batch {name!r} must have the main pass's labels (same rows, same tokens), got shape "
                         f"{tuple(other.shape)} vs {tuple(main.shape)}")


def dpo(p: Passes, cfg) -> Tuple[torch.Tensor, Metrics]:
    """DPO on the main pass."""
    if getattr(cfg, "use_weighting", False) and not _takes(fused_dpo_loss, "use_weighting"):
        from vpo.trainer.trl_methods import wpo_dpo_term  # WPO before the fused loss's sweep gives log Σp²

        loss, metrics, _, _ = wpo_dpo_term(p, cfg, _loss_type_kwargs(losses.preference_pair_losses, _NoLD(cfg)))
        return loss, metrics
    if getattr(cfg, "ld_alpha", None) is not None and not _takes(fused_dpo_loss, "ld_alpha"):
        from vpo.trainer.trl_methods import ld_dpo_term  # LD-DPO before the fused loss takes it

        loss, metrics, _, _ = ld_dpo_term(p, cfg, _loss_type_kwargs(losses.preference_pair_losses, _NoLD(cfg)))
        return loss, metrics
    loss, out = fused_dpo_loss(p.weight, p.hidden(), p.labels(), p.bias, **_ref_kwargs(p), beta=cfg.beta,
                               label_smoothing=cfg.label_smoothing, impl=cfg.loss_impl,
                               **_loss_type_kwargs(fused_dpo_loss, cfg), **p.head_kw(fused_dpo_loss))
    return loss, dict(out.metrics)


def csr(p: Passes, cfg) -> Tuple[torch.Tensor, Metrics]:
    """CSR's iterative DPO step: DPO against the previous iterate (the trainer's reference)."""
    return dpo(p, cfg)


def tpo(p: Passes, cfg) -> Tuple[torch.Tensor, Metrics]:
    """TPO: clean and noised passes of policy and reference; ``reward_grad=False`` runs the noised policy pass under
    no_grad."""
    _check_same_labels(p, "noised")
    hidden_noised = p.hidden("noised", grad=cfg.reward_grad)
    loss, out = fused_tpo_loss(
        p.weight, p.hidden(), hidden_noised, p.labels(), p.bias, **_ref_kwargs(p, ("noised", "ref_hidden_noised")),
        beta=cfg.beta, a=cfg.tpo_a, reward_grad=cfg.reward_grad, rewards=cfg.tpo_rewards, impl=cfg.loss_impl,
        **_loss_type_kwargs(fused_tpo_loss, cfg), **p.head_kw(fused_tpo_loss),
    )
    return loss, dict(out.metrics)


def _fused_catpo():
    import vpo

    fn = getattr(vpo, "fused_catpo_loss", None)
    if fn is None:
        try:
            from vpo.fused.catpo import fused_catpo_loss as fn
        except ImportError:
            fn = None
    if fn is None:
        raise NotImplementedError("method='catpo' needs vpo.fused_catpo_loss, which this vpo build does not have yet")
    return fn


def _catpo_weights(p: Passes, cfg) -> torch.Tensor:
    return p.token_weights(**cfg.catpo_weight_kwargs())


def catpo(p: Passes, cfg) -> Tuple[torch.Tensor, Metrics]:
    """Cat-PO: token-weighted DPO + λ · token-weighted KL on the main pass."""
    fn = _fused_catpo()
    w = _catpo_weights(p, cfg)
    ref = _ref_kwargs(p)
    loss, out = fn(p.weight, p.hidden(), p.labels(), w, p.bias, ref.get("ref_hidden"), ref.get("ref_weight"),
                   ref.get("ref_bias"), ref_logps=ref.get("ref_logps"), beta=cfg.beta, kl_coef=cfg.kl_coef,
                   impl=cfg.loss_impl, **_loss_type_kwargs(fn, cfg), **p.head_kw(fn))
    metrics = dict(out.metrics)
    with torch.no_grad():
        mask = (p.labels() != IGNORE_INDEX).float()
        B = p.B
        metrics["catpo/weight_chosen"] = (w[:B] * mask[:B]).sum() / mask[:B].sum().clamp_min(1)
        metrics["catpo/weight_rejected"] = (w[B:] * mask[B:]).sum() / mask[B:].sum().clamp_min(1)
    return loss, metrics


def _text_dpo(p: Passes, cfg):
    """The DPO term of the composite methods on per-sequence log-probs: ``(loss, metrics, logps [2B], ref [2B])``."""
    if getattr(cfg, "use_weighting", False) or getattr(cfg, "ld_alpha", None) is not None:
        from vpo.trainer.trl_methods import ld_dpo_term, wpo_dpo_term

        term = wpo_dpo_term if getattr(cfg, "use_weighting", False) else ld_dpo_term
        loss, metrics, logps, ref = term(p, cfg, _loss_type_kwargs(losses.preference_pair_losses, _NoLD(cfg)))
        metrics["dpo/loss"] = loss.detach()
        return loss, metrics, logps, ref
    logps, ref = p.logps(MAIN), p.ref_logps(MAIN)
    B = p.B
    extra = _loss_type_kwargs(losses.preference_pair_losses, cfg)
    if not extra:
        loss, metrics = losses.dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=cfg.beta,
                                        label_smoothing=cfg.label_smoothing)
    else:  # TRL's loss types on the per-sequence log-probs (vpo.losses.preference_pair_losses)
        n = (p.labels(MAIN) != IGNORE_INDEX).sum(-1).to(logps.dtype)
        ref = ref.to(logps.dtype)
        loss = losses.preference_pair_losses(logps[:B], logps[B:], ref[:B], ref[B:], beta=cfg.beta,
                                             label_smoothing=cfg.label_smoothing, chosen_tokens=n[:B],
                                             rejected_tokens=n[B:], **extra).mean()
        metrics = losses.preference_metrics(cfg.beta * (logps[:B] - ref[:B]), cfg.beta * (logps[B:] - ref[B:]),
                                            logps[:B], logps[B:])
    metrics["dpo/loss"] = loss.detach()
    return loss, metrics, logps, ref


def ovip(p: Passes, cfg) -> Tuple[torch.Tensor, Metrics]:
    """OViP (offline): text DPO on the main rows + the image loss over the image-free and negative-image passes."""
    text, metrics, img, ref_img = _text_dpo(p, cfg)
    B = p.B
    pos, rej = slice(0, B), slice(B, 2 * B)
    neg, ref_neg = p.logps("negimg"), p.ref_logps("negimg")
    needs_noimg = cfg.ovip_image_loss != "base" or cfg.ovip_anchor == "bi-anchor"
    if needs_noimg:
        noimg, ref_noimg = p.logps("noimg"), p.ref_logps("noimg")
    if cfg.ovip_image_loss == "ovip":
        image, m = losses.ovip_image_loss(img[pos], noimg[pos], neg[pos], ref_img[pos], ref_noimg[pos], ref_neg[pos],
                                          beta1=cfg.ovip_beta1, beta2=cfg.ovip_beta2)
    elif cfg.ovip_image_loss == "base":
        image, m = losses.ovip_base_image_loss(img[pos], neg[pos], ref_img[pos], ref_neg[pos], beta=cfg.beta)
    else:
        for name, t in (("noimg", noimg), ("negimg", neg)):
            if t.shape[0] != 2 * B:
                raise ValueError(f"ovip_image_loss='symmetric' needs sub[{name!r}] with 2B = {2 * B} rows (chosen, "
                                 f"then rejected), got {t.shape[0]}")
        image, m = losses.ovip_symmetric_image_loss(
            img[pos], noimg[pos], neg[pos], img[rej], noimg[rej], neg[rej],
            ref_img[pos], ref_noimg[pos], ref_neg[pos], ref_img[rej], ref_noimg[rej], ref_neg[rej],
            beta1=cfg.ovip_beta1, beta2=cfg.ovip_beta2,
        )  # fmt: skip
    metrics.update(m)
    loss = text + image
    if cfg.ovip_anchor == "anchor":
        aux, m = losses.anchor_loss(img[pos], ref_img[pos], beta=cfg.beta)
        loss = loss + aux
        metrics.update(m)
    elif cfg.ovip_anchor == "bi-anchor":
        if noimg.shape[0] != 2 * B:
            raise ValueError(f"ovip_anchor='bi-anchor' pushes down A⁻ given Q alone: it needs sub['noimg'] with "
                             f"2B = {2 * B} rows, got {noimg.shape[0]}")
        aux, m = losses.bi_anchor_loss(img[pos], noimg[rej], ref_img[pos], ref_noimg[rej], beta=cfg.beta)
        loss = loss + aux
        metrics.update(m)
    return loss, metrics


def lpoi(p: Passes, cfg) -> Tuple[torch.Tensor, Metrics]:
    """LPOI: DPO + anchor + listwise over the image list (x_1 scored by the main pass's chosen rows)."""
    dpo_term, metrics, logps, ref = _text_dpo(p, cfg)
    B = p.B
    anchor, m = losses.anchor_loss(logps[:B], ref[:B], beta=cfg.beta, delta=cfg.anchor_delta)
    metrics.update(m)
    others, ref_others = p.logps("list").reshape(B, -1), p.ref_logps("list").reshape(B, -1)  # [B, L-1]
    full = torch.cat([logps[:B, None], others], dim=1)  # [B, L]
    ref_full = torch.cat([ref[:B, None].to(ref_others.dtype), ref_others], dim=1)
    listwise, m = losses.listwise_loss(full, ref_full.to(full.dtype), beta=cfg.beta)
    metrics.update(m)
    return dpo_term + anchor + listwise, metrics


def mdpo(p: Passes, cfg) -> Tuple[torch.Tensor, Metrics]:
    """mDPO: DPO + conditional preference (full vs cropped image, one crop for both models) + anchor."""
    dpo_term, metrics, logps, ref = _text_dpo(p, cfg)
    B = p.B
    crop, ref_crop = p.logps("crop"), p.ref_logps("crop")
    cond, m = losses.mdpo_conditional_loss(logps[:B], crop, ref[:B], ref_crop.to(crop.dtype), beta=cfg.beta)
    metrics.update(m)
    anchor, m = losses.anchor_loss(logps[:B], ref[:B], beta=cfg.beta, delta=cfg.anchor_delta)
    metrics.update(m)
    return dpo_term + cond + anchor, metrics


def check_head_supported(model, method: str) -> None:
    """Raise ValueError (one line naming the model type and the reason), before any data is read, when ``model`` has
    no backbone / linear LM head the trainer can read, or its head transform (soft-capping, logit scale:
    :func:`vpo.trainer.modeling.head_transform`) cannot be passed to the functions ``method`` scores with."""
    from vpo.trainer.modeling import backbone, head_kwargs, head_transform, lm_head, model_type_of

    backbone(model)  # the hidden states and the head the trainer reads exist (one-line errors naming the type)
    lm_head(model)
    if method == "catpo":
        check_catpo_capture(model)
    transform = head_transform(model)
    if transform == (None, None):
        return
    fns = [linear_logprobs]
    if method in ("dpo", "csr"):
        fns.append(fused_dpo_loss)
    elif method == "tpo":  # (target_logits, for precomputing TPO's reference terms, is checked where it is called)
        fns.append(fused_tpo_loss)
    elif method == "catpo":
        fns.append(_fused_catpo())
    for fn in fns:
        head_kwargs(fn, transform, model_type_of(model))


def check_catpo_capture(model) -> None:
    """Raise ValueError (one line naming the model type), before any data is read, for models whose image attention
    Cat-PO's capture (:mod:`vpo.integrations.attention_capture`) cannot read: image tokens reached through
    cross-attention layers (Mllama), or a bidirectional attention prefix over the image and the prompt (PaliGemma)."""
    from vpo.integrations.attention_capture import _config_tree
    from vpo.trainer.modeling import model_type_of, unwrap_model

    model_type = model_type_of(model)
    for cfg in _config_tree(unwrap_model(model).config):
        layers = getattr(cfg, "cross_attention_layers", None)
        if layers:
            raise ValueError(f"{model_type}: method='catpo' reads the attention of response tokens on image tokens in "
                             f"the language model's self-attention, but this model attends to the image through "
                             f"cross-attention layers {list(layers)}, which the image-attention capture cannot read")
    if model_type.startswith("paligemma"):
        raise ValueError(f"{model_type}: method='catpo' needs causal self-attention, but this model attends "
                         "bidirectionally over its image and prompt prefix (token_type_ids), which the image-attention "
                         "capture does not support")


METHODS: Dict[str, Callable[[Passes, object], Tuple[torch.Tensor, Metrics]]] = {
    "dpo": dpo, "tpo": tpo, "catpo": catpo, "ovip": ovip, "lpoi": lpoi, "mdpo": mdpo, "csr": csr,
}

# The passes each method reads (what the collator must produce under batch["sub"]).
SUB_PASSES = {"dpo": (), "csr": (), "tpo": ("noised",), "catpo": (), "ovip": ("noimg", "negimg"), "lpoi": ("list",),
              "mdpo": ("crop",)}


def compute(p: Passes, cfg) -> Tuple[torch.Tensor, Metrics]:
    """The loss and metrics of ``cfg.method`` on the batch behind ``p`` (plus TRL's token counts,
    :func:`token_count_metrics`, where the loss did not report them)."""
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {cfg.method!r}")
    loss, metrics = METHODS[cfg.method](p, cfg)
    for k, v in token_count_metrics(p).items():
        metrics.setdefault(k, v)
    return loss, metrics


@torch.no_grad()
def token_count_metrics(p: Passes) -> Metrics:
    """``num_tokens/chosen`` / ``num_tokens/rejected``: mean response tokens per row of the main pass."""
    mask = p.labels(MAIN) != IGNORE_INDEX
    B = p.B
    n = mask.sum(-1).float()
    return {"num_tokens/chosen": n[:B].mean(), "num_tokens/rejected": n[B:].mean()}


@torch.no_grad()
def reference_terms(p: Passes, cfg) -> Dict[str, torch.Tensor]:
    """What ``ref_mode="precomputed"`` stores for ``cfg.method``: ``{pass name: [rows] float}`` of the reference."""
    method = cfg.method
    if method in ("dpo", "csr"):
        return {MAIN: p.ref_logps(MAIN)}
    if method == "tpo":
        return {MAIN: _tpo_reference_term(p, cfg)}
    if method == "catpo":
        w = _catpo_weights(p, cfg)
        weight, bias = _ref_head(p)
        logp, _ = linear_logprobs(p.ref_hidden(MAIN), weight, p.labels(), bias, impl=cfg.loss_impl,
                                  **p.head_kw(linear_logprobs))
        return {MAIN: sequence_sum(logp * w.to(logp.dtype))}
    names = {"ovip": ("noimg", "negimg"), "lpoi": ("list",), "mdpo": ("crop",)}[method]
    out = {MAIN: p.ref_logps(MAIN)}
    for name in names:
        if p.has(name):
            out[name] = p.ref_logps(name)
    return out


def _ref_head(p: Passes):
    if p.ref_weight is not None:
        return p.ref_weight, p.ref_bias
    return p.weight.detach(), None if p.bias is None else p.bias.detach()


def _tpo_reference_term(p: Passes, cfg) -> torch.Tensor:
    """``[2B]`` ``Σ_i (logp_ref(y_i) + log c_ref,i)``, as :func:`vpo.fused_tpo_loss` computes it for the reference."""
    _check_same_labels(p, "noised")
    weight, bias = _ref_head(p)
    labels = p.labels()
    logp, z = linear_logprobs(p.ref_hidden(MAIN), weight, labels, bias, impl=cfg.loss_impl,
                              **p.head_kw(linear_logprobs))
    z_noised = target_logits(p.ref_hidden("noised"), weight, labels, bias, impl=cfg.loss_impl,
                             **p.head_kw(target_logits))
    mask = labels != IGNORE_INDEX
    s = torch.where(mask, z - z_noised, torch.zeros_like(z))
    is_chosen_row = torch.arange(labels.shape[0], device=labels.device) < p.B
    log_c = tpo_log_calibrated_reward(s, is_chosen_row, a=cfg.tpo_a, rewards=cfg.tpo_rewards)
    log_c = torch.where(mask, log_c, torch.zeros_like(log_c))
    return sequence_sum(logp + log_c)
