"""Every Triton kernel in ``vpo_kernels`` compiles for sm_80 and sm_90 ahead of time, without a GPU (issue 10, item 4).

The kernel list and configs are ``vpo_kernels._aot.KERNELS`` (a new kernel is one line there; the last test below fails
when a ``@triton.jit`` kernel is missing from it). ``python -m vpo_kernels._aot`` compiles, in a subprocess with
``TRITON_INTERPRET=0`` (the interpreter replaces the kernels at import), each kernel's pinned configs (every dtype the
launchers pin) on both architectures and, of its ``VPO_AUTOTUNE=1`` configs, the riskiest (most shared memory, then
fewest warps) on sm_90 — or, with ``VPO_AOT_FULL=1``, every autotune config on both architectures (~130 compilations:
not in the CI budget) — with the installed Triton and the ptxas in its wheel. A test per kernel and architecture fails
on:

- a compile error (Triton or ptxas);
- register spills: the stack frame / local memory in the cubin's resource usage (``cuobjdump --dump-resource-usage``;
  ptxas spills there), beyond the kernel's ``known_spills`` entry in ``_aot.py`` (listed debt; a warning);
- shared memory above the architecture's limit (sm_80: 163 KiB, sm_90: 227 KiB per block);
- a 16-bit ``tl.dot`` kernel whose sm_90 PTX has no ``wgmma`` (it would run on the older mma.sync path).

Cost: ~40 compilations, 2 workers: a few minutes on 2 cores from a cold ``~/.triton/cache``, seconds when cached.
"""
import json
import os
import warnings
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
_aot = pytest.importorskip("vpo_kernels._aot")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    try:
        from triton.backends.nvidia.compiler import knobs

        if not os.path.exists(knobs.nvidia.ptxas.path):
            pytest.skip("the triton wheel has no ptxas")
    except Exception as e:  # pragma: no cover - a triton without the NVIDIA backend
        pytest.skip(f"triton's NVIDIA backend is unavailable: {e}")
    out = tmp_path_factory.mktemp("aot") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    cmd = [sys.executable, "-m", "vpo_kernels._aot", "--out", str(out), "--workers", str(os.cpu_count() or 1)]
    if os.environ.get("VPO_AOT_FULL") == "1":
        cmd.append("--full")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())["results"]


def _fmt(r):
    return f"{r['kernel']} [{r['label']}, {r['dtype']}, sm_{r['arch']}]"


@pytest.mark.parametrize("arch", _aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("kernel", [k.name for k in _aot.KERNELS])
def test_compiles_without_spills_within_shared_memory(results, kernel, arch):
    mine = [r for r in results if r["kernel"] == kernel and r["arch"] == arch]
    assert mine, f"no compilation of {kernel} for sm_{arch}"
    assert any(r["label"] == "pinned" for r in mine), f"{kernel}: the pinned config was not compiled for sm_{arch}"
    problems = []
    for r in mine:
        if not r["ok"]:
            problems.append(f"{_fmt(r)}: compile error: {r['error']}")
            continue
        if r["spill_bytes"] > r["spill_allowed"]:
            problems.append(f"{_fmt(r)}: spills {r['spill_bytes']} B/thread to the stack ({r['regs']} registers); "
                            f"known_spills allows {r['spill_allowed']}")
        elif r["spill_bytes"] > 0:
            warnings.warn(f"{_fmt(r)}: known spill of {r['spill_bytes']} B/thread (vpo_kernels/_aot.py known_spills)")
        if r["shared"] > _aot.SMEM_LIMIT[arch]:
            problems.append(f"{_fmt(r)}: {r['shared']} B shared memory > the {_aot.SMEM_LIMIT[arch]} B limit")
        if r["wgmma_required"] and not r["has_wgmma"]:
            problems.append(f"{_fmt(r)}: no wgmma in the sm_90 PTX of a 16-bit tl.dot kernel")
    assert not problems, "\n".join(problems)


def test_every_kernel_is_registered():
    """Every ``@triton.jit`` function named ``*_kernel`` in vpo_kernels/ is in ``_aot.KERNELS``."""
    found = set()
    for path in (ROOT / "vpo_kernels").glob("*.py"):
        for name in re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()):
            found.add(f"{path.stem}.{name}")
    registered = {k.name for k in _aot.KERNELS}
    assert found and found <= registered, f"not in vpo_kernels/_aot.py KERNELS: {sorted(found - registered)}"
