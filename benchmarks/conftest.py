"""Benchmark session plumbing: the ``--vpo-results DIR`` results writer, shape-major ordering, the heavy-test gate.

``--vpo-results DIR`` writes ``DIR/<name>.json`` (device, versions, every benchmark's pytest-benchmark stats with raw
timings and its ``extra_info``, the skipped benchmarks and why) and ``DIR/<name>.md`` (one table, the device named at
the top). ``<name>`` is ``--vpo-results-name`` or a slug of the device name. The files are rewritten after every
benchmark, so a run stopped by a time limit still leaves what it measured.
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys

import pytest
import torch

import _harness as H

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    group = parser.getgroup("vpo benchmarks")
    group.addoption("--vpo-results", metavar="DIR", default=None,
                    help="write DIR/<name>.json (raw) and DIR/<name>.md (table) with every benchmark's results")
    group.addoption("--vpo-results-name", metavar="NAME", default=None,
                    help="file stem for --vpo-results (default: a slug of the device name)")


def pytest_configure(config):
    config.addinivalue_line("markers", "vpo_heavy: a long measurement (GiB-sized naive baseline); "
                                       "runs only with --benchmark-only")


def _in_benchmarks(item) -> bool:
    return str(item.path).startswith(HERE + os.sep)


def pytest_collection_modifyitems(config, items):
    only = config.getoption("benchmark_only", default=False)
    heavy_skip = pytest.mark.skip(reason="heavy memory comparison: runs only with --benchmark-only")
    for item in items:
        if _in_benchmarks(item) and "vpo_heavy" in item.keywords and not only:
            item.add_marker(heavy_skip)

    # Shape-major order across both files: the inputs for one shape are built once (the cache holds one shape), and a
    # run cut short by a time limit has already measured every implementation at the smaller shapes.
    def key(pair):
        i, item = pair
        if not _in_benchmarks(item):
            return (0, 0, i)
        case = getattr(getattr(item, "callspec", None), "params", {}).get("case")
        rank = H.SHAPE_ORDER.get(case.shape, 0) if case is not None else len(H.SHAPE_ORDER)
        return (1, rank, i)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


@pytest.fixture(autouse=True)
def _free_device_memory():
    yield
    if torch.cuda.is_available():  # keep only the cached inputs between benchmarks
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# Results writer
# ----------------------------------------------------------------------------------------------------------------------


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
        "step's peak above its inputs (CUDA: `max_memory_allocated`; CPU: peak-RSS rise in a fresh process). "
        "Ratios: time and memory divided by those of the named implementation at the same shape.",
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


def _write_results(config) -> None:
    out_dir = config.getoption("vpo_results", default=None)
    bs = getattr(config, "_benchmarksession", None)
    if not out_dir or bs is None:
        return
    device = _device_info()
    name = config.getoption("vpo_results_name") or _slug(device["name"])
    opts = {k: bs.options.get(k) for k in ("min_rounds", "max_time", "min_time", "warmup", "warmup_iterations")
            if k in bs.options}
    data = {
        "device": device,
        "versions": _versions(),
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["pytest", *sys.argv[1:]]),
        "benchmark_options": opts,
        "benchmarks": [b.as_dict(include_data=True) for b in bs.benchmarks if not b.has_error and b.stats],
        "skipped": list(_SKIPS),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(_markdown(data))


_SKIPS: list = []  # {"test", "reason"} of every skipped benchmark, for the results files


def pytest_runtest_logreport(report):
    if report.skipped and str(report.fspath).startswith(HERE + os.sep) and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the benchmark fixture hands its stats to the session during teardown
    if _in_benchmarks(item):
        _write_results(item.config)


def pytest_sessionfinish(session, exitstatus):
    _write_results(session.config)
