"""benchmarks/_report.summary and benchmarks/_cases.reference_of: the summary table's ratios and columns."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
_report = pytest.importorskip("_report")
_cases = pytest.importorskip("_cases")


def _bench(bench, impl, ms, mib, shape="s1"):
    return {"extra_info": {"bench": bench, "impl": impl, "shape": shape, "shape_id": shape, "peak_mib": mib},
            "stats": {"median": ms / 1e3}}


def test_summary_ratios_and_optional_columns():
    rows = [_bench("linear_logprobs", "torch", 30.0, 10.0), _bench("linear_logprobs", "naive", 20.0, 40.0),
            _bench("linear_logprobs", "floor", 10.0, 20.0), _bench("fused_losses", "tpo/torch", 50.0, 5.0),
            _bench("fused_losses", "tpo/naive", 100.0, 50.0), _bench("fused_losses", "dpo/floor", 25.0, 30.0),
            _bench("linear_logprobs", "torch", 1.0, 1.0, shape="s2")]
    lines = _report.summary({"benchmarks": rows, "inputs": {"stats": {}}})
    head = lines[0]
    assert "vs materialized logits" in head and "vs GEMM floor" in head
    assert "Liger" not in head and "Cut Cross-Entropy" not in head  # not measured: no columns
    assert any("No Liger / Cut Cross-Entropy columns" in ln for ln in lines)
    by = {tuple(c.strip() for c in ln.split("|")[1:4]): ln for ln in lines if ln.startswith("| ")}
    assert "| 1.5× / 0.25× | 3× / 0.5× |" in by[("linear_logprobs", "s1", "torch")]
    assert "| 0.5× / 0.1× | 2× / 0.167× |" in by[("fused_losses", "s1", "tpo/torch")]
    assert by[("linear_logprobs", "s2", "torch")].endswith("| — | — |")  # no baseline at that shape

    lines = _report.summary({"benchmarks": rows + [_bench("linear_logprobs", "cce", 15.0, 4.0)], "inputs": {}})
    assert "vs Cut Cross-Entropy" in lines[0] and "Liger" not in lines[0]
    assert "| 2× / 2.5× |" in [ln for ln in lines if "| torch |" in ln and "| s1 |" in ln][0]


def test_reference_of():
    assert _cases.reference_of("linear_logprobs", "gemm") == {
        "materialized": ("linear_logprobs", "naive"), "floor": ("linear_logprobs", "floor"),
        "liger": ("linear_logprobs", "liger-flce"), "cce": ("linear_logprobs", "cce")}
    assert _cases.reference_of("linear_logprobs", "naive")["materialized"] is None  # not itself
    assert _cases.reference_of("catpo", "dpo/torch")["floor"] == ("fused_losses", "dpo/floor")
    assert _cases.reference_of("token_kl", "kl/gemm")["materialized"] == ("token_kl", "kl/naive")
    assert _cases.reference_of("attention_stats", "qk/torch")["materialized"] == ("attention_stats", "eager")
