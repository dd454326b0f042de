"""No host sync on the LM-head ops' hot path (issue 10, item 3).

Every way a device value reaches the host from Python (``Tensor.item``, ``.tolist``, ``bool(tensor)``, ``int``/``float``
of a tensor, ``nonzero``) is replaced by a function that raises when called from vpo's own code (``vpo.*``,
``vpo_kernels.*``), and the public ops run forward and backward on the "torch", "gemm" and "triton" paths (Triton's
own interpreter may read values back; only vpo's code is checked). On a GPU each of
those calls would stall the stream. A bad label is then a device-side assert, not a synchronous ValueError (which
``VPO_DEBUG_CHECKS=1`` brings back, and which CPU tensors always get: there, a failing assert raises at once).
"""
import importlib.util
import sys

import pytest
import torch

from vpo import linear_logprobs, linear_token_kl, target_logits
from vpo.testing import make_linear_head_inputs

_needs_triton = pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="needs triton")
IMPLS = ["torch", pytest.param("gemm", marks=_needs_triton), pytest.param("triton", marks=_needs_triton)]


class HostSync(AssertionError):
    pass


def _from_vpo() -> bool:
    mod = sys._getframe(2).f_globals.get("__name__", "")
    return mod == "vpo" or mod.startswith(("vpo.", "vpo_kernels"))


@pytest.fixture
def no_host_sync(monkeypatch):
    """Patch every Python-level host read on tensors to raise when vpo's code calls it."""
    def guard(name, real):
        def patched(*args, **kwargs):
            if _from_vpo():
                raise HostSync(f"{name} called from {sys._getframe(1).f_globals.get('__name__')}")
            return real(*args, **kwargs)
        return patched

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, guard(f"Tensor.{name}", getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", guard("torch.nonzero", torch.nonzero))
    yield


def _inputs(seed=0):
    x = make_linear_head_inputs(2, 19, 24, 131, bias=True, seed=seed, prompt_len=3)
    return x.hidden, x.weight, x.bias, x.labels


def test_the_guard_catches_a_sync(no_host_sync):
    """The fixture does what it says: today's (pre-issue-10) label check, a ``bool(tensor)``, would raise."""
    from vpo import _validate

    y = torch.tensor([1, 2, -100])
    with pytest.raises(HostSync):
        _validate.check_labels_in_range("labels", y, 10, -100)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_and_target_logits(impl, no_host_sync, monkeypatch):
    monkeypatch.setenv("VPO_TORCH_CHUNK", "50")
    h, W, b, y = _inputs()
    logp, tgt = linear_logprobs(h, W, y, b, impl=impl)
    (logp.sum() + 0.5 * tgt.sum()).backward()
    linear_logprobs(h, W, y, b, impl=impl)[1].sum().backward()  # target-only gradient: the sparse backward
    target_logits(h, W, y, b, impl=impl).sum().backward()
    assert h.grad is not None and W.grad is not None and b.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_token_kl(impl, no_host_sync, monkeypatch):
    monkeypatch.setenv("VPO_TORCH_CHUNK", "50")
    h, W, b, y = _inputs()
    hr, Wr, br, _ = _inputs(seed=1)
    linear_token_kl(h, W, hr.detach(), Wr.detach(), y, b, br.detach(), impl=impl).sum().backward()
    linear_token_kl(h, W, hr.detach(), labels=None, impl=impl).sum().backward()
    assert h.grad is not None and W.grad is not None


def test_bad_label_still_raises_on_cpu():
    h, W, b, y = _inputs()
    y = y.clone()
    y[0, 5] = 131
    with pytest.raises(ValueError, match=r"labels contains 131: expected values in \[0, 131\)"):
        linear_logprobs(h, W, y, b, impl="torch")
