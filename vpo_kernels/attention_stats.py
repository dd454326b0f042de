"""Head-averaged attention of query rows on the image keys from post-RoPE ``q`` and ``k``, never materializing [T, T].

docs/methods.md, Cat-PO and "Kernel contracts", image-attention stats route (b). For batch row ``b``, query head ``h``
(kv head ``h // G`` with ``G = Hq // Hkv``), query position ``i = qpos[b, t]`` and key position ``j``::

    s_h(i, j)  = scale · q[b, h, i] · k[b, h // G, j]
    vis(i, j)  = (j <= i if causal) and key_padding_mask[b, j]
    lse_h(i)   = logsumexp_{j : vis(i, j)} s_h(i, j)                    (-inf when no key is visible)
    out[b, t, n] = (1 / Hq) Σ_h exp(s_h(i, p_n) - lse_h(i)) · vis(i, p_n),     p_n = image_pos[b, n]

Two kernels:

1. ``_qk_lse_kernel`` — grid ``(B · Hq, cdiv(Tq, BLOCK_Q))``. Each program holds a ``[BLOCK_Q, d]`` query tile and
   sweeps the keys in ``[BLOCK_K, d]`` blocks with the flash-attention online logsumexp
   (``m' = max(m, max_j s)``, ``l' = l · exp(m - m') + Σ_j exp(s - m')``), writing ``lse [B, Hq, Tq]`` fp32.
   Under ``causal`` the sweep stops after the block holding the block's largest query position: keys beyond it are
   invisible to every row of the tile.
2. ``_image_probs_kernel`` — grid ``(B, cdiv(Tq, BLOCK_Q), cdiv(N_p, BLOCK_P))``. Each program owns one
   ``[BLOCK_Q, BLOCK_P]`` tile of the output and loops over the ``Hq`` heads: it gathers the ``BLOCK_P`` image keys of
   the head's kv head (through ``image_pos``), recomputes their scores against the query tile, and accumulates
   ``exp(s - lse)`` in registers; the tile is written once, divided by ``Hq``.

Why two kernels and a head loop rather than one kernel with atomics: the output tile is owned by one program, so the
sum over heads is deterministic, needs no zero-initialised output and no fp32 atomics; the only extra traffic is the
``[B, Hq, Tq]`` lse scratch (4 bytes per query row and head) and re-reading the query tile once per image block — both
small next to pass 1, which reads all ``T`` keys for every query tile. Pass 1 keeps the heads in the grid so there is
parallelism (``B · Hq · cdiv(Tq, BLOCK_Q)`` programs) even for short responses.

A row that sees no key gets ``lse = -inf`` and, since ``vis`` is then False for every image key, an exact 0 (never
NaN). Scores are fp32 (``tl.dot`` of fp16/bf16 inputs accumulates in fp32; fp32 inputs use ``input_precision="ieee"``
by default, not TF32, so they match a float32 reference). float64 inputs are not supported here (the torch path
handles them). No gradient: Cat-PO weights are constants from the reference model.

Layout: ``q [B, Hq, T, d]``, ``k [B, Hkv, T, d]`` with arbitrary element strides (HF's ``[B, T, H, d]``-transposed views
need no copy); ``image_pos [B, N_p]``, ``query_pos [B, Tq]`` int64 (made contiguous); ``key_padding_mask [B, T]``
passed as int8.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["QKStatsConfig", "default_qk_stats_config", "image_attention_from_qk_triton"]


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output that a kernel fully writes is allocated here (the tests replace it by a NaN fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class QKStatsConfig:
    """Tiles: ``block_q`` query rows, ``block_k`` keys per lse step, ``block_p`` image keys per output tile.

    ``fp32_precision`` is the ``tl.dot`` input precision for float32 ``q``/``k`` (``"ieee"`` exact, ``"tf32"`` faster).
    """

    block_q: int = 64
    block_k: int = 64
    block_p: int = 64
    num_warps: int = 4
    num_stages: int = 2
    fp32_precision: str = "ieee"


def default_qk_stats_config(head_dim: int) -> QKStatsConfig:
    if _interpreting():
        # ~2 ms per program iteration under the interpreter: few programs, few key steps. 16 is tl.dot's minimum.
        return QKStatsConfig(block_q=16, block_k=64, block_p=16, num_warps=1, num_stages=1)
    # flash-attention-forward-like tiles: [64, d] query tile and [64, d] key tile in fp16/bf16 are 16 KiB each at
    # d = 128. Not timed (no GPU in this session): a starting point, not a tuned value. 8 warps: with 4 the kernels
    # spilled (tests/test_aot_compile.py, Triton 3.9: _image_probs_kernel 504 B per thread on sm_90, _qk_lse_kernel 8 B
    # on sm_80); with 8, _qk_lse_kernel is clean and _image_probs_kernel spills 16 B (listed in vpo_kernels/_aot.py).
    if head_dim > 128:
        return QKStatsConfig(block_q=64, block_k=32, block_p=32, num_warps=4, num_stages=2)
    return QKStatsConfig(block_q=64, block_k=64, block_p=64, num_warps=8, num_stages=2)


@triton.jit
def _load_query_tile(q_ptr, b, h, qpos, in_q, offs_d, D, sqb, sqh, sqt, sqd):
    """``[BLOCK_Q, BLOCK_D]`` query rows ``qpos`` of head ``h`` in batch row ``b`` (0 outside ``in_q`` / ``D``)."""
    base = q_ptr + tl.cast(b, tl.int64) * sqb + tl.cast(h, tl.int64) * sqh  # int64: no overflow on big batches
    ptrs = base + qpos[:, None] * sqt + offs_d[None, :] * sqd
    return tl.load(ptrs, mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _qk_lse_kernel(q_ptr, k_ptr, qpos_ptr, kmask_ptr, lse_ptr,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                   HQ, T, TQ, D, GROUP, scale,
                   HAS_QPOS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                   DOT_PRECISION: tl.constexpr,
                   BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (B * HQ, cdiv(TQ, BLOCK_Q)); axis 0 has no 65535 limit, axis 1 is small (TQ / BLOCK_Q).
    pid_bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP  # grouped-query attention: G query heads share one kv head

    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BLOCK_Q] rows of the output
    in_q = offs_q < TQ
    if HAS_QPOS:
        qpos = tl.load(qpos_ptr + b.to(tl.int64) * TQ + offs_q, mask=in_q, other=0).to(tl.int64)  # [BLOCK_Q]
    else:
        qpos = offs_q.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_query_tile(q_ptr, b, h, qpos, in_q, offs_d, D, sqb, sqh, sqt, sqd)  # [BLOCK_Q, BLOCK_D]

    k_base = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)  # running max of the visible scores
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)  # running Σ exp(s - m_i)
    if CAUSAL:
        # Keys after the block's last query are invisible to all its rows: stop the sweep there.
        hi = (tl.max(tl.where(in_q, qpos, 0), axis=0) + 1).to(tl.int32)
    else:
        hi = T
    for k0 in range(0, hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        in_k = offs_k < T
        kt = tl.load(k_base + offs_k[None, :] * skt + offs_d[:, None] * skd,
                     mask=in_k[None, :] & (offs_d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_K] = k block, transposed
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale  # [BLOCK_Q, BLOCK_D] @ [BLOCK_D, BLOCK_K] -> [BQ, BK]
        vis = in_k[None, :] & in_q[:, None]  # [BLOCK_Q, BLOCK_K]
        if CAUSAL:
            vis = vis & (offs_k[None, :] <= qpos[:, None])
        if HAS_MASK:
            km = tl.load(kmask_ptr + b.to(tl.int64) * T + offs_k, mask=in_k, other=0)  # [BLOCK_K] 1 = real token
            vis = vis & (km[None, :] != 0)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BLOCK_Q]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: exp(-inf - 0) = 0
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0.0, m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))  # -inf: the row sees no key
    tl.store(lse_ptr + pid_bh.to(tl.int64) * TQ + offs_q, lse, mask=in_q)


@triton.jit
def _image_probs_kernel(q_ptr, k_ptr, qpos_ptr, ipos_ptr, kmask_ptr, lse_ptr, out_ptr,
                        sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                        HQ, T, TQ, NP, D, GROUP, scale, inv_hq,
                        HAS_QPOS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                        DOT_PRECISION: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (B, cdiv(TQ, BLOCK_Q), cdiv(NP, BLOCK_P)); axes 1 and 2 stay far below 65535 for real shapes.
    b = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_p = tl.program_id(2)
    b64 = b.to(tl.int64)

    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BLOCK_Q]
    in_q = offs_q < TQ
    if HAS_QPOS:
        qpos = tl.load(qpos_ptr + b64 * TQ + offs_q, mask=in_q, other=0).to(tl.int64)
    else:
        qpos = offs_q.to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] image-token indices n
    in_p = offs_p < NP
    ipos = tl.load(ipos_ptr + b64 * NP + offs_p, mask=in_p, other=0).to(tl.int64)  # [BLOCK_P] key positions p_n
    offs_d = tl.arange(0, BLOCK_D)

    # Visibility of image key p_n to query row i, the same for every head: [BLOCK_Q, BLOCK_P].
    vis = in_q[:, None] & in_p[None, :]
    if CAUSAL:
        vis = vis & (ipos[None, :] <= qpos[:, None])
    if HAS_MASK:
        km = tl.load(kmask_ptr + b64 * T + ipos, mask=in_p, other=0)  # [BLOCK_P]
        vis = vis & (km[None, :] != 0)

    acc = tl.zeros([BLOCK_Q, BLOCK_P], dtype=tl.float32)  # Σ_h p_h(i, p_n)
    for h in range(0, HQ):
        hk = h // GROUP
        q = _load_query_tile(q_ptr, b, h, qpos, in_q, offs_d, D, sqb, sqh, sqt, sqd)  # [BLOCK_Q, BLOCK_D]
        kt = tl.load(k_ptr + b64 * skb + tl.cast(hk, tl.int64) * skh + ipos[None, :] * skt + offs_d[:, None] * skd,
                     mask=in_p[None, :] & (offs_d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_P] gathered image keys
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale  # [BQ, BD] @ [BD, BP] -> [BLOCK_Q, BLOCK_P]
        lse = tl.load(lse_ptr + (b64 * HQ + h) * TQ + offs_q, mask=in_q, other=0.0)  # [BLOCK_Q]
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # such rows have vis False everywhere; keep exp finite
        acc += tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
    out_ptrs = out_ptr + (b64 * TQ + offs_q[:, None]) * NP + offs_p[None, :]
    tl.store(out_ptrs, acc * inv_hq, mask=in_q[:, None] & in_p[None, :])


def image_attention_from_qk_triton(q: torch.Tensor, k: torch.Tensor, image_pos: torch.Tensor,
                                   query_pos: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                                   scale: float, causal: bool, *,
                                   config: Optional[QKStatsConfig] = None) -> torch.Tensor:
    """Host launcher on validated inputs (``vpo.ops.attention_stats.image_attention_from_qk`` checks them).

    q ``[B, Hq, T, d]``, k ``[B, Hkv, T, d]`` (same dtype: float16/bfloat16/float32; any strides),
    image_pos ``[B, N_p]`` int64, query_pos ``[B, Tq]`` int64 or None (every row),
    key_padding_mask ``[B, T]`` bool or None.
    Returns ``[B, Tq, N_p]`` float32. Allocates only the output and an ``[B, Hq, Tq]`` fp32 lse scratch. No host sync.
    """
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must have dtype float16, bfloat16 or float32 for the Triton path, got {q.dtype}")
    if k.dtype != q.dtype:
        raise ValueError(f"k has dtype {k.dtype} but q has dtype {q.dtype}: expected the same dtype")
    B, HQ, T, D = q.shape
    HKV = k.shape[1]
    NP = image_pos.shape[1]
    TQ = T if query_pos is None else query_pos.shape[1]
    cfg = config or default_qk_stats_config(D)
    block_d = max(16, triton.next_power_of_2(D))
    image_pos = image_pos.contiguous()
    qpos = query_pos.contiguous() if query_pos is not None else image_pos  # dummy pointer when absent
    kmask = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else image_pos
    precision = cfg.fp32_precision if q.dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs

    out = _empty((B, TQ, NP), torch.float32, q.device)
    if B == 0 or TQ == 0:
        return out
    lse = torch.empty((B, HQ, TQ), dtype=torch.float32, device=q.device)  # fully written by pass 1
    common = dict(HAS_QPOS=query_pos is not None, HAS_MASK=key_padding_mask is not None, CAUSAL=bool(causal),
                  DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    strides = (*q.stride(), *k.stride())
    _qk_lse_kernel[(B * HQ, triton.cdiv(TQ, cfg.block_q))](
        q, k, qpos, kmask, lse, *strides, HQ, T, TQ, D, HQ // HKV, float(scale),
        BLOCK_Q=cfg.block_q, BLOCK_K=cfg.block_k, BLOCK_D=block_d, **common)
    _image_probs_kernel[(B, triton.cdiv(TQ, cfg.block_q), triton.cdiv(NP, cfg.block_p))](
        q, k, qpos, image_pos, kmask, lse, out, *strides, HQ, T, TQ, NP, D, HQ // HKV, float(scale), 1.0 / HQ,
        BLOCK_Q=cfg.block_q, BLOCK_P=cfg.block_p, BLOCK_D=block_d, **common)
    return out
