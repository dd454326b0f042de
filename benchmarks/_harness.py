"""Shared benchmark machinery: shapes, the implementations under test, peak-memory measurement.

Every benchmark is one :class:`Case` — a benchmark family (``linear_logprobs``, ``fused_losses``, ``memory``), an
implementation name and a :class:`Shape`. :func:`prepare` turns a case into a ``step()`` closure that runs one forward
and one backward (and synchronizes on CUDA, so a wall-clock timer around it measures the GPU work), plus the FLOP count
the TFLOP/s figure is reported against.

Inputs come from the tests' builder, :func:`vpo.testing.make_linear_head_inputs`, with every position scored
(``ignore_frac=0``, no prompt), so ``N = rows × seq`` tokens all do the full vocabulary sweep and ``6·N·D·V`` is
the work every implementation must do.

Peak memory (:func:`peak_memory_mib`), always of one ``step()`` after a warm-up call, over what the inputs already hold:

- CUDA: ``torch.cuda.max_memory_allocated() − torch.cuda.memory_allocated()`` around the step (after
  ``reset_peak_memory_stats``): the caching allocator's live-tensor peak, not the reserved pool.
- CPU: torch's CPU allocator keeps no statistics, so the case runs in a fresh Python process (this file's ``__main__``):
  build the inputs, warm up on a tiny shape, reset the kernel's peak-RSS mark of the process (``echo 5 >
  /proc/self/clear_refs`` sets ``VmHWM`` back to the current RSS, Linux >= 4.0), run one step, and report the rise of
  ``VmHWM`` (``/proc/self/status``) over the RSS at the reset.
  Why not ``getrusage(RUSAGE_SELF).ru_maxrss`` alone: (1) without a reset it already holds the input builder's float64
  temporaries, which hide the step's peak; (2) Linux folds the *parent's* peak RSS into the child's ``ru_maxrss`` at
  ``exec`` (``signal_struct.maxrss``) and ``clear_refs`` does not reset that part, so under a pytest parent bigger than
  the step's peak it reads a constant (measured: 0.0 MiB rises for every case). ``VmHWM`` belongs to the process's own
  address space and has neither problem. Without ``/proc`` write access the worker falls back to the ``VmHWM`` rise
  without a reset and says so in ``method``.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from vpo.testing import LinearHeadInputs, make_linear_head_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MiB = float(1 << 20)


# ----------------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """``rows × seq`` tokens (``rows = 2B`` sequences of length ``seq = T``: B preference pairs), head ``[vocab, dim]``."""

    model: str
    rows: int
    seq: int
    dim: int
    vocab: int
    dtype: str  # "bfloat16" | "float32"

    @property
    def n(self) -> int:
        return self.rows * self.seq

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def id(self) -> str:
        return f"{self.model}-N{self.n}"

    @property
    def label(self) -> str:
        short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(self.dtype, self.dtype)
        return f"{self.model} N={self.n} (B={self.rows // 2}, T={self.seq}) D={self.dim} V={self.vocab} {short}"


SEQ_GPU = 1024  # tokens per sequence on the GPU shapes: N = 2B · 1024
# (model, D, V): the LM heads of LLaVA-1.5-7B (Vicuna-7B + image tokens) and Qwen2-VL-7B.
GPU_MODELS = (("llava-1.5", 4096, 32064), ("qwen2-vl", 3584, 152064))
GPU_TOKENS = (2048, 8192, 16384)
# Ordered small → large so that a run cut short by its time budget still has every implementation at the small shapes.
GPU_SHAPES = tuple(
    Shape(model, n // SEQ_GPU, SEQ_GPU, d, v, "bfloat16") for n in GPU_TOKENS for model, d, v in GPU_MODELS
)
CPU_SHAPES = (
    Shape("cpu-small", 2, 128, 128, 4096, "float32"),  # N=256: 0.8 GFLOP per fwd+bwd
    # N=1024: 26 GFLOP per fwd+bwd; N·V = 2 × the torch path's 2**24-element tile budget, so it sweeps 2 chunks.
    Shape("cpu-medium", 2, 512, 128, 32768, "float32"),
)
# The project's CPU memory target: the torch path's peak at N=4096, V=131072, D=256 is <= 0.1x the naive one's
# (the naive path holds [4096, 131072] fp32 = 2 GiB of logits, and as much again for log_softmax and its gradient).
MEMORY_SHAPE = Shape("memory-target", 4, 1024, 256, 131072, "float32")
MEMORY_TARGET_RATIO = 0.1

SHAPES = GPU_SHAPES if DEVICE == "cuda" else CPU_SHAPES
SHAPE_ORDER = {s: i for i, s in enumerate((*GPU_SHAPES, *CPU_SHAPES, MEMORY_SHAPE))}


# ----------------------------------------------------------------------------------------------------------------------
# Cases and the implementations they name
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    bench: str  # "linear_logprobs" | "fused_losses"
    impl: str
    shape: Shape

    @property
    def id(self) -> str:
        return f"{self.shape.id}-{self.impl}"

    def to_json(self) -> str:
        return json.dumps({"bench": self.bench, "impl": self.impl, "shape": asdict(self.shape)})

    @staticmethod
    def from_json(text: str) -> "Case":
        d = json.loads(text)
        return Case(d["bench"], d["impl"], Shape(**d["shape"]))


# What each implementation is compared with in the results table: (time baseline, memory baseline), same shape.
LINEAR_IMPLS: Dict[str, Tuple[Optional[str], Optional[str]]] = {
    "triton": ("floor", "naive"),  # vpo.linear_logprobs(impl="triton")
    "torch": ("floor", "naive"),  # vpo.linear_logprobs(impl="torch"), chunked PyTorch
    "naive": ("floor", None),  # logits = h @ W.T, log_softmax (fp32), gather
    "liger-flce": ("floor", "naive"),  # LigerFusedLinearCrossEntropyLoss(reduction="sum")
    "cce": ("floor", "naive"),  # cut_cross_entropy.linear_cross_entropy(reduction="sum")
    "floor": (None, "naive"),  # the three GEMMs alone: h·Wᵀ, g·W, gᵀ·h
}
FUSED_IMPLS: Dict[str, Tuple[Optional[str], Optional[str]]] = {
    "dpo/triton": ("dpo/naive", "dpo/naive"),
    "tpo/triton": ("dpo/triton", "tpo/naive"),  # target: TPO <= 1.15x DPO
    "dpo/torch": ("dpo/naive", "dpo/naive"),
    "tpo/torch": ("dpo/torch", "tpo/naive"),
    "dpo/naive": (None, None),  # vpo.oracle.dpo_loss: full [N, V] logits in the input dtype
    "tpo/naive": ("dpo/naive", None),  # vpo.oracle.tpo_loss: also materializes the noised pass's logits
    "dpo/liger": ("dpo/naive", "dpo/naive"),  # LigerFusedLinearDPOLoss(use_ref_model=True)
}
CUDA_ONLY = {"triton", "liger-flce", "cce", "dpo/triton", "tpo/triton", "dpo/liger"}
# Optional third-party baselines: the module that must import (pytest.importorskip).
OPTIONAL_MODULE = {"liger-flce": "liger_kernel", "dpo/liger": "liger_kernel", "cce": "cut_cross_entropy"}
BASELINES = {"linear_logprobs": LINEAR_IMPLS, "fused_losses": FUSED_IMPLS}


def cases(bench: str):
    """Every (shape, impl) of ``bench`` that this machine can run, shape-major (small shapes first)."""
    impls = [i for i in BASELINES[bench] if DEVICE == "cuda" or i not in CUDA_ONLY]
    return [Case(bench, impl, shape) for shape in SHAPES for impl in impls]


def flops(case: Case) -> float:
    """Useful FLOPs of one fwd+bwd. Log-probs: 3 GEMMs of 2·N·D·V (z = h·Wᵀ, dh = dz·W, dW = dzᵀ·h).
    Losses: the policy's fwd+bwd (6·N·D·V) plus the reference's forward (2·N·D·V); TPO's target-logit passes are
    O(N·D) and not counted. Implementations that do more (the naive TPO materializes the noised logits too) are
    still rated against this."""
    s = case.shape
    per_gemm = 2.0 * s.n * s.dim * s.vocab
    return (3 if case.bench in ("linear_logprobs", "memory") else 4) * per_gemm


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------

_INPUTS: Dict[Tuple[Shape, str], LinearHeadInputs] = {}


def inputs(shape: Shape, device: str = DEVICE, *, cache: bool = True) -> LinearHeadInputs:
    """``make_linear_head_inputs`` for ``shape`` with every position scored; the last one is cached (building the
    Qwen2-VL head in float64 on the host takes seconds, and the benchmarks are ordered shape-major)."""
    key = (shape, device)
    if cache and key in _INPUTS:
        return _INPUTS[key]
    if cache:  # one shape at a time: free the previous one before building the next
        _INPUTS.clear()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    x = make_linear_head_inputs(shape.rows, shape.seq, shape.dim, shape.vocab, dtype=shape.torch_dtype,
                                device=device, ignore_frac=0.0, prompt_len=0, seed=0)
    if cache:
        _INPUTS[key] = x
    return x


def clear_inputs() -> None:
    _INPUTS.clear()


class Unavailable(Exception):
    """The implementation cannot run here (a missing optional package, a module still being written)."""


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _randn(shape, like: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    """Seeded ``scale · N(0, 1)`` of ``shape`` in ``like``'s dtype and device, generated there directly."""
    g = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=like.device, dtype=like.dtype).mul_(scale)


