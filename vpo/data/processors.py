"""Tiny local processors: real ``transformers`` processor classes over a word-level tokenizer and tiny image sizes.

:func:`build_tiny_processor` builds, without downloading anything, the processor of a model family that matches the
tiny models of :mod:`vpo.models.tiny` (same vocabulary size, image-token id, image-token count per image, patch and
merge sizes), so records can be turned into model inputs by the very code path used with real checkpoints
(:class:`vpo.data.PreferenceCollator`). Tests and the CPU demo use it.

==============  ==================================  ==================================  ===============================
family          processor class                     image processor                     image tokens per image
==============  ==================================  ==================================  ===============================
``llava``       ``LlavaProcessor``                  ``CLIPImageProcessorPil`` (resize   ``(image_size / patch_size)^2``
                                                    shortest edge + center crop to      (CLS dropped: ``"default"``
                                                    ``image_size``, CLIP mean/std)      strategy) = 9
``qwen2_vl``    ``Qwen2VLProcessor``                ``Qwen2VLImageProcessorPil`` (patch ``grid_h * grid_w / 4``, by the
``qwen2_5_vl``  ``Qwen2_5_VLProcessor``             4, merge 2, temporal patch 2,       image's aspect ratio (smart
                                                    ``min_pixels`` 64, ``max_pixels``   resize): a 2:3 (h:w) image gets
                                                    384)                                the tiny grid (1, 4, 6) -> 6
``idefics2``    ``Idefics2Processor``               ``Idefics2ImageProcessorPil`` (fixed ``num_latents`` = 5
                                                    ``image_size`` square, no splitting)
==============  ==================================  ==================================  ===============================

The tokenizer is a ``tokenizers`` word-level model (lowercased; split on whitespace, each punctuation mark its own
token) wrapped in ``PreTrainedTokenizerFast``. Ids: ``0`` = ``<pad>``, ``1 ..`` = the words (:data:`TINY_WORDS` or
yours), the top 8 ids = the family's special tokens, laid out as in :mod:`vpo.models.tiny` (``V-1`` image placeholder,
``V-2``/``V-3`` vision start/end for Qwen-VL, ``V-4`` video placeholder):

=========  ========================  ========================  ============================
id         llava                     qwen2_vl / qwen2_5_vl     idefics2
=========  ========================  ========================  ============================
``V-1``    ``<image>``               ``<|image_pad|>``         ``<image>``
``V-2``                              ``<|vision_start|>``      ``<fake_token_around_image>``
``V-3``                              ``<|vision_end|>``        ``<end_of_utterance>``
``V-4``                              ``<|video_pad|>``
``V-5``                              ``<|im_start|>``
``V-6``    ``</s>`` (eos)            ``<|im_end|>`` (eos)      ``</s>`` (eos)
``V-7``    ``<s>`` (bos, prepended)  ``<|endoftext|>``         ``<s>`` (bos, prepended)
``V-8``    ``<unk>``                 ``<unk>``                 ``<unk>``
=========  ========================  ========================  ============================

Chat templates (Jinja, set on the processor and the tokenizer), after the originals minus their system prompts; the
response's end-of-turn token is part of the assistant turn, so it lands in the labels:

- llava (LLaVA-1.5 / Vicuna v1): ``USER: <image>\\n{prompt} ASSISTANT: {response}</s>``
- qwen: ``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n
  {response}<|im_end|>\\n``
- idefics2: ``User:<image>{prompt}<end_of_utterance>\\nAssistant: {response}<end_of_utterance>\\n``

Words outside the vocabulary become ``<unk>``; pass ``words=`` (and a model built with a larger ``vocab_size``) for
more. Decoding joins tokens with spaces (word-level tokenizers have no detokenizer).
"""
from __future__ import annotations

import importlib.util
import re
from typing import Optional, Sequence

from vpo._validate import check_choice

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics2")

