"""Integrations with model libraries: Cat-PO image-attention capture in transformers models
(:mod:`vpo.integrations.attention_capture`)."""
from vpo.integrations.attention_capture import (
    ImageAttentionCapture,
    capture_image_attention,
    catpo_weights_for_batch,
    image_token_positions,
)

__all__ = ["ImageAttentionCapture", "capture_image_attention", "catpo_weights_for_batch", "image_token_positions"]
