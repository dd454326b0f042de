"""DeepSpeed ZeRO-3 and the fused losses: the LM head gathered through the step (vpo.trainer.distributed).

Two layers:

- Always (no DeepSpeed needed): :func:`zero3_head_gathered` and :func:`step_context` against a STUB with DeepSpeed's
  API (``deepspeed.zero.GatheredParameters`` and the ``ds_id`` / ``is_external_param`` fields of a ZeRO-3
  parameter): the head (and the reference's) is gathered exactly once for the block, flagged external during it,
  restored after; nothing happens without ZeRO-3 parameters or under ZeRO-2; the setup checks refuse FSDP1 and
  tensor parallelism.
- With DeepSpeed installed (skipped otherwise; ``pip install deepspeed`` runs on CPU with ``DS_ACCELERATOR=cpu``
  and gloo: DeepSpeed 0.19.8 did): 2 ranks, a tiny model under a real ZeRO-3 engine, the fused DPO loss on
  ``lm_head.weight`` inside :func:`zero3_head_gathered` spanning the forward, the loss and ``engine.backward``: the
  full gradients of the head and of a backbone layer (``deepspeed.utils.safe_get_full_grad``) equal the
  single-process ones (float32, 1e-6); and a gather around the loss alone (the naive way) fails in the backward.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import types

import pytest
import torch

from vpo.trainer import distributed as vd


# ----------------------------------------------------------------------------------------------- the stub layer
class _StubZero:
    """``deepspeed.zero`` with a recording ``GatheredParameters``."""

    def __init__(self):
        self.events = []

    def GatheredParameters(self, params, modifier_rank=None):  # noqa: N802 (DeepSpeed's name)
        stub = self

        @contextlib.contextmanager
        def ctx():
            stub.events.append(("gather", [p.ds_id for p in params], modifier_rank))
            for p in params:
                p.ds_status = "AVAILABLE"
            try:
                yield
            finally:
                stub.events.append(("partition", [p.ds_id for p in params],
                                    [getattr(p, "is_external_param", None) for p in params]))
                for p in params:
                    p.ds_status = "NOT_AVAILABLE"

        return ctx()


class _Head(torch.nn.Module):
    def __init__(self, ds_id):
        super().__init__()
        self.lm_head = torch.nn.Linear(4, 7, bias=False)
        self.lm_head.weight.ds_id = ds_id
        self.lm_head.weight.is_external_param = False

    def get_output_embeddings(self):
        return self.lm_head


@pytest.fixture
def stub_deepspeed(monkeypatch):
    zero = _StubZero()
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(zero=zero))
    return zero


def test_zero3_head_gathered_spans_the_block_and_restores(stub_deepspeed):
    policy, ref = _Head(1), _Head(2)
    inside = []
    with vd.zero3_head_gathered(policy, None, ref):
        inside.append([policy.lm_head.weight.is_external_param, ref.lm_head.weight.is_external_param,
                       policy.lm_head.weight.ds_status])
    assert stub_deepspeed.events == [("gather", [1, 2], None), ("partition", [1, 2], [False, False])]
    assert inside == [[True, True, "AVAILABLE"]]  # the model's own lm_head release hook skips external params
    assert policy.lm_head.weight.ds_status == "NOT_AVAILABLE"


def test_zero3_head_gathered_restores_on_error_and_is_a_noop_without_zero3(stub_deepspeed):
    policy = _Head(1)
    with pytest.raises(KeyError):
        with vd.zero3_head_gathered(policy):
            raise KeyError("boom")
    assert policy.lm_head.weight.is_external_param is False and stub_deepspeed.events[-1][0] == "partition"
    plain = torch.nn.Module()
    plain.lm_head = torch.nn.Linear(4, 7)
    plain.get_output_embeddings = lambda: plain.lm_head
    n = len(stub_deepspeed.events)
    with vd.zero3_head_gathered(plain):
        pass
    assert len(stub_deepspeed.events) == n  # no ZeRO-3 parameter: nothing gathered


def _fake_trainer(stage=None, fsdp_version=None, tp=1, model=None):
    plugin = None if stage is None else types.SimpleNamespace(zero_stage=stage)
    fsdp = None if fsdp_version is None else types.SimpleNamespace(fsdp_version=fsdp_version)
    state = types.SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=fsdp)
    accelerator = types.SimpleNamespace(state=state, parallelism_config=types.SimpleNamespace(tp_size=tp))
    return types.SimpleNamespace(accelerator=accelerator, is_deepspeed_enabled=stage is not None,
                                 is_fsdp_enabled=fsdp_version is not None, model=model or torch.nn.Linear(2, 2),
                                 ref_model=None)


def test_step_context_only_under_zero3(stub_deepspeed):
    policy = _Head(5)
    with vd.step_context(_fake_trainer(stage=2), policy):
        pass
    assert stub_deepspeed.events == []
    with vd.step_context(_fake_trainer(stage=3), policy):
        pass
    assert [e[0] for e in stub_deepspeed.events] == ["gather", "partition"]


def test_zero3_reference_must_not_be_a_copy_of_the_partitioned_policy():
    policy, ref = _Head(7), _Head(7)  # a deep copy keeps the partitioned policy's ds_id
    with pytest.raises(ValueError, match="copy of the ZeRO-3-partitioned policy.*ref_model_path"):
        vd.prepare_reference(_fake_trainer(stage=3, model=policy), ref)


def test_setup_checks_refuse_fsdp1_and_tensor_parallel():
    vd.check_distributed_setup(_fake_trainer(fsdp_version=2))
    vd.check_distributed_setup(_fake_trainer(stage=3))
    with pytest.raises(ValueError, match="FSDP version 1.*Supported: DDP, FSDP2"):
        vd.check_distributed_setup(_fake_trainer(fsdp_version=1))
    with pytest.raises(ValueError, match="tp_size=2.*Supported"):
        vd.check_distributed_setup(_fake_trainer(tp=2))


def test_precompute_tables_merge_in_dataset_order():
    assert vd.shard_indices(5, 1, 2) == [1, 3] and vd.shard_indices(5, 0, 2) == [0, 2, 4]
    with pytest.raises(ValueError, match="rank 2 of world_size 2"):
        vd.shard_indices(5, 2, 2)
    parts = [({"a": {"main": [1]}, "c": {"main": [3]}, "x": {}}, {"a": 0, "c": 2}), ({"b": {"main": [2]}}, {"b": 1})]
    merged = vd.merge_tables(parts)
    assert list(merged) == ["a", "b", "c", "x"] and merged["b"] == {"main": [2]}  # unknown position: last
    with pytest.raises(ValueError, match="computed by two processes"):
        vd.merge_tables([({"a": {}}, {"a": 0}), ({"a": {}}, {"a": 0})])
    rows = [{"id": "r0"}, {"id": "r1"}, {"id": "r2"}]
    shard, index_of = vd.precompute_shard(rows)  # one process: everything
    assert shard is rows and index_of == {"r0": 0, "r1": 1, "r2": 2}


# ----------------------------------------------------------------------------------------- real DeepSpeed, 2 ranks
V, D, T, PAIRS = 29, 8, 5, 2


def _tiny():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(V, D)
            self.body = torch.nn.Linear(D, D)
            self.lm_head = torch.nn.Linear(D, V, bias=False)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, ids):  # the head runs on one position, as with logits_to_keep=1
            h = torch.tanh(self.body(self.embed(ids)))
            self.lm_head(h[:, -1:])
            return h

    torch.manual_seed(0)
    return Tiny()


def _batch():
    g = torch.Generator().manual_seed(3)
    n = 2 * PAIRS
    ids = torch.randint(0, V, (2 * n, T), generator=g)
    labels = torch.randint(0, V, (2 * n, T), generator=g)
    ref = -torch.rand(2 * n, generator=g) * 5
    return ids, labels, ref


def _ds_worker(out_dir: str, mode: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    import vpo

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    ids, labels, ref = _batch()
    n = 2 * PAIRS
    rows = [p for p in range(rank * PAIRS, (rank + 1) * PAIRS)]
    rows = rows + [n + p for p in rows]
    truth = _tiny()
    h = truth(ids)
    loss, _ = vpo.fused_dpo_loss(truth.lm_head.weight, h, labels, ref_logps=ref, impl="torch")
    loss.backward()

    cfg = {"train_micro_batch_size_per_gpu": PAIRS, "zero_optimization": {"stage": 3,
           "stage3_param_persistence_threshold": 0}, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "zero_allow_untested_optimizer": True}
    model = _tiny()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    W = engine.module.lm_head.weight
    result = {"partitioned_before": W.numel() == 0}
    try:
        if mode == "step":
            with vd.zero3_head_gathered(engine.module):
                h = engine(ids[rows])
                loss, _ = vpo.fused_dpo_loss(W, h, labels[rows], ref_logps=ref[rows], impl="torch")
                engine.backward(loss)
        else:  # the naive way: gathered for the loss only
            h = engine(ids[rows])
            with deepspeed.zero.GatheredParameters([W], modifier_rank=None):
                loss, _ = vpo.fused_dpo_loss(W, h, labels[rows], ref_logps=ref[rows], impl="torch")
            engine.backward(loss)
        result["head_grad"] = float((safe_get_full_grad(W) - truth.lm_head.weight.grad).abs().max())
        result["body_grad"] = float((safe_get_full_grad(engine.module.body.weight) - truth.body.weight.grad).abs().max())
        result["partitioned_after"] = W.numel() == 0
    except Exception as e:  # noqa: BLE001 - the naive mode is expected to fail; report what failed
        result["error"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.parametrize("mode", ["step", "loss_only"])
def test_real_zero3_head_gradient_matches_single_process(tmp_path, mode):
    pytest.importorskip("deepspeed")
    from test_distributed_fsdp import run_two_ranks

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    (tmp_path / "mode").write_text(mode)
    for r in run_two_ranks(os.path.abspath(__file__), tmp_path, timeout=240):
        assert r["partitioned_before"]
        if mode == "step":
            assert "error" not in r, r
            assert r["head_grad"] < 1e-6 and r["body_grad"] < 1e-6, r
            assert r["partitioned_after"]
        else:
            assert "error" in r and "size" in r["error"], r  # the released head is read by the backward


if __name__ == "__main__":
    with open(os.path.join(sys.argv[1], "mode")) as f:
        _ds_worker(sys.argv[1], f.read().strip())
