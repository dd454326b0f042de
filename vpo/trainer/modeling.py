"""Model plumbing for the trainer: loading, the language-model-only LoRA, the LM head, the backbone.

LoRA targets. A plain ``q_proj``/``v_proj`` target also matches the attention projections of the vision tower (CLIP in
LLaVA, the Idefics2 perceiver, ...). :func:`lora_target_regex` therefore builds the target from the names of the
modules that live inside the LANGUAGE model (``model.get_decoder()``, located by identity among ``named_modules()``)::

    ^model\\.language_model\\..*\\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$

(peft full-matches a string target against every module name), so nothing outside the language model is adapted,
whatever the vision tower names its layers. ``all-linear`` collects the leaf names of every ``nn.Linear`` inside the
language model.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple, Union

import torch

FAMILY_OF_MODEL_TYPE = {"llava": "llava", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "idefics2": "idefics2"}


def unwrap_model(model) -> torch.nn.Module:
    """The ``transformers`` model inside DDP/accelerate and peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DataParallel
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def unwrap_peft(model):
    """The peft model inside DDP wrappers, or None when the model has no adapter."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model if hasattr(model, "disable_adapter") and hasattr(model, "get_base_model") else None


def model_family(model) -> str:
    """``llava``, ``qwen2_vl``, ``qwen2_5_vl`` or ``idefics2``, from the model config's ``model_type``."""
    model_type = getattr(unwrap_model(model).config, "model_type", None)
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise ValueError(
            f"model has model_type={model_type!r}: expected one of {sorted(FAMILY_OF_MODEL_TYPE)} (LLaVA-1.5, "
            "Qwen2-VL, Qwen2.5-VL, Idefics2)"
        )
    return FAMILY_OF_MODEL_TYPE[model_type]


def backbone(model) -> torch.nn.Module:
    """The ``*Model`` under the ``*ForConditionalGeneration`` head: its output's ``last_hidden_state`` is post-norm."""
    base = unwrap_model(model)
    inner = getattr(base, "model", None)
    if not isinstance(inner, torch.nn.Module):
        raise ValueError(
            f"{type(base).__name__} has no `.model` backbone module: expected a transformers *ForConditionalGeneration"
        )
    return inner


def lm_head(model) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, D], bias [V] | None)`` of the model's output projection."""
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(base).__name__}.get_output_embeddings() returned no linear head")
    if hasattr(head, "lora_A"):
        raise ValueError("the LM head carries a LoRA adapter: the fused losses read lm_head.weight directly, so the "
                         "adapter would be ignored; keep the LoRA targets inside the language model")
    return head.weight, getattr(head, "bias", None)


def language_model_prefix(model) -> str:
    """Dotted name of the language model (``model.get_decoder()``) inside ``model``, e.g. ``model.language_model``."""
    base = unwrap_model(model)
    decoder = base.get_decoder()
    for name, module in base.named_modules():
        if module is decoder and name:
            return name
    raise ValueError(f"could not locate {type(decoder).__name__} (get_decoder()) among the modules of "
                     f"{type(base).__name__}")


