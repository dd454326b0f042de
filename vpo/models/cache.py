"""The demo's tiny VLM: a real ``LlavaForConditionalGeneration`` and ``LlavaProcessor`` for the shapes world, built
from configs and kept in a local cache folder.

:func:`load_or_build` returns ``(model, processor, path)``: it loads the folder
``<cache root>/tiny-shapes-llava`` with ``from_pretrained`` when the folder's ``vpo_cache.json`` holds the hash of
the wanted :class:`TinyShapesSpec`, and otherwise builds the model from the spec (seeded), saves it with
``save_pretrained`` (model, tokenizer, image processor, chat template) and loads it back, so the model the caller gets
is always the one on disk. A folder written for another spec, or one that fails to load, is rebuilt. The cache root is
``$VPO_CACHE``, else ``~/.cache/vpo``. The folder is an ordinary checkpoint folder: ``vpo train`` / ``vpo eval``
load it as ``model_name_or_path`` (``AutoModelForImageTextToText`` + ``AutoProcessor``).

The model (default spec): a CLIP vision tower (2 layers, hidden 64) over 48 x 48 images in 8 x 8 patches — the shapes
world draws its objects on a 3 x 3 grid, so at 48 px each grid cell is 2 x 2 patches; ``N_p = 36`` image tokens — a
2-layer MLP projector, and a 3-layer Llama language model (hidden 128) over a word-level ``tokenizers`` vocabulary: the
world's words (:func:`vpo.worlds.shapes.vocabulary`) plus the chat template's ``user``, ``assistant`` and ``:``
(:func:`shapes_words`); ids as in :mod:`vpo.data.processors` (0 = pad, the top 8 = special tokens). The images the
world renders (64 px) are resized to 48 by the processor (``CLIPImageProcessorPil``).

Example:
    >>> from vpo.models.cache import load_or_build
    >>> model, processor, path = load_or_build(cache_dir="/tmp/vpo-cache-doc")   # built once, then loaded
    >>> type(model).__name__, type(processor).__name__
    ('LlavaForConditionalGeneration', 'LlavaProcessor')
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional, Tuple

NAME = "tiny-shapes-llava"
CACHE_FILE = "vpo_cache.json"
# Bump when the way a spec becomes a model changes (so every existing cache is rebuilt).
FORMAT_VERSION = 1
# Words the LLaVA chat template adds around the prompt and the response ("USER: ... ASSISTANT: ...", lowercased).
TEMPLATE_WORDS = ("user", "assistant", ":")
_N_SPECIAL = 8  # the top ids: vpo.data.processors' special tokens


@dataclass(frozen=True)
class TinyShapesSpec:
    """Everything that determines the cached model's weights and processor (its hash names the cache's version).

    Attributes:
        image_size, patch_size: the CLIP input size and patch; ``N_p = (image_size / patch_size)²``.
        vision_hidden, vision_layers, vision_heads: the CLIP vision tower.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the Llama language model.
        init_std: ``initializer_range`` of both towers. Larger than the usual 0.02: at 0.02 the random image
            features barely differ between images and a model trained from scratch on a CPU budget learns to ignore
            the image (it captions every image alike); at 0.1 it learns to look.
        seed: the weights' seed.
    """

    image_size: int = 48
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    init_std: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "init_std":
                if not (isinstance(v, (int, float)) and v > 0):
                    raise ValueError(f"init_std must be > 0, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, int) or (v < 0 if f.name == "seed" else v <= 0):
                raise ValueError(f"{f.name} must be a {'non-negative' if f.name == 'seed' else 'positive'} int, "
                                 f"got {v!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size must be a multiple of patch_size, got {self.image_size} and "
                             f"{self.patch_size}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size must be divisible by num_heads and num_heads by num_kv_heads, got "
                             f"{self.hidden_size}, {self.num_heads}, {self.num_kv_heads}")
        if self.vision_hidden % self.vision_heads:
            raise ValueError(f"vision_hidden must be divisible by vision_heads, got {self.vision_hidden} and "
                             f"{self.vision_heads}")

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


DEFAULT_SPEC = TinyShapesSpec()


def shapes_words() -> list:
    """The tokenizer's words: the chat template's (:data:`TEMPLATE_WORDS`), then the shapes world's vocabulary."""
    from vpo.worlds.shapes import vocabulary

    return list(TEMPLATE_WORDS) + [w for w in vocabulary() if w not in TEMPLATE_WORDS]


