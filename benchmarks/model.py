"""A performance *model* of the DPO-family LM-head losses: counted costs and a roofline estimate, no GPU needed.

    python -m benchmarks.model                         # Qwen2.5-VL-7B and Llama-3-8B heads, N ∈ {8192, 16384}, bf16
    python -m benchmarks.model --quick                 # one tiny head: every path, in seconds (the test runs this)
    python -m benchmarks.model --head 3584,152064 --ns 4096,16384 --json model.json   # what run_gpu.sh runs

Every path runs forward + backward on the **meta device** (no data, no GPU) under ``vpo._caps.assume_cuda()``, so vpo
takes its CUDA branches (fp32-out GEMMs, the Triton epilogue custom ops), while
:class:`vpo.testing_counter.CostCounter` counts each op that reaches the dispatcher: GEMM FLOPs, GEMM bytes, other
bytes, kernel launches and the peak extra memory (live tensors allocated during the step). Paths:

* ``materialized`` — plain PyTorch DPO as a trainer writes it (TRL's ``get_batch_logps``): ``h @ Wᵀ`` in bf16, ``.float()``,
  ``log_softmax``, ``gather``, for the policy (with grad) and the reference (no grad), the sigmoid DPO loss;
* ``vpo DPO``, ``vpo TPO``, ``vpo Cat-PO`` — ``vpo.fused_dpo_loss`` / ``fused_tpo_loss`` (noised hidden states with
  grad, a reference model's clean and noised states) / ``fused_catpo_loss`` (token weights, a reference);
* ``Liger DPO`` — ``liger_kernel``'s ``LigerFusedLinearDPOLoss`` (eager, ``compiled=False``) where it imports (and
  traces on meta); "not installed" otherwise.

N = 2B·T positions, T = 1024. The roofline estimate per GPU (module constant :data:`GPUS`, spec-sheet numbers)::

    time = max(GEMM FLOPs / (peak · GEMM efficiency), GEMM bytes / HBM)  +  other bytes / HBM  +  launches · overhead

with HBM = spec bandwidth × :data:`MEM_EFF`. It is a model: it assumes every elementwise kernel streams at the same
fraction of peak bandwidth, that no kernel overlaps another, and that cuBLAS reaches the same efficiency at every
shape. It is never a measurement; ``benchmarks/run_gpu.sh`` prints it next to the measured times.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import vpo
from vpo import _caps
from vpo.testing_counter import CostCounter

T_DEFAULT = 1024
HEADS = {"Qwen2.5-VL-7B": (3584, 152064), "Llama-3-8B": (4096, 128256)}
NS = (8192, 16384)
QUICK = {"head": ("tiny", 256, 4096), "ns": (1024,), "seq": 256}
# Vendor spec-sheet values (NVIDIA A100, H100 and H200 datasheets): dense BF16 tensor-core FLOP/s (without the
# 2:4-sparsity doubling the datasheets also list) and HBM bandwidth.
GPUS = {
    "A100": {"name": "A100 SXM4 80GB", "bf16_tflops": 312.0, "hbm_tbs": 2.039},
    "H100": {"name": "H100 SXM5 80GB", "bf16_tflops": 989.0, "hbm_tbs": 3.35},
    "H200": {"name": "H200 SXM 141GB", "bf16_tflops": 989.0, "hbm_tbs": 4.8},
}
GEMM_EFF = 0.75  # assumed fraction of the peak that cuBLAS reaches on these large bf16 GEMMs
MEM_EFF = 0.85  # assumed fraction of the peak HBM bandwidth a streaming elementwise kernel reaches
LAUNCH_US = 4.0  # assumed cost of one kernel launch (launch latency + ramp of a tiny kernel), never overlapped
PATHS = ("materialized", "vpo DPO", "vpo TPO", "vpo Cat-PO", "Liger DPO")


def _meta(*shape, dtype=torch.bfloat16, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def _seq_logps(h, W, y, mask):
    """Per-sequence log-probs through full logits: TRL's get_batch_logps."""
    logits = (h @ W.T).float()
    tok = logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def materialized_dpo(W, h, y, ref_hidden, beta=0.1, ignore_index=-100):
    """The sigmoid DPO loss with [2B, T, V] logits materialized for the policy and the reference."""
    mask = y != ignore_index
    yy = torch.where(mask, y, torch.zeros_like(y))
    pol = _seq_logps(h, W, yy, mask)
    with torch.no_grad():
        ref = _seq_logps(ref_hidden, W.detach(), yy, mask)
    B = h.shape[0] // 2
    margin = beta * ((pol[:B] - ref[:B]) - (pol[B:] - ref[B:]))
    return -F.logsigmoid(margin).mean()


