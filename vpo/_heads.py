"""Argument checks of a linear LM head ``(weight [V, D], bias [V] | None)``, of the passes run through it and of the
reference model's side, shared by the oracle (``vpo.oracle``), the fused losses (``vpo.fused``) and the ops
(``vpo.ops``). Every check raises ``ValueError`` naming the argument (see :mod:`vpo._validate`).

Two phrasings of the same hidden-vs-head check live here, because users (and tests) read them in two places:

- :func:`check_pass` (the oracle): a pass is checked *against* a head, ``hidden has dtype float32 but weight has dtype
  float64``; it also checks that the labels are in range (one host sync).
- :func:`check_linear_head` (the ops and the fused losses): the head is checked against the hidden states it is applied
  to, ``weight has dtype float64 but hidden has dtype float32``; the label range is left to the op.

The reference side: ``ref_weight=None`` means the reference shares the policy's head (``weight`` and ``bias``), and then
``ref_bias`` must be None too (:func:`default_reference_head`); precomputed per-sequence reference terms are checked by
:func:`check_ref_logps`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from vpo._validate import (
    check_even_batch,
    check_float,
    check_labels,
    check_labels_in_range,
    check_positive,
    check_like,
    check_same_device,
    check_same_dtype,
    check_same_shape,
)

# ----------------------------------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------------------------------


def check_bias(name: str, bias, weight_name: str, weight: torch.Tensor, *,
               like_name: Optional[str] = None, like: Optional[torch.Tensor] = None) -> None:
    """``bias [V]`` float with ``V = weight.shape[0]``, in the dtype and on the device of ``like`` (default:
    ``weight``)."""
    if like is None:
        like_name, like = weight_name, weight
    check_float(name, bias, ndim=1)
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(
            f"{name} has shape {tuple(bias.shape)} but {weight_name} has shape {tuple(weight.shape)}: "
            f"expected {name}.shape == ({weight_name}.shape[0],)"
        )
    check_same_dtype(name, bias, like_name, like)
    check_same_device(name, bias, like_name, like)


def check_head(weight_name: str, weight, bias_name: str, bias) -> None:
    """``weight [V, D]`` float; ``bias`` None or ``[V]`` of the same dtype and device."""
    check_float(weight_name, weight, ndim=2)
    if bias is not None:
        check_bias(bias_name, bias, weight_name, weight)


def check_linear_head(hidden, weight, bias: Optional[torch.Tensor], *,
                      names: Tuple[str, str, str] = ("hidden", "weight", "bias")) -> None:
    """``hidden [..., D]`` (at least 2 dims), ``weight [V, D]``, ``bias [V] | None``: float, one dtype, one device."""
    h_name, w_name, b_name = names
    check_float(h_name, hidden)
    if hidden.dim() < 2:
        raise ValueError(
            f"{h_name} must have at least 2 dimensions [..., D], got shape {tuple(hidden.shape)} ({hidden.dim()} dims)"
        )
    check_float(w_name, weight, ndim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{w_name} has shape {tuple(weight.shape)} but {h_name} has shape {tuple(hidden.shape)}: "
            f"expected {w_name}.shape[1] == {h_name}.shape[-1]"
        )
    check_same_dtype(w_name, weight, h_name, hidden)
    check_same_device(w_name, weight, h_name, hidden)
    if bias is not None:
        check_bias(b_name, bias, w_name, weight, like_name=h_name, like=hidden)


def check_labels_like(labels, hidden: torch.Tensor, name: str = "labels", *, hidden_name: str = "hidden") -> None:
    """``labels`` int32/int64 of shape ``hidden.shape[:-1]`` on ``hidden``'s device."""
    check_labels(name, labels)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{name} has shape {tuple(labels.shape)} but {hidden_name} has shape {tuple(hidden.shape)}: "
            f"expected {name}.shape == {hidden_name}.shape[:-1]"
        )
    check_same_device(name, labels, hidden_name, hidden)


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


# ----------------------------------------------------------------------------------------------------------------------
# Passes through the head (the oracle's phrasing)
# ----------------------------------------------------------------------------------------------------------------------


