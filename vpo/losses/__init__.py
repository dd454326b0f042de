"""Preference loss heads on per-sequence log-probs (docs/methods.md): the math of every method, written once.

The oracle (``vpo.oracle``) and the fused losses (``vpo.fused_dpo_loss``, ...) reduce their tokens to per-sequence
terms and call these. Every head takes ``[B]`` tensors (one value per pair) and returns ``(loss, metrics)``: the mean
over the batch and a dict of detached 0-dim tensors named as TRL names them (``rewards/chosen``, ...).

- :mod:`vpo.losses.heads`: DPO, the anchors, OViP's image-side heads, LPOI's listwise head, mDPO's conditional head.
- :mod:`vpo.losses.loss_types`: TRL's DPO loss types (``sigmoid``, ``robust``, ``hinge``, ``ipo``, ``apo_zero``,
  ``sigmoid_norm``, ``sft``) as one per-pair function.
"""
from vpo.losses.heads import (
    Metrics,
    anchor_loss,
    bi_anchor_loss,
    dpo_loss,
    listwise_loss,
    mdpo_conditional_loss,
    ovip_base_image_loss,
    ovip_image_loss,
    ovip_symmetric_image_loss,
    preference_metrics,
)
from vpo.losses.loss_types import LOSS_TYPES, preference_loss, preference_pair_losses, resolve_loss_types

__all__ = [
    "LOSS_TYPES",
    "Metrics",
    "anchor_loss",
    "bi_anchor_loss",
    "dpo_loss",
    "listwise_loss",
    "mdpo_conditional_loss",
    "ovip_base_image_loss",
    "ovip_image_loss",
    "ovip_symmetric_image_loss",
    "preference_loss",
    "preference_metrics",
    "preference_pair_losses",
    "resolve_loss_types",
]
