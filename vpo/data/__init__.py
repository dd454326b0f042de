"""Data: preference records and readers, tiny local processors, the per-family preference collator.

See ``docs/data_format.md`` for the JSONL format and the batch contract.
"""
from vpo.data.collator import IGNORE_INDEX, METHODS, MODEL_INPUT_KEYS, VISION_KEYS, PreferenceCollator, model_inputs
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

__all__ = [
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
