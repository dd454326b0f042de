"""Cat-PO image attention: how much each query (response) token attends to each image token, averaged over heads.

docs/methods.md, Cat-PO: ``a_{t,j}`` is the attention probability of response token ``t`` on image token ``j``,
averaged over heads and over a configurable set of layers. Per layer this module computes

    a[b, t, n] = (1 / H) Σ_h P_h[b, i, p_n],       i = query_positions[b, t],   p_n = image_positions[b, n]

and :class:`ImageAttentionAccumulator` averages the per-layer results over the selected layers. Both functions take
``heads=`` to average over a subset of heads instead (``vpo.ops.attention_select``). Two routes
(docs/methods.md, "Kernel contracts", image-attention stats):

(a) :func:`image_attention_from_probs` — from one layer's materialized probabilities ``P [B, H, T, T]`` (eager
    attention with ``output_attentions=True``): a gather of ``Tq × N_p`` entries per head. ``impl="cpp"`` (vpo._C, CPU;
    reads float16/bfloat16 as raw 16-bit words with a hand-written conversion, so the ``[B, H, T, T]`` map is never
    upcast or copied, strided views included), ``"cuda"`` (vpo._C, one thread per output element looping over heads),
    ``"torch"`` (one advanced-indexing gather ``[B, Tq, N_p, H]``).

(b) :func:`image_attention_from_qk` — from the post-RoPE ``q [B, Hq, T, d]`` and ``k [B, Hkv, T, d]`` (what an SDPA /
    flash-attention model computes anyway), never materializing ``[T, T]`` per (batch, head)::

        s_h(i, j) = scale · q_h[i] · k_{h // G}[j],        vis(i, j) = (j <= i if causal) and key_padding_mask[b, j]
        lse_h(i)  = logsumexp_{j : vis(i, j)} s_h(i, j)    (over ALL visible keys, image or not)
        a[b, t, n] = (1 / Hq) Σ_h exp(s_h(i, p_n) − lse_h(i)) · vis(i, p_n)

    ``impl="triton"`` (``vpo_kernels.attention_stats``: an online-logsumexp pass over key blocks, then a pass over the
    gathered image keys; no ``[T, T]`` anywhere), ``"torch"`` (chunks of query rows, bounded memory, below).
    This equals what eager attention's softmax would give when the model's mask is exactly ``causal`` and
    ``key_padding_mask`` (no sliding window, no soft-capping, no attention sinks, no ALiBi-style biases).

Rows whose query sees no key at all (e.g. a left-padded position under a causal mask) give exactly 0, never NaN.
Note the key padding only masks KEYS: a padded query position that still sees some real key gets its ordinary
attention (select response positions with ``query_positions``).

Memory of the torch ``qk`` path: query rows are processed ``C`` at a time with
``C = max(1, min(Tq, QK_TILE_BUDGET // (B · Hq · T)))``, ``QK_TILE_BUDGET = 2**24`` elements (64 MiB in float32).
The largest tensor alive is one ``[B, Hq, C, T]`` score tile (the logsumexp is computed in place in it), plus a bool
``[B, 1, C, T]`` visibility tile and ``[B, Hq, C, N_p]`` image scores: at most ``max(QK_TILE_BUDGET, B · Hq · T)``
score elements, whatever ``T`` — never ``B · Hq · T · T``. The inputs are copied once in the compute dtype
(``q`` rows ``[B, Hq, Tq, d]``, ``k [B, Hkv, T, d]``).

Dtypes: inputs may be float16, bfloat16, float32 or float64. Outputs are always float32 ``[B, Tq, N_p]``. Sums over
heads are in float64 on the C++ CPU path, in float32 (float64 for float64 inputs) on the CUDA and torch paths; scores
and the logsumexp are float32 (float64 for float64 inputs on the torch path; the Triton path takes float16, bfloat16
and float32 only, and ``impl="auto"`` sends float64 to the torch path).

Gradients: none. Cat-PO's token weights are constants computed once from the reference model, so every function here
runs under ``torch.no_grad()`` and returns a tensor with ``requires_grad=False``.

Validation (every public function): ``ValueError`` naming the argument for wrong ranks, shapes, dtypes, devices,
``Hq % Hkv != 0``, and positions outside ``[0, T)``. The position check is one small reduction and host sync per call.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

from vpo import _ext
from vpo.ops._common import triton_imports
from vpo.ops.attention_select import ImageAttentionAccumulator, heads_of_probs, heads_of_qk
from vpo._validate import (
    INDEX_DTYPES,
    check_choice,
    check_float,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

__all__ = [
    "image_attention_from_probs",
    "image_attention_from_qk",
    "ImageAttentionAccumulator",  # vpo.ops.attention_select, re-exported
    "PROBS_IMPLS",
    "QK_IMPLS",
    "QK_TILE_BUDGET",
]

PROBS_IMPLS = ("auto", "cpp", "cuda", "torch")
QK_IMPLS = ("auto", "triton", "torch")
QK_TILE_BUDGET = 1 << 24  # elements of one [B, Hq, C, T] score tile on the torch qk path (64 MiB in float32)

# Storage dtype codes of the C++/CUDA ABI (csrc/attention_stats.h, AttnDType).
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


# ----------------------------------------------------------------------------------------------------------------------
# Shared validation
# ----------------------------------------------------------------------------------------------------------------------


def _check_positions(name: str, pos, batch: int, seq: int, ref_name: str, ref: torch.Tensor,
                     *, allow_empty: bool = False) -> torch.Tensor:
    """``pos [B, N]`` int32/int64 on ``ref``'s device with values in ``[0, seq)`` -> contiguous int64. One host sync."""
    check_tensor(name, pos, ndim=2, dtypes=INDEX_DTYPES, allow_empty=allow_empty)
    if pos.shape[0] != batch:
        raise ValueError(
            f"{name} has shape {tuple(pos.shape)} but {ref_name} has shape {tuple(ref.shape)}: expected "
            f"{name}.shape[0] == {batch} (B)"
        )
    check_same_device(name, pos, ref_name, ref)
    if pos.numel() > 0:
        bad = (pos < 0) | (pos >= seq)
        if bool(bad.any()):
            first = int(pos[bad][0])
            raise ValueError(f"{name} contains {first}: expected positions in [0, {seq}) (T = {seq})")
    return pos.to(torch.int64).contiguous()


