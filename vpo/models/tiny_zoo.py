"""More tiny random image-text-to-text architectures with their real processor classes (no download), for the
architecture tests (``tests/test_architectures.py``); the first four live in :mod:`vpo.models.tiny_generic`.

:data:`ZOO` holds LLaVA-OneVision, Aya Vision, InternVL, PaliGemma, PaliGemma 2, Mllama, Llama 4, VipLLaVA,
Gemma 3n, GLM-4V, Janus, Ovis2 and vpo's four tuned families (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics2) for the generic
collator; :func:`tiny_architecture` builds any of them or of :data:`vpo.models.tiny_generic.ARCHS`.

Each builder returns ``(model, processor)`` like :func:`vpo.models.tiny_generic.tiny_generic`: the real
``*ForConditionalGeneration`` from a shrunken config (text hidden 64, 2 layers; a 1-2 layer vision tower over 16x16
images) and the real processor over the word-level tokenizer of :func:`vpo.models.tiny_generic._tokenizer`.
Two architectures need a stand-in where this machine lacks a dependency (``vpo[vision]``: torchvision, timm):

- Llama 4's only image processor is torchvision-based: the processor gets a PIL image processor with the same output
  (:class:`_Llama4PilImageProcessor`: one tile per image, ``aspect_ratios`` 1x1);
- Gemma 3n's vision tower is a timm MobileNet: the model gets a small convolution with the same output layout
  (:class:`_TinyTimmVision`: ``last_hidden_state [n, C, h, w]``), the processor is the real one.
"""
from __future__ import annotations

import torch

from vpo.models.tiny_generic import V, _build, _template, _text, _tokenizer


def _clip(**over):
    from transformers import CLIPVisionConfig

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
               patch_size=8, projection_dim=32)
    cfg.update(over)
    return CLIPVisionConfig(**cfg)


def _siglip(**over):
    from transformers import SiglipVisionConfig

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
               patch_size=4)
    cfg.update(over)
    return SiglipVisionConfig(**cfg)


_LLAMA_TURNS = dict(user="USER: ", assistant="ASSISTANT: ", gen="ASSISTANT:")


def _llama_template(image: str, end_user: str = " ", end_assistant: str = "</s>", bos: str = "") -> str:
    end = "{% if m['role'] == 'assistant' %}" + end_assistant + "{% else %}" + end_user + "{% endif %}"
    return _template(_LLAMA_TURNS["user"], _LLAMA_TURNS["assistant"], end, image, _LLAMA_TURNS["gen"], bos=bos)


