"""Counted, not hoped: the fused losses' CUDA code path traced on the meta device at the Qwen2.5-VL-7B head.

``vpo.testing_counter.CostCounter`` counts every op that reaches the dispatcher (launches, GEMM FLOPs, GEMM and
non-GEMM bytes, peak extra memory); ``vpo._caps.assume_cuda()`` makes the meta tensors take the CUDA branches (fp32-out
GEMMs, the Triton epilogue custom ops ``torch.ops.vpo.tile_stats_`` / ``tile_grad`` through their fake
implementations). Shapes: D=3584, V=152064, bf16, N = 2B·T positions with T=1024 (B=4: N=8192; B=8: N=16384); weight
and hidden require grad; a reference model's hidden states (``ref_hidden``) unless said.

Bounds (issue #19, item 2), per logit of the [N, V] logits that are never materialized:

    GEMM FLOPs           8·N·D·V within 1%  (policy logits, dh, dW + reference logits) — DPO, TPO, Cat-PO
    non-GEMM bytes       ≤ 12 per policy logit + 6 per reference logit: ≤ 18·N·V for DPO / TPO with ref_hidden,
                         ≤ 12·N·V with ref_logps;  ≤ 20·N·V for Cat-PO with its reference; each + 6·V·D for the one
                         pass that scales dW by grad_output and casts it (item 5; O(V·D), not per logit)
    kernel launches      ≤ 800 for fused_dpo_loss fwd+bwd at N=8192

``pytest -s`` prints each trace's totals, its peak extra memory and the per-op breakdown. The first tests check the
counter itself on ops whose costs are known exactly.
"""
import functools

import pytest
import torch

import vpo
from vpo import _caps
from vpo.testing_counter import CostCounter, tensor_bytes

D, V, T = 3584, 152064, 1024
BF16 = torch.bfloat16
F32 = 4


# ----------------------------------------------------------------------------------------------------------------------
# The counter on known ops
# ----------------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("vpo_counter_test::bump_", mutates_args=("x",))
def _bump_(x: torch.Tensor, y: torch.Tensor) -> None:
    """x[r, :] += y[r] in place (a mutating custom op, like vpo::tile_stats_)."""
    x.add_(y[:, None])


@_bump_.register_fake
def _(x, y):
    return None


