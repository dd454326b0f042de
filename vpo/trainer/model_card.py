"""The model card (``README.md``) vpo writes next to a saved model or adapter.

Filled from the run: the base model, the method and its loss (``loss_type``, β, the reference), the data (path,
records kept and skipped), LoRA or full fine-tuning, the steps, and the last logged metrics (TRL's names:
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen`` ...; evaluation metrics when there are some). Only
fields of the configuration are written — never the environment (the OViP judge's API key lives there and nowhere
else).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

KEY_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
               "logps/rejected", "num_tokens/chosen", "num_tokens/rejected", "entropy/chosen", "entropy/rejected")


def _last_logged(history, key: str):
    for entry in reversed(history or []):
        if key in entry:
            return entry[key]
    return None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _base_model(trainer) -> str:
    args = trainer.args
    from vpo.trainer.modeling import unwrap_model

    name = getattr(unwrap_model(trainer.model).config, "_name_or_path", "") or ""
    return name or getattr(args, "model_name_or_path", "") or "unknown"


def _data(trainer) -> str:
    args = trainer.args
    ds = trainer.train_dataset
    parts = []
    if getattr(args, "data_path", None):
        parts.append(f"`{args.data_path}`")
    else:
        parts.append(f"an in-memory `{type(ds).__name__}`")
    stats = getattr(ds, "stats", None)
    if stats is not None:
        skipped = dict(stats.skipped)
        parts.append(f"{stats.kept} of {stats.seen} records kept" + (f" (skipped: {skipped})" if skipped else ""))
    elif ds is not None and hasattr(ds, "__len__"):
        parts.append(f"{len(ds)} records")
    return ", ".join(parts)


def model_card(trainer, eval_metrics: Optional[Dict[str, float]] = None, output_dir: Optional[str] = None) -> str:
    """The card's Markdown text for ``trainer`` after training; its usage snippet loads from ``output_dir`` (the
    folder the card is written to; default ``args.output_dir``), as an absolute path."""
    import vpo

    args = trainer.args
    from vpo.trainer.modeling import unwrap_peft

    lora = unwrap_peft(trainer.model) is not None
    types, weights = args.loss_type_list()
    loss = ", ".join(t if w == 1.0 else f"{w}·{t}" for t, w in zip(types, weights))
    base = _base_model(trainer)
    history = trainer.state.log_history
    rows = []
    for key in KEY_METRICS:
        value = _last_logged(history, key)
        if value is not None:
            rows.append(f"| {key} | {_fmt(value)} |")
    for key, value in sorted((eval_metrics or {}).items()):
        if isinstance(value, (int, float)) and not key.endswith(("_runtime", "_per_second")):
            rows.append(f"| {key} | {_fmt(value)} |")
    metrics = "\n".join(["| metric | last value |", "|---|---|", *rows]) if rows else "No metrics were logged."
    tags = ["vpo", args.method, "preference-optimization", "vision-language-model"] + (["lora", "peft"] if lora else [])
    front = "\n".join(["---", f"base_model: {base}", "library_name: " + ("peft" if lora else "transformers"),
                       "tags:", *[f"- {t}" for t in tags], "---"])
    folder = os.path.abspath(output_dir or args.output_dir)
    load = (f"from peft import PeftModel\nfrom transformers import AutoModelForImageTextToText\n"
            f"model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(\"{base}\"), "
            f"\"{folder}\")"
            if lora else
            "from transformers import AutoModelForImageTextToText\n"
            f"model = AutoModelForImageTextToText.from_pretrained(\"{folder}\")")
    lines = [
        front,
        "",
        f"# {os.path.basename(folder)}",
        "",
        f"A {'LoRA adapter for' if lora else 'fine-tuned'} `{base}` trained with **{args.method}** by "
        f"vpo {vpo.__version__} (`docs/methods.md` has the method's loss).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| method | {args.method} |",
        f"| loss | {loss} (β = {args.beta}{', label smoothing ' + str(args.label_smoothing) if args.label_smoothing else ''}) |",
        f"| reference | {args.ref_mode} |",
        f"| fine-tuning | {'LoRA r=' + str(args.lora_r) + ', alpha=' + str(args.lora_alpha) if lora else 'full'} |",
        f"| data | {_data(trainer)} |",
        f"| steps | {trainer.state.global_step} (batch {args.per_device_train_batch_size} × accumulation "
        f"{args.gradient_accumulation_steps} × {args.world_size} process(es)), learning rate {args.learning_rate} |",
        "",
        "## Metrics",
        "",
        metrics,
        "",
        "## Use",
        "",
        "```python",
        load,
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(trainer, output_dir: Optional[str] = None, eval_metrics: Optional[Dict[str, float]] = None) -> str:
    """Write :func:`model_card` to ``output_dir/README.md`` (replacing peft's empty template); returns the path."""
    out = output_dir or trainer.args.output_dir
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(model_card(trainer, eval_metrics, out))
    return path