def lora_target_regex(model, targets: Union[str, Sequence[str]] = "all-linear", scope: str = "language_model") -> str:
    """The peft ``target_modules`` regex adapting ``targets`` inside the language model only (module docstring).

    Args:
        model: a transformers VLM (not yet wrapped by peft).
        targets: leaf module names (``["q_proj", "v_proj"]``) or ``"all-linear"`` (every ``nn.Linear`` leaf name of
            the language model).
        scope: ``"language_model"`` (default) or ``"all"`` (any module with a matching leaf name, vision included).

    Example:
        >>> from vpo.models import tiny_llava
        >>> lora_target_regex(tiny_llava().model, ["q_proj", "v_proj"])
        '^model\\\\.language_model\\\\..*\\\\.(?:q_proj|v_proj)$'
    """
    base = unwrap_model(model)
    prefix = language_model_prefix(base)
    decoder = base.get_decoder()
    linear_leaves = sorted({n.rsplit(".", 1)[-1] for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)})
    if targets == "all-linear":
        leaves = linear_leaves
    else:
        leaves = list(targets)
        missing = [t for t in leaves if t not in linear_leaves]
        if missing:
            raise ValueError(f"lora_target_modules {missing} name no nn.Linear inside the language model "
                             f"({prefix}); its linear layers are {linear_leaves}")
    if not leaves:
        raise ValueError(f"the language model ({prefix}) has no nn.Linear layer to adapt")
    alternatives = "|".join(re.escape(x) for x in leaves)
    if scope == "all":
        return rf"^(?:.*\.)?(?:{alternatives})$"
    if scope != "language_model":
        raise ValueError(f"scope must be 'language_model' or 'all', got {scope!r}")
    return rf"^{re.escape(prefix)}\..*\.(?:{alternatives})$"


def apply_lora(model, *, r: int = 8, alpha: int = 16, dropout: float = 0.05,
               targets: Union[str, Sequence[str]] = "all-linear", scope: str = "language_model"):
    """Wrap ``model`` in a peft LoRA adapter on the language model's linear layers (:func:`lora_target_regex`)."""
    from peft import LoraConfig, get_peft_model

    import warnings

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=lora_target_regex(model, targets, scope))
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def freeze_outside_language_model(model) -> None:
    """Full fine-tuning: only the language model (and the LM head) keeps ``requires_grad``."""
    base = unwrap_model(model)
    prefix = language_model_prefix(base) + "."
    head = base.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    for name, p in base.named_parameters():
        if not (name.startswith(prefix) or id(p) in head_params):
            p.requires_grad_(False)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, *, dtype: str = "auto", attn_implementation: str = "sdpa", seed: int = 0,
               with_processor: bool = True):
    """Load a model: ``tiny:<family>`` builds a tiny random one (:mod:`vpo.models.tiny`), anything else is a local
    folder read with ``AutoModelForImageTextToText`` and ``AutoProcessor``.

    Returns:
        ``(model, processor, tiny)``: for tiny models ``tiny`` is the :class:`vpo.models.TinyVLM` and ``processor``
        :func:`vpo.data.build_tiny_processor`'s; otherwise ``tiny`` is None and ``processor`` the folder's
        (None unless ``with_processor``).
    """
    if path.startswith("tiny:"):
        from vpo import models

        family = path.split(":", 1)[1]
        builder = getattr(models, f"tiny_{family}", None)
        if builder is None:
            raise ValueError(f"unknown tiny model {path!r}: expected tiny:llava, tiny:qwen2_vl, tiny:qwen2_5_vl or "
                             "tiny:idefics2")
        tiny = builder(seed)
        model = tiny.model
        if dtype in _DTYPES:
            model = model.to(_DTYPES[dtype])
        try:  # a real processor class over a word-level tokenizer, matching the tiny model (vpo.data)
            from vpo.data import build_tiny_processor

            processor = build_tiny_processor(family, tiny=tiny)
        except ImportError:
            processor = None
        return model, processor, tiny
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = {"attn_implementation": attn_implementation}
    kwargs["dtype"] = "auto" if dtype == "auto" else _DTYPES[dtype]
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(path) if with_processor else None
    return model, processor, None


def merge_and_save(model, path: str, processor=None) -> None:
    """Fold a LoRA adapter into the base weights and save a plain model folder (``save_pretrained``), e.g. CSR's
    iterate t, which iteration t + 1 loads as its starting point and as its frozen reference
    (``model_name_or_path`` / ``ref_model_path``). The adapter of ``model`` itself is left in place."""
    import copy

    peft = unwrap_peft(model)
    if peft is None:
        unwrap_model(model).save_pretrained(path)
    else:
        copy.deepcopy(peft).merge_and_unload().save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
