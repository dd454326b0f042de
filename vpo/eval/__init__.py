"""Evaluation: hallucination metrics (CHAIR, POPE, coverage) on the shapes world, and a model-agnostic driver.

See :mod:`vpo.eval.metrics` for the exact definitions.
"""
from vpo.eval.metrics import (
    ChairResult,
    PopeResult,
    ResponseScore,
    chair,
    coverage,
    evaluate_dir,
    evaluate_model,
    format_report,
    parse_yes_no,
    pope,
    score_response,
)

__all__ = [
    "ChairResult",
    "PopeResult",
    "ResponseScore",
    "chair",
    "coverage",
    "evaluate_dir",
    "evaluate_model",
    "format_report",
    "parse_yes_no",
    "pope",
    "score_response",
]
