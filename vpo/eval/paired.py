"""Paired statistics on the same test images: a method's change against the SFT model or against DPO, with the
standard error that pairing gives.

Two models described the same ``n`` images. Per image ``i`` the report keeps the counts behind each ratio
(:func:`per_image`): ``M_i`` mentions and ``H_i`` hallucinated ones (CHAIR_i = ΣH / ΣM), ``K_i`` present kinds and
``C_i`` covered ones (coverage = ΣC / ΣK), and ``S_i`` = 1 when the caption hallucinates at all (CHAIR_s = mean S).

A ratio ``R = ΣH / ΣM`` is not a mean over images, so its standard error comes from the delta method: with
``M̄ = ΣM / n``, the influence of image ``i`` is ``u_i = (H_i − R M_i) / M̄`` (these sum to 0) and
``SE(R)² ≈ Σ u_i² / (n (n − 1))``. For the change ``R_a − R_b`` on the same images the influences subtract image by
image, ``d_i = u_{a,i} − u_{b,i}``, and

    SE(R_a − R_b) = sqrt( Σ_i (d_i − d̄)² / (n (n − 1)) )        (d̄ = 0 up to rounding)

An image that both models get wrong (or right) cancels in ``d_i``: this is why the paired error is smaller than the
two unpaired binomial errors combined. A mean over images (CHAIR_s) uses ``u_i = S_i − mean S`` in the same formula.

Several seeds of one method against one baseline (:func:`paired_change` with lists): ``d_i`` is averaged over the
seeds before the sum, so the error is that of the seed-averaged change due to the choice of test images; the spread
over seeds (training noise) is reported separately by :mod:`vpo.compare`.

Example::

    a = {"mentions": [2, 3, 1], "hallucinated": [1, 0, 0]}
    b = {"mentions": [2, 3, 2], "hallucinated": [1, 1, 1]}
    paired_change(a, b, "CHAIR_i")   # {"diff": 0.25 - 0.4286, "se": ..., "n": 3}
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Sequence, Union

# metric -> (numerator key, denominator key); None = a mean of the numerator over images.
RATIOS = {"CHAIR_i": ("hallucinated", "mentions"), "coverage": ("covered", "kinds"), "CHAIR_s": ("any_hallucinated", None)}
PerImage = Mapping[str, Sequence[float]]


def per_image(per_response) -> Dict[str, list]:
    """The per-image counts of :func:`vpo.eval.metrics.chair`'s ``per_response`` (one
    :class:`~vpo.eval.metrics.ResponseScore` per image): ``{"mentions", "hallucinated", "any_hallucinated",
    "covered", "kinds"}``, lists of ints of length ``n``."""
    rows = list(per_response)
    return {"mentions": [len(r.mentions) for r in rows], "hallucinated": [len(r.hallucinated) for r in rows],
            "any_hallucinated": [int(bool(r.hallucinated)) for r in rows],
            "covered": [r.covered_kinds for r in rows], "kinds": [r.true_kinds for r in rows]}


def _check(name: str, counts: PerImage, metric: str) -> int:
    if metric not in RATIOS:
        raise ValueError(f"metric must be one of {sorted(RATIOS)}, got {metric!r}")
    num, den = RATIOS[metric]
    if not isinstance(counts, Mapping) or num not in counts or (den is not None and den not in counts):
        got = sorted(counts) if isinstance(counts, Mapping) else type(counts).__name__
        raise ValueError(f"{name} must map {num!r}" + (f" and {den!r}" if den else "") + " to per-image counts "
                         f"(vpo.eval.paired.per_image), got {got}")
    n = len(counts[num])
    if den is not None and len(counts[den]) != n:
        raise ValueError(f"{name}[{num!r}] has {n} images but {name}[{den!r}] has {len(counts[den])}")
    return n


def influence(counts: PerImage, metric: str = "CHAIR_i"):
    """``(value, u)``: the metric over all images and each image's influence ``u_i`` (module docstring), ``[n]``."""
    n = _check("counts", counts, metric)
    if n == 0:
        raise ValueError("counts has no images")
    num, den = RATIOS[metric]
    h = [float(v) for v in counts[num]]
    m = [1.0] * n if den is None else [float(v) for v in counts[den]]
    total = sum(m)
    if total <= 0:
        return 0.0, [0.0] * n
    r = sum(h) / total
    mbar = total / n
    return r, [(hi - r * mi) / mbar for hi, mi in zip(h, m)]


def ratio_se(counts: PerImage, metric: str = "CHAIR_i") -> float:
    """The delta-method standard error of one model's metric over its images (module docstring)."""
    _, u = influence(counts, metric)
    return _se(u)


def _se(d: Sequence[float]) -> float:
    n = len(d)
    if n < 2:
        return 0.0
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (n * (n - 1)))


