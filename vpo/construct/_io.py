"""Reading source rows and writing constructed datasets (shared by the CSR, LPOI and mDPO writers).

Every writer produces a folder the trainer reads with :func:`vpo.data.read_preference_jsonl`::

    out_dir/train.jsonl          one "vpo"-layout row per kept example (docs/data_format.md)
    out_dir/images/...           images the writer created (LPOI lists, mDPO crops, images that had no file)
    out_dir/construct.json       {"method", "config", "summary"}: how the folder was made

Image fields of the rows are paths RELATIVE to ``out_dir`` (the reader resolves them against the JSONL's folder), so the
source images are referenced, never copied; an image given inline (bytes, a data URI is kept as is) is saved under
``out_dir/images/``.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

DATA_FILE = "train.jsonl"
META_FILE = "construct.json"


class ConstructWarning(UserWarning):
    """A source row was skipped by a dataset writer (the run goes on; the reason is counted in the summary)."""


@dataclass
class ConstructionSummary:
    """What a dataset writer did.

    Attributes:
        path: the written JSONL (``out_dir/train.jsonl``).
        seen: source rows read.
        written: rows written.
        skipped: ``{reason: count}`` of the source rows left out.
    """

    path: str
    seen: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "seen": self.seen, "written": self.written, "skipped": dict(self.skipped)}


def check_int(name: str, value, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``value`` as an int in ``[lo, hi]``; bools and non-integers raise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
        raise ValueError(f"{name} must be {'>= ' + str(lo) if lo is not None else '<= ' + str(hi)}, got {value}")
    return value


def check_rgb(name: str, value) -> Tuple[int, int, int]:
    ok = isinstance(value, (tuple, list)) and len(value) == 3
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    if not ok:
        raise ValueError(f"{name} must be an (r, g, b) tuple of ints in [0, 255], got {value!r}")
    return tuple(int(v) for v in value)


def check_path(name: str, value, *, must_exist: bool = False, is_dir: bool = False) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{name} must be a path, got {type(value).__name__} {value!r}")
    value = os.fspath(value)
    if must_exist:
        ok = os.path.isdir(value) if is_dir else os.path.isfile(value)
        if not ok:
            raise ValueError(f"{name} must be an existing {'folder' if is_dir else 'file'}, got {value!r}")
    return value


def data_file(path: str) -> str:
    """A dataset given as a JSONL file or as a folder holding ``train.jsonl``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, DATA_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"data_path must be a .jsonl file or a folder with {DATA_FILE}, got {path!r}")
    return path


def skip(summary: ConstructionSummary, record_id: Any, reason: str, message: str) -> None:
    summary.skipped[reason] += 1
    warnings.warn(f"vpo.construct: skipped record {record_id!r} ({reason}): {message}", ConstructWarning,
                  stacklevel=3)


def iter_json_rows(path: str, summary: ConstructionSummary) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(line_number, row)`` of a JSONL file; lines that are not JSON objects are skipped as ``bad_json``."""
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            summary.seen += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skip(summary, f"line {n}", "bad_json", str(e))
                continue
            if not isinstance(row, dict):
                skip(summary, f"line {n}", "bad_json", f"a line must be a JSON object, got {type(row).__name__}")
                continue
            yield n, row


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(record_id: str) -> str:
    """A file-name-safe version of a record id."""
    s = _SAFE.sub("_", str(record_id)).strip("._")
    return s or "record"


def image_ref(spec: Any, out_dir: str, fallback_name: str) -> str:
    """The JSON value that points at image ``spec`` from ``out_dir``: a relative path for a file, the URI itself for a
    data URI; other forms (bytes, PIL images, ``{"bytes"}`` dicts) are decoded and saved as
    ``out_dir/images/{fallback_name}.png``."""
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if s.startswith("data:"):
            return s
        return os.path.relpath(os.path.abspath(s), os.path.abspath(out_dir))
    if isinstance(spec, Mapping) and spec.get("bytes") is None and isinstance(spec.get("path"), str):
        return image_ref(spec["path"], out_dir, fallback_name)
    from vpo.data import load_image

    rel = os.path.join("images", f"{fallback_name}.png")
    save_png(load_image(spec), os.path.join(out_dir, rel))
    return rel


def save_png(img, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path, format="PNG")  # no metadata: identical bytes for identical pixels


class JsonlWriter:
    """Writes ``out_dir/train.jsonl`` row by row (atomic: a ``.tmp`` file renamed on :meth:`close`)."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, DATA_FILE)
        self._tmp = self.path + ".tmp"
        self._f = open(self._tmp, "w", encoding="utf-8", newline="\n")

    def write(self, row: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


def write_meta(out_dir: str, method: str, config: Mapping[str, Any], summary: ConstructionSummary) -> str:
    path = os.path.join(out_dir, META_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"method": method, "config": dict(config), "summary": summary.as_dict()}, f, indent=2,
                  default=str)
        f.write("\n")
    return path


