"""``vpo demo --methods all``: every method on the same world, from the same SFT model, over several seeds.

    vpo demo --methods all [--quick] [--seeds 0,1,2] [--jobs J] [--out DIR] [--steps N] [--lr LR]

One world (the demo's four splits, :func:`vpo.demo.make_world_data`, drawn with ``--seed``) and one SFT model (cached
by its spec hash, :func:`vpo.demo.prepare_sft`); then, for every seed and every method of
:data:`vpo.demo_methods.ALL_METHODS`, the preference stage (:func:`vpo.demo_methods.train_method`: same steps, batch,
learning rate and β; the seed draws the data order, TPO's noise, mDPO's crops, OViP's samples) and the measurement on
the held-out test images. The seeds vary the preference stage only: the standard errors are those of training noise
(over seeds), not of the SFT model or the world.

Outputs in ``--out``: ``compare.json`` (every run's numbers, the per-method means and standard errors, and each
method's paired difference from DPO per seed), ``compare.md`` (the table), ``compare.png`` (a bar chart of CHAIR_i,
the prior-triggered CHAIR and coverage with standard-error bars; the SFT model as a dashed line). ``compare.json`` is
rewritten after every run, so an interrupted comparison keeps what it finished. ``--jobs J`` runs the seeds in ``J``
worker processes (the same numbers as one process; default one per seed on 2+ cores) and merges them.

"Beats DPO" in the table means: the mean paired difference in CHAIR_i (method - DPO, same seed) is negative and at
least two of its standard errors away from zero, with coverage no more than 3 points below DPO's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

# Numbers aggregated over seeds (summary keys of vpo.demo.row_metrics).
AGGREGATED = ("CHAIR_i", "CHAIR_s", "CHAIR_prior", "prior_rate", "coverage", "POPE F1", "mentions", "matched_gain")


def mean_se(values: Sequence[float]) -> Dict[str, float]:
    """``{"mean", "se", "n"}``: the mean and its standard error (sample std / sqrt(n); 0 for one value)."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    m = sum(vals) / n
    se = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1) / n) if n > 1 else 0.0
    return {"mean": m, "se": se, "n": n}


def aggregate(runs: Dict[str, Dict[int, Dict[str, float]]]) -> Dict[str, Any]:
    """Per method: :func:`mean_se` of each :data:`AGGREGATED` number over seeds, and (when DPO ran) the paired
    differences from DPO's run of the same seed (``vs_dpo``) and the verdict ``beats_dpo`` (module docstring)."""
    out: Dict[str, Any] = {}
    dpo = runs.get("dpo", {})
    for method, by_seed in runs.items():
        agg: Dict[str, Any] = {k: mean_se([r[k] for r in by_seed.values() if k in r]) for k in AGGREGATED
                               if any(k in r for r in by_seed.values())}
        common = sorted(set(by_seed) & set(dpo))
        if method != "dpo" and common:
            agg["vs_dpo"] = {k: mean_se([by_seed[s][k] - dpo[s][k] for s in common])
                             for k in ("CHAIR_i", "CHAIR_prior", "coverage")}
            d, c = agg["vs_dpo"]["CHAIR_i"], agg["vs_dpo"]["coverage"]
            agg["beats_dpo"] = bool(d["n"] > 1 and d["mean"] < 0 and -d["mean"] >= 2 * d["se"]
                                    and c["mean"] >= -0.03)
        out[method] = agg
    return out


