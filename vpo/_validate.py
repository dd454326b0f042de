"""Argument checks shared by every public function.

Every check raises ``ValueError`` naming the argument, what was expected and what was received, e.g.::

    labels has shape (4, 17) but hidden has shape (4, 16, 4096): expected labels.shape == hidden.shape[:-1]

Checks never synchronise with the device (no ``.item()``) unless their name says so (``check_labels_in_range``).
:func:`assert_labels_in_range` is the hot-path label check: a device-side assert, or the synchronous ValueError when
``VPO_DEBUG_CHECKS=1``.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _fmt_shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank(s) and dtype(s), and not empty unless allowed."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ok = (t.dim() == ndim) if isinstance(ndim, int) else (t.dim() in tuple(ndim))
        if not ok:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {_fmt_shape(t)} ({t.dim()} dims)")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {_fmt_shape(t)}")
    return t


def check_float(name: str, t, *, ndim=None, allow_empty: bool = False) -> torch.Tensor:
    return check_tensor(name, t, ndim=ndim, dtypes=FLOAT_DTYPES, allow_empty=allow_empty)


def check_same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {_fmt_shape(t)} but {ref_name} has shape {_fmt_shape(ref)}: "
            f"expected {name}.shape == {ref_name}.shape"
        )


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: expected the same device")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(
            f"{name} has dtype {str(t.dtype).replace('torch.', '')} but {ref_name} has dtype "
            f"{str(ref.dtype).replace('torch.', '')}: expected the same dtype"
        )


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same shape, device and dtype as ``ref``."""
    check_same_shape(name, t, ref_name, ref)
    check_same_device(name, t, ref_name, ref)
    check_same_dtype(name, t, ref_name, ref)


def check_even_batch(name: str, t: torch.Tensor) -> int:
    """Check dim 0 is 2B (chosen rows first, then rejected) and return B."""
    n = t.shape[0]
    if n == 0 or n % 2:
        raise ValueError(
            f"{name} has {n} rows (shape {_fmt_shape(t)}): expected an even, non-zero 2B rows, "
            f"chosen rows first then rejected"
        )
    return n // 2


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if value != value or (value < 0 if allow_zero else value <= 0):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    bad = value != value or (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi)
    if bad:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_labels(name: str, labels: torch.Tensor, *, ndim=None) -> torch.Tensor:
    return check_tensor(name, labels, ndim=ndim, dtypes=INDEX_DTYPES)


def check_labels_in_range(name: str, labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels must lie in [0, V) or equal ignore_index. Synchronises with the device (one small reduction)."""
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"{name} contains {first}: expected values in [0, {vocab_size}) or ignore_index={ignore_index}"
        )


def debug_checks() -> bool:
    """Whether ``VPO_DEBUG_CHECKS=1``: run the synchronous (host-syncing) checks that name the bad value."""
    return os.environ.get("VPO_DEBUG_CHECKS", "") == "1"


def assert_labels_in_range(name: str, labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels must lie in ``[0, V)`` or equal ``ignore_index``; the hot-path check of every LM-head entry.

    CUDA: a device-side assert (``torch._assert_async``), no host sync; it surfaces at the next sync. CPU, or
    ``VPO_DEBUG_CHECKS=1``: a ``ValueError`` naming the first bad value (the value is read only on the error path)."""
    ok = ((labels == ignore_index) | ((labels >= 0) & (labels < vocab_size))).all()
    msg = f"{name} contains a value outside [0, {vocab_size}) that is not ignore_index={ignore_index}"
    if labels.is_cuda and not debug_checks():
        torch._assert_async(ok, msg)
        return
    try:
        torch._assert_async(ok, msg)  # raises at once on CPU, without reading the flag through Python
        if labels.is_cuda and not ok.item():  # VPO_DEBUG_CHECKS=1 on CUDA: the sync it asks for
            raise RuntimeError(msg)
    except RuntimeError:
        check_labels_in_range(name, labels, vocab_size, ignore_index)
        raise  # unreachable: check_labels_in_range raises for the same labels
