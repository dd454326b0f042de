r"""Model plumbing for the trainer: loading, the language-model-only LoRA, the LM head, the backbone.

LoRA targets are module PATHS and TYPES, never bare leaf names. A leaf name such as ``q_proj`` also names attention
projections of the vision tower (CLIP in LLaVA, the Idefics2 perceiver, ...), and a numeric leaf (Gemma 3n's
``altup_projections.0``) would match a whole decoder layer (``layers.0``). :func:`lora_target_modules` therefore lists
the full names of the modules to adapt: inside the LANGUAGE model (``model.get_decoder()``, located by identity among
``named_modules()``), of type ``nn.Linear`` with ``nn.Linear``'s own ``forward`` (a subclass that overrides it, such as
Llama 4's MoE router returning ``(scores, logits)``, is left out), and not an MoE router (leaf ``router`` / ``gate``:
its output picks experts, adapting it is not what LoRA on the layers means). :func:`lora_target_regex` writes that set
as one anchored regex (peft full-matches a string target), the layer indices folded into ``\d+``::

    ^(?:model\.language_model\.layers\.\d+\.self_attn\.q_proj|model\.language_model\.layers\.\d+\.mlp\.up_proj|...)$

and checks that the regex matches exactly that set in the model (a pattern that would also match another module is
written out name by name instead).

Head transforms. Some models do not take their logits straight from ``h · Wᵀ``: Gemma 2 / 3n and PaliGemma soft-cap
them (``z = cap · tanh(z / cap)``, ``final_logit_softcapping``), Cohere and Aya Vision scale them (``z = s · z``,
``logit_scale``). :func:`head_transform` reads both from the model's configs (top level, ``text_config`` and nested
ones) when the model's own ``forward`` applies them, so the fused losses can apply the same transform.
"""
from __future__ import annotations

import functools
import inspect
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


def model_type_of(model) -> str:
    """``config.model_type`` of the transformers model inside ``model`` (its class name when it has none)."""
    base = unwrap_model(model)
    return str(getattr(getattr(base, "config", None), "model_type", None) or type(base).__name__)


def _has_lm_head(module: torch.nn.Module) -> bool:
    get = getattr(module, "get_output_embeddings", None)
    try:
        return callable(get) and isinstance(get(), torch.nn.Module)
    except (AttributeError, NotImplementedError):
        return False


def decoder_of(model) -> Optional[torch.nn.Module]:
    """The language model's body (``get_decoder()``), descending through a ``*ForCausalLM`` that ``get_decoder()``
    may return (Llama 4's ``language_model`` -> ``language_model.model``); None when there is none."""
    module = unwrap_model(model)
    for _ in range(3):
        get_decoder = getattr(module, "get_decoder", None)
        inner = get_decoder() if callable(get_decoder) else None
        if not isinstance(inner, torch.nn.Module):
            return None
        if not _has_lm_head(inner):
            return inner
        body = getattr(inner, "model", None)  # a *ForCausalLM (whose get_decoder() may return itself)
        if isinstance(body, torch.nn.Module) and not _has_lm_head(body):
            return body
        if inner is module:
            return None
        module = inner
    return None


def backbone(model) -> torch.nn.Module:
    """The module whose output's ``last_hidden_state`` is the post-norm hidden state the LM head reads: the ``*Model``
    under a ``*ForConditionalGeneration`` (``.model``), else the language model itself (``get_decoder()``: Llama 4's
    ``language_model.model``)."""
    base = unwrap_model(model)
    inner = getattr(base, "model", None)
    # ``.model`` may alias a model with its own LM head (Llama 4: the *ForCausalLM), whose output is logits
    if isinstance(inner, torch.nn.Module) and not _has_lm_head(inner):
        return inner
    decoder = decoder_of(base)
    if decoder is not None:
        return decoder
    raise ValueError(f"{model_type_of(base)} ({type(base).__name__}) has neither a `.model` backbone module nor a "
                     f"get_decoder(): expected a transformers *ForConditionalGeneration")


