"""Nothing trains on nothing (issue 20): a batch without a scored token is skipped and counted, a dataset whose
records give none stops before training, and under DDP the ranks agree to skip (gloo, 2 CPU ranks).

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


# ------------------------------------------------------------------------------------------------------------- DDP
def _worker(out_dir: str) -> None:
    import torch

    from vpo.models import tiny_llava
    from vpo.trainer import VPOTrainer
    from vpo.trainer.synthetic import TinyPreferenceCollator, synthetic_records

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    tiny = tiny_llava()
    # rank 1's first batch has no scored token: both ranks must skip that step, then train the second together
    collate = _blanking(TinyPreferenceCollator(tiny, "dpo"), {0} if rank == 1 else set())
    trainer = VPOTrainer(tiny.model, _args(os.path.join(out_dir, "run"), ddp_backend="gloo"),
                         train_dataset=synthetic_records(16, tiny), data_collator=collate)
    before = _lora_digest(trainer.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    result = {"logs": [h for h in trainer.state.log_history if "loss" in h], "before": before,
              "after": _lora_digest(trainer.model), "world_size": trainer.args.world_size}
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


if __name__ == "__main__":
    _worker(sys.argv[1])
    from vpo.testing import end_process_group

    end_process_group()  # every rank done before gloo is torn down
