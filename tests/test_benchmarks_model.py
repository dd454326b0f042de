"""``python -m benchmarks.model``: the performance model runs, counts what it says, and labels itself a model.

The full run (two heads × two N at real shapes, ~1 min on meta) is left to the command line; here ``--quick`` (one tiny
head, every path) and one path at the real Qwen2.5-VL-7B head, checked against the FLOPs a DPO step must do.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import model  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.model", "--quick", "--json", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    return proc, json.loads(path.read_text())


def test_quick_run_prints_every_path_as_a_model(quick):
    proc, data = quick
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    headers = [ln for ln in out.splitlines() if ln.startswith("#")]
    assert headers and all("model" in h for h in headers), headers
    for path in ("materialized", "vpo DPO", "vpo TPO", "vpo Cat-PO", "Liger DPO"):
        assert f"| {path} |" in out, path
    for gpu in ("A100", "H100", "H200"):
        assert gpu in out
    assert "spec-sheet" in out and "assumed" in out
    assert data["text"].strip() == out.strip()


def test_quick_run_counts_four_gemm_passes_for_every_traced_path(quick):
    _, data = quick
    traced = [r for r in data["results"] if "error" not in r]
    assert {r["path"] for r in traced} >= {"materialized", "vpo DPO", "vpo TPO", "vpo Cat-PO"}
    for r in traced:
        assert r["gemm_flops"] == pytest.approx(8 * r["N"] * r["D"] * r["V"], rel=0.01), r["path"]
        assert r["launches"] > 0 and r["other_bytes"] > 0 and r["peak_bytes"] > 0
        # the estimate is never below its own GEMM term at the slowest GPU's assumed rate
        gemm_ms = 1e3 * r["gemm_flops"] / (model.GPUS["A100"]["bf16_tflops"] * 1e12 * model.GEMM_EFF)
        assert r["est_ms"]["A100"] >= gemm_ms
    liger = [r for r in data["results"] if r["path"] == "Liger DPO"]
    assert liger and (model.liger_status() is None or liger[0]["error"] == "not installed")


def test_materialized_path_holds_its_logits_at_a_real_head():
    """At the Qwen2.5-VL-7B head the materialized path keeps [N, V] logits: its peak is at least the fp32 log-softmax
    output (4·N·V bytes), and it moves many more non-GEMM bytes per logit than the fused DPO's bound."""
    D, V = model.HEADS["Qwen2.5-VL-7B"]
    N = 2048
    c = model.count_path("materialized", D, V, N)
    assert c.gemm_flops == pytest.approx(8 * N * D * V, rel=0.01)
    assert c.peak_bytes >= 4 * N * V
    assert c.other_bytes > 18 * N * V


def test_estimate_is_monotone_in_each_cost():
    base = {"gemm_flops": 1e15, "gemm_bytes": 1e9, "other_bytes": 1e10, "launches": 100}
    for gpu in model.GPUS.values():
        t = model.estimate_ms(base, gpu)
        for k in base:
            assert model.estimate_ms({**base, k: base[k] * 2}, gpu) >= t
        assert model.estimate_ms({**base, "other_bytes": 2e10}, gpu) > t
