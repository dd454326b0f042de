"""The vpo trainer: preference optimization of vision-language models on the fused losses.

- :class:`VPOConfig` (``transformers.TrainingArguments`` + method, model, reference, LoRA and data fields) and
  :class:`VPOTrainer` (a ``transformers.Trainer`` whose loss runs the method's passes and the fused losses on last
  hidden states + the LM head);
- the methods, one function each: :mod:`vpo.trainer.methods` (``dpo``, ``tpo``, ``catpo``, ``ovip``, ``lpoi``,
  ``mdpo``, ``csr``);
- the reference: :class:`Reference` (adapter / model / precomputed) and :func:`precompute_reference`;
- model plumbing: :func:`load_model`, :func:`apply_lora`, :func:`lora_target_regex` / :func:`lora_target_modules`
  (LoRA on the language model's plain linear layers, by path), :func:`head_transform` (soft-cap / logit scale),
  :func:`merge_and_save` (fold the adapter in: CSR's next iterate);
- CSR's iterative loop: :func:`make_csr_train_fn` (the training step of :func:`vpo.construct.csr_iterate`);
- OViP online (``method: ovip``, ``online: true``): :func:`build_online_dataset` (:mod:`vpo.trainer.online`);
- the command line: :func:`vpo.trainer.cli.train_main` (``vpo train``), :func:`vpo.trainer.cli.precompute_ref_main`
  (``vpo precompute-ref``).
"""
from vpo import _lazy

# name -> submodule. Imported on first use (PEP 562, vpo._lazy): transformers is slow to import, and
# `vpo.trainer.cli`'s subcommand registration must stay cheap for `vpo info` / `vpo demo`.
_EXPORTS = {
    "METHODS": "config",
    "REF_MODES": "config",
    "VPOConfig": "config",
    "reference_terms": "methods",
    "apply_lora": "modeling",
    "load_model": "modeling",
    "lora_target_regex": "modeling",
    "lora_target_modules": "modeling",
    "head_transform": "modeling",
    "merge_and_save": "modeling",
    "model_family": "modeling",
    "Passes": "passes",
    "forward_hidden": "passes",
    "Reference": "reference",
    "load_reference_table": "reference",
    "make_csr_train_fn": "csr",
    "build_online_dataset": "online",
    "precompute_reference": "reference",
    "reference_logps_path": "reference",
    "save_reference_table": "reference",
    "VPOTrainer": "trainer",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = _lazy.lazy_exports(__name__, {name: f".{module}" for name, module in _EXPORTS.items()})
