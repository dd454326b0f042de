"""The Triton epilogue (``vpo_kernels.epilogue``: ``torch.ops.vpo.tile_stats_`` / ``tile_grad``) against the contract's
torch implementation (``vpo.ops.epilogue``) and a float64 oracle (``log_softmax`` of the whole row, autograd for the
gradient), under the Triton interpreter on CPU.

Shapes: R = 37 rows, V = 300 columns swept as three tiles of odd widths (130, 37, 133), each a strided view of the
full ``[R, V]`` logits (the reference's tiles have another row stride); kernel blocks 16 x 32 divide none of them.
Tolerances are fp32 error: ``16 · eps32 · (1 + max |z'|)`` on every per-row result (log-probs, entropy, KL, ...).
"""
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vpo import _caps
from vpo.ops import epilogue as E

K = pytest.importorskip("vpo_kernels.epilogue")

# The interpreter on CPU; compiled kernels on CUDA where a GPU is present (tests/conftest.py sets TRITON_INTERPRET).
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1" else "cpu"

R, V = 37, 300
TILES = [(0, 130), (130, 167), (167, 300)]
EPS32 = torch.finfo(torch.float32).eps
TRANSFORMS = {"plain": (1.0, 0.0), "scale": (0.7, 0.0), "softcap": (1.3, 5.0)}
FINISH_KEYS = ["lse", "logp", "z", "entropy", "mean_logit", "log_sum_p2", "is_argmax"]


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """16 x 32 blocks: several row programs and column blocks per tile, none full."""
    monkeypatch.setattr(K, "default_epilogue_config", lambda: K.EpilogueConfig(block_n=16, block_c=32))