def tiny_llava_onevision(seed: int = 0):
    """Tiny LLaVA-OneVision: SigLIP over 16x16 tiles (16 tokens), any-res ``[[16, 16], [16, 32]]``, Qwen2 LM."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, Qwen2Config)

    from vpo.data.processors import _ImagesOnlyVideoProcessor, _images_only_class  # no torchvision video processor

    pinpoints = [[16, 16], [16, 32]]
    config = LlavaOnevisionConfig(vision_config=_siglip(), text_config=Qwen2Config(**_text()),
                                  image_token_index=V - 1, video_token_index=V - 2, image_grid_pinpoints=pinpoints,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  vision_aspect_ratio="anyres_max_1", attn_implementation="sdpa")
    model = _build(LlavaOnevisionForConditionalGeneration, config, seed)
    tok = _tokenizer({1: "<image>", 2: "<video>", 6: "<|im_end|>", 8: "<unk>"}, eos="<|im_end|>")
    template = _template("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", "<image>\n",
                         "<|im_start|>assistant\n")
    ip = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints,
                                         do_pad=True)
    proc = _images_only_class("LlavaOnevisionProcessor")(
                                   image_processor=ip, tokenizer=tok, video_processor=_ImagesOnlyVideoProcessor(),
                                   num_image_tokens=16,
                                   vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
                                   chat_template=template)
    return model, proc


def tiny_aya_vision(seed: int = 0):
    """Tiny Aya Vision: SigLIP over 16x16 tiles, pixel shuffle 2 -> 4 tokens per tile, Cohere 2 LM with
    ``logit_scale`` 0.5 (its head scales the logits)."""
    from transformers import (AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor, Cohere2Config,
                              GotOcr2ImageProcessorPil)

    text = Cohere2Config(**_text(head_dim=16, logit_scale=0.5, sliding_window=64,
                                 layer_types=["sliding_attention", "full_attention"]))
    config = AyaVisionConfig(vision_config=_siglip(), text_config=text, image_token_index=V - 4,
                             downsample_factor=2, adapter_layer_norm_eps=1e-6, vision_feature_layer=-1,
                             vision_feature_select_strategy="full", attn_implementation="sdpa")
    model = _build(AyaVisionForConditionalGeneration, config, seed)
    specials = {1: "<image>", 2: "<|START_OF_IMG|>", 3: "<|END_OF_IMG|>", 4: "<|IMG_PATCH|>", 5: "<|IMG_LINE_BREAK|>",
                6: "<|END_OF_TURN_TOKEN|>", 7: "<BOS_TOKEN>", 8: "<unk>", 9: "TILE_GLOBAL",
                10: "<|START_OF_TURN_TOKEN|>", 11: "<|USER_TOKEN|>", 12: "<|CHATBOT_TOKEN|>"}
    tok = _tokenizer(specials, bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>")
    template = _template("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                         "<|END_OF_TURN_TOKEN|>", "<image>", "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                         bos="<BOS_TOKEN>")
    ip = GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=False)
    proc = AyaVisionProcessor(image_processor=ip, tokenizer=tok, patch_size=4, img_size=16, downsample_factor=2,
                              img_patch_token="<|IMG_PATCH|>", chat_template=template)
    return model, proc


def tiny_internvl(seed: int = 0):
    """Tiny InternVL: InternViT over 16x16 images, pixel shuffle 0.5 -> 4 tokens, Qwen2 LM."""
    from transformers import (GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLVisionConfig, Qwen2Config)

    from vpo.data.processors import _ImagesOnlyVideoProcessor, _images_only_class

    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  image_size=[16, 16], patch_size=[4, 4])
    config = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**_text()), image_token_id=V - 1,
                            downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                            attn_implementation="sdpa")
    model = _build(InternVLForConditionalGeneration, config, seed)
    specials = {1: "<IMG_CONTEXT>", 2: "<img>", 3: "</img>", 4: "<video>", 6: "<|im_end|>", 8: "<unk>"}
    tok = _tokenizer(specials, eos="<|im_end|>", extra={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    template = _template("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", "<IMG_CONTEXT>\n",
                         "<|im_start|>assistant\n")
    ip = GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=False)
    proc = _images_only_class("InternVLProcessor")(image_processor=ip, tokenizer=tok,
                                                   video_processor=_ImagesOnlyVideoProcessor(),
                             image_seq_length=4, chat_template=template)
    return model, proc


def tiny_paligemma(seed: int = 0):
    """Tiny PaliGemma: SigLIP over 16x16 images (16 tokens), Gemma LM; the prompt (image + text) is a bidirectional
    prefix, the response causal (``token_type_ids`` 0 / 1)."""
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessorPil)

    config = PaliGemmaConfig(vision_config=_siglip(projection_dim=64), text_config=GemmaConfig(**_text(head_dim=16)),
                             image_token_index=V - 1, projection_dim=64, hidden_size=64, attn_implementation="sdpa")
    model = _build(PaliGemmaForConditionalGeneration, config, seed)
    tok = _tokenizer({1: "<image>", 6: "<eos>", 7: "<bos>", 8: "<unk>"}, bos="<bos>", eos="<eos>",
                     extra={"image_token": "<image>"})
    template = (  # the image placeholders first, then the text; no turn markers (PaliGemma's prefix + suffix)
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}<eos>"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% endif %}{% endfor %}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n"
        "{% endif %}{% endfor %}")
    tok.chat_template = template
    ip = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    ip.image_seq_length = 16
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=template)
    return model, proc


def tiny_mllama(seed: int = 0):
    """Tiny Mllama (Llama 3.2 Vision): a 16x16 tile encoder (1 tile, patch 8), cross-attention at text layer 1;
    ``cross_attention_mask [1, T, images, tiles]`` comes from the processor for the prompt only."""
    from transformers import (MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil,
                              MllamaProcessor, MllamaTextConfig, MllamaVisionConfig)

    vision = MllamaVisionConfig(hidden_size=32, num_hidden_layers=1, num_global_layers=1, attention_heads=4,
                                intermediate_size=64, vision_output_dim=64, image_size=16, patch_size=8,
                                max_num_tiles=1, intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]])
    text = MllamaTextConfig(**_text(cross_attention_layers=[1], bos_token_id=V - 7, eos_token_id=V - 6,
                                    pad_token_id=0))
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=V - 1,
                          attn_implementation="sdpa")
    model = _build(MllamaForConditionalGeneration, config, seed)
    tok = _tokenizer({1: "<|image|>", 2: "<|python_tag|>", 6: "<|eot_id|>", 7: "<|begin_of_text|>", 8: "<unk>"},
                     bos="<|begin_of_text|>", eos="<|eot_id|>")
    template = _template("USER: ", "ASSISTANT: ", "<|eot_id|>", "<|image|>", "ASSISTANT: ", bos="<|begin_of_text|>")
    ip = MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=1)
    proc = MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=template)
    return model, proc


def _llama4_image_processor():
    """A PIL image processor with Llama 4's output (``pixel_values [tiles, 3, 16, 16]``, ``aspect_ratios [n, 2]``):
    one 16x16 tile per image (the real Llama4ImageProcessor needs torchvision)."""
    from transformers import SiglipImageProcessorPil
    from transformers.image_processing_utils import BatchFeature

    class Llama4TileProcessor(SiglipImageProcessorPil):
        def __call__(self, images, **kwargs):
            from transformers.image_utils import make_flat_list_of_images

            flat = make_flat_list_of_images(images)
            out = super().__call__(flat, return_tensors="pt")
            ratios = torch.ones((len(flat), 2), dtype=torch.long)
            return BatchFeature({"pixel_values": out["pixel_values"], "aspect_ratios": ratios})

    return Llama4TileProcessor(size={"height": 16, "width": 16})


def tiny_llama4(seed: int = 0):
    """Tiny Llama 4: a 16x16 tile (patch 4, pixel shuffle 0.5 -> 4 tokens), MoE text layers (2 experts, a router
    whose forward returns ``(scores, logits)``); backbone ``language_model.model``."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4Processor, Llama4TextConfig
    from transformers import Llama4VisionConfig

    vision = Llama4VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                                vision_output_dim=64, image_size=16, patch_size=4, pixel_shuffle_ratio=0.5,
                                projector_input_dim=64, projector_output_dim=64)
    text = Llama4TextConfig(**_text(head_dim=16, intermediate_size_mlp=128, num_local_experts=2,
                                    num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=64,
                                    bos_token_id=V - 7, eos_token_id=V - 6))
    config = Llama4Config(vision_config=vision, text_config=text, image_token_index=V - 3, boi_token_index=V - 4,
                          eoi_token_index=V - 5, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):  # not _build: .to(float32) would drop the complex RoPE buffer's phase
        torch.manual_seed(seed)
        model = Llama4ForConditionalGeneration(config).eval()
    specials = {1: "<|image|>", 2: "<|tile_x_separator|>", 3: "<|patch|>", 4: "<|image_start|>", 5: "<|image_end|>",
                6: "<|eot|>", 7: "<|begin_of_text|>", 8: "<unk>", 9: "<|tile_y_separator|>"}
    tok = _tokenizer(specials, bos="<|begin_of_text|>", eos="<|eot|>")
    template = _template("USER: ", "ASSISTANT: ", "<|eot|>", "<|image|>", "ASSISTANT: ", bos="<|begin_of_text|>")
    tok.chat_template = template

    def check_argument_for_proper_class(self, argument_name, argument):
        return type(argument)

    cls = type("Llama4Processor", (Llama4Processor,), {"check_argument_for_proper_class":
                                                       check_argument_for_proper_class})
    proc = cls(image_processor=_llama4_image_processor(), tokenizer=tok, patch_size=4, pixel_shuffle_ratio=0.5,
               chat_template=template)
    return model, proc