def naive_logprobs(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The materializing baseline as preference-training code writes it (TRL's ``get_batch_logps``):
    logits ``[N, V]`` in the compute dtype, upcast to fp32, ``log_softmax``, gather the target."""
    logits = h @ W.T  # [N, D] @ [D, V] -> [N, V]
    logp_all = torch.log_softmax(logits.float(), dim=-1)  # [N, V] fp32
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logp = logp_all.gather(-1, safe[:, None]).squeeze(-1)  # [N]
    return logp * mask


def _linear_step(impl: str, x: LinearHeadInputs, device: str) -> Callable[[], None]:
    sync = _sync(device)
    D = x.hidden.shape[-1]
    h, W, y = x.hidden.reshape(-1, D), x.weight, x.labels.reshape(-1)  # [N, D], [V, D], [N]
    leaves = (x.hidden, x.weight)

    if impl in ("triton", "torch"):
        from vpo.ops.linear_logprobs import linear_logprobs

        if impl == "triton":
            try:
                import vpo_kernels.linear_logprobs  # noqa: F401
            except ImportError as e:
                raise Unavailable(f"vpo_kernels.linear_logprobs does not import: {e}") from e

        def step():
            logp, _ = linear_logprobs(h, W, y, impl=impl)
            torch.autograd.grad(logp.sum(), leaves)
            sync()

    elif impl == "naive":

        def step():
            torch.autograd.grad(naive_logprobs(h, W, y).sum(), leaves)
            sync()

    elif impl == "liger-flce":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss(reduction="sum")  # -Σ logp: the same gradient as logp.sum()

        def step():
            torch.autograd.grad(ce(W, h, y), leaves)
            sync()

    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def step():  # its defaults (impl="cce", gradient filtering on)
            torch.autograd.grad(linear_cross_entropy(h, W, y, reduction="sum"), leaves)
            sync()

    elif impl == "floor":
        hd, Wd = h.detach(), W.detach()
        g = _randn((h.shape[0], W.shape[0]), h, 7, 1e-3)  # a stand-in dz [N, V], built outside the timing

        def step():
            z = hd @ Wd.T  # [N, D] @ [D, V] -> [N, V]   (forward logits)
            dh = g @ Wd  # [N, V] @ [V, D] -> [N, D]
            dW = g.T @ hd  # [V, N] @ [N, D] -> [V, D]
            del z, dh, dW
            sync()

    else:
        raise ValueError(f"unknown linear_logprobs impl {impl!r}: expected one of {sorted(LINEAR_IMPLS)}")
    return step


def _fused_step(impl: str, x: LinearHeadInputs, device: str) -> Callable[[], None]:
    import vpo.fused
    import vpo.oracle

    sync = _sync(device)
    h, W, y = x.hidden, x.weight, x.labels  # [2B, T, D], [V, D], [2B, T]
    ref_h = h.detach() + _randn(h.shape, h, 1, 0.05)  # the reference model's hidden states
    loss_name, backend = impl.split("/")
    if loss_name == "tpo":
        h_n = (h.detach() + _randn(h.shape, h, 2, 0.1)).requires_grad_()  # policy, noised image
        ref_hn = ref_h + _randn(h.shape, h, 3, 0.1)  # reference, noised image
        leaves = (h, h_n, W)
    else:
        leaves = (h, W)

    if backend == "triton":
        try:
            import vpo_kernels.linear_logprobs  # noqa: F401
        except ImportError as e:
            raise Unavailable(f"vpo_kernels.linear_logprobs does not import: {e}") from e

    if impl in ("dpo/triton", "dpo/torch"):

        def loss():
            return vpo.fused.fused_dpo_loss(W, h, y, ref_hidden=ref_h, impl=backend)[0]

    elif impl in ("tpo/triton", "tpo/torch"):

        def loss():
            return vpo.fused.fused_tpo_loss(W, h, h_n, y, ref_hidden=ref_h, ref_hidden_noised=ref_hn,
                                            impl=backend)[0]

    elif impl == "dpo/naive":

        def loss():
            return vpo.oracle.dpo_loss(W, h, y, ref_hidden=ref_h)[0]

    elif impl == "tpo/naive":

        def loss():
            return vpo.oracle.tpo_loss(W, h, h_n, y, ref_hidden=ref_h, ref_hidden_noised=ref_hn)[0]

    elif impl == "dpo/liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        dpo = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)
        W_ref = W.detach()

        def loss():
            out = dpo(W, h, y, ref_input=ref_h, ref_weight=W_ref)
            return out[0] if isinstance(out, tuple) else out

    else:
        raise ValueError(f"unknown fused_losses impl {impl!r}: expected one of {sorted(FUSED_IMPLS)}")

    def step():
        torch.autograd.grad(loss(), leaves)
        sync()

    return step


def prepare(case: Case, device: str = DEVICE, *, cache: bool = True) -> Callable[[], None]:
    """``step()`` running one fwd+bwd of ``case`` on cached inputs (synchronized on CUDA)."""
    x = inputs(case.shape, device, cache=cache)
    if case.bench in ("linear_logprobs", "memory"):
        return _linear_step(case.impl, x, device)
    if case.bench == "fused_losses":
        return _fused_step(case.impl, x, device)
    raise ValueError(f"unknown bench {case.bench!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------------------


def cuda_peak_mib(step: Callable[[], None]) -> float:
    """Peak of live CUDA tensors during ``step()`` above what was allocated before it, in MiB."""
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MiB


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (``VmHWM``) to the current RSS; False if that is impossible here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024  # the mark really dropped to ~RSS


def _peak_rss_worker(case: Case) -> dict:
    """Runs in a fresh process: one step of ``case`` on CPU; peak RSS rise over the post-input baseline."""
    tiny = Shape("tiny", 2, 4, 8, 16, case.shape.dtype)
    prepare(Case(case.bench, case.impl, tiny), "cpu", cache=False)()  # load kernels/threads/lazy state, tiny tensors
    step = prepare(case, "cpu", cache=False)
    gc.collect()
    reset = _reset_peak_rss()
    base = _proc_status_kib("VmRSS") if reset else _proc_status_kib("VmHWM")
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = _proc_status_kib("VmHWM")
    return {
        "peak_mib": (peak - base) / 1024.0,
        "baseline_rss_mib": base / 1024.0,
        "seconds": seconds,
        "method": "VmHWM rise in a fresh process (clear_refs reset)" if reset
        else "VmHWM rise in a fresh process (no reset possible: under-reports)",
    }


def cpu_peak_rss(case: Case, timeout: float = 900.0) -> dict:
    """Run :func:`_peak_rss_worker` for ``case`` in a fresh interpreter; returns its dict."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), case.to_json()], capture_output=True,
                          text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"peak-RSS worker for {case.id} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def peak_memory_mib(case: Case, step: Callable[[], None]) -> Tuple[float, str]:
    """``(peak MiB above the inputs, method)`` for one step of ``case`` (on CPU in a fresh process)."""
    if DEVICE == "cuda":
        return cuda_peak_mib(step), "CUDA max_memory_allocated rise over the inputs"
    r = cpu_peak_rss(case)
    return r["peak_mib"], r["method"]


# ----------------------------------------------------------------------------------------------------------------------
# The pytest-benchmark side
# ----------------------------------------------------------------------------------------------------------------------


def run_benchmark(benchmark, case: Case) -> None:
    """Warm up, measure peak memory, time ``step()`` with pytest-benchmark, and fill ``benchmark.extra_info``.

    Skips (never fails) when the implementation cannot run here or runs out of device memory.
    """
    import pytest

    if case.impl in OPTIONAL_MODULE:
        pytest.importorskip(OPTIONAL_MODULE[case.impl])
    benchmark.group = f"{case.bench} {case.shape.label}"
    time_base, mem_base = BASELINES[case.bench][case.impl]
    benchmark.extra_info.update(
        bench=case.bench, impl=case.impl, shape=case.shape.label, shape_params=asdict(case.shape),
        flops=flops(case), time_baseline=time_base, memory_baseline=mem_base,
    )
    try:
        step = prepare(case)
        step()  # warm-up: Triton JIT/autotune, cuBLAS workspace, torch.compile (Liger)
        peak, method = peak_memory_mib(case, step)
        benchmark.extra_info.update(peak_mib=peak, memory_method=method)
        benchmark(step)
    except Unavailable as e:
        pytest.skip(str(e))
    except ImportError as e:  # an optional package that imports but lacks the entry point this version expects
        pytest.skip(f"{case.impl}: {e}")
    except torch.cuda.OutOfMemoryError as e:
        step = None
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"CUDA out of memory: {str(e).splitlines()[0]}")
    if benchmark.stats:  # None under --benchmark-disable (one untimed call)
        benchmark.extra_info["tflops"] = flops(case) / benchmark.stats.stats.median / 1e12


if __name__ == "__main__":  # the peak-RSS worker: python _harness.py '<Case json>'
    print(json.dumps(_peak_rss_worker(Case.from_json(sys.argv[1]))))
