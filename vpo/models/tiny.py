"""Tiny random-weight vision-language models of real ``transformers`` architectures, and batches built as tensors.

For tests and the CPU demo: no checkpoint, processor or tokenizer is downloaded. Each builder instantiates the real
``*ForConditionalGeneration`` class from a shrunken config (hidden 64, 2 LM layers, 4 query heads over 2 key/value heads
(GQA), a 2-layer vision tower with a handful of patches), seeds the weights, and returns a :class:`TinyVLM` holding the
model (``eval()``, float32, ``attn_implementation="sdpa"``) plus what is needed to build inputs: the image token id, the
number ``N_p`` of image tokens per image, the vocabulary size and the special-token ids. A forward on a ``[2, 32]``
batch takes 7-12 ms with ``torch.set_num_threads(1)``; more threads only add overhead at these sizes (and cost 10x
when other jobs share the cores).

Token-id layout (all builders): ``0`` = pad, ``vocab_size - 1`` = image placeholder, ``vocab_size - 2`` /
``vocab_size - 3`` = vision start / end (Qwen-VL), ``vocab_size - 4`` = video placeholder (Qwen-VL, unused); ordinary
text tokens are drawn from ``[1, vocab_size - 8)``.

Architectures:

- ``tiny_llava``: ``LlavaForConditionalGeneration`` = CLIP vision tower (``image_size / patch_size`` squared patches,
  CLS dropped by the ``"default"`` feature strategy) + 2-layer MLP projector + Llama LM.
- ``tiny_qwen2_vl`` / ``tiny_qwen2_5_vl``: ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
  = ViT over ``grid_t x grid_h x grid_w`` patches merged 2x2 (``N_p = grid_t grid_h grid_w / 4``) + Qwen2 LM with
  M-RoPE; inputs carry ``image_grid_thw`` and ``mm_token_type_ids``.
- ``tiny_idefics2``: ``Idefics2ForConditionalGeneration`` = SigLIP-style vision tower + perceiver resampler
  (``N_p = resampler_n_latents``) + Mistral LM (sliding window disabled).

Example:
    >>> import torch
    >>> from vpo.models import tiny_llava, make_inputs
    >>> tiny = tiny_llava()
    >>> batch = make_inputs(tiny, batch_size=2, seq_len=24, padding="left")
    >>> with torch.no_grad():
    ...     logits = tiny.model(**batch).logits
    >>> tuple(logits.shape), int((batch["input_ids"] == tiny.image_token_id).sum(-1)[0]) == tiny.num_image_tokens
    ((2, 24, 128), True)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

from vpo._validate import check_choice

PAD_ID = 0
_TEXT_LOW = 1  # ordinary text tokens are drawn from [_TEXT_LOW, vocab_size - 8)
_N_SPECIAL = 8


@dataclass(frozen=True)
class TinyVLM:
    """A tiny model and what is needed to build its inputs (see :func:`make_inputs`).

    Attributes:
        model: the ``*ForConditionalGeneration`` model, eval mode, float32.
        arch: ``"llava"``, ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"idefics2"``.
        image_token_id: the placeholder id replaced by image features in the LM input.
        num_image_tokens: ``N_p``, image tokens per image (one image per row).
        vocab_size: ``V`` of the LM head.
        pad_token_id: the id used for padding.
        num_lm_layers: decoder layers of the language model.
        extra: arch-specific constants (pixel-value shape, Qwen-VL grid and special ids, ...).
    """

    model: torch.nn.Module
    arch: str
    image_token_id: int
    num_image_tokens: int
    vocab_size: int
    pad_token_id: int
    num_lm_layers: int
    extra: Dict[str, object] = field(default_factory=dict)


def _text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, init_std) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        initializer_range=init_std,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )


def _build(model_cls, config, seed: int) -> torch.nn.Module:
    # Seed only the construction, leaving the caller's global RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(torch.float32).eval()


def tiny_llava(
    seed: int = 0,
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    image_size: int = 24,
    patch_size: int = 8,
    init_std: float = 0.1,
) -> TinyVLM:
    """Tiny ``LlavaForConditionalGeneration`` (CLIP vision tower + MLP projector + Llama LM).

    ``N_p = (image_size // patch_size) ** 2`` (9 by default); ``pixel_values`` are ``[B, 3, image_size, image_size]``.
    ``init_std`` is the LM's ``initializer_range``, larger than the usual 0.02 so attention maps are far from uniform.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    _check_vocab(vocab_size)
    n_p = (image_size // patch_size) ** 2
    text = LlamaConfig(**_text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, init_std))
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab_size - 1,
        image_seq_length=n_p,
        vision_feature_layer=-1,
        attn_implementation="sdpa",
    )
    model = _build(LlavaForConditionalGeneration, config, seed)
    return TinyVLM(
        model=model,
        arch="llava",
        image_token_id=vocab_size - 1,
        num_image_tokens=n_p,
        vocab_size=vocab_size,
        pad_token_id=PAD_ID,
        num_lm_layers=num_layers,
        extra={"pixel_shape": (3, image_size, image_size)},
    )


