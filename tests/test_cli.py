"""The `vpo` command line: the README's main job runs, and what it prints is right."""
import re
import subprocess
import sys

import pytest

VPO = [sys.executable, "-m", "vpo.cli"]


def _run(*args, timeout=300):
    return subprocess.run([*VPO, *args], capture_output=True, text=True, timeout=timeout)


def test_demo_help_lists_its_options():
    # The quick demo itself runs end to end in tests/test_demo.py.
    res = _run("demo", "--help")
    assert res.returncode == 0, res.stderr
    for opt in ("--quick", "--out", "--seed", "--methods", "--steps", "--sft-steps", "--threads", "--impl"):
        assert opt in res.stdout


def test_info_lists_availability():
    res = _run("info")
    assert res.returncode == 0, res.stderr
    for key in ("cpp", "cuda_ext", "cuda_device", "triton"):
        assert re.search(rf"^\s+{key}\s+(True|False)$", res.stdout, flags=re.M), res.stdout


def test_help_lists_every_subcommand():
    res = _run("--help")
    assert res.returncode == 0
    for cmd in ("demo", "eval", "visualize", "info", "train", "precompute-ref", "csr", "lpoi-lists", "mdpo-crops"):
        assert cmd in res.stdout


@pytest.mark.parametrize("args", [["demo", "--impl", "fast"], ["nope"], ["visualize", "pictures"]])
def test_bad_arguments_exit_nonzero_with_a_message(args):
    res = _run(*args)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_demo_rejects_unknown_methods():
    res = _run("demo", "--methods", "tpo,ppo")
    assert res.returncode == 2 and "--methods" in res.stderr
