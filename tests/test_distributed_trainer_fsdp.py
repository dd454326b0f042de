"""``VPOTrainer`` under FSDP2 through accelerate (``fsdp_config={"version": 2}``), 2 gloo ranks on CPU, against one
process on the same global batch.

A tiny LLaVA (float32, dropout off) trains 3 steps of DPO with 2 pairs per rank (the single process: 4 pairs per
step, the same records in the same order); two setups:

- full fine-tuning, the reference a frozen copy sharded like the policy (``ref_mode: model``);
- LoRA on the language model, the reference the adapter-disabled policy.

Checked: the logged loss of every step equals the single-process run's (abs 1e-5: float32 reductions in another
order); the loss moves between steps (the optimizer sees the gathered head's reduced gradient — a wrong head
gradient shows up from step 2); both ranks log the same numbers. The head is an FSDP2 DTensor during the steps
(``fully_shard`` wraps the decoder layers and the root).

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node 2 THIS_FILE OUT_DIR``.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

SETUPS = {"full": dict(use_lora=False, ref_mode="model"), "lora": dict(use_lora=True, ref_mode="adapter")}
STEPS, PAIRS_PER_RANK = 3, 2


def _run(out_dir: str, setup: str, *, world: int, backend: str = "fsdp2", method: str = "dpo", **overrides) -> dict:
    """One training run; ``backend``: ``fsdp2``, ``zero2`` or ``zero3`` (``tests/test_distributed_trainer_deepspeed.py``)
    when ``world`` > 1."""
    import torch
    from transformers import TrainerCallback

    from vpo.models import tiny_llava
    from vpo.trainer import VPOConfig, VPOTrainer
    from vpo.trainer.modeling import lm_head
    from vpo.trainer.synthetic import TinyPreferenceCollator, synthetic_records

    if backend.startswith("zero"):  # the previous run's config would build this tiny model under zero.Init
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    tiny = tiny_llava()
    kw = dict(output_dir=os.path.join(out_dir, setup), method=method, use_cpu=world == 1, max_steps=STEPS,
              per_device_train_batch_size=PAIRS_PER_RANK * (2 // world), logging_steps=1, save_strategy="no",
              report_to="none", disable_tqdm=True, lora_dropout=0.0, lora_r=4, learning_rate=5e-2, seed=0,
              data_seed=0, loss_impl="torch", **SETUPS[setup])
    if world > 1 and backend == "fsdp2":
        layer = type(tiny.model.model.language_model.layers[0]).__name__
        kw.update(use_cpu=True, ddp_backend="gloo", fsdp=True,
                  fsdp_config={"version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": [layer]})
    elif world > 1:
        kw.update(deepspeed={"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                             "train_batch_size": "auto", "zero_allow_untested_optimizer": True,
                             "zero_optimization": {"stage": int(backend[-1]), "stage3_param_persistence_threshold": 0}})
    kw.update(overrides)
    trainer = VPOTrainer(tiny.model, VPOConfig(**kw), train_dataset=synthetic_records(16, tiny),
                         data_collator=TinyPreferenceCollator(tiny, method))
    seen_heads = []

    class HeadType(TrainerCallback):  # what the fused losses get as lm_head.weight at each step
        def on_step_begin(self, args, state, control, **kwargs):
            seen_heads.append(type(lm_head(trainer.model)[0]).__name__)

    trainer.add_callback(HeadType())
    trainer.train()
    logs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": logs, "head_types": seen_heads, "world_size": trainer.args.world_size,
            "torch_threads": torch.get_num_threads()}


def _accelerate_fsdp_on_cpu() -> None:
    """Test shim: accelerate turns its FSDP plugin on only for accelerator devices (``MULTI_GPU`` & co.), never for
    ``MULTI_CPU``; after it has built its state on CPU with an FSDP plugin, mark the state FSDP as it would on GPUs.
    Everything after that (``fully_shard`` of the layers and the root, FSDP2's optimizer/grad-norm/clipping paths,
    the Trainer's ``is_fsdp_enabled``) is accelerate's and transformers' own code."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched


def _worker(out_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    _accelerate_fsdp_on_cpu()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    methods = ["dpo"]
    if os.path.isfile(os.path.join(out_dir, "methods")):
        with open(os.path.join(out_dir, "methods")) as f:
            methods = f.read().split()
    result = {setup if method == "dpo" else f"{method}/{setup}":
              _run(os.path.join(out_dir, method), setup, world=world, method=method)
              for method in methods for setup in SETUPS}
    with open(os.path.join(out_dir, f"rank{rank}.json" if world > 1 else "single.json"), "w") as f:
        json.dump(result, f)


def _compare(tmp_path, keys, *, blind_check: bool = True) -> None:
    import torch

    from test_distributed_fsdp import run_two_ranks

    ranks = run_two_ranks(os.path.abspath(__file__), tmp_path, timeout=600)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the single process: in this one
        single = {}
        for key in keys:
            method, _, setup = key.rpartition("/")
            single[key] = _run(str(tmp_path / "single" / (method or "dpo")), setup, world=1, method=method or "dpo")
    finally:
        torch.set_num_threads(threads)
    for key in keys:
        r0, r1, one = ranks[0][key], ranks[1][key], single[key]
        assert r0["world_size"] == 2 and one["world_size"] == 1
        assert set(r0["head_types"]) == {"DTensor"}, r0["head_types"]  # the head is sharded during the steps
        assert len(r0["losses"]) == len(one["losses"]) == STEPS
        assert r0["losses"] == r1["losses"]
        assert r0["losses"] == pytest.approx(one["losses"], abs=1e-5), (key, r0["losses"], one["losses"])
        if blind_check:
            assert abs(one["losses"][-1] - one["losses"][0]) > 1e-3, "the loss did not move: the test is blind"


def test_vpo_trainer_fsdp2_matches_single_process(tmp_path):
    _compare(tmp_path, list(SETUPS))


ALL_METHODS = ("tpo", "catpo", "ovip", "lpoi", "mdpo", "csr")


@pytest.mark.skipif(not os.environ.get("VPO_TEST_ALL_METHODS"), reason="~75 s more on 2 cores: set VPO_TEST_ALL_METHODS=1")
def test_every_method_under_fsdp2_matches_single_process(tmp_path):
    """The other six methods, full fine-tuning and LoRA, 3 steps each (run: all equal, max |Δ| 4.8e-7)."""
    (tmp_path / "methods").write_text(" ".join(ALL_METHODS))
    _compare(tmp_path, [f"{m}/{s}" for m in ALL_METHODS for s in SETUPS], blind_check=False)


if __name__ == "__main__":
    _worker(sys.argv[1])
    from vpo.testing import end_process_group

    end_process_group()  # every rank done before gloo is torn down
