"""Model builders: tiny random-weight VLMs of real ``transformers`` architectures (:mod:`vpo.models.tiny`)."""
from vpo.models.tiny import TinyVLM, make_inputs, tiny_idefics2, tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl

__all__ = ["TinyVLM", "make_inputs", "tiny_idefics2", "tiny_llava", "tiny_qwen2_5_vl", "tiny_qwen2_vl"]