def tiny_vipllava(seed: int = 0):
    """Tiny VipLLaVA: CLIP (features of two layers), LLaVA's processor, Llama LM."""
    from transformers import (LlamaConfig, LlavaImageProcessorPil, LlavaProcessor, VipLlavaConfig,
                              VipLlavaForConditionalGeneration)

    config = VipLlavaConfig(vision_config=_clip(num_hidden_layers=2), text_config=LlamaConfig(**_text()),
                            image_token_index=V - 1, vision_feature_layers=[-2, -1], attn_implementation="sdpa")
    model = _build(VipLlavaForConditionalGeneration, config, seed)
    tok = _tokenizer({1: "<image>", 6: "</s>", 7: "<s>", 8: "<unk>"}, bos="<s>", eos="</s>", prepend_bos=True)
    template = _llama_template("<image>\n")
    tok.chat_template = template
    ip = LlavaImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=template)
    return model, proc


def tiny_paligemma2(seed: int = 0):
    """Tiny PaliGemma 2: PaliGemma with a Gemma 2 LM, whose head soft-caps the logits (``final_logit_softcapping``
    30)."""
    from transformers import Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration

    _, proc = tiny_paligemma(seed)
    text = Gemma2Config(**_text(head_dim=16, final_logit_softcapping=30.0, attn_logit_softcapping=None,
                                query_pre_attn_scalar=16, sliding_window=64))
    config = PaliGemmaConfig(vision_config=_siglip(projection_dim=64), text_config=text, image_token_index=V - 1,
                             projection_dim=64, hidden_size=64, attn_implementation="eager")  # no Gemma 2 sdpa
    return _build(PaliGemmaForConditionalGeneration, config, seed), proc


