"""Preference records, the JSONL format, readers for the RLHF-V and RLAIF-V layouts, and a ``Dataset`` wrapper.

One preference example is a :class:`PreferenceRecord`: an image, a prompt, a chosen and a rejected response, plus the
optional inputs some methods need (OViP's negative image, LPOI's image list, a bounding box) and an ``extra`` dict
(precomputed reference log-probs, Cat-PO token weights, the source's own metadata). ``docs/data_format.md`` documents
the JSONL fields and the layouts; the short version:

======================  ===============================================================================================
layout                  one JSONL line (or one row of a ``datasets`` table)
======================  ===============================================================================================
``"vpo"``               ``{"id", "image", "prompt", "chosen", "rejected", "neg_image"?, "image_list"?, "bbox"?, ...}``
``"rlhf-v"``            ``{"image" | "image_path", "text": '{"question", "chosen", "rejected"}', "idx", ...}``
                        (``openbmb/RLHF-V-Dataset``; ``text`` is a JSON string)
``"rlaif-v"``           ``{"image" | "image_path", "question", "chosen", "rejected", "idx", ...}``
                        (``openbmb/RLAIF-V-Dataset``)
``"trl"``               ``{"images" | "image", "prompt", "chosen", "rejected"}``, strings or chat messages (TRL's vision
                        preference layout; :mod:`vpo.data.conversation`), several images per example allowed
``"auto"``              per row: ``trl`` if it has ``images`` or a conversational prompt/response; ``vpo`` if it has
                        ``prompt``; ``rlaif-v`` if it has ``question``; ``rlhf-v`` if it has ``text``
======================  ===============================================================================================

Bad data never stops a run: a line that is not JSON, a record missing a field (or with a field of the wrong type) is
skipped with a :class:`DataWarning` and counted in :class:`DataStats` by reason. Images are opened lazily, by the
collator (which skips and counts an unreadable one the same way); ``validate_images=True`` opens every image at read
time instead.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from vpo._validate import check_choice
from vpo.data.images import UnreadableImageError, _describe, load_image, resolve_image  # noqa: F401 (re-exported)

LAYOUTS = ("vpo", "rlhf-v", "rlaif-v", "trl", "auto")

# Skip reasons (the keys of DataStats.skipped and of the collator's batch["skipped"]).
BAD_JSON = "bad_json"  # a JSONL line that does not parse to an object
MISSING_FIELD = "missing_field"  # image / prompt / chosen / rejected absent or empty
BAD_FIELD = "bad_field"  # a field of the wrong type (a non-string response, a bbox that is not 4 numbers, ...)
UNREADABLE_IMAGE = "unreadable_image"  # the image (or a negative / list image) cannot be opened and decoded
BAD_IMAGE = "bad_image"  # the image opens but the processor rejects it (e.g. smaller than Qwen-VL's 28-pixel factor)
NO_NEG_IMAGE = "no_neg_image"  # method "ovip": the record has no neg_image
NO_IMAGE_LIST = "no_image_list"  # method "lpoi": the record has no image_list
BAD_IMAGE_LIST = "bad_image_list"  # method "lpoi": image_list of the wrong length
BAD_TOKEN_WEIGHTS = "bad_token_weights"  # method "catpo": token_weights that do not match the response tokens
TOO_LONG = "too_long"  # the prompt alone does not fit max_length

# Keys of a "vpo"-layout row that map onto PreferenceRecord fields; every other key goes to ``extra``.
_VPO_FIELDS = ("id", "image", "prompt", "chosen", "rejected", "neg_image", "image_list", "bbox", "extra")
# Source metadata the RLHF-V / RLAIF-V rows carry; kept in ``extra``.
_HF_META = ("ds_name", "origin_dataset", "origin_split", "image_path", "idx")


class DataWarning(UserWarning):
    """A record was skipped (bad JSON, a missing field, an unreadable image, ...). The run goes on."""


@dataclass
class PreferenceRecord:
    """One preference example.

    Attributes:
        id: a string id, unique within a dataset (seeds the TPO noise and the mDPO crop of this example).
        image: the image (or, for several images per example, a list of them: methods dpo, csr, tpo, catpo), as a path (absolute, or relative to the working directory), a ``data:image/...;base64,``
            URI, raw encoded bytes, a ``{"bytes", "path"}`` dict (the ``datasets`` Image feature) or a PIL image.
            Opened lazily by :func:`load_image`.
        prompt: the user's question, plain text (no image placeholder: the chat template inserts the image), or a
            conversation (normalized chat messages ending with a user turn; :mod:`vpo.data.conversation`).
        chosen / rejected: the preferred and the dispreferred response, plain text.
        neg_image: OViP's negative image (same forms as ``image``), or ``None``.
        image_list: LPOI's list ``[x_1, ..., x_L]`` in ranking order (``x_1`` = the original image), or ``None``.
            A list one shorter than the collator's ``list_size`` gets ``image`` prepended as ``x_1``.
        bbox: ``(x0, y0, x1, y1)`` in pixels of the original image (LPOI's critical object), or ``None``.
        extra: everything else: ``"token_weights"`` (Cat-PO, ``{"chosen": [...], "rejected": [...]}``),
            ``"ref_logps"`` (``{method: [chosen, rejected]}``), the source's metadata.
    """

    id: str
    image: Any
    prompt: str
    chosen: str
    rejected: str
    neg_image: Any = None
    image_list: Optional[List[Any]] = None
    bbox: Optional[Tuple[float, float, float, float]] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataStats:
    """Counts of a read (or of collator calls): ``seen`` rows, ``kept`` records, ``skipped[reason]``."""

    seen: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> Dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept, "skipped": dict(self.skipped)}


class SkipRecord(Exception):
    """Raised internally to skip a record: ``reason`` is one of the skip-reason constants."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def warn_skip(record_id: Any, reason: str, message: str, *, stacklevel: int = 3) -> None:
    """Emit the :class:`DataWarning` for a skipped record."""
    warnings.warn(f"vpo.data: skipped record {record_id!r} ({reason}): {message}", DataWarning, stacklevel=stacklevel)


# ---------------------------------------------------------------------------------------------------------- readers
def detect_layout(row: Mapping) -> str:
    """The layout of one row for ``layout="auto"`` (see the module docstring)."""
    if "prompt" in row:
        if "images" in row or any(isinstance(row.get(k), (list, tuple)) for k in ("prompt", "chosen", "rejected")):
            return "trl"
        return "vpo"
    if "question" in row:
        return "rlaif-v"
    if "text" in row:
        return "rlhf-v"
    return "vpo"


def _req_str(row: Mapping, key: str, out_key: Optional[str] = None) -> str:
    name = out_key or key
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SkipRecord(MISSING_FIELD, f"missing field {name!r}")
    if not isinstance(value, str):
        raise SkipRecord(BAD_FIELD, f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _image_of(row: Mapping, key: str = "image", fallback: Optional[str] = None) -> Any:
    value = row.get(key)
    if _empty_image(value) and fallback is not None:
        value = row.get(fallback)
    if _empty_image(value):
        raise SkipRecord(MISSING_FIELD, f"missing field {key!r}")
    return value


def _empty_image(value: Any) -> bool:
    if value is None or (isinstance(value, str) and not value.strip()):
        return True
    if isinstance(value, Mapping):
        return value.get("bytes") is None and not value.get("path")
    return False


def _bbox_of(value: Any) -> Optional[Tuple[float, float, float, float]]:
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 4
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not (value[0] < value[2] and value[1] < value[3]):
        raise SkipRecord(BAD_FIELD, f"bbox must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {value!r}")
    return tuple(float(v) for v in value)


def _record_vpo(row: Mapping, default_id: str, base_dir: Optional[str]) -> PreferenceRecord:
    image = _image_of(row)
    prompt, chosen, rejected = (_req_str(row, k) for k in ("prompt", "chosen", "rejected"))
    neg = row.get("neg_image")
    neg = None if _empty_image(neg) else resolve_image(neg, base_dir)
    image_list = row.get("image_list")
    if image_list is not None:
        if not isinstance(image_list, (list, tuple)) or not image_list:
            raise SkipRecord(BAD_FIELD, f"image_list must be a non-empty list, got {type(image_list).__name__}")
        image_list = [resolve_image(x, base_dir) for x in image_list]
    extra = dict(row.get("extra") or {})
    if not isinstance(extra, dict):
        raise SkipRecord(BAD_FIELD, f"extra must be an object, got {type(row.get('extra')).__name__}")
    extra.update({k: v for k, v in row.items() if k not in _VPO_FIELDS})
    rid = row.get("id")
    return PreferenceRecord(
        id=str(rid) if rid is not None and rid != "" else default_id,
        image=resolve_image(image, base_dir),
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        neg_image=neg,
        image_list=image_list,
        bbox=_bbox_of(row.get("bbox")),
        extra=extra,
    )


def _record_rlhf_v(row: Mapping, default_id: str, base_dir: Optional[str]) -> PreferenceRecord:
    text = row.get("text")
    if text is None or (isinstance(text, str) and not text.strip()):
        raise SkipRecord(MISSING_FIELD, "missing field 'text'")
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as e:
            raise SkipRecord(BAD_FIELD, f"field 'text' is not a JSON string: {e}") from None
    if not isinstance(text, Mapping):
        raise SkipRecord(BAD_FIELD, f"field 'text' must hold a JSON object, got {type(text).__name__}")
    image = _image_of(row, "image", fallback="image_path")
    prompt = _req_str(text, "question", "text.question")
    chosen = _req_str(text, "chosen", "text.chosen")
    rejected = _req_str(text, "rejected", "text.rejected")
    return _hf_record(row, default_id, base_dir, image, prompt, chosen, rejected)


def _record_rlaif_v(row: Mapping, default_id: str, base_dir: Optional[str]) -> PreferenceRecord:
    image = _image_of(row, "image", fallback="image_path")
    prompt, chosen, rejected = (_req_str(row, k) for k in ("question", "chosen", "rejected"))
    return _hf_record(row, default_id, base_dir, image, prompt, chosen, rejected)


def _hf_record(row, default_id, base_dir, image, prompt, chosen, rejected) -> PreferenceRecord:
    idx = row.get("idx")
    extra = {k: row[k] for k in _HF_META if k in row}
    extra.update({k: v for k, v in row.items() if k not in _HF_META and k not in ("image", "text", "question",
                                                                                "chosen", "rejected")})
    return PreferenceRecord(
        id=str(idx) if idx is not None and idx != "" else default_id,
        image=resolve_image(image, base_dir),
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        extra=extra,
    )


def _record_trl(row: Mapping, default_id: str, base_dir: Optional[str]) -> PreferenceRecord:
    from vpo.data.conversation import record_trl

    return record_trl(row, default_id, base_dir)


_BUILDERS = {"vpo": _record_vpo, "rlhf-v": _record_rlhf_v, "rlaif-v": _record_rlaif_v, "trl": _record_trl}


def record_from_row(
    row: Mapping, *, layout: str = "auto", default_id: str = "0", base_dir: Optional[str] = None
) -> PreferenceRecord:
    """Build one :class:`PreferenceRecord` from a row of the given layout.

    Raises:
        SkipRecord: the row misses a field or has one of the wrong type (``.reason`` says which).
        ValueError: ``layout`` is not one of :data:`LAYOUTS`.
    """
    check_choice("layout", layout, LAYOUTS)
    if not isinstance(row, Mapping):
        raise SkipRecord(BAD_JSON, f"a row must be an object, got {type(row).__name__}")
    kind = detect_layout(row) if layout == "auto" else layout
    return _BUILDERS[kind](row, default_id, base_dir)


def records_from_rows(
    rows: Iterable[Mapping],
    *,
    layout: str = "auto",
    image_root: Optional[str] = None,
    source: str = "rows",
    validate_images: bool = False,
) -> Tuple[List[PreferenceRecord], DataStats]:
    """Convert rows (dicts, e.g. the rows of a ``datasets.Dataset``) to records; bad rows are skipped and counted.

    Args:
        rows: an iterable of mappings in ``layout``.
        layout: ``"vpo"``, ``"rlhf-v"``, ``"rlaif-v"`` or ``"auto"`` (detected per row).
        image_root: the directory relative image paths are resolved against (default: left relative).
        source: a name for default ids (``f"{source}:{row_number}"``, 1-based) and messages.
        validate_images: open every image now (``unreadable_image`` skips at read time) instead of at collation.

    Returns:
        ``(records, stats)``.
    """
    check_choice("layout", layout, LAYOUTS)
    if image_root is not None and not isinstance(image_root, (str, os.PathLike)):
        raise ValueError(f"image_root must be a path or None, got {type(image_root).__name__}")
    if not isinstance(validate_images, bool):
        raise ValueError(f"validate_images must be a bool, got {type(validate_images).__name__}")
    base_dir = os.fspath(image_root) if image_root is not None else None
    stats = DataStats()
    records: List[PreferenceRecord] = []
    for n, row in enumerate(rows, start=1):
        _add_row(row, f"{source}:{n}", layout, base_dir, validate_images, stats, records)
    return records, stats


def _add_row(row, default_id, layout, base_dir, validate_images, stats, records) -> None:
    stats.seen += 1
    try:
        rec = record_from_row(row, layout=layout, default_id=default_id, base_dir=base_dir)
        if validate_images:
            main = rec.image if isinstance(rec.image, list) else [rec.image]
            for img in [*main, rec.neg_image, *(rec.image_list or [])]:
                if img is not None:
                    try:
                        load_image(img)
                    except UnreadableImageError as e:
                        raise SkipRecord(UNREADABLE_IMAGE, str(e)) from None
    except SkipRecord as e:
        stats.skipped[e.reason] += 1
        rid = row.get("id", row.get("idx", default_id)) if isinstance(row, Mapping) else default_id
        warn_skip(rid, e.reason, e.message, stacklevel=4)
        return
    stats.kept += 1
    records.append(rec)


def read_preference_jsonl(
    path: str | os.PathLike,
    *,
    layout: str = "auto",
    image_root: Optional[str | os.PathLike] = None,
    validate_images: bool = False,
) -> Tuple[List[PreferenceRecord], DataStats]:
    """Read a JSONL file of preference records (one JSON object per line; blank lines are ignored).

    Args:
        path: the ``.jsonl`` file.
        layout: ``"vpo"`` (this package's format), ``"rlhf-v"`` (``openbmb/RLHF-V-Dataset``), ``"rlaif-v"``
            (``openbmb/RLAIF-V-Dataset``) or ``"auto"`` (detected per line).
        image_root: the directory relative image paths are resolved against; default: the JSONL file's directory.
        validate_images: open every image at read time (default: lazily, in the collator).

    Returns:
        ``(records, stats)``: the kept :class:`PreferenceRecord` s and a :class:`DataStats` whose ``skipped``
        counts the skipped lines by reason (``bad_json``, ``missing_field``, ``bad_field``, ``unreadable_image``).
        Each skip also emits a :class:`DataWarning`.

    Example:
        >>> import json, tempfile, os
        >>> from vpo.data import read_preference_jsonl
        >>> d = tempfile.mkdtemp(); p = os.path.join(d, "train.jsonl")
        >>> with open(p, "w") as f:
        ...     _ = f.write(json.dumps({"id": "a", "image": "a.png", "prompt": "what is it ?",
        ...                             "chosen": "a cat .", "rejected": "a dog ."}) + "\\n")
        >>> records, stats = read_preference_jsonl(p)
        >>> records[0].image == os.path.join(d, "a.png"), stats.as_dict()
        (True, {'seen': 1, 'kept': 1, 'skipped': {}})
    """
    check_choice("layout", layout, LAYOUTS)
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a path to a .jsonl file, got {type(path).__name__}")
    if image_root is not None and not isinstance(image_root, (str, os.PathLike)):
        raise ValueError(f"image_root must be a path or None, got {type(image_root).__name__}")
    if not isinstance(validate_images, bool):
        raise ValueError(f"validate_images must be a bool, got {type(validate_images).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path must be an existing file, got {path!r}")
    base_dir = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    source = os.path.basename(path)
    stats = DataStats()
    records: List[PreferenceRecord] = []
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                stats.seen += 1
                stats.skipped[BAD_JSON] += 1
                warn_skip(f"{source}:{n}", BAD_JSON, f"not JSON: {e}", stacklevel=2)
                continue
            if not isinstance(row, dict):
                stats.seen += 1
                stats.skipped[BAD_JSON] += 1
                warn_skip(f"{source}:{n}", BAD_JSON, f"a line must be a JSON object, got {type(row).__name__}",
                          stacklevel=2)
                continue
            _add_row(row, f"{source}:{n}", layout, base_dir, validate_images, stats, records)
    return records, stats


class PreferenceDataset(Dataset):
    """A ``torch.utils.data.Dataset`` of :class:`PreferenceRecord` s (images stay unopened until collation).

    Use with ``DataLoader(dataset, batch_size=B, collate_fn=PreferenceCollator(...))``.

    Attributes:
        records: the records.
        stats: the :class:`DataStats` of the read (empty for records passed directly).
    """

    def __init__(self, records: Sequence[PreferenceRecord], stats: Optional[DataStats] = None):
        records = list(records)
        for i, r in enumerate(records):
            if not isinstance(r, PreferenceRecord):
                raise ValueError(f"records must hold PreferenceRecord objects, got {type(r).__name__} at index {i}")
        self.records = records
        self.stats = stats if stats is not None else DataStats(seen=len(records), kept=len(records))

    @classmethod
    def from_jsonl(cls, path, *, layout: str = "auto", image_root=None, validate_images: bool = False):
        """Read ``path`` with :func:`read_preference_jsonl` and wrap the records."""
        records, stats = read_preference_jsonl(path, layout=layout, image_root=image_root,
                                               validate_images=validate_images)
        return cls(records, stats)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PreferenceRecord:
        return self.records[i]
