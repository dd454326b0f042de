"""The `vpo` command line: the README's main job runs, and what it prints is right."""
import re
import subprocess
import sys

import pytest

VPO = [sys.executable, "-m", "vpo.cli"]


def _run(*args, timeout=300):
    return subprocess.run([*VPO, *args], capture_output=True, text=True, timeout=timeout)


def test_demo_quick_fused_equals_oracle_and_training_improves():
    res = _run("demo", "--quick", "--impl", "torch")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    rows = dict(re.findall(r"^(dpo|tpo)\s+(\S+\s+\S+\s+\S+)$", out, flags=re.M))
    assert set(rows) == {"dpo", "tpo"}, out
    for name, cols in rows.items():
        fused, oracle, err = (float(x) for x in cols.split())
        assert abs(fused - oracle) < 1e-10 and err < 1e-10, (name, cols)
    curves = re.findall(r"^(dpo|tpo)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", out, flags=re.M)
    assert len(curves) == 2, out
    for name, l0, l1, m0, m1, acc in curves:
        assert float(l1) < float(l0) and float(m1) > float(m0), (name, l0, l1, m0, m1)


def test_info_lists_availability():
    res = _run("info")
    assert res.returncode == 0, res.stderr
    for key in ("cpp", "cuda_ext", "cuda_device", "triton"):
        assert re.search(rf"^\s+{key}\s+(True|False)$", res.stdout, flags=re.M), res.stdout


def test_help_lists_every_subcommand():
    res = _run("--help")
    assert res.returncode == 0
    for cmd in ("demo", "info", "train", "precompute-ref", "csr", "lpoi-lists", "mdpo-crops"):
        assert cmd in res.stdout


@pytest.mark.parametrize("args", [["demo", "--impl", "fast"], ["nope"]])
def test_bad_arguments_exit_nonzero_with_a_message(args):
    res = _run(*args)
    assert res.returncode == 2 and "invalid choice" in res.stderr
