"""Resuming reproduces the uninterrupted run exactly (DPO, TPO with fixed and per-call noise, online OViP with its
buffer), and batches with no usable record are never training steps (vpo.trainer.resume)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import _losses, make_trainer  # noqa: E402

from vpo.trainer.synthetic import TinyPreferenceCollator  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


COMMON = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=5e-2)


def _grad_norms(trainer):
    return {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "loss" in h}


@pytest.mark.parametrize("method,fixed_noise", [("dpo", True), ("tpo", True), ("tpo", False)])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, method, fixed_noise):
    """6 records, batch 2: step 4 is in the second epoch (a new shuffle). TPO's per-call noise (fixed_noise=False)
    is seeded by the collator's call counter, which the resumed run restarts where the interrupted one was."""
    kw = dict(method=method, n=6, collator_kwargs=dict(fixed_noise=fixed_noise), **COMMON)
    full, *_ = make_trainer(tmp_path, **kw)
    full.train()
    reference, ref_norms = _losses(full), _grad_norms(full)
    assert sorted(reference) == [1, 2, 3, 4]
    resumed, *_ = make_trainer(tmp_path, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    after, norms = _losses(resumed), _grad_norms(resumed)
    assert sorted(after) == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's log history
    for step in (3, 4):  # bit-exact: same data, same noise, same weights
        assert after[step] == reference[step] and norms[step] == ref_norms[step], (step, after, reference)


def test_tpo_per_call_noise_differs_between_calls_and_ignores_the_global_rng():
    from vpo.models import tiny_llava
    from vpo.trainer.synthetic import synthetic_records

    tiny = tiny_llava()
    records = synthetic_records(2, tiny)
    collator = TinyPreferenceCollator(tiny, "tpo", fixed_noise=False)
    a = collator(records)["sub"]["noised"]["pixel_values"]
    torch.manual_seed(123)  # the global RNG plays no part
    b = collator(records)["sub"]["noised"]["pixel_values"]
    collator.draw = 0
    torch.manual_seed(456)
    assert not torch.equal(a, b) and torch.equal(collator(records)["sub"]["noised"]["pixel_values"], a)


class _EmptyOnDraws(TinyPreferenceCollator):
    """Every record of the batches collated at the given call numbers is unusable (an unreadable image)."""

    def __init__(self, tiny, method="dpo", *, empty_draws=(), **kwargs):
        super().__init__(tiny, method, **kwargs)
        self.empty_draws = set(empty_draws)

    def __call__(self, records):
        if self.draw in self.empty_draws:
            records = [dict(r, bad="unreadable_image") for r in records]
        return super().__call__(records)


def _trainer_with_empty_batches(tmp_path, empty_draws, n=6, **overrides):
    from vpo.models import tiny_llava
    from vpo.trainer import VPOTrainer
    from vpo.trainer.synthetic import synthetic_records

    sys.path.insert(0, os.path.dirname(__file__))
    from test_trainer import make_args

    tiny = tiny_llava()
    args = make_args(tmp_path, "dpo", **overrides)
    collator = _EmptyOnDraws(tiny, "dpo", empty_draws=empty_draws)
    return VPOTrainer(tiny.model, args, train_dataset=synthetic_records(n, tiny), data_collator=collator)


def test_a_batch_with_no_usable_record_is_not_a_step_and_resume_stays_exact(tmp_path, capsys):
    """6 records, batch 2 (3 batches an epoch); the 2nd batch drawn is unusable. Epoch 0 then has 2 real steps, the
    Trainer's step counter, scheduler and max_steps count only real ones; the skip total is printed and saved; and
    resuming from step 2 (cursor: 2 micro-batches + 1 dropped batch in epoch 0) reproduces steps 3-5."""
    kw = dict(max_steps=5, save_strategy="steps", save_steps=2, learning_rate=5e-2)
    full = _trainer_with_empty_batches(tmp_path, {1}, **kw)
    full.train()
    logs = [h for h in full.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4, 5] and full.state.global_step == 5
    assert all(h["loss"] > 0 and h["grad_norm"] > 0 for h in logs)  # no phantom step with loss 0 / grad_norm 0
    assert logs[1]["data/skipped_unreadable_image"] == 2  # logged with the step that drew past the empty batch
    assert full.lr_scheduler.last_epoch == 5
    saved = json.loads((tmp_path / "skipped.json").read_text())
    assert saved["total"] == 2 and saved["by_reason"] == {"unreadable_image": 2} and saved["dropped_batches"] == 1
    assert "skipped records: TOTAL 2 {'unreadable_image': 2}" in capsys.readouterr().err
    assert full.state.log_history[-1]["data/skipped_total"] == 2
    state = json.loads((tmp_path / "checkpoint-2" / "vpo_state.json").read_text())
    assert (state["epoch"], state["entries_in_epoch"], state["extra_in_epoch"], state["raw_batches"]) == (0, 2, 1, 3)

    resumed = _trainer_with_empty_batches(tmp_path, {1}, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    reference = _losses(full)
    after = _losses(resumed)
    assert sorted(after) == [1, 2, 3, 4, 5] and all(after[s] == reference[s] for s in after), (after, reference)
    assert json.loads((tmp_path / "skipped.json").read_text())["total"] == 2  # restored, not re-counted


def test_gradient_accumulation_step_averages_its_real_micro_batches(tmp_path):
    """GA=2, 4 batches an epoch, the 2nd unusable: step 1 = batches 0 and 2, step 2 = batch 3 and a pad that weighs
    nothing (the epoch ran out): its loss is batch 3's, not half of it."""
    trainer = _trainer_with_empty_batches(tmp_path, {1}, n=8, max_steps=2, gradient_accumulation_steps=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2] and all(h["loss"] > 0.5 for h in logs)  # DPO starts at log 2 = 0.69


def test_data_that_is_all_unusable_stops_with_the_first_reason(tmp_path):
    trainer = _trainer_with_empty_batches(tmp_path, set(range(100)), max_steps=3)
    with pytest.raises(ValueError, match=r"no usable record.*first reason: unreadable_image"):
        trainer.train()
    assert trainer.state.global_step == 0


# ------------------------------------------------------------------------------------------------- OViP online
@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    from vpo.worlds import shapes

    root = tmp_path_factory.mktemp("shapes")
    shapes.make_dataset(str(root), 5, seed=0)
    return os.path.join(str(root), "train.jsonl")


def _online_trainer(out, data, calls):
    from vpo.construct.csr import load_policy
    from vpo.data import PreferenceCollator
    from vpo.online import OViPOnlineDataset, ShapesNegativeGenerator, ShapesWorldJudge
    from vpo.trainer import VPOConfig, VPOTrainer

    model, processor = load_policy("tiny:llava")

    def sample_fn(prompts, images, *, k, seed, keys):
        # deterministic in (seed, key): a replayed stream samples the same; ground truth vs. wrong captions
        calls.append((seed, tuple(keys)))
        out = []
        for key in keys:
            g = torch.Generator().manual_seed(seed % 2 ** 31 + int(key))
            out.append(["a green cross." if float(torch.rand((), generator=g)) < 0.5 else "nothing.",
                        "nothing.", "the the.", "nothing."])
        return out

    args = VPOConfig(output_dir=str(out), method="ovip", online=True, data_path=data, max_steps=4,
                     per_device_train_batch_size=2, use_cpu=True, report_to="none", lora_r=4, lora_dropout=0.0,
                     logging_steps=1, save_strategy="steps", save_steps=2, disable_tqdm=True, learning_rate=5e-2)
    # 3 prompts a round, buffer 2: every round leaves records in the buffer, so its contents must be restored
    ds = OViPOnlineDataset(data, processor, judge=ShapesWorldJudge(), negatives=ShapesNegativeGenerator(),
                           buffer_size=2, prompts_per_step=3, sample_fn=sample_fn, k=4, seed=3)
    return VPOTrainer(model, args, train_dataset=ds, data_collator=PreferenceCollator(processor, "llava",
                                                                                      method="ovip"))


def test_online_ovip_resumes_its_stream_and_buffer_exactly(tmp_path, shapes_data):
    calls_full, calls_resumed = [], []
    full = _online_trainer(tmp_path, shapes_data, calls_full)
    full.train()
    reference = _losses(full)
    ckpt = tmp_path / "checkpoint-2"
    state = json.loads((ckpt / "ovip_state.json").read_text())
    assert state["buffer"] and all(os.path.isfile(ckpt / "ovip_buffer" / r["image"]["__png__"])
                                   for r in state["buffer"])
    resumed = _online_trainer(tmp_path, shapes_data, calls_resumed)
    resumed.train(resume_from_checkpoint=str(ckpt))
    after = _losses(resumed)
    assert sorted(after) == [1, 2, 3, 4] and all(after[s] == reference[s] for s in after), (after, reference)
    assert calls_resumed == calls_full[len(calls_full) - len(calls_resumed):]  # the same sampling rounds
