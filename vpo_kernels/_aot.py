"""Every Triton kernel in ``vpo_kernels``, compiled ahead of time for real GPUs without one (``tests/test_aot_compile.py``).

:data:`KERNELS` is the one list: a new kernel is one :class:`AotKernel` line here (its module and name, the dtypes of
its pointer and scalar arguments, and a function giving its configs). For each kernel, architecture (sm_80, sm_90) and
config — the pinned one of every dtype the launchers use, and each ``VPO_AUTOTUNE=1`` config (all of them with
``--full``; by default the riskiest one, see :func:`jobs`) —
:func:`compile_one` runs ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))``
(ptxas ships in the triton wheel) and reports what the test checks: compile errors, register spills (the stack frame
and local memory in the cubin's resource usage, read with the wheel's ``cuobjdump``: ptxas spills registers there, and
Triton kernels use the stack for nothing else), shared memory (``metadata.shared``) and, for a bf16
``tl.dot`` kernel on sm_90, whether its PTX uses ``wgmma``.

Compilation needs real ``JITFunction`` objects, which ``TRITON_INTERPRET=1`` replaces at import time, so the test runs
``python -m vpo_kernels._aot`` in a subprocess with ``TRITON_INTERPRET=0``. Triton caches what it compiled in
``~/.triton/cache``: reruns are fast.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # dynamic shared memory per block (bytes)
ARCHS = (80, 90)
_TL = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass(frozen=True)
class Variant:
    """One compilation: ``label`` ("pinned" or "autotune<i>"), input dtype, constexprs, launch options."""

    label: str
    dtype: str  # "bf16" | "fp16" | "fp32": the type of the "in" pointers
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    wgmma: bool  # a 16-bit tl.dot kernel: its sm_90 PTX must use wgmma


@dataclass(frozen=True)
class AotKernel:
    """A kernel: ``module.attr``; ``pointers`` maps a ``*_ptr`` argument to its element type ("in" = the variant's
    input dtype, the default; else "fp32", "i64", "i32", "i8"); ``scalars`` maps a scalar argument to its type (default
    "i32"); ``variants()`` lists its configs (evaluated only in the compile subprocess, where ``TRITON_INTERPRET=0``)."""

    module: str
    attr: str
    variants: Callable[[], List[Variant]]
    pointers: Dict[str, str] = field(default_factory=dict)
    scalars: Dict[str, str] = field(default_factory=dict)
    # Known register spills, bytes per thread allowed for any config of this kernel: {(dtype, arch): bytes}. Debt, not
    # a target: the test fails when a spill grows past its entry and warns while one is listed. See KNOWN_SPILLS_WHY.
    known_spills: Dict[Tuple[str, int], int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.module.rsplit('.', 1)[-1]}.{self.attr}"

    def fn(self):
        return getattr(importlib.import_module(self.module), self.attr)

    def signature(self, v: Variant) -> Dict[str, str]:
        sig = {}
        for arg in self.fn().arg_names:
            if arg in v.constexprs:
                sig[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                t = self.pointers.get(arg, "in")
                sig[arg] = "*" + (_TL[v.dtype] if t == "in" else t)
            else:
                sig[arg] = self.scalars.get(arg, "i32")
        return sig


def _autotune_variants(configs, base: Dict[str, object], dtype: str, wgmma: bool) -> List[Variant]:
    return [Variant(f"autotune{i}", dtype, {**base, **c.kwargs}, c.num_warps, c.num_stages, wgmma)
            for i, c in enumerate(configs)]


# ----------------------------------------------------------------------------------------------------------------------
# The kernels and their configs. Shapes for the shape-dependent pinned configs: a Qwen2-VL-7B-like head.
# ----------------------------------------------------------------------------------------------------------------------

_N, _V, _D = 16384, 152064, 3584
_TORCH = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _torch_dtype(d):
    import torch

    return getattr(torch, _TORCH[d])


def _logprobs_variants(which: str) -> List[Variant]:
    from vpo_kernels import linear_logprobs as m

    out = []
    for d in ("bf16", "fp32"):
        cfg = m.default_config(_torch_dtype(d), _N, _V, _D)
        t = cfg.sweep if which == "sweep" else cfg.bwd
        base = dict(HAS_BIAS=True, SOFTCAP=False, IEEE=d == "fp32", BLOCK_N=t.block_n, BLOCK_V=t.block_v,
                    GROUP_N=cfg.group_n)
        if which == "bwd":
            base.update(HAS_T=True, COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True)
        out.append(Variant("pinned", d, {**base, "BLOCK_D": t.block_d}, t.num_warps, t.num_stages, d != "fp32"))
        if d == "bf16":  # the soft-capped variant (tanh on the tile: more live registers)
            out.append(Variant("pinned", d, {**base, "SOFTCAP": True, "BLOCK_D": t.block_d}, t.num_warps,
                               t.num_stages, True))
            out += _autotune_variants(m.autotune_configs(), base, d, True)
    return out


def _logprobs_combine_variants() -> List[Variant]:
    from vpo_kernels import target_logits as t

    g = t.default_gather_config(_D)
    return [Variant("pinned", "bf16", dict(HAS_BIAS=True, SOFTCAP=True, BLOCK_N=g.block_n, BLOCK_D=g.block_d),
                    g.num_warps, g.num_stages, False)]


def _target_fwd_variants() -> List[Variant]:
    from vpo_kernels import target_logits as t

    g = t.default_gather_config(_D)
    return [Variant("pinned", "bf16", dict(HAS_BIAS=True, BLOCK_N=g.block_n, BLOCK_D=g.block_d), g.num_warps,
                    g.num_stages, False)]


def _target_bwd_variants() -> List[Variant]:
    from vpo_kernels import target_logits as t

    g = t.default_gather_config(_D)
    base = dict(COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True, BLOCK_N=g.block_n, BLOCK_D=g.block_d)
    return ([Variant("pinned", "bf16", base, g.num_warps, g.num_stages, False)]
            + _autotune_variants(t.autotune_configs(), base, "bf16", False))


def _kl_variants(which: str) -> List[Variant]:
    from vpo_kernels import token_kl as m

    out = []
    for d in ("bf16", "fp32"):
        cfg = m.default_config(_torch_dtype(d), _N, _V, _D)
        t = cfg.sweep if which == "sweep" else cfg.bwd
        # SHARED_W=False: the separate reference head, the larger of the two variants (four operand chunks per stage)
        base = dict(HAS_BIAS=True, HAS_REF_BIAS=True, SHARED_W=False, SOFTCAP=False, IEEE=d == "fp32",
                    BLOCK_N=t.block_n, BLOCK_V=t.block_v, GROUP_N=cfg.group_n)
        if which == "bwd":
            base.update(COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True)
        out.append(Variant("pinned", d, {**base, "BLOCK_D": t.block_d}, t.num_warps, t.num_stages, d != "fp32"))
        if d == "bf16":  # the soft-capped variant (tanh on both tiles)
            out.append(Variant("pinned", d, {**base, "SOFTCAP": True, "BLOCK_D": t.block_d}, t.num_warps,
                               t.num_stages, True))
            out += _autotune_variants(m.autotune_configs(), base, d, True)
    return out


def _kl_combine_variants() -> List[Variant]:
    from vpo_kernels import token_kl as m

    cfg = m.default_config(_torch_dtype("bf16"), _N, _V, _D)
    return [Variant("pinned", "bf16", dict(HAS_LABELS=True, BLOCK_N=cfg.block_n_combine), 4, 2, False)]


def _attention_variants(which: str) -> List[Variant]:
    from vpo_kernels import attention_stats as a

    cfg = a.default_qk_stats_config(128)
    base = dict(HAS_QPOS=True, HAS_MASK=True, CAUSAL=True, DOT_PRECISION="tf32", BLOCK_Q=cfg.block_q, BLOCK_D=128)
    base.update(BLOCK_K=cfg.block_k) if which == "lse" else base.update(BLOCK_P=cfg.block_p)
    return [Variant("pinned", "bf16", base, cfg.num_warps, cfg.num_stages, True)]


def _tile_variants(kernel: str) -> List[Variant]:
    """The contract epilogue's kernels at their pinned config with every optional input and flag on (the most live
    registers): tiles fp32 (the GEMM's output), bias slices and dz in each input dtype."""
    from vpo_kernels import epilogue as e

    cfg = e.default_epilogue_config()
    base = dict(HAS_BIAS=True, HAS_REF_BIAS=True, SOFTCAP=True, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c)
    if kernel == "stats":
        base.update(HAS_REF=True, ENTROPY=True, MEAN=True, SUMSQ=True)
    else:
        base.update(HAS_KL=True)
    return [Variant("pinned", d, base, cfg.num_warps, 2, False) for d in ("bf16", "fp16", "fp32")]


_LL, _TG, _KL = "vpo_kernels.linear_logprobs_kernels", "vpo_kernels.target_logits", "vpo_kernels.token_kl_kernels"
_AS, _EP = "vpo_kernels.attention_stats", "vpo_kernels.epilogue"
_STATS = {"order_ptr": "i64", "n_valid_ptr": "i32", "labels_ptr": "i64", "lse_ptr": "fp32", "g_ptr": "fp32",
          "t_ptr": "fp32", "e_ptr": "fp32", "m_part_ptr": "fp32", "s_part_ptr": "fp32", "part_ptr": "fp32",
          "dh_ptr": "fp32", "dw_ptr": "fp32", "db_ptr": "fp32", "logp_ptr": "fp32", "tgt_ptr": "fp32",
          "kl_ptr": "fp32", "z_ptr": "fp32"}
_ATT = {"qpos_ptr": "i64", "ipos_ptr": "i64", "kmask_ptr": "i8", "lse_ptr": "fp32", "out_ptr": "fp32"}
_TILE = {"z_ptr": "fp32", "r_ptr": "fp32", "y_ptr": "i64", "stats_ptr": "fp32", "lse_ptr": "fp32", "g_ptr": "fp32",
         "coef_ptr": "fp32", "lser_ptr": "fp32", "gkl_ptr": "fp32", "kl_ptr": "fp32"}  # b, br, dz: the input dtype
_TILE_SCALARS = {"scale": "fp32", "softcap": "fp32"}

# Known spills (Triton 3.9): _kl_bwd_kernel holds the z and r tiles, dz and two D-chunk products; no tile of the ones
# tried (tests/test_aot_compile.py's history, see the configs' comments) is clean on sm_80. _image_probs_kernel keeps
# a [64, 128] query tile and the [64, 64] accumulator over its loop on heads; 16 B at 8 warps (504 B at 4).
KERNELS: List[AotKernel] = [
    AotKernel(_LL, "_lse_partial_kernel", lambda: _logprobs_variants("sweep"), _STATS, _TILE_SCALARS),
    AotKernel(_LL, "_lse_combine_kernel", _logprobs_combine_variants, _STATS, _TILE_SCALARS),
    AotKernel(_LL, "_lse_bwd_kernel", lambda: _logprobs_variants("bwd"), _STATS, _TILE_SCALARS),
    AotKernel(_TG, "_target_logits_fwd_kernel", _target_fwd_variants, _STATS),
    AotKernel(_TG, "_target_logits_bwd_kernel", _target_bwd_variants, {**_STATS, "dh_ptr": "in"}),
    AotKernel(_KL, "_kl_partial_kernel", lambda: _kl_variants("sweep"), _STATS, _TILE_SCALARS),
    AotKernel(_KL, "_kl_combine_kernel", _kl_combine_variants, _STATS),
    AotKernel(_KL, "_kl_bwd_kernel", lambda: _kl_variants("bwd"), _STATS, _TILE_SCALARS,
              known_spills={("bf16", 80): 24}),
    AotKernel(_AS, "_qk_lse_kernel", lambda: _attention_variants("lse"), _ATT, {"scale": "fp32"}),
    AotKernel(_AS, "_image_probs_kernel", lambda: _attention_variants("probs"), _ATT,
              {"scale": "fp32", "inv_hq": "fp32"}, known_spills={("bf16", 80): 16, ("bf16", 90): 16}),
    AotKernel(_EP, "_tile_stats_kernel", lambda: _tile_variants("stats"), _TILE, _TILE_SCALARS),
    AotKernel(_EP, "_tile_grad_kernel", lambda: _tile_variants("grad"), _TILE, _TILE_SCALARS),
]


# ----------------------------------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------------------------------


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of the cubin's kernel, from the wheel's ``cuobjdump``."""
    from triton.backends.nvidia.compiler import knobs

    tool = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


@dataclass
class Result:
    kernel: str
    label: str
    dtype: str
    arch: int
    ok: bool
    error: str = ""
    shared: int = 0
    regs: int = 0
    spill_bytes: int = 0  # stack frame + local memory per thread: where ptxas puts spilled registers
    spill_allowed: int = 0  # the kernel's known_spills entry for (dtype, arch)
    wgmma_required: bool = False
    has_wgmma: bool = False
    seconds: float = 0.0


def compile_one(kernel_index: int, variant_index: int, arch: int) -> Result:
    """Compile ``KERNELS[kernel_index]``'s ``variant_index``-th config for ``sm_<arch>``."""
    k = KERNELS[kernel_index]
    return compile_variant(k, k.variants()[variant_index], arch)


def compile_variant(k: AotKernel, v: Variant, arch: int) -> Result:
    """Compile kernel ``k`` at config ``v`` for ``sm_<arch>`` (any config: also for trying new ones)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(k.name, v.label, v.dtype, arch, ok=False, wgmma_required=v.wgmma and arch == 90,
                 spill_allowed=k.known_spills.get((v.dtype, arch), 0))
    t0 = time.time()
    try:
        src = ASTSource(fn=k.fn(), signature=k.signature(v), constexprs=v.constexprs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": v.num_warps, "num_stages": v.num_stages})
        usage = _resource_usage(ck.asm["cubin"])
        res.ok = True
        res.shared = int(ck.metadata.shared)
        res.regs = usage.get("REG", 0)
        res.spill_bytes = usage.get("STACK", 0) + usage.get("LOCAL", 0)
        res.has_wgmma = "wgmma" in ck.asm["ptx"]
    except Exception as e:  # the test reports it
        res.error = f"{type(e).__name__}: {e}"[:2000]
    res.seconds = time.time() - t0
    return res


def _corner(variants: List[Variant]) -> Optional[int]:
    """Index of the autotune config most likely to exceed a limit: the most shared memory (BLOCK_D x stages), then
    the most registers per thread (fewest warps)."""
    tuned = [(i, v) for i, v in enumerate(variants) if v.label != "pinned"]
    if not tuned:
        return None
    return max(tuned, key=lambda iv: (int(iv[1].constexprs.get("BLOCK_D", 1)) * iv[1].num_stages,
                                      -iv[1].num_warps))[0]


def jobs(archs=ARCHS, full: bool = False):
    """``(kernel_index, variant_index, arch)`` of every compilation. ``full``: every config on every arch. Otherwise
    (the CI default, ~40 compilations instead of ~130): the pinned 16-bit configs on every arch, the pinned fp32 ones
    (the IEEE correctness path) on sm_90 and, of the autotune configs, the one at the corner (:func:`_corner`) on
    sm_90."""
    out = []
    for ki, k in enumerate(KERNELS):
        variants = k.variants()
        corner = _corner(variants)
        for vi, v in enumerate(variants):
            for arch in archs:
                pinned = v.label == "pinned" and (v.dtype != "fp32" or arch == 90)
                if full or pinned or (vi == corner and arch == 90):
                    out.append((ki, vi, arch))
    return out


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--archs", default="80,90")
    p.add_argument("--full", action="store_true", help="every autotune config on every arch (default: see jobs())")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run with TRITON_INTERPRET=0: the interpreter replaces the kernels that are to be compiled")
    todo = jobs(tuple(int(x) for x in a.archs.split(",")), a.full)
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=max(1, a.workers)) as pool:
        results = list(pool.map(compile_one, *zip(*todo)))
    with open(a.out, "w") as f:
        json.dump({"seconds": time.time() - t0, "results": [asdict(r) for r in results]}, f, indent=1)


if __name__ == "__main__":
    main()