def _inputs(dtype, *, scale=4.0, bias=True, ref=True, seed=0):
    """Logits ``z [R, V]`` (``dtype``), targets (some in every tile), bias ``[V]`` and a reference ``[R, V]`` stored
    in a wider buffer (its own row stride)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(R, V, generator=g) * scale).to(dtype)
    y = torch.randint(0, V, (R,), generator=g)
    y[: len(TILES)] = torch.tensor([v0 + 3 for v0, _ in TILES])
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    r = None
    if ref:
        wide = torch.empty(R, V + 7, dtype=dtype, device=DEV)
        wide[:, :V] = z.float() + torch.randn(R, V, generator=g) * scale * 0.3
        r = wide[:, :V]
    return z.to(DEV), y.to(DEV), None if b is None else b.to(DEV), r


def _xf(z, b, scale, softcap):
    """The transform in float64 (the oracle)."""
    x = z.double() + (0.0 if b is None else b.double())
    x = x * scale
    return softcap * torch.tanh(x / softcap) if softcap else x


def _oracle(z, y, b, r, scale, softcap):
    """Per-row float64 results of the whole row: the keys of :func:`vpo.ops.epilogue.finish`."""
    x = _xf(z, b, scale, softcap)
    logp = x.log_softmax(1)
    p = logp.exp()
    zy = x.gather(1, y[:, None])[:, 0]
    out = {"lse": x.logsumexp(1), "logp": logp.gather(1, y[:, None])[:, 0], "z": zy,
           "entropy": -(p * logp).sum(1), "mean_logit": x.mean(1), "log_sum_p2": (p * p).sum(1).log(),
           "is_argmax": (zy >= x.amax(1)).double()}
    if r is not None:
        xr = _xf(r, b, scale, softcap)
        logq = xr.log_softmax(1)
        out.update(ref_lse=xr.logsumexp(1), ref_logp=logq.gather(1, y[:, None])[:, 0], kl=(p * (logp - logq)).sum(1))
    return out, x


def _sweep(fn, z, y, b, r, *, scale, softcap, **flags):
    """Run a tile_stats_ implementation over the three tiles; returns the statistics ``[STAT_ROWS, R]``."""
    st = E.new_stats(R, torch.float64 if z.dtype == torch.float64 else torch.float32, DEV)
    for v0, v1 in TILES:
        fn(z[:, v0:v1], y, v0, st, bias=None if b is None else b[v0:v1], ref=None if r is None else r[:, v0:v1],
           ref_bias=None if (b is None or r is None) else b[v0:v1], scale=scale, softcap=softcap, **flags)
    return st


def _tol(x):
    return 16 * EPS32 * (1.0 + x.abs().max().item())


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("ref", [False, True], ids=["noref", "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_stats_match_torch_and_oracle(dtype, ref, bias, transform):
    scale, softcap = TRANSFORMS[transform]
    z, y, b, r = _inputs(dtype, bias=bias, ref=ref)
    flags = dict(scale=scale, softcap=softcap, entropy=True, mean=True, sumsq=True)
    got = _sweep(K.triton_tile_stats_, z, y, b, r, **flags)
    want = _sweep(E.torch_tile_stats_, z, y, b, r, **flags)
    oracle, x = _oracle(z, y, b, r, scale, softcap)
    tol = _tol(x)
    fin_got, fin_want = E.finish(got, V, ref=ref), E.finish(want, V, ref=ref)
    for key in FINISH_KEYS + (["ref_lse", "ref_logp", "kl"] if ref else []):
        assert torch.isfinite(fin_got[key]).all(), key
        err = (fin_got[key].double() - oracle[key]).abs().max().item()
        assert err <= tol, f"{key}: |triton - oracle| = {err:.3g} > {tol:.3g}"
        err_t = (fin_got[key] - fin_want[key]).abs().max().item()
        assert err_t <= tol, f"{key}: |triton - torch| = {err_t:.3g} > {tol:.3g}"
    if not ref:  # the reference's rows are left as they were
        assert torch.equal(got[[E.MR, E.SR, E.TR, E.UD]], E.new_stats(R, torch.float32, DEV)[[E.MR, E.SR, E.TR,
                                                                                                    E.UD]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_logit_scale_100_and_peaked(dtype):
    """Logits of magnitude ~300, plain and capped at 50 (scale 1.5): fp32 accuracy against the oracle, nothing
    non-finite; the flags that are off leave Z and Q untouched."""
    z, y, b, r = _inputs(dtype, scale=100.0)
    for scale, softcap in [(1.0, 0.0), (1.5, 50.0)]:
        got = _sweep(K.triton_tile_stats_, z, y, b, r, scale=scale, softcap=softcap, entropy=True, mean=False,
                     sumsq=False)
        assert torch.all(got[[E.Z, E.Q]] == 0)
        oracle, x = _oracle(z, y, b, r, scale, softcap)
        fin = E.finish(got, V, ref=True)
        for key in ["lse", "logp", "entropy", "ref_logp", "kl"]:
            assert torch.isfinite(fin[key]).all(), key
            err = (fin[key].double() - oracle[key]).abs().max().item()
            assert err <= _tol(x), f"{key} (cap {softcap}): {err:.3g} > {_tol(x):.3g}"


def test_policy_equals_reference_bit_identical():
    """The same tile as policy and reference: MR, SR, TR equal M, S, T bit for bit, UD and the KL exactly 0; M, S, T
    do not depend on which optional moments are asked for."""
    z, y, b, _ = _inputs(torch.float32, ref=False)
    zr = torch.empty(R, V + 3, device=DEV)
    zr[:, :V] = z
    for scale, softcap in (TRANSFORMS["plain"], TRANSFORMS["softcap"]):
        st = E.new_stats(R, torch.float32, DEV)
        bare = E.new_stats(R, torch.float32, DEV)
        for v0, v1 in TILES:
            K.triton_tile_stats_(z[:, v0:v1], y, v0, st, bias=b[v0:v1], ref=zr[:, v0:v1], ref_bias=b[v0:v1],
                                 scale=scale, softcap=softcap, entropy=True, mean=True, sumsq=True)
            K.triton_tile_stats_(z[:, v0:v1], y, v0, bare, bias=b[v0:v1], scale=scale, softcap=softcap,
                                 entropy=False, mean=False, sumsq=False)
        for a, c in [(E.M, E.MR), (E.S, E.SR), (E.T, E.TR)]:
            assert torch.equal(st[a], st[c])
            assert torch.equal(st[a], bare[a])
        assert torch.all(st[E.UD] == 0)
        fin = E.finish(st, V, ref=True)
        assert torch.all(fin["kl"] == 0) and torch.equal(fin["logp"], fin["ref_logp"])


def _autograd_dz(z, y, b, r, scale, softcap, g_logp, coef, g_kl):
    """∂L/∂z of L = Σ_r −g_logp·lse + coef·z'[y] + g_kl·KL(p‖q) in float64 (q fixed): the contract's dz."""
    z64 = z.double().requires_grad_()
    x = _xf(z64, b, scale, softcap)
    logp = x.log_softmax(1)
    loss = (-g_logp.double() * x.logsumexp(1) + coef.double() * x.gather(1, y[:, None])[:, 0]).sum()
    if g_kl is not None:
        logq = _xf(r, b, scale, softcap).log_softmax(1)
        loss = loss + (g_kl.double() * (logp.exp() * (logp - logq)).sum(1)).sum()
    (dz,) = torch.autograd.grad(loss, z64)
    return dz


def _grad_sweep(fn, z, y, b, r, stats, g_logp, coef, g_kl, *, out_dtype, scale, softcap):
    fin = E.finish(stats, V, ref=r is not None)
    kw = dict(out_dtype=out_dtype, scale=scale, softcap=softcap)
    if g_kl is not None:
        kw.update(lse_ref=fin["ref_lse"], g_kl=g_kl, kl=fin["kl"])
    parts = [fn(z[:, v0:v1], y, v0, fin["lse"], g_logp, coef, bias=None if b is None else b[v0:v1],
                ref=None if r is None else r[:, v0:v1], ref_bias=None if (b is None or r is None) else b[v0:v1], **kw)
             for v0, v1 in TILES]
    return torch.cat(parts, 1)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("kl", [False, True], ids=["logp", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_grad_matches_autograd_and_torch(dtype, kl, transform):
    scale, softcap = TRANSFORMS[transform]
    z, y, b, r = _inputs(dtype, ref=kl)
    g = torch.Generator().manual_seed(1)
    g_logp, coef = torch.randn(R, generator=g).to(DEV), torch.randn(R, generator=g).to(DEV)
    g_kl = torch.randn(R, generator=g).to(DEV) if kl else None
    ignored = torch.tensor([4, 11, 30], device=DEV)
    for t in (g_logp, coef) + ((g_kl,) if kl else ()):
        t[ignored] = 0.0
    z = z.clone()
    z[ignored[0], 5] = math.inf  # non-finite logits on ignored rows never reach dz
    z[ignored[1], 140] = math.nan
    stats = _sweep(E.torch_tile_stats_, z, y, b, r, scale=scale, softcap=softcap)
    got = _grad_sweep(K.triton_tile_grad, z, y, b, r, stats, g_logp, coef, g_kl, out_dtype=torch.float32,
                      scale=scale, softcap=softcap)
    want = _grad_sweep(E.torch_tile_grad, z, y, b, r, stats, g_logp, coef, g_kl, out_dtype=torch.float32,
                       scale=scale, softcap=softcap)
    assert torch.all(got[ignored] == 0)
    live = torch.ones(R, dtype=torch.bool, device=DEV)
    live[ignored] = False
    assert torch.isfinite(got).all()
    oracle = _autograd_dz(z[live], y[live], b, None if r is None else r[live], scale, softcap, g_logp[live],
                          coef[live], None if g_kl is None else g_kl[live])
    tol = _tol(_xf(z[live], b, scale, softcap)) * oracle.abs().max().item()
    err = (got[live].double() - oracle).abs().max().item()
    assert err <= tol, f"|triton - autograd| = {err:.3g} > {tol:.3g}"
    err_t = (got[live] - want[live]).abs().max().item()
    assert err_t <= tol, f"|triton - torch| = {err_t:.3g} > {tol:.3g}"


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_grad_out_dtype(out_dtype):
    """dz written in the 16-bit out_dtype: the fp32 result rounded (within one rounding of the torch result)."""
    z, y, b, r = _inputs(torch.float32, ref=False)
    stats = _sweep(E.torch_tile_stats_, z, y, b, None, scale=1.0, softcap=0.0)
    g_logp, coef = torch.randn(R, device=DEV), torch.randn(R, device=DEV)
    got = _grad_sweep(K.triton_tile_grad, z, y, b, None, stats, g_logp, coef, None, out_dtype=out_dtype, scale=1.0,
                      softcap=0.0)
    want = _grad_sweep(E.torch_tile_grad, z, y, b, None, stats, g_logp, coef, None, out_dtype=torch.float32,
                       scale=1.0, softcap=0.0)
    assert got.dtype == out_dtype
    fi = torch.finfo(out_dtype)  # one rounding: a relative eps, or the subnormal step near 0
    assert ((got.float() - want).abs() <= fi.eps * want.abs() + fi.smallest_normal * fi.eps).all()


def test_all_ignored_rows_give_exact_zeros():
    """Every coefficient 0 (a tile of ignored positions, some non-finite): dz is exactly 0 everywhere."""
    z, y, b, r = _inputs(torch.float32)
    z = z.clone()
    z[::3] = math.nan
    z[1::3] = -math.inf
    zero = torch.zeros(R, device=DEV)
    lse = torch.full((R,), math.nan, device=DEV)
    dz = K.triton_tile_grad(z[:, 130:167], y, 130, lse, zero, zero, out_dtype=torch.bfloat16, bias=b[130:167],
                            ref=r[:, 130:167], lse_ref=lse, g_kl=zero, kl=lse, scale=2.0, softcap=3.0)
    assert dz.shape == (R, 37) and torch.all(dz == 0)


def test_stats_rows_are_independent_of_ignored_nan_rows():
    """NaN / inf logits on one row change no other row's statistics."""
    z, y, b, r = _inputs(torch.float32)
    clean = _sweep(K.triton_tile_stats_, z, y, b, r, scale=1.0, softcap=0.0)
    z2 = z.clone()
    z2[7, 20], z2[8, 150] = math.nan, math.inf
    dirty = _sweep(K.triton_tile_stats_, z2, y, b, r, scale=1.0, softcap=0.0)
    keep = torch.ones(R, dtype=torch.bool, device=DEV)
    keep[[7, 8]] = False
    assert torch.equal(clean[:, keep], dirty[:, keep])