def format_markdown(result: Dict[str, Any]) -> str:
    """The comparison table (means ± standard errors over seeds) and the before row."""
    before = result["before"]
    agg = result["aggregate"]
    seeds = result["seeds"]
    lines = [f"Every method from the same SFT model on the same world; {len(seeds)} seeds ({', '.join(map(str, seeds))})"
             f" of the preference stage; {result['settings']['pref_steps']} steps x {result['settings']['pref_batch']}"
             f" pairs, lr {result['settings']['pref_lr']:g}, beta {result['settings']['beta']:g}; "
             f"{result['eval_images']} held-out {result['eval_split']} images. Mean ± standard error over seeds "
             f"(lower CHAIR is better, higher coverage / F1 is better)."
             + (" Gain at matched coverage: the SFT model's CHAIR_i at the method's coverage (decoded to stop earlier, "
                "vpo.eval.tradeoff) minus the method's; > 0 = less hallucination than saying less would give."
                if any("matched_gain" in a for a in result["aggregate"].values()) else ""), ""]
    matched = any("matched_gain" in a for a in agg.values())
    head = ("| method | CHAIR_i | CHAIR_s | CHAIR_prior | prior_rate | coverage | POPE F1 | "
            + ("gain at matched coverage | " if matched else "") + "CHAIR_i − DPO (paired) | beats DPO |")
    lines += [head, "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if matched else "") + "---:|:---:|"]
    lines.append("| SFT (before) | " + " | ".join(f"{before[k]:.3f}" for k in
                                                   ("CHAIR_i", "CHAIR_s", "CHAIR_prior", "prior_rate", "coverage",
                                                    "POPE F1")) + (" | 0 (the curve)" if matched else "") + " | | |")
    for method in result["methods"]:
        a = agg.get(method)
        if not a:
            continue
        keys = ("CHAIR_i", "CHAIR_s", "CHAIR_prior", "prior_rate", "coverage", "POPE F1")
        cells = [f"{a[k]['mean']:.3f} ± {a[k]['se']:.3f}" for k in keys]
        if matched:
            g = a.get("matched_gain", {"mean": float("nan"), "se": float("nan")})
            cells.append(f"{g['mean']:+.3f} ± {g['se']:.3f}")
        vs = a.get("vs_dpo", {}).get("CHAIR_i")
        diff = f"{vs['mean']:+.3f} ± {vs['se']:.3f}" if vs else "—"
        verdict = "—" if method == "dpo" else ("yes" if a.get("beats_dpo") else "no")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {diff} | {verdict} |")
    if result.get("paired"):
        from vpo.eval.paired import paired_markdown

        lines += ["", "Paired on the same test images (mean over seeds ± the delta-method standard error from the "
                      "choice of images, vpo.eval.paired; the ± above is the spread over seeds):", "",
                  paired_markdown(result["paired"])]
    return "\n".join(lines) + "\n"


def bar_chart_png(result: Dict[str, Any], path: str) -> str:
    """Grouped bars (CHAIR_i, CHAIR_prior, coverage) per method with standard-error bars; dashed lines: SFT."""
    from vpo.visualize import _makedirs_for, _pyplot

    plt = _pyplot()
    methods = [m for m in result["methods"] if m in result["aggregate"]]
    keys = ("CHAIR_i", "CHAIR_prior", "coverage")
    colors = ("#b2182b", "#ef8a62", "#2166ac")
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2.5, 3.8), dpi=120)
    width = 0.8 / len(keys)
    for j, (k, col) in enumerate(zip(keys, colors)):
        xs = [i + (j - 1) * width for i in range(len(methods))]
        ms = [result["aggregate"][m][k]["mean"] for m in methods]
        ses = [result["aggregate"][m][k]["se"] for m in methods]
        ax.bar(xs, ms, width, yerr=ses, capsize=3, color=col, label=k)
        ax.axhline(result["before"][k], color=col, linestyle="--", linewidth=1)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods)
    ax.set_ylim(0, 1)
    ax.set_title(f"shapes world, {len(result['seeds'])} seeds: mean ± s.e. (dashed: SFT before)", fontsize=10)
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    fig.tight_layout()
    _makedirs_for(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def merge_compare(out: str, parts: Sequence[str]) -> Dict[str, Any]:
    """Merge comparisons run as separate processes (e.g. one seed each, on the same world and SFT model) into
    ``out``: the runs of every ``parts`` folder's ``compare.json``, re-aggregated, with the table and the chart.
    The parts must share the settings, the split and the SFT model."""
    from vpo.demo import _write_json

    results = []
    for part in parts:
        with open(os.path.join(part, "compare.json"), encoding="utf-8") as f:
            results.append(json.load(f))
    if not results:
        raise ValueError("parts is empty: pass the folders of the comparisons to merge")
    first = results[0]
    for r in results[1:]:
        for key in ("settings", "eval_split", "eval_images", "data_seed"):
            if r[key] != first[key]:
                raise ValueError(f"the parts differ in {key}: {first[key]!r} vs {r[key]!r}")
        if r["sft"]["key"] != first["sft"]["key"]:
            raise ValueError("the parts used different SFT models")
    merged: Dict[str, Any] = {k: first[k] for k in ("mode", "settings", "eval_split", "eval_images", "data_seed",
                                                    "before", "sft")}
    if "sft_curve" in first:
        merged["sft_curve"] = first["sft_curve"]
    merged["methods"] = [m for m in first["methods"]]
    merged["runs"], merged["seconds"] = {}, {}
    for r in results:
        for m, by_seed in r["runs"].items():
            merged["runs"].setdefault(m, {}).update(by_seed)
            merged["seconds"].setdefault(m, {}).update(r["seconds"].get(m, {}))
    merged["seeds"] = sorted({int(s) for by_seed in merged["runs"].values() for s in by_seed})
    merged["parts"] = [os.path.abspath(p) for p in parts]
    merged["part_seconds"] = [r.get("total_seconds") for r in results]
    merged["aggregate"] = aggregate({m: {int(s): v for s, v in by_seed.items()} for m, by_seed in merged["runs"].items()})
    per_image = _read_per_image(parts)
    if per_image is not None:
        merged["paired"] = _write_per_image(out, per_image)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
        f.write(format_markdown(merged))
    merged["png"] = bar_chart_png(merged, os.path.join(out, "compare.png"))
    _write_json(os.path.join(out, "compare.json"), merged)
    return merged


def run_compare(out: str, *, quick: bool = False, seeds: Sequence[int] = (0, 1, 2),
                methods: Optional[Sequence[str]] = None, settings=None, threads: Optional[int] = 1,
                cache_dir: Optional[str] = None, progress: bool = True, impl: str = "auto",
                eval_split: str = "test", data_seed: int = 0, log=None, jobs: int = 1) -> Dict[str, Any]:
    """Run the comparison (module docstring); returns the result (also ``out/compare.json``).

    ``jobs`` > 1: the SFT model is prepared here, then the seeds run in up to ``jobs`` worker processes (each with
    ``threads`` threads and its own folder ``out/seed-S``, its stage lines in ``log.txt``) and are merged into
    ``out`` (:func:`merge_compare`). The numbers are the same as with ``jobs=1``: every draw is seeded per seed."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    import torch

    from vpo.demo import (PRESETS, TRADEOFF_BIASES, _Log, _quiet_trainer, _write_json, make_world_data,
                          matched_coverage, prepare_sft, row_metrics)
    from vpo.eval.tradeoff import coverage_curve
    from vpo.demo_methods import ALL_METHODS, train_method
    from vpo.eval.cli import evaluate, quiet_transformers
    from vpo.models.cache import load_pretrained

    methods = list(methods or ALL_METHODS)
    for m in methods:
        if m not in ALL_METHODS:
            raise ValueError(f"methods must be drawn from {list(ALL_METHODS)}, got {m!r}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, at least one, got {seeds!r}")
    if eval_split not in ("test", "val"):
        raise ValueError(f"eval_split must be 'test' or 'val', got {eval_split!r}")
    settings = settings or PRESETS["quick" if quick else "full"]
    log = log or _Log()
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    if jobs > 1 and len(seeds) > 1:
        return _run_parallel(out, quick=quick, seeds=seeds, methods=methods, settings=settings, threads=threads,
                             cache_dir=cache_dir, progress=progress, impl=impl, eval_split=eval_split,
                             data_seed=data_seed, log=log, jobs=jobs)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    n_eval = settings.eval_images if eval_split == "test" else settings.val_images
    result: Dict[str, Any] = {"mode": "quick" if quick else "full", "seeds": seeds, "methods": methods,
                              "settings": dataclasses.asdict(settings), "eval_split": eval_split,
                              "eval_images": n_eval, "data_seed": data_seed, "runs": {}, "seconds": {}}
    try:
        with quiet_transformers():
            log.stage(1, 3, f"world data and the SFT model (cached by its spec hash)")
            data = make_world_data(os.path.join(out, "data"), settings, data_seed)
            sft = prepare_sft(data, settings, data_seed, cache_dir=cache_dir, impl=impl, progress=progress, log=log)
            log(f"      SFT {'cached' if sft['cached'] else 'trained'}: {sft['model']}")
            model, processor = load_pretrained(sft["model"])
            report = evaluate(model, processor, data["root"], eval_split, desc="eval sft", progress=progress)
            result["before"] = row_metrics(report)
            per_image: Dict[str, Any] = {"sft": report["per_image"], "runs": {}}  # vpo.eval.paired
            result["sft"] = {"model": sft["model"], "cached": sft["cached"], "key": sft["key"]}
            curve = coverage_curve(model, processor, data["root"], eval_split, biases=TRADEOFF_BIASES,
                                   progress=progress)
            result["sft_curve"] = curve
            del model
            total = len(seeds) * len(methods)
            k = 0
            for seed in seeds:
                for method in methods:
                    k += 1
                    log.stage(2, 3, f"{method.upper()} seed {seed} ({k}/{total})")
                    t = time.perf_counter()
                    policy, res, _ = train_method(method, sft["model"], data, settings, seed,
                                                  os.path.join(out, f"{method}-seed{seed}"), impl=impl,
                                                  progress=progress, bar=_quiet_trainer)
                    report = evaluate(policy, processor, data["root"], eval_split, desc=f"eval {method}",
                                      progress=progress)
                    after = row_metrics(report)
                    per_image["runs"].setdefault(method, {})[str(seed)] = report["per_image"]
                    after["matched_gain"] = matched_coverage(curve, after, result["before"])["gain"]
                    del policy
                    result["runs"].setdefault(method, {})[str(seed)] = after
                    result["seconds"].setdefault(method, {})[str(seed)] = time.perf_counter() - t
                    log(f"      CHAIR_i {after['CHAIR_i']:.3f}  CHAIR_prior {after['CHAIR_prior']:.3f}  coverage "
                        f"{after['coverage']:.3f}  ({time.perf_counter() - t:.0f}s)")
                    result["aggregate"] = aggregate({m: {int(s): r for s, r in v.items()}
                                                     for m, v in result["runs"].items()})
                    result["paired"] = _write_per_image(out, per_image)
                    _write_json(os.path.join(out, "compare.json"), result)
    finally:
        torch.set_num_threads(old_threads)
    log.stage(3, 3, "report")
    result["total_seconds"] = time.perf_counter() - log.start
    table = format_markdown(result)
    with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
        f.write(table)
    result["png"] = bar_chart_png(result, os.path.join(out, "compare.png"))
    _write_json(os.path.join(out, "compare.json"), result)
    log()
    log(table)
    log(f"bar chart: {result['png']}   total {result['total_seconds']:.0f}s")
    return result


def _run_parallel(out: str, *, seeds, jobs: int, log=None, progress: bool = True, **kw) -> Dict[str, Any]:
    """:func:`run_compare` with ``jobs`` worker processes, one seed each (its docstring)."""
    import concurrent.futures
    import multiprocessing

    import torch

    from vpo.demo import _Log, make_world_data, prepare_sft
    from vpo.eval.cli import quiet_transformers

    log = log or _Log()
    settings = kw["settings"]
    log.stage(1, 3, "world data and the SFT model (cached by its spec hash), before the workers start")
    old_threads = torch.get_num_threads()
    if kw["threads"]:
        torch.set_num_threads(kw["threads"])
    try:
        with quiet_transformers():
            data = make_world_data(os.path.join(out, "data"), settings, kw["data_seed"])
            sft = prepare_sft(data, settings, kw["data_seed"], cache_dir=kw["cache_dir"], impl=kw["impl"],
                              progress=progress, log=log)
    finally:
        torch.set_num_threads(old_threads)
    log(f"      SFT {'cached' if sft['cached'] else 'trained'}: {sft['model']}")
    parts = [os.path.join(out, f"seed-{s}") for s in seeds]
    log.stage(2, 3, f"{len(seeds)} seeds x {len(kw['methods'])} methods in {min(jobs, len(seeds))} "
                    f"worker processes (folders {', '.join(os.path.basename(p) for p in parts)})")
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(jobs, len(seeds)), mp_context=ctx) as pool:
        futures = {pool.submit(_seed_worker, part, seed, kw): seed for part, seed in zip(parts, seeds)}
        for fut in concurrent.futures.as_completed(futures):
            res = fut.result()
            log(f"      seed {futures[fut]} done ({res.get('total_seconds', float('nan')):.0f}s)")
    log.stage(3, 3, "report (merged)")
    merged = merge_compare(out, parts)
    merged["total_seconds"] = time.perf_counter() - log.start
    merged["jobs"] = jobs
    from vpo.demo import _write_json

    _write_json(os.path.join(out, "compare.json"), merged)
    log()
    log(format_markdown(merged))
    log(f"bar chart: {merged['png']}   total {merged['total_seconds']:.0f}s")
    return merged


def _write_per_image(out: str, per_image: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``out/per_image.json`` (each model's per-image counts, compact) and return the paired statistics
    (:func:`vpo.eval.paired.paired_runs`) that go into ``compare.json``."""
    from vpo.eval.paired import paired_runs

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "per_image.json"), "w", encoding="utf-8") as f:
        json.dump(per_image, f)
    return paired_runs(per_image["runs"], per_image["sft"])


def _read_per_image(parts: Sequence[str]) -> Optional[Dict[str, Any]]:
    """The parts' ``per_image.json`` merged (None when a part has none)."""
    merged: Optional[Dict[str, Any]] = None
    for part in parts:
        path = os.path.join(part, "per_image.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            p = json.load(f)
        if merged is None:
            merged = {"sft": p["sft"], "runs": {}}
        for m, by_seed in p["runs"].items():
            merged["runs"].setdefault(m, {}).update(by_seed)
    return merged


def _seed_worker(part: str, seed: int, kw: Dict[str, Any]) -> Dict[str, Any]:
    """One seed in a worker process; its stage lines go to ``part/log.txt`` (``tail -f`` it to follow)."""
    from vpo.demo import _Log

    os.makedirs(part, exist_ok=True)
    with open(os.path.join(part, "log.txt"), "w", encoding="utf-8") as stream:
        return run_compare(part, seeds=[seed], progress=False, log=_Log(stream), jobs=1, **kw)
