"""TRL's DPOTrainer/DPOConfig semantics on VPOTrainer/VPOConfig: the constructor's cases, the DPOConfig fields (taken
with TRL's defaults, or refused with vpo's equivalent), TR-DPO's reference sync, TRL's num_tokens, label_smoothing's
warning, and the options reaching the loss."""
import functools
import warnings

import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from vpo.data import build_tiny_processor  # noqa: E402
from vpo.models import tiny_llava  # noqa: E402
from vpo.trainer import VPOConfig, VPOTrainer  # noqa: E402
from vpo.trainer.trl_options import REFUSED_TRL_FIELDS  # noqa: E402

COLORS = ["red", "green", "blue", "white"]
ROWS = [{"image": Image.new("RGB", (24, 24), c), "prompt": "what color ?", "chosen": f"{c} .", "rejected": "black ."}
        for c in COLORS]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
                report_to="none", use_cpu=True, lora_dropout=0.0, logging_steps=1, save_strategy="no",
                disable_tqdm=True, loss_impl="torch")
    base.update(kw)
    return VPOConfig(**base)


@pytest.fixture(scope="module")
def proc():
    return build_tiny_processor("llava", tiny=tiny_llava())


def _perturb(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_explicit_ref_model_is_used_with_lora(tmp_path, proc):
    ref = _perturb(tiny_llava().model).eval().requires_grad_(False)
    trainer = VPOTrainer(tiny_llava().model, args(tmp_path), ref_model=ref, train_dataset=ROWS, processing_class=proc)
    assert trainer.args.use_lora and trainer.reference.mode == "model" and trainer.ref_model is ref
    batch = trainer.data_collator(trainer.train_dataset[:2] if isinstance(trainer.train_dataset, list) else
                                  [trainer.train_dataset[i] for i in range(2)])
    _, m = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    # LoRA B starts at 0, so the policy is the base model: with the adapter-off reference the rewards would be 0
    assert abs(float(m["rewards/chosen"])) > 1e-4
    with pytest.raises(ValueError, match=r"ref_model was passed but ref_mode='adapter'"):
        VPOTrainer(tiny_llava().model, args(tmp_path, ref_mode="adapter"), ref_model=ref, train_dataset=ROWS,
                   processing_class=proc)


def test_peft_model_with_peft_config_is_refused(tmp_path, proc):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=2, target_modules=["q_proj"])
    peft_model = get_peft_model(tiny_llava().model, cfg)
    with pytest.raises(ValueError, match=r"peft_config was passed with a model that is already a PeftModel"):
        VPOTrainer(peft_model, args(tmp_path), train_dataset=ROWS, processing_class=proc, peft_config=cfg)


def test_no_train_dataset_is_an_error_at_construction(tmp_path, proc):
    with pytest.raises(ValueError, match=r"train_dataset is required"):
        VPOTrainer(tiny_llava().model, args(tmp_path), processing_class=proc)


def test_model_path_string_is_loaded(tmp_path, proc):
    folder = tmp_path / "m"
    tiny_llava().model.save_pretrained(folder)
    trainer = VPOTrainer(str(folder), args(tmp_path / "o", model_init_kwargs={"dtype": torch.float32}),
                         train_dataset=ROWS, processing_class=proc)
    assert type(trainer.model.get_base_model()).__name__ == "LlavaForConditionalGeneration"
    trainer.train()
    tiny = VPOTrainer("tiny:llava", args(tmp_path / "t"), train_dataset=ROWS)  # the processor comes with it
    assert tiny.processing_class is not None


@pytest.mark.parametrize("name", sorted(REFUSED_TRL_FIELDS))
def test_refused_dpo_config_fields_name_vpo_s_equivalent(tmp_path, name):
    with pytest.raises(ValueError) as info:
        VPOConfig(output_dir=str(tmp_path), use_cpu=True, **{name: 1})
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{name} is a TRL DPOConfig field vpo does not take: ")