class _TinyTimmVision(torch.nn.Module):
    """Stands in for Gemma 3n's timm MobileNet (``TimmWrapperModel``, needs timm): a 4x4 stride-4 convolution, so a
    16x16 image gives ``last_hidden_state [n, hidden, 4, 4]`` = 16 soft tokens, the layout Gemma 3n reads."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.conv = torch.nn.Conv2d(3, config.hidden_size, kernel_size=4, stride=4)

    def forward(self, pixel_values, do_pooling=False, return_dict=True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=self.conv(pixel_values.to(self.conv.weight.dtype)))


def tiny_gemma3n(seed: int = 0):
    """Tiny Gemma 3n: AltUp / LAuReL / per-layer-input decoder (2 layers), soft-capped head (30), a stand-in vision
    tower (:class:`_TinyTimmVision`, 16 soft tokens), an unused tiny audio tower. Ids: text below 112, vision
    ``[112, 120)``, audio ``[120, 128)``."""
    import transformers.models.gemma3n.modeling_gemma3n as g3n
    from transformers import (Gemma3nAudioConfig, Gemma3nAudioFeatureExtractor, Gemma3nConfig,
                              Gemma3nForConditionalGeneration, Gemma3nProcessor, Gemma3nTextConfig,
                              Gemma3nVisionConfig, SiglipImageProcessorPil)

    text = Gemma3nTextConfig(**_text(head_dim=16, vocab_size_per_layer_input=112, hidden_size_per_layer_input=8,
                                     laurel_rank=4, altup_num_inputs=2, num_kv_shared_layers=0, sliding_window=64,
                                     layer_types=["sliding_attention", "full_attention"],
                                     activation_sparsity_pattern=[0.0, 0.0], final_logit_softcapping=30.0,
                                     intermediate_size=[128, 128]))
    vision = Gemma3nVisionConfig(hidden_size=32, vocab_size=8, vocab_offset=112)
    audio = Gemma3nAudioConfig(vocab_size=8, vocab_offset=120, hidden_size=16, input_feat_size=8,
                               conf_num_hidden_layers=1, conf_num_attention_heads=2, sscp_conv_channel_size=[4, 4])
    config = Gemma3nConfig(text_config=text, vision_config=vision, audio_config=audio,
                           vision_soft_tokens_per_image=16, audio_soft_tokens_per_image=4, boi_token_id=V - 17,
                           eoi_token_id=V - 16, image_token_id=V - 15, boa_token_id=V - 18, eoa_token_id=V - 8,
                           audio_token_id=V - 7, attn_implementation="sdpa")
    real = g3n.AutoModel

    class _Auto:  # the vision tower's class only: everything else as transformers builds it
        @staticmethod
        def from_config(cfg, **kw):
            if getattr(cfg, "model_type", None) == "gemma3n_vision":
                return _TinyTimmVision(cfg)
            return real.from_config(cfg, **kw)

    g3n.AutoModel = _Auto
    try:
        model = _build(Gemma3nForConditionalGeneration, config, seed)
    finally:
        g3n.AutoModel = real
    specials = {17: "<start_of_image>", 16: "<end_of_image>", 15: "<image_soft_token>", 18: "<start_of_audio>",
                8: "<end_of_audio>", 7: "<audio_soft_token>", 19: "<start_of_turn>", 20: "<end_of_turn>", 21: "<eos>",
                22: "<bos>", 23: "<unk>"}
    tok = _tokenizer(specials, bos="<bos>", eos="<eos>", words_below=V - 23, extra={
        "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
        "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"})
    template = _template("<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>\n", "<image_soft_token>",
                         "<start_of_turn>model\n", bos="<bos>")
    tok.chat_template = template
    ip = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    fe = Gemma3nAudioFeatureExtractor(feature_size=8)
    proc = Gemma3nProcessor(feature_extractor=fe, image_processor=ip, tokenizer=tok, image_seq_length=16,
                            audio_seq_length=4, chat_template=template)
    return model, proc


def tiny_glm4v(seed: int = 0):
    """Tiny GLM-4V: a Qwen-style ViT (patch 4, merge 2) over 16x24 images -> 6 tokens, GLM-4 LM with M-RoPE."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vImageProcessorPil

    from vpo.data.processors import _ImagesOnlyVideoProcessor, _images_only_class

    text = _text(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, image_size=16)
    config = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=V - 1, video_token_id=V - 2,
                         image_start_token_id=V - 3, image_end_token_id=V - 4, video_start_token_id=V - 5,
                         video_end_token_id=V - 9, attn_implementation="sdpa")
    model = _build(Glm4vForConditionalGeneration, config, seed)
    specials = {1: "<|image|>", 2: "<|video|>", 3: "<|begin_of_image|>", 4: "<|end_of_image|>",
                5: "<|begin_of_video|>", 9: "<|end_of_video|>", 6: "<|endoftext|>", 7: "[gMASK]", 8: "<unk>",
                10: "<|user|>", 11: "<|assistant|>"}
    tok = _tokenizer(specials, eos="<|endoftext|>", extra={"image_token": "<|image|>", "video_token": "<|video|>"})
    template = _template("<|user|>\n", "<|assistant|>\n", "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}",
                         "<|begin_of_image|><|image|><|end_of_image|>", "<|assistant|>\n", bos="[gMASK]")
    tok.chat_template = template
    qkw = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    ip = Glm4vImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 384}, **qkw)
    proc = _images_only_class("Glm4vProcessor")(image_processor=ip, tokenizer=tok,
                                                video_processor=_ImagesOnlyVideoProcessor(**qkw),
                                                chat_template=template)
    return model, proc