# ----------------------------------------------------------------------------------------------------------------------
# Route (a): materialized probabilities
# ----------------------------------------------------------------------------------------------------------------------


def _probs_torch(attn: torch.Tensor, ipos: torch.Tensor, qpos: Optional[torch.Tensor]) -> torch.Tensor:
    B, H, T, _ = attn.shape
    acc = torch.float64 if attn.dtype == torch.float64 else torch.float32
    bi = torch.arange(B, device=attn.device)[:, None, None]  # [B, 1, 1]
    rows = (qpos if qpos is not None else torch.arange(T, device=attn.device).expand(B, T))[:, :, None]  # [B, Tq, 1]
    cols = ipos[:, None, :]  # [B, 1, N_p]
    # Advanced indices on dims 0, 2, 3 separated by the head slice: they broadcast to [B, Tq, N_p] and go first.
    g = attn[bi, :, rows, cols]  # [B, Tq, N_p, H], only the gathered entries
    return g.sum(-1, dtype=acc).div_(H).to(torch.float32)


def _probs_ext(attn: torch.Tensor, ipos: torch.Tensor, qpos: Optional[torch.Tensor], name: str) -> torch.Tensor:
    C = _ext.require_ext(f"image_attention_from_probs(impl={name!r})")
    fn_name = "image_attention_probs_cuda" if name == "cuda" else "image_attention_probs_cpu"
    if not _ext_has(fn_name):
        raise RuntimeError(
            f"vpo._C has no {fn_name} (a build older than this source): rebuild with "
            "`pip install --no-build-isolation -e .`, or use impl='torch'"
        )
    B, H, T, _ = attn.shape
    NP = ipos.shape[1]
    TQ = T if qpos is None else qpos.shape[1]
    out = torch.empty((B, TQ, NP), dtype=torch.float32, device=attn.device)
    args = (_DTYPE_CODE[attn.dtype], attn.data_ptr(), B, H, T, *attn.stride(), ipos.data_ptr(), NP,
            0 if qpos is None else qpos.data_ptr(), TQ, out.data_ptr())
    if name == "cuda":
        with torch.cuda.device(attn.device):
            getattr(C, fn_name)(*args, torch.cuda.current_stream(attn.device).cuda_stream)
    else:
        getattr(C, fn_name)(*args)
    return out


