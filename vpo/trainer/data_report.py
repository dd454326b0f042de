"""What reading a data source kept and skipped, in one line (with the columns it found when it skipped some).

Records are skipped at two moments: when the data is read (``bad_json``, ``missing_field``, ``bad_field``: the
reader's ``stats``) and when it is collated (``unreadable_image``, ``too_long``, ...: ``batch["skipped"]``, totalled at
the end of training by :mod:`vpo.trainer.resume`). This module words the first: ``vpo train`` prints the line for each
file it reads (:mod:`vpo.trainer.cli`), and :class:`vpo.trainer.VPOTrainer` logs the same line (logger
``vpo.trainer.data_report``, level WARNING, main process only) for each dataset it opens itself from a path, rows or
a ``datasets.Dataset`` (:func:`vpo.trainer.trl_compat.open_dataset`): a Python user learns what was left out too,
once per dataset, next to the per-record ``DataWarning`` s.

Kept free of torch and transformers at import time: ``vpo train --help`` must stay light.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from typing import Any, List, Optional

logger = logging.getLogger(__name__)


def _hf_dataset(source: Any) -> bool:
    datasets = sys.modules.get("datasets")  # only if already imported: a Dataset cannot exist otherwise
    return datasets is not None and isinstance(source, datasets.Dataset)


def _rows(source: Any) -> bool:
    return isinstance(source, list) and bool(source) and all(isinstance(r, dict) for r in source)


def columns_of(source: Any) -> List[str]:
    """The columns (keys) a data source has: a JSONL file's first rows, a parquet file's schema, a ``save_to_disk``
    folder's features, a ``datasets.Dataset``'s ``column_names``, the keys of a list of rows (its first 20). Empty when
    it cannot tell."""
    if _hf_dataset(source):
        return list(source.column_names)
    if _rows(source):
        keys: List[str] = []
        for row in source[:20]:
            keys += [k for k in row if k not in keys]
        return keys
    path = source
    if not path or not isinstance(path, str) or not os.path.exists(path):
        return []
    try:
        if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
            keys = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f):
                    if n >= 20:
                        break
                    try:
                        row = json.loads(line) if line.strip() else None
                    except ValueError:  # a bad line among them (often why records were skipped): read on
                        continue
                    keys += [k for k in row if k not in keys] if isinstance(row, dict) else []
            return keys
        if os.path.isfile(path) and path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if os.path.isdir(path):
            info = os.path.join(path, "dataset_info.json")
            if os.path.isfile(info):
                with open(info, encoding="utf-8") as f:
                    return list((json.load(f).get("features") or {}).keys())
            files = sorted(p for p in os.listdir(path) if p.endswith(".parquet"))
            if files:
                return columns_of(os.path.join(path, files[0]))
    except (OSError, ValueError, ImportError):
        return []
    return []


def describe_source(source: Any) -> str:
    """A data source in a few words: a path as it is, ``datasets.Dataset (N rows)``, ``N rows`` for a list of rows,
    otherwise its type's name."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if _hf_dataset(source):
        return f"datasets.Dataset ({source.num_rows} rows)"
    if isinstance(source, list):
        return f"{len(source)} rows"
    return type(source).__name__


def data_summary(name: str, source: Any, dataset, prefix: str = "vpo") -> Optional[str]:
    """One line: ``<prefix>: <name> data <source>: kept K of N records``, then, when some were skipped, their count
    per reason (most first) and the columns found in ``source``; None when ``dataset`` has no reader ``stats``.

    Args:
        name: which data (``"train"``, ``"eval"``), a non-empty string.
        source: what was read (a path, a ``datasets.Dataset``, rows), for the words and the columns.
        dataset: the dataset read from it; its ``stats`` (a :class:`vpo.data.DataStats`) are reported.
        prefix: who speaks (``"vpo train"`` on the command line).

    Example:
        >>> from collections import Counter
        >>> from types import SimpleNamespace
        >>> from vpo.data import DataStats
        >>> read = SimpleNamespace(stats=DataStats(seen=5, kept=4, skipped=Counter(bad_json=1)))
        >>> data_summary("train", "d.jsonl", read)
        'vpo: train data d.jsonl: kept 4 of 5 records; skipped 1 (bad_json 1)'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string (e.g. 'train'), got {name!r}")
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty string (e.g. 'vpo train'), got {prefix!r}")
    stats = getattr(dataset, "stats", None)
    if stats is None:
        return None
    line = f"{prefix}: {name} data {describe_source(source)}: kept {stats.kept} of {stats.seen} records"
    if stats.skipped:
        reasons = ", ".join(f"{k} {v}" for k, v in Counter(stats.skipped).most_common())
        cols = columns_of(source)
        line += f"; skipped {sum(stats.skipped.values())} ({reasons})"
        if cols:
            line += f"; columns found: {', '.join(cols)}"
    return line


def log_data_summary(name: str, source: Any, dataset) -> Optional[str]:
    """Log :func:`data_summary`'s line once as a WARNING when ``dataset``'s reader skipped records; returns the line
    logged, or None when nothing was skipped (nothing is logged then)."""
    stats = getattr(dataset, "stats", None)
    if stats is None or not stats.skipped:
        return None
    line = data_summary(name, source, dataset)
    logger.warning(line)
    return line


__all__ = ["columns_of", "data_summary", "describe_source", "log_data_summary"]
