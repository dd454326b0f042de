#!/usr/bin/env python3
"""The GPU A/B driver that ``run_gpu.sh`` runs, stage by stage, each in its own process.

    python3 benchmarks/gpu_ab.py run --out DIR --stage lmhead --deadline EPOCH_S   # one stage; appends to the JSON
    python3 benchmarks/gpu_ab.py note --out DIR --text "install: rc 0 in 71 s"     # a line for the report
    python3 benchmarks/gpu_ab.py report --out DIR                                  # DIR/gpu-report.md from the JSON
    ... --cpu-smoke                                                                # the same code on tiny CPU shapes

Stages (``run_gpu.sh`` runs them in this order of importance, each under ``timeout``):

- ``lmhead``: per-token log-probs, fwd+bwd of ``logp.sum()``, at N ∈ {4096, 16384}, D=3584, V=152064 (Qwen2-VL's
  head), bf16: ``floor`` (the 3 GEMMs alone), ``materialized`` (``h @ W.T``, fp32 ``log_softmax``, gather),
  ``gemm`` (``vpo.linear_logprobs(impl="gemm")``: cuBLAS GEMMs + small Triton kernels) and ``triton`` (the fully
  fused kernels). At the first N, each vpo path's log-probs and gradients are compared with the materialized ones.
- ``losses``: ``fused_dpo_loss`` / ``fused_tpo_loss`` (``gemm``, ``triton``) against the materializing oracles
  (``vpo.oracle``) and the 4-GEMM floor (policy fwd+bwd, reference fwd), B pairs of T=1024 tokens (N = 2B·T).
- ``extras``: ``fused_catpo_loss``, the per-token KL (``linear_token_kl``) and Cat-PO's image-attention statistics
  (LLaVA-1.5-7B: 32 layers × 32 heads, T=2048, N_p=576; q,k route vs eager maps), as far as the time allows.

Every measurement: one untimed first call (its time is reported: Triton JIT, cuBLAS workspaces), the peak memory
of one call (``max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated`` before: what
the step adds to its inputs), then ``reps`` calls timed with CUDA events (as many as fit ~1 s, 3 to 10), median.
Each result is appended to ``DIR/gpu-results.json`` at once, so a stage killed by its timeout keeps what it measured.
A failing path is recorded with its error and the stage goes on; a CUDA error that poisons the context (illegal
address, device-side assert) ends the process with exit code 3, and ``run_gpu.sh`` starts the stage again, which
skips every case already attempted. Inputs: ``vpo.testing.make_peaked_head_inputs`` (peaked softmaxes, mean entropy
1.5 nats; their measured statistics go into the report).

The module's step builders are the pytest benchmarks' own (``_lmhead``, ``_attention``), so both measure the same
code. ``--cpu-smoke`` runs everything on tiny CPU shapes (Triton under ``TRITON_INTERPRET=1``) to test this driver
(tests/test_gpu_script.py); its timings mean nothing and the report says so.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

RESULTS = "gpu-results.json"
REPORT = "gpu-report.md"
POISON = ("illegal memory access", "device-side assert", "illegal instruction", "misaligned address",
          "unspecified launch failure", "an illegal", "CUDA error: an", "cudaErrorLaunchFailure")
EXIT_POISONED = 3

# What each stage measures: (family, N list key, impls). Families: the pytest benchmarks' (``_cases``).
STAGES = {
    "lmhead": [("linear_logprobs", ["floor", "naive", "gemm", "triton"])],
    "losses": [("fused_losses", ["dpo/floor", "dpo/naive", "dpo/gemm", "dpo/triton",
                                 "tpo/naive", "tpo/gemm", "tpo/triton"])],
    "extras": [("catpo", ["catpo/naive", "catpo/gemm", "catpo/triton"]),
               ("attention_stats", ["qk/triton", "eager"]),
               ("token_kl", ["kl/naive", "kl/gemm", "kl/triton"])],
}
LABELS = {"naive": "materialized", "floor": "GEMM floor"}
# --cpu-smoke leaves out the fully fused Triton kernels: seconds per call in the interpreter at any shape; the driver
# code around them is the same as for every other path (impl="gemm" runs its small kernels in the interpreter).
SMOKE_SKIP = {"triton", "dpo/triton", "tpo/triton", "catpo/triton", "kl/triton", "qk/triton"}
# Test hooks (tests/test_gpu_script.py): make one named path fail, or fail as if the CUDA context were poisoned
# (once: the restarted stage must go on past it).
FAIL_ENV, POISON_ENV, HANG_ENV = "VPO_GPU_AB_FAIL", "VPO_GPU_AB_POISON", "VPO_GPU_AB_HANG"


def config(smoke: bool) -> dict:
    """Shapes: the GPU's, or tiny CPU ones for --cpu-smoke."""
    if smoke:
        return {"device": "cpu", "dtype": "float32", "D": 32, "V": 256, "Ns": (32, 64), "seq": 16,
                "attn": ("smoke-attn", 1, 32, 8, 2, 2, 2, 16, "float32"), "reps": (1, 2), "rep_s": 0.05,
                "extras_Ns": (32,), "skip": SMOKE_SKIP}
    return {"device": "cuda", "dtype": "bfloat16", "D": 3584, "V": 152064, "Ns": (4096, 16384), "seq": 1024,
            "attn": ("llava-1.5-7b", 1, 2048, 576, 32, 32, 32, 128, "bfloat16"), "reps": (3, 10), "rep_s": 1.0}


