"""Online OViP on 2 gloo ranks (DDP, CPU) where rank 1 never finds a pair: it no longer raises, it trains on
placeholder records with zero loss and joins every all-reduce.

Rank 0's scripted sampler returns the ground truth and a wrong caption (one fallback pair per prompt); rank 1's
returns only wrong captions with the ground-truth fallback off (no pair, ever). Checked: both ranks finish 2 steps;
rank 1's batches were placeholders (``online/placeholder_pairs``); the LoRA weights moved and are bit-identical on
both ranks (the gradients were all-reduced: rank 1 ran the same forward/backward collectives); and rank 0's
per-rank training loss is finite while rank 1's is exactly 0 (``per_rank_loss``).

Also, in one process: the dataset with ``idle_when_empty`` yields placeholders where it used to raise, and
:func:`vpo.trainer.distributed.placeholder_batch` recognises them.

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node 2 THIS_FILE OUT_DIR``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import pytest


def _world(root: str):
    from vpo.worlds import shapes

    data = os.path.join(root, "shapes")
    if not os.path.isdir(data):
        shapes.make_dataset(data, 4, seed=0)
    return os.path.join(data, "train.jsonl")


def _worker(out_dir: str) -> None:
    import torch

    from vpo.construct.csr import load_policy
    from vpo.data import PreferenceCollator
    from vpo.online import OViPOnlineDataset, ShapesNegativeGenerator, ShapesWorldJudge, load_prompt_rows
    from vpo.trainer import VPOConfig, VPOTrainer

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    data = os.path.join(out_dir, "shapes", "train.jsonl")
    model, processor = load_policy("tiny:llava")
    rows = load_prompt_rows(data)[rank::2]

    def sample_fn(prompts, images, *, k, seed, keys):
        if rank == 0:  # the ground truth twice, a wrong caption twice: one fallback pair per prompt
            return [[rows[i]["_ground_truth"]] * 2 + ["nothing.", "nothing."] for i in keys]
        return [["nothing."] * 4 for _ in prompts]  # never a pair (no ground-truth fallback below)

    args = VPOConfig(output_dir=os.path.join(out_dir, "run"), method="ovip", online=True, data_path=data,
                     max_steps=2, per_device_train_batch_size=2, use_cpu=True, report_to="none", lora_r=4,
                     lora_dropout=0.0, logging_steps=1, save_strategy="no", disable_tqdm=True, ddp_backend="gloo",
                     learning_rate=5e-2, seed=0)
    ds = OViPOnlineDataset(rows, processor, judge=ShapesWorldJudge(), negatives=ShapesNegativeGenerator(),
                           buffer_size=2, prompts_per_step=2, sample_fn=sample_fn, k=4,
                           ground_truth_fallback=rank == 0)
    trainer = VPOTrainer(model, args, train_dataset=ds,
                         data_collator=PreferenceCollator(processor, "llava", method="ovip"))
    losses = []
    compute_loss = trainer.compute_loss

    def recording(*a, **kw):
        loss = compute_loss(*a, **kw)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    digest = hashlib.sha256()
    moved = False
    for name, p in sorted(trainer.model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().contiguous().numpy().tobytes())
            moved = moved or not torch.equal(before[name], p.detach())
    result = {"logs": [h for h in trainer.state.log_history if "loss" in h], "params_sha256": digest.hexdigest(),
              "moved": moved, "per_rank_loss": losses, "idle_when_empty": ds.idle_when_empty}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_rank_without_pairs_steps_with_zero_loss(tmp_path):
    from test_distributed_fsdp import run_two_ranks

    _world(str(tmp_path))
    r0, r1 = run_two_ranks(os.path.abspath(__file__), tmp_path, timeout=240)
    assert r0["idle_when_empty"] and r1["idle_when_empty"]
    assert len(r0["logs"]) == len(r1["logs"]) == 2 and r0["logs"] == r1["logs"]
    assert len(r0["per_rank_loss"]) == len(r1["per_rank_loss"]) == 2
    assert all(math.isfinite(v) and v > 0 for v in r0["per_rank_loss"]), r0["per_rank_loss"]
    assert r1["per_rank_loss"] == [0.0, 0.0]
    assert all(h["online/placeholder_pairs"] > 0 for h in r0["logs"])  # averaged over the ranks: rank 1's
    assert r0["moved"] and r0["params_sha256"] == r1["params_sha256"], "the ranks diverged: gradients not all-reduced"


def test_placeholders_in_one_process(tmp_path):
    from vpo.online import OViPOnlineDataset, ShapesNegativeGenerator, ShapesWorldJudge, load_prompt_rows
    from vpo.online.ovip import NO_PAIR_PREFIX
    from vpo.trainer.distributed import placeholder_batch

    rows = load_prompt_rows(_world(str(tmp_path)))
    kw = dict(judge=ShapesWorldJudge(), negatives=ShapesNegativeGenerator(), buffer_size=3, prompts_per_step=2,
              sample_fn=lambda p, i, **_: [["nothing."]] * len(p), k=2, ground_truth_fallback=False)
    with pytest.raises(RuntimeError, match="produced no OViP pair"):
        next(iter(OViPOnlineDataset(rows, None, **kw)))
    ds = OViPOnlineDataset(rows, None, **kw)
    ds.idle_when_empty = True
    it = iter(ds)
    batch = [next(it) for _ in range(3)]
    assert all(r.id.startswith(NO_PAIR_PREFIX) and r.neg_image is not None for r in batch)
    assert ds.pop_metrics()["online/placeholder_pairs"] == 3
    assert placeholder_batch({"ids": [r.id for r in batch]})
    assert not placeholder_batch({"ids": [batch[0].id, "real-1"]}) and not placeholder_batch({})


if __name__ == "__main__":
    _worker(sys.argv[1])
    from vpo.testing import end_process_group

    end_process_group()  # every rank done before gloo is torn down
