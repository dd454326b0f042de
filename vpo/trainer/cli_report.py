"""What ``vpo train`` tells its user: the start banner, one summary of the records each data file kept and skipped
(with the columns it found: :func:`vpo.trainer.data_report.data_summary`, the line VPOTrainer logs too), the image
files checked before training, the final "saved to" line, and where an interrupted run can resume. Also the command
line's own repairs: a negative number after a flag (``--learning_rate -1e-4``) is that flag's value, not an unknown
option.

Kept apart from :mod:`vpo.trainer.cli` (loading and training) so each reads on its own; every line printed here is
tested by subprocess in tests/test_cli_train_report.py.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Iterable, List, Sequence

_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def join_negative_numbers(argv: Sequence[str]) -> List[str]:
    """``["--lr", "-1e-4"]`` -> ``["--lr=-1e-4"]``: argparse reads ``-1e-4`` as an option, not a value."""
    out: List[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" not in a and i + 1 < len(argv) and _NUMBER.match(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def say(line: str) -> None:
    """One status line of ``vpo train`` on stdout, flushed (the progress bar writes to stderr)."""
    print(line, flush=True)


# -- data -------------------------------------------------------------------------------------------------------------

def _image_paths(rec) -> Iterable[str]:
    for attr in ("image", "neg_image", "image_list"):
        value = getattr(rec, attr, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and not item.startswith("data:"):
                yield item


def check_image_files(dataset, name: str, limit: int = 3) -> int:
    """Stat every image path of ``dataset``'s records (no decoding); ValueError naming the count and the first missing
    ones. Returns how many paths were checked (0 for sources without paths, e.g. embedded images)."""
    records = getattr(dataset, "records", None)
    if records is None:
        return 0
    missing, checked = [], 0
    for rec in records:
        for p in _image_paths(rec):
            checked += 1
            if not os.path.isfile(p):
                missing.append(p)
    if missing:
        shown = ", ".join(missing[:limit]) + (" ..." if len(missing) > limit else "")
        raise ValueError(f"{name} data: {len(missing)} of {checked} image files do not exist ({shown}); set "
                         "image_root to the folder relative image paths are read from")
    return checked


# -- banner, end, interruption ----------------------------------------------------------------------------------------

def banner(trainer, config, train, evaluation) -> List[str]:
    """The start banner's lines: model and collator, method and loss, data, device and dtype, output folder."""
    from vpo.trainer.modeling import unwrap_model

    model = unwrap_model(trainer.model)
    mcfg = getattr(model, "config", None)
    model_type = getattr(mcfg, "model_type", type(model).__name__)
    collator = trainer.data_collator
    family = getattr(collator, "family", None)
    types, weights = config.loss_type_list()
    loss = ", ".join(t if w == 1.0 else f"{w}*{t}" for t, w in zip(types, weights))
    dtype = next((p.dtype for p in model.parameters()), None)
    mixed = "bf16 mixed" if config.bf16 else "fp16 mixed" if config.fp16 else "no mixed precision"
    fine = f"LoRA r={config.lora_r}" if config.use_lora else "full fine-tuning"
    lines = [
        f"vpo train: model {config.model_name_or_path} ({model_type}), {fine}; collator "
        f"{type(collator).__name__}{f' ({family})' if family else ''}",
        f"vpo train: method {config.method}, loss {loss}, beta {config.beta}, reference {config.ref_mode}",
    ]
    for split, ds in (("train", train), ("eval", evaluation)):
        if ds is None:
            continue
        stats = getattr(ds, "stats", None)
        kept = stats.kept if stats is not None else len(ds) if hasattr(ds, "__len__") else "?"
        skipped = sum(stats.skipped.values()) if stats is not None else 0
        lines.append(f"vpo train: {split} records: {kept} kept, {skipped} skipped")
    steps = f"{config.max_steps} steps" if config.max_steps and config.max_steps > 0 else \
        f"{config.num_train_epochs} epochs"
    lines.append(f"vpo train: device {trainer.args.device}, dtype {str(dtype).replace('torch.', '')} ({mixed}); "
                 f"{steps}")
    lines.append(f"vpo train: output folder {os.path.abspath(config.output_dir)}")
    return lines


def interrupted_message(trainer, output_dir: str) -> str:
    """``interrupted at step N; last checkpoint …; resume with --resume_from_checkpoint last``."""
    from vpo.trainer.checkpoint import latest_complete_checkpoint

    step = getattr(getattr(trainer, "state", None), "global_step", 0) if trainer is not None else 0
    try:
        last, _ = latest_complete_checkpoint(output_dir)
    except (OSError, ValueError):
        last = None
    if last is None:
        return f"interrupted at step {step}; no checkpoint saved yet in {os.path.abspath(output_dir)} (nothing " \
               "to resume)"
    return f"interrupted at step {step}; last checkpoint {last}; resume with --resume_from_checkpoint last"


def print_lines(lines: Iterable[str], stream=None) -> None:
    for line in lines:
        print(line, file=stream or sys.stdout, flush=True)
