"""Data: preference records and readers (vpo's JSONL, RLHF-V, RLAIF-V, TRL's layout), the containers they come in
(JSONL, parquet, ``save_to_disk``, ``datasets.Dataset``: :func:`open_preference_data`), tiny local processors, and the
preference collator (four tuned families + ``"generic"`` for any processor).

See ``docs/data_format.md`` for the formats and the batch contract.
"""
from vpo.data.batching import IGNORE_INDEX, MODEL_INPUT_KEYS, VISION_KEYS, model_inputs
from vpo.data.collator import GENERIC, METHODS, PreferenceCollator
from vpo.data.processors import FAMILIES, TINY_WORDS, build_tiny_processor, build_tiny_tokenizer
from vpo.data.records import (
    LAYOUTS,
    DataStats,
    DataWarning,
    PreferenceDataset,
    PreferenceRecord,
    UnreadableImageError,
    load_image,
    read_preference_jsonl,
    record_from_row,
    records_from_rows,
)
from vpo.data.sources import NoUsableRecordError, RowsPreferenceDataset, open_preference_data

__all__ = [
    "GENERIC",
    "NoUsableRecordError",
    "RowsPreferenceDataset",
    "open_preference_data",
    "IGNORE_INDEX",
    "METHODS",
    "MODEL_INPUT_KEYS",
    "VISION_KEYS",
    "PreferenceCollator",
    "model_inputs",
    "FAMILIES",
    "LAYOUTS",
    "TINY_WORDS",
    "DataStats",
    "DataWarning",
    "PreferenceDataset",
    "PreferenceRecord",
    "UnreadableImageError",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "load_image",
    "read_preference_jsonl",
    "record_from_row",
    "records_from_rows",
]
