"""Cat-PO image attention (vpo.ops.attention_stats) vs the materializing oracle.

The oracle is ``vpo.oracle.catpo.image_attention_stats`` fed float64 probabilities from a direct softmax written here
(masked scores, fully-masked rows set to 0). Every impl of both routes is checked against it on odd shapes (T=37,
N_p=5, Tq=11, d=24, Hq=6 with Hkv=2/3/6), with padding, causal on/off and a custom scale; 16-bit inputs are held to
2x PyTorch's own error in that dtype. The Triton kernels run under TRITON_INTERPRET=1 on CPU (conftest); fresh outputs
are NaN-filled so an unwritten element fails. ``gpu`` tests: CUDA and Triton at real shapes in bf16.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vpo
from vpo import _ext
from vpo.oracle.catpo import image_attention_stats
from vpo.ops import attention_stats as ops
from vpo.ops.attention_stats import (
    ImageAttentionAccumulator,
    image_attention_from_probs,
    image_attention_from_qk,
)
from vpo.testing import assert_close_to_oracle

needs_cpp = pytest.mark.skipif(not vpo.AVAILABLE["cpp"], reason="vpo._C not built")
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton lane: interpreter on CPU, the GPU otherwise
B_, HQ_, T_, D_, NP_, TQ_ = 2, 6, 37, 24, 5, 11


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    """The Triton launcher's outputs start as NaN: every element must be written."""
    try:
        import vpo_kernels.attention_stats as km
    except ImportError:  # no triton: nothing to patch
        return
    monkeypatch.setattr(km, "_empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                              device=device))


# ----------------------------------------------------------------------------------------------------------------------
# Builders and the oracle
# ----------------------------------------------------------------------------------------------------------------------


def _inputs(hkv, *, n_p=NP_, tq=TQ_, pad=True, dtype=torch.float32, device="cpu", seed=0):
    """q [B, Hq, T, d], k [B, Hkv, T, d], sorted image positions [B, N_p], response positions [B, Tq], padding mask.

    Row 1 is left-padded by 4 (keys 0..3 are False); its image tokens sit right after the padding.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B_, HQ_, T_, D_, generator=g, dtype=torch.float64) * 1.5  # peaky enough to be non-uniform
    k = torch.randn(B_, hkv, T_, D_, generator=g, dtype=torch.float64)
    ipos = torch.stack([torch.arange(3, 3 + n_p), torch.arange(4, 4 + n_p)])
    qpos = torch.stack([torch.arange(T_ - tq - 3, T_ - 3), torch.arange(T_ - tq, T_)])
    mask = torch.ones(B_, T_, dtype=torch.bool)
    if pad:
        mask[1, :4] = False
    return (q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype), ipos.to(device), qpos.to(device),
            mask.to(device) if pad else None)


def _probs(q, k, mask, scale, causal, dtype=torch.float64):
    """Materialized softmax probabilities [B, Hq, T, T] in ``dtype`` (rows that see no key are 0)."""
    B, HQ, T, D = q.shape
    kk = k.repeat_interleave(HQ // k.shape[1], dim=1)  # [B, Hq, T, d]
    s = (q.to(dtype) @ kk.to(dtype).transpose(-1, -2)) * scale  # [B, Hq, T, T]
    vis = torch.ones(B, 1, T, T, dtype=torch.bool, device=q.device)
    if causal:
        vis &= torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        vis &= mask[:, None, None, :]
    s = s.masked_fill(~vis, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0)  # all -inf rows: NaN -> 0


def _oracle(probs, ipos, qpos):
    """The oracle on materialized probabilities, rows selected at ``qpos``: [B, Tq, N_p] float64."""
    B, _, T, _ = probs.shape
    image_mask = torch.zeros(B, T, dtype=torch.bool, device=probs.device).scatter_(1, ipos, True)
    a = image_attention_stats([probs.double()], image_mask)  # [B, T, N_p]
    if qpos is None:
        return a
    return a.gather(1, qpos[:, :, None].expand(-1, -1, ipos.shape[1]))


def _oracle_qk(q, k, ipos, qpos, mask, scale, causal):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _oracle(_probs(q.double(), k.double(), mask, scale, causal), ipos, qpos)


QK_IMPLS = ["torch", "triton"]

# (Hkv, causal, padded, query rows given, scale, N_p)
QK_CASES = {
    "gqa-causal-padded": (2, True, True, True, None, NP_),
    "mha-noncausal-allrows-scale": (6, False, False, False, 0.3, NP_),
    "gqa-noncausal-padded": (2, False, True, True, None, NP_),
    "gqa3-causal-np1": (3, True, True, True, 0.11, 1),
}


def _run_qk(impl, q, k, ipos, qpos, mask, scale, causal):
    dev = DEV if impl == "triton" else q.device
    mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
    out = image_attention_from_qk(mv(q), mv(k), mv(ipos), query_positions=mv(qpos), key_padding_mask=mv(mask),
                                  scale=scale, causal=causal, impl=impl)
    return out.cpu()


# ----------------------------------------------------------------------------------------------------------------------
# Route (b): q, k
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", QK_IMPLS)
@pytest.mark.parametrize("case", list(QK_CASES))
def test_qk_matches_oracle_fp32(impl, case):
    hkv, causal, pad, with_q, scale, n_p = QK_CASES[case]
    q, k, ipos, qpos, mask = _inputs(hkv, n_p=n_p, pad=pad)
    qpos = qpos if with_q else None
    out = _run_qk(impl, q, k, ipos, qpos, mask, scale, causal)
    ref = _oracle_qk(q, k, ipos, qpos, mask, scale, causal)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("impl", QK_IMPLS)
def test_qk_float16_within_torch_own_error(impl):
    """fp16 q/k: error vs the float64 oracle (on the same fp16 values) <= 2x PyTorch's fp16 eager attention error."""
    q, k, ipos, qpos, mask = _inputs(2, dtype=torch.float16)
    out = _run_qk(impl, q, k, ipos, qpos, mask, None, True)
    ref = _oracle_qk(q, k, ipos, qpos, mask, None, True)
    torch16 = _oracle(_probs(q, k, mask, D_ ** -0.5, True, dtype=torch.float16), ipos, qpos)  # fp16 scores + softmax
    assert_close_to_oracle(out, ref, torch16, k=2.0, atol=1e-5, name=f"{impl} fp16")


@pytest.mark.parametrize("impl", QK_IMPLS)
def test_qk_rows_that_see_nothing_are_zero_not_nan(impl):
    """Left padding under a causal mask: row 1's queries 0..3 see no key. A fully padded batch row sees nothing."""
    q, k, ipos, _, mask = _inputs(2, pad=True)
    mask[0] = False  # batch row 0 entirely padding
    qpos = torch.stack([torch.arange(0, TQ_), torch.arange(0, TQ_)])  # row 1: positions 0..3 are padding
    out = _run_qk(impl, q, k, ipos, qpos, mask, None, True)
    assert not torch.isnan(out).any()
    assert (out[0] == 0).all()
    assert (out[1, :4] == 0).all()  # queries 0..3 of the left-padded row see nothing
    assert (out[1, 4:].sum() > 0)
    ref = _oracle_qk(q, k, ipos, qpos, mask, None, True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_qk_triton_multiple_key_blocks(causal):
    """block_k=16 < T=37: the online logsumexp rescales across key blocks, and under ``causal`` the sweep stops after
    the block holding the tile's last query (positions 16 and 32 end their tiles: one key past a block boundary)."""
    from vpo_kernels.attention_stats import QKStatsConfig, image_attention_from_qk_triton

    q, k, ipos, _, mask = _inputs(2)
    qpos = torch.stack([torch.arange(6, 17), torch.arange(22, 33)])
    cfg = QKStatsConfig(block_q=16, block_k=16, block_p=16, num_warps=1, num_stages=1)
    mv = lambda t: t.to(DEV)  # noqa: E731
    out = image_attention_from_qk_triton(mv(q), mv(k), mv(ipos), mv(qpos), mv(mask), D_ ** -0.5, causal, config=cfg)
    ref = _oracle_qk(q, k, ipos, qpos, mask, None, causal)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=2e-6)


def test_qk_torch_float64_and_strided_inputs():
    """float64 stays float64 inside the torch path; q/k as [B, T, H, d]-transposed views need no copy."""
    q, k, ipos, qpos, mask = _inputs(2, dtype=torch.float64)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, HF-like strides
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    out = image_attention_from_qk(qt, kt, ipos, query_positions=qpos, key_padding_mask=mask, impl="torch")
    torch.testing.assert_close(out.double(), _oracle_qk(q, k, ipos, qpos, mask, None, True), rtol=1e-6, atol=1e-7)


def test_qk_triton_strided_inputs():
    q, k, ipos, qpos, mask = _inputs(2)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    out = _run_qk("triton", qt, kt, ipos, qpos, mask, None, True)
    torch.testing.assert_close(out.double(), _oracle_qk(q, k, ipos, qpos, mask, None, True), rtol=1e-5, atol=2e-6)


def test_outputs_carry_no_gradient():
    q, k, ipos, qpos, mask = _inputs(2)
    q.requires_grad_()
    out = image_attention_from_qk(q, k, ipos, query_positions=qpos, impl="torch")
    assert not out.requires_grad
    p = _probs(q.detach(), k, None, 0.2, True, dtype=torch.float32).requires_grad_()
    for impl in ["torch"] + (["cpp"] if vpo.AVAILABLE["cpp"] else []):
        assert not image_attention_from_probs(p, ipos, impl=impl).requires_grad


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_qk_torch_peak_tile_is_bounded(monkeypatch):
    """The torch qk path's largest tensor is one [B, Hq, C, T] tile within the budget, never [B, Hq, T, T]."""
    B, HQ, HKV, T, D = 1, 2, 1, 256, 8
    q, k = torch.randn(B, HQ, T, D), torch.randn(B, HKV, T, D)
    ipos = torch.arange(10, 30)[None]
    budget = 4096  # -> C = 8 query rows per chunk
    monkeypatch.setattr(ops, "QK_TILE_BUDGET", budget)
    assert ops.qk_chunk_rows(B, HQ, T, T) == 8
    with _LargestTensor() as mode:
        out = image_attention_from_qk(q, k, ipos, impl="torch")
    full = B * HQ * T * T  # what a materializing implementation would build
    # Besides the tiles, only the inputs (copied in the compute dtype) and the [B, Tq, N_p] output may be this big.
    assert mode.largest <= max(budget, q.numel(), k.numel(), out.numel()), (mode.largest, budget)
    assert mode.largest * 16 <= full
    ref = _oracle_qk(q, k, ipos, None, None, None, True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Route (a): materialized probabilities
# ----------------------------------------------------------------------------------------------------------------------

PROBS_IMPLS = ["torch", pytest.param("cpp", marks=needs_cpp)]


@pytest.mark.parametrize("impl", PROBS_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_probs_matches_oracle(impl, dtype):
    """Probabilities from a real (masked, causal) softmax, stored in ``dtype``: exact gather + head mean."""
    q, k, ipos, qpos, mask = _inputs(2)
    p = _probs(q, k, mask, D_ ** -0.5, True).to(dtype)  # [B, Hq, T, T]
    for rows in (qpos, None):
        out = image_attention_from_probs(p, ipos, query_positions=rows, impl=impl)
        ref = _oracle(p, ipos, rows)  # the oracle on the very same (rounded) probabilities, in float64
        assert out.dtype == torch.float32 and out.shape == ref.shape
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", PROBS_IMPLS)
def test_probs_strided_view_and_n_p_1(impl):
    """A non-contiguous [B, H, T, T] view (from a [B, T, H, T] buffer) is read through its strides; N_p = 1."""
    q, k, _, qpos, mask = _inputs(2)
    p = _probs(q, k, mask, D_ ** -0.5, False).float()
    view = p.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not view.is_contiguous()
    ipos = torch.tensor([[7], [30]])
    out = image_attention_from_probs(view, ipos, query_positions=qpos, impl=impl)
    torch.testing.assert_close(out.double(), _oracle(p, ipos, qpos), rtol=1e-6, atol=1e-7)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_half_conversion_special_values(dtype):
    """The C++ path decodes 16-bit words by hand: subnormals, extremes, inf and NaN must come out exact."""
    info = torch.finfo(dtype)
    vals = torch.tensor([0.0, -0.0, info.tiny, info.tiny / 8, info.smallest_normal * 1.5, info.max, -info.max,
                         float("inf"), -float("inf"), float("nan"), 1.0 / 3, -2.5e-3], dtype=dtype)
    n = vals.numel()
    p = torch.zeros(1, 1, n, n, dtype=dtype)
    p[0, 0, 0] = vals  # query row 0 holds the values, read at key positions 0..n-1
    out = image_attention_from_probs(p, torch.arange(n)[None], query_positions=torch.tensor([[0]]), impl="cpp")
    torch.testing.assert_close(out[0, 0], vals.float(), rtol=0, atol=0, equal_nan=True)  # (-0 sums to +0: fine)


def test_probs_route_equals_qk_route():
    """Eager attention's probabilities through route (a) == route (b) on the same q, k."""
    q, k, ipos, qpos, mask = _inputs(2)
    p = _probs(q, k, mask, D_ ** -0.5, True, dtype=torch.float32)
    a = image_attention_from_probs(p, ipos, query_positions=qpos)
    b = image_attention_from_qk(q, k, ipos, query_positions=qpos, key_padding_mask=mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Averaging over layers
# ----------------------------------------------------------------------------------------------------------------------


def test_accumulator_layer_subset_matches_oracle():
    q, k, ipos, qpos, mask = _inputs(2)
    layers = [_probs(q * (0.5 + i), k, mask, D_ ** -0.5, True) for i in range(3)]  # 3 distinct layers
    image_mask = torch.zeros(B_, T_, dtype=torch.bool).scatter_(1, ipos, True)

    acc = ImageAttentionAccumulator(layers=[0, -1], num_layers=3)
    for i, p in enumerate(layers):
        if acc.wants(i):
            assert acc.add(i, image_attention_from_probs(p, ipos, query_positions=qpos))
        else:
            assert not acc.add(i, torch.full((B_, TQ_, NP_), math.nan))  # unselected: ignored, even if garbage
    assert acc.layers_seen == (0, 2)
    ref = image_attention_stats(layers, image_mask, layers=[0, 2]).gather(1, qpos[:, :, None].expand(-1, -1, NP_))
    torch.testing.assert_close(acc.mean().double(), ref, rtol=1e-6, atol=1e-7)

    every = ImageAttentionAccumulator()  # layers=None: all layers
    for i, p in enumerate(layers):
        every.add(i, image_attention_from_qk(q * (0.5 + i), k, ipos, query_positions=qpos, key_padding_mask=mask))
    assert every.layers_seen == (0, 1, 2)
    ref_all = image_attention_stats(layers, image_mask).gather(1, qpos[:, :, None].expand(-1, -1, NP_))
    torch.testing.assert_close(every.mean().double(), ref_all, rtol=1e-5, atol=2e-6)


def test_accumulator_errors():
    a = torch.rand(1, 2, 3)
    with pytest.raises(ValueError, match="no layer was added"):
        ImageAttentionAccumulator().mean()
    acc = ImageAttentionAccumulator(layers=[1, 2])
    acc.add(1, a)
    with pytest.raises(ValueError, match=r"layers \[2\] were selected but never added"):
        acc.mean()
    with pytest.raises(ValueError, match="already added"):
        acc.add(1, a)
    with pytest.raises(ValueError, match="a has shape"):
        acc.add(2, torch.rand(1, 2, 4))
    with pytest.raises(ValueError, match="negative layer indices need num_layers"):
        ImageAttentionAccumulator(layers=[-1])
    with pytest.raises(ValueError, match="layers contains an index outside"):
        ImageAttentionAccumulator(layers=[3], num_layers=3)
    with pytest.raises(ValueError, match="layer_idx must be a non-negative int"):
        ImageAttentionAccumulator().add(-1, a)
    with pytest.raises(ValueError, match="layers must not be empty"):
        ImageAttentionAccumulator(layers=[])
    acc.reset()
    assert acc.layers_seen == ()


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


def _qk_kwargs():
    q, k, ipos, qpos, mask = _inputs(2)
    return dict(q=q, k=k, image_positions=ipos, query_positions=qpos, key_padding_mask=mask)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=torch.randn(2, 6, 37)), "q must have 4 dimensions"),
        (dict(k=torch.randn(2, 4, 37, 24)), r"Hq % Hkv == 0"),
        (dict(k=torch.randn(2, 2, 36, 24)), "k has shape"),
        (dict(k=torch.randn(2, 2, 37, 24, dtype=torch.float64)), "k has dtype float64 but q has dtype float32"),
        (dict(k=torch.randn(2, 2, 37, 24, device="meta")), "k is on meta but q is on cpu"),
        (dict(q=torch.ones(2, 6, 37, 24, dtype=torch.int64)), "q must have dtype in"),
        (dict(image_positions=torch.tensor([[0, 37]] * 2)), "image_positions contains 37: expected positions in"),
        (dict(image_positions=torch.tensor([[-1, 3]] * 2)), "image_positions contains -1"),
        (dict(image_positions=torch.tensor([[1.0, 3.0]] * 2)), "image_positions must have dtype"),
        (dict(image_positions=torch.tensor([[1, 3]] * 3)), r"image_positions has shape \(3, 2\)"),
        (dict(image_positions=torch.tensor([1, 3])), "image_positions must have 2 dimensions"),
        (dict(query_positions=torch.tensor([[40]] * 2)), "query_positions contains 40"),
        (dict(key_padding_mask=torch.ones(2, 36, dtype=torch.bool)), "key_padding_mask has shape"),
        (dict(key_padding_mask=torch.ones(2, 37)), "key_padding_mask must have dtype"),
        (dict(scale=float("nan")), "scale must be a finite number"),
        (dict(causal=1), "causal must be a bool"),
        (dict(impl="flash"), r"impl must be one of \['auto', 'triton', 'torch'\]"),
    ],
)
def test_qk_bad_inputs_raise(change, match):
    kw = _qk_kwargs()
    kw.update(change)
    q, k = kw.pop("q"), kw.pop("k")
    ipos = kw.pop("image_positions")
    with pytest.raises(ValueError, match=match):
        image_attention_from_qk(q, k, ipos, **kw)


