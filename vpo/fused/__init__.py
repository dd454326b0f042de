"""Fused preference losses on last hidden states + the LM head (no ``[tokens × vocab]`` logits); the policy's gradient
is formed in the forward (:mod:`vpo.fused._engine`)."""
from vpo.fused._common import PreferenceOutput
from vpo.fused._engine import Chunking
from vpo.fused.catpo import CatPOOutput, fused_catpo_loss
from vpo.fused.dpo import fused_dpo_loss
from vpo.fused.tpo import TPOOutput, fused_tpo_loss

__all__ = ["CatPOOutput", "Chunking", "PreferenceOutput", "TPOOutput", "fused_catpo_loss", "fused_dpo_loss",
           "fused_tpo_loss"]
