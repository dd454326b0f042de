"""The fused DPO loss against materialized logits on the CPU, side by side in one process.

    python -m benchmarks.cpu_side_by_side                       # N=1024, D=1024, V=32768, fp32, 5 rounds
    python -m benchmarks.cpu_side_by_side --out benchmarks/results/cpu-side-by-side
    python -m benchmarks.cpu_side_by_side --quick               # a tiny shape: checks the script (the test runs it)

Both run DPO forward + backward (gradients to the hidden states and the head) with a reference model's hidden states:

* ``fused`` — :func:`vpo.fused_dpo_loss` (the engine: the policy's gradient formed in the forward; on CPU only the scored
  positions enter the GEMMs);
* ``materialized`` — :func:`vpo.oracle.dpo_loss`: the full ``[N, V]`` logits, ``log_softmax``, gather, autograd.

Inputs are :func:`vpo.testing.make_peaked_head_inputs` (LM-like softmaxes, mean entropy 1.5 nats) with the first
quarter of every row's positions ignored (a prompt). The two are timed alternately, round after round (so a load change
on the machine hits both), and the minimum and median of each are reported with their ratio. Peak extra memory is
counted once per path by :class:`vpo.testing_counter.CostCounter` (tensors allocated during the step: the allocator's
own overhead is not included). Timings are of this machine as it was during the run: the output names it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import vpo
from vpo.testing import make_peaked_head_inputs
from vpo.testing_counter import CostCounter


def _inputs(B: int, T: int, D: int, V: int, seed: int = 0):
    x = make_peaked_head_inputs(2 * B, T, D, V, entropy=1.5, dtype=torch.float32, seed=seed)
    h = x.hidden.detach().clone().requires_grad_()
    W = x.weight.detach().clone().requires_grad_()
    y = x.labels.clone()
    y[:, : T // 4] = -100  # 25% of the positions are ignored
    g = torch.Generator().manual_seed(seed + 1)
    rh = h.detach() + 0.05 * torch.randn(h.shape, generator=g)
    return h, W, y, rh


def steps(B: int, T: int, D: int, V: int):
    h, W, y, rh = _inputs(B, T, D, V)

    def fused():
        loss, _ = vpo.fused_dpo_loss(W, h, y, ref_hidden=rh)
        return loss, torch.autograd.grad(loss, [h, W])

    def materialized():
        loss, _ = vpo.oracle.dpo_loss(W, h, y, ref_hidden=rh)
        return loss, torch.autograd.grad(loss, [h, W])

    return {"fused": fused, "materialized": materialized}


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(B: int, T: int, D: int, V: int, rounds: int) -> dict:
    fns = steps(B, T, D, V)
    (lf, gf), (lm, gm) = fns["fused"](), fns["materialized"]()  # warm-up, and the two agree
    agree = {"loss_abs_diff": abs(lf.item() - lm.item()),
             "grad_h_max_abs_diff": (gf[0] - gm[0]).abs().max().item(),
             "grad_W_max_abs_diff": (gf[1] - gm[1]).abs().max().item()}
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    peak = {}
    for name, fn in fns.items():
        with CostCounter() as c:
            fn()
        peak[name] = c.peak_bytes
    summary = {k: {"min_s": min(v), "median_s": statistics.median(v), "all_s": v} for k, v in times.items()}
    return {
        "shape": dict(B=B, T=T, N=2 * B * T, D=D, V=V, dtype="float32", ignored_fraction=0.25),
        "rounds": rounds,
        "times": summary,
        "ratio_min": summary["fused"]["min_s"] / summary["materialized"]["min_s"],
        "ratio_median": summary["fused"]["median_s"] / summary["materialized"]["median_s"],
        "peak_extra_bytes": peak,
        "agreement": agree,
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average_1m_at_end": os.getloadavg()[0]},
    }


def markdown(r: dict) -> str:
    s, t, m = r["shape"], r["times"], r["machine"]
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    lines = [
        f"# fused DPO vs materialized logits, CPU, side by side (measured)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads); 1-minute load "
        f"average at the end {m['load_average_1m_at_end']:.1f}.",
        f"Shape: N={s['N']} (B={s['B']} pairs, T={s['T']}), D={s['D']}, V={s['V']}, {s['dtype']}, "
        f"{s['ignored_fraction']:.0%} of positions ignored; DPO fwd+bwd with a reference, {r['rounds']} rounds "
        "alternating the two.",
        "",
        "| path | min | median | peak extra memory |",
        "|---|---:|---:|---:|",
    ]
    for k in ("fused", "materialized"):
        lines.append(f"| {k} | {t[k]['min_s']:.3f} s | {t[k]['median_s']:.3f} s | {mib(r['peak_extra_bytes'][k])} |")
    lines += ["", f"**fused / materialized: {r['ratio_min']:.2f}× (min), {r['ratio_median']:.2f}× (median).**", "",
              f"Agreement: |loss diff| {r['agreement']['loss_abs_diff']:.2e}, max |dh diff| "
              f"{r['agreement']['grad_h_max_abs_diff']:.2e}, max |dW diff| {r['agreement']['grad_W_max_abs_diff']:.2e}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny shape (checks the script; timings meaningless)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    shape = (2, 8, 32, 512) if args.quick else (4, 128, 1024, 32768)
    r = run(*shape, rounds=args.rounds)
    md = markdown(r)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(r, indent=1))
        out.with_suffix(".md").write_text(md)
    return r


if __name__ == "__main__":
    main()
