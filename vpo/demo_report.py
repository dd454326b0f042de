"""The demo's numbers and tables: the metrics kept per model (:data:`METRICS`), the before/after table printed by
``vpo demo`` (:func:`format_table`) and its markdown twin (:func:`summary_markdown`)."""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

# (summary key, report section, report key, better): the numbers kept for `before` and every method's `after`.
METRICS = (("CHAIR_i", "chair", "chair_i", "lower"), ("CHAIR_i_se", "chair", "chair_i_se", "-"),
           ("CHAIR_s", "chair", "chair_s", "lower"), ("coverage", "chair", "coverage", "higher"),
           ("mentions", "chair", "num_mentions", "-"), ("CHAIR_prior", "prior", "chair_prior", "lower"),
           ("prior_rate", "prior", "prior_rate", "lower"), ("POPE acc", "pope", "accuracy", "higher"),
           ("POPE F1", "pope", "f1", "higher"))
# The table's columns (the standard errors and counts stay in summary.json).
TABLE = ("CHAIR_i", "CHAIR_s", "CHAIR_prior", "coverage", "POPE F1")


def _metric(report: Dict[str, Any], section: str, key: str) -> float:
    return float(report[section][key]) if section in report else float("nan")


def row_metrics(report: Dict[str, Any]) -> Dict[str, float]:
    """The :data:`METRICS` of an evaluation report (NaN for a section the report lacks)."""
    return {name: _metric(report, sec, key) for name, sec, key, _ in METRICS}


def matched_coverage(curve, after: Dict[str, float], before: Dict[str, float]) -> Dict[str, float]:
    """A trained model against the SFT model's trade-off ``curve`` (:func:`vpo.eval.tradeoff.coverage_curve`) at the
    trained model's coverage: ``{"coverage", "sft_CHAIR_i"`` (the curve's CHAIR_i there), ``"gain"`` (sft_CHAIR_i -
    the model's CHAIR_i; > 0: it hallucinates less at equal coverage), ``"gain_se"`` (in standard errors of the SFT
    model's CHAIR_i)}``. A model that covers MORE than the SFT model is compared with the SFT model as decoded
    (the curve's highest coverage): conservative, since covering more costs CHAIR_i."""
    from vpo.eval.tradeoff import chair_at_coverage

    top = max(p["coverage"] for p in curve)
    cov = min(after["coverage"], top)
    ref = chair_at_coverage(curve, cov)
    gain = ref - after["CHAIR_i"]
    se = before.get("CHAIR_i_se") or float("nan")
    return {"coverage": cov, "sft_CHAIR_i": ref, "gain": gain, "gain_se": gain / se}