def _liger_dpo(W, h, y, ref_hidden):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: PLC0415  (optional dependency)

    # eager (compiled=False): a dispatch-level counter cannot see inside torch.compile's kernels, so Liger's counts are
    # those of its eager code (more launches and bytes than its compiled chunks). Inputs [2B, T, D], chosen rows first.
    loss = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True, compiled=False)
    out = loss(W, h, y, ref_input=ref_hidden, ref_weight=W.detach())
    return out[0] if isinstance(out, tuple) else out


def liger_status() -> Optional[str]:
    """None when ``liger_kernel`` imports, else "not installed"."""
    try:
        import liger_kernel.chunked_loss  # noqa: F401, PLC0415
    except ImportError:
        return "not installed"
    return None


def count_path(path: str, D: int, V: int, N: int, T: int = T_DEFAULT) -> CostCounter:
    """fwd+bwd of one path at ``[N = 2B·T positions] × D × V`` on the meta device (CUDA branches taken)."""
    B = N // (2 * T)
    if B < 1 or 2 * B * T != N:
        raise ValueError(f"N={N} is not 2·B·{T}")
    W = _meta(V, D, grad=True)
    h = _meta(2 * B, T, D, grad=True)
    y = _meta(2 * B, T, dtype=torch.long)
    hr = _meta(2 * B, T, D)
    with _caps.assume_cuda(), CostCounter() as c:
        if path == "materialized":
            loss = materialized_dpo(W, h, y, hr)
        elif path == "vpo DPO":
            loss, _ = vpo.fused_dpo_loss(W, h, y, ref_hidden=hr)
        elif path == "vpo TPO":
            loss, _ = vpo.fused_tpo_loss(W, h, _meta(2 * B, T, D, grad=True), y, ref_hidden=hr,
                                         ref_hidden_noised=_meta(2 * B, T, D))
        elif path == "vpo Cat-PO":
            loss, _ = vpo.fused_catpo_loss(W, h, y, _meta(2 * B, T, dtype=torch.float32), ref_hidden=hr)
        elif path == "Liger DPO":
            loss = _liger_dpo(W, h, y, hr)
        else:
            raise ValueError(f"unknown path {path!r}")
        loss.backward()
        del loss
    return c


def estimate_ms(c: Dict[str, float], gpu: dict) -> float:
    """The roofline estimate (module docstring) of one counted path on one GPU, in ms."""
    bw = gpu["hbm_tbs"] * 1e12 * MEM_EFF
    gemm = max(c["gemm_flops"] / (gpu["bf16_tflops"] * 1e12 * GEMM_EFF), c["gemm_bytes"] / bw)
    return 1e3 * (gemm + c["other_bytes"] / bw + c["launches"] * LAUNCH_US * 1e-6)


