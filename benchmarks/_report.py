"""Benchmark results: the summary table (time and peak-memory ratios against the materialized logits, the GEMM floor,
Liger and Cut Cross-Entropy), the results files (``--vpo-results DIR``: ``DIR/<name>.json`` and ``DIR/<name>.md``),
device and version information. Used by ``conftest.py``."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys

import torch

import _harness as H

HERE = os.path.dirname(os.path.abspath(__file__))
SKIPS: list = []  # {"test", "reason"} of every skipped benchmark


def _device_info() -> dict:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return {"kind": "cuda", "name": torch.cuda.get_device_name(0), "capability": f"sm_{p.major}{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"kind": "cpu", "name": model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "vpo", "liger_kernel", "cut_cross_entropy", "pytest_benchmark"):
        try:
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", "installed")
        except Exception:
            v[mod] = None
    try:
        root = os.path.dirname(HERE)
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            v["git_commit"] = rev.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return v


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "results"


def _fmt(x, spec=".3g", none="—"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _markdown(data: dict) -> str:
    dev = data["device"]
    if dev["kind"] == "cuda":
        head = f"{dev['name']} ({dev['capability']}, {dev['memory_gib']} GiB, CUDA {dev['cuda']})"
    else:
        head = f"{dev['name']} (CPU, {dev['cpus']} logical cores, {dev['torch_threads']} torch threads)"
    v = data["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "vpo", "liger_kernel", "cut_cross_entropy") if v.get(k))
    lines = [
        f"# vpo benchmarks on {head}",
        "",
        f"{vers}; commit {v.get('git_commit', 'unknown')}; {data['datetime']}.",
        f"Command: `{data['command']}`.",
        "",
        "Forward + backward of one step, median over rounds (spread: interquartile range). TFLOP/s against the useful "
        "FLOPs: 6·N·D·V for log-probs, 8·N·D·V for losses and the token KL (policy fwd+bwd, reference fwd); "
        "image-attention statistics (no backward): the causal half of q·kᵀ, B·H·d·T(T+1) per layer. Peak memory: the "
        "step's peak above its inputs (CUDA: `max_memory_allocated`; CPU: peak-RSS rise in a worker process). "
        "Ratios: time and memory divided by those of the named implementation at the same shape.",
        "",
        "## Summary",
        "",
        *summary(data),
        "",
        "## Every benchmark",
        "",
        "| benchmark | shape | impl | median ms | IQR ms | rounds | TFLOP/s | peak MiB | time ratio | memory ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [b for b in data["benchmarks"] if b["extra_info"].get("bench") in H.BASELINES]
    by_key = {(b["extra_info"]["bench"], b["extra_info"]["shape"], b["extra_info"]["impl"]): b for b in rows}

    def ratio(b, base, field):
        if not base:
            return "—"
        other = by_key.get((b["extra_info"]["bench"], b["extra_info"]["shape"], base))
        if other is None:
            return "—"
        if field == "time":
            num, den = b["stats"]["median"], other["stats"]["median"]
        else:
            num, den = b["extra_info"].get("peak_mib"), other["extra_info"].get("peak_mib")
        if num is None or den is None or den <= 0:
            return "—"
        return f"{num / den:.3g}× {base}"

    for b in rows:
        e, s = b["extra_info"], b["stats"]
        lines.append(
            f"| {e['bench']} | {e['shape']} | {e['impl']} | {_fmt(s['median'] * 1e3, '.4g')} | "
            f"{_fmt(s['iqr'] * 1e3, '.2g')} | {s['rounds']} | {_fmt(e.get('tflops'), '.3g')} | "
            f"{_fmt(e.get('peak_mib'), '.1f')} | {ratio(b, e.get('time_baseline'), 'time')} | "
            f"{ratio(b, e.get('memory_baseline'), 'memory')} |"
        )

    targeted = [b for b in rows if b["extra_info"].get("target")]
    if targeted:
        lines += ["", "## Targets", "",
                  "| benchmark | shape | impl | ratio | target | |", "|---|---|---|---:|---|---|"]
        for b in targeted:
            e = b["extra_info"]
            metric = "time" if e["target"].startswith("time") else "memory"
            base = e.get(f"{metric}_baseline")
            value = e.get(f"{metric}_ratio")
            met = e.get("target_met")
            lines.append(
                f"| {e['bench']} | {e['shape']} | {e['impl']} | {_fmt(value, '.3g')}× {base} | {e['target']} | "
                f"{'—' if met is None else 'met' if met else 'NOT met'} |"
            )

    mem = [b for b in data["benchmarks"] if b["extra_info"].get("bench") == "memory"]
    if mem:
        lines += ["", "## Memory target: chunked torch path vs naive, one fwd+bwd", "",
                  "| shape | torch peak MiB | naive peak MiB | ratio | target | torch step ms | method |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for b in mem:
            e = b["extra_info"]
            ok = e["memory_ratio"] <= e["target_ratio"]
            lines.append(
                f"| {e['shape']} | {e['peak_mib']:.1f} | {e['naive_peak_mib']:.1f} | {e['memory_ratio']:.3f} | "
                f"≤ {e['target_ratio']} ({'met' if ok else 'NOT met'}) | {b['stats']['median'] * 1e3:.4g} | "
                f"{e['memory_method']} |"
            )
    lines += _train_step_markdown([b for b in data["benchmarks"] if b["extra_info"].get("bench") == "train_step"])
    if data["skipped"]:
        lines += ["", "## Not measured", ""]
        lines += [f"- `{s['test']}`: {s['reason']}" for s in data["skipped"]]
    return "\n".join(lines) + "\n"


def _train_step_markdown(steps: list) -> list:
    """The "End-to-end training step" section (bench_train_step.py): tokens/s, peaks, ratios, targets."""
    if not steps:
        return []
    lines = ["", "## End-to-end training step (bench_train_step.py)", "",
             "One DPO / TPO step of a LLaVA model with LoRA: policy passes, reference passes (no grad), loss, "
             "backward, AdamW. `vpo`: the trainer's path (hidden states, fused loss on `lm_head.weight`); "
             "`materialized`: full `[2B, T, V]` logits, fp32 log_softmax. tokens/s: the batch's real tokens "
             "(response tokens) per median step. Step peak: above the weights, optimizer state and batch; total: "
             "absolute. Ratios: vpo over the materialized step of the same method.", "",
             "| shape | impl | median s | tokens/s | response tokens/s | step peak MiB | total peak MiB | "
             "tokens/s ratio | step memory ratio | total memory ratio | targets |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for b in steps:
        e = b["extra_info"]
        targets = "; ".join(f"{t['target']}: {'—' if t['met'] is None else 'met' if t['met'] else 'NOT met'}"
                            for t in e.get("targets", ())) or "—"
        cells = [e["shape"], e["impl"], _fmt(b["stats"]["median"], ".3g"), _fmt(e.get("tokens_per_s"), ".4g"),
                 _fmt(e.get("response_tokens_per_s"), ".4g"), _fmt(e.get("peak_mib"), ".1f"),
                 _fmt(e.get("total_peak_mib"), ".1f"), _fmt(e.get("throughput_ratio"), ".3g"),
                 _fmt(e.get("memory_ratio"), ".3g"), _fmt(e.get("total_memory_ratio"), ".3g"), targets]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def resources() -> dict:
    """Peak RSS of this process and of the memory worker (its own ``VmHWM`` record: ``RUSAGE_CHILDREN`` would
    report the parent's peak too, folded in at ``exec``), MiB; CPU seconds of both."""
    from _memory import worker_peak_rss_mib

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"peak_rss_mib": me.ru_maxrss / 1024.0, "worker_peak_rss_mib": worker_peak_rss_mib(),
            "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime}


def collect(config) -> dict:
    """Everything measured so far in this session, as the results JSON holds it."""
    bs = getattr(config, "_benchmarksession", None)
    device = _device_info()
    opts = {} if bs is None else {k: bs.options.get(k) for k in ("min_rounds", "max_time", "min_time", "warmup")
                                  if k in bs.options}
    return {
        "device": device,
        "versions": _versions(),
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["pytest", *sys.argv[1:]]),
        "benchmark_options": opts,
        "inputs": {"entropy_target_nats": H.ENTROPY, "stats": dict(H.INPUT_STATS)},
        "resources": resources(),
        "benchmarks": [] if bs is None else [b.as_dict(include_data=True) for b in bs.benchmarks
                                             if not b.has_error and b.stats],
        "skipped": list(SKIPS),
    }