# The default vocabulary: chat-template words, punctuation and a small image-description vocabulary (119 entries fit
# the default vocab_size 128 with the 9 special ids).
TINY_WORDS = (
    "user", "assistant", "system", ":", ".", ",", "?", "!", "'", "-", "(", ")",
    "a", "an", "the", "is", "are", "there", "this", "that", "it", "in", "on", "of", "and", "with", "to", "at", "by",
    "what", "where", "how", "many", "which", "who", "does", "do", "yes", "no", "not", "image", "picture", "photo",
    "describe", "color", "shows", "see", "can", "you", "i", "one", "two", "three", "four",
    "cat", "dog", "man", "woman", "person", "people", "child", "bird", "horse", "car", "bus", "bike", "tree", "sky",
    "grass", "road", "street", "table", "chair", "cup", "plate", "food", "pizza", "ball", "mat", "sofa", "bed",
    "window", "door", "wall", "water", "boat", "sign", "clock", "phone", "book", "hat", "shirt",
    "red", "blue", "green", "white", "black", "yellow", "brown", "small", "large", "big", "old", "young",
    "sitting", "standing", "holding", "walking", "eating", "playing", "looking", "lying", "near", "next", "front",
    "behind", "left", "right",
)

_N_SPECIAL = 8  # the top 8 ids, as in vpo.models.tiny

# family -> {offset from V: token}; the bos token (prepended by the tokenizer) and eos.
_SPECIALS = {
    "llava": ({1: "<image>", 6: "</s>", 7: "<s>", 8: "<unk>"}, "<s>", "</s>"),
    "qwen": (
        {1: "<|image_pad|>", 2: "<|vision_start|>", 3: "<|vision_end|>", 4: "<|video_pad|>", 5: "<|im_start|>",
         6: "<|im_end|>", 7: "<|endoftext|>", 8: "<unk>"},
        None,
        "<|im_end|>",
    ),
    "idefics2": (
        {1: "<image>", 2: "<fake_token_around_image>", 3: "<end_of_utterance>", 6: "</s>", 7: "<s>", 8: "<unk>"},
        "<s>",
        "</s>",
    ),
}

# Message content is a list of {"type": "image"} / {"type": "text", "text": ...} parts (or a plain string).
LLAVA_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% elif m['role'] == 'assistant' %}ASSISTANT: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS2_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'] is not string and m['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Defaults, equal to those of vpo.models.tiny (a test checks the two agree).
_DEFAULTS = {
    "llava": dict(image_size=24, patch_size=8),
    "qwen": dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=384),
    "idefics2": dict(image_size=16, num_image_tokens=5),
}


def _kind(family: str) -> str:
    return "qwen" if family in ("qwen2_vl", "qwen2_5_vl") else family


