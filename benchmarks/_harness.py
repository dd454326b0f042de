"""Shared benchmark machinery: shapes, the implementations under test, peak-memory measurement.

Every benchmark is one :class:`Case` — a benchmark family (``linear_logprobs``, ``fused_losses``, ``token_kl``,
``catpo``, ``memory``: LM-head work on a :class:`Shape`; ``attention_stats``, ``attention_e2e``: image-attention
statistics on an :class:`AttnShape`), an implementation name and a shape. :func:`prepare` turns a case into a
``step()`` closure that runs one forward and one backward (the attention statistics have no backward) and
synchronizes on CUDA, so a wall-clock timer around it measures the GPU work; :func:`flops` gives the FLOP count the
TFLOP/s figure is reported against. ``BASELINES`` names, per family and implementation, what its time and memory are
divided by in the results (same shape), and ``TARGETS`` the project's targets on those ratios.

Inputs come from the tests' builder, :func:`vpo.testing.make_linear_head_inputs`, with every position scored
(``ignore_frac=0``, no prompt), so ``N = rows × seq`` tokens all do the full vocabulary sweep and ``6·N·D·V`` is
the work every implementation must do. The attention steps make each layer's q and k inside the step
(:func:`_layer_qk`), as a model's forward would.

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
  The worker runs with ``MALLOC_MMAP_THRESHOLD_=131072`` (unless set already): every allocation of 128 KiB or more is
  its own mmap, unmapped on free, so RSS follows the live tensors, as CUDA's ``max_memory_allocated`` does. With
  glibc's default, dynamic threshold a freed block of up to 32 MiB raises the threshold and later blocks of that size
  come from the heap, which keeps what is freed; the peak then depends on that history: measured on the eager
  image-attention case (32 maps of 8 MiB), 266 MiB with the fixed threshold every time, 266-368 MiB without.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, Optional, Tuple, Union

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
        short = _short(self.dtype)
        return f"{self.model} N={self.n} (B={self.rows // 2}, T={self.seq}) D={self.dim} V={self.vocab} {short}"

    def tiny(self) -> "Shape":
        """The warm-up shape of the fresh-process memory worker (loads kernels and threads on tiny tensors)."""
        return Shape("tiny", 2, 4, 8, 16, self.dtype)


@dataclass(frozen=True)
class AttnShape:
    """Image-attention statistics of a stack of ``layers`` attention layers: ``batch`` sequences of ``seq`` tokens
    holding ``n_image`` image tokens, ``heads`` query heads over ``kv_heads`` key/value heads of size ``head_dim``."""

    model: str
    batch: int
    seq: int
    n_image: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def id(self) -> str:
        return f"{self.model}-T{self.seq}"

    @property
    def label(self) -> str:
        heads = f"{self.heads}" if self.kv_heads == self.heads else f"{self.heads}/{self.kv_heads}kv"
        return (f"{self.model} B={self.batch} T={self.seq} N_p={self.n_image} L={self.layers} H={heads} "
                f"d={self.head_dim} {_short(self.dtype)}")

    def tiny(self) -> "AttnShape":
        """The memory worker's warm-up: ONE layer of this shape, so that the kernels' and thread pools' scratch for
        these sizes exists before the peak-RSS reset (with a tiny warm-up the first real layer's scratch, ~6 MiB,
        landed in the measured peak of some runs and not others)."""
        return replace(self, model="warm-up", layers=1)


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(dtype, dtype)


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
# On CUDA the chunked torch path runs fp32 GEMMs (~10x the Triton path's time: ~2-4 s per token-KL / Cat-PO step at
# N=16384), so the Cat-PO families (token KL, Cat-PO loss) measure it at N <= this only; the GPU's subject is the Triton
# path. On CPU those families run at cpu-small only (cpu-medium: 2-7 s per step). VPO_BENCH_ALL_SHAPES=1 lifts both.
GPU_TORCH_MAX_TOKENS = 2048
ALL_SHAPES = os.environ.get("VPO_BENCH_ALL_SHAPES", "") == "1"

# Image-attention statistics (bench_attention_stats.py). GPU: LLaVA-1.5-7B's language model (32 layers x 32 heads,
# head dim 128, no GQA) on a 2048-token sequence with 576 image tokens (336 px / 14 px patches), and Qwen2-VL-7B's
# (28 layers, 28 query heads over 4 kv heads: GQA). CPU, fp32, [8, 512, 512] maps (8 MiB a layer): one layer's map fits
# the torch q,k path's 2**24-element score tile, which it then holds with ~50% of temporaries, so eager/qk is ~L/1.5:
# ~6x with 8 layers (`cpu-attn-small`), ~20x with LLaVA-7B's 32 (`cpu-llava-depth`: 256 MiB of eager maps).
ATTN_GPU_SHAPES = (
    AttnShape("llava-1.5-7b", 1, 2048, 576, 32, 32, 32, 128, "bfloat16"),
    AttnShape("qwen2-vl-7b", 1, 2048, 576, 28, 28, 4, 128, "bfloat16"),
)
ATTN_CPU_SHAPES = (
    AttnShape("cpu-attn-small", 1, 512, 64, 8, 8, 8, 32, "float32"),
    AttnShape("cpu-llava-depth", 1, 512, 64, 32, 8, 8, 32, "float32"),
)
ATTN_SHAPES = ATTN_GPU_SHAPES if DEVICE == "cuda" else ATTN_CPU_SHAPES
# The end-to-end variant: a tiny LLaVA (vpo.models.tiny_llava: CLIP tower + projector + Llama LM) with hidden
# heads * head_dim, N_p = (image_size / 8)**2 image tokens, one preference pair (B = 2 rows). Cheap on both devices.
E2E_SHAPES = (AttnShape("tiny-llava", 2, 512, 144, 8, 8, 4, 16, "float32"),)
# Run order (conftest.py): the image-attention shapes first (seconds in all, and one of them carries a target), then
# the LM-head shapes small to large.
SHAPE_ORDER = {s: i for i, s in enumerate((*ATTN_GPU_SHAPES, *ATTN_CPU_SHAPES, *E2E_SHAPES, *GPU_SHAPES, *CPU_SHAPES,
                                           MEMORY_SHAPE))}


# ----------------------------------------------------------------------------------------------------------------------
# Cases and the implementations they name
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    bench: str  # a key of BASELINES ("linear_logprobs", "fused_losses", "token_kl", "catpo", ...) or "memory"
    impl: str
    shape: Union[Shape, "AttnShape"]

    @property
    def id(self) -> str:
        return f"{self.shape.id}-{self.impl}"

    def to_json(self) -> str:
        return json.dumps({"bench": self.bench, "impl": self.impl, "shape_kind": type(self.shape).__name__,
                           "shape": asdict(self.shape)})

    @staticmethod
    def from_json(text: str) -> "Case":
        d = json.loads(text)
        kind = AttnShape if d.get("shape_kind") == "AttnShape" else Shape
        return Case(d["bench"], d["impl"], kind(**d["shape"]))


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
# Per-token KL (bench_token_kl.py): vpo.linear_token_kl against the naive materializing KL, and linear_logprobs at the
# same shape, the time the KL is held to (GPU target: kl/triton <= 1.6x logprobs/triton).
TOKEN_KL_IMPLS: Dict[str, Tuple[Optional[str], Optional[str]]] = {
    "logprobs/triton": (None, None),  # vpo.linear_logprobs(impl="triton"), fwd+bwd of logp.sum()
    "kl/triton": ("logprobs/triton", "kl/naive"),  # vpo.linear_token_kl(impl="triton"), fwd+bwd of kl.sum()
    "logprobs/torch": (None, None),
    "kl/torch": ("logprobs/torch", "kl/naive"),
    "kl/naive": ("kl/torch", None),  # full [N, V] logits of both models, fp32 log_softmax, Σ p·(log p − log q)
}
# Cat-PO's loss (bench_token_kl.py) against fused DPO on the same backend and the materializing oracle.
CATPO_IMPLS: Dict[str, Tuple[Optional[str], Optional[str]]] = {
    "dpo/triton": (None, None),  # vpo.fused_dpo_loss, with the reference's hidden states
    "catpo/triton": ("dpo/triton", "catpo/naive"),  # vpo.fused_catpo_loss: weighted DPO + 0.03 · weighted KL
    "dpo/torch": (None, None),
    "catpo/torch": ("dpo/torch", "catpo/naive"),
    "catpo/naive": ("catpo/torch", None),  # vpo.oracle.catpo_loss: full logits in the input dtype
}
# Image-attention statistics (bench_attention_stats.py): the q,k route first, so that the eager route's ratios (its
# memory over the q,k route's: the target is >= 20x on the GPU shape) are known when it finishes.
_QK_ROUTE = "qk/triton" if DEVICE == "cuda" else "qk/torch"  # what impl="auto" runs here
ATTN_IMPLS: Dict[str, Tuple[Optional[str], Optional[str]]] = {
    "qk/triton": (None, None),  # image_attention_from_qk(impl="triton") per layer + ImageAttentionAccumulator
    "qk/torch": (None, None),  # image_attention_from_qk(impl="torch")
    "eager": (_QK_ROUTE, _QK_ROUTE),  # L maps [B, H, T, T] held (output_attentions=True), image_attention_from_probs
}
# The same comparison through a real transformers forward of a tiny LLaVA.
E2E_IMPLS: Dict[str, Tuple[Optional[str], Optional[str]]] = {
    "capture": (None, None),  # sdpa forward inside vpo.integrations.capture_image_attention
    "eager-output-attentions": ("capture", "capture"),  # eager forward, output_attentions=True, per-layer gather
}
CUDA_ONLY = {"triton", "liger-flce", "cce", "dpo/triton", "tpo/triton", "dpo/liger", "logprobs/triton", "kl/triton",
             "catpo/triton", "qk/triton"}
# Optional third-party baselines: the module that must import (pytest.importorskip).
OPTIONAL_MODULE = {"liger-flce": "liger_kernel", "dpo/liger": "liger_kernel", "cce": "cut_cross_entropy",
                   "capture": "transformers", "eager-output-attentions": "transformers"}
BASELINES = {"linear_logprobs": LINEAR_IMPLS, "fused_losses": FUSED_IMPLS, "token_kl": TOKEN_KL_IMPLS,
             "catpo": CATPO_IMPLS, "attention_stats": ATTN_IMPLS, "attention_e2e": E2E_IMPLS}
FAMILY_SHAPES = {"attention_stats": ATTN_SHAPES, "attention_e2e": E2E_SHAPES}
# End-to-end training step (bench_train_step.py, which builds its model, batch and steps itself): the trainer's path
# (hidden states + fused loss) against the same model producing full [2B, T, V] logits (materialized log_softmax).
TRAIN_STEP_IMPLS: Dict[str, Tuple[Optional[str], Optional[str]]] = {
    "dpo/materialized": (None, None),
    "dpo/vpo": ("dpo/materialized", "dpo/materialized"),  # targets on GPU: >= 1.5x tokens/s, <= 0.6x step memory
    "tpo/materialized": ("dpo/materialized", None),
    "tpo/vpo": ("tpo/materialized", "tpo/materialized"),
}
BASELINES["train_step"] = TRAIN_STEP_IMPLS


@dataclass(frozen=True)
class Target:
    """A project target on a ratio of the results table: ``extra_info[metric] op value``, on ``device`` only."""

    metric: str  # "time_ratio" | "memory_ratio"
    op: str  # "<=" | ">="
    value: float
    device: str = "cuda"
    shapes: Optional[Tuple[str, ...]] = None  # Shape.id values it applies to; None: every shape

    def applies(self, shape) -> bool:
        return self.device == DEVICE and (self.shapes is None or shape.id in self.shapes)

    def met(self, x: float) -> bool:
        return x <= self.value if self.op == "<=" else x >= self.value

    def __str__(self) -> str:
        return f"{self.metric.replace('_', ' ')} {'≤' if self.op == '<=' else '≥'} {self.value:g}"


TARGETS: Dict[Tuple[str, str], Target] = {
    ("fused_losses", "tpo/triton"): Target("time_ratio", "<=", 1.15),  # TPO <= 1.15x DPO
    ("token_kl", "kl/triton"): Target("time_ratio", "<=", 1.6),  # KL <= 1.6x log-probs
    # eager maps >= 20x the q,k route's memory: LLaVA-1.5-7B's shape on GPU, the same ratio at a CPU scale
    ("attention_stats", "eager"): Target("memory_ratio", ">=", 20.0, DEVICE,
                                         (ATTN_GPU_SHAPES[0].id, ATTN_CPU_SHAPES[1].id)),
}


def _measured_at(bench: str, impl: str, shape) -> bool:
    """Cases left out to keep a run short unless ``VPO_BENCH_ALL_SHAPES=1`` (benchmarks/README.md): the token-KL and
    Cat-PO torch paths above ``GPU_TORCH_MAX_TOKENS`` on CUDA, and those families beyond ``cpu-small`` on CPU."""
    if ALL_SHAPES or bench not in ("token_kl", "catpo"):
        return True
    if DEVICE == "cuda":
        return not impl.endswith("/torch") or shape.n <= GPU_TORCH_MAX_TOKENS
    return shape == CPU_SHAPES[0]


def cases(bench: str):
    """Every (shape, impl) of ``bench`` that this machine can run, shape-major (small shapes first)."""
    impls = [i for i in BASELINES[bench] if DEVICE == "cuda" or i not in CUDA_ONLY]
    return [Case(bench, impl, shape) for shape in FAMILY_SHAPES.get(bench, SHAPES) for impl in impls
            if _measured_at(bench, impl, shape)]


def flops(case: Case) -> float:
    """Useful FLOPs of one fwd+bwd. Log-probs: 3 GEMMs of 2·N·D·V (z = h·Wᵀ, dh = dz·W, dW = dzᵀ·h).
    Losses and the token KL: the policy's fwd+bwd (6·N·D·V) plus the reference's forward (2·N·D·V); TPO's
    target-logit passes are O(N·D) and not counted. Implementations that do more (the naive TPO materializes the
    noised logits too; Cat-PO sweeps the vocabulary for log-probs and again for the KL; recomputation in the
    backward) are still rated against this. Image-attention statistics: the causal half of the scores ``q·kᵀ``,
    ``2·B·Hq·d·T(T+1)/2`` per layer, whatever else a route computes (eager: the full square and the softmax)."""
    s = case.shape
    if isinstance(s, AttnShape):
        return float(s.batch * s.heads * s.head_dim * s.seq * (s.seq + 1) * s.layers)
    per_gemm = 2.0 * s.n * s.dim * s.vocab
    logprobs_only = case.bench in ("linear_logprobs", "memory") or case.impl.startswith("logprobs/")
    return (3 if logprobs_only else 4) * per_gemm


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
        _require_kernels("vpo_kernels.linear_logprobs", *(["vpo_kernels.token_kl"] if loss_name == "catpo" else []))
    if loss_name == "catpo":  # Cat-PO's token weights: constants in [0.5, 1.5] (the reference model's, in training)
        g = torch.Generator(device=y.device).manual_seed(4)
        token_w = torch.rand(y.shape, generator=g, device=y.device, dtype=torch.float32).add_(0.5)  # [2B, T]

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

    elif impl in ("catpo/triton", "catpo/torch"):

        def loss():
            return vpo.fused.fused_catpo_loss(W, h, y, token_w, ref_hidden=ref_h, impl=backend)[0]

    elif impl == "catpo/naive":

        def loss():
            return vpo.oracle.catpo_loss(W, h, y, token_w, ref_hidden=ref_h)[0]

    elif impl == "dpo/liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        dpo = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)
        W_ref = W.detach()

        def loss():
            out = dpo(W, h, y, ref_input=ref_h, ref_weight=W_ref)
            return out[0] if isinstance(out, tuple) else out

    else:
        raise ValueError(f"unknown fused_losses/catpo impl {impl!r}: expected one of "
                         f"{sorted({*FUSED_IMPLS, *CATPO_IMPLS})}")

    def step():
        torch.autograd.grad(loss(), leaves)
        sync()

    return step


def _require_kernels(*modules: str) -> None:
    """Raise :class:`Unavailable` unless every ``vpo_kernels`` module imports (Triton present, sources built)."""
    import importlib

    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise Unavailable(f"{mod} does not import: {e}") from e


def naive_token_kl(h: torch.Tensor, W: torch.Tensor, h_ref: torch.Tensor, W_ref: torch.Tensor) -> torch.Tensor:
    """The materializing baseline as distillation / KL-regularized training code writes it: both models' logits
    ``[N, V]`` in the compute dtype, upcast to fp32, ``log_softmax`` each, ``Σ_v p (log p − log q)``; the reference
    side is a constant."""
    log_p = torch.log_softmax((h @ W.T).float(), dim=-1)  # [N, D] @ [D, V] -> [N, V], fp32
    with torch.no_grad():
        log_q = torch.log_softmax((h_ref @ W_ref.T).float(), dim=-1)  # [N, V] fp32
    return (log_p.exp() * (log_p - log_q)).sum(-1)  # [N]


def _token_kl_step(impl: str, x: LinearHeadInputs, device: str) -> Callable[[], None]:
    """``logprobs/*``: :func:`_linear_step`; ``kl/*``: fwd+bwd of ``kl.sum()`` against the reference's hidden states
    (the policy's plus noise, as in the loss benchmarks), sharing the policy's head as Cat-PO does."""
    family, backend = impl.split("/")
    if family == "logprobs":
        return _linear_step(backend, x, device)
    if impl not in TOKEN_KL_IMPLS:
        raise ValueError(f"unknown token_kl impl {impl!r}: expected one of {sorted(TOKEN_KL_IMPLS)}")
    from vpo.ops.token_kl import linear_token_kl

    sync = _sync(device)
    D = x.hidden.shape[-1]
    h, W, y = x.hidden.reshape(-1, D), x.weight, x.labels.reshape(-1)  # [N, D], [V, D], [N]
    h_ref = h.detach() + _randn(h.shape, h, 1, 0.05)  # [N, D] the reference model's hidden states
    leaves = (x.hidden, x.weight)
    if backend == "triton":
        _require_kernels("vpo_kernels.token_kl")

    if backend == "naive":

        def kl():
            return naive_token_kl(h, W, h_ref, W.detach())

    else:

        def kl():
            return linear_token_kl(h, W, h_ref, labels=y, impl=backend)  # labels: the mask, all valid here

    def step():
        torch.autograd.grad(kl().sum(), leaves)
        sync()

    return step


def _layer_qk(shape: "AttnShape", layer: int, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s post-RoPE ``q [B, Hq, T, d]`` and ``k [B, Hkv, T, d]``: seeded N(0, 1) in the shape's dtype,
    generated on the device (what the model's q/k projections and RoPE would hand the attention)."""
    g = torch.Generator(device=device).manual_seed(1000 + layer)
    B, T, d = shape.batch, shape.seq, shape.head_dim
    q = torch.randn((B, shape.heads, T, d), generator=g, device=device, dtype=shape.torch_dtype)
    k = torch.randn((B, shape.kv_heads, T, d), generator=g, device=device, dtype=shape.torch_dtype)
    return q, k


def image_positions(shape: "AttnShape", device: str) -> torch.Tensor:
    """``[B, N_p]`` key positions of the image block, LLaVA's layout: a short prompt prefix, the image, then text."""
    start = min(8, shape.seq - shape.n_image)
    return (start + torch.arange(shape.n_image, device=device)).expand(shape.batch, -1).contiguous()


def _attention_step(impl: str, shape: "AttnShape", device: str) -> Callable[[], None]:
    """One model-like sweep over ``shape.layers`` layers producing the head- and layer-averaged image attention
    ``[B, T, N_p]`` (every query row) by ``impl``; q and k are generated per layer inside the step (both routes),
    so the step's peak holds one layer's q, k plus what the route itself keeps.

    - ``eager``: HF's ``eager_attention_forward`` up to the probabilities: ``repeat_kv``, ``q·kᵀ·scale`` in the
      compute dtype, the additive causal mask (built once per forward, ``[T, T]``), ``softmax`` in fp32, cast back;
      every layer's ``[B, H, T, T]`` map is kept, as ``output_attentions=True`` returns them all; then
      ``image_attention_from_probs`` per layer into an ``ImageAttentionAccumulator``. (``probs @ v`` is left out: both
      routes would compute the layer's output.)
    - ``qk/<impl>``: ``image_attention_from_qk(q, k, ...)`` per layer into the accumulator; nothing ``[T, T]``.
    """
    from vpo.ops.attention_stats import ImageAttentionAccumulator, image_attention_from_probs, image_attention_from_qk

    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention_stats impl {impl!r}: expected one of {sorted(ATTN_IMPLS)}")
    sync = _sync(device)
    ipos = image_positions(shape, device)  # [B, N_p]
    L, G, dtype = shape.layers, shape.heads // shape.kv_heads, shape.torch_dtype
    scale = shape.head_dim ** -0.5

    if impl == "eager":

        def step():
            with torch.no_grad():
                T = shape.seq
                mask = torch.full((T, T), float("-inf"), device=device, dtype=dtype).triu_(1)  # [T, T] additive
                maps = []  # output_attentions=True: L x [B, H, T, T]
                for layer in range(L):
                    q, k = _layer_qk(shape, layer, device)
                    k = k.repeat_interleave(G, dim=1) if G > 1 else k  # repeat_kv: [B, Hkv, T, d] -> [B, Hq, T, d]
                    s = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, Hq, T, d] @ [B, Hq, d, T] -> [B, Hq, T, T]
                    s = s + mask
                    maps.append(torch.softmax(s, dim=-1, dtype=torch.float32).to(dtype))
                    del q, k, s
                acc = ImageAttentionAccumulator(num_layers=L)
                for layer, p in enumerate(maps):
                    acc.add(layer, image_attention_from_probs(p, ipos))  # [B, T, N_p]
                a = acc.mean()
                del maps, a
            sync()

    else:
        backend = impl.split("/")[1]
        if backend == "triton":
            _require_kernels("vpo_kernels.attention_stats")

        def step():
            acc = ImageAttentionAccumulator(num_layers=L)
            for layer in range(L):
                q, k = _layer_qk(shape, layer, device)
                acc.add(layer, image_attention_from_qk(q, k, ipos, scale=scale, impl=backend))  # [B, T, N_p]
                del q, k
            a = acc.mean()
            del a
            sync()

    return step


def _e2e_step(impl: str, shape: "AttnShape", device: str) -> Callable[[], None]:
    """A tiny LLaVA's forward (no grad, as ``catpo_weights_for_batch`` runs it) and the image attention of its
    language model averaged over every layer: ``eager-output-attentions`` = the eager model with
    ``output_attentions=True`` then ``image_attention_from_probs`` per returned map; ``capture`` = the sdpa model
    inside ``capture_image_attention`` (``image_attention_from_qk``, ``impl="auto"``)."""
    if impl not in E2E_IMPLS:
        raise ValueError(f"unknown attention_e2e impl {impl!r}: expected one of {sorted(E2E_IMPLS)}")
    try:
        from vpo.integrations import capture_image_attention, image_token_positions
        from vpo.models import make_inputs, tiny_llava
    except ImportError as e:
        raise Unavailable(f"the end-to-end variant needs transformers: {e}") from e
    from vpo.ops.attention_stats import ImageAttentionAccumulator, image_attention_from_probs

    side = int(round(shape.n_image ** 0.5))
    if side * side != shape.n_image:
        raise ValueError(f"{shape.label}: the tiny LLaVA needs a square N_p (image_size / patch_size squared)")
    tiny = tiny_llava(vocab_size=128, hidden_size=shape.heads * shape.head_dim, num_layers=shape.layers,
                      num_heads=shape.heads, num_kv_heads=shape.kv_heads, image_size=8 * side, patch_size=8)
    model = tiny.model.to(device=device, dtype=shape.torch_dtype)
    batch = {k: v.to(device) for k, v in make_inputs(tiny, batch_size=shape.batch, seq_len=shape.seq).items()}
    batch["pixel_values"] = batch["pixel_values"].to(shape.torch_dtype)
    ipos = image_token_positions(batch["input_ids"], tiny.image_token_id)  # [B, N_p]
    sync = _sync(device)
    kw = dict(use_cache=False, logits_to_keep=1)

    if impl == "eager-output-attentions":
        model.set_attn_implementation("eager")

        def run():
            with torch.no_grad():
                maps = model(**batch, output_attentions=True, **kw).attentions  # L x [B, H, T, T]
                acc = ImageAttentionAccumulator(num_layers=len(maps))
                for layer, p in enumerate(maps):
                    acc.add(layer, image_attention_from_probs(p, ipos))
                a = acc.mean()
                del maps, a
            sync()

    else:

        def run():
            with torch.no_grad(), capture_image_attention(model, ipos) as cap:
                model(**batch, **kw)
            a = cap.result()
            del a
            sync()

    if device == "cuda":
        return run

    def step():  # one thread on CPU, as vpo.models.tiny advises: its ops are too small to share (measured 20x slower
        threads = torch.get_num_threads()  # with 2 threads on 2 busy cores)
        torch.set_num_threads(1)
        try:
            run()
        finally:
            torch.set_num_threads(threads)

    return step


def _attention_prepare(case: Case, device: str) -> Callable[[], None]:
    clear_inputs()  # the linear-head inputs of the last shape are not needed any more
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if case.bench == "attention_e2e":
        return _e2e_step(case.impl, case.shape, device)
    return _attention_step(case.impl, case.shape, device)


def prepare(case: Case, device: str = DEVICE, *, cache: bool = True) -> Callable[[], None]:
    """``step()`` running one fwd+bwd of ``case`` on cached inputs (synchronized on CUDA)."""
    if case.bench in ("attention_stats", "attention_e2e"):
        return _attention_prepare(case, device)
    x = inputs(case.shape, device, cache=cache)
    if case.bench in ("linear_logprobs", "memory"):
        return _linear_step(case.impl, x, device)
    if case.bench in ("fused_losses", "catpo"):
        return _fused_step(case.impl, x, device)
    if case.bench == "token_kl":
        return _token_kl_step(case.impl, x, device)
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
    tiny = case.shape.tiny()
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
        "method": ("VmHWM rise in a fresh process (clear_refs reset)" if reset
                   else "VmHWM rise in a fresh process (no reset possible: under-reports)")
        + (f"; MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
           if os.environ.get("MALLOC_MMAP_THRESHOLD_") else ""),
    }


def cpu_peak_rss(case: Case, timeout: float = 900.0) -> dict:
    """Run :func:`_peak_rss_worker` for ``case`` in a fresh interpreter; returns its dict."""
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ}  # live-tensor RSS (module docstring); an outer value wins
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), case.to_json()], capture_output=True,
                          text=True, timeout=timeout, env=env)
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
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(tflops=flops(case) / median / 1e12, median_s=median)
    _link_ratios(case, benchmark.extra_info)


# (bench, shape) -> impl -> the live ``extra_info`` dict of every benchmark measured so far in this session.
_MEASURED: Dict[tuple, Dict[str, dict]] = {}


def _link_ratios(case: Case, info: dict) -> None:
    """Fill ``time_ratio`` / ``memory_ratio`` (over the baselines named in ``BASELINES``, same shape) and, where a
    :data:`TARGETS` entry applies, ``target`` / ``target_met``, in this benchmark's ``extra_info`` and in those of the
    same shape measured before it whose baseline it is (the dicts are pytest-benchmark's own, written out later)."""
    peers = _MEASURED.setdefault((case.bench, case.shape), {})
    peers[case.impl] = info
    for impl, e in peers.items():
        time_base, mem_base = BASELINES[case.bench][impl]
        t, m = peers.get(time_base), peers.get(mem_base)
        if t is not None and e.get("median_s") and t.get("median_s"):
            e["time_ratio"] = e["median_s"] / t["median_s"]
        if m is not None and e.get("peak_mib") is not None and (m.get("peak_mib") or 0) > 0:
            e["memory_ratio"] = e["peak_mib"] / m["peak_mib"]
        target = TARGETS.get((case.bench, impl))
        if target is not None and target.applies(case.shape):
            e["target"] = str(target)
            if e.get(target.metric) is not None:
                e["target_met"] = target.met(e[target.metric])


if __name__ == "__main__":  # the peak-RSS worker: python _harness.py '<Case json>'
    print(json.dumps(_peak_rss_worker(Case.from_json(sys.argv[1]))))