# Keys of a "vpo"-layout row that are PreferenceRecord fields (the rest of a row lands in its ``extra``).
RECORD_FIELDS = ("id", "image", "prompt", "chosen", "rejected", "neg_image", "image_list", "bbox", "extra")


def record_row(rec, out_dir: str, *, drop_extra: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """A ``"vpo"``-layout row for a :class:`~vpo.data.PreferenceRecord`: its fields (images as references from
    ``out_dir``) and its ``extra`` entries as top-level keys (the reader puts them back into ``extra``)."""
    name = safe_name(rec.id)
    row: Dict[str, Any] = {"id": rec.id, "image": image_ref(rec.image, out_dir, name), "prompt": rec.prompt,
                           "chosen": rec.chosen, "rejected": rec.rejected}
    if rec.neg_image is not None:
        row["neg_image"] = image_ref(rec.neg_image, out_dir, name + "_neg")
    if rec.image_list is not None:
        row["image_list"] = [image_ref(x, out_dir, f"{name}_list{k}") for k, x in enumerate(rec.image_list)]
    if rec.bbox is not None:
        row["bbox"] = list(rec.bbox)
    for k, v in rec.extra.items():
        if k not in RECORD_FIELDS and k not in drop_extra:
            row[k] = v
    return row


def read_source(data_path: str, out_dir: str, limit: Optional[int]) -> Tuple[List[Any], ConstructionSummary]:
    """The source records (first ``limit``) and a summary that already counts the reader's skips."""
    from vpo.data import read_preference_jsonl

    records, stats = read_preference_jsonl(data_file(data_path))
    if limit is not None:
        records = records[:limit]
    summary = ConstructionSummary(path=os.path.join(out_dir, "train.jsonl"), seen=stats.seen)
    summary.skipped.update(stats.skipped)
    return records, summary


def records_with_images(records, summary: ConstructionSummary) -> Iterator[Tuple[Any, Any]]:
    """``(record, PIL image)`` for each record whose image opens; the others are skipped and counted."""
    from vpo.data import load_image
    from vpo.data.records import UnreadableImageError

    for rec in records:
        try:
            image = load_image(rec.image)
        except UnreadableImageError as e:
            skip(summary, rec.id, "unreadable_image", str(e))
            continue
        yield rec, image


def load_local_pretrained(model_path: Optional[str], model_class: str, what: str, device: str):
    """``(model.eval() on device, processor)`` from a LOCAL folder (nothing is downloaded).

    ``model_class`` names a transformers auto/model class (e.g. ``"CLIPModel"``); ``what`` describes the expected
    folder for the error message when ``model_path`` is None.
    """
    if model_path is None:
        raise ValueError(f"model_path must be a local folder holding {what}, got None; nothing is downloaded")
    model_path = check_path("model_path", model_path, must_exist=True, is_dir=True)
    import transformers

    model = getattr(transformers, model_class).from_pretrained(model_path, local_files_only=True)
    processor = transformers.AutoProcessor.from_pretrained(model_path, local_files_only=True)
    return model.to(device).eval(), processor
