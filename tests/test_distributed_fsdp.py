"""FSDP2 (``fully_shard``) with the fused losses and ops: 2 gloo ranks on CPU vs one process on the same global batch.

A tiny model (embedding, two linear+tanh blocks, an LM head with a bias, V = 37 so the two shards are uneven: 19 + 18
rows) is sharded with ``fully_shard`` on each block and the root (``reshard_after_forward=True``, so after the forward
``lm_head.weight`` is the sharded DTensor, as under accelerate). Each rank runs the fused DPO loss on its 2 pairs,
taking ``model.lm_head.weight`` / ``.bias`` directly; the single process runs the same 4 pairs. Checked (float64,
tolerance 1e-10 abs, i.e. equal up to reduction order):

- the mean of the ranks' losses equals the single-process loss;
- the gathered gradients (``grad.full_tensor()``) of the head weight and bias and of the first block's weight equal
  the single-process gradients: the head's through :func:`vpo.distributed.unshard_head`'s backward, the block's
  through FSDP's own reduce-scatter — so FSDP neither skipped nor double-reduced the head;
- with torch's default (the root not resharded after its forward) ``lm_head.weight`` is the unsharded plain
  parameter after the forward: it passes through, and FSDP's own reduce-scatter gives the same gradient;
- the naive ``weight.full_tensor()`` path gives a different head gradient (each rank's own): this test can fail;
- ``vpo.linear_logprobs`` with the DTensor head: values and gradients equal the plain call on the full head;
- bad setups raise ValueError: a head sharded along D, weight and bias with different placements, a tensor-parallel
  mesh dimension, plain weight with DTensor bias.

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node 2 test_distributed_fsdp.py OUT``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

V, D, T, PAIRS_PER_RANK = 37, 12, 7, 2


def _model():
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D, D)

        def forward(self, x):
            return torch.tanh(self.proj(x))

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(V, D)
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.lm_head = torch.nn.Linear(D, V)

        def hidden(self, ids):
            h = self.embed(ids)
            for layer in self.layers:
                h = layer(h)
            return h

        def forward(self, ids):  # like a HF model with logits_to_keep=1: the head runs on one position
            h = self.hidden(ids)
            return h, self.lm_head(h[:, -1:])

    torch.manual_seed(0)
    return Tiny().double()


def _global_batch():
    import torch

    g = torch.Generator().manual_seed(1)
    n = 2 * PAIRS_PER_RANK  # pairs in the global batch (2 ranks)
    ids = torch.randint(0, V, (2 * n, T), generator=g)
    labels = torch.randint(0, V, (2 * n, T), generator=g)
    labels[:, :2] = -100
    ref = -torch.rand(2 * n, generator=g, dtype=torch.float64) * 10
    return ids, labels, ref


def _rank_rows(rank: int):
    """This rank's rows of the global ``[2n]`` batch: its pairs' chosen rows, then their rejected rows."""
    n = 2 * PAIRS_PER_RANK
    pairs = list(range(rank * PAIRS_PER_RANK, (rank + 1) * PAIRS_PER_RANK))
    return pairs + [n + p for p in pairs]


def _single_process():
    import vpo

    model = _model()
    ids, labels, ref = _global_batch()
    h, _ = model(ids)
    loss, _ = vpo.fused_dpo_loss(model.lm_head.weight, h, labels, model.lm_head.bias, ref_logps=ref, impl="torch")
    loss.backward()
    return model, loss.detach()


def _expect_value_error(fn, *words):
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        missing = [w for w in words if w not in msg]
        return "ok" if not missing else f"message lacks {missing}: {msg}"
    return "no ValueError"


def _worker(out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import vpo
    from vpo.distributed import unshard_head

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ref_model, ref_loss = _single_process()
    ids, labels, ref = _global_batch()
    rows = _rank_rows(rank)
    result = {}

    def sharded_model():
        model = _model()
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
        return model

    # -- the fused loss with the sharded head, as a user would call it ------------------------------------------
    model = sharded_model()
    h, _ = model(ids[rows])
    weight, bias = model.lm_head.weight, model.lm_head.bias
    result["head_is_dtensor_after_forward"] = type(weight).__name__ == "DTensor"
    loss, _ = vpo.fused_dpo_loss(weight, h, labels[rows], bias, ref_logps=ref[rows], impl="torch")
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world

    def diff(a, b):
        return float((a.detach() - b.detach()).abs().max())

    result["loss"] = diff(mean_loss, ref_loss)
    result["head_weight_grad"] = diff(model.lm_head.weight.grad.full_tensor(), ref_model.lm_head.weight.grad)
    result["head_bias_grad"] = diff(model.lm_head.bias.grad.full_tensor(), ref_model.lm_head.bias.grad)
    result["block_grad"] = diff(model.layers[0].proj.weight.grad.full_tensor(), ref_model.layers[0].proj.weight.grad)
    result["grad_placements"] = str(tuple(model.lm_head.weight.grad.placements))

    # -- torch's default: the root keeps its parameters unsharded from its forward to its backward --------------
    model = _model()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    h, _ = model(ids[rows])
    result["default_root_head_type"] = type(model.lm_head.weight).__name__  # the unsharded plain parameter
    loss, _ = vpo.fused_dpo_loss(model.lm_head.weight, h, labels[rows], model.lm_head.bias, ref_logps=ref[rows],
                                 impl="torch")
    loss.backward()  # FSDP's own reduce-scatter of the unsharded gradient
    result["default_root_head_grad"] = diff(model.lm_head.weight.grad.full_tensor(), ref_model.lm_head.weight.grad)

    # -- the naive gather: each rank keeps its own gradient (the bug this module fixes) -------------------------
    naive = sharded_model()
    h, _ = naive(ids[rows])
    loss, _ = vpo.fused_dpo_loss(naive.lm_head.weight.full_tensor(), h, labels[rows], naive.lm_head.bias.full_tensor(),
                                 ref_logps=ref[rows], impl="torch")
    loss.backward()
    result["naive_head_grad"] = diff(naive.lm_head.weight.grad.full_tensor(), ref_model.lm_head.weight.grad)

    # -- the op: linear_logprobs on a DTensor head ----------------------------------------------------------------
    torch.manual_seed(5)  # same on both ranks: a replicated computation
    w_full = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    b_full = torch.randn(V, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    y = torch.randint(0, V, (3, 5))
    w_dt = distribute_tensor(w_full.detach(), mesh, [Shard(0)]).requires_grad_()
    b_dt = distribute_tensor(b_full.detach(), mesh, [Shard(0)]).requires_grad_()
    lp, _ = vpo.linear_logprobs(x, w_dt, y, b_dt, impl="torch")
    lp_ref, _ = vpo.linear_logprobs(x, w_full, y, b_full, impl="torch")
    lp.sum().backward()
    lp_ref.sum().backward()  # every rank: the same loss -> the mean over ranks is this gradient
    result["op_value"] = diff(lp, lp_ref)
    result["op_weight_grad"] = diff(w_dt.grad.full_tensor(), w_full.grad)
    result["op_bias_grad"] = diff(b_dt.grad.full_tensor(), b_full.grad)

    # -- bad setups -------------------------------------------------------------------------------------------------
    w_d = distribute_tensor(w_full.detach(), mesh, [Shard(1)])
    result["err_shard_d"] = _expect_value_error(lambda: unshard_head(w_d, None), "weight", "Shard(0)")
    b_rep = distribute_tensor(b_full.detach(), mesh, [Replicate()])
    result["err_placements"] = _expect_value_error(lambda: unshard_head(w_dt, b_rep), "bias", "placements")
    result["err_plain_weight"] = _expect_value_error(lambda: unshard_head(w_full, b_dt), "bias", "weight")
    result["err_plain_bias"] = _expect_value_error(lambda: unshard_head(w_dt, b_full), "bias", "plain")
    tp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    w_tp = distribute_tensor(w_full.detach(), tp_mesh, [Shard(0)])
    result["err_tp"] = _expect_value_error(lambda: unshard_head(w_tp, None), "tensor-parallel", "FSDP2")
    rep = distribute_tensor(w_full.detach(), mesh, [Replicate()])
    result["replicate_passthrough"] = type(unshard_head(rep, None)[0]).__name__ == "Tensor"

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()  # both ranks done before either tears gloo down (an early teardown can abort the other rank)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script: str, out_dir, timeout: int = 180) -> list:
    """``torch.distributed.run --nproc_per_node 2`` of ``script OUT`` on gloo/CPU; each rank's ``rank{r}.json``."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), script, str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    out = []
    for rank in (0, 1):
        path = os.path.join(str(out_dir), f"rank{rank}.json")
        assert os.path.isfile(path), f"rank {rank} did not finish:\n{proc.stderr[-4000:]}"
        with open(path) as f:
            out.append(json.load(f))
    return out


