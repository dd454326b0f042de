"""Nothing trains on nothing (issue 20): a batch without a scored token is skipped and counted, a dataset whose
records give none stops before training, evaluation leaves such batches out of its means (and raises when none is
usable), and under DDP the ranks agree to skip, in training and in evaluation (gloo, 2 CPU ranks).

This file is also the DDP worker: ``python -m torch.distributed.run ... test_unusable_batches.py OUT_DIR``."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import pytest

from vpo.testing import torchrun


def _blanking(collator, blank_calls):
    """``collator`` whose calls numbered in ``blank_calls`` (0-based) return labels all -100 (what a processor's own
    labels did to PaliGemma's rows)."""
    calls = []

    def collate(records):
        batch = collator(records)
        if len(calls) in blank_calls:
            batch["labels"].fill_(-100)
        calls.append(len(records))
        return batch

    return collate


def _args(out, **kw):
    from vpo.trainer import VPOConfig

    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, logging_steps=1, save_strategy="no",
                report_to="none", disable_tqdm=True, lora_dropout=0.0, lora_r=4, learning_rate=5e-2, use_cpu=True,
                seed=0, data_seed=0)
    base.update(kw)
    return VPOConfig(**base)


def _lora_digest(model) -> str:  # noqa: D103
    digest = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        digest.update(name.encode())
        digest.update(p.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_a_batch_without_scored_tokens_is_skipped_and_counted(tmp_path):
    """One process: the unusable batch is dropped and the next one drawn (no phantom step), and counted."""
    import json as _json

    from vpo.models import tiny_llava
    from vpo.trainer import VPOTrainer
    from vpo.trainer.synthetic import TinyPreferenceCollator, synthetic_records

    tiny = tiny_llava()
    seen = []
    blank = _blanking(TinyPreferenceCollator(tiny, "dpo"), {0})

    def collate(records):
        seen.append([r["id"] for r in records])
        return blank(records)

    trainer = VPOTrainer(tiny.model, _args(tmp_path), train_dataset=synthetic_records(8, tiny), data_collator=collate)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(logs) == 2 and len(seen) >= 3  # 3 batches drawn for 2 steps
    assert all(h["loss"] > 0 and "rewards/accuracies" in h for h in logs)  # both steps trained on real pairs
    assert logs[0]["data/skipped_no_scored_token"] == 2.0  # the first batch's 2 pairs
    assert "data/skipped_no_scored_token" not in logs[1]
    totals = _json.loads((tmp_path / "skipped.json").read_text())
    assert "no_scored_token" in _json.dumps(totals)


def test_a_dataset_without_scored_tokens_stops_before_training(tmp_path):
    from PIL import Image

    from vpo.data import PreferenceCollator
    from vpo.models.tiny_zoo import tiny_architecture
    from vpo.trainer import VPOTrainer
    from vpo.trainer.preflight import PreflightError

    model, proc = tiny_architecture("paligemma")

    class Overwriting(PreferenceCollator):  # the processor's prompt-only labels overwrite the row's (issue 20)
        def __call__(self, records):
            batch = super().__call__(records)
            if "labels" in batch:
                batch["labels"].fill_(-100)
            return batch

    rows = [{"id": f"r{i}", "images": [Image.new("RGB", (16, 16), "red")], "prompt": "what color ?",
             "chosen": "red .", "rejected": "blue ."} for i in range(4)]
    import datasets

    trainer = VPOTrainer(model, _args(tmp_path), train_dataset=datasets.Dataset.from_list(rows),
                         data_collator=Overwriting(proc, "generic"))
    with pytest.raises(PreflightError, match="^paligemma: none of the first 4 training records gives a scored token: "
                                             "their labels hold no response token"):
        trainer.train()
    assert trainer.state.global_step == 0


def _blanking_ids(collator, blank_ids):
    """``collator`` whose batches holding a record id in ``blank_ids`` come back with labels all -100 (no scored
    token); rank- and call-order-independent, for evaluation."""

    def collate(records):
        batch = collator(records)
        if any(r["id"] in blank_ids for r in records):
            batch["labels"].fill_(-100)
        return batch

    return collate


_TIMING = ("runtime", "samples_per_second", "steps_per_second")


def test_eval_excludes_a_batch_without_scored_tokens(tmp_path):
    """An eval batch with no scored token adds nothing to the eval loss or any metric mean, and is counted: the eval
    set with it gives what the eval set without it gives."""
    from vpo.models import tiny_llava
    from vpo.trainer import VPOTrainer
    from vpo.trainer.synthetic import TinyPreferenceCollator, synthetic_records

    tiny = tiny_llava()
    records = synthetic_records(6, tiny)
    blank = {records[2]["id"]}  # the second batch of 2: (records 2, 3)
    collate = _blanking_ids(TinyPreferenceCollator(tiny, "dpo"), blank)
    trainer = VPOTrainer(tiny.model, _args(tmp_path, per_device_eval_batch_size=2), train_dataset=records[:2],
                         data_collator=collate)
    sys.path.insert(0, os.path.dirname(__file__))
    from test_trainer import perturb_lora

    perturb_lora(trainer.model)  # LoRA B starts at 0 (every pair's loss log 2): make the batches' losses differ
    with_blank = trainer.evaluate(records)
    without = trainer.evaluate(records[:2] + records[4:])
    assert with_blank["eval_skipped_batches"] == 1.0 and without["eval_skipped_batches"] == 0.0
    assert with_blank["eval_data/skipped_no_scored_token"] == 2.0  # the batch's 2 pairs, counted as skipped
    assert with_blank["eval_loss"] > 0
    assert with_blank["eval_loss"] == without["eval_loss"]
    same = {k: v for k, v in with_blank.items()
            if not k.endswith(_TIMING) and k not in ("eval_skipped_batches", "eval_data/skipped_no_scored_token")}
    assert "eval_rewards/accuracies" in same and "eval_logps/chosen" in same
    assert same == {k: v for k, v in without.items() if k in same} and set(same) <= set(without)


def test_eval_with_no_usable_batch_raises(tmp_path):
    """Every eval batch unusable (no scored token, or every record skipped): a ValueError, never a loss from nothing;
    nothing from it is left to leak into the next log."""
    from vpo.models import tiny_llava
    from vpo.trainer import VPOTrainer
    from vpo.trainer.synthetic import TinyPreferenceCollator, synthetic_records

    tiny = tiny_llava()
    records = synthetic_records(4, tiny, bad=(2, 3))  # records 2, 3: empty rejected responses, skipped by the collator
    collate = _blanking_ids(TinyPreferenceCollator(tiny, "dpo"), {records[0]["id"]})
    trainer = VPOTrainer(tiny.model, _args(tmp_path, per_device_eval_batch_size=2), train_dataset=records[:2],
                         data_collator=collate)
    with pytest.raises(ValueError, match=r"^eval_dataset: no evaluation batch has a scored token: all 2 batches were "
                                         r"skipped \(records skipped: "):
        trainer.evaluate(records)
    assert not trainer._stored_metrics.get("eval") and not trainer._skipped.get("eval")
    metrics = trainer.evaluate(synthetic_records(2, tiny, seed=5, prefix="ok"))
    assert metrics["eval_loss"] > 0 and metrics["eval_skipped_batches"] == 0.0
    assert not any(k.startswith("eval_data/skipped") for k in metrics)  # the failed evaluation's counts are gone


# ------------------------------------------------------------------------------------------------------------- DDP
def _worker(out_dir: str) -> None:
    import torch

    from vpo.models import tiny_llava
    from vpo.trainer import VPOTrainer
    from vpo.trainer.synthetic import TinyPreferenceCollator, synthetic_records

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    tiny = tiny_llava()
    # rank 1's first batch has no scored token: both ranks must skip that step, then train the second together.
    # Evaluation: the batches holding ev-2 (ev-2, ev-3) and bad-0 / bad-2 (every bad-* batch) have no scored token.
    collate = _blanking_ids(_blanking(TinyPreferenceCollator(tiny, "dpo"), {0} if rank == 1 else set()),
                            {"ev-2", "bad-0", "bad-2"})
    args = _args(os.path.join(out_dir, "run"), ddp_backend="gloo", per_device_eval_batch_size=2)
    trainer = VPOTrainer(tiny.model, args, train_dataset=synthetic_records(16, tiny), data_collator=collate)
    before = _lora_digest(trainer.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    result = {"logs": [h for h in trainer.state.log_history if "loss" in h], "before": before,
              "after": _lora_digest(trainer.model), "world_size": trainer.args.world_size}
    # 4 eval batches of 2, 2 ranks: step 1 is (ev-0 ev-1 | ev-2 ev-3), the second unusable, so both ranks leave the
    # step out; step 2 is exactly the eval of ev-4..ev-7 alone.
    drop = lambda m: {k: v for k, v in m.items() if not k.endswith(_TIMING)}  # noqa: E731
    records = synthetic_records(8, tiny, seed=3, prefix="ev")
    result["eval"] = drop(trainer.evaluate(records))
    result["eval_without"] = drop(trainer.evaluate(records[4:]))
    try:
        trainer.evaluate(synthetic_records(4, tiny, prefix="bad"))
        result["all_unusable"] = None
    except ValueError as e:
        result["all_unusable"] = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)



def test_ddp_ranks_agree_to_skip_an_unusable_batch(tmp_path):
    pytest.importorskip("torch.distributed.run")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    proc = torchrun(__file__, str(tmp_path), timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["logs"] == r1["logs"] and len(r0["logs"]) == 2
    first, second = r0["logs"]
    assert first["loss"] == 0.0 and first["data/skipped_no_scored_token"] == 2.0  # rank 1's 2 pairs
    assert second["loss"] > 0 and "rewards/accuracies" in second
    assert r0["after"] == r1["after"] != r0["before"]  # trained, in step on both ranks
    # evaluation: the ranks agree to leave out the step with an unusable batch (both ranks' batches: 2 counted)
    assert r0["eval"] == r1["eval"] and r0["eval"]["eval_skipped_batches"] == 2.0
    assert r0["eval"]["eval_data/skipped_no_scored_token"] == 2.0
    counts = ("eval_skipped_batches", "eval_data/skipped_no_scored_token")
    same = {k: v for k, v in r0["eval"].items() if k not in counts}
    assert same["eval_loss"] > 0 and "eval_rewards/accuracies" in same
    assert same == {k: v for k, v in r0["eval_without"].items() if k in same}
    assert r0["eval_without"]["eval_skipped_batches"] == 0.0
    # every batch unusable: both ranks raise (no rank left waiting in a collective)
    assert r0["all_unusable"] == r1["all_unusable"]
    assert r0["all_unusable"].startswith("eval_dataset: no evaluation batch has a scored token: all 2 batches")


if __name__ == "__main__":
    _worker(sys.argv[1])
    from vpo.testing import end_process_group

    end_process_group()  # every rank done before gloo is torn down