def _ext_has(fn_name: str) -> bool:
    """Whether the loaded vpo._C exports ``fn_name`` (False for a missing extension or a stale build)."""
    return _ext._C is not None and hasattr(_ext._C, fn_name)


def _resolve_probs_impl(impl, device: torch.device) -> str:
    check_choice("impl", impl, PROBS_IMPLS)
    if impl == "auto":
        if device.type == "cuda":
            return "cuda" if _ext.AVAILABLE["cuda_ext"] and _ext_has("image_attention_probs_cuda") else "torch"
        return "cpp" if device.type == "cpu" and _ext_has("image_attention_probs_cpu") else "torch"
    if impl == "cuda" and device.type != "cuda":
        raise ValueError(f"impl='cuda' needs CUDA tensors, got attn_probs on {device}")
    if impl == "cpp" and device.type != "cpu":
        raise ValueError(f"impl='cpp' needs CPU tensors, got attn_probs on {device}")
    if impl == "cuda" and not _ext.AVAILABLE["cuda_ext"]:
        raise ValueError("impl='cuda' needs vpo._C built with CUDA sources (vpo.AVAILABLE['cuda_ext'] is False)")
    return impl


@torch.no_grad()
def image_attention_from_probs(
    attn_probs: torch.Tensor,
    image_positions: torch.Tensor,
    *,
    query_positions: Optional[torch.Tensor] = None,
    heads: Optional[Sequence[int]] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Head-averaged attention probability of each query row on each image key, from one layer's probabilities.

    Args:
        attn_probs: ``[B, H, T, T]`` one layer's attention probabilities ``[..., query, key]`` (eager attention's
            ``outputs.attentions[layer]``), float16/bfloat16/float32/float64, any strides (never copied by ``"cpp"`` /
            ``"cuda"``).
        image_positions: ``[B, N_p]`` int64 (int32 accepted) key positions of the image tokens of each row, in
            ``[0, T)``; ``out[b, :, n]`` follows this order (use the order of the projected image features ``u_j``).
        query_positions: ``[B, Tq]`` int64 query positions (e.g. the response positions), or ``None`` for every row
            (``Tq = T``).
        heads: the head indices to average over (negative count from the end), or ``None`` (default) for all ``H``
            (``vpo.ops.attention_select``: a contiguous ascending set is a view, any other a ``[B, |S|, T, T]`` copy).
        impl: ``"auto"`` (default: ``"cpp"`` for CPU tensors, ``"cuda"`` for CUDA tensors when vpo._C has them, else
            ``"torch"``), ``"cpp"``, ``"cuda"`` or ``"torch"``.

    Returns:
        ``[B, Tq, N_p]`` float32:
        ``out[b, t, n] = mean_{h ∈ heads} attn_probs[b, h, query_positions[b, t], image_positions[b, n]]``.
        No gradient (computed under ``no_grad``).

    Example:
        >>> import torch
        >>> from vpo.ops.attention_stats import image_attention_from_probs
        >>> p = torch.softmax(torch.randn(1, 4, 6, 6), -1)                   # B=1, H=4, T=6
        >>> img = torch.tensor([[1, 2, 3]])                                   # N_p = 3 image tokens
        >>> image_attention_from_probs(p, img, query_positions=torch.tensor([[4, 5]])).shape
        torch.Size([1, 2, 3])
    """
    check_float("attn_probs", attn_probs, ndim=4)
    B, H, T, T2 = attn_probs.shape
    if T != T2:
        raise ValueError(
            f"attn_probs has shape {tuple(attn_probs.shape)}: expected square [B, H, T, T] attention maps"
        )
    ipos = _check_positions("image_positions", image_positions, B, T, "attn_probs", attn_probs)
    qpos = None
    if query_positions is not None:
        qpos = _check_positions("query_positions", query_positions, B, T, "attn_probs", attn_probs, allow_empty=True)
    name = _resolve_probs_impl(impl, attn_probs.device)
    attn_probs = heads_of_probs(attn_probs, heads)
    if name == "torch":
        return _probs_torch(attn_probs, ipos, qpos)
    return _probs_ext(attn_probs, ipos, qpos, name)


# ----------------------------------------------------------------------------------------------------------------------
# Route (b): q and k, no [T, T]
# ----------------------------------------------------------------------------------------------------------------------


def qk_chunk_rows(batch: int, q_heads: int, seq: int, num_query: int, budget: Optional[int] = None) -> int:
    """Query rows per chunk of the torch qk path: ``max(1, min(Tq, budget // (B · Hq · T)))``."""
    budget = QK_TILE_BUDGET if budget is None else budget
    return max(1, min(max(num_query, 1), budget // max(batch * q_heads * seq, 1)))


def _qk_torch(q, k, ipos, qpos, kmask, scale: float, causal: bool) -> torch.Tensor:
    B, HQ, T, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    NP = ipos.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    rowpos = qpos if qpos is not None else torch.arange(T, device=dev).expand(B, T)  # [B, Tq] query positions
    TQ = rowpos.shape[1]
    q_rows = q if qpos is None else q.gather(2, qpos[:, None, :, None].expand(B, HQ, TQ, D))  # [B, Hq, Tq, d]
    kf = k.to(acc)  # [B, Hkv, T, d]
    keys = torch.arange(T, device=dev)  # [T]
    img_idx = ipos[:, None, None, :]  # [B, 1, 1, N_p], broadcast over heads and rows below
    out = torch.empty((B, TQ, NP), dtype=torch.float32, device=dev)
    C = qk_chunk_rows(B, HQ, T, TQ)
    for t0 in range(0, TQ, C):
        t1 = min(t0 + C, TQ)
        c = t1 - t0
        # Query head h = hk · G + g uses kv head hk: fold the G heads into the rows of one matmul per kv head.
        qc = q_rows[:, :, t0:t1].to(acc).reshape(B, HKV, G * c, D)  # [B, Hkv, G·c, d]
        s = torch.matmul(qc, kf.transpose(-1, -2))  # [B, Hkv, G·c, d] @ [B, Hkv, d, T] -> [B, Hkv, G·c, T]
        s = s.view(B, HQ, c, T).mul_(scale)  # [B, Hq, c, T], the only tile of this size
        if causal or kmask is not None:
            vis = torch.ones((B, 1, c, T), dtype=torch.bool, device=dev)  # [B, 1, c, T], shared by the heads
            if causal:
                vis &= keys[None, None, None, :] <= rowpos[:, None, t0:t1, None]
            if kmask is not None:
                vis &= kmask[:, None, None, :]
            s.masked_fill_(~vis, float("-inf"))
        s_img = s.gather(-1, img_idx.expand(B, HQ, c, NP))  # [B, Hq, c, N_p] masked image scores (-inf = invisible)
        # logsumexp in place: m = max, l = Σ exp(s − m); rows with nothing visible have m = −inf and l = 0.
        m = s.amax(-1, keepdim=True)  # [B, Hq, c, 1]
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        l = s.sub_(m).exp_().sum(-1, keepdim=True)  # [B, Hq, c, 1]
        p = torch.exp(s_img - m) / torch.where(l > 0, l, torch.ones_like(l))  # [B, Hq, c, N_p]; 0 where invisible
        del s
        out[:, t0:t1] = p.sum(1).div_(HQ)  # mean over heads -> [B, c, N_p]
    return out


def _qk_triton(q, k, ipos, qpos, kmask, scale: float, causal: bool) -> torch.Tensor:
    from vpo_kernels.attention_stats import image_attention_from_qk_triton  # lazy: `import vpo` never needs triton

    return image_attention_from_qk_triton(q, k, ipos, qpos, kmask, scale, causal)


def _resolve_qk_impl(impl, q: torch.Tensor) -> str:
    check_choice("impl", impl, QK_IMPLS)
    if impl == "auto":
        ok = q.is_cuda and q.dtype != torch.float64 and triton_imports(["vpo_kernels.attention_stats"])
        return "triton" if ok else "torch"
    if impl == "triton":
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter), got q on "
                f"{q.device}: use impl='torch' or impl='auto'"
            )
        if q.dtype == torch.float64:
            raise ValueError("impl='triton' takes q/k in float16, bfloat16 or float32, got float64: use impl='torch'")
    return impl


@torch.no_grad()
def image_attention_from_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    image_positions: torch.Tensor,
    *,
    query_positions: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = True,
    heads: Optional[Sequence[int]] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Head-averaged attention probability of each query row on each image key, from ``q`` and ``k`` (no ``[T, T]``).

    For each query row: its full logsumexp over ALL visible keys (causal, padding-masked), then
    ``exp(score − lse)`` on the image keys, averaged over the ``Hq`` query heads (module docstring).

    Args:
        q: ``[B, Hq, T, d]`` post-RoPE queries, float16/bfloat16/float32/float64, any strides.
        k: ``[B, Hkv, T, d]`` post-RoPE keys, same dtype and device; ``Hq % Hkv == 0`` (grouped-query attention:
            query head ``h`` uses kv head ``h // (Hq // Hkv)``).
        image_positions: ``[B, N_p]`` int64 (int32 accepted) key positions of the image tokens, in ``[0, T)``.
        query_positions: ``[B, Tq]`` int64 query positions (e.g. the response positions), or ``None`` for all ``T``.
        key_padding_mask: ``[B, T]`` bool, True = real token; False keys are masked out. ``None``: all real.
        scale: score scale, default ``d ** -0.5``.
        causal: key ``j`` is visible to query ``i`` iff ``j <= i`` (default ``True``).
        heads: the QUERY head indices to average over (negative count from the end), or ``None`` (default) for all
            ``Hq``; each selected head reads its own kv head (``vpo.ops.attention_select.heads_of_qk``).
        impl: ``"auto"`` (default: ``"triton"`` for CUDA tensors in float16/bfloat16/float32 when triton imports, else
            ``"torch"``), ``"triton"`` (CPU tensors only under ``TRITON_INTERPRET=1``) or ``"torch"`` (query-row chunks;
            largest tile ``max(QK_TILE_BUDGET, B · Hq · T)`` elements).

    Returns:
        ``[B, Tq, N_p]`` float32; 0 for rows that see no key. No gradient (computed under ``no_grad``).

    Example:
        >>> import torch
        >>> from vpo.ops.attention_stats import image_attention_from_qk
        >>> q, k = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8)        # Hq=4, Hkv=2 (GQA), T=10, d=8
        >>> a = image_attention_from_qk(q, k, torch.tensor([[1, 2, 3]]), query_positions=torch.tensor([[7, 8, 9]]))
        >>> a.shape, bool((a.sum(-1) <= 1 + 1e-6).all())
        (torch.Size([1, 3, 3]), True)
    """
    check_float("q", q, ndim=4)
    check_float("k", k, ndim=4)
    check_same_device("k", k, "q", q)
    check_same_dtype("k", k, "q", q)
    B, HQ, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(
            f"k has shape {tuple(k.shape)} but q has shape {tuple(q.shape)}: expected k.shape == "
            f"({B}, Hkv, {T}, {D}) ([B, Hkv, T, d])"
        )
    HKV = k.shape[1]
    if HQ % HKV != 0:
        raise ValueError(
            f"q has {HQ} heads and k has {HKV} heads: expected Hq % Hkv == 0 (grouped-query attention)"
        )
    ipos = _check_positions("image_positions", image_positions, B, T, "q", q)
    qpos = None
    if query_positions is not None:
        qpos = _check_positions("query_positions", query_positions, B, T, "q", q, allow_empty=True)
    kmask = None
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        if tuple(key_padding_mask.shape) != (B, T):
            raise ValueError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)} but q has shape {tuple(q.shape)}: "
                f"expected key_padding_mask.shape == ({B}, {T}) ([B, T])"
            )
        check_same_device("key_padding_mask", key_padding_mask, "q", q)
        kmask = key_padding_mask
    if scale is None:
        scale = D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None (d ** -0.5), got {scale!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    name = _resolve_qk_impl(impl, q)
    q, k = heads_of_qk(q, k, heads)
    fn = _qk_triton if name == "triton" else _qk_torch
    return fn(q, k, ipos, qpos, kmask, float(scale), causal)