def lm_head(model) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, D], bias [V] | None)`` of the model's output projection."""
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{model_type_of(base)}: {type(base).__name__}.get_output_embeddings() returned no linear "
                         f"head (the fused losses read its weight)")
    if hasattr(head, "lora_A"):
        raise ValueError("the LM head carries a LoRA adapter: the fused losses read lm_head.weight directly, so the "
                         "adapter would be ignored; keep the LoRA targets inside the language model")
    return head.weight, getattr(head, "bias", None)


def language_model_prefix(model) -> str:
    """Dotted name of the language model (``model.get_decoder()``) inside ``model``, e.g. ``model.language_model``."""
    base = unwrap_model(model)
    decoder = decoder_of(base)
    if decoder is None:
        raise ValueError(f"{model_type_of(base)} ({type(base).__name__}) has no language model (get_decoder())")
    for name, module in base.named_modules():
        if module is decoder and name:
            return name
    raise ValueError(f"could not locate {type(decoder).__name__} (get_decoder()) among the modules of "
                     f"{type(base).__name__}")


# Leaf names of MoE routers: their output chooses experts (Mixtral / Qwen-MoE ``gate``, Llama 4 ``router``).
_ROUTER_LEAVES = frozenset({"router", "gate"})
# Quantized linear layers peft adapts (their forward returns a tensor like nn.Linear's).
_QUANT_PACKAGES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "torchao", "optimum")