def test_defaults_equal_dpo_config_where_the_meaning_is_the_same(tmp_path):
    trl = pytest.importorskip("trl", exc_type=ImportError)
    same = ("beta", "label_smoothing", "loss_weights", "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau",
            "use_weighting", "ld_alpha", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps",
            "max_length", "disable_dropout", "model_init_kwargs", "logging_steps")
    ours = VPOConfig(output_dir=str(tmp_path), use_cpu=True)
    theirs = trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True)
    for name in same:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert [ours.loss_type] == theirs.loss_type
    from vpo.trainer.config import LOSS_TYPES

    assert set(LOSS_TYPES) == set(__import__("vpo").losses.LOSS_TYPES)


def test_label_smoothing_warns_where_a_loss_type_ignores_it(tmp_path):
    with pytest.warns(UserWarning, match=r"label_smoothing=0.1 is ignored by loss_type \['hinge'\]"):
        VPOConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="sigmoid,hinge", label_smoothing=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VPOConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="robust", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"'exo_pair' needs label_smoothing > 0"):
        VPOConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="exo_pair")
    with pytest.raises(ValueError, match=r"f_divergence_type='forward_kl' applies only to"):
        VPOConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="bco_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match=r"use_weighting \(WPO\) cannot weight loss_type \['aot'\]"):
        VPOConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="aot", use_weighting=True)
    with pytest.raises(ValueError, match=r"sync_ref_model needs a separate reference model"):
        VPOConfig(output_dir=str(tmp_path), use_cpu=True, sync_ref_model=True)


def test_sync_ref_model_mixes_the_policy_into_the_reference(tmp_path, proc):
    a = args(tmp_path, use_lora=False, sync_ref_model=True, ref_model_mixup_alpha=0.25, ref_model_sync_steps=2,
             max_steps=2)
    trainer = VPOTrainer(tiny_llava().model, a, train_dataset=ROWS, processing_class=proc)
    ref0 = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    seen = {}

    from transformers import TrainerCallback

    class Grab(TrainerCallback):  # the policy right after step 2's update, before the sync callback runs
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                seen.update({n: p.detach().clone() for n, p in model.named_parameters()})

    trainer.callback_handler.callbacks.insert(0, Grab())
    trainer.train()
    head = "lm_head.weight"
    name = next(n for n in ref0 if n.endswith(head))
    want = 0.75 * ref0[name] + 0.25 * seen[name]
    assert not torch.equal(seen[name], ref0[name])
    torch.testing.assert_close(dict(trainer.ref_model.named_parameters())[name], want)


def test_num_tokens_is_a_running_total_of_attended_tokens(tmp_path, proc):
    trainer = VPOTrainer(tiny_llava().model, args(tmp_path, max_steps=3), train_dataset=ROWS, processing_class=proc)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    counts = [h["num_tokens"] for h in logs]
    assert len(counts) == 3 and counts[0] > 0 and counts[0] < counts[1] < counts[2]
    for key in ("num_tokens/chosen", "rewards/margins", "logps/chosen"):
        assert key in logs[-1]  # vpo's split metrics stay, under their own names
    # step 3 re-reads batch 1 (4 records, batches of 2; no shuffling across the same epoch's draw is assumed): the
    # total is the sum of the three batches' attention masks
    collated = [trainer.data_collator([trainer.train_dataset[i] for i in idx]) for idx in ((0, 1), (2, 3))]
    sizes = sorted(int(b["attention_mask"].sum()) for b in collated)
    assert counts[0] in sizes and counts[1] == sum(sizes)
    assert trainer.evaluate(ROWS[:2])["eval_num_tokens"] == counts[-1]  # TRL: the training total in eval logs
    summary = [h for h in trainer.state.log_history if "train_runtime" in h]
    assert summary and not any("num_tokens" in k for k in summary[0])  # not in the run's summary line


