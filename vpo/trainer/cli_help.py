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
    ("per method (docs/methods.md)",
     ["tpo_a", "noise_step", "fixed_noise", "kl_coef", "catpo_alpha", "ovip_image_loss", "ovip_anchor", "online",
      "list_size", "anchor_delta", "crop_keep_min", "crop_keep_max", "crop_frac", "noise_clip", "csr_iteration"]),
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


def short_help(command: str = "train") -> str:
    """The ``--help`` text of ``vpo <command>``."""
    import dataclasses

    from vpo.trainer.config import VPOConfig

    fields = {f.name: f for f in dataclasses.fields(VPOConfig)}
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
            f = fields.get(name)
            if f is None:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            text = _first_sentence(f.metadata.get("help", ""), 70)
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