def _curve_ends(history: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    logs = [h for h in history if "loss" in h and "train_runtime" not in h]
    out: Dict[str, Any] = {"logged_steps": [h.get("step") for h in logs]}
    for key, name in (("loss", "loss"), ("rewards/margins", "margin"), ("rewards/accuracies", "accuracy")):
        vals = [h[key] for h in logs if isinstance(h.get(key), (int, float))]
        if vals:
            out[name] = {"start": float(vals[0]), "end": float(vals[-1])}
    return out


def _fmt(v: float) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "  -  "


def format_table(summary: Dict[str, Any]) -> str:
    """The before/after table and the curves' end points of a :func:`run_demo` summary."""
    before = summary["before"]
    lines = []
    lines.append(f"{'model':<12}" + "".join(f"{name:>20}" for name in TABLE))
    lines.append(f"{'sft (before)':<12}" + "".join(f"{_fmt(before[name]):>20}" for name in TABLE))
    for method, res in summary["methods"].items():
        cells = [f"{_fmt(before[name])} -> {_fmt(res['after'][name])}" for name in TABLE]
        lines.append(f"{method + ' (after)':<12}" + "".join(f"{c:>20}" for c in cells))
    better = {name: d for name, _s, _k, d in METRICS}
    lines.append(f"{'':<12}" + "".join(f"{('(' + better[name] + ' is better)'):>20}" for name in TABLE))
    se = (f"CHAIR_i standard error (binomial, {int(before['mentions'])} mentions before): {_fmt(before['CHAIR_i_se'])}"
          f"; change in SE")
    for method, res in summary["methods"].items():
        a = res["after"]
        change = (a["CHAIR_i"] - before["CHAIR_i"]) / before["CHAIR_i_se"] if before["CHAIR_i_se"] else float("nan")
        se += f", {method}: {change:+.1f}"
    lines.append(se)
    lines += tie_notes(summary)
    if any("matched" in res for res in summary["methods"].values()):
        m = "at matched coverage (the SFT model decoded to stop earlier; > 0 = less hallucination)"
        for method, res in summary["methods"].items():
            x = res.get("matched")
            if x:
                m += (f"; {method}: SFT {_fmt(x['sft_CHAIR_i'])} vs {_fmt(res['after']['CHAIR_i'])}, gain "
                      f"{x['gain']:+.3f} = {x['gain_se']:+.1f} SE")
        lines.append(m)
    lines.append("")
    lines.append(f"{'curves':<8}{'steps':>7}{'loss start -> end':>22}{'margin start -> end':>24}"
                 f"{'accuracy end':>15}{'time':>8}")
    sft = summary.get("sft", {})
    if sft.get("curve", {}).get("loss"):
        c = sft["curve"]
        cached = " (cached)" if sft.get("cached") else ""
        lines.append(f"{'sft':<8}{sft['steps']:>7}{_fmt(c['loss']['start']) + ' -> ' + _fmt(c['loss']['end']):>22}"
                     f"{'':>24}{'':>15}{sft['seconds']:>7.0f}s{cached}")
    for method, res in summary["methods"].items():
        c = res["curve"]
        loss = c.get("loss", {})
        margin = c.get("margin", {})
        acc = c.get("accuracy", {})
        lines.append(f"{method:<8}{res['steps']:>7}"
                     f"{_fmt(loss.get('start', float('nan'))) + ' -> ' + _fmt(loss.get('end', float('nan'))):>22}"
                     f"{_fmt(margin.get('start', float('nan'))) + ' -> ' + _fmt(margin.get('end', float('nan'))):>24}"
                     f"{_fmt(acc.get('end', float('nan'))):>15}{res['seconds']:>7.0f}s")
    return "\n".join(lines)


def tie_notes(summary: Dict[str, Any]) -> list:
    """One line per pair of methods whose table rows are equal to the printed three decimals, saying why when the
    reason is known (TPO with ``c_θ`` detached trains like DPO: docs/methods.md), so a tie does not read as a bug."""
    rows = {m: tuple(_fmt(res["after"][name]) for name in TABLE) for m, res in summary["methods"].items()}
    names = list(rows)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if rows[a] != rows[b]:
                continue
            pair = {a, b}
            detached = not summary.get("settings", {}).get("tpo_reward_grad", True)
            if pair == {"tpo", "dpo"} and detached:
                why = ("TPO runs with c_theta detached (tpo_reward_grad: false), so its gradient is DPO's scaled per "
                       "pair by a factor that starts at DPO's and stays near it (docs/methods.md, TPO diagnostics)")
            else:
                why = "the two runs end at the same model to the printed precision"
            out.append(f"{a} and {b} tie (every metric equal to 3 decimals): {why}")
    return out


def summary_markdown(summary: Dict[str, Any]) -> str:
    """The before/after numbers of a :func:`run_demo` summary as a markdown table (``summary.md``)."""
    cols = ("CHAIR_i", "CHAIR_s", "CHAIR_prior", "prior_rate", "coverage", "mentions", "POPE acc", "POPE F1")
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def cells(r):
        out = []
        for k in cols:
            if k == "CHAIR_i":
                out.append(f"{r['CHAIR_i']:.3f} ± {r['CHAIR_i_se']:.3f}")
            elif k == "mentions":
                out.append(f"{int(r[k])}")
            else:
                out.append(_fmt(r[k]))
        return out

    lines.append("| SFT (before) | " + " | ".join(cells(summary["before"])) + " |")
    for method, res in summary["methods"].items():
        lines.append(f"| {method} (after) | " + " | ".join(cells(res["after"])) + " |")
    b = summary["before"]
    notes = [f"CHAIR_i ± its binomial standard error over the mentions; {summary['settings']['eval_images']} held-out "
             f"{summary.get('eval_split', 'test')} images, seed {summary['seed']}, {summary['threads']} thread(s)."]
    for method, res in summary["methods"].items():
        a = res["after"]
        d = a["CHAIR_i"] - b["CHAIR_i"]
        notes.append(f"{method}: CHAIR_i {b['CHAIR_i']:.3f} -> {a['CHAIR_i']:.3f} ({d:+.3f}, {d / b['CHAIR_i_se']:+.1f} "
                     f"SE of the SFT model's CHAIR_i); coverage {a['coverage'] - b['coverage']:+.3f}; "
                     f"{res['steps']} steps in {res['seconds']:.0f}s.")
        x = res.get("matched")
        if x:
            notes.append(f"{method} at matched coverage ({x['coverage']:.3f}): the SFT model decoded to stop earlier "
                         f"has CHAIR_i {x['sft_CHAIR_i']:.3f}; {method} {a['CHAIR_i']:.3f}: gain {x['gain']:+.3f} "
                         f"({x['gain_se']:+.1f} SE).")
    if summary.get("sft_curve"):
        from vpo.eval.tradeoff import format_curve

        notes.append("SFT trade-off (bias on the final '.': coverage / CHAIR_i): " + format_curve(summary["sft_curve"])
                     + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
