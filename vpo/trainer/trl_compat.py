"""TRL's habits for :class:`vpo.trainer.VPOTrainer`: the collator from the processor, ``peft_config``, and the
automatic frozen reference copy.

``VPOTrainer(model, args, train_dataset=..., processing_class=processor, peft_config=LoraConfig(...))`` works as
TRL's ``DPOTrainer`` does:

- no ``data_collator``: one is built from ``processing_class`` (:func:`default_collator`): the tuned collator of the
  four families vpo knows (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Idefics2), else the generic one driven by the
  processor's chat template (any model ``AutoModelForImageTextToText`` loads);
- ``train_dataset`` / ``eval_dataset`` may be anything :func:`vpo.data.open_preference_data` reads (a
  ``datasets.Dataset`` in TRL's layout, a path, rows; default: ``args.data_path`` / ``args.eval_data_path``): they
  are opened once, and a dataset whose records are all skipped raises before training; when the read skipped some,
  one line says how many and why (:func:`vpo.trainer.data_report.log_data_summary`, the line ``vpo train`` prints);
- ``peft_config``: the model is wrapped with it (:func:`apply_peft_config`); the reference is then the policy with the
  adapter disabled;
- full fine-tuning (no LoRA, no ``peft_config``) with ``ref_mode`` ``auto``/``model`` and no ``ref_model``: a frozen
  copy of the initial policy is made (:func:`reference_copy`), or ``ref_model_path`` is loaded.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch

from vpo.trainer.modeling import FAMILY_OF_MODEL_TYPE, unwrap_model


def family_for(model) -> str:
    """The collator family of ``model``: a tuned one (``llava``, ``qwen2_vl``, ``qwen2_5_vl``, ``idefics2``) or
    ``"generic"``."""
    model_type = getattr(unwrap_model(model).config, "model_type", None)
    return FAMILY_OF_MODEL_TYPE.get(model_type, "generic")


def check_plain_head(model, method: str = "dpo") -> None:
    """Raise ValueError when the model's logits are not ``h · Wᵀ (+ b)`` and the fused functions of ``method`` cannot
    apply its transform (:func:`vpo.trainer.methods.check_head_supported`)."""
    from vpo.trainer.methods import check_head_supported

    check_head_supported(model, method)


def default_collator(processor, model, args):
    """The :class:`vpo.data.PreferenceCollator` for ``model`` and ``args`` (a :class:`VPOConfig`)."""
    from vpo.data import PreferenceCollator

    if processor is None:
        raise ValueError("no data_collator and no processing_class: pass processing_class=AutoProcessor.from_pretrained"
                         "(...) (the collator is built from it) or a data_collator")
    if getattr(processor, "tokenizer", None) is None or not hasattr(processor, "apply_chat_template"):
        raise ValueError(f"processing_class must be the model's multimodal processor (AutoProcessor), got "
                         f"{type(processor).__name__}")
    family = getattr(args, "model_family", None) or family_for(model)
    ovip_rejected = args.method == "ovip" and (args.ovip_image_loss == "symmetric" or args.ovip_anchor == "bi-anchor")
    return PreferenceCollator(processor, family, method=args.method, max_length=args.max_length,
                              noise_step=args.noise_step, seed=args.seed, fixed_noise=args.fixed_noise,
                              crop_max_frac=args.crop_frac, crop_keep=(args.crop_keep_min, args.crop_keep_max),
                              noise_clip=args.noise_clip, list_size=args.list_size, ovip_rejected=ovip_rejected)


def open_dataset(data: Any, args, name: str, collator=None):
    """``data`` as a torch dataset of preference records (None and torch datasets pass through; a list of dicts is
    read as preference rows only for vpo's own collator, or none yet — other collators take their own rows). Data it
    reads itself that loses records gets one logged summary line on the main process (``name`` without
    ``_dataset`` names it: ``train`` / ``eval``)."""
    if data is None:  # VPOConfig's data_path / eval_data_path stand in for a dataset not passed
        path = getattr(args, "data_path" if name == "train_dataset" else "eval_data_path", None)
        if not path or str(path).startswith("synthetic") or getattr(args, "online", False):
            return None
        data = str(path)
    from torch.utils.data import Dataset, IterableDataset

    from vpo.data.sources import RowsPreferenceDataset, open_preference_data

    if isinstance(data, (RowsPreferenceDataset, IterableDataset)) or (
            isinstance(data, Dataset) and hasattr(data, "stats")):
        return data
    from vpo.data import PreferenceCollator

    is_rows = isinstance(data, list) and data and all(isinstance(r, dict) for r in data) and (
        collator is None or isinstance(collator, PreferenceCollator))
    if is_rows or isinstance(data, str) or _is_hf(data):
        dataset = open_preference_data(data, layout=args.data_layout, image_root=args.image_root)
        if getattr(args, "process_index", 0) == 0:  # what the read skipped, once: vpo train's words
            from vpo.trainer.data_report import log_data_summary

            log_data_summary(name[:-len("_dataset")] if name.endswith("_dataset") else name, data, dataset)
        return dataset
    return data  # a user's own torch dataset of records


def _is_hf(data) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(data, (datasets.Dataset, datasets.DatasetDict))


def apply_peft_config(model, peft_config):
    """``get_peft_model(model, peft_config)``; refuses a config that would adapt the LM head (the fused losses read
    ``lm_head.weight`` directly, so such an adapter would be ignored)."""
    from peft import get_peft_model

    targets = getattr(peft_config, "target_modules", None)
    names = [targets] if isinstance(targets, str) else list(targets or [])
    if "lm_head" in names or getattr(peft_config, "modules_to_save", None) and "lm_head" in peft_config.modules_to_save:
        raise ValueError("peft_config adapts lm_head: the fused losses read lm_head.weight directly, so the adapter "
                         "would be ignored; target the language model's layers only")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)


def reference_copy(model) -> torch.nn.Module:
    """A frozen, eval-mode deep copy of ``model`` (the reference of full fine-tuning, as TRL makes one)."""
    ref = copy.deepcopy(unwrap_model(model))
    return ref.eval().requires_grad_(False)


def load_reference(args) -> Optional[torch.nn.Module]:
    """``args.ref_model_path`` loaded (frozen), or None when it is not set."""
    if not getattr(args, "ref_model_path", None):
        return None
    from vpo.trainer.modeling import load_model

    ref, _, _ = load_model(args.ref_model_path, dtype=args.torch_dtype, attn_implementation=args.attn_implementation,
                           seed=args.seed, with_processor=False)
    return ref.eval().requires_grad_(False)
