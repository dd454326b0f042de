"""Input builders shared by the tests and the benchmarks (so both exercise the same shapes).

Also: ``assert_close_to_oracle``, the tolerance rule from STYLE.md — the fast path's error against a high-precision
oracle must be at most ``k`` times PyTorch's own error in the same dtype, plus a small absolute slack.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LinearHeadInputs:
    hidden: torch.Tensor  # [R, T, D] (or [N, D] when rows is None)
    weight: torch.Tensor  # [V, D]
    labels: torch.Tensor  # [R, T] int64, ignore_index where masked
    bias: Optional[torch.Tensor]  # [V] or None


def make_linear_head_inputs(
    rows: int,
    seq: int,
    dim: int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    bias: bool = False,
    ignore_frac: float = 0.25,
    prompt_len: int = 0,
    scale: float = 1.0,
    ignore_index: int = -100,
    seed: int = 0,
    requires_grad: bool = True,
) -> LinearHeadInputs:
    """Random LM-head inputs: hidden ``[rows, seq, dim]``, weight ``[vocab, dim]``, labels ``[rows, seq]``.

    The first ``prompt_len`` positions of every row are ignored (a prompt), and a further ``ignore_frac`` of positions
    at random. ``scale`` multiplies the logits' typical size (use ~1e3 to test huge logits).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(rows, seq, dim, generator=g, dtype=torch.float64) * (scale / dim**0.25)
    w = torch.randn(vocab, dim, generator=g, dtype=torch.float64) / dim**0.25
    b = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1 * scale if bias else None
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    drop = torch.rand(rows, seq, generator=g) < ignore_frac
    drop[:, :prompt_len] = True
    labels[drop] = ignore_index

    def mk(x):
        if x is None:
            return None
        return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return LinearHeadInputs(mk(h), mk(w), labels.to(device), mk(b))


def assert_close_to_oracle(out: torch.Tensor, oracle: torch.Tensor, torch_same_dtype: torch.Tensor, *,
                           k: float = 2.0, atol: float = 1e-5, name: str = "value") -> None:
    """``|out - oracle| <= k * |torch_same_dtype - oracle| + atol`` in max norm.

    ``oracle`` is computed in float64 (or float32); ``torch_same_dtype`` is PyTorch's own plain computation in the test
    dtype, whose error sets the scale of what is acceptable.
    """
    ref = oracle.double()
    err = (out.double() - ref).abs().max().item()
    base = (torch_same_dtype.double() - ref).abs().max().item()
    if not err <= k * base + atol:
        raise AssertionError(f"{name}: max error {err:.3e} > {k} x torch's own error {base:.3e} + {atol:.1e}")
