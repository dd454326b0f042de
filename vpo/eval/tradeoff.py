"""Hallucination at matched coverage: is a method better, or does it only say less?

A model that mentions fewer objects hallucinates fewer of them. To tell a real gain from a shorter caption, the
reference model (the SFT model) is decoded again with a bias ``b`` added to the logit of the caption's final token
(``"."`` in the shapes world): the larger ``b``, the earlier it stops. Each bias gives one point (coverage, CHAIR_i);
together they trace the reference's trade-off curve (:func:`coverage_curve`). A trained model is then compared with
the curve at ITS coverage (:func:`chair_at_coverage`, linear interpolation between the two nearest points):

    gain at matched coverage = CHAIR_i(reference curve at the model's coverage) - CHAIR_i(model)

A method whose points lie on the curve bought its lower CHAIR_i with coverage alone; one below it hallucinates less
at equal coverage. Captions only (no POPE), greedy decoding.

Example::

    curve = coverage_curve(sft_model, processor, "vpo-demo/data", "test", biases=(0, 2, 4, 6))
    chair_at_coverage(curve, 0.70)   # the SFT model's CHAIR_i had it been decoded down to 70% coverage
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

DEFAULT_BIASES = (0.0, 2.0, 4.0, 6.0, 8.0)


def coverage_curve(model, processor, data_dir: str, split: str = "test", *, biases: Sequence[float] = DEFAULT_BIASES,
                   stop_token: str = ".", limit: Optional[int] = None, progress: Optional[bool] = False
                   ) -> List[Dict[str, float]]:
    """The reference's trade-off curve: for each bias in ``biases`` (added to the logit of ``stop_token`` at every
    decoding step; 0 = plain greedy decoding), ``{"bias", "CHAIR_i", "CHAIR_i_se", "coverage", "mentions"}`` of the
    captions of ``split`` (:func:`vpo.eval.cli.evaluate` with ``pope=False``). Sorted by bias."""
    from vpo.eval.cli import evaluate

    biases = sorted(float(b) for b in biases)
    if not biases or any(not math.isfinite(b) for b in biases):
        raise ValueError(f"biases must be a non-empty list of finite numbers, got {biases!r}")
    tid = processor.tokenizer.convert_tokens_to_ids(stop_token)
    if tid is None or tid == processor.tokenizer.unk_token_id:
        raise ValueError(f"stop_token {stop_token!r} is not a token of the processor's tokenizer")
    curve = []
    for b in biases:
        rep = evaluate(model, processor, data_dir, split, limit=limit, desc=f"curve b={b:g}", progress=progress,
                       pope=False, logit_bias={int(tid): b} if b else None)
        c = rep["chair"]
        curve.append({"bias": b, "CHAIR_i": c["chair_i"], "CHAIR_i_se": c["chair_i_se"], "coverage": c["coverage"],
                      "mentions": float(c["num_mentions"])})
    return curve


def chair_at_coverage(curve: Sequence[Dict[str, Any]], coverage: float) -> float:
    """CHAIR_i of the ``curve`` (:func:`coverage_curve`) at ``coverage``, linearly interpolated between the two
    points whose coverages bracket it; NaN when ``coverage`` lies outside the curve's range (no extrapolation)."""
    pts = sorted((float(p["coverage"]), float(p["CHAIR_i"])) for p in curve)
    if not pts:
        raise ValueError("curve is empty: pass the points of coverage_curve")
    if not math.isfinite(coverage) or coverage < pts[0][0] or coverage > pts[-1][0]:
        return float("nan")
    for (c0, h0), (c1, h1) in zip(pts, pts[1:]):
        if c0 <= coverage <= c1:
            return h0 if c1 == c0 else h0 + (h1 - h0) * (coverage - c0) / (c1 - c0)
    return pts[0][1]  # a one-point curve at exactly this coverage


def format_curve(curve: Sequence[Dict[str, Any]]) -> str:
    """``"0: 0.761 / 0.256, 2: 0.739 / 0.236, ..."``: each point of a :func:`coverage_curve` as bias: coverage /
    CHAIR_i."""
    return ", ".join(f"{p['bias']:g}: {p['coverage']:.3f} / {p['CHAIR_i']:.3f}" for p in curve)
