"""vpo.ops.token_kl.linear_token_kl (torch and Triton paths) against the oracle vpo.oracle.token_kl: the KL and every
gradient (hidden, weight, bias), on odd shapes (N=37, D=24, V=131; chunks and blocks that divide none of them).

float64 must match tightly; float32 / float16 must have error <= 2 x PyTorch's own error in that dtype (the oracle's
code run in that dtype, logits materialized) + a small atol (STYLE.md). The Triton kernels run under the interpreter
on CPU; the ``gpu`` tests (bf16 at a realistic shape, speed against the log-prob op) need CUDA.
"""
import importlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vpo import oracle
from vpo.ops.token_kl import TokenKLTorch, linear_token_kl
from vpo.testing import assert_close_to_oracle, make_linear_head_inputs

tk = importlib.import_module("vpo.ops.token_kl")
llp = importlib.import_module("vpo.ops.linear_logprobs")

try:
    import vpo_kernels.target_logits as _tgt_mod
    import vpo_kernels.token_kl as ktk
    from vpo_kernels.linear_logprobs import TileConfig

    HAS_TRITON = True
except ImportError:  # pragma: no cover - the torch tests still run
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton / vpo_kernels.token_kl does not import")

D, V = 24, 131
SHAPES = {"flat": (1, 37), "rows": (2, 19)}  # (1, 37) is flattened to hidden [37, D]; (2, 19) stays [2, 19, D]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Reference heads: "shared*" = the policy's weight and bias (ref_weight=None), "separate*" = its own weight and bias.
VARIANTS = {
    "shared": dict(bias=False, ref_weight=False, ref_bias=False),
    "shared_bias": dict(bias=True, ref_weight=False, ref_bias=False),
    "separate_ref_bias_only": dict(bias=False, ref_weight=True, ref_bias=True),
    "separate": dict(bias=True, ref_weight=True, ref_bias=True),
}


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    """Outputs the Triton kernels must write fully start as NaN."""
    if HAS_TRITON:
        monkeypatch.setattr(_tgt_mod, "_empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                                         device=device))


if HAS_TRITON:
    # Blocks that divide nothing above; split_v=3 exercises the split combine (5 V tiles -> splits of 2, 2, 1).
    ODD = ktk.TokenKLConfig(sweep=TileConfig(16, 32, 16), bwd=TileConfig(16, 32, 16), split_v=3, group_n=2,
                            block_n_combine=16)


def _case(shape="flat", variant="separate", *, scale=1.0, seed=0, device="cpu", n=None, d=D, v=V, prompt_len=0):
    """float64 inputs: dict(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels); unused heads are None."""
    rows, seq = SHAPES[shape] if n is None else (1, n)
    cfg = VARIANTS[variant]
    x = make_linear_head_inputs(rows, seq, d, v, dtype=torch.float64, bias=True, scale=scale, seed=seed,
                                requires_grad=False, prompt_len=prompt_len)
    r = make_linear_head_inputs(rows, seq, d, v, dtype=torch.float64, bias=True, scale=scale, seed=seed + 100,
                                requires_grad=False)
    c = {
        "hidden": x.hidden, "weight": x.weight, "bias": x.bias if cfg["bias"] else None,
        "ref_hidden": r.hidden, "ref_weight": r.weight if cfg["ref_weight"] else None,
        "ref_bias": r.bias if cfg["ref_bias"] else None, "labels": x.labels,
    }
    if shape == "flat" or n is not None:
        for k in ("hidden", "ref_hidden"):
            c[k] = c[k].reshape(rows * seq, d)
        c["labels"] = c["labels"].reshape(rows * seq)
    return {k: (t.to(device) if t is not None else None) for k, t in c.items()}


def _upstream(shape, seed=1, device="cpu"):
    """Upstream gradient as float64, exactly representable in float16 so every path sees the same."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).half().double().to(device)


def _run(fn, c, dtype, g, *, labels="given"):
    """``kl = fn(...)`` on the case cast to ``dtype`` and the gradients of ``Σ g·kl`` to (hidden, weight, bias)."""
    cast = {k: (t.to(dtype) if t is not None and t.is_floating_point() else t) for k, t in c.items()}
    leaves = [cast["hidden"].requires_grad_(), cast["weight"].requires_grad_()]
    if cast["bias"] is not None:
        leaves.append(cast["bias"].requires_grad_())
    kl = fn(cast["hidden"], cast["weight"], cast["ref_hidden"], cast["ref_weight"],
            cast["labels"] if labels == "given" else None, cast["bias"], cast["ref_bias"])
    grads = torch.autograd.grad((kl * g.to(kl.dtype)).sum(), leaves)
    return kl.detach(), list(grads)


def _oracle(h, W, hr, Wr, labels, b, br):
    return oracle.token_kl(h, W, hr, Wr, labels, b, br)


def _torch(h, W, hr, Wr, labels, b, br):
    return linear_token_kl(h, W, hr, Wr, labels, b, br, impl="torch")


def _triton(h, W, hr, Wr, labels, b, br):
    return linear_token_kl(h, W, hr, Wr, labels, b, br, impl="triton")


def _check(c, dtype, fn, *, labels="given", atol=None, k=2.0):
    """KL and every gradient vs the float64 oracle: tight in float64, else <= 2x PyTorch's own same-dtype error."""
    names = ["kl", "grad hidden", "grad weight", "grad bias"]
    g = _upstream(c["hidden"].shape[:-1], device=c["hidden"].device)
    outs = _run(fn, c, dtype, g, labels=labels)
    big = c["labels"].numel() * c["weight"].shape[0] > 5e7  # float64 [N, V] logits would not fit comfortably
    ref = _run(_oracle, c, torch.float32 if big else torch.float64, g, labels=labels)
    assert outs[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert outs[0].shape == c["hidden"].shape[:-1]
    assert [t.dtype for t in outs[1]] == [dtype] * len(outs[1])
    got, want = [outs[0], *outs[1]], [ref[0], *ref[1]]
    for t, n in zip(got, names):
        assert torch.isfinite(t).all(), f"{n} has non-finite values"
    if dtype == torch.float64:
        for o, r, n in zip(got, want, names):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{n}: {m}")
        return got
    same = _run(_oracle, c, dtype, g, labels=labels)  # PyTorch's own, in the test dtype
    for o, r, s, n in zip(got, want, [same[0], *same[1]], names):
        assert_close_to_oracle(o, r, s, k=k, atol=ATOL[dtype] if atol is None else atol, name=f"{n} ({dtype})")
    return got


# --------------------------------------------------------------------------------------------------------------------
# Values and gradients against the oracle
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [17, None], ids=["chunk17", "chunk_default"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_torch_matches_oracle(dtype, variant, shape, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setenv("VPO_TORCH_CHUNK", str(chunk))
    _check(_case(shape, variant), dtype, _torch)


def _gemm(h, W, hr, Wr, labels, b, br):
    return linear_token_kl(h, W, hr, Wr, labels, b, br, impl="gemm")


@needs_triton
@pytest.mark.parametrize("variant", ["shared_bias", "separate_ref_bias_only", "separate"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_gemm_matches_oracle(dtype, variant, monkeypatch):
    """impl="gemm": the torch path's sweep with the Triton epilogue kernels (interpreter); V=131 in chunks of 50."""
    monkeypatch.setenv("VPO_TORCH_CHUNK", "50")
    _check(_case("flat", variant), dtype, _gemm)


@needs_triton
def test_gemm_ignored_rows_and_budget(monkeypatch):
    monkeypatch.delenv("VPO_TORCH_CHUNK", raising=False)
    c = _case("rows", "separate", seed=4, prompt_len=5)
    c["labels"][1] = -100
    fn = lambda *a: linear_token_kl(*a, impl="gemm", chunk_budget_mb=38 * 16 * 40 / 2**20)  # noqa: E731  3 chunks
    kl, dh = _check(c, torch.float32, fn)[:2]
    ignored = c["labels"] == -100
    assert (kl[ignored] == 0).all() and (dh[ignored] == 0).all()
    c["labels"].fill_(-100)
    kl, grads = _run(fn, c, torch.float32, _upstream(c["labels"].shape))
    for t in [kl, *grads]:
        assert torch.isfinite(t).all() and (t == 0).all()


@needs_triton
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_matches_oracle(dtype, variant, monkeypatch):
    monkeypatch.setattr(ktk, "default_config", lambda *a, **k: ODD)
    _check(_case("flat", variant), dtype, _triton)


@needs_triton
def test_triton_default_config_rows_and_no_labels():
    """The interpreter's default tiles, a [R, T, D] batch, labels=None (every position counts)."""
    _check(_case("rows", "separate"), torch.float32, _triton, labels=None)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_labels_none_is_every_position(impl, monkeypatch):
    if impl == "triton":
        monkeypatch.setattr(ktk, "default_config", lambda *a, **k: ODD)
    c = _case("flat", "separate", seed=2)
    fn = _torch if impl == "torch" else _triton
    g = _upstream(c["labels"].shape)
    c["labels"] = torch.randint(0, V, c["labels"].shape)  # nothing ignored
    with_labels = _run(fn, c, torch.float32, g)
    without = _run(fn, c, torch.float32, g, labels=None)
    for a, b in zip([with_labels[0], *with_labels[1]], [without[0], *without[1]]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@needs_triton
def test_triton_launchers():
    """``W_ref=None`` means the policy's W; gradients not asked for are not computed (None)."""
    c = {k: (t.float() if t is not None and t.is_floating_point() else t) for k, t in _case("flat", "shared").items()}
    h, W, hr, y = c["hidden"], c["weight"], c["ref_hidden"], c["labels"]
    kl, lse, e_d = ktk.token_kl_fwd(h, W, hr, None, y, config=ODD)
    torch.testing.assert_close(kl, ktk.token_kl_fwd(h, W, hr, W.clone(), y, config=ODD)[0], rtol=0, atol=0)
    torch.testing.assert_close(kl, oracle.token_kl(h, W, hr, labels=y), rtol=1e-5, atol=1e-5)
    dh, dW, db = ktk.token_kl_bwd(torch.ones_like(kl), h, W, hr, None, y, None, None, lse, e_d, compute_dh=False,
                                  config=ODD)
    assert dh is None and dW is not None and db is None


# --------------------------------------------------------------------------------------------------------------------
# Properties: KL = 0 iff π_θ = π_ref, masking, huge logits, frozen reference
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl, dtype", [("torch", torch.float64), ("torch", torch.float32),
                                         pytest.param("triton", torch.float32, marks=needs_triton)])
def test_zero_iff_policy_is_reference(impl, dtype, monkeypatch):
    if impl == "triton":
        monkeypatch.setattr(ktk, "default_config", lambda *a, **k: ODD)
    fn = _torch if impl == "torch" else _triton
    c = _case("flat", "shared_bias", seed=3)
    c["ref_hidden"] = c["hidden"].clone()  # same hidden, the shared head: π_θ == π_ref
    kl, grads = _run(fn, c, dtype, _upstream(c["labels"].shape))
    for t in [kl, *grads]:
        assert t.abs().max() <= 1e-6
    c = _case("flat", "separate", seed=3)
    kl, _ = _run(fn, c, dtype, _upstream(c["labels"].shape))
    valid = c["labels"] != -100
    assert (kl[valid] > 0).all() and (kl[~valid] == 0).all()


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_ignored_positions_give_zero_and_zero_grad(impl, monkeypatch):
    if impl == "triton":
        monkeypatch.setattr(ktk, "default_config", lambda *a, **k: ODD)
    fn = _torch if impl == "torch" else _triton
    c = _case("rows", "separate", seed=4, prompt_len=5)  # leading prompt + random ignored positions
    c["labels"][1] = -100  # and a whole row without targets
    kl, dh = _check(c, torch.float32, fn)[:2]
    ignored = c["labels"] == -100
    assert (kl[ignored] == 0).all() and (dh[ignored] == 0).all()
    # Every position ignored: zero KL, zero gradients, nothing NaN.
    c["labels"].fill_(-100)
    kl, grads = _run(fn, c, torch.float32, _upstream(c["labels"].shape))
    for t in [kl, *grads]:
        assert torch.isfinite(t).all() and (t == 0).all()


@pytest.mark.parametrize("impl, dtype", [("torch", torch.float64), ("torch", torch.float32),
                                         pytest.param("triton", torch.float32, marks=needs_triton),
                                         pytest.param("triton", torch.float16, marks=needs_triton)])
def test_huge_logits(impl, dtype, monkeypatch):
    scale = 1e3
    monkeypatch.setenv("VPO_TORCH_CHUNK", "17")
    if impl == "triton":
        monkeypatch.setattr(ktk, "default_config", lambda *a, **k: ODD)
    fn = _torch if impl == "torch" else _triton
    c = _case("flat", "separate", scale=scale, seed=5)
    assert (c["hidden"] @ c["weight"].T).abs().max() > scale  # the regime under test
    if dtype == torch.float64:
        g = _upstream(c["labels"].shape)
        got, want = _run(fn, c, dtype, g), _run(_oracle, c, dtype, g)
        for o, r in zip([got[0], *got[1]], [want[0], *want[1]]):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10 * scale)
    else:
        # k = 4, not 2: at |z| ~ 1e4 an fp32 logit is only known to ~1e-3 whatever the summation order, and this seed
        # has a row with a near-tie at the top of the softmax, where p = exp(z - lse) turns that into a large gradient
        # error. Which fp32 evaluation lands closer is then down to the order of the D sum: measured here, the torch
        # path's error is 0.6x and the Triton kernel's (D summed in BLOCK_D chunks) 2.3x PyTorch's own.
        _check(c, dtype, fn, atol=ATOL[dtype] * scale, k=4.0)  # _check also asserts everything is finite


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("variant", ["shared_bias", "separate"])
def test_no_gradient_to_the_reference(impl, variant, monkeypatch):
    if impl == "triton":
        monkeypatch.setattr(ktk, "default_config", lambda *a, **k: ODD)
    c = _case("flat", variant, seed=6)
    leaves = {k: c[k].float().requires_grad_() for k in ("hidden", "weight", "bias", "ref_hidden", "ref_weight",
                                                         "ref_bias") if c[k] is not None}
    get = lambda k: leaves.get(k)  # noqa: E731
    kl = linear_token_kl(get("hidden"), get("weight"), get("ref_hidden"), get("ref_weight"), c["labels"], get("bias"),
                         get("ref_bias"), impl=impl)
    kl.sum().backward()
    for k, t in leaves.items():
        if k.startswith("ref_"):
            assert t.grad is None, f"{k} received a gradient"
        else:
            assert t.grad is not None and t.grad.abs().max() > 0, f"{k} received no gradient"
    # With only the reference requiring grad there is nothing to differentiate.
    kl = linear_token_kl(c["hidden"].float(), c["weight"].float(), get("ref_hidden"), labels=c["labels"], impl=impl)
    assert not kl.requires_grad


# --------------------------------------------------------------------------------------------------------------------
# gradcheck on the autograd Function (float64)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["shared_bias", "separate"])
def test_gradcheck_token_kl_torch(variant):
    g = torch.Generator().manual_seed(7)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    h, W, b = mk(7, 5).requires_grad_(), mk(23, 5).requires_grad_(), mk(23).requires_grad_()
    hr = mk(7, 5)
    # The shared head is a COPY here: gradcheck perturbs W in place, which must not move the (constant) reference.
    Wr, br = (W.detach().clone(), b.detach().clone()) if variant == "shared_bias" else (mk(23, 5), mk(23))
    y = torch.tensor([3, -100, 0, 22, 3, -100, 9])
    torch.autograd.gradcheck(lambda h, W, b: TokenKLTorch.apply(h, W, hr, Wr, y, b, br, -100, 4), (h, W, b))
    torch.autograd.gradcheck(lambda h, W: TokenKLTorch.apply(h, W, hr, Wr, None, None, None, -100, 6), (h, W))


# --------------------------------------------------------------------------------------------------------------------
# Never O(N·V): track the largest storage any aten op allocates during forward + backward
# --------------------------------------------------------------------------------------------------------------------


class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage (in elements) of any tensor produced by an aten op, and the ops seen."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__.split(".")[0])
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("how", ["env", "budget"])
def test_never_materializes_n_by_v(how, monkeypatch):
    n, d, v, chunk = 64, 8, 1000, 100
    if how == "env":
        monkeypatch.setenv("VPO_TORCH_CHUNK", str(chunk))
    else:  # the budget rule with tiles=2: n·chunk·2·(4 + 4) bytes for the z and r tiles (+ dz)
        monkeypatch.delenv("VPO_TORCH_CHUNK", raising=False)
    budget_mb = None if how == "env" else n * chunk * 16 / 2**20
    c = _case(n=n, d=d, v=v, variant="separate", seed=8)
    c["labels"] = torch.randint(0, v, (n,))
    h, W, b = (c[k].float().requires_grad_() for k in ("hidden", "weight", "bias"))
    hr, Wr, br = (c[k].float() for k in ("ref_hidden", "ref_weight", "ref_bias"))
    bound = max(v * d, n * chunk)  # dW [V, D] is an output itself; one [N, chunk] tile
    assert bound < n * v

    with _LargestAllocation() as seen:
        linear_token_kl(h, W, hr, Wr, c["labels"], b, br, impl="torch", chunk_budget_mb=budget_mb).sum().backward()
    assert {"mm", "add_"} <= seen.ops  # the backward sweep was observed too
    assert seen.largest <= bound, f"largest allocation {seen.largest} elements > bound {bound} (N·V = {n * v})"

    # The tracker does see an [N, V] allocation when one happens: the oracle makes one.
    with _LargestAllocation() as seen_oracle:
        oracle.token_kl(h, W, hr, Wr, c["labels"], b, br).sum().backward()
    assert seen_oracle.largest >= n * v


# --------------------------------------------------------------------------------------------------------------------
# impl dispatch and bad input
# --------------------------------------------------------------------------------------------------------------------


def test_auto_is_torch_on_cpu(monkeypatch):
    calls = []
    real = tk.TOKEN_KL_IMPLS["torch"]
    monkeypatch.setitem(tk.TOKEN_KL_IMPLS, "torch", lambda *a: calls.append("torch") or real(*a))
    c = _case("flat", "separate")
    linear_token_kl(c["hidden"], c["weight"], c["ref_hidden"])
    assert calls == ["torch"]


def _bad_cases():
    c = {k: (t.float() if t is not None and t.is_floating_point() else t) for k, t in _case("rows", "separate").items()}
    h, W, b, hr, Wr, br, y = (c[k] for k in ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias",
                                             "labels"))
    return {
        "hidden 1-D": ((h[0, 0], W, hr[0, 0]), {}, "hidden must have at least 2 dimensions"),
        "hidden not a tensor": ((h.tolist(), W, hr), {}, "hidden must be a torch.Tensor"),
        "hidden int": ((h.long(), W, hr), {}, "hidden must have dtype"),
        "hidden empty": ((h[:, :0], W, hr[:, :0]), {}, "hidden must not be empty"),
        "weight D": ((h, W[:, :-1], hr), {}, r"weight has shape \(131, 23\) but hidden has shape \(2, 19, 24\)"),
        "weight dtype": ((h, W.double(), hr), {}, "weight has dtype float64 but hidden has dtype float32"),
        "bias shape": ((h, W, hr), {"bias": b[:-1]}, r"bias has shape \(130,\) but weight has shape \(131, 24\)"),
        "ref_hidden shape": ((h, W, hr[:, :-1]), {},
                             r"ref_hidden has shape \(2, 18, 24\) but hidden has shape \(2, 19, 24\): "
                             r"expected ref_hidden.shape == hidden.shape"),
        "ref_hidden dtype": ((h, W, hr.half()), {}, "ref_hidden has dtype float16 but hidden has dtype float32"),
        "ref_hidden device": ((h, W, hr.to("meta")), {}, "ref_hidden is on meta but hidden is on cpu"),
        "ref_hidden not a tensor": ((h, W, None), {}, "ref_hidden must be a torch.Tensor"),
        "ref_weight shape": ((h, W, hr, Wr[:-1]), {}, r"ref_weight has shape \(130, 24\) but weight has shape"),
        "ref_weight rank": ((h, W, hr, Wr[None]), {}, "ref_weight must have 2 dimensions"),
        "ref_weight dtype": ((h, W, hr, Wr.double()), {}, "ref_weight has dtype float64 but hidden has dtype float32"),
        "ref_bias shape": ((h, W, hr, Wr), {"ref_bias": br[:-1]}, r"ref_bias has shape \(130,\) but weight"),
        "ref_bias dtype": ((h, W, hr, Wr), {"ref_bias": br.half()}, "ref_bias has dtype float16 but hidden"),
        "ref_bias without ref_weight": ((h, W, hr), {"ref_bias": br}, "ref_bias is given but ref_weight is None"),
        "labels shape": ((h, W, hr), {"labels": y[:, :-1]},
                         r"labels has shape \(2, 18\) but hidden has shape \(2, 19, 24\): "
                         r"expected labels.shape == hidden.shape\[:-1\]"),
        "labels float": ((h, W, hr), {"labels": y.float()}, "labels must have dtype"),
        "ignore_index": ((h, W, hr), {"labels": y, "ignore_index": -100.0}, "ignore_index must be an int"),
        "impl": ((h, W, hr), {"impl": "cuda"},
                 r"impl must be one of \['auto', 'torch', 'gemm', 'triton'\], got 'cuda'"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises(case):
    args, kwargs, match = _bad_cases()[case]
    kwargs.setdefault("impl", "torch")
    with pytest.raises(ValueError, match=match):
        linear_token_kl(*args, **kwargs)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    c = _case("flat", "separate")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        linear_token_kl(c["hidden"], c["weight"], c["ref_hidden"], impl="triton")


# --------------------------------------------------------------------------------------------------------------------
# GPU lane: compiled kernels, bf16, realistic shapes, speed
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("impl", ["triton", "gemm"])
@pytest.mark.parametrize("variant", ["shared_bias", "separate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_realistic_shape(dtype, variant, impl):
    """Error <= 2x PyTorch's own same-dtype error vs an fp32 oracle (float64 would be 1 GB of logits), every grad."""
    n, d, v = (4096, 4096, 32064) if dtype == torch.bfloat16 else (1024, 1024, 5003)
    c = _case(variant=variant, n=n, d=d, v=v, device="cuda", prompt_len=0, seed=9)
    c["ref_hidden"] = c["hidden"] + 0.3 * c["ref_hidden"]  # a reference near the policy, as in training
    _check(c, dtype, _triton if impl == "triton" else _gemm, atol={torch.float32: 1e-4}.get(dtype, ATOL[dtype]))