def test_qk_triton_rejects_float64():
    q, k, ipos, _, _ = _inputs(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="impl='triton' takes q/k in float16"):
        image_attention_from_qk(q, k, ipos, impl="triton")


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.rand(2, 3, 4),), {}, "attn_probs must have 4 dimensions"),
        ((torch.rand(2, 3, 4, 5),), {}, r"expected square \[B, H, T, T\]"),
        ((torch.ones(2, 3, 4, 4, dtype=torch.int32),), {}, "attn_probs must have dtype"),
        ((torch.rand(2, 3, 4, 4), torch.tensor([[4], [0]])), {}, "image_positions contains 4"),
        ((torch.rand(2, 3, 4, 4), torch.tensor([[1]])), {}, "image_positions has shape"),
        ((torch.rand(2, 3, 4, 4),), dict(query_positions=torch.tensor([[1], [-2]])), "query_positions contains -2"),
        ((torch.rand(2, 3, 4, 4),), dict(impl="cuda"), "impl='cuda' needs CUDA tensors"),
        ((torch.rand(2, 3, 4, 4),), dict(impl="triton"), r"impl must be one of \['auto', 'cpp', 'cuda', 'torch'\]"),
    ],
)
def test_probs_bad_inputs_raise(args, kwargs, match):
    if len(args) == 1:
        args = (args[0], torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match=match):
        image_attention_from_probs(*args, **kwargs)


