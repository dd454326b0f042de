"""OViP's image-side loss heads (paper eq. 5 and appendix B.1; docs/methods.md, OViP): the response fixed, the image
varied — the positive image ``I⁺``, no image, the negative image ``I⁻``.

Same conventions as :mod:`vpo.losses.heads`: ``[B]`` per-sequence log-probs, ``Δ = logp_θ - logp_ref``, the batch
mean, detached metrics under ``image/…``. The appendix's anchors (:func:`~vpo.losses.anchor_loss`,
:func:`~vpo.losses.bi_anchor_loss`) are in :mod:`vpo.losses.heads`.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from vpo._validate import check_positive
from vpo.losses._common import Metrics, _check_seqs, _fraction, _margin_loss

def _image_margin(d_img, d_noimg, d_negimg, beta1: float, beta2: float) -> torch.Tensor:
    # β1 [Δ(A|I⁺,Q) − Δ(A|Q)] + β2 [Δ(A|Q) − Δ(A|I⁻,Q)]   [B]
    return beta1 * (d_img - d_noimg) + beta2 * (d_noimg - d_negimg)


def ovip_image_loss(
    logps_img: torch.Tensor,
    logps_noimg: torch.Tensor,
    logps_negimg: torch.Tensor,
    ref_logps_img: torch.Tensor,
    ref_logps_noimg: torch.Tensor,
    ref_logps_negimg: torch.Tensor,
    *,
    beta1: float = 0.1,
    beta2: float = 0.1,
) -> Tuple[torch.Tensor, Metrics]:
    """OViP's image-side loss (paper eq. 5; docs/methods.md "OViP")::

        L_image = -log σ( β1 [Δ(A⁺|I⁺,Q) − Δ(A⁺|Q)] + β2 [Δ(A⁺|Q) − Δ(A⁺|I⁻,Q)] )

    ``(A⁺|Q)`` is the image-free pass (the image tokens removed from the input). With β1 = β2 = β the image-free
    terms cancel and this equals :func:`ovip_base_image_loss` (appendix B.1).
    The appendix variants: :func:`ovip_base_image_loss`, :func:`ovip_symmetric_image_loss`, :func:`anchor_loss`
    (``L_Anchor``, δ = 0) and :func:`bi_anchor_loss` (``L_Bi-Anchor``).

    Args:
        logps_img: ``[B]`` policy log-probs of A⁺ given (I⁺, Q).
        logps_noimg: ``[B]`` policy log-probs of A⁺ given Q alone (image-free pass).
        logps_negimg: ``[B]`` policy log-probs of A⁺ given (I⁻, Q), I⁻ the negative image.
        ref_logps_img, ref_logps_noimg, ref_logps_negimg: ``[B]`` the reference's, same passes.
        beta1, beta2: β1, β2 > 0 (0.1 in the paper).

    Returns:
        ``(loss, metrics)`` with ``image/loss``, ``image/margin`` (mean of the argument of σ), ``image/accuracy``
        (fraction with margin > 0) and ``image/logps_img``, ``image/logps_noimg``, ``image/logps_negimg`` (policy
        means).

    Example:
        >>> import torch
        >>> from vpo.losses import ovip_image_loss
        >>> t = torch.tensor
        >>> loss, m = ovip_image_loss(t([-1.0]), t([-3.0]), t([-5.0]), t([-2.0]), t([-3.0]), t([-4.0]))
        >>> round(m["image/margin"].item(), 4)  # 0.1 * (1 - 0) + 0.1 * (0 - (-1))
        0.2
    """
    _check_seqs(
        ("logps_img", logps_img),
        ("logps_noimg", logps_noimg),
        ("logps_negimg", logps_negimg),
        ("ref_logps_img", ref_logps_img),
        ("ref_logps_noimg", ref_logps_noimg),
        ("ref_logps_negimg", ref_logps_negimg),
    )
    check_positive("beta1", beta1)
    check_positive("beta2", beta2)

    margin = _image_margin(
        logps_img - ref_logps_img, logps_noimg - ref_logps_noimg, logps_negimg - ref_logps_negimg, beta1, beta2
    )  # [B]
    logps = {"image/logps_img": logps_img, "image/logps_noimg": logps_noimg, "image/logps_negimg": logps_negimg}
    return _margin_loss("image", margin, logps)


def ovip_base_image_loss(
    logps_img: torch.Tensor,
    logps_negimg: torch.Tensor,
    ref_logps_img: torch.Tensor,
    ref_logps_negimg: torch.Tensor,
    *,
    beta: float = 0.1,
) -> Tuple[torch.Tensor, Metrics]:
    """OViP's base image loss (appendix B.1, ``L_Image^base``): DPO with the image pair in place of the response pair::

        L = -log σ( β [Δ(A⁺|I⁺,Q) − Δ(A⁺|I⁻,Q)] )

    The paper prints it without the leading minus sign; that is a typo (as printed, minimizing it would prefer the
    negative image), so the minus is restored here. It equals :func:`ovip_image_loss` with β1 = β2 = β.

    Args:
        logps_img, ref_logps_img: ``[B]`` policy / reference log-probs of A⁺ given (I⁺, Q).
        logps_negimg, ref_logps_negimg: ``[B]`` policy / reference log-probs of A⁺ given (I⁻, Q).
        beta: β > 0.

    Returns:
        ``(loss, metrics)`` with ``image/loss``, ``image/margin``, ``image/accuracy``, ``image/logps_img``,
        ``image/logps_negimg`` (same names as :func:`ovip_image_loss`: the variants are alternatives).

    Example:
        >>> import torch
        >>> from vpo.losses import ovip_base_image_loss
        >>> t = torch.tensor
        >>> loss, m = ovip_base_image_loss(t([-1.0]), t([-5.0]), t([-2.0]), t([-4.0]))
        >>> round(m["image/margin"].item(), 4)  # 0.1 * (1 - (-1))
        0.2
    """
    _check_seqs(
        ("logps_img", logps_img),
        ("logps_negimg", logps_negimg),
        ("ref_logps_img", ref_logps_img),
        ("ref_logps_negimg", ref_logps_negimg),
    )
    check_positive("beta", beta)

    margin = beta * ((logps_img - ref_logps_img) - (logps_negimg - ref_logps_negimg))  # [B]
    return _margin_loss("image", margin, {"image/logps_img": logps_img, "image/logps_negimg": logps_negimg})


def ovip_symmetric_image_loss(
    chosen_logps_img: torch.Tensor,
    chosen_logps_noimg: torch.Tensor,
    chosen_logps_negimg: torch.Tensor,
    rejected_logps_img: torch.Tensor,
    rejected_logps_noimg: torch.Tensor,
    rejected_logps_negimg: torch.Tensor,
    ref_chosen_logps_img: torch.Tensor,
    ref_chosen_logps_noimg: torch.Tensor,
    ref_chosen_logps_negimg: torch.Tensor,
    ref_rejected_logps_img: torch.Tensor,
    ref_rejected_logps_noimg: torch.Tensor,
    ref_rejected_logps_negimg: torch.Tensor,
    *,
    beta1: float = 0.1,
    beta2: float = 0.1,
) -> Tuple[torch.Tensor, Metrics]:
    """OViP's symmetric image loss (appendix B.1, ``L_Image-Sym``): eq. 5 for A⁺, plus eq. 5 for A⁻ with the images
    swapped (the negative image I⁻ is the right image for the negative response A⁻)::

        L = L_image(I⁺, I⁻; Q, A⁺) + L_image(I⁻, I⁺; Q, A⁻)
          = -log σ( β1 [Δ(A⁺|I⁺,Q) − Δ(A⁺|Q)] + β2 [Δ(A⁺|Q) − Δ(A⁺|I⁻,Q)] )
            -log σ( β1 [Δ(A⁻|I⁻,Q) − Δ(A⁻|Q)] + β2 [Δ(A⁻|Q) − Δ(A⁻|I⁺,Q)] )

    (the paper's second line reads "= -log σ(…)" where "+ (-log σ(…))" is meant: its first line defines a sum.)
    Arguments are named by the image of the pass, not by its role: ``*_img`` is always I⁺, ``*_negimg`` always I⁻.

    Args:
        chosen_logps_{img,noimg,negimg}: ``[B]`` policy log-probs of A⁺ given (I⁺,Q), Q, (I⁻,Q).
        rejected_logps_{img,noimg,negimg}: ``[B]`` policy log-probs of A⁻ given (I⁺,Q), Q, (I⁻,Q).
        ref_*: the reference's, same passes.
        beta1, beta2: β1, β2 > 0.

    Returns:
        ``(loss, metrics)``: the batch mean of the sum of both terms; ``image/loss``, ``image/margin`` and
        ``image/accuracy`` (the A⁺ term, as in :func:`ovip_image_loss`), ``image/margin_rejected`` and
        ``image/accuracy_rejected`` (the A⁻ term).

    Example:
        >>> import torch
        >>> from vpo.losses import ovip_symmetric_image_loss
        >>> z = torch.zeros(2)
        >>> round(ovip_symmetric_image_loss(*[z] * 12)[0].item(), 4)  # 2 log 2
        1.3863
    """
    names = (
        "chosen_logps_img", "chosen_logps_noimg", "chosen_logps_negimg",
        "rejected_logps_img", "rejected_logps_noimg", "rejected_logps_negimg",
        "ref_chosen_logps_img", "ref_chosen_logps_noimg", "ref_chosen_logps_negimg",
        "ref_rejected_logps_img", "ref_rejected_logps_noimg", "ref_rejected_logps_negimg",
    )  # fmt: skip
    tensors = (
        chosen_logps_img, chosen_logps_noimg, chosen_logps_negimg,
        rejected_logps_img, rejected_logps_noimg, rejected_logps_negimg,
        ref_chosen_logps_img, ref_chosen_logps_noimg, ref_chosen_logps_negimg,
        ref_rejected_logps_img, ref_rejected_logps_noimg, ref_rejected_logps_negimg,
    )  # fmt: skip
    _check_seqs(*zip(names, tensors))
    check_positive("beta1", beta1)
    check_positive("beta2", beta2)

    chosen_margin = _image_margin(
        chosen_logps_img - ref_chosen_logps_img,
        chosen_logps_noimg - ref_chosen_logps_noimg,
        chosen_logps_negimg - ref_chosen_logps_negimg,
        beta1,
        beta2,
    )  # [B]
    # A⁻ with the roles of the images swapped: I⁻ is its positive image, I⁺ its negative one.
    rejected_margin = _image_margin(
        rejected_logps_negimg - ref_rejected_logps_negimg,
        rejected_logps_noimg - ref_rejected_logps_noimg,
        rejected_logps_img - ref_rejected_logps_img,
        beta1,
        beta2,
    )  # [B]
    loss = -(F.logsigmoid(chosen_margin) + F.logsigmoid(rejected_margin)).mean()
    with torch.no_grad():
        metrics = {
            "image/loss": loss.detach(),
            "image/margin": chosen_margin.detach().mean(),
            "image/accuracy": _fraction(chosen_margin > 0, chosen_margin),
            "image/margin_rejected": rejected_margin.detach().mean(),
            "image/accuracy_rejected": _fraction(rejected_margin > 0, rejected_margin),
        }
    return loss, metrics
