"""Oracle for OViP's loss from last hidden states (docs/methods.md "OViP"; paper 002, eqs. 4–6 and appendix B.1).

``L_OViP = L_text + L_image``: ``L_text`` is DPO on (A⁺, A⁻) given (I⁺, Q); ``L_image`` compares A⁺ across three
passes — with the image I⁺, image-free (the image tokens removed from the input, not a blank image) and with the
negative image I⁻. The appendix ablations are options: ``image_loss`` picks eq. 5 (``"ovip"``), the base image loss or
the symmetric one; ``anchor`` adds the anchor or the bi-directional anchor. The math is in :mod:`vpo.losses`; this
module only turns hidden states into per-sequence log-probs (materializing the logits) and adds the heads up.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vpo import losses
from vpo._validate import check_choice, check_even_batch, check_float
from vpo._heads import check_reference_passes, check_rows
from vpo.oracle.dpo import Metrics, heads, merge_metrics, pass_logps

IMAGE_LOSSES = ("ovip", "base", "symmetric")
ANCHORS = (None, "anchor", "bi-anchor")
BI_ANCHOR_REJECTED = ("noimg", "img")
BI_ANCHOR_FORMS = ("paper", "bounded")


def ovip_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    noimg_hidden: Optional[torch.Tensor],
    noimg_labels: Optional[torch.Tensor],
    negimg_hidden: torch.Tensor,
    negimg_labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_noimg_hidden: Optional[torch.Tensor] = None,
    ref_negimg_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    beta1: float = 0.1,
    beta2: float = 0.1,
    label_smoothing: float = 0.0,
    image_loss: str = "ovip",
    anchor: Optional[str] = None,
    bi_anchor_form: str = "paper",
    bi_anchor_rejected: str = "noimg",
    ignore_index: int = -100,
) -> Tuple[torch.Tensor, Metrics]:
    """OViP: ``L_text + L_image`` (+ an optional anchor term), from the hidden states of the three passes.

    Each pass has its own labels (the image-free pass is shorter: no image tokens); all are aligned as in
    :func:`vpo.oracle.dpo.dpo_loss` and score the same response tokens.

    Args:
        weight, bias: the policy's LM head ``[V, D]``, ``[V]`` (optional).
        hidden, labels: ``[2B, T, D]``, ``[2B, T]`` with the image I⁺: A⁺ rows first, then A⁻.
        noimg_hidden, noimg_labels: ``[B, T0, D]``, ``[B, T0]`` image-free pass of A⁺; or ``[2B, …]`` (A⁺ rows,
            then A⁻) — needed for ``image_loss="symmetric"`` and for ``anchor="bi-anchor"`` with
            ``bi_anchor_rejected="noimg"``.
            May be None only with ``image_loss="base"`` when no anchor needs it.
        negimg_hidden, negimg_labels: ``[B, T1, D]``, ``[B, T1]`` pass of A⁺ with the negative image I⁻;
            ``[2B, …]`` (A⁺ then A⁻) for ``image_loss="symmetric"``.
        ref_hidden, ref_noimg_hidden, ref_negimg_hidden: the reference's hidden states for the same passes (same
            shapes; they share the policy's labels), all or none (reference-free: Δ = logp_θ).
        ref_weight, ref_bias: the reference's head; None: the policy's (a shared frozen head).
        beta: β of the text DPO, of the base image loss and of the anchors. beta1, beta2: β1, β2 of eq. 5.
        label_smoothing: of the text DPO.
        image_loss: ``"ovip"`` (eq. 5, :func:`vpo.losses.ovip_image_loss`), ``"base"``
            (:func:`vpo.losses.ovip_base_image_loss`) or ``"symmetric"`` (:func:`vpo.losses.ovip_symmetric_image_loss`).
        anchor: None, ``"anchor"`` (:func:`vpo.losses.anchor_loss`, δ = 0, on A⁺ given I⁺) or ``"bi-anchor"``
            (:func:`vpo.losses.bi_anchor_loss`).
        bi_anchor_form: ``"paper"`` or ``"bounded"`` (see :func:`vpo.losses.bi_anchor_loss`).
        bi_anchor_rejected: which pass of A⁻ the bi-anchor pushes down: ``"noimg"`` (the paper's ``(A⁻|Q)``) or
            ``"img"`` (``(A⁻|I⁺,Q)``). **[choice: the paper's equation, "noimg"]**
        ignore_index: label of positions without a target.

    Returns:
        ``(loss, metrics)``: the metrics of each head (``rewards/*``, ``logps/*``, ``image/*``, ``anchor/*``…) plus
        ``dpo/loss`` (the text term).

    Example:
        >>> import torch
        >>> from vpo.oracle.ovip import ovip_loss
        >>> W = torch.eye(3, dtype=torch.float64)
        >>> h, y = torch.zeros(2, 1, 3, dtype=torch.float64), torch.tensor([[0], [1]])
        >>> loss, m = ovip_loss(W, h, y, h[:1], y[:1], h[:1], y[:1], ref_hidden=h,
        ...                     ref_noimg_hidden=h[:1], ref_negimg_hidden=h[:1])
        >>> round(loss.item(), 4)  # 2 log 2: every Δ is 0
        1.3863
    """
    check_choice("image_loss", image_loss, IMAGE_LOSSES)
    check_choice("anchor", anchor, ANCHORS)
    check_choice("bi_anchor_form", bi_anchor_form, BI_ANCHOR_FORMS)
    check_choice("bi_anchor_rejected", bi_anchor_rejected, BI_ANCHOR_REJECTED)
    head = heads(weight, bias, ref_weight, ref_bias)
    n_pairs = check_even_batch("hidden", check_float("hidden", hidden, ndim=3))
    symmetric = image_loss == "symmetric"
    need_noimg = image_loss != "base" or (anchor == "bi-anchor" and bi_anchor_rejected == "noimg")
    need_noimg_rejected = symmetric or (anchor == "bi-anchor" and bi_anchor_rejected == "noimg")

    if (noimg_hidden is None) != (noimg_labels is None):
        raise ValueError(
            f"noimg_hidden is {'None' if noimg_hidden is None else 'given'} but noimg_labels is "
            f"{'None' if noimg_labels is None else 'given'}: expected both (the image-free pass) or neither"
        )
    if noimg_hidden is None:
        if need_noimg:
            raise ValueError(
                f"noimg_hidden and noimg_labels are required with image_loss={image_loss!r}, anchor={anchor!r}, "
                f"bi_anchor_rejected={bi_anchor_rejected!r}, got None"
            )
        if ref_noimg_hidden is not None:
            raise ValueError("ref_noimg_hidden is given but noimg_hidden is None: expected both or neither")
    rows = (2 * n_pairs,) if need_noimg_rejected else (n_pairs, 2 * n_pairs)
    what = f"{' or '.join(map(str, rows))} (B={n_pairs} A⁺ rows, then the B A⁻ rows)"
    if noimg_hidden is not None:
        check_rows("noimg_hidden", check_float("noimg_hidden", noimg_hidden, ndim=3), rows, what)
    neg_rows = (2 * n_pairs,) if symmetric else (n_pairs, 2 * n_pairs)
    neg_what = f"{' or '.join(map(str, neg_rows))} (B={n_pairs} A⁺ rows, then the B A⁻ rows)"
    check_rows("negimg_hidden", check_float("negimg_hidden", negimg_hidden, ndim=3), neg_rows, neg_what)
    ref_passes = [("ref_hidden", ref_hidden), ("ref_negimg_hidden", ref_negimg_hidden)]
    if noimg_hidden is not None:
        ref_passes.insert(1, ("ref_noimg_hidden", ref_noimg_hidden))
    check_reference_passes(ref_passes, ref_weight, ref_bias)

    # Per-sequence log-probs of every pass, policy and reference.
    img, ref_img = pass_logps(
        "hidden", hidden, "labels", labels, "ref_hidden", ref_hidden, head, ignore_index=ignore_index
    )  # [2B]
    neg, ref_neg = pass_logps(
        "negimg_hidden", negimg_hidden, "negimg_labels", negimg_labels, "ref_negimg_hidden", ref_negimg_hidden, head,
        ignore_index=ignore_index,
    )  # [B] or [2B]
    if noimg_hidden is not None:
        noimg, ref_noimg = pass_logps(
            "noimg_hidden", noimg_hidden, "noimg_labels", noimg_labels, "ref_noimg_hidden", ref_noimg_hidden, head,
            ignore_index=ignore_index,
        )  # [B] or [2B]
    pos, rej = slice(0, n_pairs), slice(n_pairs, 2 * n_pairs)  # A⁺ rows, A⁻ rows

    text, text_metrics = losses.dpo_loss(
        img[pos], img[rej], ref_img[pos], ref_img[rej], beta=beta, label_smoothing=label_smoothing
    )
    if image_loss == "ovip":
        image, image_metrics = losses.ovip_image_loss(
            img[pos], noimg[pos], neg[pos], ref_img[pos], ref_noimg[pos], ref_neg[pos], beta1=beta1, beta2=beta2
        )
    elif image_loss == "base":
        image, image_metrics = losses.ovip_base_image_loss(img[pos], neg[pos], ref_img[pos], ref_neg[pos], beta=beta)
    else:
        image, image_metrics = losses.ovip_symmetric_image_loss(
            img[pos], noimg[pos], neg[pos],
            img[rej], noimg[rej], neg[rej],
            ref_img[pos], ref_noimg[pos], ref_neg[pos],
            ref_img[rej], ref_noimg[rej], ref_neg[rej],
            beta1=beta1,
            beta2=beta2,
        )  # fmt: skip
    total = text + image
    parts = [text_metrics, {"dpo/loss": text.detach()}, image_metrics]
    if anchor == "anchor":
        aux, aux_metrics = losses.anchor_loss(img[pos], ref_img[pos], beta=beta)
        total, parts = total + aux, parts + [aux_metrics]
    elif anchor == "bi-anchor":
        rejected, ref_rejected = (noimg, ref_noimg) if bi_anchor_rejected == "noimg" else (img, ref_img)
        aux, aux_metrics = losses.bi_anchor_loss(
            img[pos], rejected[rej], ref_img[pos], ref_rejected[rej], beta=beta, form=bi_anchor_form
        )
        total, parts = total + aux, parts + [aux_metrics]
    return total, merge_metrics(*parts)
