"""Benchmark cases: which implementations each family measures, what each is compared with, targets, FLOP counts.

A :class:`Case` is a family (``linear_logprobs``, ``fused_losses``, ``token_kl``, ``catpo``, ``memory``: LM-head work
on a :class:`~_shapes.Shape`; ``attention_stats``, ``attention_e2e``: image-attention statistics on an
:class:`~_shapes.AttnShape`), an implementation name and a shape.

Per family, ``BASELINES`` names what an implementation's time and memory are divided by in ``extra_info``
(``time_ratio`` / ``memory_ratio``, same shape; where ``TARGETS`` apply), and :func:`reference_of` what the summary
table divides by: the materialized logits, the GEMM floor, Liger, Cut Cross-Entropy.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple, Union

from _shapes import (ALL_SHAPES, ATTN_CPU_SHAPES, ATTN_GPU_SHAPES, ATTN_SHAPES, CPU_SHAPES, DEVICE, E2E_SHAPES,
                     GPU_TORCH_MAX_TOKENS, SHAPES, AttnShape, Shape)


class Unavailable(Exception):
    """The implementation cannot run here (a missing optional package, an ``impl`` this vpo does not have yet)."""


@dataclass(frozen=True)
class Case:
    bench: str  # a key of BASELINES or "memory"
    impl: str
    shape: Union[Shape, AttnShape]

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


Baselines = Dict[str, Tuple[Optional[str], Optional[str]]]
# Per implementation: (time baseline, memory baseline) for extra_info's ratios, same family and shape.
LINEAR_IMPLS: Baselines = {
    "gemm": ("floor", "naive"),  # vpo.linear_logprobs(impl="gemm"): cuBLAS GEMMs + small Triton kernels (CUDA)
    "triton": ("floor", "naive"),  # vpo.linear_logprobs(impl="triton"): the fully fused Triton kernels (CUDA)
    "torch": ("floor", "naive"),  # vpo.linear_logprobs(impl="torch"), chunked PyTorch
    "naive": ("floor", None),  # materialized: logits = h @ W.T, log_softmax (fp32), gather
    "floor": (None, "naive"),  # the three GEMMs alone: h·Wᵀ, dz·W, dzᵀ·h
    "liger-flce": ("floor", "naive"),  # LigerFusedLinearCrossEntropyLoss(reduction="sum")
    "cce": ("floor", "naive"),  # cut_cross_entropy.linear_cross_entropy(reduction="sum")
}
FUSED_IMPLS: Baselines = {
    "dpo/gemm": ("dpo/naive", "dpo/naive"),  # vpo.fused_dpo_loss(impl="gemm")
    "dpo/triton": ("dpo/naive", "dpo/naive"),
    "dpo/torch": ("dpo/naive", "dpo/naive"),
    "dpo/naive": (None, None),  # vpo.oracle.dpo_loss: full [N, V] logits in the input dtype
    "dpo/floor": (None, "dpo/naive"),  # four GEMMs: policy h·Wᵀ, dz·W, dzᵀ·h; reference h_ref·Wᵀ
    "dpo/liger": ("dpo/naive", "dpo/naive"),  # LigerFusedLinearDPOLoss(use_ref_model=True)
    "tpo/gemm": ("dpo/gemm", "tpo/naive"),  # target: TPO <= 1.15x DPO on the same backend
    "tpo/triton": ("dpo/triton", "tpo/naive"),
    "tpo/torch": ("dpo/torch", "tpo/naive"),
    "tpo/naive": ("dpo/naive", None),  # vpo.oracle.tpo_loss: also materializes the noised pass's logits
}
# Per-token KL: vpo.linear_token_kl against the materialized KL, and linear_logprobs at the same shape (the GPU target:
# kl/<backend> <= 1.6x logprobs/<backend>).
TOKEN_KL_IMPLS: Baselines = {
    "logprobs/gemm": (None, None),
    "kl/gemm": ("logprobs/gemm", "kl/naive"),
    "logprobs/triton": (None, None),
    "kl/triton": ("logprobs/triton", "kl/naive"),
    "logprobs/torch": (None, None),
    "kl/torch": ("logprobs/torch", "kl/naive"),
    "kl/naive": ("kl/torch", None),  # both models' [N, V] logits, fp32 log_softmax each, Σ p·(log p − log q)
    "kl/floor": (None, "kl/naive"),  # four GEMMs: h·Wᵀ, h_ref·Wᵀ, dz·W, dzᵀ·h
}
# Cat-PO's loss against fused DPO on the same backend and the materializing oracle.
CATPO_IMPLS: Baselines = {
    "dpo/gemm": (None, None),
    "catpo/gemm": ("dpo/gemm", "catpo/naive"),
    "dpo/triton": (None, None),
    "catpo/triton": ("dpo/triton", "catpo/naive"),
    "dpo/torch": (None, None),
    "catpo/torch": ("dpo/torch", "catpo/naive"),
    "catpo/naive": ("catpo/torch", None),  # vpo.oracle.catpo_loss: full logits in the input dtype
    "catpo/floor": (None, "catpo/naive"),  # four GEMMs, as dpo/floor
}
# Image-attention statistics: the q,k route first, so the eager route's ratios are known when it finishes.
_QK_ROUTE = "qk/triton" if DEVICE == "cuda" else "qk/torch"  # what impl="auto" runs here
ATTN_IMPLS: Baselines = {
    "qk/triton": (None, None),  # image_attention_from_qk(impl="triton") per layer + ImageAttentionAccumulator
    "qk/torch": (None, None),  # image_attention_from_qk(impl="torch")
    "eager": (_QK_ROUTE, _QK_ROUTE),  # L maps [B, H, T, T] held (output_attentions=True), image_attention_from_probs
}
E2E_IMPLS: Baselines = {
    "capture": (None, None),  # sdpa forward inside vpo.integrations.capture_image_attention
    "eager-output-attentions": ("capture", "capture"),  # eager forward, output_attentions=True, per-layer gather
}
# End-to-end training step (bench_train_step.py builds its own model, batch and steps).
TRAIN_STEP_IMPLS: Baselines = {
    "dpo/materialized": (None, None),
    "dpo/vpo": ("dpo/materialized", "dpo/materialized"),  # targets on GPU: >= 1.5x tokens/s, <= 0.6x step memory
    "tpo/materialized": ("dpo/materialized", None),
    "tpo/vpo": ("tpo/materialized", "tpo/materialized"),
}
BASELINES: Dict[str, Baselines] = {
    "linear_logprobs": LINEAR_IMPLS, "fused_losses": FUSED_IMPLS, "token_kl": TOKEN_KL_IMPLS, "catpo": CATPO_IMPLS,
    "attention_stats": ATTN_IMPLS, "attention_e2e": E2E_IMPLS, "train_step": TRAIN_STEP_IMPLS,
}
FAMILY_SHAPES = {"attention_stats": ATTN_SHAPES, "attention_e2e": E2E_SHAPES}

# Run only on CUDA: on CPU the Triton kernels run in the interpreter, whose timings say nothing about performance (the
# tests cover their correctness); Liger and CCE are CUDA libraries. On CPU they are collected and skipped with this.
CUDA_ONLY_REASON = ("CUDA only: on CPU Triton runs in its interpreter, whose timings are not performance "
                    "(tests/ check these paths' values)")


def cuda_only(impl: str) -> bool:
    backend = impl.rsplit("/", 1)[-1]
    return backend in ("gemm", "triton", "liger", "liger-flce", "cce")


# Optional third-party baselines: the module that must import (pytest.importorskip).
OPTIONAL_MODULE = {"liger-flce": "liger_kernel", "dpo/liger": "liger_kernel", "cce": "cut_cross_entropy",
                   "capture": "transformers", "eager-output-attentions": "transformers"}


def reference_of(bench: str, impl: str) -> Dict[str, Optional[Tuple[str, str]]]:
    """What the summary table divides ``(bench, impl)``'s time and memory by, as ``(bench, impl)`` keys at the same
    shape: ``materialized`` (the full-logits code), ``floor`` (the plain GEMMs of the same work), ``liger``, ``cce``.
    ``None`` where no such comparison exists (or the row is that reference itself)."""
    loss = impl.split("/")[0] if "/" in impl else None
    out: Dict[str, Optional[Tuple[str, str]]] = {"materialized": None, "floor": None, "liger": None, "cce": None}
    if bench in ("linear_logprobs", "memory"):
        out.update(materialized=(bench, "naive"), floor=("linear_logprobs", "floor"),
                   liger=("linear_logprobs", "liger-flce"), cce=("linear_logprobs", "cce"))
    elif bench == "fused_losses":
        out.update(materialized=(bench, f"{loss}/naive"), floor=(bench, "dpo/floor"))
        if loss == "dpo":
            out["liger"] = (bench, "dpo/liger")
    elif bench == "token_kl":
        if loss == "logprobs":
            out.update(materialized=("linear_logprobs", "naive"), floor=("linear_logprobs", "floor"))
        else:
            out.update(materialized=(bench, "kl/naive"), floor=(bench, "kl/floor"))
    elif bench == "catpo":
        if loss == "dpo":
            out.update(materialized=("fused_losses", "dpo/naive"), floor=("fused_losses", "dpo/floor"))
        else:
            out.update(materialized=(bench, "catpo/naive"), floor=(bench, "catpo/floor"))
    elif bench == "attention_stats":
        out["materialized"] = (bench, "eager")
    elif bench == "attention_e2e":
        out["materialized"] = (bench, "eager-output-attentions")
    elif bench == "train_step":
        out["materialized"] = (bench, f"{loss}/materialized")
    return {k: (None if v == (bench, impl) else v) for k, v in out.items()}


@dataclass(frozen=True)
class Target:
    """A project target on a ratio: ``extra_info[metric] op value``, on ``device`` only."""

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
    ("fused_losses", "tpo/gemm"): Target("time_ratio", "<=", 1.15),
    ("token_kl", "kl/triton"): Target("time_ratio", "<=", 1.6),  # KL <= 1.6x log-probs
    ("token_kl", "kl/gemm"): Target("time_ratio", "<=", 1.6),
    # eager maps >= 20x the q,k route's memory: LLaVA-1.5-7B's shape on GPU, the same ratio at a CPU scale
    ("attention_stats", "eager"): Target("memory_ratio", ">=", 20.0, DEVICE,
                                         (ATTN_GPU_SHAPES[0].id, ATTN_CPU_SHAPES[1].id)),
}


def _measured_at(bench: str, impl: str, shape) -> bool:
    """Cases left out to keep a run short unless ``VPO_BENCH_ALL_SHAPES=1``: the token-KL and Cat-PO torch paths above
    ``GPU_TORCH_MAX_TOKENS`` on CUDA, and those two families beyond ``cpu-small`` on CPU."""
    if ALL_SHAPES or bench not in ("token_kl", "catpo"):
        return True
    if DEVICE == "cuda":
        return not impl.endswith("/torch") or shape.n <= GPU_TORCH_MAX_TOKENS
    return shape == CPU_SHAPES[0]


def cases(bench: str):
    """Every (shape, impl) of ``bench``, shape-major (small shapes first). CUDA-only ones are kept on CPU: the
    benchmark skips them with :data:`CUDA_ONLY_REASON`, so the run lists what it did not measure."""
    return [Case(bench, impl, shape) for shape in FAMILY_SHAPES.get(bench, SHAPES) for impl in BASELINES[bench]
            if _measured_at(bench, impl, shape)]


def flops(case: Case) -> float:
    """Useful FLOPs of one fwd+bwd. Log-probs: 3 GEMMs of 2·N·D·V (z = h·Wᵀ, dh = dz·W, dW = dzᵀ·h) = 6·N·D·V.
    Losses and the token KL: the policy's fwd+bwd plus the reference's forward = 8·N·D·V; TPO's noised passes need
    only the target logits (O(N·D)) and are not counted. Implementations that do more (the naive TPO materializes the
    noised logits too; Cat-PO sweeps the vocabulary for log-probs and again for the KL; a recompute in the backward)
    are still rated against this. Image-attention statistics: the causal half of ``q·kᵀ``, ``B·Hq·d·T(T+1)`` per
    layer, whatever else a route computes."""
    s = case.shape
    if isinstance(s, AttnShape):
        return float(s.batch * s.heads * s.head_dim * s.seq * (s.seq + 1) * s.layers)
    per_gemm = 2.0 * s.n * s.dim * s.vocab
    logprobs_only = case.bench in ("linear_logprobs", "memory") or case.impl.startswith("logprobs/")
    return (3 if logprobs_only else 4) * per_gemm
