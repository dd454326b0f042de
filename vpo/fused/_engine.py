"""The fused preference losses' engine: the policy's gradient computed in the forward, chunk by chunk of whole pairs.

A preference loss depends on a pair's tokens only through per-sequence sums, so once a pair's two rows have been swept
over the vocabulary, its loss and the gradient of that loss w.r.t. every per-token term (``logp_t``, TPO's score
``s_t``, Cat-PO's ``KL_t``) are known: autograd on those small ``[2P, T]`` tensors gives them. The gradient w.r.t. the
logits then has a closed form, and two GEMMs turn it into ``dh`` and ``dW`` while the chunk's logits are still at hand.
The loss returned by the public function carries these gradients (:class:`AttachGrads`); its backward only scales
them by ``grad_output`` (one pass that also casts to the input dtype) — no GEMM runs in the backward.

Per chunk of P pairs (R = 2·P·T rows: the P chosen rows, then their P rejected rows), per vocab tile of C columns::

    z    = h_c @ W[v0:v1]ᵀ                   [R, D] @ [D, C] -> [R, C] fp32   GEMM 1 (cuBLAS fp32 output on CUDA)
    zr   = h_ref,c @ W_ref[v0:v1]ᵀ           the reference's tile, same rows, same tile: GEMM 1'
    stats pass   (vpo.ops.epilogue.tile_stats_): online max / Σexp, target logit, E_p[z] (entropy), Σz (mean
                 logit); the reference tile's own statistics (DPO/TPO: a separate read, never kept; Cat-PO: read with
                 the policy's tile, which also gives the KL moment E_p[z − zr], and kept for the gradient)
    (g_logp, g_s, g_kl) = ∂(Σ_pairs loss / B) / ∂(logp, s, KL)                 autograd on [2P, T]
    gradient pass (vpo.ops.epilogue.tile_grad): dz = −g_logp·p + g_kl·p·(log p − log q − KL) + coef·onehot(y),
                 written in the GEMM operand dtype
    dh_c      += dz @ W[v0:v1]               [R, C] @ [C, D] -> [R, D] fp32   GEMM 2 (only if hidden needs grad)
    dW[v0:v1] += dzᵀ @ h_c                   [C, R] @ [R, D] -> [C, D] fp32   GEMM 3 (only if weight needs grad)

On CUDA the two passes are Triton kernels (torch custom ops); on CPU the same math in torch. TPO's noised pass needs
only the target logit ``z_n[y] = h_n·W[y] + b[y]``: a gather-dot, and its gradient is an O(R·D) gather (``dh_n``) and
scatter (``dW[y]``). The policy and the reference are swept with the same rows and tiles, so identical inputs give
bit-identical log-probs (loss exactly ln 2, rewards exactly 0). Positions with ``labels == ignore_index`` have their
hidden rows zeroed before the GEMMs (O(N·D)): a non-finite value there (fp16 overflow in padding) never reaches a
loss, a metric or a gradient.

GEMM passes over N·D·V (N = 2B·T positions; one pass = 2·N·D·V FLOPs), all in the forward:

    =========================  ================  ==========  ============================================
    loss                       policy fwd / bwd  reference   total; tests/test_flop_count.py checks it
    =========================  ================  ==========  ============================================
    DPO, TPO, Cat-PO           3 / 0             1           4 passes = 8NDV (logits, dh, dW; reference
                                                             logits under no_grad)
    frozen head (no dW)        2 / 0             1           6NDV
    ``ref_logps`` given        3 / 0             0           6NDV
    no grad needed             1 / 0             1           4NDV
    logits not kept (below)    4 / 0             1 (2 Cat)   10NDV (12NDV Cat-PO)
    =========================  ================  ==========  ============================================

This needs the chunk's fp32 logits from the forward sweep when its gradient is formed. They are kept (``store``) when
a chunk of at least one pair fits the memory budget; otherwise the tiles are recomputed (one more policy pass). On
CUDA every position of a row is swept, ignored ones included (their gradient is 0): packing only the scored positions
needs their count on the host, a device sync. On CPU, where that count costs nothing, only the scored positions are
swept (``Chunking(compact=None)``, the default: the GEMMs shrink by the ignored fraction); ``compact=True`` asks for it
on CUDA too (one sync per chunk).

Extra memory (bytes; m = 2 for Cat-PO with a reference, else 1)::

    chunk:   R·m·(4·V [stored fp32 logits, store mode only] + 16·C [tile temporaries])  ≤ memory_budget
             (R = 2·P·T with P = the largest pair count that fits, at least 1)
             + R·D·(2·e + 4) (the chunk's rows of h and h_ref, its fp32 dh) (+ 2·R·D·e for TPO: h_n, W[y])
    held:    N·D·4 (dh, and dh_n for TPO, fp32) + V·D·4 (+ V·4) (dW, db, fp32) from the forward until the backward

Nothing is O(N·V). ``Chunking`` holds the knobs; the default budget is 4 GiB (env ``VPO_FUSED_BUDGET_MB``): one pair of
2 × 2048 positions at V = 152064 keeps 2.3 GiB of fp32 logits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from vpo import _caps
from vpo.ops import epilogue as ep
from vpo.ops._sweep import acc_dtype, mm_acc, mm_acc_into, mm_acc_out, operand_dtype  # noqa: F401  (acc_dtype: re-exported)

DEFAULT_BUDGET = 4 << 30  # bytes (module docstring)
DEFAULT_VOCAB_TILE = 8192  # columns per tile: [R, D] @ [D, 8192] is a large GEMM; the torch path's fp32 temporaries
#                            (16·C B per row) stay below the kept fp32 logits (4·V B per row) at LM vocabularies


@dataclass(frozen=True)
class Chunking:
    """How the fused losses cut their work.

    Attributes:
        memory_budget: bytes for one chunk's kept logits and tile temporaries (see :mod:`vpo.fused._engine`).
            Default: ``VPO_FUSED_BUDGET_MB`` MiB from the environment, else 4 GiB.
        pairs: pairs per chunk; overrides the budget (the logits are then kept unless ``store=False``).
        vocab: columns per vocab tile (default 8192).
        store: keep the chunk's logits between the sweep and the gradient (None: when the budget allows).
        compact: sweep only the scored positions (``labels != ignore_index``). None (default): on CPU, where the count
            costs nothing; not on CUDA, where it costs one host sync per chunk (True asks for it there too).
    """

    memory_budget: Optional[int] = None
    pairs: Optional[int] = None
    vocab: Optional[int] = None
    store: Optional[bool] = None
    compact: Optional[bool] = None

    def __post_init__(self):
        for name in ("memory_budget", "pairs", "vocab"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"Chunking.{name} must be a positive int or None, got {v!r}")
        for name in ("store", "compact"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"Chunking.{name} must be a bool or None, got {v!r}")


def check_chunking(chunking) -> Chunking:
    if chunking is None:
        return Chunking()
    if not isinstance(chunking, Chunking):
        raise ValueError(f"chunking must be a vpo.fused.Chunking or None, got {type(chunking).__name__}")
    return chunking


def plan(chunking: Chunking, B: int, T: int, V: int, models: int) -> Tuple[int, int, bool]:
    """``(pairs per chunk, vocab tile, store)`` from shapes only (no device access); ``models`` = logits tiles kept
    per row (2 for Cat-PO with a reference)."""
    budget = chunking.memory_budget
    if budget is None:
        env = os.environ.get("VPO_FUSED_BUDGET_MB")
        budget = int(env) << 20 if env else DEFAULT_BUDGET
    C = min(V, chunking.vocab or DEFAULT_VOCAB_TILE)
    rows_per_pair = 2 * T
    stored_row = models * (V * 4 + 16 * C)
    tiled_row = models * 16 * C
    if chunking.pairs is not None:
        store = True if chunking.store is None else chunking.store
        return min(B, chunking.pairs), C, store
    store = chunking.store if chunking.store is not None else rows_per_pair * stored_row <= budget
    per_pair = rows_per_pair * (stored_row if store else tiled_row)
    return max(1, min(B, budget // per_pair)), C, store


def compact_rows(chunking: Chunking, hidden: torch.Tensor) -> bool:
    """Whether to sweep only the scored positions: ``chunking.compact``, else on CPU (the count is free there) and not
    on CUDA (it would cost a host sync)."""
    return chunking.compact if chunking.compact is not None else not _caps.is_cuda(hidden)


@dataclass
class Sweep:
    """What the engine returns: per-token terms ``[2B, T]`` (accumulation dtype, 0 at ignored positions) and the
    gradients (accumulation dtype; None where not asked for)."""

    tok: Dict[str, torch.Tensor]
    grads: Dict[str, Optional[torch.Tensor]]
    loss: Optional[torch.Tensor] = None  # Σ over chunks of pair_loss (0-dim, detached), when pair_loss was given


class _Rows:
    """The rows of one chunk: pairs ``[p0, p1)`` of a ``[2B, T, ...]`` batch (chosen rows, then rejected rows),
    flattened to ``[R_all, ...]`` and, when ``pos`` is given, packed to the scored positions ``[R, ...]``."""

    def __init__(self, B: int, p0: int, p1: int, mask: torch.Tensor, compact: bool):
        self.B, self.p0, self.p1 = B, p0, p1
        self.m = self.take(mask)  # [R_all] bool
        self.R_all = self.m.numel()
        self.pos = self.m.nonzero().squeeze(1) if compact else None  # host sync (CPU: free)
        self.R = self.R_all if self.pos is None else self.pos.numel()

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """``[2B, T, ...] -> [R_all, ...]`` (one copy)."""
        B, p0, p1 = self.B, self.p0, self.p1
        x = torch.cat([x[p0:p1], x[B + p0:B + p1]]) if p1 - p0 < B else x
        return x.reshape(-1, *x.shape[2:])

    def hidden(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The chunk's rows of a hidden tensor in the GEMM operand dtype, ignored positions zeroed (or left out)."""
        x = self.take(x)
        if self.pos is not None:
            return x.index_select(0, self.pos).to(dtype)
        return torch.where(self.m[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device)).to(dtype)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[R_all, ...] -> [R, ...]``."""
        return x if self.pos is None else x.index_select(0, self.pos)

    def spread(self, v: torch.Tensor, zeroed: bool = False) -> torch.Tensor:
        """``[R, ...] -> [R_all, ...]``, 0 at the positions left out or ignored (``zeroed``: ``v`` is already 0 at
        the ignored positions, as every gradient row of an ignored position is, so no masking pass)."""
        if self.pos is not None:
            return v.new_zeros((self.R_all, *v.shape[1:])).index_copy_(0, self.pos, v)
        if zeroed:
            return v
        m = self.m.reshape(-1, *([1] * (v.dim() - 1)))
        return torch.where(m, v, torch.zeros((), dtype=v.dtype, device=v.device))


def _target_dot(h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], y: torch.Tensor, acc, scale: float,
                softcap: float) -> torch.Tensor:
    """``z'[y] [R]``: the transformed target logit by a gather-dot (O(R·D), no vocabulary sweep), accumulated in
    fp32 (a batched 1×D×1 GEMM with fp32 output for 16-bit operands on CUDA; the operands upcast elsewhere)."""
    Wy = W.index_select(0, y)  # [R, D]
    if h.dtype != acc and _caps.gemm_fp32_out(h) and _caps.has_kernel_for(h, "aten::bmm.dtype"):
        z = torch.bmm(h[:, None, :], Wy[:, :, None], out_dtype=acc).reshape(-1)
    else:
        z = torch.linalg.vecdot(h.to(acc), Wy.to(acc))
    if b is not None:
        z = z + b.index_select(0, y).to(acc)
    if scale != 1.0:
        z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z


def _transform_grad(z: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """``∂z'/∂(h·W + b)`` at the transformed logits ``z`` ``[R]``."""
    d = torch.full_like(z, scale)
    if softcap:
        d = d * (1 - (z / softcap) ** 2)
    return d