# ----------------------------------------------------------------------------------------------------------------------
# Results file
# ----------------------------------------------------------------------------------------------------------------------


def load(out: str) -> dict:
    path = os.path.join(out, RESULTS)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"meta": {}, "notes": [], "results": [], "inputs": {}}


def save(out: str, data: dict) -> None:
    tmp = os.path.join(out, RESULTS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out, RESULTS))


def meta(smoke: bool) -> dict:
    import torch

    m = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "smoke": smoke, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        m["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        m["triton"] = f"not importable: {e}"
    try:
        import vpo

        m["vpo"] = vpo.__version__
        m["vpo_available"] = {k: bool(v) for k, v in dict(vpo.AVAILABLE).items()}
    except Exception as e:  # noqa: BLE001
        m["vpo"] = f"not importable: {e}"
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(HERE), capture_output=True, text=True,
                             timeout=10)
        m["git_commit"] = rev.stdout.strip() or None
    except Exception:  # noqa: BLE001
        m["git_commit"] = None
    if torch.cuda.is_available() and not smoke:
        p = torch.cuda.get_device_properties(0)
        m.update(device=torch.cuda.get_device_name(0), capability=f"sm_{p.major}{p.minor}",
                 memory_gib=round(p.total_memory / 2**30, 1))
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
        except OSError:
            pass
        m["device"] = f"CPU smoke test on {model} (timings meaningless)" if smoke else f"{model} (CPU)"
    return m


# ----------------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------------


def measure(step, device: str, reps: tuple, rep_s: float) -> dict:
    """First call (timed on the host), peak memory of one call, then median of CUDA-event-timed calls."""
    import torch

    cuda = device == "cuda"
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    peak = None
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    t_once = max(first if not cuda else 1e-3, 1e-4)
    n = max(reps[0], min(reps[1], int(rep_s / t_once)))
    for i in range(n):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))  # ms
            if i == 0:  # size the repetitions from a warm call
                n = max(reps[0], min(reps[1], int(rep_s * 1e3 / max(times[0], 1e-3))))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
        if len(times) >= n:
            break
    return {"first_call_s": first, "median_ms": statistics.median(times), "times_ms": times, "reps": len(times),
            "peak_mib": peak}


def _outputs(family: str, impl: str, x, device: str):
    """(value, gradients) of one fwd+bwd for the correctness check: log-probs [N] and (dh, dW), or the loss."""
    import torch

    import _lmhead as L
    import vpo

    D = x.hidden.shape[-1]
    h, W, y = x.hidden.reshape(-1, D), x.weight, x.labels.reshape(-1)
    if family == "linear_logprobs":
        logp = L.naive_logprobs(h, W, y) if impl == "naive" else vpo.linear_logprobs(h, W, y, impl=impl)[0]
        grads = torch.autograd.grad(logp.sum(), (x.hidden, x.weight))
        return logp.detach().float(), grads
    loss_name, backend = impl.split("/")
    ref_h = L.reference_hidden(x.hidden)
    if loss_name == "dpo":
        loss = (vpo.oracle.dpo_loss(W, x.hidden, x.labels, ref_hidden=ref_h) if backend == "naive" else
                vpo.fused_dpo_loss(W, x.hidden, x.labels, ref_hidden=ref_h, impl=backend))[0]
        return loss.detach().float().reshape(1), torch.autograd.grad(loss, (x.hidden, x.weight))
    return None


