"""The benchmarks' entry point: :func:`prepare` turns a :class:`Case` into a ``step()`` and :func:`run_benchmark`
measures it (warm-up, peak memory, timed rounds, ratios, a progress line).

The machinery lives in its seams and is re-exported here, so ``bench_*.py`` write ``H.<name>``:

- ``_shapes.py``: :class:`Shape`, :class:`AttnShape` and the shape tables per device;
- ``_cases.py``: :class:`Case`, the implementations per family with their baselines, targets, FLOP counts;
- ``_lmhead.py``: peaked inputs (``vpo.testing.make_peaked_head_inputs``), the materialized baselines, the GEMM
  floors, one fwd+bwd step per LM-head implementation;
- ``_attention.py``: image-attention statistics steps;
- ``_memory.py``: peak memory (CUDA allocator statistics; on CPU the peak-RSS rise in a worker process);
- ``_report.py``: the results files and the terminal summary table.

Timing: pytest-benchmark's ``pedantic`` mode, after one untimed warm-up step (Triton JIT, cuBLAS workspaces,
``torch.compile`` in Liger) and the peak-memory step: ``rounds`` = what fits ``VPO_BENCH_ROUND_S`` seconds
(default 1 s) at the warm-up's speed, at least 2 (3 on CUDA) and at most 20. Speed is measured, never
asserted.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Callable, Dict

import torch

from _attention import attention_prepare, image_positions  # noqa: F401
from _cases import (BASELINES, CUDA_ONLY_REASON, OPTIONAL_MODULE, TARGETS, Case, Target,  # noqa: F401
                    Unavailable, cases, cuda_only, flops, reference_of)
from _lmhead import (ENTROPY, INPUT_STATS, _require_kernels, clear_inputs, fused_step, inputs,  # noqa: F401
                     linear_step, naive_logprobs, naive_token_kl, token_kl_step)
from _memory import _proc_status_kib, _reset_peak_rss, cpu_peak_rss, cuda_peak_mib, peak_memory_mib  # noqa: F401
from _shapes import (ATTN_CPU_SHAPES, ATTN_GPU_SHAPES, ATTN_SHAPES, CPU_SHAPES, DEVICE, E2E_SHAPES,  # noqa: F401
                     GPU_SHAPES, MEMORY_SHAPE, MEMORY_TARGET_RATIO, SHAPE_ORDER, SHAPES, AttnShape, MiB, Shape,
                     _short)

ROUND_S = float(os.environ.get("VPO_BENCH_ROUND_S", "1.0"))
REPORTER = None  # pytest's terminal reporter (conftest.py sets it): progress lines while the run goes
CAPTURE = None  # pytest's capture manager: progress lines bypass the output capture of the running test


def prepare(case: Case, device: str = DEVICE, *, cache: bool = True) -> Callable[[], None]:
    """``step()`` running one fwd+bwd of ``case`` on cached inputs (synchronized on CUDA)."""
    if case.bench in ("attention_stats", "attention_e2e"):
        return attention_prepare(case, device)
    x = inputs(case.shape, device, cache=cache)
    if case.bench in ("linear_logprobs", "memory"):
        return linear_step(case.impl, x, device)
    if case.bench in ("fused_losses", "catpo"):
        return fused_step(case.impl, x, device)
    if case.bench == "token_kl":
        return token_kl_step(case.impl, x, device)
    raise ValueError(f"unknown bench {case.bench!r}")


def progress(text: str) -> None:
    """One line on the terminal now (not captured), when running under pytest."""
    if REPORTER is None:
        return
    import contextlib

    with CAPTURE.global_and_fixture_disabled() if CAPTURE is not None else contextlib.nullcontext():
        REPORTER.write_line(text)
        REPORTER.flush()  # stdout may be a file or a pipe: show it now


def rounds_for(seconds: float) -> int:
    low = 3 if DEVICE == "cuda" else 2
    return max(low, min(20, int(ROUND_S / max(seconds, 1e-6))))


def run_benchmark(benchmark, case: Case) -> None:
    """Warm up, measure peak memory, time ``step()`` with pytest-benchmark, and fill ``benchmark.extra_info``.

    Skips (never fails) when the implementation cannot run here (CUDA-only on CPU, a missing optional package, an
    ``impl`` this vpo does not have) or runs out of device memory; other errors fail the benchmark.
    """
    import pytest

    if DEVICE != "cuda" and cuda_only(case.impl):
        pytest.skip(CUDA_ONLY_REASON)
    if case.impl in OPTIONAL_MODULE:
        pytest.importorskip(OPTIONAL_MODULE[case.impl])
    benchmark.group = f"{case.bench} {case.shape.label}"
    time_base, mem_base = BASELINES[case.bench][case.impl]
    info = benchmark.extra_info
    info.update(bench=case.bench, impl=case.impl, shape=case.shape.label, shape_id=case.shape.id,
                shape_params=asdict(case.shape), flops=flops(case), time_baseline=time_base,
                memory_baseline=mem_base)
    t_start = time.perf_counter()
    try:
        step = prepare(case)
        t0 = time.perf_counter()
        step()  # warm-up: Triton JIT/autotune, cuBLAS workspace, torch.compile (Liger)
        warm = time.perf_counter() - t0
        peak, method = peak_memory_mib(case, step)
        info.update(peak_mib=peak, memory_method=method)
        if INPUT_STATS.get(case.shape.label):
            info["input_stats"] = INPUT_STATS[case.shape.label]
        benchmark.pedantic(step, rounds=rounds_for(warm), iterations=1, warmup_rounds=0)
    except Unavailable as e:
        pytest.skip(str(e))
    except ImportError as e:  # an optional package that imports but lacks the entry point this version expects
        pytest.skip(f"{case.impl}: {e}")
    except torch.cuda.OutOfMemoryError as e:
        step = None
        clear_inputs()
        pytest.skip(f"CUDA out of memory: {str(e).splitlines()[0]}")
    median = None
    if benchmark.stats:  # None under --benchmark-disable (one untimed call)
        median = benchmark.stats.stats.median
        info.update(tflops=flops(case) / median / 1e12, median_s=median)
    _link_ratios(case, info)
    progress(f"  {case.bench} {case.shape.id} {case.impl}: "
             f"{'—' if median is None else f'{median * 1e3:.4g} ms'} median of "
             f"{benchmark.stats.stats.rounds if benchmark.stats else 1}, peak {info.get('peak_mib', float('nan')):.1f} "
             f"MiB ({time.perf_counter() - t_start:.1f} s)")


# (bench, shape) -> impl -> the live ``extra_info`` dict of every benchmark measured so far in this session.
_MEASURED: Dict[tuple, Dict[str, dict]] = {}


def _link_ratios(case: Case, info: dict) -> None:
    """Fill ``time_ratio`` / ``memory_ratio`` (over the baselines named in ``BASELINES``, same shape) and, where a
    :data:`TARGETS` entry applies, ``target`` / ``target_met``, in this benchmark's ``extra_info`` and in those of the
    same shape measured before it whose baseline it is (the dicts are pytest-benchmark's own, written out later)."""
    peers = _MEASURED.setdefault((case.bench, case.shape), {})
    peers[case.impl] = info
    for impl, e in peers.items():
        time_base, mem_base = BASELINES[case.bench][impl]
        t, m = peers.get(time_base), peers.get(mem_base)
        if t is not None and e.get("median_s") and t.get("median_s"):
            e["time_ratio"] = e["median_s"] / t["median_s"]
        if m is not None and e.get("peak_mib") is not None and (m.get("peak_mib") or 0) > 0:
            e["memory_ratio"] = e["peak_mib"] / m["peak_mib"]
        target = TARGETS.get((case.bench, impl))
        if target is not None and target.applies(case.shape):
            e["target"] = str(target)
            if e.get(target.metric) is not None:
                e["target_met"] = target.met(e[target.metric])
