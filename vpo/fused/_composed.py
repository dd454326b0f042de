"""``impl="triton"``: the fused losses composed from the ops (:func:`vpo.linear_logprobs`, :func:`vpo.target_logits`,
:func:`vpo.linear_token_kl`) with ``impl="triton"``, autograd through them. Each op recomputes its logits in its own
backward, so fwd+bwd costs 5 GEMM passes over N·D·V for DPO/TPO (policy 4 + reference 1) and 11 for Cat-PO (the
KL op sweeps both models again and recomputes both in its backward), against the engine's 4; it holds less memory (no
chunk of logits). The per-sequence terms and the loss head are the engine's (the math lives once)."""
from __future__ import annotations

import torch


def token_terms(hidden, weight, bias, labels, *, ignore_index, noised=None, reward_grad=True, ref=None, kl_grad=True,
                logit_softcap=None, logit_scale=None):
    """The engine's ``Sweep.tok`` (``logp``, ``z``, optional ``z_noised``/``s``, ``kl``; ``[2B, T]``) through the
    Triton ops, differentiable where the engine forms gradients; no ``entropy``. ``logit_softcap``/``logit_scale``:
    the head's logits transform, applied by every op."""
    from vpo.ops.linear_logprobs import linear_logprobs, target_logits  # imported here: the engine path needs no ops
    from vpo.ops.token_kl import linear_token_kl

    mask = labels != ignore_index
    tr = dict(ignore_index=ignore_index, impl="triton", logit_softcap=logit_softcap, logit_scale=logit_scale)
    logp, z = linear_logprobs(hidden, weight, labels, bias, **tr)
    tok = {"logp": logp, "z": z}
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if noised is not None:
        if reward_grad:
            zn = target_logits(noised, weight, labels, bias, **tr)
            s = z - zn
        else:
            with torch.no_grad():
                zn = target_logits(noised.detach(), weight.detach(), labels, None if bias is None else bias.detach(),
                                   **tr)
            s = z.detach() - zn
        tok["z_noised"], tok["s"] = zn, torch.where(mask, s, zero)
    if ref is not None:
        rh, rw, rb = ref
        with torch.no_grad():
            tok["ref_logp"], _ = linear_logprobs(rh, rw, labels, rb, **tr)
        with torch.set_grad_enabled(torch.is_grad_enabled() and kl_grad):
            tok["kl"] = linear_token_kl(hidden, weight, rh, rw, labels, bias, rb, **tr)
    return tok