def sweep(
    *,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    chunking: Chunking,
    ref: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None,
    ref_kl: bool = False,
    noised: Optional[torch.Tensor] = None,
    ref_noised: Optional[torch.Tensor] = None,
    noised_grad: bool = False,
    pair_loss: Optional[Callable[..., torch.Tensor]] = None,
    need: Sequence[str] = (),
    softcap: float = 0.0,
    scale: float = 1.0,
    stats: Sequence[str] = (),
) -> Sweep:
    """Sweep ``hidden [2B, T, D]`` over the vocabulary of ``weight [V, D]`` (+ ``bias [V]``), chunk by chunk of pairs.

    Per-token outputs in ``Sweep.tok`` (``[2B, T]``, accumulation dtype, 0 where ``labels == ignore_index``): ``logp``,
    ``z`` (target logit), ``entropy``, ``mean_logit`` (mean over the vocabulary), ``is_argmax`` (1.0 where the target
    is the argmax), ``log_sum_p2`` (log Σ_v p_v², when ``"log_sum_p2"`` is in ``stats``); with ``noised`` ``[2B, T,
    D]``: ``z_noised`` (its target logit) and ``s = z − z_noised``; with ``ref = (ref_hidden, ref_weight, ref_bias)``:
    ``ref_logp`` (and ``ref_s`` from ``ref_noised``), swept with the policy's rows and tiles; with ``ref_kl``
    additionally ``kl`` (KL[π_θ ‖ π_ref] over the vocab), the reference tile read with the policy's.

    ``pair_loss(tok, rows, P)`` — given the chunk's per-token terms ``[2P, T]`` (``logp``, ``s``, ``kl`` require grad
    where they can carry one) and ``rows`` ``[2P]`` (the chunk's row indices into the batch) — returns the chunk's share
    of the loss (sum over its pairs / B). ``need`` ⊆ {"hidden", "weight", "bias", "noised"}: the gradients to form
    (``Sweep.grads``, accumulation dtype). ``softcap``, ``scale``: the logits transform of
    :mod:`vpo.ops.epilogue`. Without ``pair_loss`` or ``need`` this is a statistics-only sweep.
    """
    twoB, T, D = hidden.shape
    B = twoB // 2
    V = weight.shape[0]
    dev = hidden.device
    acc = acc_dtype(hidden.dtype)
    opd = operand_dtype(hidden)  # the GEMM operands' dtype (fp32 logits either way)
    need = tuple(need) if pair_loss is not None else ()
    grad_h, grad_w, grad_b = "hidden" in need, "weight" in need, "bias" in need and bias is not None
    noised_grad = noised_grad and noised is not None
    grad_n = "noised" in need and noised_grad
    any_grad = grad_h or grad_w or grad_b or grad_n
    kl_mode = ref is not None and ref_kl
    P, C, store = plan(chunking, B, T, V, 2 if kl_mode else 1)
    store = store and any_grad
    compact = compact_rows(chunking, hidden)
    sumsq = "log_sum_p2" in stats
    zero = torch.zeros((), dtype=acc, device=dev)

    mask = labels != ignore_index  # [2B, T]
    y_all = torch.where(mask, labels, 0).long()  # safe targets (0 where ignored)
    W_op = weight if weight.dtype == opd else None  # the head in the operand dtype, cast per tile otherwise
    rW_op = None if ref is None else (ref[1] if ref[1].dtype == opd else None)
    dW = torch.empty(V, D, dtype=acc, device=dev) if grad_w else None  # the first chunk writes it, the others add
    db = torch.zeros(V, dtype=acc, device=dev) if grad_b else None
    out_rows: Dict[str, list] = {}  # name -> per chunk [2P, T] (chosen half, rejected half), stitched at the end
    dh_parts, dn_parts = [], []
    total = None  # Σ of the chunks' losses

    def wtile(W, W_cast, v0, v1):
        return W_cast[v0:v1] if W_cast is not None else W[v0:v1].to(opd)

    for p0 in range(0, B, P):
        p1 = min(B, p0 + P)
        rows = _Rows(B, p0, p1, mask, compact)
        R = rows.R
        y = rows.pack(rows.take(y_all))
        h = rows.hidden(hidden, opd)  # [R, D]
        rh = None if ref is None else rows.hidden(ref[0], opd)

        # -- statistics pass: policy (and reference) tiles, same rows, same tiles
        st = ep.new_stats(R, acc, dev)
        st_ref = ep.new_stats(R, acc, dev) if ref is not None and not kl_mode else None
        kept = []
        for v0 in range(0, V, C):
            v1 = min(V, v0 + C)
            b_t = None if bias is None else bias[v0:v1]
            z = mm_acc(h, wtile(weight, W_op, v0, v1).T)  # [R, C] fp32
            zr = None
            if ref is not None:
                rb_t = None if ref[2] is None else ref[2][v0:v1]
                zr = mm_acc(rh, wtile(ref[1], rW_op, v0, v1).T)
                if not kl_mode:
                    ep.tile_stats_(zr, y, v0, st_ref, bias=rb_t, scale=scale, softcap=softcap, entropy=False,
                                   mean=False)
                    zr = None  # never kept
            ep.tile_stats_(z, y, v0, st, bias=b_t, ref=zr, ref_bias=rb_t if kl_mode else None, scale=scale,
                           softcap=softcap, entropy=True, mean=True, sumsq=sumsq)
            if store:
                kept.append((z, zr))
        f = ep.finish(st, V, ref=kl_mode)
        t = {k: f[k] for k in ("logp", "z", "entropy", "mean_logit", "is_argmax")}
        if sumsq:
            t["log_sum_p2"] = f["log_sum_p2"]
        if kl_mode:
            t["ref_logp"], t["kl"] = f["ref_logp"], f["kl"]
        fr = ep.finish(st_ref, V) if st_ref is not None else None
        if fr is not None:
            t["ref_logp"] = fr["logp"]
        if noised is not None:
            hn = rows.hidden(noised, opd)
            zn = _target_dot(hn, weight, bias, y, acc, scale, softcap)
            t["z_noised"], t["s"] = zn, f["z"] - zn
            if ref is not None and ref_noised is not None:
                rzn = _target_dot(rows.hidden(ref_noised, opd), ref[1], ref[2], y, acc, scale, softcap)
                t["ref_s"] = (fr["z"] if fr is not None else f["z"]) - rzn
        t = {k: rows.spread(v).reshape(-1, T) for k, v in t.items()}  # [2P, T], 0 where ignored
        for k, v in t.items():
            out_rows.setdefault(k, []).append(v)
        if pair_loss is None:
            continue
        # the chunk's row indices into the batch [2P]: chosen rows p0..p1, then rejected rows B+p0..B+p1
        idx = torch.arange(2 * B, device=dev) if P >= B else \
            torch.cat([torch.arange(p0, p1, device=dev), torch.arange(B + p0, B + p1, device=dev)])
        if not any_grad:
            chunk_loss = pair_loss(t, idx, p1 - p0)
            total = chunk_loss if total is None else total + chunk_loss
            continue

        # -- the chunk's loss and its gradient w.r.t. the per-token terms (small autograd graph, [2P, T])
        leaves = {k: t[k].detach().requires_grad_() for k in ("logp", "s", "kl") if k in t}
        with torch.enable_grad():
            chunk_loss = pair_loss({**t, **leaves}, idx, p1 - p0)
            wanted = list(leaves)
            gs = torch.autograd.grad(chunk_loss, [leaves[k] for k in wanted], allow_unused=True)
        total = chunk_loss.detach() if total is None else total + chunk_loss.detach()
        # None: the loss does not use that term (e.g. KL with kl_coef == 0); ignored positions get 0
        g = {k: None if v is None else rows.pack(torch.where(rows.m, v.reshape(-1), zero)) for k, v in zip(wanted, gs)}
        g_logp = g["logp"] if g["logp"] is not None else torch.zeros(R, dtype=acc, device=dev)
        g_s = g.get("s") if noised_grad else None
        g_kl = g.get("kl")
        coef = g_logp if g_s is None else g_logp + g_s  # onehot(y) coefficient

        # -- gradient pass: dz per tile, then the two GEMMs into dh and dW
        dh_c = torch.empty(R, D, dtype=acc, device=dev) if grad_h else None  # the first tile writes it
        for i, v0 in enumerate(range(0, V, C)):
            v1 = min(V, v0 + C)
            W_t = wtile(weight, W_op, v0, v1)
            if store:
                z, zr = kept[i]
                kept[i] = None  # free the tile as soon as it is used
            else:
                z = mm_acc(h, W_t.T)
                zr = mm_acc(rh, wtile(ref[1], rW_op, v0, v1).T) if kl_mode else None
            use_kl = g_kl is not None and zr is not None
            dz = ep.tile_grad(z, y, v0, f["lse"], g_logp, coef, out_dtype=opd,
                              bias=None if bias is None else bias[v0:v1],
                              ref=zr if use_kl else None,
                              ref_bias=None if not use_kl or ref[2] is None else ref[2][v0:v1],
                              lse_ref=f["ref_lse"] if use_kl else None, g_kl=g_kl if use_kl else None,
                              kl=rows.pack(t["kl"].reshape(-1)) if use_kl else None, scale=scale, softcap=softcap)
            del z, zr
            if db is not None:
                db[v0:v1] += dz.sum(0, dtype=acc)
            if grad_h:  # [R, C] @ [C, D] -> [R, D]
                (mm_acc_out if v0 == 0 else mm_acc_into)(dh_c, dz, W_t)
            if grad_w:  # [C, R] @ [R, D] -> [C, D]
                (mm_acc_out if p0 == 0 else mm_acc_into)(dW[v0:v1], dz.T, h)
        if grad_h:
            dh_parts.append(rows.spread(dh_c, zeroed=True).reshape(-1, T, D))
        if g_s is not None:  # s = z'[y] − z'_n[y]: ∂/∂(h_n·W[y] + b[y]) = −g_s · ∂z'_n/∂(...)
            dzn = -g_s * _transform_grad(zn, scale, softcap)  # [R]
            if grad_n:  # dh_n = dzn · W[y]: formed in the backward from dzn [R] (one gather, one scaled write)
                dn_parts.append(rows.spread(dzn, zeroed=True).reshape(-1, T))
            if dW is not None:
                dW.index_add_(0, y, dzn[:, None] * hn.to(acc))  # the target rows only: O(R·D)
            if db is not None:
                db.index_add_(0, y, dzn)
        elif grad_n:
            dn_parts.append(torch.zeros(2 * (p1 - p0), T, dtype=acc, device=dev))

    def stitch(parts):  # per chunk [2P, ...] -> [2B, ...]: every chosen half, then every rejected half
        if len(parts) == 1:
            return parts[0]
        halves = [x.chunk(2) for x in parts]
        return torch.cat([c for c, _ in halves] + [r for _, r in halves])

    tok = {k: stitch(v) for k, v in out_rows.items()}
    grads = {
        "hidden": stitch(dh_parts) if grad_h else None,
        "noised": _RowScaled(weight, y_all, stitch(dn_parts)) if grad_n else None,
        "weight": dW,
        "bias": db,
    }
    return Sweep(tok=tok, grads=grads, loss=total)