def _compare(got, ref) -> dict:
    (v, gs), (rv, rgs) = got, ref
    out = {"max_abs_diff_value": float((v - rv).abs().max())}
    for name, g, rg in zip(("hidden", "weight"), gs, rgs):
        out[f"rel_diff_grad_{name}"] = float((g.float() - rg.float()).norm() / rg.float().norm().clamp_min(1e-30))
    return out


def run_stage(args) -> int:
    import torch

    import _attention
    import _cases
    import _lmhead as L
    from _shapes import AttnShape, Shape

    cfg = config(args.cpu_smoke)
    device = cfg["device"]
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_ab: no CUDA device; use --cpu-smoke to test the driver on CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    data = load(args.out)
    if not data["meta"]:
        data["meta"] = meta(args.cpu_smoke)
        save(args.out, data)
    if data.get("in_progress"):  # a case the previous stage process was killed in (its stage timeout): a hang
        data.setdefault("interrupted", []).append(data.pop("in_progress"))
    done = {(r["family"], r["N"], r.get("requested", r["impl"])) for r in data["results"]}
    done |= {(r["family"], r["N"], r["impl"]) for r in data.get("interrupted", [])}  # never retried
    deadline = args.deadline or (time.time() + 1e9)
    refs = {}
    last_cost = 10.0 if device == "cuda" else 1.0

    def record(entry: dict) -> None:
        data.pop("in_progress", None)
        data["results"].append(entry)
        save(args.out, data)
        e = entry
        if "median_ms" in e:
            what = (f"{e['median_ms']:.4g} ms median of {e['reps']}, peak {_f(e['peak_mib'], '.1f')} MiB, "
                    f"first call {e['first_call_s']:.2f} s")
        else:
            what = f"ERROR {e.get('error', '')[:200]}"
        print(f"[{args.stage}] {e['family']} N={e['N']} {e['impl']}: {what}", flush=True)
        if e.get("check_vs_materialized"):
            print(f"    vs materialized: {e['check_vs_materialized']}", flush=True)

    for family, impls in STAGES[args.stage]:
        attn = family == "attention_stats"
        Ns = cfg.get("extras_Ns", cfg["Ns"]) if args.stage == "extras" else cfg["Ns"]
        for N in ((cfg["attn"][2],) if attn else Ns):
            if attn:
                shape = AttnShape(*cfg["attn"])
            else:
                shape = Shape("qwen2-vl" if device == "cuda" else "smoke", N // cfg["seq"], cfg["seq"], cfg["D"],
                              cfg["V"], cfg["dtype"])
            todo = [i for i in impls if (family, N, i) not in done and i not in cfg.get("skip", ())]
            if not todo:
                continue
            x = None
            for impl in todo:
                if time.time() + 2 * last_cost > deadline:
                    print(f"[{args.stage}] out of time before {family} N={N} {impl}", flush=True)
                    data["notes"].append(f"{args.stage}: stopped before {family} N={N} {impl} (stage time limit)")
                    save(args.out, data)
                    return 0
                case = _cases.Case(family, impl, shape)
                entry = {"stage": args.stage, "family": family, "N": N, "impl": impl, "requested": impl,
                         "shape": shape.label, "flops": _cases.flops(case)}
                t_case = time.time()
                step = None
                data["in_progress"] = {"stage": args.stage, "family": family, "N": N, "impl": impl,
                                       "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                           timespec="seconds")}
                save(args.out, data)
                try:
                    if impl == os.environ.get(HANG_ENV):
                        time.sleep(3600)
                    if impl == os.environ.get(FAIL_ENV):
                        raise RuntimeError(f"injected failure ({FAIL_ENV}={impl})")
                    if impl == os.environ.get(POISON_ENV) and not any(r["impl"] == impl for r in data["results"]):
                        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
                    if attn:
                        step = _attention.attention_prepare(case, device)
                    else:
                        if x is None:
                            x = L.inputs(shape, device)
                            data["inputs"][shape.label] = L.INPUT_STATS.get(shape.label)
                        build = {"linear_logprobs": L.linear_step, "token_kl": L.token_kl_step}.get(family, L.fused_step)
                        try:
                            step = build(impl, x, device)
                        except L.Unavailable as e:  # a fused loss without impl="gemm": measure what "auto" runs
                            if not (family in ("fused_losses", "catpo") and impl.endswith("/gemm")):
                                raise
                            entry.update(impl=impl.replace("/gemm", "/auto"), note=f"{e}; measured impl='auto'")
                            step = build(entry["impl"], x, device)
                    entry.update(measure(step, device, cfg["reps"], cfg["rep_s"]))
                    step = None
                    entry["tflops"] = entry["flops"] / (entry["median_ms"] * 1e-3) / 1e12
                    # correctness at the first N: vpo's paths against the materialized one, same inputs
                    if N == cfg["Ns"][0] and family in ("linear_logprobs", "fused_losses"):
                        base = "naive" if family == "linear_logprobs" else "dpo/naive"
                        ran = entry["impl"]
                        if ran in ("gemm", "triton", "dpo/gemm", "dpo/triton", "dpo/auto"):
                            if base not in refs:
                                refs[base] = _outputs(family, base, x, device)
                            entry["check_vs_materialized"] = _compare(_outputs(family, ran, x, device), refs[base])
                except L.Unavailable as e:
                    entry["error"] = f"unavailable: {e}"
                except Exception as e:  # noqa: BLE001 - record, go on
                    msg = f"{type(e).__name__}: {e}"
                    entry["error"] = msg[:2000]
                    entry["traceback"] = traceback.format_exc()[-4000:]
                    if any(p in msg for p in POISON):
                        entry["error"] += " [CUDA context poisoned: the stage restarts in a new process]"
                        record(entry)
                        return EXIT_POISONED
                step = None  # free what a failed step held (the traceback is a string by now) before the next one
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                entry["wall_s"] = time.time() - t_case
                last_cost = max(entry["wall_s"], 1e-3)
                record(entry)
            del x
            L.clear_inputs()
            refs.clear()
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def _f(x, spec=".3g"):
    return "—" if x is None else format(x, spec)


def _ratio(a, b):
    return "—" if a is None or b is None or not b > 0 else f"{a / b:.3g}×"


def _pytest_summary(out: str) -> list:
    path = os.path.join(out, "pytest-gpu.log")
    if not os.path.exists(path):
        return ["(not run)"]
    with open(path, errors="replace") as f:
        lines = [ln.rstrip() for ln in f]
    keep = [ln for ln in lines if ln.startswith(("FAILED", "ERROR", "SKIPPED")) or " passed" in ln or " failed" in ln
            or "no tests ran" in ln or "error" in ln.lower()[:12]]
    return (keep[-40:] or lines[-15:]) or ["(empty log)"]


# benchmarks/model.py's paths and the measured cases they model: (family, requested impl, what was measured)
MODEL_PATHS = {"materialized": ("fused_losses", "dpo/naive", "DPO oracle, full logits"),
               "vpo DPO": ("fused_losses", "dpo/gemm", "fused_dpo_loss"),
               "vpo TPO": ("fused_losses", "tpo/gemm", "fused_tpo_loss"),
               "vpo Cat-PO": ("catpo", "catpo/gemm", "fused_catpo_loss")}
MODEL_FILE = "model.json"


def _model_vs_measured(out: str, res: list, device: str) -> list:
    """The performance model's estimate (``python -m benchmarks.model``, written by run_gpu.sh to ``DIR/model.json``)
    next to the measured median of the same path and N, for this device's column of the model."""
    path = os.path.join(out, MODEL_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            model = json.load(f)
    except (OSError, ValueError) as e:
        return ["", "## Model vs measurement", "", f"model.json unreadable: {e}"]
    gpu = next((k for k in model.get("gpus", {}) if k in device), None)
    col = gpu or "H100"
    L = ["", "## Model vs measurement", "",
         f"The roofline **model** of `python -m benchmarks.model` (counted on the meta device, {col} column"
         f"{'' if gpu else ' (this device is not in the model: H100 shown)'}; assumptions in run.log) next to the "
         "measured median of the same path and N. A model, not a measurement: the ratio shows where it is wrong.", "",
         "| N | path | model ms | measured | measured ms | measured / model | model launches | model other B/logit |",
         "|---:|---|---:|---|---:|---:|---:|---:|"]
    by = {(r["family"], r["N"], r.get("requested", r["impl"])): r for r in res}
    for m in model.get("results", []):
        if "est_ms" not in m or m["path"] not in MODEL_PATHS:
            continue
        fam, impl, what = MODEL_PATHS[m["path"]]
        meas = by.get((fam, m["N"], impl), {}).get("median_ms")
        est = m["est_ms"].get(col)
        L.append(f"| {m['N']} | {m['path']} | {_f(est, '.4g')} | {what} | {_f(meas, '.4g')} | {_ratio(meas, est)} | "
                 f"{m['launches']} | {m['other_bytes'] / (m['N'] * m['V']):.1f} |")
    return L


def report(args) -> int:
    data = load(args.out)
    m = data.get("meta") or {}
    if not m:
        try:
            m = meta(args.cpu_smoke)
        except Exception as e:  # noqa: BLE001
            m = {"device": f"unknown (torch does not import: {e})"}
    res = data.get("results", [])
    by = {(r["family"], r["N"], r["impl"]): r for r in res}
    L = [f"# vpo GPU A/B on {m.get('device', 'unknown device')}", ""]
    if m.get("smoke"):
        L += ["**CPU smoke test of the driver: tiny shapes, timings meaningless.**", ""]
    hw = f"{m['capability']}, {m['memory_gib']} GiB; " if m.get("capability") else ""
    L += [f"{m.get('device')}; {hw}torch {m.get('torch')} "
          f"(CUDA {m.get('cuda')}), triton {m.get('triton')}, vpo {m.get('vpo')} at commit {m.get('git_commit')}; "
          f"python {m.get('python')}; started {m.get('started')}.", ""]
    if data.get("notes"):
        L += ["## Stages", ""] + [f"- {n}" for n in data["notes"]] + [""]
    if data.get("inputs"):
        L += ["## Inputs", "", "`vpo.testing.make_peaked_head_inputs` (entropy-calibrated peaked softmaxes, Zipfian "
              "tail, labels sampled from the model); measured on 256 positions:", ""]
        for label, st in data["inputs"].items():
            if st:
                L.append(f"- {label}: mean entropy {st['mean_entropy']:.2f} nats, mean target log-prob "
                         f"{st['mean_target_logp']:.2f}, top-1 prob {st['mean_top1_prob']:.2f}, "
                         f"KL(policy ‖ reference) {st.get('ref_kl', float('nan')):.3g}")
        L.append("")
    head = []
    for fam, label in (("linear_logprobs", "log-probs"), ("fused_losses", "fused losses")):
        Ns = sorted({r["N"] for r in res if r["family"] == fam})
        for N in Ns[-1:]:
            floor = by.get((fam, N, "floor" if fam == "linear_logprobs" else "dpo/floor"), {}).get("median_ms")
            for r in res:
                if r["family"] != fam or r["N"] != N or "median_ms" not in r or r["impl"].endswith(("floor", "naive")):
                    continue
                mat = by.get((fam, N, "naive" if fam == "linear_logprobs" else r["impl"].split("/")[0] + "/naive"), {})
                head.append(f"- {label}, N={N}, {r['impl']}: {r['median_ms']:.4g} ms = {_ratio(r['median_ms'], floor)} "
                            f"the GEMM floor, {_ratio(r['median_ms'], mat.get('median_ms'))} materialized time, "
                            f"{_ratio(r.get('peak_mib'), mat.get('peak_mib'))} materialized memory, "
                            f"{_f(r.get('tflops'))} TFLOP/s")
    if head:
        L += ["## Headline (largest N)", ""] + head + [""]
    L += ["## Results", "",
          "fwd+bwd of one step (attention statistics: forward only), median of CUDA-event-timed repetitions after "
          "a first call. FLOPs: 6·N·D·V for log-probs (3 GEMMs of 2·N·D·V), 8·N·D·V for the losses and the token KL "
          "(policy fwd+bwd + reference fwd), B·H·d·T(T+1) per layer for attention statistics. Peak: memory the step "
          "adds to its inputs. ×floor: time over the plain GEMMs of the same work (3 for log-probs, 4 for losses/KL); "
          "×materialized: over the full-logits code at the same N.", "",
          "| family | N | impl | median ms | TFLOP/s | peak MiB | time ×floor | time ×materialized | "
          "memory ×materialized | first call s | check vs materialized | error |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    floor_of = {"linear_logprobs": ("linear_logprobs", "floor"), "fused_losses": ("fused_losses", "dpo/floor"),
                "catpo": ("fused_losses", "dpo/floor"), "token_kl": ("fused_losses", "dpo/floor")}
    for r in res:
        fam, N, impl = r["family"], r["N"], r["impl"]
        fl = floor_of.get(fam)
        floor = by.get((fl[0], N, fl[1])) if fl else None
        mat_impl = {"linear_logprobs": "naive", "attention_stats": "eager"}.get(fam, impl.split("/")[0] + "/naive")
        mat = by.get((fam, N, mat_impl))
        t, pk = r.get("median_ms"), r.get("peak_mib")
        chk = r.get("check_vs_materialized")
        chk_s = "; ".join(f"{k.replace('rel_diff_grad_', 'rel Δgrad ').replace('max_abs_diff_value', 'max abs Δ')} "
                          f"{v:.2e}" for k, v in chk.items()) if chk else ""
        L.append(f"| {fam} | {N} | {LABELS.get(impl, impl)} | {_f(t, '.4g')} | {_f(r.get('tflops'))} | "
                 f"{_f(pk, '.0f')} | {_ratio(t, floor.get('median_ms')) if floor and r is not floor else '—'} | "
                 f"{_ratio(t, mat.get('median_ms')) if mat and r is not mat else '—'} | "
                 f"{_ratio(pk, mat.get('peak_mib')) if mat and r is not mat else '—'} | "
                 f"{_f(r.get('first_call_s'), '.2f')} | {chk_s} | {(r.get('error') or r.get('note') or '')[:160]} |")
    tpo_dpo = [(N, b) for (fam, N, impl) in by if fam == "fused_losses" and impl.startswith("tpo/")
               for b in [impl.split("/")[1]]]
    if tpo_dpo:
        def tpo_over_dpo(N, b):
            dpo = by.get(("fused_losses", N, "dpo/" + b), {})
            return _ratio(by[("fused_losses", N, "tpo/" + b)].get("median_ms"), dpo.get("median_ms"))

        L += ["", "TPO over DPO on the same backend (target ≤ 1.15): "
              + ", ".join(f"N={N} {b}: {tpo_over_dpo(N, b)}" for N, b in tpo_dpo)]
    hung = data.get("interrupted", []) + ([data["in_progress"]] if data.get("in_progress") else [])
    if hung:
        L += ["", "## Interrupted (killed by the stage's timeout while running: a hang or far too slow)", ""]
        L += [f"- {h['stage']}: {h['family']} N={h['N']} {h['impl']}, started {h['started']}" for h in hung]
    errors = [r for r in res if r.get("traceback")]
    if errors:
        L += ["", "## Errors", ""]
        for r in errors:
            L += [f"### {r['family']} N={r['N']} {r['impl']}", "", "```", r["traceback"].rstrip()[-2500:], "```", ""]
    L += _model_vs_measured(args.out, res, m.get("device") or "")
    L += ["", "## pytest -m gpu", "", "```", *_pytest_summary(args.out), "```"]
    inst = os.path.join(args.out, "install.log")
    if os.path.exists(inst):
        with open(inst, errors="replace") as f:
            tail = [ln.rstrip() for ln in f][-8:]
        L += ["", "## Install (last lines of install.log)", "", "```", *tail, "```"]
    with open(os.path.join(args.out, REPORT), "w") as f:
        f.write("\n".join(L) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("run", "report", "note"))
    ap.add_argument("--text", default="", help="note: the line to add to the report")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", choices=tuple(STAGES))
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds: start nothing after ~this")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny CPU shapes: test the driver without a GPU")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.command == "note":
        data = load(args.out)
        data["notes"].append(args.text)
        save(args.out, data)
        return 0
    if args.command == "report":
        return report(args)
    if not args.stage:
        ap.error("run needs --stage")
    return run_stage(args)


if __name__ == "__main__":
    sys.exit(main())