def tiny_janus(seed: int = 0):
    """Tiny Janus: a SigLIP-style encoder over 16x16 images (16 tokens), a tiny VQ image generator (unused by
    text training), Llama LM."""
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor,
                              JanusVisionConfig, JanusVQVAEConfig, LlamaConfig)

    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                               patch_size=4, projection_dim=64, depth=1, num_image_tokens=16, mlp_ratio=2.0)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, num_patches=4, projection_dim=64,
                          image_token_embed_dim=64, num_hidden_layers=1)
    config = JanusConfig(text_config=LlamaConfig(**_text()), vision_config=vision, vq_config=vq,
                         image_token_id=V - 1, attn_implementation="sdpa")
    model = _build(JanusForConditionalGeneration, config, seed)
    tok = _tokenizer({1: "<image_placeholder>", 2: "<begin_of_image>", 3: "<end_of_image>", 6: "<｜end▁of▁sentence｜>",
                      7: "<｜begin▁of▁sentence｜>", 8: "<unk>"}, bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
                     prepend_bos=True, extra={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                                              "eoi_token": "<end_of_image>"})
    template = _template("<|User|>: ", "<|Assistant|>: ",
                         "{% if m['role'] == 'assistant' %}<｜end▁of▁sentence｜>{% else %}\n\n{% endif %}",
                         "<image_placeholder>\n", "<|Assistant|>:")
    tok.chat_template = template
    ip = JanusImageProcessorPil(size={"height": 16, "width": 16}, min_size=4)
    proc = JanusProcessor(image_processor=ip, tokenizer=tok, num_image_tokens=16, chat_template=template)
    return model, proc


