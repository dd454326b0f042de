"""Where preference data comes from: JSONL files, ``datasets`` folders and tables, parquet files, rows in memory.

:func:`open_preference_data` takes what a user has and returns a ``torch`` dataset of
:class:`~vpo.data.PreferenceRecord` s, in any layout :func:`~vpo.data.record_from_row` reads (``vpo``, ``rlhf-v``,
``rlaif-v``, ``trl``, or ``auto`` per row):

==================================================  ===============================================================
``data``                                             read with
==================================================  ===============================================================
``*.jsonl`` / ``*.json`` file (one object a line)    :func:`~vpo.data.read_preference_jsonl` (eager; images lazy)
a ``datasets.save_to_disk`` folder                   ``datasets.load_from_disk`` (a ``DatasetDict``: ``split``)
``*.parquet`` file, or a folder of them              ``datasets.Dataset.from_parquet`` (e.g. a Hub snapshot's
                                                     ``data/train-*.parquet``)
a ``datasets.Dataset`` / ``DatasetDict``             as it is (a ``DatasetDict``: ``split``)
a list of dicts                                      :func:`~vpo.data.records_from_rows`
a :class:`~vpo.data.PreferenceDataset`               returned unchanged
==================================================  ===============================================================

A ``datasets`` table is read lazily: the scan that checks every row (and counts the skips) reads its image columns
undecoded, and each record is built again from its row when the loader asks for it, images left as
``{"bytes", "path"}`` cells for the collator to decode — a 80k-image table is never held as PIL images.

When not one record survives the scan, :class:`NoUsableRecordError` (a ``ValueError``) names the first skip reason
and its message, before any model is trained.
"""
from __future__ import annotations

import glob
import os
import warnings
from typing import Any, List, Mapping, Optional, Sequence

from torch.utils.data import Dataset

from vpo._validate import check_choice
from vpo.data.records import (
    LAYOUTS,
    DataStats,
    DataWarning,
    PreferenceDataset,
    SkipRecord,
    UnreadableImageError,
    load_image,
    record_from_row,
    records_from_rows,
)


class NoUsableRecordError(ValueError):
    """Every record of a dataset was skipped; the message names the first skip reason."""


class _FirstSkip:
    """Catches the first :class:`DataWarning` of a read (to name it when nothing survives) and re-emits all."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self.caught = self._cm.__enter__()
        warnings.simplefilter("always", DataWarning)
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        for w in self.caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return False

    @property
    def first(self) -> Optional[str]:
        for w in self.caught:
            if issubclass(w.category, DataWarning):
                return str(w.message).removeprefix("vpo.data: ")
        return None


def _no_usable(name: str, stats: DataStats, first: Optional[str]) -> NoUsableRecordError:
    if stats.seen == 0:
        return NoUsableRecordError(f"{name}: no records (the data is empty)")
    reasons = ", ".join(f"{k}: {v}" for k, v in stats.skipped.most_common())
    head = f"{name}: all {stats.seen} records were skipped ({reasons})"
    return NoUsableRecordError(f"{head}; first: {first}" if first else head)


class RowsPreferenceDataset(Dataset):
    """Records built on demand from the rows of a ``datasets.Dataset`` (module docstring).

    Attributes:
        stats: the :class:`~vpo.data.DataStats` of the scan.
        indices: the rows kept by the scan.
    """

    def __init__(self, table, *, layout: str = "auto", image_root: Optional[str] = None, name: str = "dataset",
                 validate_images: bool = False):
        self.table = _undecoded(table)
        self.layout = layout
        self.image_root = image_root
        self.name = name
        self.stats = DataStats()
        self.indices: List[int] = []
        for i, row in enumerate(_scan_rows(self.table, read_images=validate_images)):
            self.stats.seen += 1
            try:
                rec = record_from_row(row, layout=layout, default_id=f"{name}:{i + 1}", base_dir=image_root)
                if validate_images:
                    for img in rec.image if isinstance(rec.image, list) else [rec.image]:
                        try:
                            load_image(img)
                        except UnreadableImageError as e:
                            raise SkipRecord("unreadable_image", str(e)) from None
            except SkipRecord as e:
                self.stats.skipped[e.reason] += 1
                row_id = row.get("id", row.get("idx", f"{name}:{i + 1}"))
                warnings.warn(f"vpo.data: skipped record {row_id!r} ({e.reason}): {e.message}", DataWarning,
                              stacklevel=2)
                continue
            self.stats.kept += 1
            self.indices.append(i)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = self.indices[i]
        row = self.table[j]
        try:
            return record_from_row(row, layout=self.layout, default_id=f"{self.name}:{j + 1}",
                                   base_dir=self.image_root)
        except SkipRecord:  # something the scan could not see (an empty cell inside an image list): the collator
            return row      # reads the row again and skips it with the reason


_SCAN_BATCH = 1024
_PRESENT = "<image>"  # what an image cell reads as during the scan (its bytes are never touched)


def _image_columns(table) -> dict:
    """``{column: "one" | "list"}`` for the ``datasets.Image`` columns (or lists of them) of ``table``."""
    try:
        from datasets import Image
        from datasets.features import List as HFList, Sequence as HFSequence
    except ImportError:  # pragma: no cover
        return {}
    out = {}
    for name, feature in table.features.items():
        if isinstance(feature, Image):
            out[name] = "one"
        elif isinstance(feature, (HFList, HFSequence)) and isinstance(feature.feature, Image):
            out[name] = "list"
    return out


def _image_presence(table, column: str, kind: str) -> List[int]:
    """Per row: 1/0 (an image is there) for a single-image column, the list length for a list column — read from the
    Arrow column's validity and offsets, not from the image bytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.data.column(column)
    if kind == "list":
        return [int(n) if n is not None else 0 for n in pc.list_value_length(col).to_pylist()]
    has_bytes = pc.is_valid(pc.struct_field(col, "bytes"))
    path = pc.struct_field(col, "path")
    has_path = pc.and_(pc.is_valid(path), pc.not_equal(pc.fill_null(path, pa.scalar("", pa.string())), ""))
    present = pc.and_(pc.is_valid(col), pc.or_(has_bytes, has_path))
    return [int(bool(v)) for v in present.to_pylist()]


