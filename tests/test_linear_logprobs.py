"""vpo.ops.linear_logprobs / target_logits against the oracle (vpo.oracle.token_logprobs), every output and gradient.

The chunked torch path runs with vocabulary chunks that do not divide V (VPO_TORCH_CHUNK), on odd shapes (N=37, D=24,
V=131), in float64 (tight), float32 and float16 (error <= 2 x PyTorch's own error in that dtype, STYLE.md).
"""
import importlib
import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vpo import oracle
from vpo import linear_logprobs, target_logits
from vpo.testing import assert_close_to_oracle, make_linear_head_inputs

# The module itself (its Functions, chunk policy and registries), not just the public function.
llp = importlib.import_module("vpo.ops.linear_logprobs")
LinearLogprobsTorch, TargetLogitsTorch = llp.LinearLogprobsTorch, llp.TargetLogitsTorch

D, V = 24, 131
SHAPES = {"flat": (1, 37), "rows": (2, 19)}  # (1, 37) is flattened to hidden [37, D]; (2, 19) stays [2, 19, D]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def _inputs(shape="flat", dtype=torch.float32, bias=True, seed=0, **kw):
    rows, seq = SHAPES[shape]
    x = make_linear_head_inputs(rows, seq, D, V, dtype=dtype, bias=bias, seed=seed, **kw)
    if shape == "flat":
        x.hidden = x.hidden.detach().reshape(rows * seq, D).requires_grad_(True)
        x.labels = x.labels.reshape(rows * seq)
    return x


def _upstream(labels, which, seed=1):
    """Upstream gradients (g_logp, g_tgt) as float64, exactly representable in float16 so every path sees the same."""
    g = torch.Generator().manual_seed(seed)
    gl = torch.randn(labels.shape, generator=g, dtype=torch.float64).half().double()
    gt = torch.randn(labels.shape, generator=g, dtype=torch.float64).half().double()
    return (gl if which in ("logp", "both") else None), (gt if which in ("tgt", "both") else None)


def _leaves(x, dtype=None):
    ts = [x.hidden, x.weight] + ([x.bias] if x.bias is not None else [])
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in ts]


def _run(fn, leaves, labels, gl, gt):
    """Outputs (logp, tgt) of ``fn(h, W, labels, b)`` and the gradients of ``Σ gl·logp + Σ gt·tgt`` to the leaves."""
    h, W, *b = leaves
    logp, tgt = fn(h, W, labels, b[0] if b else None)[:2]
    loss = sum((g.to(o.dtype) * o).sum() for g, o in ((gl, logp), (gt, tgt)) if g is not None)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return [logp.detach(), tgt.detach()], grads


def _oracle(h, W, labels, b):
    return oracle.token_logprobs(h, W, labels, b)


def _as_pair(z):
    """``(0, z)``: lets a target-logit-only function run through the same (logp, target) checks."""
    return torch.zeros_like(z), z


def _target_oracle(h, W, labels, b):
    return _as_pair(oracle.target_logits(h, W, labels, b))


def _target_torch(h, W, labels, b):
    return _as_pair(target_logits(h, W, labels, b, impl="torch"))