def test_extreme_finite_logits_stay_finite():
    """|z| up to 1e4 (with and without a cap): statistics and gradients finite."""
    z, y, b, r = _inputs(torch.float32, scale=3000.0)
    for scale, softcap in [(1.0, 0.0), (1.0, 30.0)]:
        st = _sweep(K.triton_tile_stats_, z, y, b, r, scale=scale, softcap=softcap, sumsq=True)
        fin = E.finish(st, V, ref=True)
        assert all(torch.isfinite(fin[k]).all() for k in ["lse", "logp", "entropy", "kl", "log_sum_p2"])
        dz = _grad_sweep(K.triton_tile_grad, z, y, b, r, st, *[torch.ones(R, device=DEV)] * 3,
                         out_dtype=torch.float32, scale=scale, softcap=softcap)
        assert torch.isfinite(dz).all()


def test_tanh_accuracy():
    """The exp-built tanh of the soft-cap: within 8 eps (relative) of tanh from 1e-8 to saturation, odd, finite."""
    import triton
    import triton.language as tl

    @triton.jit
    def _apply(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(o_ptr + i, K._tanh(tl.load(x_ptr + i, mask=i < n)), mask=i < n)

    mag = torch.cat([torch.logspace(-8, 0, 3000), torch.linspace(0.05, 0.3, 3000), torch.linspace(1, 100, 2000)])
    x = torch.cat([mag, -mag, torch.tensor([0.0, 1e4, -1e4])]).float().to(DEV)
    out = torch.empty_like(x)
    _apply[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), BLOCK=4096)
    want = torch.tanh(x.double())
    assert torch.isfinite(out).all() and torch.equal(out[: mag.numel()], -out[mag.numel(): 2 * mag.numel()])
    rel = (out.double() - want).abs() / want.abs().clamp(min=1e-30)
    assert rel[want != 0].max().item() <= 8 * EPS32 and out[-3] == 0


