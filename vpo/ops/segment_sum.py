"""Segmented preference-head reduction: per-sequence sums of weighted per-token values.

    out[s] = Σ_{i ∈ segment s} w_i · v_i,      dv_i = w_i · g_s,      dw_i = v_i · g_s

Segments are contiguous ranges of a flat token array given by CSR ``offsets`` ``[S + 1]`` (``offsets[0] == 0``,
``offsets[-1] == N``, non-decreasing). A padded ``[R, T]`` batch is ``offsets = arange(R + 1) * T``
(see :func:`sequence_sum`). Implementations: ``"cpp"`` (vpo._C, CPU), ``"cuda"`` (vpo._C, CUDA), ``"torch"``.
The C++/CUDA side is torch-free: this module passes raw pointers, sizes and the current CUDA stream.
"""
from __future__ import annotations

from typing import Optional

import torch

from vpo import _ext
from vpo._validate import check_float, check_same_device, check_same_shape, check_tensor, check_choice

IMPLS = ("auto", "cpp", "cuda", "torch")
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}


def _segment_ids(offsets: torch.Tensor, n: int) -> torch.Tensor:
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=n)


def _segment_sum_torch(values, offsets, weights):
    x = values if weights is None else values * weights
    out = torch.zeros(offsets.numel() - 1, dtype=x.dtype, device=x.device)
    return out.index_add(0, _segment_ids(offsets, x.numel()), x)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class SegmentSumExt(torch.autograd.Function):
    """``vpo._C`` forward and backward (CPU C++ or CUDA by the tensors' device)."""

    @staticmethod
    def forward(ctx, values, offsets, weights):
        C = _ext.require_ext("segment_sum")
        S = offsets.numel() - 1
        out = torch.empty(S, dtype=values.dtype, device=values.device)
        code = _DTYPE_CODE[values.dtype]
        if values.is_cuda:
            stream = torch.cuda.current_stream(values.device).cuda_stream
            C.segment_sum_fwd_cuda(code, _ptr(values), _ptr(weights), _ptr(offsets), S, _ptr(out), stream)
        else:
            C.segment_sum_fwd_cpu(code, _ptr(values), _ptr(weights), _ptr(offsets), S, _ptr(out))
        ctx.save_for_backward(values, offsets, weights)
        ctx.has_weights = weights is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, offsets, weights = ctx.saved_tensors
        C = _ext.require_ext("segment_sum")
        need_v = ctx.needs_input_grad[0]
        need_w = ctx.has_weights and ctx.needs_input_grad[2]
        grad_out = grad_out.contiguous()
        dv = torch.empty_like(values) if need_v else None
        dw = torch.empty_like(values) if need_w else None
        if not (need_v or need_w):
            return None, None, None
        S = offsets.numel() - 1
        code = _DTYPE_CODE[values.dtype]
        if values.is_cuda:
            stream = torch.cuda.current_stream(values.device).cuda_stream
            C.segment_sum_bwd_cuda(code, _ptr(grad_out), _ptr(values), _ptr(weights), _ptr(offsets), S,
                                   values.numel(), _ptr(dv), _ptr(dw), stream)
        else:
            C.segment_sum_bwd_cpu(code, _ptr(grad_out), _ptr(values), _ptr(weights), _ptr(offsets), S,
                                  _ptr(dv), _ptr(dw))
        return dv, None, dw


def _resolve_impl(impl: str, device: torch.device) -> str:
    check_choice("impl", impl, IMPLS)
    if impl == "auto":
        if device.type == "cuda":
            return "cuda" if _ext.AVAILABLE["cuda_ext"] else "torch"
        return "cpp" if device.type == "cpu" and _ext.AVAILABLE["cpp"] else "torch"
    if impl == "cuda" and device.type != "cuda":
        raise ValueError(f"impl='cuda' needs CUDA tensors, got tensors on {device}")
    if impl == "cpp" and device.type != "cpu":
        raise ValueError(f"impl='cpp' needs CPU tensors, got tensors on {device}")
    if impl == "cuda" and not _ext.AVAILABLE["cuda_ext"]:
        raise ValueError("impl='cuda' needs vpo._C built with CUDA sources (vpo.AVAILABLE['cuda_ext'] is False)")
    return impl


def segment_sum(
    values: torch.Tensor,
    offsets: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    impl: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Per-segment sums of (weighted) per-token values.

    Args:
        values: ``[N]`` float per-token values (e.g. log-probs). float16/bfloat16 are summed in float32.
        offsets: ``[S + 1]`` int64 CSR offsets, ``offsets[0] == 0``, ``offsets[-1] == N``, non-decreasing.
        weights: optional ``[N]`` per-token weights (same dtype/device as ``values``).
        impl: ``"auto"`` (C++ on CPU / CUDA on GPU when built, else torch), ``"cpp"``, ``"cuda"``, ``"torch"``.
        validate: check the offsets' values (one device sync); internal callers that build offsets skip it.

    Returns:
        ``[S]`` sums, in ``values``' dtype (float32 for half inputs). Differentiable in ``values`` and ``weights``.

    Example:
        >>> import torch, vpo
        >>> vpo.segment_sum(torch.tensor([1., 2., 3., 4.]), torch.tensor([0, 1, 4]))
        tensor([1., 9.])
    """
    check_float("values", values, ndim=1, allow_empty=True)
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int64,))
    check_same_device("offsets", offsets, "values", values)
    if weights is not None:
        check_float("weights", weights, ndim=1, allow_empty=True)
        check_same_shape("weights", weights, "values", values)
        check_same_device("weights", weights, "values", values)
    if validate:
        n = values.numel()
        if int(offsets[0]) != 0 or int(offsets[-1]) != n:
            raise ValueError(
                f"offsets must start at 0 and end at values.numel() = {n}, "
                f"got offsets[0] = {int(offsets[0])}, offsets[-1] = {int(offsets[-1])}"
            )
        if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets must be non-decreasing")
    impl = _resolve_impl(impl, values.device)
    if values.dtype not in _DTYPE_CODE:
        values = values.float()
    if weights is not None and weights.dtype != values.dtype:
        weights = weights.to(values.dtype)
    if impl == "torch":
        return _segment_sum_torch(values, offsets, weights)
    return SegmentSumExt.apply(values.contiguous(), offsets.contiguous(),
                               None if weights is None else weights.contiguous())


def sequence_sum(values: torch.Tensor, weights: Optional[torch.Tensor] = None, *, impl: str = "auto") -> torch.Tensor:
    """Row sums of a padded ``[R, T]`` batch of per-token values (optionally weighted ``[R, T]``) -> ``[R]``."""
    check_float("values", values, ndim=2)
    if weights is not None:
        check_same_shape("weights", weights, "values", values)
    R, T = values.shape
    offsets = torch.arange(R + 1, device=values.device, dtype=torch.int64) * T
    return segment_sum(values.reshape(-1), offsets, None if weights is None else weights.reshape(-1),
                       impl=impl, validate=False)
