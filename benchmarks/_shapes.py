"""Benchmark shapes: LM-head shapes (:class:`Shape`) and image-attention shapes (:class:`AttnShape`), per device.

GPU (bf16): LLaVA-1.5 (D=4096, V=32064) and Qwen2-VL (D=3584, V=152064) heads at N ∈ {2048, 8192, 16384} tokens.
CPU (fp32): small enough that the whole ``pytest benchmarks --benchmark-only`` run stays within ~5 minutes and a
4 GiB peak RSS on a 2-core machine (benchmarks/README.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MiB = float(1 << 20)


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
# The project's CPU memory target: the torch path's peak is <= 0.1x the materialized one's at N=2048, V=98304, D=128
# (materialized: [2048, 98304] fp32 = 768 MiB of logits, as much again for log_softmax and for its gradient: ~2.3 GiB
# in the memory worker, so the worker and the pytest process together stay under 4 GiB; the torch path holds a few
# tiles of 2**24 fp32 elements whatever the shape, so a much smaller N·V would not show the ratio a real vocabulary
# gives).
MEMORY_SHAPE = Shape("memory-target", 2, 1024, 128, 98304, "float32")
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