def run(shapes: List[tuple], paths=PATHS, T: int = T_DEFAULT, log=print) -> dict:
    """Count every path at every ``(head, D, V, N)``; returns the results and the text printed."""
    lines: List[str] = []

    def out(s=""):
        lines.append(s)
        log(s)

    out("# vpo performance model (counted on the meta device; the times are a roofline model, not measurements)")
    out()
    out("## model assumptions")
    for g in GPUS.values():
        out(f"- {g['name']}: {g['bf16_tflops']:.0f} TFLOP/s dense bf16, {g['hbm_tbs']:.2f} TB/s HBM "
            "(vendor spec-sheet values)")
    out(f"- GEMMs at {GEMM_EFF:.0%} of peak (assumed), other kernels at {MEM_EFF:.0%} of HBM bandwidth (assumed), "
        f"{LAUNCH_US:g} µs per kernel launch (assumed), nothing overlaps")
    out("- time = max(GEMM FLOPs / (peak · eff), GEMM bytes / BW) + other bytes / BW + launches · overhead")
    out(f"- fwd+bwd of one step, bf16, N = 2B·T positions (T = {T}), a reference model; 'B/logit' = bytes / (N·V)")
    results = []
    liger = liger_status()
    for head, D, V, N in shapes:
        rows = []
        for path in paths:
            if path == "Liger DPO" and liger:
                rows.append({"path": path, "error": liger})
                continue
            try:
                c = count_path(path, D, V, N, T)
            except Exception as e:  # noqa: BLE001  (a path that cannot be traced is reported, the others go on)
                rows.append({"path": path, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                continue
            r = {"path": path, "gemm_flops": c.gemm_flops, "gemm_bytes": c.gemm_bytes, "other_bytes": c.other_bytes,
                 "launches": c.launches, "peak_bytes": c.peak_bytes}
            r["est_ms"] = {k: estimate_ms(r, g) for k, g in GPUS.items()}
            rows.append(r)
        for r in rows:
            r.update(head=head, D=D, V=V, N=N)
        results += rows
        NV, floor = N * V, 8 * N * D * V
        out()
        out(f"## model: {head} head (D={D}, V={V}), N={N}, bf16 — counted costs")
        out()
        out("| path | GEMM TFLOP | ×8NDV | GEMM GB | other GB | other B/logit | launches | peak extra GiB |")
        out("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if "error" in r:
                out(f"| {r['path']} | {r['error']} |||||||")
                continue
            out(f"| {r['path']} | {r['gemm_flops'] / 1e12:.2f} | {r['gemm_flops'] / floor:.3f} | "
                f"{r['gemm_bytes'] / 1e9:.2f} | {r['other_bytes'] / 1e9:.2f} | {r['other_bytes'] / NV:.1f} | "
                f"{r['launches']} | {r['peak_bytes'] / 2**30:.2f} |")
        mat = next((r for r in rows if r["path"] == "materialized" and "est_ms" in r), None)
        out()
        out(f"## model: {head} head, N={N} — roofline estimate, ms (× materialized logits)")
        out()
        out("| path | " + " | ".join(GPUS) + " |")
        out("|---|" + "---:|" * len(GPUS))
        for r in rows:
            if "est_ms" not in r:
                continue
            cells = []
            for k in GPUS:
                ratio = f" ({r['est_ms'][k] / mat['est_ms'][k]:.2f}×)" if mat and r is not mat else ""
                cells.append(f"{r['est_ms'][k]:.1f}{ratio}")
            out(f"| {r['path']} | " + " | ".join(cells) + " |")
    return {"gpus": GPUS, "assumptions": {"gemm_eff": GEMM_EFF, "mem_eff": MEM_EFF, "launch_us": LAUNCH_US, "T": T},
            "results": results, "text": "\n".join(lines)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one tiny head, one N: every path in seconds")
    ap.add_argument("--head", default=None, help="D,V of one head instead of the Qwen2.5-VL-7B and Llama-3-8B heads")
    ap.add_argument("--ns", default=None, help="comma-separated N (positions, 2B·T)")
    ap.add_argument("--seq", type=int, default=None, help=f"T, tokens per row (default {T_DEFAULT})")
    ap.add_argument("--json", default=None, help="also write the results (and the text) to this file")
    args = ap.parse_args(argv)
    T = args.seq or (QUICK["seq"] if args.quick else T_DEFAULT)
    if args.head:
        D, V = (int(x) for x in args.head.split(","))
        heads = [(f"D={D}, V={V}", D, V)]
    elif args.quick:
        heads = [QUICK["head"]]
    else:
        heads = [(k, D, V) for k, (D, V) in HEADS.items()]
    ns = tuple(int(x) for x in args.ns.split(",")) if args.ns else (QUICK["ns"] if args.quick else NS)
    res = run([(h, D, V, N) for h, D, V in heads for N in ns], T=T)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if all("error" not in r or r["path"] == "Liger DPO" for r in res["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
