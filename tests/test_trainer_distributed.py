"""VPOTrainer under DDP: ``torchrun --nproc_per_node 2`` with the gloo backend on CPU.

Each rank trains 2 steps of DPO (one policy forward per step) and then of TPO (two policy forwards per step) on a
tiny LLaVA, on its own shard of the data. The test checks that both ranks finish, that they saw different records,
that the logged loss and metrics are finite and identical across ranks (the Trainer and ``VPOTrainer.log`` average
over processes), and that the LoRA weights are bit-identical across ranks after the steps: gradients were all-reduced,
which only happens when the forward goes through ``DistributedDataParallel.forward``.

This file is also the worker: ``python -m torch.distributed.run ... test_trainer_distributed.py OUT_DIR``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import pytest

from vpo.testing import torchrun

METHODS = ("dpo", "tpo")


def _worker(out_dir: str) -> None:
    import torch

    from vpo.models import tiny_llava
    from vpo.trainer import VPOConfig, VPOTrainer
    from vpo.trainer.synthetic import TinyPreferenceCollator, synthetic_records

    torch.set_num_threads(1)
    result = {}
    for method in METHODS:
        tiny = tiny_llava()
        args = VPOConfig(output_dir=os.path.join(out_dir, method), method=method, use_cpu=True, ddp_backend="gloo",
                         max_steps=2, per_device_train_batch_size=2, logging_steps=1, save_strategy="no",
                         report_to="none", disable_tqdm=True, lora_dropout=0.0, lora_r=4, learning_rate=5e-2,
                         seed=0, data_seed=0)
        collator = TinyPreferenceCollator(tiny, method)
        seen = []

        def collate(records, collator=collator, seen=seen):
            seen.extend(r["id"] for r in records)
            return collator(records)

        trainer = VPOTrainer(tiny.model, args, train_dataset=synthetic_records(16, tiny), data_collator=collate)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        params = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
        digest = hashlib.sha256()
        for name in sorted(params):
            digest.update(name.encode())
            digest.update(params[name].contiguous().numpy().tobytes())
        result[method] = {
            "logs": [h for h in trainer.state.log_history if "loss" in h],
            "seen": seen,
            "params_sha256": digest.hexdigest(),
            "params_moved": any(not torch.equal(before[n], params[n]) for n in params),
            "world_size": trainer.args.world_size,
        }
    rank = int(os.environ["RANK"])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)



def test_ddp_two_processes_gloo(tmp_path):
    pytest.importorskip("torch.distributed.run")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    start = time.perf_counter()
    proc = torchrun(__file__, str(tmp_path), timeout=240)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"torchrun failed ({elapsed:.0f}s):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    ranks = []
    for rank in (0, 1):
        path = tmp_path / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} did not finish:\n{proc.stderr[-4000:]}"
        ranks.append(json.loads(path.read_text()))
    for method in METHODS:
        r0, r1 = ranks[0][method], ranks[1][method]
        assert r0["world_size"] == r1["world_size"] == 2
        assert len(r0["logs"]) == len(r1["logs"]) == 2
        assert not set(r0["seen"]) & set(r1["seen"]), "both ranks trained on the same records"
        for h0, h1 in zip(r0["logs"], r1["logs"]):
            assert h0["loss"] == h1["loss"] and h0["loss"] == h0["loss"] and abs(h0["loss"]) < float("inf")
            assert h0 == h1, (h0, h1)  # every metric averaged over both ranks
        assert r0["params_moved"] and r0["params_sha256"] == r1["params_sha256"], (
            f"{method}: the LoRA weights differ across ranks: gradients were not all-reduced")


if __name__ == "__main__":
    _worker(sys.argv[1])
    from vpo.testing import end_process_group

    end_process_group()  # every rank done before gloo is torn down