def _check(x, dtype, gl, gt, fn=linear_logprobs, ref_fn=_oracle):
    names = ["logp", "target_logit"]
    gnames = ["grad hidden", "grad weight", "grad bias"]
    outs, grads = _run(fn, _leaves(x), x.labels, gl, gt)
    ref_outs, ref_grads = _run(ref_fn, _leaves(x, torch.float64), x.labels, gl, gt)
    assert outs[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert [g.dtype for g in grads] == [dtype] * len(grads)
    if dtype == torch.float64:
        for o, r, n in zip(outs + grads, ref_outs + ref_grads, names + gnames):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{n}: {m}")
        return
    same_outs, same_grads = _run(ref_fn, _leaves(x), x.labels, gl, gt)  # PyTorch's own, in the test dtype
    for o, r, s, n in zip(outs + grads, ref_outs + ref_grads, same_outs + same_grads, names + gnames):
        assert_close_to_oracle(o, r, s, k=2.0, atol=ATOL[dtype], name=f"{n} ({dtype})")


# --------------------------------------------------------------------------------------------------------------------
# Values and gradients against the oracle
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["logp", "tgt", "both"])
@pytest.mark.parametrize("chunk", [17, 50, None], ids=["chunk17", "chunk50", "chunk_default"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_linear_logprobs_matches_oracle(dtype, bias, shape, chunk, which, monkeypatch):
    if chunk is not None:
        monkeypatch.setenv("VPO_TORCH_CHUNK", str(chunk))
    x = _inputs(shape, dtype, bias)
    gl, gt = _upstream(x.labels, which)
    _check(x, dtype, gl, gt, fn=lambda h, W, y, b: linear_logprobs(h, W, y, b, impl="torch"))


needs_gemm = pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="impl='gemm' needs triton")


def _gemm(h, W, y, b):
    return linear_logprobs(h, W, y, b, impl="gemm")


@needs_gemm
@pytest.mark.parametrize("which", ["logp", "tgt", "both"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_gemm_matches_oracle(dtype, bias, which, monkeypatch):
    """impl="gemm": the same sweep with the Triton epilogue kernels (interpreter on CPU); V=131 in chunks of 50."""
    monkeypatch.setenv("VPO_TORCH_CHUNK", "50")
    x = _inputs("flat", dtype, bias)
    gl, gt = _upstream(x.labels, which)
    _check(x, dtype, gl, gt, fn=_gemm)


@needs_gemm
@pytest.mark.parametrize("case", ["all_ignored", "one_valid", "budget"])
def test_gemm_odd_cases(case, monkeypatch):
    x = _inputs("rows", torch.float32, bias=True)
    budget = None
    if case == "all_ignored":
        x.labels.fill_(-100)
    elif case == "one_valid":
        x.labels.fill_(-100)
        x.labels[1, 7] = 5
    else:  # the budget rule (no VPO_TORCH_CHUNK): 38 rows x 8 B x 40 columns -> 3 chunks over V = 131
        budget = 38 * 8 * 40 / 2**20
    monkeypatch.delenv("VPO_TORCH_CHUNK", raising=False)
    gl, gt = _upstream(x.labels, "both")
    fn = lambda h, W, y, b: linear_logprobs(h, W, y, b, impl="gemm", chunk_budget_mb=budget)  # noqa: E731
    if case == "all_ignored":
        outs, grads = _run(fn, _leaves(x), x.labels, gl, gt)
        for t in outs + grads:
            assert torch.isfinite(t).all() and (t == 0).all()
    else:
        _check(x, torch.float32, gl, gt, fn=fn)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_target_logits_matches_oracle(dtype, bias):
    x = _inputs("rows", dtype, bias)
    _, gt = _upstream(x.labels, "tgt")
    _check(x, dtype, None, gt, fn=_target_torch, ref_fn=_target_oracle)


@pytest.mark.parametrize("scale", [1e3, 1e4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_huge_logits(dtype, scale, monkeypatch):
    monkeypatch.setenv("VPO_TORCH_CHUNK", "17")
    x = _inputs("rows", dtype, bias=True, scale=scale)
    logits = x.hidden.detach().double() @ x.weight.detach().double().T
    assert logits.abs().max() > scale  # the regime under test
    gl, gt = _upstream(x.labels, "both")
    outs, grads = _run(lambda *a: linear_logprobs(*a, impl="torch"), _leaves(x), x.labels, gl, gt)
    assert all(torch.isfinite(t).all() for t in outs + grads)
    if dtype == torch.float64:
        ref_outs, ref_grads = _run(_oracle, _leaves(x), x.labels, gl, gt)
        for o, r in zip(outs + grads, ref_outs + ref_grads):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10 * scale)
    else:
        _check(x, dtype, gl, gt, fn=lambda *a: linear_logprobs(*a, impl="torch"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_ignored_rows_give_zero_and_zero_grad(dtype, monkeypatch):
    monkeypatch.setenv("VPO_TORCH_CHUNK", "50")
    x = _inputs("rows", dtype, bias=True)
    x.labels[1] = -100  # the whole second row has no target
    gl, gt = _upstream(x.labels, "both")
    _check(x, dtype, gl, gt)
    outs, grads = _run(lambda *a: linear_logprobs(*a, impl="torch"), _leaves(x), x.labels, gl, gt)
    ignored = x.labels == -100
    for o in outs:
        assert (o[ignored] == 0).all()
    assert (grads[0][ignored] == 0).all()


@pytest.mark.parametrize("fn_name", ["linear_logprobs", "target_logits"])
def test_all_ignored(fn_name):
    x = _inputs("rows", torch.float32, bias=True)
    labels = torch.full_like(x.labels, -100)
    if fn_name == "linear_logprobs":
        fn = lambda *a: linear_logprobs(*a, impl="torch")  # noqa: E731
    else:
        fn = _target_torch
    gl, gt = _upstream(labels, "both")
    outs, grads = _run(fn, _leaves(x), labels, gl, gt)
    for t in outs + grads:
        assert torch.isfinite(t).all() and (t == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_one_valid_token(dtype, monkeypatch):
    monkeypatch.setenv("VPO_TORCH_CHUNK", "17")
    x = _inputs("rows", dtype, bias=True)
    keep = x.labels[0, 5].clone() if x.labels[0, 5] != -100 else torch.tensor(7)
    x.labels.fill_(-100)
    x.labels[0, 5] = keep
    gl, gt = _upstream(x.labels, "both")
    _check(x, dtype, gl, gt)


def test_int32_labels_and_noncontiguous_hidden():
    x = _inputs("rows", torch.float64, bias=False)
    h_t = x.hidden.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # [2, 19, D], strided
    assert not h_t.is_contiguous()
    out = linear_logprobs(h_t, x.weight, x.labels.int(), impl="torch")
    ref = oracle.token_logprobs(h_t.detach(), x.weight.detach(), x.labels)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------------------------
# gradcheck on the autograd Functions (float64)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_linear_logprobs(bias):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(23, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(23, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.tensor([3, -100, 0, 22, 3, -100, 9])
    torch.autograd.gradcheck(lambda h, W, b: LinearLogprobsTorch.apply(h, W, y, b, -100, 4), (h, W, b))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_target_logits(bias):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(23, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(23, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.tensor([3, -100, 0, 22, 3, -100, 9])
    torch.autograd.gradcheck(lambda h, W, b: TargetLogitsTorch.apply(h, W, y, b, -100), (h, W, b))


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
    else:  # the default policy, with a budget of n·chunk·(4 + 4) bytes (fp32 logits tile + fp32 dz tile)
        monkeypatch.delenv("VPO_TORCH_CHUNK", raising=False)
        monkeypatch.setenv("VPO_CHUNK_BUDGET_MB", "1")
    budget_mb = None if how == "env" else n * chunk * 8 / 2**20
    x = make_linear_head_inputs(1, n, d, v, bias=True, ignore_frac=0.0)
    h, W, b, y = x.hidden[0], x.weight, x.bias, x.labels[0]
    bound = max(v * d, n * chunk)  # dW [V, D] is the output itself; one [N, chunk] tile
    assert bound < n * v

    with _LargestAllocation() as seen:
        logp, tgt = linear_logprobs(h, W, y, b, impl="torch", chunk_budget_mb=budget_mb)
        (logp.sum() + 0.5 * tgt.sum()).backward()
    assert {"mm", "scatter_add_"} <= seen.ops  # the backward sweep was observed too
    assert seen.largest <= bound, f"largest allocation {seen.largest} elements > bound {bound} (N·V = {n * v})"

    # The tracker does see an [N, V] allocation when one happens: the oracle makes one.
    with _LargestAllocation() as seen_oracle:
        oracle.token_logprobs(h, W, y, b)[0].sum().backward()
    assert seen_oracle.largest >= n * v


def test_target_logits_is_o_n_d():
    n, d, v = 64, 8, 1000
    x = make_linear_head_inputs(1, n, d, v, bias=True, ignore_frac=0.0)
    with _LargestAllocation() as seen:
        target_logits(x.hidden[0], x.weight, x.labels[0], x.bias, impl="torch").sum().backward()
    assert seen.largest <= v * d and "mm" not in seen.ops and "addmm" not in seen.ops


def test_chunk_policy(monkeypatch):
    monkeypatch.delenv("VPO_TORCH_CHUNK", raising=False)
    monkeypatch.delenv("VPO_CHUNK_BUDGET_MB", raising=False)
    budget = llp.DEFAULT_BUDGET_MB << 20
    # fp32: 4 B logits + 4 B dz per element; a multiple of 128 when >= 128
    assert llp.chunk_size(1000, 10**6) == budget // (1000 * 8) // 128 * 128
    assert llp.chunk_size(1000, 10**6, dtype=torch.bfloat16) == budget // (1000 * 6) // 128 * 128
    assert llp.chunk_size(1000, 10**6, dtype=torch.float64) == budget // (1000 * 16) // 128 * 128
    assert llp.chunk_size(1000, 10**6, tiles=2) == budget // (2000 * 8) // 128 * 128
    assert llp.chunk_size(1, 131) == 131  # never wider than V
    assert llp.chunk_size(0, 131) == 131
    assert llp.chunk_size(budget, 131) == 131  # the default budget keeps chunks >= min(V, 4096) columns
    assert llp.chunk_size(10**6, 10**6) == 4096
    assert llp.chunk_size(budget, 131, budget_mb=budget / 2**20) == 1  # an explicit budget: never narrower than 1
    assert llp.chunk_size(1000, 10**6, budget_mb=1) == 128  # 1 MiB // 8000 B = 131, rounded down to 128
    assert llp.chunk_size(1000, 10**6, budget_mb=0.5) == 65  # below 128: not rounded
    assert llp.chunk_size(10, 131, 17) == 17
    monkeypatch.setenv("VPO_CHUNK_BUDGET_MB", "1")
    assert llp.chunk_size(1000, 10**6) == 128
    monkeypatch.setenv("VPO_TORCH_CHUNK", "50")
    assert llp.chunk_size(10, 131) == 50
    assert llp.chunk_size(10, 30) == 30
    for bad in ("0", "-3", "abc"):
        monkeypatch.setenv("VPO_TORCH_CHUNK", bad)
        with pytest.raises(ValueError, match="VPO_TORCH_CHUNK"):
            llp.chunk_size(10, 131)
    monkeypatch.delenv("VPO_TORCH_CHUNK")
    for bad in ("0", "x"):
        monkeypatch.setenv("VPO_CHUNK_BUDGET_MB", bad)
        with pytest.raises(ValueError, match="VPO_CHUNK_BUDGET_MB"):
            llp.chunk_size(10, 131)
    for bad in (0, -1.0, "1", True):
        with pytest.raises(ValueError, match="chunk_budget_mb"):
            llp.chunk_size(10, 131, budget_mb=bad)


# --------------------------------------------------------------------------------------------------------------------
# impl dispatch
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn, registry", [(linear_logprobs, "LINEAR_LOGPROBS_IMPLS"),
                                          (target_logits, "TARGET_LOGITS_IMPLS")], ids=["logprobs", "target"])
def test_auto_is_torch_on_cpu(fn, registry, monkeypatch):
    calls = []
    real = getattr(llp, registry)["torch"]

    def spy(*args):
        calls.append("torch")
        return real(*args)

    monkeypatch.setitem(getattr(llp, registry), "torch", spy)
    x = _inputs("rows", torch.float32)
    fn(x.hidden, x.weight, x.labels, x.bias)
    assert calls == ["torch"]


@pytest.mark.parametrize("fn", [linear_logprobs, target_logits], ids=["logprobs", "target"])
def test_unknown_impl_lists_names(fn):
    x = _inputs("rows", torch.float32)
    with pytest.raises(ValueError, match=r"impl must be one of \['auto', 'torch', 'gemm', 'triton'\], got 'cuda'"):
        fn(x.hidden, x.weight, x.labels, impl="cuda")


def _importable(module):
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _importable("vpo_kernels.linear_logprobs"),
                    reason="vpo_kernels.linear_logprobs (LinearLogprobsTriton) is not importable yet")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_triton_impl_matches_oracle(bias):
    x = _inputs("rows", torch.float32, bias)
    gl, gt = _upstream(x.labels, "both")
    _check(x, torch.float32, gl, gt, fn=lambda *a: linear_logprobs(*a, impl="triton"))


@pytest.mark.skipif(not _importable("vpo_kernels.target_logits"),
                    reason="vpo_kernels.target_logits (TargetLogitsTriton) is not importable yet")
def test_triton_target_logits_matches_oracle():
    x = _inputs("rows", torch.float32, bias=True)
    _, gt = _upstream(x.labels, "tgt")
    _check(x, torch.float32, None, gt, fn=lambda *a: _as_pair(target_logits(*a, impl="triton")),
           ref_fn=_target_oracle)


@pytest.mark.gpu
@needs_gemm
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_gemm_realistic_shape(dtype):
    """impl="gemm" on CUDA (cuBLAS in the input dtype + Triton epilogues) vs an fp32 oracle, values and every grad."""
    n, d, v = (4096, 4096, 32064) if dtype != torch.float32 else (1024, 1024, 5003)
    x = make_linear_head_inputs(1, n, d, v, dtype=dtype, bias=True, device="cuda", seed=5)
    h, W, b, y = x.hidden[0].detach(), x.weight.detach(), x.bias.detach(), x.labels[0]
    g = torch.Generator().manual_seed(6)
    gl = torch.randn(n, generator=g, dtype=torch.float64).cuda()
    gt = torch.randn(n, generator=g, dtype=torch.float64).cuda()

    def run(fn, cast):
        leaves = [t.to(cast).requires_grad_() for t in (h, W, b)]
        logp, tgt = fn(*leaves[:2], y, leaves[2])[:2]
        loss = (gl.to(logp.dtype) * logp).sum() + (gt.to(tgt.dtype) * tgt).sum()
        return [logp.detach(), tgt.detach(), *torch.autograd.grad(loss, leaves)]

    got = run(lambda *a: linear_logprobs(*a, impl="gemm"), dtype)
    ref = run(_oracle, torch.float32)
    same = run(_oracle, dtype)
    for o, r, s_, n_ in zip(got, ref, same, ["logp", "target", "dh", "dW", "db"]):
        assert_close_to_oracle(o, r, s_, k=2.0, atol={torch.float32: 1e-4}.get(dtype, 1e-2), name=f"{n_} ({dtype})")


@pytest.mark.gpu
@pytest.mark.skipif(not _importable("vpo_kernels.linear_logprobs"),
                    reason="vpo_kernels.linear_logprobs (LinearLogprobsTriton) is not importable yet")
def test_auto_is_gemm_on_cuda():
    x = _inputs("rows", torch.float32, bias=True, device="cuda")
    assert llp._resolve_impl("auto", llp.LINEAR_LOGPROBS_IMPLS, x.hidden) == "gemm"
    out = linear_logprobs(x.hidden, x.weight, x.labels, x.bias)
    ref = linear_logprobs(x.hidden, x.weight, x.labels, x.bias, impl="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument
# --------------------------------------------------------------------------------------------------------------------


def _bad_cases():
    x = _inputs("rows", torch.float32, bias=True)
    h, W, y, b = x.hidden.detach(), x.weight.detach(), x.labels, x.bias.detach()
    return {
        "labels shape": ((h, W, y[:, :-1], b), {},
                         r"labels has shape \(2, 18\) but hidden has shape \(2, 19, 24\): "
                         r"expected labels.shape == hidden.shape\[:-1\]"),
        "hidden 1-D": ((h[0, 0], W, y[0, 0], b), {}, "hidden must have at least 2 dimensions"),
        "hidden not a tensor": ((h.tolist(), W, y, b), {}, "hidden must be a torch.Tensor"),
        "hidden int": ((h.long(), W, y, b), {}, "hidden must have dtype"),
        "hidden empty": ((h[:, :0], W, y[:, :0], b), {}, "hidden must not be empty"),
        "weight D": ((h, W[:, :-1], y, b), {}, r"weight has shape \(131, 23\) but hidden has shape"),
        "weight rank": ((h, W[None], y, b), {}, "weight must have 2 dimensions"),
        "weight dtype": ((h, W.double(), y, b), {}, "weight has dtype float64 but hidden has dtype float32"),
        "weight device": ((h, W.to("meta"), y, b), {}, "weight is on meta but hidden is on cpu"),
        "labels float": ((h, W, y.float(), b), {}, "labels must have dtype"),
        "labels too big": ((h, W, torch.where(y == -100, y, torch.full_like(y, V)), b), {},
                           r"labels contains 131: expected values in \[0, 131\) or ignore_index=-100"),
        "labels negative": ((h, W, torch.full_like(y, -1), b), {}, "labels contains -1"),
        "labels device": ((h, W, y.to("meta"), b), {}, "labels is on meta but hidden is on cpu"),
        "bias shape": ((h, W, y, b[:-1]), {}, r"bias has shape \(130,\) but weight has shape \(131, 24\)"),
        "bias rank": ((h, W, y, b[None]), {}, "bias must have 1 dimensions"),
        "bias dtype": ((h, W, y, b.half()), {}, "bias has dtype float16 but hidden has dtype float32"),
        "ignore_index": ((h, W, y, b), {"ignore_index": -100.0}, "ignore_index must be an int"),
    }


@pytest.mark.parametrize("fn", [linear_logprobs, target_logits], ids=["logprobs", "target"])
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises(fn, case):
    args, kwargs, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        fn(*args, impl="torch", **kwargs)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = _inputs("rows", torch.float32)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        linear_logprobs(x.hidden, x.weight, x.labels, impl="triton")