def vocab_size_for(words) -> int:
    """pad + the words + the 8 special ids, rounded up to a multiple of 8."""
    n = 1 + len(words) + _N_SPECIAL
    return -(-n // 8) * 8


def spec_hash(spec: TinyShapesSpec = DEFAULT_SPEC) -> str:
    """SHA-256 over the spec, the tokenizer's words and :data:`FORMAT_VERSION`: a cache holding another hash is
    stale."""
    payload = {"spec": dataclasses.asdict(spec), "words": shapes_words(), "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_root(cache_dir: Optional[str] = None) -> str:
    """``cache_dir``, else ``$VPO_CACHE``, else ``~/.cache/vpo``."""
    root = cache_dir or os.environ.get("VPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vpo")
    return os.path.abspath(root)


def cache_path(cache_dir: Optional[str] = None) -> str:
    """The model folder inside the cache root."""
    return os.path.join(cache_root(cache_dir), NAME)


def build_tiny_shapes_llava(spec: TinyShapesSpec = DEFAULT_SPEC):
    """``(model, processor)`` built from ``spec`` (random weights from ``spec.seed``; nothing read or written)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vpo.data.processors import build_tiny_processor

    words = shapes_words()
    V = vocab_size_for(words)
    text = LlamaConfig(
        vocab_size=V,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=256,
        initializer_range=spec.init_std,
        pad_token_id=0,
        bos_token_id=V - 7,  # <s>, </s>: vpo.data.processors' llava layout
        eos_token_id=V - 6,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
        initializer_range=spec.init_std,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=V - 1,
        image_seq_length=spec.num_image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):  # seed the construction only, not the caller's stream
        torch.manual_seed(spec.seed)
        model = LlavaForConditionalGeneration(config)
    model = model.to(torch.float32).eval()
    processor = build_tiny_processor("llava", vocab_size=V, words=words, image_size=spec.image_size,
                                     patch_size=spec.patch_size)
    # generate() stops at </s> and pads with <pad>.
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model, processor


def load_pretrained(path: str):
    """``(model, processor)`` from a folder written by ``save_pretrained`` (this cache, or a trained model)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor


def save_pretrained(model, processor, path: str) -> str:
    """Write ``model`` and ``processor`` to ``path`` (a folder ``load_pretrained`` and the trainer read)."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def read_cache_info(path: str) -> Optional[dict]:
    """The folder's ``vpo_cache.json``, or None when absent or unreadable."""
    try:
        with open(os.path.join(path, CACHE_FILE), encoding="utf-8") as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def is_fresh(path: str, spec: TinyShapesSpec = DEFAULT_SPEC) -> bool:
    """Whether ``path`` holds the model of ``spec`` (its ``vpo_cache.json`` carries the spec's hash)."""
    info = read_cache_info(path)
    return info is not None and info.get("hash") == spec_hash(spec)


def load_or_build(
    spec: TinyShapesSpec = DEFAULT_SPEC,
    cache_dir: Optional[str] = None,
    *,
    rebuild: bool = False,
    verbose: bool = False,
) -> Tuple[object, object, str]:
    """``(model, processor, path)``: the cached tiny model of ``spec``, built and saved first when the cache is
    missing, stale (another spec's hash) or unreadable, or when ``rebuild`` (module docstring)."""
    path = cache_path(cache_dir)
    if not rebuild and is_fresh(path, spec):
        try:
            model, processor = load_pretrained(path)
            if verbose:
                print(f"tiny model: loaded from the cache {path}", file=sys.stderr)
            return model, processor, path
        except Exception as err:  # a damaged folder: rebuild it
            if verbose:
                print(f"tiny model: the cache {path} does not load ({type(err).__name__}: {err}); rebuilding",
                      file=sys.stderr)
    elif verbose:
        why = "rebuild requested" if rebuild else ("stale (another spec)" if os.path.isdir(path) else "empty")
        print(f"tiny model: cache {path} is {why}; building it", file=sys.stderr)
    model, processor = build_tiny_shapes_llava(spec)
    root = os.path.dirname(path)
    os.makedirs(root, exist_ok=True)
    # Write a complete folder next to the target, then swap it in: a reader never sees a half-written cache.
    tmp = tempfile.mkdtemp(prefix=f".{NAME}.", dir=root)
    try:
        save_pretrained(model, processor, tmp)
        info = {"name": NAME, "hash": spec_hash(spec), "spec": dataclasses.asdict(spec), "words": shapes_words(),
                "format": FORMAT_VERSION}
        with open(os.path.join(tmp, CACHE_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=f".{NAME}.old.", dir=root)
            os.rmdir(old)
            try:
                os.replace(path, old)
            except OSError:
                old = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process put its (equal) copy there first
            if not is_fresh(path, spec):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    model, processor = load_pretrained(path)
    return model, processor, path
