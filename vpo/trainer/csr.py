"""CSR's training step for the iterative loop (:func:`vpo.construct.csr_iterate`, ``vpo csr --iterations T``).

:func:`make_csr_train_fn` returns ``train_fn(dataset_dir, ref_model_path) -> new_model_path``: iteration ``t``
trains ``π_t`` with ``method: csr`` (DPO) on ``dataset_dir/train.jsonl`` (the pairs ``π_{t-1}`` built), starting from
``π_{t-1}`` = ``ref_model_path`` and with ``π_{t-1}`` as the frozen reference, then folds the LoRA adapter in
(:func:`vpo.trainer.merge_and_save`) and returns the merged folder, which iteration ``t + 1`` generates with, starts
from and refers to.

The reference, per the configuration's ``ref_mode``:

- ``adapter`` (default): the policy is ``π_{t-1}`` + a fresh LoRA adapter, so the adapter-disabled policy IS
  ``π_{t-1}`` (one copy of the weights);
- ``model``: a separate frozen copy loaded from ``ref_model_path`` (needed for full fine-tuning, ``use_lora: false``);
- ``precomputed`` is refused (the terms would have to be recomputed with ``π_{t-1}`` every iteration).

Layout under ``output_root``: ``iter{t}_run/`` (the Trainer's ``output_dir``: checkpoints, logs, the adapter) and
``iter{t}_model/`` (the merged ``π_t`` + processor).
"""
from __future__ import annotations

import gc
import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Union

# The loop sets these per iteration; a configuration that sets them is overridden (and told so).
_LOOP_FIELDS = ("method", "model_name_or_path", "data_path", "output_dir", "csr_iteration", "ref_model_path")


def _config_values(train_config: Union[None, str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    if train_config is None:
        return {}
    if isinstance(train_config, Mapping):
        return dict(train_config)
    if isinstance(train_config, (str, os.PathLike)):
        path = os.fspath(train_config)
        if not os.path.isfile(path):
            raise ValueError(f"train_config {path!r}: no such file (a trainer YAML, as for `vpo train --config`)")
        import yaml

        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"train_config {path!r} must hold a YAML mapping of VPOConfig fields")
        return values
    raise ValueError(f"train_config must be None, a YAML path or a mapping of VPOConfig fields, got "
                     f"{type(train_config).__name__}")


def make_csr_train_fn(train_config: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
                      output_root: Union[str, os.PathLike] = "csr_run") -> Callable[[str, str], str]:
    """``train_fn(dataset_dir, ref_model_path) -> new_model_path`` for :func:`vpo.construct.csr_iterate` (module
    docstring).

    Args:
        train_config: the trainer's configuration for every iteration: a YAML file (as ``vpo train --config``), a
            mapping of :class:`vpo.trainer.VPOConfig` fields, or None (the defaults). ``method``,
            ``model_name_or_path``, ``data_path``, ``output_dir``, ``csr_iteration`` and ``ref_model_path`` are set
            per iteration.
        output_root: where the iterations' runs and merged models go.

    Example (what ``vpo csr --iterations 3 --train-config train.yaml`` runs)::

        from vpo.construct import ShapesWorldScorer, csr_iterate
        csr_iterate("data/shapes", "runs/csr", model_path="tiny:llava", scorer=ShapesWorldScorer(), iterations=3,
                    train_fn=make_csr_train_fn("train.yaml", "runs/csr"))
    """
    from transformers import HfArgumentParser

    from vpo.trainer.config import REF_MODES, VPOConfig

    base = _config_values(train_config)
    ignored = sorted(k for k in base if k in _LOOP_FIELDS)
    if ignored:
        import warnings

        warnings.warn(f"make_csr_train_fn: the loop sets {ignored} per iteration; the configuration's values are "
                      f"ignored", stacklevel=2)
        base = {k: v for k, v in base.items() if k not in _LOOP_FIELDS}
    ref_mode = base.get("ref_mode", "adapter")
    if ref_mode not in REF_MODES:
        raise ValueError(f"ref_mode must be one of {list(REF_MODES)}, got {ref_mode!r}")
    if ref_mode == "precomputed":
        raise ValueError("CSR's loop refers to the previous iterate, which changes every iteration: use ref_mode "
                         "'adapter' (LoRA on the merged previous iterate) or 'model', not 'precomputed'")
    output_root = os.fspath(output_root)
    calls = {"n": 0}

    def train_fn(dataset_dir: str, ref_model_path: str) -> str:
        from vpo.trainer.cli import train
        from vpo.trainer.modeling import merge_and_save

        calls["n"] += 1
        m = re.fullmatch(r"iter(\d+)", os.path.basename(os.path.normpath(os.fspath(dataset_dir))))
        t = int(m.group(1)) if m else calls["n"]
        data = os.path.join(dataset_dir, "train.jsonl") if os.path.isdir(dataset_dir) else os.fspath(dataset_dir)
        values = dict(base, method="csr", model_name_or_path=os.fspath(ref_model_path), data_path=data,
                      output_dir=os.path.join(output_root, f"iter{t}_run"), csr_iteration=t)
        if ref_mode == "model":
            values["ref_model_path"] = os.fspath(ref_model_path)
        (config,) = HfArgumentParser(VPOConfig).parse_dict(values)
        trainer = train(config)
        out = os.path.join(output_root, f"iter{t}_model")
        merge_and_save(trainer.model, out, trainer.processing_class)
        del trainer
        gc.collect()
        return out

    return train_fn