def test_auto_falls_back_to_torch_without_the_extension_function(monkeypatch):
    """A missing or stale vpo._C: impl='auto' uses the torch gather; impl='cpp' says what to do."""
    monkeypatch.setattr(ops, "_ext_has", lambda name: False)
    q, k, ipos, qpos, mask = _inputs(2)
    p = _probs(q, k, mask, D_ ** -0.5, True)
    assert ops._resolve_probs_impl("auto", p.device) == "torch"
    torch.testing.assert_close(image_attention_from_probs(p, ipos, query_positions=qpos).double(),
                               _oracle(p, ipos, qpos), rtol=1e-6, atol=1e-7)
    if vpo.AVAILABLE["cpp"]:
        with pytest.raises(RuntimeError, match="rebuild"):
            image_attention_from_probs(p, ipos, impl="cpp")


@needs_cpp
def test_cpp_side_checks_its_own_arguments():
    """The torch-free ABI validates too: std::invalid_argument arrives as ValueError naming the argument."""
    C = _ext._C
    p = torch.rand(1, 2, 4, 4)
    ipos = torch.tensor([[1, 2]])
    out = torch.empty(1, 4, 2)

    def call(dtype=0, attn=p.data_ptr(), T=4, strides=tuple(p.stride()), image=ipos.data_ptr(), query=0, nq=4):
        C.image_attention_probs_cpu(dtype, attn, 1, 2, T, *strides, image, 2, query, nq, out.data_ptr())

    call()  # valid
    torch.testing.assert_close(out, p.mean(1)[:, :, 1:3])
    with pytest.raises(ValueError, match="dtype: expected 0"):
        call(dtype=9)
    with pytest.raises(ValueError, match="attn: expected a non-null pointer"):
        call(attn=0)
    with pytest.raises(ValueError, match="image_pos: expected a non-null pointer"):
        call(image=0)
    with pytest.raises(ValueError, match=r"num_query: expected num_query == seq"):
        call(nq=3)
    with pytest.raises(ValueError, match="stride: expected non-negative"):
        call(strides=(32, 16, -4, 1))
    bad = torch.tensor([[1, 4]])
    with pytest.raises(ValueError, match=r"image_pos: expected positions in \[0, 4\), got 4"):
        call(image=bad.data_ptr())
    qbad = torch.tensor([[0, 1, 2, 7]])
    with pytest.raises(ValueError, match=r"query_pos: expected positions in \[0, 4\), got 7"):
        call(query=qbad.data_ptr())