def _scan_rows(table, *, read_images: bool):
    """The rows of ``table`` for the validity scan: every column as it is, except image columns, which read as a
    placeholder (one, or a list of the cell's length) or None — so the scan never reads image bytes."""
    columns = _image_columns(table)
    if read_images or not columns:
        for i in range(len(table)):
            yield table[i]
        return
    if getattr(table, "_indices", None) is not None:  # a select()/shuffle() view: Arrow columns hold other rows
        table = table.flatten_indices()
    presence = {c: _image_presence(table, c, kind) for c, kind in columns.items()}
    text = table.select_columns([c for c in table.column_names if c not in columns])
    for start in range(0, len(table), _SCAN_BATCH):
        batch = text[start:start + _SCAN_BATCH]
        for k in range(min(_SCAN_BATCH, len(table) - start)):
            row = {c: values[k] for c, values in batch.items()}
            for c, kind in columns.items():
                n = presence[c][start + k]
                row[c] = ([_PRESENT] * n if n else None) if kind == "list" else (_PRESENT if n else None)
            yield row


def _undecoded(table):
    """The table with every ``datasets.Image`` column (or list of them) left as ``{"bytes", "path"}`` cells."""
    try:
        from datasets import Image
        from datasets.features import List as HFList, Sequence as HFSequence
    except ImportError:  # pragma: no cover - old datasets
        return table
    for name, feature in table.features.items():
        if isinstance(feature, Image) and feature.decode:
            table = table.cast_column(name, Image(decode=False))
        elif isinstance(feature, (HFList, HFSequence)) and isinstance(feature.feature, Image) and feature.feature.decode:
            table = table.cast_column(name, type(feature)(Image(decode=False)))
    return table


def _pick_split(data, split: str, name: str):
    from datasets import DatasetDict

    if isinstance(data, DatasetDict):
        if split not in data:
            raise ValueError(f"{name}: a DatasetDict without split {split!r} (it has {sorted(data)}): pass split=")
        return data[split]
    return data


def _is_hf_dataset(data) -> bool:
    try:
        from datasets import Dataset as HFDataset, DatasetDict
    except ImportError:
        return False
    return isinstance(data, (HFDataset, DatasetDict))


def _needs_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{what} needs the `datasets` package: pip install datasets (part of vpo's train "
                         "extra)") from None
    return datasets


