"""The csrc op (segmented preference-head reduction) against plain torch, and the extension-optional import."""
import subprocess
import sys
import textwrap

import pytest
import torch

import vpo
from vpo import _ext
from vpo.ops.segment_sum import segment_sum, sequence_sum

needs_cpp = pytest.mark.skipif(not vpo.AVAILABLE["cpp"], reason="vpo._C not built")


def _loop_reference(values, offsets, weights):
    """A different way to the same numbers: a Python loop over segments in float64."""
    out = []
    for s in range(offsets.numel() - 1):
        a, b = int(offsets[s]), int(offsets[s + 1])
        v = values[a:b].double()
        w = weights[a:b].double() if weights is not None else torch.ones_like(v)
        out.append((v * w).sum())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


# lengths with an empty segment, a one-token segment and one that no block size divides
OFFSETS = torch.tensor([0, 0, 1, 38, 40, 40, 77], dtype=torch.int64)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_cpp_matches_loop_reference_values_and_grads(dtype, weighted):
    n = int(OFFSETS[-1])
    v = torch.randn(n, dtype=dtype, requires_grad=True)
    w = torch.rand(n, dtype=dtype, requires_grad=True) if weighted else None
    out = segment_sum(v, OFFSETS, w, impl="cpp")
    ref = _loop_reference(v.detach(), OFFSETS, None if w is None else w.detach())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    assert out[0].item() == 0.0 and out[4].item() == 0.0  # empty segments

    g = torch.randn(OFFSETS.numel() - 1, dtype=dtype)
    out.backward(g)
    seg = torch.repeat_interleave(torch.arange(6), OFFSETS[1:] - OFFSETS[:-1])
    expect_dv = g[seg] * (w.detach() if weighted else 1)
    torch.testing.assert_close(v.grad, expect_dv)
    if weighted:
        torch.testing.assert_close(w.grad, g[seg] * v.detach())


@needs_cpp
def test_cpp_gradcheck_float64():
    v = torch.randn(9, dtype=torch.float64, requires_grad=True)
    w = torch.rand(9, dtype=torch.float64, requires_grad=True)
    off = torch.tensor([0, 2, 2, 9])
    assert torch.autograd.gradcheck(lambda a, b: segment_sum(a, off, b, impl="cpp"), (v, w))
    assert torch.autograd.gradcheck(lambda a: segment_sum(a, off, impl="cpp"), (v,))


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_half_inputs_sum_in_float32(impl):
    v = torch.full((3000,), 0.1, dtype=torch.bfloat16)
    out = segment_sum(v, torch.tensor([0, 3000]), impl=impl)
    assert out.dtype == torch.float32
    # bf16 accumulation would stall far below 300 (bf16(0.1) = 0.10009765625)
    assert abs(out.item() - 3000 * 0.10009765625) < 1e-2


def test_sequence_sum_padded_rows():
    vals = torch.randn(4, 7, dtype=torch.float64)
    mask = (torch.rand(4, 7) > 0.3).double()
    torch.testing.assert_close(sequence_sum(vals, mask), (vals * mask).sum(-1))


@pytest.mark.parametrize(
    "offsets, match",
    [
        (torch.tensor([1, 4]), "offsets must start at 0"),
        (torch.tensor([0, 3]), "end at values.numel"),
        (torch.tensor([0, 3, 2, 4]), "non-decreasing"),
        (torch.tensor([0, 4], dtype=torch.int32), "offsets must have dtype"),
        (torch.tensor([[0, 4]]), "offsets must have 1 dimensions"),
    ],
)
def test_bad_offsets_raise(offsets, match):
    with pytest.raises(ValueError, match=match):
        segment_sum(torch.randn(4), offsets)


def test_bad_values_and_impl_raise():
    with pytest.raises(ValueError, match="values must have dtype"):
        segment_sum(torch.arange(4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="weights has shape"):
        segment_sum(torch.randn(4), torch.tensor([0, 4]), torch.randn(3))
    with pytest.raises(ValueError, match=r"impl must be one of \['auto', 'cpp', 'cuda', 'torch'\]"):
        segment_sum(torch.randn(4), torch.tensor([0, 4]), impl="fast")
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        segment_sum(torch.randn(4), torch.tensor([0, 4]), impl="cuda")


@needs_cpp
def test_cpp_side_checks_its_own_arguments():
    """The torch-free ABI validates too: C++ std::invalid_argument arrives as ValueError naming the argument."""
    C = _ext._C
    v = torch.randn(4)
    out = torch.empty(1)
    bad = torch.tensor([0, 5, 4])
    with pytest.raises(ValueError, match="offsets: expected non-decreasing"):
        C.segment_sum_fwd_cpu(0, v.data_ptr(), 0, bad.data_ptr(), 2, out.data_ptr())
    with pytest.raises(ValueError, match="dtype: expected 0"):
        C.segment_sum_fwd_cpu(7, v.data_ptr(), 0, torch.tensor([0, 4]).data_ptr(), 1, out.data_ptr())


def test_import_works_without_extension():
    """`import vpo` must work when vpo._C is missing; the flag says so and the ops fall back to torch."""
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "vpo._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, vpo
        assert vpo.AVAILABLE["cpp"] is False and vpo.AVAILABLE["cuda_ext"] is False, dict(vpo.AVAILABLE)
        out = vpo.segment_sum(torch.tensor([1., 2., 3.]), torch.tensor([0, 2, 3]))
        assert out.tolist() == [3.0, 3.0], out
        try:
            vpo.segment_sum(torch.tensor([1.]), torch.tensor([0, 1]), impl="cpp")
        except RuntimeError as e:
            assert "vpo._C" in str(e)
        else:
            raise SystemExit("impl='cpp' without the extension must raise")
        print("OK")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpp(dtype):
    if not vpo.AVAILABLE["cuda_ext"]:
        pytest.skip("vpo._C built without CUDA")
    offsets = torch.tensor([0, 0, 1, 5000, 5003, 70000], dtype=torch.int64)
    n = int(offsets[-1])
    v = torch.randn(n, dtype=dtype, device="cuda", requires_grad=True)
    w = torch.rand(n, dtype=dtype, device="cuda", requires_grad=True)
    out = segment_sum(v, offsets.cuda(), w, impl="cuda")
    ref = _loop_reference(v.detach().cpu(), offsets, w.detach().cpu())
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)
    g = torch.randn(5, dtype=dtype, device="cuda")
    out.backward(g)
    seg = torch.repeat_interleave(torch.arange(5, device="cuda"), offsets.cuda()[1:] - offsets.cuda()[:-1])
    torch.testing.assert_close(v.grad, g[seg] * w.detach())
    torch.testing.assert_close(w.grad, g[seg] * v.detach())
