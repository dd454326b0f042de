"""The fused preference losses' engine: the policy's gradient computed in the forward, chunk by chunk of whole pairs.

A preference loss depends on a pair's tokens only through per-sequence sums, so once a pair's two rows have been swept
over the vocabulary, its loss and the gradient of that loss w.r.t. every per-token term (``logp_t``, TPO's score
``s_t``, Cat-PO's ``KL_t``) are known: autograd on those small ``[2P, T]`` tensors gives them. The gradient w.r.t. the
logits then has a closed form, and two GEMMs turn it into ``dh`` and ``dW`` while the chunk's logits are still at hand.
The loss returned by the public function carries these gradients (:class:`AttachGrads`); its backward only scales
them by ``grad_output`` — no GEMM runs in the backward.

Per chunk of P pairs (R = 2·P·T rows: the P chosen rows, then their P rejected rows), per vocab tile of C columns::

    z    = h_c @ W[v0:v1]ᵀ + b[v0:v1]        [R, D] @ [D, C] -> [R, C]   GEMM 1 (input dtype, fp32 accumulate)
    lse, E_p[z], z[y] (and, Cat-PO, the reference tile's lse_ref, E_p[z − z_ref]) online over the tiles
    logp = z[y] − lse,  entropy = lse − E_p[z],  KL = E_p[z − z_ref] − lse + lse_ref               per token, [R]
    (g_logp, g_s, g_kl) = ∂(Σ_pairs loss / B) / ∂(logp, s, KL)                                      autograd, [2P, T]
    p  = exp(z − lse)
    dz = −g_logp·p + g_kl·p·(log p − log q − KL) + (g_logp + g_s)·onehot(y)                          [R, C]
    dh_c      += dz @ W[v0:v1]               [R, C] @ [C, D] -> [R, D]   GEMM 2 (only if hidden needs grad)
    dW[v0:v1] += dzᵀ @ h_c                   [C, R] @ [R, D] -> [C, D]   GEMM 3 (only if weight needs grad; fp32 buffer)
    db[v0:v1] += Σ_rows dz

(∂logp/∂z = onehot − p; ∂KL/∂z = p·(log p − log q − KL); ∂s/∂z[y] = 1.) TPO's noised pass needs only the target logit
``z_n[y] = h_n·W[y] + b[y]``: a gather-dot, and its gradient is an O(R·D) gather (``dh_n``) and scatter (``dW[y]``).

GEMM passes over N·D·V (N = 2B·T positions; one pass = 2·N·D·V FLOPs). All of them run in the forward; the backward
runs none (it scales the stored gradients):

    =========================  ================  ==========  ============================================
    loss                       policy fwd / bwd  reference   total; tests/test_flop_count.py checks it
    =========================  ================  ==========  ============================================
    DPO, TPO                   3 / 0             1           4 passes = 8NDV (logits, dh, dW; reference
                                                             logits under no_grad)
    Cat-PO (with ref_hidden)   3 / 0             1           8NDV: the reference tile is swept with the
                                                             policy's, KL and reference log-probs from it
    frozen head (no dW)        2 / 0             1           6NDV
    ``ref_logps`` given        3 / 0             0           6NDV
    no grad needed             1 / 0             1           4NDV
    logits not kept (below)    4 / 0             1 (2 Cat)   10NDV (12NDV Cat-PO)
    =========================  ================  ==========  ============================================

The composition through the ops that this replaced cost DPO/TPO 5 passes (1.25×) and Cat-PO 11.

This needs the chunk's logits from the forward sweep when its gradient is formed. They are kept (``store``) when a
chunk of at least one pair fits the memory budget; otherwise the tiles are recomputed (one more policy pass, 4 + 1:
the cost the old composition always paid). By default every position of a row is swept, ignored ones included (their
gradient is 0): packing only the scored positions needs their count on the host, a device sync. ``Chunking(compact=
True)`` does that (one sync per chunk), so N counts only the scored tokens — the better trade when prompts with image
tokens dominate the sequence.

Extra memory (bytes; e = element size of the input dtype, m = 2 for Cat-PO with a reference, else 1)::

    chunk:   R·m·(V·e [stored logits, store mode only] + 16·C [fp32 tile temporaries])  ≤ memory_budget
             (R = 2·P·T with P = the largest pair count that fits, at least 1)
             + R·D·(m·e + 4) (the chunk's rows of h, its fp32 dh) (+ 2·R·D·e for TPO: h_n, W[y])
    held:    N·D·e (dh, and dh_n for TPO) + V·D·e (+ V·e) (dW, db) from the forward until the backward
    during the forward, for fp16/bf16 inputs: V·D·4 (the fp32 dW accumulator)

Nothing is O(N·V). ``Chunking`` holds the knobs; the default budget is 2 GiB (env ``VPO_FUSED_BUDGET_MB``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from vpo.ops._sweep import acc_dtype, mm_acc_into  # noqa: F401  (acc_dtype: the dtype the fused losses reduce in)

DEFAULT_BUDGET = 2 << 30  # bytes. One pair of 2 × 2048 positions at V = 152064 in bf16 needs 2·2048·(152064·2 +
#                           16·8192) B ≈ 1.65 GiB (logits kept + tile temporaries), so it still keeps its logits; longer
#                           pairs recompute (one more pass) unless VPO_FUSED_BUDGET_MB allows more
DEFAULT_VOCAB_TILE = 8192  # columns per tile: [R, D] @ [D, 8192] is a large GEMM; fp32 temporaries (16·C B per row)
#                            stay below the kept bf16 logits (2·V B per row) at LM vocabularies


@dataclass(frozen=True)
class Chunking:
    """How the fused losses cut their work.

    Attributes:
        memory_budget: bytes for one chunk's logits and tile temporaries (see :mod:`vpo.fused._engine`). Default:
            ``VPO_FUSED_BUDGET_MB`` MiB from the environment, else 2 GiB.
        pairs: pairs per chunk; overrides the budget (the logits are then kept unless ``store=False``).
        vocab: columns per vocab tile (default 8192).
        store: keep the chunk's logits between the sweep and the gradient (None: when the budget allows).
        compact: sweep only the scored positions (``labels != ignore_index``) instead of every position. Costs one
            host sync per chunk (their count); pays off when prompts (image tokens) dominate the sequence — the GEMMs
            then run over the response tokens only. Default False: no host sync.
    """

    memory_budget: Optional[int] = None
    pairs: Optional[int] = None
    vocab: Optional[int] = None
    store: Optional[bool] = None
    compact: bool = False

    def __post_init__(self):
        for name in ("memory_budget", "pairs", "vocab"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"Chunking.{name} must be a positive int or None, got {v!r}")
        if self.store is not None and not isinstance(self.store, bool):
            raise ValueError(f"Chunking.store must be a bool or None, got {self.store!r}")
        if not isinstance(self.compact, bool):
            raise ValueError(f"Chunking.compact must be a bool, got {self.compact!r}")


def check_chunking(chunking) -> Chunking:
    if chunking is None:
        return Chunking()
    if not isinstance(chunking, Chunking):
        raise ValueError(f"chunking must be a vpo.fused.Chunking or None, got {type(chunking).__name__}")
    return chunking


def plan(chunking: Chunking, B: int, T: int, V: int, elem: int, models: int) -> Tuple[int, int, bool]:
    """``(pairs per chunk, vocab tile, store)`` from shapes only (no device access)."""
    budget = chunking.memory_budget
    if budget is None:
        env = os.environ.get("VPO_FUSED_BUDGET_MB")
        budget = int(env) << 20 if env else DEFAULT_BUDGET
    C = min(V, chunking.vocab or DEFAULT_VOCAB_TILE)
    rows_per_pair = 2 * T
    stored_row = models * (V * elem + 16 * C)
    tiled_row = models * 16 * C
    if chunking.pairs is not None:
        store = True if chunking.store is None else chunking.store
        return min(B, chunking.pairs), C, store
    store = chunking.store if chunking.store is not None else rows_per_pair * stored_row <= budget
    per_pair = rows_per_pair * (stored_row if store else tiled_row)
    return max(1, min(B, budget // per_pair)), C, store


class _Head:
    """One model's head and its chunk's rows: ``h [R, D]`` against ``W [V, D]``, ``b [V] | None``."""

    def __init__(self, weight, bias, h):
        self.W, self.b, self.h = weight, bias, h

    def tile(self, v0: int, v1: int) -> torch.Tensor:
        Wt = self.W[v0:v1]  # [C, D]
        if self.b is None:
            return self.h @ Wt.T  # [R, D] @ [D, C] -> [R, C]
        return torch.addmm(self.b[v0:v1], self.h, Wt.T)


class _Online:
    """Online log-sum-exp with the running ``Σ e^{z−m}·x`` of a few per-column quantities ``x``."""

    def __init__(self, R: int, n_moments: int, dtype, device):
        self.m = torch.full((R,), float("-inf"), dtype=dtype, device=device)
        self.s = torch.zeros(R, dtype=dtype, device=device)
        self.mom = [torch.zeros(R, dtype=dtype, device=device) for _ in range(n_moments)]

    def update(self, z: torch.Tensor, xs: Sequence[torch.Tensor] = ()) -> None:
        m_new = torch.maximum(self.m, z.amax(1))
        scale = torch.exp(self.m - m_new)  # exp(-inf) = 0 on the first tile
        e = torch.exp(z - m_new[:, None])  # [R, C]
        self.s = self.s * scale + e.sum(1)
        for i, x in enumerate(xs):
            self.mom[i] = self.mom[i] * scale + (e * x).sum(1)
        self.m = m_new

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)

    def mean(self, i: int) -> torch.Tensor:
        return self.mom[i] / self.s


def _gather_target(z: torch.Tensor, y: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    """``z[r, y_r − v0]`` where ``y_r`` lies in ``[v0, v1)``, else 0: ``[R]``."""
    inside = (y >= v0) & (y < v1)
    col = (y - v0).clamp(0, v1 - v0 - 1)
    return torch.where(inside, z.gather(1, col[:, None]).squeeze(1), torch.zeros((), dtype=z.dtype, device=z.device))


def _onehot_add(dz: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, v0: int, v1: int) -> None:
    """``dz[r, y_r − v0] += coef_r`` for the rows whose target lies in the tile (an O(R) scatter)."""
    inside = (y >= v0) & (y < v1)
    col = (y - v0).clamp(0, v1 - v0 - 1)
    dz.scatter_add_(1, col[:, None], torch.where(inside, coef, torch.zeros_like(coef))[:, None])


@dataclass
class Sweep:
    """What the engine returns: per-token terms ``[2B, T]`` (0 at ignored positions) and the gradients (None where not
    asked for)."""

    tok: Dict[str, torch.Tensor]
    grads: Dict[str, Optional[torch.Tensor]]


def pair_rows(p0: int, p1: int, B: int, device) -> torch.Tensor:
    """Row indices of pairs ``[p0, p1)``: the chosen rows, then the rejected rows -> ``[2P]``."""
    r = torch.arange(p0, p1, device=device)
    return torch.cat([r, r + B])


def sweep(
    *,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    chunking: Chunking,
    ref: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None,
    noised: Optional[torch.Tensor] = None,
    noised_grad: bool = False,
    pair_loss: Optional[Callable[..., torch.Tensor]] = None,
    need: Sequence[str] = (),
) -> Sweep:
    """Sweep ``hidden [2B, T, D]`` over the vocabulary of ``weight [V, D]`` (+ ``bias [V]``), chunk by chunk of pairs.

    Per-token outputs in ``Sweep.tok`` (``[2B, T]``, accumulation dtype, 0 where ``labels == ignore_index``): ``logp``,
    ``z`` (target logit), ``entropy``; with ``noised`` ``[2B, T, D]``: ``z_noised`` (its target logit) and ``s = z −
    z_noised``; with ``ref = (ref_hidden, ref_weight, ref_bias)``: ``ref_logp`` and ``kl`` (KL[π_θ ‖ π_ref] over the
    vocab), swept alongside the policy's tiles.

    ``pair_loss(tok, rows, P)`` — given the chunk's per-token terms ``[2P, T]`` (``logp``, ``s``, ``kl`` require grad
    where they can carry one) and its row indices ``rows [2P]`` into the batch — returns the chunk's share of the loss
    (sum over its pairs / B). ``need`` ⊆ {"hidden", "weight", "bias", "noised"}: the gradients to form (their
    ``Sweep.grads`` entries are in the input dtype; the others are None). Without ``pair_loss`` or ``need`` this is a
    statistics-only sweep (one GEMM pass per model).
    """
    twoB, T, D = hidden.shape
    B = twoB // 2
    V = weight.shape[0]
    dtype, dev = hidden.dtype, hidden.device
    acc = acc_dtype(dtype)
    need = tuple(need) if pair_loss is not None else ()
    grad_h, grad_w, grad_b = "hidden" in need, "weight" in need, "bias" in need and bias is not None
    grad_n = "noised" in need and noised is not None and noised_grad
    noised_grad = noised_grad and noised is not None
    any_grad = grad_h or grad_w or grad_b or grad_n
    P, C, store = plan(chunking, B, T, V, hidden.element_size(), 2 if ref is not None else 1)
    store = store and any_grad

    mask = labels != ignore_index  # [2B, T]
    y_all = torch.where(mask, labels, torch.zeros_like(labels)).long()  # safe targets (0 where ignored)
    names = ["logp", "z", "entropy"] + (["z_noised", "s"] if noised is not None else []) \
        + (["ref_logp", "kl"] if ref is not None else [])
    tok = {k: torch.zeros(twoB, T, dtype=acc, device=dev) for k in names}
    dh = torch.zeros_like(hidden) if grad_h else None
    dn = torch.zeros_like(noised) if grad_n else None
    dW = torch.zeros(V, D, dtype=acc, device=dev) if grad_w else None
    db = torch.zeros(V, dtype=acc, device=dev) if grad_b else None
    zero = torch.zeros((), dtype=acc, device=dev)

    for p0 in range(0, B, P):
        p1 = min(B, p0 + P)
        rows = pair_rows(p0, p1, B, dev)  # [2P]
        R_all = rows.numel() * T
        m_c = mask.index_select(0, rows).reshape(R_all)
        # compact: only the scored positions enter the GEMMs (their count is needed on the host: one sync)
        pos = m_c.nonzero().squeeze(1) if chunking.compact else None
        R = R_all if pos is None else pos.numel()

        def rows_of(x):  # [2B, T, ...] -> the chunk's [R, ...]
            x = x.index_select(0, rows).reshape(R_all, *x.shape[2:])
            return x if pos is None else x.index_select(0, pos)

        def spread(v):  # [R, ...] -> [R_all, ...], 0 at the positions left out
            return v if pos is None else v.new_zeros((R_all, *v.shape[1:])).index_copy_(0, pos, v)

        y = rows_of(y_all)
        pol = _Head(weight, bias, rows_of(hidden))
        rh = None if ref is None else _Head(ref[1], ref[2], rows_of(ref[0]))

        # -- forward sweep: online lse, E_p[z] (entropy), target logit; Cat-PO: the reference tile alongside
        on = _Online(R, 2 if rh is not None else 1, acc, dev)
        on_ref = _Online(R, 0, acc, dev) if rh is not None else None
        zt = torch.zeros(R, dtype=acc, device=dev)
        zt_ref = torch.zeros(R, dtype=acc, device=dev) if rh is not None else None
        kept = []
        for v0 in range(0, V, C):
            v1 = min(V, v0 + C)
            z = pol.tile(v0, v1)  # [R, C] input dtype
            zf = z.to(acc)
            zt = zt + _gather_target(zf, y, v0, v1)
            if rh is not None:
                zr = rh.tile(v0, v1)
                zrf = zr.to(acc)
                on.update(zf, (zf, zf - zrf))
                on_ref.update(zrf)
                zt_ref = zt_ref + _gather_target(zrf, y, v0, v1)
            else:
                zr = None
                on.update(zf, (zf,))
            if store:
                kept.append((z, zr))
        lse = on.lse()
        t = {"z": zt, "logp": zt - lse, "entropy": lse - on.mean(0)}
        if rh is not None:
            lse_ref = on_ref.lse()
            t["ref_logp"] = zt_ref - lse_ref
            t["kl"] = on.mean(1) - lse + lse_ref
        if noised is not None:
            hn = rows_of(noised)
            Wy = weight.index_select(0, y)  # [R, D] target rows (O(R·D) gather)
            zn = (hn.to(acc) * Wy.to(acc)).sum(1)  # [R] gather-dot, no vocab sweep
            if bias is not None:
                zn = zn + bias.index_select(0, y).to(acc)
            t["z_noised"], t["s"] = zn, zt - zn
        kl_packed = t.get("kl")
        t = {k: torch.where(m_c, spread(v), zero).reshape(2 * (p1 - p0), T) for k, v in t.items()}
        for k, v in t.items():
            tok[k].index_copy_(0, rows, v)
        if not any_grad:
            continue

        # -- the chunk's loss and its gradient w.r.t. the per-token terms (small autograd graph, [2P, T])
        leaves = {k: t[k].detach().requires_grad_() for k in ("logp", "s", "kl") if k in t}
        with torch.enable_grad():
            chunk_loss = pair_loss({**t, **leaves}, rows, p1 - p0)
            wanted = list(leaves)
            gs = torch.autograd.grad(chunk_loss, [leaves[k] for k in wanted], allow_unused=True)
        # None: the loss does not use that term (e.g. KL with kl_coef == 0); ignored positions get 0
        g = {k: None if v is None else torch.where(m_c, v.reshape(R_all), zero) for k, v in zip(wanted, gs)}
        if pos is not None:
            g = {k: None if v is None else v.index_select(0, pos) for k, v in g.items()}
        g_logp = g["logp"] if g["logp"] is not None else torch.zeros(R, dtype=acc, device=dev)
        g_s = g.get("s") if noised_grad else None
        g_kl = g.get("kl")
        coef = g_logp if g_s is None else g_logp + g_s  # onehot(y) coefficient

        # -- gradient sweep: dz per tile, then the two GEMMs into dh and dW
        dh_c = torch.zeros(R, D, dtype=acc, device=dev) if grad_h else None
        for i, v0 in enumerate(range(0, V, C)):
            v1 = min(V, v0 + C)
            if store:
                z, zr = kept[i]
                kept[i] = None  # free the tile as soon as it is used
            else:
                z = pol.tile(v0, v1)
                zr = rh.tile(v0, v1) if rh is not None else None
            logp_tile = z.to(acc) - lse[:, None]  # log p, [R, C]
            p = torch.exp(logp_tile)
            dz = p * (-g_logp)[:, None]
            if zr is not None and g_kl is not None:
                log_ratio = logp_tile - (zr.to(acc) - lse_ref[:, None])  # log p − log q
                dz = dz + p * (log_ratio - kl_packed[:, None]) * g_kl[:, None]
            _onehot_add(dz, y, coef, v0, v1)
            if db is not None:
                db[v0:v1] += dz.sum(0)
            dzc = dz.to(dtype)
            if grad_h:
                mm_acc_into(dh_c, dzc, pol.W[v0:v1])  # [R, C] @ [C, D] -> [R, D]
            if grad_w:
                mm_acc_into(dW[v0:v1], dzc.T, pol.h)  # [C, R] @ [R, D] -> [C, D]
        if grad_h:
            dh.index_copy_(0, rows, spread(dh_c.to(dtype)).reshape(-1, T, D))
        if g_s is not None:  # s = z[y] − z_n[y]: ∂/∂z_n[y] = −g_s
            dzn = -g_s  # [R]
            if grad_n:
                dn.index_copy_(0, rows, spread((dzn[:, None] * Wy.to(acc)).to(dtype)).reshape(-1, T, D))
            if dW is not None:
                dW.index_add_(0, y, dzn[:, None] * hn.to(acc))  # the target rows only: O(R·D)
            if db is not None:
                db.index_add_(0, y, dzn)

    grads = {
        "hidden": dh,
        "noised": dn,
        "weight": None if dW is None else dW.to(weight.dtype),
        "bias": None if db is None else db.to(bias.dtype),
    }
    return Sweep(tok=tok, grads=grads)


class AttachGrads(torch.autograd.Function):
    """``loss`` whose gradient w.r.t. ``inputs`` is the precomputed ``grads`` (scaled by ``grad_output``).

    The grads are saved for backward, so a second backward without ``retain_graph=True`` raises as for any graph,
    and with it yields the same (correct) gradients again. Double backward is not supported (the stored grads are
    constants).
    """

    @staticmethod
    def forward(ctx, loss, grads, *inputs):
        ctx.present = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        out = [None, None]
        for present in ctx.present:
            out.append((next(saved) * grad_output) if present else None)
        return tuple(out)


def attach(loss: torch.Tensor, pairs: Sequence[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]) -> torch.Tensor:
    """``loss`` (detached) differentiable w.r.t. each input of ``pairs = [(input, grad), ...]`` with a grad."""
    live = [(x, g) for x, g in pairs if x is not None and g is not None and x.requires_grad]
    if not live or not torch.is_grad_enabled():
        return loss.detach()
    return AttachGrads.apply(loss, tuple(g for _, g in live), *[x for x, _ in live])
