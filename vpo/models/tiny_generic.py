"""Tiny random models of more image-text-to-text architectures, each with a real processor — no download.

They exercise vpo's GENERIC path (:class:`vpo.data.PreferenceCollator` with ``family="generic"``: the processor and
its chat template decide the tokens and the vision keys), not a tuned collator. Each builder returns
``(model, processor)``: the real ``*ForConditionalGeneration`` class from a shrunken config (hidden 64, 2 LM layers,
a 2-layer vision tower over 16x16 images) and the real processor class over a word-level tokenizer
(:data:`vpo.data.TINY_WORDS` plus the architecture's special tokens at the top ids).

===============  ===========================================  ==========================================================
name             model / processor                            vision inputs
===============  ===========================================  ==========================================================
``llava_next``   ``LlavaNextForConditionalGeneration`` /      ``pixel_values [n, patches, 3, 16, 16]``, ``image_sizes``
                 ``LlavaNextProcessor`` (any-res tiling)
``gemma3``       ``Gemma3ForConditionalGeneration`` /         ``pixel_values [n, 3, 16, 16]``, ``token_type_ids``
                 ``Gemma3Processor`` (SigLIP, pooled to 4)
``idefics3``     ``Idefics3ForConditionalGeneration`` /       ``pixel_values [1, n, 3, 16, 16]``, ``pixel_attention_mask``
                 ``Idefics3Processor`` (SmolVLM's design)
``qwen3_vl``     ``Qwen3VLForConditionalGeneration`` /        flattened patches, ``image_grid_thw``, ``mm_token_type_ids``
                 ``Qwen3VLProcessor`` (DeepStack ViT)
===============  ===========================================  ==========================================================
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from vpo._validate import check_choice

ARCHS = ("llava_next", "gemma3", "idefics3", "qwen3_vl")
V = 128  # vocabulary size of every tiny generic model


def _tokenizer(specials: Dict[int, str], *, bos=None, eos: str, extra=None, prepend_bos: bool = False,
               words_below: int = V - 16):
    """A word-level ``PreTrainedTokenizerFast``: id 0 = ``<pad>``, the TINY_WORDS (ids below ``words_below``),
    ``specials`` = {offset from V}."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from vpo.data.processors import TINY_WORDS

    vocab = {"<pad>": 0}
    for i, w in enumerate(dict.fromkeys(["model", *(w.lower() for w in TINY_WORDS)]), start=1):
        if i >= words_below:
            break
        vocab[w] = i
    for off, tok in specials.items():
        vocab[tok] = V - off
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.add_special_tokens(["<pad>", *specials.values()])
    if prepend_bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                          special_tokens=[(bos, vocab[bos])])
    kwargs = dict(pad_token="<pad>", unk_token="<unk>", eos_token=eos, padding_side="right")
    if bos is not None:
        kwargs["bos_token"] = bos
    if extra:
        kwargs["extra_special_tokens"] = extra
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


def _text(**over) -> dict:
    cfg = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, pad_token_id=0,
               bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    cfg.update(over)
    return cfg


