"""Checks that run before any compute, so a run cannot train for hours and then fail at its first save.

- :func:`check_output_dir`: the output folder is (or can be made) a folder, a file and a sub-folder can really be
  created in it (a probe, not ``os.access``: root passes ``os.access`` on a read-only mount), and it has room for one
  checkpoint (:func:`estimate_checkpoint_bytes`);
- :func:`check_paths`: the data files, the image folder and the model folder exist;
- :func:`check_judge`: OViP's HTTP judge endpoint answers (any HTTP status counts as an answer: only "nothing
  there" — refused, unresolvable, timed out — fails).

:func:`preflight_config` runs the cheap ones for ``vpo train`` before the model is loaded; :func:`preflight_trainer`
runs the ones that need the model (the checkpoint size) at the start of ``VPOTrainer.train``. Every failure is a
:class:`PreflightError` (a ``ValueError``) with one line naming the setting, the path and what is wrong.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

GiB = 1024 ** 3


class PreflightError(ValueError):
    """A setup problem found before training started (one line: the setting, the path, what is wrong)."""


def _human(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024 ** 2:.1f} MiB"


def check_output_dir(path: str, need_bytes: int = 0, *, name: str = "output_dir") -> None:
    """``path`` is a writable folder (created if missing) with at least ``need_bytes`` free; else
    :class:`PreflightError`."""
    if not path:
        raise PreflightError(f"{name} is empty: give the folder the run writes to")
    if os.path.exists(path) and not os.path.isdir(path):
        raise PreflightError(f"{name} {path}: exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise PreflightError(f"{name} {path}: cannot be created ({e.strerror or e})") from None
    try:  # what a checkpoint does: make a folder, write a file in it
        probe = tempfile.mkdtemp(prefix=".vpo-write-test-", dir=path)
        try:
            with open(os.path.join(probe, "probe"), "wb") as f:
                f.write(b"vpo")
                f.flush()
                os.fsync(f.fileno())
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    except OSError as e:
        raise PreflightError(f"{name} {path}: not writable ({e.strerror or e})") from None
    if need_bytes > 0:
        free = shutil.disk_usage(path).free
        if free < need_bytes:
            raise PreflightError(f"{name} {path}: {_human(free)} free, but one checkpoint needs about "
                                 f"{_human(need_bytes)} (weights + optimizer state)")


def estimate_checkpoint_bytes(model, *, with_optimizer: bool = True, optimizer_states: int = 2) -> int:
    """Bytes of one checkpoint of ``model``: the saved weights (only the trainable ones for a peft model, which
    saves its adapter; all of them otherwise) plus ``optimizer_states`` tensors per trainable parameter (AdamW: 2)
    in the parameter's dtype, + 10% and 1 MiB for the small files. A lower bound for ZeRO/FSDP shard layouts."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    from vpo.trainer.modeling import unwrap_peft

    is_peft = unwrap_peft(model) is not None
    weights = trainable if is_peft else sum(p.numel() * p.element_size() for p in model.parameters())
    total = weights + (optimizer_states * trainable if with_optimizer else 0)
    return int(total * 1.1) + 2 ** 20


def check_paths(config) -> None:
    """The data (``data_path``, ``eval_data_path``), ``image_root`` and ``model_name_or_path`` /
    ``ref_model_path`` of a :class:`vpo.trainer.VPOConfig` exist (synthetic data and ``tiny:`` models need none;
    a Hub id ``org/name`` is left to ``from_pretrained``: :func:`vpo.trainer.cli_help.check_model_path`)."""
    from vpo.trainer.cli_help import check_model_path

    for field in ("data_path", "eval_data_path"):
        value = getattr(config, field, None)
        if value and not str(value).startswith("synthetic") and not os.path.exists(os.path.expanduser(value)):
            raise PreflightError(f"{field} {value}: no such file")
    root = getattr(config, "image_root", None)
    if root and not os.path.isdir(os.path.expanduser(root)):
        raise PreflightError(f"image_root {root}: no such folder")
    for field in ("model_name_or_path", "ref_model_path"):
        value = getattr(config, field, None)
        if value:
            try:
                check_model_path(value, field)
            except ValueError as e:
                raise PreflightError(str(e)) from None


def check_judge(url: Optional[str], timeout: float = 5.0) -> None:
    """An HTTP endpoint at ``url`` answers a GET within ``timeout`` seconds (any status code is an answer)."""
    if not url:
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # the server answered (405 for a GET on /chat/completions, 401 without a key, ...)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise PreflightError(f"online_judge_url {url}: the judge endpoint does not answer ({reason})") from None


def preflight_config(config) -> None:
    """``vpo train``'s checks before the model is loaded: output folder, data and model paths, judge endpoint."""
    check_output_dir(config.output_dir)
    check_paths(config)
    if getattr(config, "online", False) and getattr(config, "online_judge", None) == "http":
        check_judge(config.online_judge_url)


def preflight_trainer(trainer) -> None:
    """``VPOTrainer.train``'s checks: the output folder is writable with room for one checkpoint (when the run
    saves any), the training data is not empty, and an online HTTP judge answers."""
    args = trainer.args
    saves = str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
    need = 0
    if saves and args.process_index == 0:
        need = estimate_checkpoint_bytes(trainer.model, with_optimizer=not args.save_only_model)
    check_output_dir(args.output_dir, need)
    dataset = trainer.train_dataset
    if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
        raise PreflightError("train_dataset is empty: no record to train on")
    from vpo.trainer.usable import check_scored_tokens

    check_scored_tokens(trainer)  # the first records give a scored token through the collator
    online = getattr(trainer, "_online", None)
    endpoint = getattr(getattr(online, "judge", None), "endpoint", None)
    if endpoint:
        check_judge(endpoint)
