"""The fused losses never synchronise with the device on a public call's path (issue 10, item 3).

On CPU there is no stream to sync, so the test makes every sync-inducing Python entry point raise — ``Tensor.item``,
``tolist``, ``__bool__`` (``if tensor:``), ``__int__``/``__float__``/``__index__`` (``int(t)``, indexing by a tensor
scalar), ``nonzero`` (data-dependent shape) and ``numpy`` — then runs forward and backward of each fused loss, with
every option that changes the path. On CPU the engine packs the scored positions by default (``Chunking(compact=None)``:
their count costs nothing there); on CUDA it does not, so these runs ask for the CUDA behaviour with ``compact=False``,
and ``test_compact_default_is_sync_free_on_cuda`` checks that default.
"""
import pytest
import torch

import vpo
from vpo.fused import Chunking
from vpo.testing import make_linear_head_inputs

SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")


@pytest.fixture
def no_sync(monkeypatch):
    monkeypatch.delenv("VPO_DEBUG_CHECKS", raising=False)

    def install():
        for name in SYNCS:
            def boom(*a, _name=name, **k):
                raise AssertionError(f"host sync: Tensor.{_name} called on the fused path")
            monkeypatch.setattr(torch.Tensor, name, boom)
        monkeypatch.setattr(torch, "nonzero", lambda *a, **k: (_ for _ in ()).throw(AssertionError("torch.nonzero")))

    return install


def _inputs():
    x = make_linear_head_inputs(4, 7, 12, 61, bias=True, seed=4, prompt_len=2)
    hn = (x.hidden.detach() + 0.1).requires_grad_()
    return x, hn, x.hidden.detach() * 0.9, hn.detach() * 0.9


def test_patch_is_effective(no_sync):
    no_sync()
    with pytest.raises(AssertionError, match="host sync"):
        torch.ones(1).item()
    with pytest.raises(AssertionError, match="host sync"):
        bool(torch.ones(1))


def test_compact_default_is_sync_free_on_cuda():
    from vpo import _caps
    from vpo.fused._engine import compact_rows

    h = torch.zeros(2, 3, 4, device="meta")
    assert compact_rows(Chunking(), torch.zeros(2, 3, 4)) is True  # CPU: packing is free
    with _caps.assume_cuda():
        assert compact_rows(Chunking(), h) is False  # CUDA: no host sync unless asked
        assert compact_rows(Chunking(compact=True), h) is True
    assert compact_rows(Chunking(compact=False), torch.zeros(2, 3, 4)) is False


@pytest.mark.parametrize("chunking", [Chunking(compact=False), Chunking(pairs=1, vocab=16, store=False, compact=False)],
                         ids=["default", "tiled"])
def test_fused_losses_do_not_sync(no_sync, chunking):
    x, hn, rh, rhn = _inputs()
    w = torch.rand(x.labels.shape) + 0.5
    ref_logps = torch.zeros(4)
    no_sync()
    calls = [
        lambda: vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, rh, chunking=chunking,
                                   loss_type=["sigmoid", "ipo", "sft"], loss_weights=[1.0, 0.5, 0.1]),
        lambda: vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_logps=ref_logps, chunking=chunking),
        lambda: vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, rh, rhn, chunking=chunking,
                                   loss_type="sigmoid_norm"),
        lambda: vpo.fused_tpo_loss(x.weight, x.hidden, hn, x.labels, x.bias, rh, rhn, chunking=chunking,
                                   reward_grad=False),
        lambda: vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w, x.bias, rh, chunking=chunking,
                                     loss_type="apo_zero"),
        lambda: vpo.fused_catpo_loss(x.weight, x.hidden, x.labels, w, x.bias, ref_logps=ref_logps, kl_coef=0.0,
                                     chunking=chunking),
    ]
    for call in calls:
        loss, out = call()
        loss.backward()
    assert x.weight.grad is not None and hn.grad is not None