def build_tiny_tokenizer(family: str, *, vocab_size: int = 128, words: Optional[Sequence[str]] = None):
    """The word-level ``PreTrainedTokenizerFast`` of :func:`build_tiny_processor` (ids in ``[0, vocab_size)``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    check_choice("family", family, FAMILIES)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2 * _N_SPECIAL:
        raise ValueError(f"vocab_size must be an int >= {2 * _N_SPECIAL}, got {vocab_size!r}")
    words = TINY_WORDS if words is None else words
    if isinstance(words, str) or not all(isinstance(w, str) and w for w in words):
        raise ValueError("words must be a sequence of non-empty strings")
    clean = []
    for w in words:
        w = w.lower()
        if re.search(r"\s", w) or (re.search(r"[^\w]", w) and len(w) > 1):
            raise ValueError(
                f"words must hold single words (no whitespace) or single punctuation marks, got {w!r}: the "
                f"pre-tokenizer splits on whitespace and on each punctuation mark"
            )
        if w not in clean:
            clean.append(w)
    room = vocab_size - _N_SPECIAL - 1
    if len(clean) > room:
        raise ValueError(
            f"words has {len(clean)} distinct entries but vocab_size {vocab_size} leaves room for {room} "
            f"(id 0 = pad, the top {_N_SPECIAL} ids = special tokens): pass fewer words or a larger vocab_size"
        )
    specials, bos, eos = _SPECIALS[_kind(family)]
    vocab = {"<pad>": 0}
    for i, w in enumerate(clean, start=1):
        vocab[w] = i
    for off, tok in specials.items():
        vocab[tok] = vocab_size - off
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.add_special_tokens(["<pad>", *specials.values()])
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    kwargs = dict(pad_token="<pad>", unk_token="<unk>", eos_token=eos, padding_side="right")
    if bos is not None:
        kwargs["bos_token"] = bos
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


def build_tiny_processor(
    family: str,
    *,
    tiny=None,
    vocab_size: Optional[int] = None,
    words: Optional[Sequence[str]] = None,
    image_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    num_image_tokens: Optional[int] = None,
    min_pixels: Optional[int] = None,
    max_pixels: Optional[int] = None,
):
    """A real ``transformers`` processor for ``family`` that agrees with the tiny model of :mod:`vpo.models.tiny`.

    Args:
        family: ``"llava"``, ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"idefics2"``.
        tiny: a :class:`vpo.models.TinyVLM`; when given, ``vocab_size``, the image size, the patch/merge sizes and
            the image-token count are read from its config (the other size arguments must then be left ``None``).
        vocab_size: the model's vocabulary size (default 128, as the tiny models).
        words: the tokenizer's words (default :data:`TINY_WORDS`); at most ``vocab_size - 9``.
        image_size: LLaVA / Idefics2 square input size (default 24 / 16).
        patch_size: LLaVA's CLIP patch (default 8) or Qwen-VL's ViT patch (default 4).
        num_image_tokens: Idefics2's ``image_seq_len`` = the resampler's latents (default 5).
        min_pixels / max_pixels: Qwen-VL's smart-resize bounds (default 64 / 384: a 2:3 (h:w) image -> 16x24 pixels,
            grid (1, 4, 6), 6 image tokens).

    Returns:
        ``LlavaProcessor``, ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor`` or ``Idefics2Processor`` with a chat
        template. Without torchvision, Qwen-VL processors carry a stub video processor (images only) — see
        :class:`_ImagesOnlyVideoProcessor`.

    Example:
        >>> from vpo.data import build_tiny_processor
        >>> p = build_tiny_processor("llava")
        >>> type(p).__name__, p.image_token_id, p.tokenizer.convert_ids_to_tokens([0, 1, 127])
        ('LlavaProcessor', 127, ['<pad>', 'user', '<image>'])
    """
    check_choice("family", family, FAMILIES)
    kind = _kind(family)
    given = dict(image_size=image_size, patch_size=patch_size, num_image_tokens=num_image_tokens,
                 min_pixels=min_pixels, max_pixels=max_pixels)
    for name, value in given.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if tiny is not None:
        if any(v is not None for v in given.values()) or vocab_size is not None:
            raise ValueError("pass either tiny (sizes read from its config) or explicit sizes, not both")
        derived = _sizes_from_tiny(family, tiny)
        vocab_size = derived.pop("vocab_size")
        given.update(derived)
    vocab_size = 128 if vocab_size is None else vocab_size
    opts = dict(_DEFAULTS[kind])
    opts.update({k: v for k, v in given.items() if v is not None and k in opts})
    unused = [k for k, v in given.items() if v is not None and k not in opts]
    if unused:
        raise ValueError(f"{', '.join(unused)} do(es) not apply to family {family!r}")
    tokenizer = build_tiny_tokenizer(family, vocab_size=vocab_size, words=words)

    if family == "llava":
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        s, p = opts["image_size"], opts["patch_size"]
        if s % p:
            raise ValueError(f"image_size must be a multiple of patch_size, got {s} and {p}")
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=p,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS, dropped again by the "default" strategy
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    if family == "idefics2":
        from transformers import Idefics2ImageProcessorPil, Idefics2Processor

        s = opts["image_size"]
        image_processor = Idefics2ImageProcessorPil(size={"height": s, "width": s}, do_image_splitting=False)
        tokenizer.chat_template = IDEFICS2_CHAT_TEMPLATE
        return Idefics2Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=opts["num_image_tokens"],
            chat_template=IDEFICS2_CHAT_TEMPLATE,
        )
    # Qwen2-VL / Qwen2.5-VL
    from transformers import Qwen2VLImageProcessorPil

    if opts["min_pixels"] > opts["max_pixels"]:
        raise ValueError(f"min_pixels must be <= max_pixels, got {opts['min_pixels']} > {opts['max_pixels']}")
    qkw = dict(patch_size=opts["patch_size"], merge_size=opts["merge_size"],
               temporal_patch_size=opts["temporal_patch_size"])
    image_processor = Qwen2VLImageProcessorPil(min_pixels=opts["min_pixels"], max_pixels=opts["max_pixels"], **qkw)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return _qwen_processor(family, image_processor, tokenizer, qkw, opts)


def _sizes_from_tiny(family: str, tiny) -> dict:
    arch = getattr(tiny, "arch", None)
    if arch != family:
        raise ValueError(f"tiny is a {arch!r} model but family is {family!r}: expected the same")
    cfg = tiny.model.config
    out = {"vocab_size": int(tiny.vocab_size)}
    if family == "llava":
        out.update(image_size=int(cfg.vision_config.image_size), patch_size=int(cfg.vision_config.patch_size))
    elif family == "idefics2":
        out.update(image_size=int(cfg.vision_config.image_size), num_image_tokens=int(tiny.num_image_tokens))
    else:
        vc = cfg.vision_config
        if int(vc.spatial_merge_size) != 2 or int(vc.temporal_patch_size) != 2:
            raise ValueError("tiny Qwen-VL models with a merge size or temporal patch other than 2 are not supported")
        out.update(patch_size=int(vc.patch_size))
        grid = tiny.extra.get("grid_thw")
        if grid is not None:  # max_pixels = the tiny grid's area, so a same-aspect image gets exactly that grid
            out.update(max_pixels=int(grid[1] * grid[2] * vc.patch_size ** 2))
            out.update(min_pixels=int(min(out["max_pixels"], (2 * vc.patch_size) ** 2)))
    return out


def _qwen_processor(family, image_processor, tokenizer, qkw, opts):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(min_pixels=opts["min_pixels"], max_pixels=opts["max_pixels"], **qkw)
        return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                   chat_template=QWEN_CHAT_TEMPLATE)
    # No torchvision: transformers cannot build any video processor, and the processor's constructor insists on one
    # of a class it can look up. Use a subclass that accepts the images-only stub below.
    sub = _images_only_class(cls.__name__)
    return sub(image_processor=image_processor, tokenizer=tokenizer,
               video_processor=_ImagesOnlyVideoProcessor(**qkw), chat_template=QWEN_CHAT_TEMPLATE)


_IMAGES_ONLY_CLASSES: dict = {}


def _images_only_class(name: str):
    """``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` subclass taking :class:`_ImagesOnlyVideoProcessor`.

    Same ``__name__`` as the parent (what ``save_pretrained`` records); reachable for pickle (``DataLoader`` workers
    started with spawn) as ``vpo.data.processors._ImagesOnly<name>`` through the module's ``__getattr__``.
    """
    sub = _IMAGES_ONLY_CLASSES.get(name)
    if sub is None:
        import transformers

        cls = getattr(transformers, name)

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, _ImagesOnlyVideoProcessor):
                return type(argument)
            return cls.check_argument_for_proper_class(self, argument_name, argument)

        sub = type(name, (cls,), {
            "check_argument_for_proper_class": check_argument_for_proper_class,
            "__module__": __name__,
            "__qualname__": f"_ImagesOnly{name}",
            "__doc__": f"{name} with an images-only video processor (torchvision is not installed).",
        })
        _IMAGES_ONLY_CLASSES[name] = sub
    return sub


def __getattr__(attr: str):
    if attr in ("_ImagesOnlyQwen2VLProcessor", "_ImagesOnlyQwen2_5_VLProcessor"):
        return _images_only_class(attr[len("_ImagesOnly"):])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _video_mixin():
    from transformers.video_processing_utils import VideoProcessorMixin

    return VideoProcessorMixin


class _ImagesOnlyVideoProcessor(_video_mixin()):
    """Stands in for ``Qwen2VLVideoProcessor`` where torchvision is missing; calling it (with videos) raises."""

    def __init__(self, patch_size: int = 4, merge_size: int = 2, temporal_patch_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size

    def __call__(self, *args, **kwargs):
        raise ValueError("this tiny Qwen-VL processor handles images only (install torchvision for videos)")

    preprocess = __call__