def paired_change(a: Union[PerImage, Sequence[PerImage]], b: Union[PerImage, Sequence[PerImage]],
                  metric: str = "CHAIR_i") -> Dict[str, float]:
    """``{"diff", "se", "n"}``: metric(a) − metric(b) on the same images and its paired standard error.

    ``a``, ``b``: per-image counts (:func:`per_image`) of two models on the same ``n`` images, or lists of them (one
    per seed; the same length, or ``b`` a single baseline such as the SFT model): ``diff`` is then the mean over
    seeds and ``d_i`` is averaged over seeds (module docstring)."""
    a_list = [a] if isinstance(a, Mapping) else list(a)
    b_list = [b] if isinstance(b, Mapping) else list(b)
    if not a_list:
        raise ValueError("a is empty: expected per-image counts or a list of them")
    if len(b_list) == 1:
        b_list = b_list * len(a_list)
    if len(b_list) != len(a_list):
        raise ValueError(f"a has {len(a_list)} runs but b has {len(b_list)}: expected as many, or one b")
    diffs, d_sum = [], None
    for x, y in zip(a_list, b_list):
        nx, ny = _check("a", x, metric), _check("b", y, metric)
        if nx != ny:
            raise ValueError(f"a has {nx} images but b has {ny}: paired statistics need the same images")
        rx, ux = influence(x, metric)
        ry, uy = influence(y, metric)
        diffs.append(rx - ry)
        d = [p - q for p, q in zip(ux, uy)]
        d_sum = d if d_sum is None else [s + v for s, v in zip(d_sum, d)]
    k = len(a_list)
    return {"diff": sum(diffs) / k, "se": _se([v / k for v in d_sum]), "n": len(d_sum)}


def paired_table(per_model: Mapping[str, Any], methods: Sequence[str], *, base: str = "sft",
                 baseline: str = "dpo", metrics: Sequence[str] = ("CHAIR_i", "coverage", "CHAIR_s")
                 ) -> Dict[str, Dict[str, Any]]:
    """Per method: ``{"vs_sft": {metric: paired_change}, "vs_dpo": {...}}`` (``vs_dpo`` when ``baseline`` is in
    ``per_model`` and the method is not it). ``per_model[name]``: per-image counts, or a list (one per seed)."""
    out: Dict[str, Dict[str, Any]] = {}
    for m in methods:
        if m not in per_model:
            continue
        row = {"vs_" + base: {k: paired_change(per_model[m], per_model[base], k) for k in metrics}}
        if baseline in per_model and m != baseline:
            row["vs_" + baseline] = {k: paired_change(per_model[m], per_model[baseline], k) for k in metrics}
        out[m] = row
    return out


def format_paired(table: Mapping[str, Any], metric: str = "CHAIR_i") -> str:
    """One line per method: ``method: vs SFT -0.028 ± 0.004 (paired), vs DPO +0.001 ± 0.002``."""
    lines = []
    for m, row in table.items():
        parts = []
        for key, label in (("vs_sft", "vs SFT"), ("vs_dpo", "vs DPO")):
            if key in row:
                x = row[key][metric]
                z = x["diff"] / x["se"] if x["se"] > 0 else float("nan")
                parts.append(f"{label} {x['diff']:+.4f} ± {x['se']:.4f} ({z:+.1f} SE)")
        lines.append(f"{m}: " + ", ".join(parts))
    return "\n".join(lines)


def paired_runs(per_image_runs: Mapping[str, Mapping[str, PerImage]], sft: PerImage, *, baseline: str = "dpo",
                metrics: Sequence[str] = ("CHAIR_i", "coverage", "CHAIR_s")) -> Dict[str, Dict[str, Any]]:
    """:func:`paired_table` for a comparison over seeds: ``per_image_runs[method][seed]`` per-image counts, ``sft``
    the SFT model's. ``vs_sft`` averages every seed of the method; ``vs_dpo`` pairs each seed with DPO's run of the
    same seed (the seeds both have) and averages. Each entry also has ``"seeds"``."""
    out: Dict[str, Dict[str, Any]] = {}
    base = per_image_runs.get(baseline, {})
    for m, by_seed in per_image_runs.items():
        seeds = sorted(by_seed, key=str)
        if not seeds:
            continue
        row: Dict[str, Any] = {"seeds": [str(s) for s in seeds],
                               "vs_sft": {k: paired_change([by_seed[s] for s in seeds], sft, k) for k in metrics}}
        common = [s for s in seeds if s in base]
        if m != baseline and common:
            row["vs_" + baseline] = {k: paired_change([by_seed[s] for s in common], [base[s] for s in common], k)
                                     for k in metrics}
        out[m] = row
    return out


def paired_markdown(paired: Mapping[str, Any], metrics: Sequence[str] = ("CHAIR_i", "coverage")) -> str:
    """A markdown table of :func:`paired_runs` / :func:`paired_table`: each method's change against SFT and DPO,
    ``diff ± paired SE`` on the same images."""
    head = "| method | " + " | ".join(f"{k} − SFT | {k} − DPO" for k in metrics) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(metrics))]
    for m, row in paired.items():
        cells = []
        for k in metrics:
            for key in ("vs_sft", "vs_dpo"):
                x = row.get(key, {}).get(k)
                cells.append(f"{x['diff']:+.4f} ± {x['se']:.4f}" if x else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
