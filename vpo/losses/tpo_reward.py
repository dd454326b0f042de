"""TPO's self-calibrated token reward (docs/methods.md, TPO), elementwise on ``[R, T]``: the one definition, used by
the oracle (:mod:`vpo.oracle.tpo`), the fused loss (:func:`vpo.fused_tpo_loss`) and the trainer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vpo._validate import check_choice, check_float, check_positive, check_same_device, check_tensor

REWARD_MODES = ("both", "only_win", "only_loss", "opposite")


def tpo_log_calibrated_reward(
    s: torch.Tensor, is_chosen_row: torch.Tensor, *, a: float = 0.5, rewards: str = "both"
) -> torch.Tensor:
    """``log c`` for scores ``s`` (see :func:`tpo_calibrated_reward`), computed stably."""
    check_float("s", s)
    chosen = _broadcast_rows(is_chosen_row, s)
    check_positive("a", a, allow_zero=True)
    check_choice("rewards", rewards, REWARD_MODES)

    # x = s where the reward is a + σ(s), -s where it is a + 1 - σ(s) = a + σ(-s)
    rising = ~chosen if rewards == "opposite" else chosen
    x = torch.where(rising, s, -s)
    log_c = F.logsigmoid(x) if a == 0 else torch.log(a + torch.sigmoid(x))
    if rewards == "only_win":
        log_c = torch.where(chosen, log_c, torch.zeros_like(log_c))
    elif rewards == "only_loss":
        log_c = torch.where(chosen, torch.zeros_like(log_c), log_c)
    return log_c


def _broadcast_rows(is_chosen_row, s) -> torch.Tensor:
    check_tensor("is_chosen_row", is_chosen_row, dtypes=(torch.bool,))
    check_same_device("is_chosen_row", is_chosen_row, "s", s)
    if is_chosen_row.shape == s.shape:
        return is_chosen_row
    if s.dim() >= 1 and is_chosen_row.dim() == 1 and is_chosen_row.shape[0] == s.shape[0]:
        return is_chosen_row.reshape(-1, *([1] * (s.dim() - 1)))
    raise ValueError(
        f"is_chosen_row has shape {tuple(is_chosen_row.shape)} but s has shape {tuple(s.shape)}: expected "
        "(s.shape[0],) (one flag per row) or s.shape"
    )