def test_f_divergence_reaches_the_loss(tmp_path, proc):
    trainer = VPOTrainer(tiny_llava().model, args(tmp_path, f_divergence_type="js_divergence", use_lora=False),
                         ref_model=_perturb(tiny_llava().model).eval(), train_dataset=ROWS, processing_class=proc)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    loss, m = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    beta = trainer.args.beta
    dw, dl = m["rewards/chosen"] / beta, m["rewards/rejected"] / beta  # batch means; recompute per pair below
    assert torch.isfinite(loss) and abs(float(dw - dl)) > 0
    plain = VPOTrainer(tiny_llava().model, args(tmp_path / "p", use_lora=False),
                       ref_model=_perturb(tiny_llava().model).eval(), train_dataset=ROWS, processing_class=proc)
    loss0 = plain.compute_loss(plain.model, batch)
    assert abs(float(loss - loss0)) > 1e-6  # the per-pair formulas are checked in tests/test_trl_loss_types.py


@pytest.mark.parametrize("option", [{"use_weighting": True}, {"ld_alpha": 0.0}], ids=["wpo", "ld"])
def test_tpo_takes_wpo_and_ld_dpo_on_its_fused_path(tmp_path, proc, option):
    """fused_tpo_loss takes use_weighting / ld_alpha (WPO's log Σ p² from its sweep): the trainer passes them and the
    loss changes."""
    import vpo.trainer.methods as methods

    seen = []
    real = methods.fused_tpo_loss

    @functools.wraps(real)  # the trainer reads the signature to see which options the loss takes
    def spy(*a, **k):
        seen.append({n: k.get(n) for n in option})
        return real(*a, **k)

    losses = []
    for i, extra in enumerate((option, {})):
        trainer = VPOTrainer(tiny_llava().model, args(tmp_path / str(i), method="tpo", **extra), train_dataset=ROWS,
                             processing_class=proc)
        batch = trainer.data_collator([trainer.train_dataset[j] for j in range(2)])
        methods.fused_tpo_loss = spy
        try:
            torch.manual_seed(0)
            losses.append(trainer.compute_loss(trainer.model, batch))
        finally:
            methods.fused_tpo_loss = real
    assert seen[0] == option and torch.isfinite(losses[0])
    if "use_weighting" in option:  # at LoRA's init policy == reference: LD-DPO's sums still give ln 2, WPO weighs it
        assert abs(float(losses[0] - losses[1])) > 1e-7


@pytest.mark.parametrize("method,option", [("dpo", {"ld_alpha": 0.3}), ("mdpo", {"ld_alpha": 0.3}),
                                           ("dpo", {"use_weighting": True}),
                                           ("mdpo", {"use_weighting": True, "ld_alpha": 0.3})])
def test_ld_alpha_and_wpo_in_the_trainer_match_the_oracle(tmp_path, proc, method, option):
    import vpo
    from vpo.trainer.passes import Passes

    a = args(tmp_path, method=method, use_lora=False, loss_type="ipo", **option)
    trainer = VPOTrainer(tiny_llava().model, a, ref_model=_perturb(tiny_llava().model).eval(), train_dataset=ROWS,
                         processing_class=proc)
    import dataclasses

    first = dataclasses.replace(trainer.train_dataset[0], chosen="a very long red answer with many extra words .")
    batch = trainer.data_collator([first, trainer.train_dataset[1]])  # lengths differ: a tail to weight
    loss, m = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    p = Passes(batch, trainer.model, trainer.reference, list_size=a.list_size, need_grad=False, impl="torch")
    with torch.no_grad():
        kw = dict(ref_hidden=p.ref_hidden(), ref_weight=p.ref_weight, beta=a.beta, loss_type="ipo")
        want, wm = vpo.oracle.dpo_loss(p.weight, p.hidden(), p.labels(), **option, **kw)
        plain, _ = vpo.oracle.dpo_loss(p.weight, p.hidden(), p.labels(), **kw)
    got = m["dpo/loss"] if method == "mdpo" else loss
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)
    assert abs(float(want) - float(plain)) > 1e-6  # the option matters on this batch
    assert float(m["logps/chosen"]) == pytest.approx(float(wm["logps/chosen"]), rel=1e-5)


