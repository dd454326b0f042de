"""Preference loss heads on per-sequence log-probs (docs/methods.md): the math of every method, written once.

The oracle (``vpo.oracle``) and the fused losses (``vpo.fused_dpo_loss``, ...) reduce their tokens to per-sequence
terms and call these. Every head takes ``[B]`` tensors (one value per pair) and returns ``(loss, metrics)``: the mean
over the batch and a dict of detached 0-dim tensors named as TRL names them (``rewards/chosen``, ...).

- :mod:`vpo.losses.heads`: DPO, the anchors, LPOI's listwise head, mDPO's conditional head.
- :mod:`vpo.losses.image_heads`: OViP's image-side heads (eq. 5 and the appendix variants).
- :mod:`vpo.losses.loss_types`: TRL's 15 DPO loss types (``sigmoid``, ``robust``, ``hinge``, ``ipo``, ``exo_pair``,
  ``nca_pair``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop``,
  ``sigmoid_norm``, ``sft``) as one per-pair function.
- :mod:`vpo.losses.trl_terms`: what TRL's other ``DPOConfig`` options change in the per-sequence terms:
  f-divergence scores, WPO weights, LD-DPO sums.
"""
from vpo.losses._common import Metrics
from vpo.losses.heads import (anchor_loss, bi_anchor_loss, dpo_loss, listwise_loss, mdpo_conditional_loss,
                               preference_metrics)
from vpo.losses.image_heads import ovip_base_image_loss, ovip_image_loss, ovip_symmetric_image_loss
from vpo.losses.loss_types import (BATCH_LOSS_TYPES, LOSS_TYPES, SMOOTHED_LOSS_TYPES, check_loss_options,
                                   preference_loss, preference_pair_losses, resolve_loss_types)
from vpo.losses.trl_terms import (F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES, f_divergence_scores, ld_dpo_logps,
                                  log_sum_p2_from_logits, wpo_weights)

__all__ = [
    "BATCH_LOSS_TYPES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSS_TYPES",
    "LOSS_TYPES",
    "SMOOTHED_LOSS_TYPES",
    "check_loss_options",
    "f_divergence_scores",
    "ld_dpo_logps",
    "log_sum_p2_from_logits",
    "wpo_weights",
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