def check_pass(
    hidden_name: str,
    hidden,
    labels_name: str,
    labels,
    weight_name: str,
    weight: torch.Tensor,
    *,
    ignore_index: int,
    ndim: int = 3,
) -> None:
    """One forward pass: ``hidden [..., T, D]`` (``ndim`` dims), ``labels [..., T]``, against ``weight [V, D]``.
    Syncs once (the label range)."""
    check_float(hidden_name, hidden, ndim=ndim)
    check_labels(labels_name, labels, ndim=ndim - 1)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{labels_name} has shape {tuple(labels.shape)} but {hidden_name} has shape {tuple(hidden.shape)}: "
            f"expected {labels_name}.shape == {hidden_name}.shape[:-1]"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{hidden_name} has shape {tuple(hidden.shape)} but {weight_name} has shape {tuple(weight.shape)}: "
            f"expected {hidden_name}.shape[-1] == {weight_name}.shape[1]"
        )
    check_same_dtype(hidden_name, hidden, weight_name, weight)
    check_same_device(hidden_name, hidden, weight_name, weight)
    check_same_device(labels_name, labels, hidden_name, hidden)
    check_labels_in_range(labels_name, labels, weight.shape[0], ignore_index)


def check_pair_batch(weight, hidden, labels, bias, *, ignore_index: int, hidden_name: str = "hidden") -> int:
    """The policy's head and one ``[2B, T, D]`` preference pass (chosen rows first, then rejected); returns B."""
    check_head("weight", weight, "bias", bias)
    n_pairs = check_even_batch(hidden_name, check_float(hidden_name, hidden, ndim=3))
    check_ignore_index(ignore_index)
    check_pass(hidden_name, hidden, "labels", labels, "weight", weight, ignore_index=ignore_index)
    return n_pairs


def check_rows(name: str, t: torch.Tensor, allowed: Sequence[int], what: str) -> int:
    """``t.shape[0]`` must be one of ``allowed``; returns it."""
    if t.shape[0] not in allowed:
        raise ValueError(f"{name} has {t.shape[0]} rows (shape {tuple(t.shape)}): expected {what}")
    return t.shape[0]


# ----------------------------------------------------------------------------------------------------------------------
# The reference side
# ----------------------------------------------------------------------------------------------------------------------


def default_reference_head(weight, bias, ref_weight, ref_bias) -> Tuple[torch.Tensor, Optional[torch.Tensor], bool]:
    """``(ref_weight, ref_bias, shared)``: the policy's ``(weight, bias)`` when ``ref_weight`` is None (a frozen head
    shared by both models, as with LoRA; then ``ref_bias`` must be None too), else the reference's own, unchecked.
    Detaching is left to the caller."""
    if ref_weight is None:
        if ref_bias is not None:
            raise ValueError(
                "ref_bias is given but ref_weight is None: expected both (a separate reference head) "
                "or neither (the reference shares the policy's weight and bias)"
            )
        return weight, bias, True
    return ref_weight, ref_bias, False


def check_ref_hidden(ref_hidden, hidden: torch.Tensor, *, ndim: Optional[int] = None) -> None:
    """The reference's hidden states: float, ``hidden``'s shape and device."""
    check_float("ref_hidden", ref_hidden, ndim=ndim)
    check_same_shape("ref_hidden", ref_hidden, "hidden", hidden)
    check_same_device("ref_hidden", ref_hidden, "hidden", hidden)


def check_ref_logps(ref_logps, hidden: torch.Tensor) -> None:
    """Precomputed per-sequence reference terms: ``[2B]`` float, one per row of ``hidden``, on its device."""
    check_float("ref_logps", ref_logps, ndim=1)
    if ref_logps.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"ref_logps has shape {tuple(ref_logps.shape)} but hidden has shape {tuple(hidden.shape)}: expected "
            "ref_logps.shape == (hidden.shape[0],) (2B: chosen rows first, then rejected)"
        )
    check_same_device("ref_logps", ref_logps, "hidden", hidden)


def check_reference_passes(named: Sequence[Tuple[str, Optional[torch.Tensor]]], ref_weight, ref_bias) -> bool:
    """All reference passes given, or none (reference-free, Δ = logp_θ). Returns whether they are given."""
    given = [name for name, t in named if t is not None]
    if given and len(given) != len(named):
        missing = [name for name, t in named if t is None]
        raise ValueError(
            f"{', '.join(given)} given but {', '.join(missing)} is None: expected every reference pass "
            f"({', '.join(n for n, _ in named)}) or none of them (reference-free)"
        )
    if not given and (ref_weight is not None or ref_bias is not None):
        raise ValueError(
            f"ref_weight/ref_bias given but {named[0][0]} is None: expected the reference's hidden states with its head"
        )
    return bool(given)


