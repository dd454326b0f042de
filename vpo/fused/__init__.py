"""Fused preference losses on last hidden states + the LM head (no ``[tokens × vocab]`` logits)."""
from vpo.fused._common import PreferenceOutput
from vpo.fused.dpo import fused_dpo_loss
from vpo.fused.tpo import TPOOutput, fused_tpo_loss

__all__ = ["PreferenceOutput", "TPOOutput", "fused_dpo_loss", "fused_tpo_loss"]