def test_fsdp2_fused_dpo_and_ops_match_single_process(tmp_path):
    tol = 1e-10
    for rank, r in enumerate(run_two_ranks(os.path.abspath(__file__), tmp_path)):
        assert r["head_is_dtensor_after_forward"], r
        assert r["default_root_head_type"] == "Parameter", r["default_root_head_type"]
        for key in ("loss", "head_weight_grad", "head_bias_grad", "block_grad", "op_value", "op_weight_grad",
                    "op_bias_grad", "default_root_head_grad"):
            assert r[key] < tol, (rank, key, r[key])
        assert r["grad_placements"] == "(Shard(dim=0),)", r["grad_placements"]
        assert r["naive_head_grad"] > 1e-4, "the naive full_tensor() gather gave the right gradient: test is blind"
        for key in ("err_shard_d", "err_placements", "err_plain_weight", "err_plain_bias", "err_tp"):
            assert r[key] == "ok", (rank, key, r[key])
        assert r["replicate_passthrough"]


def test_plain_head_passes_through_and_partitioned_params_are_refused():
    import torch

    from vpo.distributed import unshard_head

    w, b = torch.randn(5, 3), torch.randn(5)
    assert unshard_head(w, b)[0] is w and unshard_head(w, b)[1] is b

    flat = torch.nn.Parameter(torch.randn(15))
    flat._is_flat_param = True  # what FSDP1's FlatParameter carries
    with pytest.raises(ValueError, match="FSDP1.*FSDP2"):
        unshard_head(flat)

    class _Status:
        name = "NOT_AVAILABLE"

    zero3 = torch.nn.Parameter(torch.empty(0))
    zero3.ds_id, zero3.ds_status, zero3.ds_shape = 3, _Status(), (5, 3)  # a partitioned ZeRO-3 parameter's fields
    with pytest.raises(ValueError, match="ZeRO-3.*zero3_head_gathered"):
        unshard_head(zero3)


if __name__ == "__main__":
    _worker(sys.argv[1])
