"""The manners of ``vpo train`` / ``vpo precompute-ref``: short help, usage errors, one-line errors, model paths.

- ``--help``: the options a user sets (``--config`` and the method's first, then data, model, training), under 100
  lines, generated from the :class:`~vpo.trainer.VPOConfig` fields' help so it never drifts;
  ``--help-all``: every field, ``TrainingArguments`` included (``HfArgumentParser``'s help).
- no ``--config`` and no ``--data``/``--data_path``: a usage error (exit 2); synthetic data only when named.
- any other failure: ``vpo <command>: error: <message>`` on one stderr line, exit 1; ``--debug`` re-raises
  (traceback). ``KeyboardInterrupt`` exits 130.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, List, Optional, Sequence

# (section, [field names]) of the short help, in order.
SECTIONS = (
    ("method", ["method", "beta", "loss_type", "loss_weights", "label_smoothing", "ref_mode", "ref_model_path",
                "ref_logps_path"]),
    ("data", ["data_path", "eval_data_path", "data_layout", "image_root", "max_length"]),
    ("model", ["model_name_or_path", "model_family", "torch_dtype", "use_lora", "lora_r", "lora_alpha",
               "lora_target_modules", "freeze_vision"]),
    ("training (TrainingArguments; all of them: --help-all)",
     ["output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
      "learning_rate", "lr_scheduler_type", "warmup_steps", "bf16", "gradient_checkpointing", "logging_steps",
      "save_steps", "eval_strategy", "report_to", "resume_from_checkpoint", "seed", "use_cpu"]),
    ("TRL's DPOConfig options (docs/trl.md)",
     ["f_divergence_type", "f_alpha_divergence_coef", "discopop_tau", "use_weighting", "ld_alpha", "sync_ref_model",
      "ref_model_mixup_alpha", "ref_model_sync_steps", "disable_dropout"]),
    ("per method (docs/methods.md)",
     ["tpo_a", "noise_step", "fixed_noise", "kl_coef", "catpo_alpha", "catpo_layers", "catpo_heads", "ovip_image_loss",
      "ovip_anchor", "online", "list_size", "anchor_delta", "crop_keep_min", "crop_keep_max", "crop_frac", "noise_clip",
      "csr_iteration"]),
)


class UsageError(Exception):
    """A command line that cannot mean anything (exit 2)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with the line to print (the step, the last checkpoint, how to resume)."""


def _first_sentence(text: str, width: int = 78) -> str:
    text = re.sub(r"\s+", " ", text or "").strip()
    text = re.sub(r"\[((?:'[^']*'(?:, )?)+)\]", lambda m: "|".join(re.findall(r"'([^']*)'", m.group(1))), text)
    cut = re.split(r"(?<=[.;])\s", text, maxsplit=1)[0]
    return cut if len(cut) <= width else cut[: width - 3].rstrip() + "..."


# The short help's TrainingArguments fields (they are not in config.py's source): (default, first sentence of the
# help). tests/test_cli_help_fields.py checks them against transformers' own fields, so they cannot drift.
TRAINING_FIELDS = {
    "output_dir": (None, "where checkpoints and the final model are written"),
    "max_steps": (-1, "optimizer steps to train (-1: num_train_epochs decides)"),
    "num_train_epochs": (3.0, "passes over the training data (when max_steps is -1)"),
    "per_device_train_batch_size": (8, "pairs per device per micro-batch"),
    "gradient_accumulation_steps": (1, "micro-batches per optimizer step"),
    "learning_rate": (5e-05, "the optimizer's initial learning rate"),
    "lr_scheduler_type": ("linear", "the learning-rate schedule"),
    "warmup_steps": (0, "steps of linear warm-up"),
    "bf16": (False, "bf16 mixed precision"),
    "gradient_checkpointing": (None, "recompute activations in the backward to save memory"),
    "logging_steps": (10, "log every N optimizer steps"),
    "save_steps": (500, "save a checkpoint every N steps"),
    "eval_strategy": ("no", "when to evaluate: no|steps|epoch"),
    "report_to": ("none", "where to log: none|tensorboard|wandb|..."),
    "resume_from_checkpoint": (None, "a checkpoint folder, or last: the newest complete one in output_dir"),
    "seed": (42, "random seed"),
    "use_cpu": (False, "train on the CPU even when a GPU is there"),
}


def config_fields() -> dict:
    """``{name: (default, help)}`` of :class:`VPOConfig`'s own fields, read from ``config.py``'s source with
    :mod:`ast` — importing the class would import transformers and torch, seconds that ``--help`` should not take."""
    import ast

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = {"list": list}
    for node in tree.body:  # module constants (METHODS = (...)) the help strings format
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                names[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    out = {}
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VPOConfig")
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "field"):
            continue
        kw = {k.arg: k.value for k in node.value.keywords}
        default = None
        if "default" in kw:
            try:
                default = ast.literal_eval(kw["default"])
            except ValueError:
                default = None
        text = ""
        meta = kw.get("metadata")
        if isinstance(meta, ast.Dict):
            for k, v in zip(meta.keys, meta.values):
                if isinstance(k, ast.Constant) and k.value == "help":
                    text = eval(compile(ast.Expression(v), path, "eval"), {"__builtins__": {}}, names)  # noqa: S307
        out[node.target.id] = (default, text)
    return out


def short_help(command: str = "train") -> str:
    """The ``--help`` text of ``vpo <command>`` (no transformers import: :func:`config_fields`)."""
    fields = {**{k: v for k, v in TRAINING_FIELDS.items()}, **config_fields()}
    lines = [
        f"usage: vpo {command} --config FILE.yaml [--FIELD VALUE ...]",
        f"       vpo {command} --model_name_or_path DIR --data PATH [--FIELD VALUE ...]",
        "",
        "Train a vision-language model with a preference method (DPO and its loss_type variants, TPO, Cat-PO,",
        "OViP, CSR, LPOI, mDPO). Every field can sit in the YAML file; flags override it. Examples:",
        "examples/configs/*.yaml. Data formats: docs/data_format.md. Methods: docs/methods.md.",
        "",
        "  --config FILE.yaml      the run's configuration (VPOConfig fields)",
        "  --data PATH             = --data_path: JSONL, parquet file/folder, save_to_disk folder, or synthetic[:N]",
        "  --debug                 print the full traceback of an error",
        "  --help-all              every field, all TrainingArguments included",
    ]
    for title, names in SECTIONS:
        lines += ["", f"{title}:"]
        for name in names:
            if name not in fields:
                continue
            default, text = fields[name]
            text = _first_sentence(text, 70)
            lines.append(f"  --{name:<28} {text} [{default}]" if len(name) < 29 else f"  --{name} {text}")
    return "\n".join(lines) + "\n"


def full_help(command: str = "train") -> str:
    """``--help-all``: ``HfArgumentParser``'s help of every field."""
    from transformers import HfArgumentParser

    from vpo.trainer.config import VPOConfig

    parser = HfArgumentParser(VPOConfig)
    parser.prog = f"vpo {command}"
    return parser.format_help()


