"""Per-token log-probs under the LM head, forward + backward: vpo's GEMM-bound (``impl="gemm"``), fused Triton and
chunked-torch paths against the materializing PyTorch code (``naive``), Liger's fused linear cross-entropy, Cut
Cross-Entropy (both when installed) and the floor, the three plain GEMMs every implementation must do (``h·Wᵀ``, ``dz·W``, ``dzᵀ·h``; 6·N·D·V FLOPs).

GPU: LLaVA-1.5 (D=4096, V=32064) and Qwen2-VL (D=3584, V=152064) heads, N ∈ {2048, 8192, 16384} tokens, bf16.
CPU: small fp32 shapes (see ``_harness.CPU_SHAPES``). Each benchmark records ``tflops``, ``peak_mib`` (the step's peak
over its inputs) and what it is compared with in ``benchmark.extra_info``; speed is measured, never asserted.

``test_memory_vs_naive`` is the project's memory target: the torch path's peak at N=2048, V=98304, D=128 (fp32)
against the materialized one's (target <= 0.1x). The materialized side allocates ~2.3 GiB; the test runs only with
``--benchmark-only``.
"""
import pytest

import _harness as H


@pytest.mark.parametrize("case", H.cases("linear_logprobs"), ids=lambda c: c.id)
def test_linear_logprobs(benchmark, case):
    H.run_benchmark(benchmark, case)


@pytest.mark.vpo_heavy
def test_memory_vs_naive(benchmark):
    """Peak memory of one fwd+bwd, torch path vs naive, at the target shape; times the torch path once."""
    shape = H.MEMORY_SHAPE
    torch_case, naive_case = H.Case("memory", "torch", shape), H.Case("memory", "naive", shape)
    benchmark.group = f"memory {shape.label}"
    if H.DEVICE == "cuda":
        naive_step = H.prepare(naive_case)
        naive_step()
        naive_peak, method = H.peak_memory_mib(naive_case, naive_step)
        del naive_step
        torch_step = H.prepare(torch_case)
        torch_step()
        torch_peak, _ = H.peak_memory_mib(torch_case, torch_step)
        naive_s = None
    else:  # each in its own fresh process (peak RSS); the time is the worker's single step
        naive = H.cpu_peak_rss(naive_case)
        tr = H.cpu_peak_rss(torch_case)
        naive_peak, torch_peak, method, naive_s = naive["peak_mib"], tr["peak_mib"], tr["method"], naive["seconds"]
        torch_step = H.prepare(torch_case)
    ratio = torch_peak / naive_peak if naive_peak > 0 else float("nan")
    benchmark.extra_info.update(
        bench="memory", impl="torch vs naive", shape=shape.label, shape_params=H.asdict(shape),
        flops=H.flops(torch_case), peak_mib=torch_peak, naive_peak_mib=naive_peak, memory_ratio=ratio,
        target_ratio=H.MEMORY_TARGET_RATIO, memory_method=method, naive_seconds=naive_s,
    )
    benchmark.pedantic(torch_step, rounds=1, iterations=1, warmup_rounds=0)
    if benchmark.stats:
        benchmark.extra_info["tflops"] = H.flops(torch_case) / benchmark.stats.stats.median / 1e12
    H.clear_inputs()
