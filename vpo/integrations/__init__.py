"""Integrations with model libraries: Cat-PO image-attention capture in transformers models
(:mod:`vpo.integrations.attention_capture`) and the Cat-PO token weights built on it
(:mod:`vpo.integrations.catpo_weights`)."""
from vpo.integrations.attention_capture import (
    ImageAttentionCapture,
    capture_image_attention,
    image_token_positions,
)
from vpo.integrations.catpo_weights import catpo_weights_for_batch

__all__ = ["ImageAttentionCapture", "capture_image_attention", "catpo_weights_for_batch", "image_token_positions"]