def tiny_ovis2(seed: int = 0):
    """Tiny Ovis2: a ViT over 16x16 images whose 16 patches become probabilistic visual tokens (a 16-word visual
    vocabulary), five visual indicator tokens, Qwen2 LM."""
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration, Ovis2ImageProcessorPil, Ovis2Processor
    from transformers import Ovis2VisionConfig, Qwen2Config

    vision = Ovis2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               image_size=16, patch_size=4, vocab_size=16, hidden_stride=1,
                               num_visual_indicator_tokens=5)
    config = Ovis2Config(vision_config=vision, text_config=Qwen2Config(**_text()), image_token_id=V - 1,
                         visual_indicator_token_ids=[V - 2, V - 3, V - 4, V - 5, V - 9], vocab_size=V,
                         hidden_size=64, attn_implementation="sdpa")
    model = _build(Ovis2ForConditionalGeneration, config, seed)
    specials = {1: "<IMG_ATOM>", 2: "<IMG_START>", 3: "<IMG_GRID>", 4: "<IMG_COL>", 5: "<IMG_ROW>", 9: "<IMG_END>",
                10: "<image>", 6: "<|im_end|>", 8: "<unk>"}
    tok = _tokenizer(specials, eos="<|im_end|>")
    template = _template("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", "<image>\n",
                         "<|im_start|>assistant\n")
    tok.chat_template = template
    ip = Ovis2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=False)
    proc = Ovis2Processor(image_processor=ip, tokenizer=tok, image_seq_length=16, chat_template=template)
    return model, proc


def _family(name: str):
    def build(seed: int = 0):
        from vpo import models
        from vpo.data import build_tiny_processor

        tiny = getattr(models, f"tiny_{name}")(seed)
        return tiny.model, build_tiny_processor(name, tiny=tiny)

    build.__doc__ = f"vpo's tiny {name} (:mod:`vpo.models.tiny`) with its processor, for the generic collator."
    return build


# name -> builder; the architectures tests/test_architectures.py checks
ZOO = {
    "llava_onevision": tiny_llava_onevision, "aya_vision": tiny_aya_vision, "internvl": tiny_internvl,
    "paligemma": tiny_paligemma, "paligemma2": tiny_paligemma2, "mllama": tiny_mllama, "llama4": tiny_llama4,
    "vipllava": tiny_vipllava, "gemma3n": tiny_gemma3n, "glm4v": tiny_glm4v,
    "janus": tiny_janus, "ovis2": tiny_ovis2,
    **{f"{name}_generic": _family(name) for name in ("llava", "qwen2_vl", "qwen2_5_vl", "idefics2")},
}


def tiny_architecture(name: str, seed: int = 0):
    """``(model, processor)`` of ``name``: a key of :data:`ZOO` or of :data:`vpo.models.tiny_generic.ARCHS`."""
    from vpo.models.tiny_generic import ARCHS, tiny_generic

    if name in ARCHS:
        return tiny_generic(name, seed)
    if name not in ZOO:
        raise ValueError(f"arch must be one of {sorted((*ARCHS, *ZOO))}, got {name!r}")
    return ZOO[name](seed)