def _tiny_qwen_vl(arch, seed, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, grid, init_std) -> TinyVLM:
    import transformers

    _check_vocab(vocab_size)
    grid_t, grid_h, grid_w = grid
    merge, patch, t_patch = 2, 4, 2
    if grid_h % merge or grid_w % merge:
        raise ValueError(f"grid must have grid_h and grid_w divisible by {merge} (the 2x2 patch merge), got {grid}")
    head_dim = hidden_size // num_heads
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"hidden_size // num_heads must be even and >= 6 for M-RoPE, got {head_dim}")
    half = head_dim // 2  # M-RoPE splits the head_dim/2 rotary frequencies into (temporal, height, width) sections
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(_text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, init_std))
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    if arch == "qwen2_vl":
        cfg_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2, num_heads=4)
    else:
        cfg_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        # window_size in pixels: one merged 2x2 window of patches per window; block 1 uses full attention.
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=hidden_size,
            num_heads=4,
            window_size=merge * patch * 2,
            fullatt_block_indexes=[1],
        )
    vision.update(in_channels=3, patch_size=patch, spatial_merge_size=merge, temporal_patch_size=t_patch)
    ids = dict(
        image_token_id=vocab_size - 1,
        vision_start_token_id=vocab_size - 2,
        vision_end_token_id=vocab_size - 3,
        video_token_id=vocab_size - 4,
    )
    config = cfg_cls(text_config=text, vision_config=vision, attn_implementation="sdpa", **ids)
    model = _build(model_cls, config, seed)
    n_p = grid_t * grid_h * grid_w // (merge * merge)
    return TinyVLM(
        model=model,
        arch=arch,
        image_token_id=ids["image_token_id"],
        num_image_tokens=n_p,
        vocab_size=vocab_size,
        pad_token_id=PAD_ID,
        num_lm_layers=num_layers,
        extra={
            "grid_thw": (grid_t, grid_h, grid_w),
            "patch_dim": 3 * t_patch * patch * patch,  # pixel_values are [Σ t h w, C * t_patch * patch * patch]
            "vision_start_token_id": ids["vision_start_token_id"],
            "vision_end_token_id": ids["vision_end_token_id"],
        },
    )


def tiny_qwen2_vl(
    seed: int = 0,
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    grid: Tuple[int, int, int] = (1, 4, 6),
    init_std: float = 0.1,
) -> TinyVLM:
    """Tiny ``Qwen2VLForConditionalGeneration``; one image of ``grid = (t, h, w)`` patches, ``N_p = t h w / 4`` (6)."""
    return _tiny_qwen_vl("qwen2_vl", seed, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, grid, init_std)


def tiny_qwen2_5_vl(
    seed: int = 0,
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    grid: Tuple[int, int, int] = (1, 4, 6),
    init_std: float = 0.1,
) -> TinyVLM:
    """Tiny ``Qwen2_5_VLForConditionalGeneration`` (windowed ViT, a full-attention block); as :func:`tiny_qwen2_vl`."""
    return _tiny_qwen_vl(
        "qwen2_5_vl", seed, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, grid, init_std
    )


def tiny_idefics2(
    seed: int = 0,
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    image_size: int = 16,
    patch_size: int = 4,
    num_latents: int = 5,
    init_std: float = 0.1,
) -> TinyVLM:
    """Tiny ``Idefics2ForConditionalGeneration`` (vision tower + perceiver resampler + Mistral LM, no sliding window).

    ``N_p = num_latents`` (5); ``pixel_values`` are ``[B, 1, 3, image_size, image_size]`` (one image per row).
    """
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    _check_vocab(vocab_size)
    text = dict(_text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, init_std))
    text.update(model_type="mistral", sliding_window=None)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
        patch_size=patch_size,
    )
    perceiver = dict(
        hidden_size=hidden_size,
        rms_norm_eps=1e-6,
        resampler_n_latents=num_latents,
        resampler_depth=1,
        resampler_n_heads=4,
        resampler_head_dim=16,
        num_key_value_heads=2,
    )
    config = Idefics2Config(
        text_config=text,
        vision_config=vision,
        perceiver_config=perceiver,
        image_token_id=vocab_size - 1,
        attn_implementation="sdpa",
        use_cache=False,
    )
    model = _build(Idefics2ForConditionalGeneration, config, seed)
    return TinyVLM(
        model=model,
        arch="idefics2",
        image_token_id=vocab_size - 1,
        num_image_tokens=num_latents,
        vocab_size=vocab_size,
        pad_token_id=PAD_ID,
        num_lm_layers=num_layers,
        extra={"pixel_shape": (1, 3, image_size, image_size)},
    )