class AttachGrads(torch.autograd.Function):
    """``loss`` whose gradient w.r.t. ``inputs`` is the precomputed ``grads`` (accumulation dtype) scaled by
    ``grad_output`` and cast to each input's dtype, in one pass per gradient.

    The grads are saved for backward, so a second backward without ``retain_graph=True`` raises as for any graph,
    and with it yields the same (correct) gradients again. Double backward is not supported (the stored grads are
    constants).
    """

    @staticmethod
    def forward(ctx, loss, grads, *inputs):
        ctx.present = [g is not None for g in grads]
        ctx.dtypes = [x.dtype for x in inputs]
        dense = [g for g in grads if isinstance(g, torch.Tensor)]
        ctx.save_for_backward(*dense, *[t for g in grads if isinstance(g, _RowScaled) for t in g.tensors()])
        ctx.kinds = [None if g is None else ("dense" if isinstance(g, torch.Tensor) else "rows") for g in grads]
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        saved_all = list(ctx.saved_tensors)
        n_dense = sum(k == "dense" for k in ctx.kinds)
        dense, rest = iter(saved_all[:n_dense]), iter(saved_all[n_dense:])
        saved = iter([next(dense) if k == "dense" else _RowScaled(next(rest), next(rest), next(rest))
                      for k in ctx.kinds if k is not None])
        out = [None, None]
        for present, dtype in zip(ctx.present, ctx.dtypes):
            if not present:
                out.append(None)
                continue
            g = next(saved)
            if isinstance(g, _RowScaled):
                out.append(g.materialize(grad_output, dtype))
                continue
            res = torch.empty(g.shape, dtype=dtype, device=g.device)
            torch.mul(g, grad_output.to(g.dtype), out=res)  # scale and cast: one pass
            out.append(res)
        return tuple(out)