def _build(cls, config, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.to(torch.float32).eval()


def _template(user: str, assistant: str, end: str, image: str, gen: str, bos: str = "") -> str:
    """A Jinja chat template: ``bos``, then per message ``user``/``assistant`` header, the parts (images as
    ``image``), ``end``; the generation prompt ``gen``."""
    return (
        bos + "{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}" + assistant + "{% else %}" + user + "{% endif %}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}" + end + "{% endfor %}"
        "{% if add_generation_prompt %}" + gen + "{% endif %}"
    )


def tiny_llava_next(seed: int = 0):
    """Tiny LLaVA-NeXT: CLIP over 16x16 tiles (4 tokens each, CLS dropped), any-res grid ``[[16, 16], [16, 32]]``."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)

    pinpoints = [[16, 16], [16, 32]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=16, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(**_text()), image_token_index=V - 1, image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-1, attn_implementation="sdpa")
    model = _build(LlavaNextForConditionalGeneration, config, seed)
    tok = _tokenizer({1: "<image>", 6: "</s>", 7: "<s>", 8: "<unk>"}, bos="<s>", eos="</s>", prepend_bos=True)
    template = _template("USER: ", "ASSISTANT: ", "{% if m['role'] == 'assistant' %}</s>{% else %} {% endif %}",
                         "<image>\n", "ASSISTANT:")
    tok.chat_template = template
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                    image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=template)
    return model, proc


def tiny_gemma3(seed: int = 0):
    """Tiny Gemma 3: SigLIP over 16x16 images (16 patches pooled to 4 soft tokens), Gemma-3 LM (no soft-capping)."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)

    text = Gemma3TextConfig(**_text(head_dim=16, sliding_window=64, query_pre_attn_scalar=16,
                                    final_logit_softcapping=None, attn_logit_softcapping=None))
    config = Gemma3Config(
        text_config=text,
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=16, patch_size=4),
        mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 2, eoi_token_index=V - 3,
        attn_implementation="sdpa")
    model = _build(Gemma3ForConditionalGeneration, config, seed)
    specials = {1: "<image_soft_token>", 2: "<start_of_image>", 3: "<end_of_image>", 4: "<start_of_turn>",
                5: "<end_of_turn>", 6: "<eos>", 7: "<bos>", 8: "<unk>"}
    tok = _tokenizer(specials, bos="<bos>", eos="<eos>", extra={
        "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    template = _template("<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>\n", "<start_of_image>",
                         "<start_of_turn>model\n", bos="<bos>")
    tok.chat_template = template
    ip = Gemma3ImageProcessorPil(size={"height": 16, "width": 16}, do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=template)
    return model, proc


def tiny_idefics3(seed: int = 0):
    """Tiny Idefics3 (SmolVLM's architecture): SigLIP over 16x16 images, pixel shuffle 2 -> 4 tokens, Llama LM."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor, Idefics3VisionConfig, LlamaConfig)

    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=4),
        text_config=LlamaConfig(**_text()), scale_factor=2, image_token_id=V - 1, attn_implementation="sdpa",
        use_cache=False)
    model = _build(Idefics3ForConditionalGeneration, config, seed)
    specials = {1: "<image>", 2: "<fake_token_around_image>", 3: "<end_of_utterance>", 4: "<global-img>",
                6: "</s>", 7: "<s>", 8: "<unk>"}
    tok = _tokenizer(specials, bos="<s>", eos="</s>", prepend_bos=True)
    template = _template("User:", "Assistant: ", "<end_of_utterance>\n", "<image>", "Assistant:")
    tok.chat_template = template
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 16}, max_image_size={"longest_edge": 16},
                                   do_image_splitting=False)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=template)
    return model, proc


def tiny_qwen3_vl(seed: int = 0):
    """Tiny Qwen3-VL: DeepStack ViT (patch 4, merge 2) over 16x24 images -> 6 tokens, Qwen3 LM with M-RoPE."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from vpo.data.processors import QWEN_CHAT_TEMPLATE, _ImagesOnlyVideoProcessor, _images_only_class

    text = _text(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, deepstack_visual_indexes=[1],
                  num_position_embeddings=64)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=V - 1, vision_start_token_id=V - 2,
                           vision_end_token_id=V - 3, video_token_id=V - 4, attn_implementation="sdpa")
    model = _build(Qwen3VLForConditionalGeneration, config, seed)
    specials = {1: "<|image_pad|>", 2: "<|vision_start|>", 3: "<|vision_end|>", 4: "<|video_pad|>",
                5: "<|im_start|>", 6: "<|im_end|>", 7: "<|endoftext|>", 8: "<unk>"}
    tok = _tokenizer(specials, eos="<|im_end|>")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    qkw = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    ip = Qwen2VLImageProcessorPil(min_pixels=64, max_pixels=384, **qkw)
    cls = _images_only_class("Qwen3VLProcessor")
    if cls is None:  # pragma: no cover
        cls = transformers.Qwen3VLProcessor
    proc = cls(image_processor=ip, tokenizer=tok, video_processor=_ImagesOnlyVideoProcessor(**qkw),
               chat_template=QWEN_CHAT_TEMPLATE)
    return model, proc


def tiny_generic(arch: str, seed: int = 0) -> Tuple[torch.nn.Module, object]:
    """``(model, processor)`` of a tiny ``arch`` in :data:`ARCHS`."""
    check_choice("arch", arch, ARCHS)
    return globals()[f"tiny_{arch}"](seed)