def open_preference_data(
    data: Any,
    *,
    layout: str = "auto",
    image_root: Optional[str | os.PathLike] = None,
    split: str = "train",
    validate_images: bool = False,
    allow_empty: bool = False,
):
    """A dataset of :class:`~vpo.data.PreferenceRecord` s from any source of the module docstring.

    Args:
        data: a path (JSONL file, parquet file or folder, ``save_to_disk`` folder), a ``datasets.Dataset`` /
            ``DatasetDict``, a list of row dicts, or a :class:`~vpo.data.PreferenceDataset`.
        layout: ``"vpo"``, ``"rlhf-v"``, ``"rlaif-v"``, ``"trl"`` or ``"auto"`` (per row).
        image_root: folder relative image paths are resolved against (default: the file's or folder's).
        split: the split of a ``DatasetDict`` / ``save_to_disk`` folder of several.
        validate_images: open every image during the scan (skip unreadable ones now, not at collation).
        allow_empty: return an empty dataset instead of raising when every record is skipped.

    Returns:
        a :class:`~vpo.data.PreferenceDataset` or a :class:`RowsPreferenceDataset`; ``.stats`` counts the skips.

    Raises:
        ValueError: ``data`` is not one of the accepted sources, the path does not exist or cannot be read.
        NoUsableRecordError: every record was skipped (the message names the first reason).
    """
    check_choice("layout", layout, LAYOUTS)
    if image_root is not None and not isinstance(image_root, (str, os.PathLike)):
        raise ValueError(f"image_root must be a path or None, got {type(image_root).__name__}")
    root = None if image_root is None else os.fspath(image_root)
    if isinstance(data, (PreferenceDataset, RowsPreferenceDataset)):
        return data
    with _FirstSkip() as catch:
        if isinstance(data, (str, os.PathLike)):
            name = os.fspath(data)
            out = _open_path(name, layout, root, split, validate_images)
        elif _is_hf_dataset(data):
            name = "dataset"
            out = RowsPreferenceDataset(_pick_split(data, split, name), layout=layout, image_root=root, name=name,
                                        validate_images=validate_images)
        elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and all(
                isinstance(r, Mapping) for r in data):
            name = "rows"
            records, stats = records_from_rows(data, layout=layout, image_root=root, validate_images=validate_images)
            out = PreferenceDataset(records, stats)
        else:
            raise ValueError(f"data must be a path (JSONL, parquet, save_to_disk folder), a datasets.Dataset or a "
                             f"list of row dicts, got {type(data).__name__}")
    if len(out) == 0 and not allow_empty:
        raise _no_usable(name, out.stats, catch.first)
    return out


def _open_path(path: str, layout: str, root: Optional[str], split: str, validate_images: bool):
    if not os.path.exists(path):
        raise ValueError(f"data path {path!r} does not exist")
    if os.path.isdir(path):
        base = root if root is not None else path
        if os.path.isfile(os.path.join(path, "dataset_info.json")) or \
                os.path.isfile(os.path.join(path, "dataset_dict.json")) or \
                os.path.isfile(os.path.join(path, "state.json")):
            datasets = _needs_datasets(f"{path} (a save_to_disk folder)")
            table = _pick_split(datasets.load_from_disk(path), split, path)
            return RowsPreferenceDataset(table, layout=layout, image_root=base, name=os.path.basename(path.rstrip("/")),
                                         validate_images=validate_images)
        files = _parquet_files(path, split)
        if files:
            return _open_parquet(files, layout, base, path, validate_images)
        jsonl = sorted(glob.glob(os.path.join(path, "*.jsonl")))
        if len(jsonl) == 1:
            return PreferenceDataset.from_jsonl(jsonl[0], layout=layout, image_root=root,
                                                validate_images=validate_images)
        raise ValueError(f"data path {path!r} is a folder without a save_to_disk dataset, parquet files or exactly one "
                         f"JSONL file")
    if path.endswith(".parquet"):
        return _open_parquet([path], layout, root if root is not None else os.path.dirname(os.path.abspath(path)),
                             path, validate_images)
    try:
        return PreferenceDataset.from_jsonl(path, layout=layout, image_root=root, validate_images=validate_images)
    except UnicodeDecodeError:
        raise ValueError(f"data path {path!r} is not a UTF-8 JSONL file (nor parquet, nor a save_to_disk "
                         f"folder)") from None


def _parquet_files(folder: str, split: str) -> List[str]:
    """Parquet files of ``folder``: those of ``split`` (``<split>-*.parquet``, ``<split>/``) when the folder has
    several splits, else all of them (recursively)."""
    files = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
    if not files:
        return []
    named = [f for f in files if os.path.basename(f).startswith(f"{split}-") or f"{os.sep}{split}{os.sep}" in f
             or os.path.basename(f) == f"{split}.parquet"]
    return named or files


def _open_parquet(files: List[str], layout: str, base: Optional[str], name: str, validate_images: bool):
    datasets = _needs_datasets(f"{name} (parquet)")
    try:
        table = datasets.Dataset.from_parquet(files)
    except Exception as e:  # pyarrow raises its own error types for a corrupt file
        raise ValueError(f"cannot read parquet {name!r}: {e}") from None
    return RowsPreferenceDataset(table, layout=layout, image_root=base, name=os.path.basename(name.rstrip("/")),
                                 validate_images=validate_images)


def check_usable(dataset, name: str = "data") -> None:
    """Raise :class:`NoUsableRecordError` when ``dataset`` (with ``.stats``) kept no record."""
    if len(dataset) == 0:
        raise _no_usable(name, getattr(dataset, "stats", DataStats()), None)