def write_results(config) -> None:
    """``--vpo-results DIR``: ``DIR/<name>.json`` and ``DIR/<name>.md`` (rewritten after every benchmark)."""
    out_dir = config.getoption("vpo_results", default=None)
    if not out_dir or getattr(config, "_benchmarksession", None) is None:
        return
    data = collect(config)
    name = config.getoption("vpo_results_name") or _slug(data["device"]["name"])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(_markdown(data))


# ----------------------------------------------------------------------------------------------------------------------
# The summary table
# ----------------------------------------------------------------------------------------------------------------------

REFERENCES = (("materialized", "materialized logits"), ("floor", "GEMM floor"), ("liger", "Liger"),
              ("cce", "Cut Cross-Entropy"))


def _ratio(num, den) -> str:
    if num is None or den is None or not den > 0:
        return "—"
    return f"{num / den:.3g}×"


def summary(data: dict) -> list:
    """The summary table (markdown lines): per benchmark its median time and peak memory, and both divided by those
    of the materialized logits, the GEMM floor, Liger and CCE at the same shape (a column pair only where that
    reference was measured in this session), then the inputs' softmax statistics and the run's resources."""
    rows = [b for b in data["benchmarks"] if b["extra_info"].get("bench") in H.BASELINES]
    by_key = {(b["extra_info"]["bench"], b["extra_info"].get("shape"), b["extra_info"]["impl"]): b for b in rows}
    impls = {key[2] for key in by_key}
    present = [(k, t) for k, t in REFERENCES if k in ("materialized", "floor")
               or (k == "liger" and impls & {"liger-flce", "dpo/liger"}) or (k == "cce" and "cce" in impls)]
    head = "| family | shape | impl | ms | peak MiB | " + " | ".join(f"time / mem vs {t}" for _, t in present) + " |"
    lines = [head, "|" + "---|" * 3 + "---:|---:|" + "---:|" * len(present)]
    for b in rows:
        e = b["extra_info"]
        cells = [e["bench"], e.get("shape_id", e["shape"]), e["impl"], _fmt(b["stats"]["median"] * 1e3, ".4g"),
                 _fmt(e.get("peak_mib"), ".1f")]
        ref = H.reference_of(e["bench"], e["impl"])
        for k, _ in present:
            other = by_key.get((ref[k][0], e.get("shape"), ref[k][1])) if ref.get(k) else None
            if other is None:
                cells.append("—")
                continue
            cells.append(f"{_ratio(b['stats']['median'], other['stats']['median'])} / "
                         f"{_ratio(e.get('peak_mib'), other['extra_info'].get('peak_mib'))}")
        lines.append("| " + " | ".join(cells) + " |")
    missing = [t for k, t in REFERENCES if k not in dict(present)]
    notes = []
    if missing:
        notes.append(f"No {' / '.join(missing)} columns: not measured in this run (not installed, or CUDA only).")
    mem = [b for b in data["benchmarks"] if b["extra_info"].get("bench") == "memory"]
    for b in mem:
        e = b["extra_info"]
        notes.append(f"Memory target ({e['shape']}): torch path {e['peak_mib']:.1f} MiB vs materialized "
                     f"{e['naive_peak_mib']:.1f} MiB = {e['memory_ratio']:.3f}× (target ≤ {e['target_ratio']}: "
                     f"{'met' if e['memory_ratio'] <= e['target_ratio'] else 'NOT met'}).")
    stats = data.get("inputs", {}).get("stats", {})
    for label, st in stats.items():
        notes.append(f"Inputs {label}: mean entropy {st['mean_entropy']:.2f} nats, mean target log-prob "
                     f"{st['mean_target_logp']:.2f}, mean top-1 prob {st['mean_top1_prob']:.2f}, target is top-1 "
                     f"{100 * st['target_is_top1']:.0f}%, KL(policy ‖ reference) {st.get('ref_kl', float('nan')):.3g} "
                     f"nats ({st['rows']} positions).")
    r = data.get("resources")
    if r:
        notes.append(f"Run: peak RSS {r['peak_rss_mib']:.0f} MiB (pytest) and {r['worker_peak_rss_mib']:.0f} MiB (the "
                     f"memory worker), {r['cpu_s']:.0f} CPU s (pytest and finished children).")
    return lines + [""] + [f"- {n}" for n in notes]
