"""``python -m benchmarks.cpu_side_by_side``: runs, times both paths, and the two agree (no timing is asserted)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_side_by_side_quick(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_side_by_side", "--quick", "--rounds", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.with_suffix(".json").read_text())
    assert set(r["times"]) == {"fused", "materialized"} and all(len(v["all_s"]) == 2 for v in r["times"].values())
    assert r["agreement"]["loss_abs_diff"] < 1e-5 and r["agreement"]["grad_W_max_abs_diff"] < 1e-4
    assert r["peak_extra_bytes"]["fused"] > 0 and r["peak_extra_bytes"]["materialized"] > 0
    md = out.with_suffix(".md").read_text()
    assert "(measured)" in md and "fused / materialized" in md and r["machine"]["torch"] in md
    assert r["machine"]["cpu"] and r["machine"]["cpu"] in md  # the device is named


def test_rounds_must_be_positive():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_side_by_side", "--rounds", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--rounds" in proc.stderr