class _RowScaled:
    """A gradient ``[2B, T, D]`` of the form ``coef[r] · W[y[r]]`` (TPO's noised pass: ``dh_n = −g_s · W[y]``), kept
    as ``coef [2B, T]`` until the backward, which gathers ``W[y]`` and writes ``grad_output · coef · W[y]`` in the input
    dtype in one pass — no ``[N, D]`` fp32 buffer."""

    def __init__(self, W: torch.Tensor, y: torch.Tensor, coef: torch.Tensor):
        self.W, self.y, self.coef = W, y, coef

    def tensors(self):
        return self.W, self.y, self.coef

    @property
    def shape(self):
        return (*self.coef.shape, self.W.shape[1])

    def materialize(self, grad_output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        Wy = self.W.index_select(0, self.y.reshape(-1))  # [N, D]
        res = torch.empty(Wy.shape, dtype=dtype, device=Wy.device)
        torch.mul(Wy, (self.coef.reshape(-1) * grad_output.to(self.coef.dtype))[:, None], out=res)
        return res.reshape(self.shape)


def attach(loss: torch.Tensor, pairs: Sequence[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]) -> torch.Tensor:
    """``loss`` (detached) differentiable w.r.t. each input of ``pairs = [(input, grad), ...]`` with a grad."""
    live = [(x, g) for x, g in pairs if x is not None and g is not None and x.requires_grad]
    if not live or not torch.is_grad_enabled():
        return loss.detach()
    return AttachGrads.apply(loss, tuple(g for _, g in live), *[x for x, _ in live])