def make_inputs(
    tiny: TinyVLM,
    *,
    batch_size: int = 2,
    seq_len: int = 32,
    lengths: Optional[Sequence[int]] = None,
    padding: str = "right",
    prefix_len: int = 2,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """A batch of random tokens with one image per row, as the model's ``forward`` keyword arguments.

    Each row is ``[prefix_len text tokens] [image block] [text tokens]`` with ``lengths[b]`` real tokens, padded with
    ``tiny.pad_token_id`` to ``seq_len`` on the ``padding`` side (``"right"`` or ``"left"``). The image block is the
    ``N_p`` placeholders (between vision start/end tokens for Qwen-VL). ``lengths`` defaults to ``seq_len`` for row 0
    and ``seq_len - 3 b`` for the others, so every batch of 2+ rows has padding.

    Returns:
        ``input_ids [B, T]`` int64, ``attention_mask [B, T]`` int64 (1 = real), ``pixel_values`` (LLaVA
        ``[B, 3, S, S]``; Qwen-VL ``[B t h w, C t_p p p]``; Idefics2 ``[B, 1, 3, S, S]``), and for Qwen-VL
        ``image_grid_thw [B, 3]`` and ``mm_token_type_ids [B, T]`` (1 on image placeholders, else 0).

    Example:
        >>> from vpo.models import tiny_qwen2_vl, make_inputs
        >>> batch = make_inputs(tiny_qwen2_vl(), batch_size=2, seq_len=20)
        >>> sorted(batch), tuple(batch["pixel_values"].shape)
        (['attention_mask', 'image_grid_thw', 'input_ids', 'mm_token_type_ids', 'pixel_values'], (48, 96))
    """
    check_choice("padding", padding, ("right", "left"))
    is_qwen = tiny.arch in ("qwen2_vl", "qwen2_5_vl")
    n_p = tiny.num_image_tokens
    block = n_p + (2 if is_qwen else 0)
    min_len = prefix_len + block + 1
    if lengths is None:
        lengths = [max(seq_len - 3 * b, min_len) for b in range(batch_size)]
    lengths = list(lengths)
    if len(lengths) != batch_size:
        raise ValueError(f"lengths has {len(lengths)} entries but batch_size is {batch_size}: expected one per row")
    for n in lengths:
        if not min_len <= n <= seq_len:
            raise ValueError(
                f"lengths must lie in [{min_len}, {seq_len}] (prefix {prefix_len} + image block {block} + 1 text "
                f"token, at most seq_len), got {n}"
            )
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.full((batch_size, seq_len), tiny.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for b, n in enumerate(lengths):
        row = torch.randint(_TEXT_LOW, tiny.vocab_size - _N_SPECIAL, (n,), generator=g)
        img = slice(prefix_len, prefix_len + block)
        if is_qwen:
            start_id, end_id = tiny.extra["vision_start_token_id"], tiny.extra["vision_end_token_id"]
            row[img] = torch.tensor([start_id] + [tiny.image_token_id] * n_p + [end_id])
        else:
            row[img] = tiny.image_token_id
        start = 0 if padding == "right" else seq_len - n
        input_ids[b, start : start + n] = row
        attention_mask[b, start : start + n] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if is_qwen:
        grid = tiny.extra["grid_thw"]
        n_patches = grid[0] * grid[1] * grid[2]
        out["pixel_values"] = torch.randn(batch_size * n_patches, tiny.extra["patch_dim"], generator=g)
        out["image_grid_thw"] = torch.tensor([list(grid)] * batch_size, dtype=torch.long)
        out["mm_token_type_ids"] = (input_ids == tiny.image_token_id).long()
    else:
        out["pixel_values"] = torch.randn(batch_size, *tiny.extra["pixel_shape"], generator=g)
    return out


def _check_vocab(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < 2 * _N_SPECIAL:
        raise ValueError(f"vocab_size must be an int >= {2 * _N_SPECIAL} (room for the special ids), got {vocab_size}")