def test_float64_falls_back_to_torch():
    z, y, b, r = _inputs(torch.float64)
    flags = dict(scale=1.3, softcap=5.0, sumsq=True)
    assert torch.equal(_sweep(K.triton_tile_stats_, z, y, b, r, **flags), _sweep(E.torch_tile_stats_, z, y, b, r,
                                                                                   **flags))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_meta_tensors_dispatch_to_the_fakes(monkeypatch):
    """On meta (the counter's trace of the CUDA path): one custom op per pass, seen by a dispatch mode, no launch."""
    def boom(*a, **k):
        raise AssertionError("kernel launched on meta")

    monkeypatch.setattr(K, "_stats_kernel_call", boom)
    monkeypatch.setattr(K, "_grad_kernel_call", boom)
    z = torch.empty(4096, 1000, device="meta")
    y = torch.empty(4096, dtype=torch.int64, device="meta")
    vec = torch.empty(4096, device="meta")
    st = E.new_stats(4096, torch.float32, "meta")
    with _caps.assume_cuda(), _Ops() as ops:
        assert E.backend(z) == "triton"
        E.tile_stats_(z, y, 0, st, ref=z, entropy=True)
        dz = E.tile_grad(z, y, 0, vec, vec, vec, out_dtype=torch.bfloat16, ref=z, lse_ref=vec, g_kl=vec, kl=vec)
    assert dz.shape == z.shape and dz.dtype == torch.bfloat16 and dz.is_meta
    assert ops.names.count("vpo.tile_stats_.default") == 1 and ops.names.count("vpo.tile_grad.default") == 1


def test_opcheck():
    z, y, b, r = _inputs(torch.float32)
    z, r, b = z[:, :40].contiguous(), r[:, :40].contiguous(), b[:40]
    vec = torch.randn(R, device=DEV)
    st = E.new_stats(R, torch.float32, DEV)
    torch.library.opcheck(torch.ops.vpo.tile_stats_.default, (z, y, 0, st, b, r, b),
                          dict(scale=1.3, softcap=5.0, entropy=True, mean=True, sumsq=True))
    torch.library.opcheck(torch.ops.vpo.tile_grad.default, (z, y, 0, vec + 10, vec, vec, b, r, b, vec + 10, vec, vec),
                          dict(out_dtype=torch.bfloat16, scale=0.7, softcap=0.0))