@torch.library.custom_op("vpo_counter_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    """2·x in bf16 (a custom op returning a new tensor, like vpo::tile_grad)."""
    return (2 * x).to(torch.bfloat16)


@_twice.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.bfloat16)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_counter_exact_on_known_ops(device):
    M, K, N = 64, 32, 48
    a = torch.randn(M, K, device=device)
    b = torch.randn(K, N, device=device)
    x = torch.randn(M, N, device=device)
    r = torch.randn(M, device=device)
    with CostCounter() as c:
        z = a @ b                               # 1 GEMM
        w = z + x                               # read 2, write 1
        v = w.view(N, M)                        # view: nothing
        s = x - r[:, None]                      # broadcast: [M, N] + [M] read, [M, N] written
        w.add_(x)                               # in place: self read + written, other read
        torch.ops.vpo_counter_test.bump_(w, r)  # custom, mutating: w read + written, r read
        d = torch.ops.vpo_counter_test.twice(x)  # custom, new bf16 output
    assert c.gemm_flops == 2 * M * K * N
    assert c.gemm_bytes == F32 * (M * K + K * N + M * N)
    mn = M * N * F32
    expected = {"aten.add": 3 * mn, "aten.sub": 2 * mn + M * F32, "aten.add_": 3 * mn,
                "vpo_counter_test.bump_": 2 * mn + M * F32, "vpo_counter_test.twice": mn + M * N * 2}
    for name, nbytes in expected.items():
        assert c.ops[name].bytes == nbytes, (name, c.ops[name])
        assert c.ops[name].launches == 1, name
    assert c.ops["aten.view"].launches == 0 and c.ops["aten.view"].bytes == 0
    assert c.launches == 1 + len(expected)
    assert c.other_bytes == sum(expected.values())
    assert v.shape == (N, M) and s.shape == x.shape and d.dtype == torch.bfloat16


def test_counter_gemm_overloads_and_allocations():
    M, K, N = 16, 8, 24
    a = torch.empty(M, K, device="meta", dtype=BF16)
    b = torch.empty(K, N, device="meta", dtype=BF16)
    out = torch.empty(M, N, device="meta", dtype=BF16)
    bias = torch.empty(N, device="meta", dtype=BF16)
    with CostCounter() as c:
        z32 = torch.mm(a, b, out_dtype=torch.float32)        # aten::mm.dtype: fp32 output
        torch.mm(a, b, out=out)                               # out=: written only
        torch.addmm(bias, a, b)                               # bias read, bf16 output
        e = torch.empty(M, N, device="meta")                  # allocation: no kernel
        zf = torch.zeros(M, N, device="meta")                 # a fill kernel
        bb = torch.bmm(a.expand(3, M, K), b.expand(3, K, N))  # batched; the expanded operands are read once
    assert z32.dtype == torch.float32 and e.shape == zf.shape == bb.shape[1:]
    assert c.gemm_flops == 3 * 2 * M * K * N + 3 * 2 * M * K * N
    ab = 2 * (M * K + K * N)
    assert c.ops["aten.mm"].gemm_bytes == (ab + 4 * M * N) + (ab + 2 * M * N)
    assert c.ops["aten.addmm"].gemm_bytes == ab + 2 * N + 2 * M * N
    assert c.ops["aten.bmm"].gemm_bytes == ab + 3 * 2 * M * N
    assert c.ops["aten.empty"].launches == 0 and c.ops["aten.zeros"].launches == 1
    assert c.ops["aten.zeros"].bytes == 4 * M * N and c.other_bytes == 4 * M * N
    assert c.launches == 5  # mm ×2, addmm, zeros, bmm (expand: a view)


def test_counter_gathers_and_scatters_touch_only_their_elements():
    M, N, V, Dh = 32, 1000, 500, 16
    x = torch.randn(M, N)
    idx = torch.randint(0, N, (M, 1))
    W = torch.randn(V, Dh)
    rows = torch.randint(0, V, (M,))
    with CostCounter() as c:
        g = x.gather(1, idx)                    # M of x's elements read, not M·N
        e = W.index_select(0, rows)             # M rows of W
        x.scatter_add_(1, idx, g)               # M elements of x read and written
        W.index_add_(0, rows, e)                # M rows of W read and written
        x.copy_(x.flip(1))                      # copy_ overwrites: one read of the source, one write
        x.zero_()                               # a fill: one write
        x[rows % M, 0] = 1.0                    # index_put_ without accumulate: M writes
    assert c.ops["aten.copy_"].bytes == 2 * M * N * 4 and c.ops["aten.zero_"].bytes == M * N * 4
    assert c.ops["aten.index_put_"].bytes == M * 8 + 4 + M * 4  # the index, the 0-dim value, M elements of x
    assert c.ops["aten.gather"].bytes == M * 8 + M * 4 + M * 4
    assert c.ops["aten.index_select"].bytes == M * 8 + 2 * M * Dh * 4
    assert c.ops["aten.scatter_add_"].bytes == M * 8 + M * 4 + 2 * M * 4
    assert c.ops["aten.index_add_"].bytes == M * 8 + M * Dh * 4 + 2 * M * Dh * 4
    assert c.launches == 4 + 5  # + flip, copy_, zero_, remainder, index_put_ (lift_fresh of 1.0: no kernel)


def test_counter_peak_memory_tracks_frees():
    x = torch.randn(1000)  # 4000 B, allocated outside: not counted
    with CostCounter() as c:
        y = x * 2      # 4000 live
        z = y + 1      # 8000 live: the peak
        del y          # 4000
        w = z * 3      # 8000 again
        zv = z.view(10, 100)  # a view: no new storage
        del z, w
        assert c.live_bytes == 4000  # zv still holds z's storage
        del zv
    assert c.peak_bytes == 8000 and c.live_bytes == 0
    assert tensor_bytes(x.expand(7, 1000)) == 4000


def test_counters_nest():
    x = torch.randn(10)
    with CostCounter() as outer:
        with CostCounter() as inner:
            x + 1
        x * 2
    assert (outer.launches, inner.launches) == (2, 1)


def test_counter_sees_autograd_saved_tensors():
    a = torch.randn(256, requires_grad=True)
    with CostCounter() as c:
        e = a.exp()    # saved by autograd for its backward
        s = e.sum()
        del e          # still alive: exp's backward holds it
        assert c.live_bytes == 256 * 4 + 4
        s.backward()
    assert a.grad is not None and c.peak_bytes >= 2 * 256 * 4


# ----------------------------------------------------------------------------------------------------------------------
# The fused losses at real shapes
# ----------------------------------------------------------------------------------------------------------------------

# the CUDA path's epilogue ops are registered by vpo_kernels.epilogue, which needs triton (not a GPU)
needs_triton = pytest.mark.skipif(not _caps.triton_epilogue(), reason="triton is not installed: the CUDA path's "
                                  "epilogue custom ops (vpo_kernels.epilogue) cannot be traced")


def _meta(*shape, dtype=BF16, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


@functools.lru_cache(maxsize=None)
def trace(loss: str, N: int, reference: str = "hidden") -> CostCounter:
    """fwd+bwd of one fused loss on the meta device with the CUDA branches taken; ``reference``: "hidden" (a
    reference model's hidden states) or "logps" (precomputed reference log-probs)."""
    B = N // (2 * T)
    W = _meta(V, D, grad=True)
    h = _meta(2 * B, T, D, grad=True)
    y = _meta(2 * B, T, dtype=torch.long)
    ref = dict(ref_hidden=_meta(2 * B, T, D)) if reference == "hidden" else dict(ref_logps=_meta(2 * B,
                                                                                                   dtype=torch.float32))
    with _caps.assume_cuda(), CostCounter() as c:
        if loss == "dpo":
            out, _ = vpo.fused_dpo_loss(W, h, y, **ref)
        elif loss == "tpo":
            hn = _meta(2 * B, T, D, grad=True)
            if reference == "hidden":
                ref["ref_hidden_noised"] = _meta(2 * B, T, D)
            out, _ = vpo.fused_tpo_loss(W, h, hn, y, **ref)
        else:
            out, _ = vpo.fused_catpo_loss(W, h, y, _meta(2 * B, T, dtype=torch.float32), **ref)
        out.backward()
        del out
    assert W.grad is not None and h.grad is not None
    NV = N * V
    epi = sum(o.bytes for k, o in c.ops.items() if k.startswith("vpo."))
    print(f"\n== fused_{loss}_loss fwd+bwd, N={N}, D={D}, V={V}, bf16, reference={reference}: "
          f"GEMM {c.gemm_flops / (8 * N * D * V):.4f}×8NDV, non-GEMM {c.other_bytes / NV:.2f} B/logit, "
          f"of which vpo custom ops {epi / NV:.2f}, GEMM {c.gemm_bytes / NV:.2f} B/logit, {c.launches} launches, peak extra {c.peak_bytes / 2**30:.2f} GiB")
    print(c.summary(top=30))
    return c


CASES = [(loss, N) for loss in ("dpo", "tpo", "catpo") for N in (8192, 16384)]
DW_PASS = 6 * V * D  # bytes: dW's one scale-and-cast pass in the backward (fp32 read, bf16 written)


@needs_triton
@pytest.mark.parametrize("loss,N", CASES)
def test_gemm_flops_are_four_passes(loss, N):
    c = trace(loss, N)
    assert c.gemm_flops == pytest.approx(8 * N * D * V, rel=0.01)


@needs_triton
@pytest.mark.parametrize("loss,N", CASES)
def test_non_gemm_bytes_per_logit(loss, N):
    """≤ 12 B per policy logit + 6 per reference logit (Cat-PO: 20 with its reference), plus the one pass over the
    fp32 dW that scales it by grad_output and casts it (item 5: 4 B read + 2 B written per element of [V, D], not a
    per-logit cost: 2.6 B/logit at N=8192, 1.3 at 16384). The two epilogue passes alone: stats 4 B (+4 for the
    reference's tile) and gradient 4 + 2 B per logit."""
    c = trace(loss, N)
    bound = 20 if loss == "catpo" else 12 + 6
    NV = N * V
    assert c.other_bytes <= bound * NV + DW_PASS, f"{(c.other_bytes - DW_PASS) / NV:.2f} B per logit > {bound}"
    epi = sum(o.bytes for k, o in c.ops.items() if k.startswith("vpo."))
    assert epi <= (18.1 if loss == "catpo" else 14.1) * NV, epi / NV  # + the [R] statistics and targets


@needs_triton
def test_dpo_with_ref_logps():
    N = 8192
    c = trace("dpo", N, "logps")
    assert c.gemm_flops == pytest.approx(6 * N * D * V, rel=0.01)  # no reference pass
    assert c.other_bytes <= 12 * N * V + DW_PASS, f"{(c.other_bytes - DW_PASS) / (N * V):.2f} B per logit > 12"


@needs_triton
def test_dpo_kernel_launches():
    c = trace("dpo", 8192)
    assert c.launches <= 800, c.launches


@needs_triton
def test_peak_memory_is_not_n_by_v():
    """Printed by every trace above; here only the coarse claim: no [N, V] fp32 tensor is ever live (the engine's
    budget keeps chunks at a few GiB), at the larger N."""
    N = 16384
    for loss in ("dpo", "tpo", "catpo"):
        c = trace(loss, N)
        assert c.peak_bytes < 4 * N * V, (loss, c.peak_bytes / 2**30)