def _has(argv: Sequence[str], *flags: str) -> bool:
    return any(a in flags or any(a.startswith(f + "=") for f in flags) for a in argv)


def run(command: str, argv: Optional[Sequence[str]], fn: Callable[[List[str]], object]) -> int:
    """Run ``fn(argv without --debug)`` with the module docstring's manners; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if _has(argv, "-h", "--help"):
        sys.stdout.write(short_help(command))
        return 0
    if _has(argv, "--help-all"):
        sys.stdout.write(full_help(command))
        return 0
    try:
        if not _has(argv, "--config", "--data", "--data_path"):
            raise UsageError("no --config and no --data: nothing to train on (synthetic data only when named: "
                             "--data synthetic)")
        if not _has(argv, "--config", "--model_name_or_path") and not _synthetic(argv):
            raise UsageError("no --model_name_or_path: name the model folder to train (tiny:<family> for a tiny "
                             "random model)")
        result = fn(argv)
        return result if isinstance(result, int) else 0
    except UsageError as e:
        if debug:
            raise
        print(f"usage: vpo {command} --config FILE.yaml | --model_name_or_path DIR --data PATH  (--help)\n"
              f"vpo {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"vpo {command}: {str(e) or 'interrupted'}", file=sys.stderr, flush=True)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the command line's job: one line, traceback under --debug
        if debug:
            raise
        print(f"vpo {command}: error: {one_line(e)}  (--debug for the traceback)", file=sys.stderr)
        return 1


def _synthetic(argv: Sequence[str]) -> bool:
    """Whether the command line names the synthetic data (``--data synthetic[:N]``)."""
    for i, a in enumerate(argv):
        for flag in ("--data", "--data_path"):
            if a == flag and i + 1 < len(argv):
                return argv[i + 1].startswith("synthetic")
            if a.startswith(flag + "="):
                return a.split("=", 1)[1].startswith("synthetic")
    return False


def one_line(e: BaseException) -> str:
    """``e`` as one line: its type when the message does not say much, whitespace collapsed."""
    msg = re.sub(r"\s+", " ", str(e)).strip()
    if isinstance(e, (ValueError, FileNotFoundError)) and msg:
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def check_model_path(path: str, name: str = "model_name_or_path") -> None:
    """Raise ValueError when ``path`` looks like a local folder (absolute, ``./``, ``~``, or an existing parent)
    but is not one, or is a folder without a ``config.json``. ``tiny:<family>`` and Hub ids (``org/name``) pass."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{name} must be a model folder or tiny:<family>, got {path!r}")
    if path.startswith("tiny:"):
        return
    expanded = os.path.expanduser(path)
    local = path.startswith(("/", "./", "../", "~")) or os.sep in path.rstrip(os.sep) and path.count("/") > 1 \
        or os.path.exists(expanded)
    if not local:
        return  # a Hub id: from_pretrained reports what goes wrong
    if not os.path.isdir(expanded):
        raise ValueError(f"{name}: {path} is not a folder (a local model folder with config.json, e.g. from "
                         "`huggingface-cli download llava-hf/llava-1.5-7b-hf --local-dir DIR`)")
    if not os.path.isfile(os.path.join(expanded, "config.json")):
        raise ValueError(f"{name}: {path} has no config.json (not a transformers model folder)")