# ----------------------------------------------------------------------------------------------------------------------
# GPU lane: real shapes, bf16 (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------------------


def _real_shape_inputs(dtype, hq=8, hkv=2, T=2048, n_p=576, tq=300, d=128):
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, hq, T, d, generator=g) * 1.5).to("cuda", dtype)
    k = torch.randn(1, hkv, T, d, generator=g).to("cuda", dtype)
    ipos = torch.arange(35, 35 + n_p, device="cuda")[None]
    qpos = torch.arange(T - tq, T, device="cuda")[None]
    mask = torch.ones(1, T, dtype=torch.bool, device="cuda")
    mask[0, :7] = False
    return q, k, ipos, qpos, mask


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_probs_real_shape(dtype):
    if not vpo.AVAILABLE["cuda_ext"]:
        pytest.skip("vpo._C built without CUDA")
    q, k, ipos, qpos, mask = _real_shape_inputs(torch.float32)
    p = _probs(q, k, mask, 128 ** -0.5, True, dtype=torch.float32).to(dtype)  # [1, 8, 2048, 2048]
    out = image_attention_from_probs(p, ipos, query_positions=qpos, impl="cuda")
    ref = image_attention_from_probs(p, ipos, query_positions=qpos, impl="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    cpu = image_attention_from_probs(p.cpu(), ipos.cpu(), query_positions=qpos.cpu(), impl="cpp")
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_qk_real_shape(dtype):
    """Triton vs the float64 oracle (on the same rounded inputs) within 2x PyTorch's own error in ``dtype``."""
    q, k, ipos, qpos, mask = _real_shape_inputs(dtype)
    out = image_attention_from_qk(q, k, ipos, query_positions=qpos, key_padding_mask=mask, impl="triton")
    ref = image_attention_from_qk(q.double(), k.double(), ipos, query_positions=qpos, key_padding_mask=mask,
                                  impl="torch")
    own = _oracle(_probs(q, k, mask, 128 ** -0.5, True, dtype=dtype), ipos, qpos)  # eager attention in dtype
    assert not torch.isnan(out).any()
    assert_close_to_oracle(out, ref, own, k=2.0, atol=1e-5, name=f"triton {dtype}")
    torch_path = image_attention_from_qk(q, k, ipos, query_positions=qpos, key_padding_mask=mask, impl="torch")
    torch.testing.assert_close(out, torch_path, rtol=1e-3, atol=1e-5)
