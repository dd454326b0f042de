"""Fused preference losses on last hidden states + the LM head (no ``[tokens × vocab]`` logits)."""
from vpo.fused._common import PreferenceOutput
from vpo.fused.catpo import CatPOOutput, fused_catpo_loss
from vpo.fused.dpo import fused_dpo_loss
from vpo.fused.tpo import TPOOutput, fused_tpo_loss

__all__ = ["CatPOOutput", "PreferenceOutput", "fused_catpo_loss", "TPOOutput", "fused_dpo_loss", "fused_tpo_loss"]