def _adaptable_linear(name: str, module: torch.nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is ``nn.Linear``'s (or a quantized one's), not an MoE router."""
    if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] in _ROUTER_LEAVES:
        return False
    cls = type(module)
    return cls.forward is torch.nn.Linear.forward or cls.__module__.split(".")[0] in _QUANT_PACKAGES


def lora_target_modules(model, targets: Union[str, Sequence[str]] = "all-linear",
                        scope: str = "language_model") -> list:
    """Full module names (``named_modules()`` of the transformers model) that LoRA adapts (module docstring).

    Args:
        model: a transformers VLM (not yet wrapped by peft).
        targets: ``"all-linear"`` (every adaptable linear layer in scope) or leaf names (``["q_proj", "v_proj"]``):
            the adaptable linear layers in scope whose last name component is one of them.
        scope: ``"language_model"`` (default) or ``"all"`` (the whole model, vision tower included; never the LM
            head, which the fused losses read directly).
    """
    base = unwrap_model(model)
    if scope == "language_model":
        prefix = language_model_prefix(base) + "."
        where = f"the language model ({prefix[:-1]})"
    elif scope == "all":
        prefix = ""
        where = f"{type(base).__name__}"
    else:
        raise ValueError(f"scope must be 'language_model' or 'all', got {scope!r}")
    head = base.get_output_embeddings()
    found = [n for n, m in base.named_modules()
             if n.startswith(prefix) and m is not head and _adaptable_linear(n, m)]
    if targets != "all-linear":
        if isinstance(targets, str):
            targets = [targets]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in found})
        missing = [t for t in targets if t not in leaves]
        if missing:
            raise ValueError(f"lora_target_modules {missing} name no nn.Linear inside {where}; its linear layers are "
                             f"{leaves}")
        found = [n for n in found if n.rsplit(".", 1)[-1] in set(targets)]
    if not found:
        raise ValueError(f"{model_type_of(base)}: {where} has no nn.Linear layer to adapt")
    return found


def _names_regex(names: Sequence[str], all_names: Sequence[str]) -> str:
    """One anchored regex matching exactly ``names`` among ``all_names``: layer indices folded into ``\\d+`` where
    that matches nothing else, the names written out otherwise."""
    groups: dict = {}
    for n in names:
        pattern = r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in n.split("."))
        groups.setdefault(pattern, []).append(n)
    wanted = set(names)
    alternatives = []
    for pattern, members in groups.items():
        rx = re.compile(pattern)
        if all(n in wanted for n in all_names if rx.fullmatch(n)):
            alternatives.append(pattern)
        else:  # the folded pattern would reach another module: list the names
            alternatives.extend(re.escape(n) for n in members)
    return "^(?:" + "|".join(alternatives) + ")$"


def lora_target_regex(model, targets: Union[str, Sequence[str]] = "all-linear", scope: str = "language_model") -> str:
    """The peft ``target_modules`` regex of :func:`lora_target_modules` (module docstring).

    Example:
        >>> from vpo.models import tiny_llava
        >>> print(lora_target_regex(tiny_llava().model, ["q_proj", "v_proj"]).replace("|", "\\n|"))
        ^(?:model\\.language_model\\.layers\\.\\d+\\.self_attn\\.q_proj
        |model\\.language_model\\.layers\\.\\d+\\.self_attn\\.v_proj)$
    """
    base = unwrap_model(model)
    names = lora_target_modules(base, targets, scope)
    return _names_regex(names, [n for n, _ in base.named_modules()])


def head_transform(model) -> Tuple[Optional[float], Optional[float]]:
    """``(softcap, scale)`` the model applies to its logits ``z = h · Wᵀ (+ b)``: soft-capping ``cap · tanh(z / cap)``
    (Gemma 2 / 3n, PaliGemma), scaling ``scale · z`` (Cohere, Aya Vision); ``None``: not applied. Read from the
    first config (top level, ``get_text_config()``, then nested sub-configs) that sets ``final_logit_softcapping`` /
    ``logit_scale``, and only when the model's own ``forward`` applies it (its source names the key: Gemma 3's
    ``*ForConditionalGeneration`` ignores its text config's cap, Cohere2-Vision its ``logit_scale``)."""
    base = unwrap_model(model)
    config = base.config
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for key in ("text_config", "language_config", "llm_config"):
        sub = getattr(config, key, None)
        if sub is not None:
            configs.append(sub)
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):  # no source: trust the config
        source = None

    def read(key: str, neutral: float) -> Optional[float]:
        if source is not None and key not in source:
            return None
        for c in configs:
            value = getattr(c, key, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value != neutral:
                return float(value)
        return None

    softcap = read("final_logit_softcapping", 0.0)
    scale = read("logit_scale", 1.0)
    return softcap, scale


@functools.lru_cache(maxsize=None)
def _keywords(fn) -> frozenset:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def head_kwargs(fn, transform: Tuple[Optional[float], Optional[float]], model_type: str = "the model") -> dict:
    """The keyword arguments carrying a :func:`head_transform` ``(softcap, scale)`` to ``fn`` (a fused loss or an
    op): ``logit_softcap`` / ``logit_scale``, only those that are set (so a plain head passes nothing). Raises
    ValueError naming the model type when ``fn`` does not take a keyword the model needs."""
    softcap, scale = transform
    kw = {}
    if softcap is not None:
        kw["logit_softcap"] = float(softcap)
    if scale is not None:
        kw["logit_scale"] = float(scale)
    missing = [k for k in kw if k not in _keywords(fn)]
    if missing:
        what = {"logit_softcap": f"soft-caps its logits (final_logit_softcapping={softcap})",
                "logit_scale": f"scales its logits (logit_scale={scale})"}[missing[0]]
        raise ValueError(f"{model_type} {what}, but this vpo build's {getattr(fn, '__name__', fn)} takes no "
                         f"{missing[0]}: the log-probs would not be the model's")
    return kw


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
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (ImportError, ValueError) as e:
        _raise_if_vision_extra(e, _config_model_type(path), "model")
        raise
    processor = None
    if with_processor:
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (ImportError, ValueError) as e:
            _raise_if_vision_extra(e, model_type_of(model), "processor")
            raise
    return model, processor, None


# What `pip install vpo[vision]` adds: torchvision-based image/video processors, timm vision towers (Gemma 3n).
_VISION_EXTRA = ("torchvision", "timm")


def _config_model_type(path: str) -> str:
    import json
    import os

    try:
        with open(os.path.join(path, "config.json")) as f:
            return str(json.load(f).get("model_type", path))
    except (OSError, ValueError):
        return path


def _raise_if_vision_extra(err: Exception, model_type: str, what: str) -> None:
    """One line naming the missing package when ``err`` is a missing torchvision / timm."""
    missing = [m for m in _VISION_EXTRA if m in str(err).lower()]
    if missing:
        raise ImportError(f"{model_type}: its {what} needs {missing[0]}, which is not installed: pip install "
                          f"'vpo[vision]' (torchvision and timm, matching your torch build)") from None



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