def test_disable_dropout_by_default(tmp_path, proc):
    model = tiny_llava().model
    model.extra_dropout = torch.nn.Dropout(0.3)  # the tiny model has none of its own (functional attention dropout)
    VPOTrainer(model, args(tmp_path, use_lora=False), train_dataset=ROWS, processing_class=proc)
    assert model.extra_dropout.p == 0.0
    model = tiny_llava().model
    model.extra_dropout = torch.nn.Dropout(0.3)
    VPOTrainer(model, args(tmp_path, use_lora=False, disable_dropout=False), train_dataset=ROWS, processing_class=proc)
    assert model.extra_dropout.p == 0.3


@pytest.mark.parametrize("kw,option", [(dict(beta=-1.0), "beta"), (dict(gradient_accumulation_steps=0),
                                                                    "gradient_accumulation_steps"),
                                       (dict(per_device_train_batch_size=0), "per_device_train_batch_size"),
                                       (dict(max_steps=-1, num_train_epochs=0), "num_train_epochs")])
def test_training_settings_are_refused_naming_the_option(tmp_path, kw, option):
    with pytest.raises(ValueError, match=rf"^{option} must be"):
        VPOConfig(output_dir=str(tmp_path), use_cpu=True, **kw)


def test_bco_running_mean_shifts_the_rewards_and_is_checkpointed(tmp_path, proc):
    import json
    import math

    a = args(tmp_path, loss_type="bco_pair", bco_running_mean=True, per_device_train_batch_size=1, max_steps=2,
             save_strategy="steps", save_steps=1)
    trainer = VPOTrainer(tiny_llava().model, a, train_dataset=ROWS, processing_class=proc)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    rewards = [(h["rewards/chosen"] + h["rewards/rejected"]) / 2 for h in logs]
    assert trainer.bco.count == 2
    assert float(trainer.bco.mean()) == pytest.approx(sum(rewards) / 2, abs=1e-6)
    state = json.loads((tmp_path / "checkpoint-2" / "vpo_state.json").read_text())
    assert state["bco_running_mean"]["count"] == 2
    # the loss of one pair with δ = the running mean: −log σ(βΔ_w − δ) − log σ(−(βΔ_l − δ))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    loss, m = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    delta = sum(rewards) / 2
    rc, rr = float(m["rewards/chosen"]), float(m["rewards/rejected"])
    want = math.log1p(math.exp(-(rc - delta))) + math.log1p(math.exp(rr - delta))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    # resuming restores it
    resumed = VPOTrainer(tiny_llava().model, args(tmp_path, loss_type="bco_pair", bco_running_mean=True,
                                                  per_device_train_batch_size=1, max_steps=3),
                         train_dataset=ROWS, processing_class=proc)
    resumed._vpo_load_state(str(tmp_path / "checkpoint-2"))
    assert resumed.bco.count == 2 and float(resumed.bco.mean()) == pytest.approx(delta, abs=1e-6)


def test_the_trainer_logs_trl_s_token_metrics_when_the_loss_reports_them(tmp_path, proc):
    import vpo

    W, h = torch.randn(7, 4), torch.randn(2, 3, 4)
    y = torch.tensor([[1, 2, 3], [4, 5, 6]])
    _, out = vpo.fused_dpo_loss(W, h, y, ref_hidden=h)
    names = [k for k in ("logits/chosen", "logits/rejected", "mean_token_accuracy", "entropy") if k in out.metrics]
    if not names:
        pytest.skip("the fused losses do not report TRL's token metrics yet")
    trainer = VPOTrainer(tiny_llava().model, args(tmp_path), train_dataset=ROWS, processing_class=proc)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for k in names:
        assert k in logs[-1], k
