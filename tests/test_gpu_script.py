"""benchmarks/run_gpu.sh and its driver (benchmarks/gpu_ab.py), tested without a GPU.

The script runs once, on a lent GPU, with no second chance; here it runs in its CPU smoke mode (``VPO_GPU_SMOKE=1``:
no install, tiny CPU shapes, the Triton paths that the interpreter runs in seconds, ``pytest -m gpu`` on one file),
with one path made to fail and one made to fail as if the CUDA context were poisoned, and must still finish, write
at most 6 files, and name the device in its report.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "run_gpu.sh")


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    text = open(SCRIPT).read()
    assert "python3" in text and "--no-build-isolation --no-deps" in text
    assert "TRITON_INTERPRET" in text  # unset on the GPU, set only for the smoke mode


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-out")
    env = {**os.environ, "OUT": str(out), "VPO_GPU_SMOKE": "1", "VPO_GPU_AB_FAIL": "naive",
           "VPO_GPU_AB_POISON": "catpo/gemm"}
    bindir = os.path.dirname(sys.executable)  # the script calls `python3`: make it this interpreter
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return out, proc


def test_smoke_run_writes_few_files_and_names_the_device(smoke_run):
    out, proc = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 6, files
    assert {"gpu-report.md", "gpu-results.json", "run.log", "install.log", "pytest-gpu.log"} <= set(files), files
    report = (out / "gpu-report.md").read_text()
    assert report.startswith("# vpo GPU A/B on CPU smoke test on ")
    assert "timings meaningless" in report
    assert "## pytest -m gpu" in report and "## Results" in report
    for stage in ("install", "lmhead", "losses", "pytest -m gpu", "extras"):
        assert f"- {stage}: rc " in report, stage


def test_smoke_run_measures_every_stage_and_survives_failures(smoke_run):
    out, _ = smoke_run
    data = json.loads((out / "gpu-results.json").read_text())
    res = data["results"]
    got = {(r["family"], r["N"], r["requested"]) for r in res}
    for family, impl in [("linear_logprobs", "floor"), ("linear_logprobs", "gemm"), ("fused_losses", "dpo/naive"),
                         ("fused_losses", "tpo/gemm"), ("catpo", "catpo/naive"), ("attention_stats", "eager"),
                         ("token_kl", "kl/naive")]:
        assert any(k[0] == family and k[2] == impl for k in got), (family, impl)
    ok = [r for r in res if "median_ms" in r]
    assert all(r["median_ms"] > 0 and r["reps"] >= 1 and r["tflops"] > 0 for r in ok)
    # the injected failure is recorded and the stage went on past it
    failed = [r for r in res if r["requested"] == "naive"]
    assert failed and all("injected failure" in r["error"] for r in failed)
    assert any(r["requested"] == "gemm" and "median_ms" in r for r in res if r["family"] == "linear_logprobs")
    # the "poisoned" path ended its process (exit 3); the stage was started again and finished the rest once
    poisoned = [r for r in res if r["requested"] == "catpo/gemm"]
    assert len(poisoned) == 1 and "poisoned" in poisoned[0]["error"]
    after = res[res.index(poisoned[0]) + 1:]
    assert {r["family"] for r in after if "median_ms" in r} >= {"attention_stats", "token_kl"}
    assert len(got) == len(res)  # nothing measured twice across the restart
    # the vpo paths were checked against the materialized values where those exist (gemm vs naive: naive failed here,
    # so the check ran for the fused DPO loss)
    checks = [r["check_vs_materialized"] for r in res if r.get("check_vs_materialized")]
    assert checks and all(c["max_abs_diff_value"] < 1e-3 and c["rel_diff_grad_weight"] < 1e-3 for c in checks)
    stats = list(data["inputs"].values())
    assert stats and all(0.5 < s["mean_entropy"] < 3.0 for s in stats)


def test_smoke_run_puts_the_model_next_to_the_measurements(smoke_run):
    """The performance model (python -m benchmarks.model, run in the background) lands in model.json, is printed in
    run.log, and the report has one row per modeled path and N with the measured time beside the model's."""
    out, _ = smoke_run
    model = json.loads((out / "model.json").read_text())
    assert {r["path"] for r in model["results"] if "est_ms" in r} >= {"materialized", "vpo DPO", "vpo TPO"}
    assert "roofline estimate, not a measurement" in (out / "run.log").read_text()
    report = (out / "gpu-report.md").read_text()
    assert "- model: rc 0" in report and "## Model vs measurement" in report
    section = report.split("## Model vs measurement", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| 32 | vpo DPO |") or ln.startswith("| 64 | vpo DPO |")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[2]) > 0 and float(cells[4]) > 0  # model ms and measured ms, side by side


def test_a_hung_case_is_named_in_the_report(tmp_path):
    """A case killed by its stage's timeout (a hang) is recorded as interrupted (a rerun skips it) and reported."""
    import time

    driver = os.path.join(ROOT, "benchmarks", "gpu_ab.py")
    env = {**os.environ, "VPO_GPU_AB_HANG": "floor", "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, driver, "--cpu-smoke", "run", "--stage", "lmhead", "--out", str(tmp_path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = tmp_path / "gpu-results.json"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until the driver sits in the hanging case, then kill it like `timeout`
            if results.exists() and (json.loads(results.read_text()).get("in_progress") or {}).get("impl") == "floor":
                break
            time.sleep(0.2)
        else:
            pytest.fail("the driver never reached the hanging case")
    finally:
        proc.kill()
        proc.wait()
    subprocess.run([sys.executable, driver, "--cpu-smoke", "report", "--out", str(tmp_path)], check=True)
    report = (tmp_path / "gpu-report.md").read_text()
    assert "## Interrupted" in report and "linear_logprobs N=32 floor" in report