def resolve_reference(ref_hidden, ref_logps, hidden: torch.Tensor, *, extra_ref=None, extra_name: str = "") -> str:
    """Exactly one of the reference passes (``ref_hidden``, and ``extra_ref`` when the method has a second one) and
    ``ref_logps`` must be given; the passes go together. Returns ``"logps"`` or ``"hidden"``.

    Checks ``ref_logps`` (:func:`check_ref_logps`), or ``ref_hidden`` against ``hidden`` and ``extra_ref`` against
    ``ref_hidden``.
    """
    given_hidden = ref_hidden is not None or extra_ref is not None
    if given_hidden == (ref_logps is not None):
        names = "ref_hidden" + (f"/{extra_name}" if extra_name else "")
        raise ValueError(
            f"give exactly one of {names} (reference passes) and ref_logps (precomputed per-sequence reference terms), "
            f"got {'both' if given_hidden else 'neither'}"
        )
    if ref_logps is not None:
        check_ref_logps(ref_logps, hidden)
        return "logps"
    if ref_hidden is None:
        raise ValueError(
            f"{extra_name} was given without ref_hidden: give both reference passes "
            f"(ref_hidden and {extra_name} go together)"
        )
    if extra_name and extra_ref is None:
        raise ValueError(
            f"ref_hidden was given without {extra_name}: give both reference passes "
            f"(ref_hidden and {extra_name} go together)"
        )
    check_ref_hidden(ref_hidden, hidden, ndim=hidden.dim())
    if extra_ref is not None:
        check_like(extra_name, extra_ref, "ref_hidden", ref_hidden)
    return "hidden"


def check_reference_head(weight, bias, ref_weight, ref_bias, ref_hidden, hidden, *, ndim: Optional[int] = 3):
    """A reference model with the policy's shapes (the TPO and Cat-PO oracles): ``ref_hidden`` like ``hidden``,
    ``ref_weight`` like ``weight`` (or None: the policy's head), ``ref_hidden`` in ``ref_weight``'s dtype.

    Returns ``(ref_weight, ref_bias)``, detached when they are the policy's.
    """
    check_ref_hidden(ref_hidden, hidden, ndim=ndim)
    ref_weight, ref_bias, shared = default_reference_head(weight, bias, ref_weight, ref_bias)
    if shared:
        ref_weight, ref_bias = ref_weight.detach(), None if ref_bias is None else ref_bias.detach()
    else:
        check_float("ref_weight", ref_weight, ndim=2)
        check_same_shape("ref_weight", ref_weight, "weight", weight)
        check_same_device("ref_weight", ref_weight, "weight", weight)
    check_same_dtype("ref_hidden", ref_hidden, "ref_weight", ref_weight)
    if ref_bias is not None:
        check_bias("ref_bias", ref_bias, "ref_weight", ref_weight)
    return ref_weight, ref_bias


def check_catpo_arguments(hidden, labels, token_weights, ref_hidden, ref_logps, *, beta, kl_coef) -> None:
    """Cat-PO's own arguments, shared by the oracle (:mod:`vpo.oracle.catpo`) and :func:`vpo.fused_catpo_loss` (the policy's head
    and pass are checked by the caller): ``token_weights`` like ``labels``; β > 0, λ >= 0; ``ref_hidden`` (required
    when λ > 0, the KL needs the reference's distribution) or ``ref_logps`` (only with λ = 0), not both."""
    check_float("token_weights", token_weights)
    if token_weights.shape != labels.shape:
        raise ValueError(
            f"token_weights has shape {tuple(token_weights.shape)} but labels has shape {tuple(labels.shape)}: "
            "expected token_weights.shape == labels.shape ([2B, T])"
        )
    check_same_device("token_weights", token_weights, "hidden", hidden)
    check_positive("beta", beta)
    check_positive("kl_coef", kl_coef, allow_zero=True)
    if ref_hidden is not None and ref_logps is not None:
        raise ValueError("give ref_hidden or ref_logps, not both (ref_hidden gives the reference log-probs already)")
    if kl_coef > 0 and ref_hidden is None:
        raise ValueError(
            f"ref_hidden is required when kl_coef > 0 (the KL needs the reference's distribution), got kl_coef="
            f"{kl_coef} and ref_hidden=None; pass ref_hidden, or kl_coef=0 with ref_logps"
        )
    if ref_hidden is None and ref_logps is None:
        raise ValueError("give ref_hidden (the reference's hidden states) or ref_logps (precomputed [2B] sums)")
    if ref_hidden is not None:
        check_ref_hidden(ref_hidden, hidden, ndim=3)
    else:
        check_ref_logps(ref_logps, hidden)


def check_head_transform(logit_softcap, logit_scale) -> Tuple[float, float]:
    """``(softcap, scale)`` for the epilogue from the public ``logit_softcap`` (None or > 0: Gemma's
    ``final_logit_softcapping``) and ``logit_scale`` (None or > 0: Cohere's ``logit_scale``)."""
    for name, v in (("logit_softcap", logit_softcap), ("logit_scale", logit_scale)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v <= 0):
            raise ValueError(f"{name} must be None or a finite number > 0, got {v!r}")
    return float(logit_softcap or 0.0), float(1.0 if logit_scale is None else logit_scale)
