"""TRL's running metrics that are not per-batch means: ``num_tokens``.

TRL's ``DPOTrainer`` logs ``num_tokens`` as the running total, over the training steps so far (and over processes),
of ``attention_mask.sum()`` of the concatenated chosen + rejected batch: every attended token of both rows, the
prompt's (image tokens included) once per row, padding not. vpo counts the same on the main pass's batch (the rows
the DPO term reads; a method's extra passes — TPO's noised image, OViP's image-free rows — are not counted), keeps
the total in its checkpoint state, and logs it under ``num_tokens``; ``num_tokens/chosen`` and ``num_tokens/rejected``
stay vpo's per-row means of the scored (response) tokens.
"""
from __future__ import annotations

from typing import Mapping

import torch


def count_tokens(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Attended tokens of a batch, a 0-dim int64 tensor on the batch's device (no host sync): ``attention_mask.sum()``,
    ``input_ids.numel()`` without a mask, 0 without ``input_ids`` (a batch whose records were all skipped)."""
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.numel() == 0:
        return torch.zeros((), dtype=torch.long)
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return mask.sum().long()
    return torch.tensor(ids.numel(), dtype=torch.long, device=ids.device)
