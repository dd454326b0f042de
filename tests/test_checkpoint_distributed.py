"""Atomic checkpoints and exact resume under DDP: ``torchrun --nproc_per_node 2`` with gloo on CPU.

Both ranks write their parts (``rng_state_<rank>.pth``, ``vpo_state_<rank>.json``) into the staging folder, the main
process publishes it after a barrier, and the others wait at a second barrier. Each rank then resumes from
checkpoint-1 and must reproduce steps 2-3 of the uninterrupted run (TPO with per-call noise).

This file is also the worker: ``python -m torch.distributed.run ... test_checkpoint_distributed.py OUT_DIR``.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from vpo.testing import torchrun


def _worker(out_dir: str) -> None:
    import torch

    from vpo.models import tiny_llava
    from vpo.trainer import VPOConfig, VPOTrainer
    from vpo.trainer.synthetic import TinyPreferenceCollator, synthetic_records

    torch.set_num_threads(1)
    result = {}
    for name, resume in (("full", None), ("resumed", os.path.join(out_dir, "run", "checkpoint-1"))):
        tiny = tiny_llava()
        args = VPOConfig(output_dir=os.path.join(out_dir, "run"), method="tpo", use_cpu=True, ddp_backend="gloo",
                         max_steps=3, per_device_train_batch_size=2, logging_steps=1, save_strategy="steps",
                         save_steps=1, report_to="none", disable_tqdm=True, lora_dropout=0.0, lora_r=4,
                         learning_rate=5e-2, seed=0, data_seed=0)
        trainer = VPOTrainer(tiny.model, args, train_dataset=synthetic_records(12, tiny),
                             data_collator=TinyPreferenceCollator(tiny, "tpo", fixed_noise=False))
        trainer.train(resume_from_checkpoint=resume)
        result[name] = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)



def test_ddp_checkpoints_are_published_once_complete_and_resume_exactly(tmp_path):
    import torch.distributed as dist

    from vpo.trainer.checkpoint import checkpoint_problem

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    proc = torchrun(__file__, str(tmp_path), timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    run = tmp_path / "run"
    assert not [n for n in os.listdir(run) if n.startswith(".staging-")]
    for step in (1, 2, 3):
        ckpt = run / f"checkpoint-{step}"
        assert checkpoint_problem(str(ckpt)) is None
        assert {"rng_state_0.pth", "rng_state_1.pth", "vpo_state_0.json", "vpo_state_1.json"} <= set(os.listdir(ckpt))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        full, resumed = result["full"], result["resumed"]
        assert sorted(full) == ["1", "2", "3"] and all(resumed[s] == full[s] for s in ("2", "3")), (full, resumed)
    assert ranks[0] == ranks[1]  # the logged loss is the mean over both ranks


if __name__ == "__main__":
    _worker(sys.argv[1])
    from vpo.testing import end_process_group

    end_process_group()  # every rank done before gloo is torn down
