"""``VPOTrainer`` under accelerate + DeepSpeed ZeRO-2 and ZeRO-3 on 2 gloo ranks (CPU), against one process on the same
global batch: the same runs as ``tests/test_distributed_trainer_fsdp.py`` (DPO, full fine-tuning with a frozen
reference copy, which ZeRO-3 partitions as an inference engine, and LoRA with the adapter-disabled reference), 3
steps; the loss curves equal the single-process ones (abs 1e-5).

Needs ``deepspeed`` (skipped otherwise; on CPU: ``DS_ACCELERATOR=cpu``, DeepSpeed 0.19.8 ran it). Test shim:
accelerate picks no process-group backend for DeepSpeed on a machine without an accelerator device (its
``_prepare_backend`` returns None: "no distributed training"); the worker makes it answer gloo. The rest —
``deepspeed.initialize`` of the policy and the reference, ZeRO's partitioning and gradient hooks, the Trainer's
DeepSpeed paths — is DeepSpeed's, accelerate's and transformers' own. Without vpo's ZeRO-3 head gather the run stops at
the first fused loss with "weight is a DeepSpeed ZeRO-3 parameter partitioned away".

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node 2 THIS_FILE OUT_DIR``.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("deepspeed")
BACKENDS = ("zero2", "zero3")


def _accelerate_gloo_for_deepspeed() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    prepare = PartialState._prepare_backend

    def patched(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, kind = prepare(self, cpu, sagemaker_dp, backend)
        if chosen is None and not cpu:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    PartialState._prepare_backend = patched


def _worker(out_dir: str) -> None:
    import torch

    from test_distributed_trainer_fsdp import SETUPS, _run

    torch.set_num_threads(1)
    _accelerate_gloo_for_deepspeed()
    rank = int(os.environ["RANK"])
    with open(os.path.join(out_dir, "backend")) as f:
        backend = f.read().strip()
    result = {setup: _run(os.path.join(out_dir, backend), setup, world=2, backend=backend) for setup in SETUPS}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    import subprocess

    out = tmp_path_factory.mktemp("single")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_distributed_trainer_fsdp.py")
    proc = subprocess.run([sys.executable, script, str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((out / "single.json").read_text())


@pytest.mark.parametrize("backend", BACKENDS)
def test_vpo_trainer_deepspeed_matches_single_process(tmp_path, backend, single):
    from test_distributed_fsdp import run_two_ranks
    from test_distributed_trainer_fsdp import SETUPS, STEPS

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    (tmp_path / "backend").write_text(backend)
    r0, r1 = run_two_ranks(os.path.abspath(__file__), tmp_path, timeout=300)
    for setup in SETUPS:
        assert r0[setup]["world_size"] == 2 and len(r0[setup]["losses"]) == STEPS
        assert r0[setup]["losses"] == r1[setup]["losses"]
        assert r0[setup]["losses"] == pytest.approx(single[setup]["losses"], abs=1e-5), (backend, setup)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _worker(sys.argv[1])
    from vpo.testing import end_process_group

    end_process_group()  # every rank done before gloo is torn down
