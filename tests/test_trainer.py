"""VPOTrainer on tiny random VLMs (CPU): every method's loss equals the oracle on the same hidden states, gradients
reach the LoRA weights only, the reference pass changes nothing, resuming is deterministic, precomputed references
equal the on-the-fly ones, bad records are counted, and the CLI trains from YAML."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from vpo import oracle
from vpo.integrations import catpo_weights_for_batch
from vpo.models import tiny_idefics2, tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl
from vpo.trainer import (
    METHODS,
    Passes,
    Reference,
    VPOConfig,
    VPOTrainer,
    apply_lora,
    lora_target_regex,
    precompute_reference,
)
from vpo.trainer.methods import compute
from vpo.trainer.modeling import language_model_prefix
from vpo.trainer.passes import forward_hidden, model_inputs, select_rows, shift_labels_full
from vpo.trainer.synthetic import TinyPreferenceCollator, synthetic_records

BUILDERS = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "idefics2": tiny_idefics2}
LIST_SIZE = 3
# Every method on LLaVA; DPO and TPO (the two-pass method) on the other families; LPOI (rows regrouped) on Qwen2-VL.
# "real": the batches come from vpo.data.PreferenceCollator over the tiny processor (the production path);
# "synthetic": from vpo.trainer.synthetic.TinyPreferenceCollator.
CASES = (
    [("llava", m, "real") for m in METHODS]
    + [("qwen2_vl", m, "synthetic") for m in ("dpo", "tpo")]
    + [("qwen2_vl", "lpoi", "real")]
    + [(f, m, "real") for f in ("qwen2_5_vl", "idefics2") for m in ("dpo", "tpo")]
)
WORDS = ("a red cat on a mat .", "two dogs in the grass .", "a man holding a blue cup .", "the sky is white .",
         "a green bus on the road .", "a child eating pizza .")


def real_records(n, seed=0):
    """PreferenceRecords with small random images (2:3, the tiny Qwen-VL grid), negatives and image lists."""
    from PIL import Image

    from vpo.data import PreferenceRecord

    g = torch.Generator().manual_seed(seed)

    def image():
        return Image.fromarray(torch.randint(0, 256, (32, 48, 3), generator=g, dtype=torch.uint8).numpy())

    out = []
    for i in range(n):
        c, r = WORDS[i % len(WORDS)], WORDS[(i + 2) % len(WORDS)]
        out.append(PreferenceRecord(f"r{i}", image(), "what is in the image ?", c, r, neg_image=image(),
                                    image_list=[image() for _ in range(LIST_SIZE - 1)]))
    return out


def real_collator(tiny, method, **kwargs):
    from vpo.data import PreferenceCollator, build_tiny_processor

    return PreferenceCollator(build_tiny_processor(tiny.arch, tiny=tiny), tiny.arch, method=method,
                              list_size=LIST_SIZE, **kwargs)


def make_args(tmp_path, method="dpo", **overrides) -> VPOConfig:
    kwargs = dict(output_dir=str(tmp_path), method=method, use_cpu=True, report_to="none", lora_dropout=0.0, lora_r=4,
                  per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=2, save_strategy="no",
                  logging_steps=1, disable_tqdm=True, learning_rate=1e-2, list_size=LIST_SIZE, seed=0, data_seed=0)
    kwargs.update(overrides)
    return VPOConfig(**kwargs)


def make_trainer(tmp_path, family="llava", method="dpo", *, n=4, bad=(), collator_kwargs=None, data="synthetic",
                 **overrides):
    tiny = BUILDERS[family]()
    args = make_args(tmp_path, method, **overrides)
    if data == "real":
        collator = real_collator(tiny, method, **(collator_kwargs or {}))
        records = real_records(n)
    else:
        collator = TinyPreferenceCollator(tiny, method, list_size=LIST_SIZE, **(collator_kwargs or {}))
        records = synthetic_records(n, tiny, bad=bad)
    trainer = VPOTrainer(tiny.model, args, train_dataset=records, data_collator=collator)
    return trainer, tiny, collator, records


def perturb_lora(model, seed=1, scale=0.3):
    """LoRA B starts at 0 (policy == reference): give it values so the rewards are not all zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def backbone_hidden(peft_model, pass_batch, *, adapter=True):
    """Run the backbone ourselves: ``[R, L-1, D]`` post-norm hidden states, aligned with ``labels[:, 1:]``."""
    inner = peft_model.get_base_model().model
    if adapter:
        return inner(**model_inputs(pass_batch), use_cache=False).last_hidden_state[:, :-1]
    with torch.no_grad(), peft_model.disable_adapter():
        return inner(**model_inputs(pass_batch), use_cache=False).last_hidden_state[:, :-1]


def oracle_loss(method, model, batch, cfg):
    """The materializing oracle (vpo.oracle) on hidden states computed by running the backbone directly."""
    W = model.get_base_model().lm_head.weight
    y = batch["labels"][:, 1:]

    def pair(name=None):
        b = batch if name is None else batch["sub"][name]
        return backbone_hidden(model, b), backbone_hidden(model, b, adapter=False), b["labels"][:, 1:]

    h, rh, _ = pair()
    if method in ("dpo", "csr"):
        return oracle.dpo_loss(W, h, y, ref_hidden=rh, beta=cfg.beta, label_smoothing=cfg.label_smoothing)
    if method == "tpo":
        hn, rhn, _ = pair("noised")
        return oracle.tpo_loss(W, h, hn, y, ref_hidden=rh, ref_hidden_noised=rhn, beta=cfg.beta, a=cfg.tpo_a,
                               reward_grad=cfg.reward_grad, rewards=cfg.tpo_rewards)
    if method == "catpo":
        return oracle.catpo_loss(W, h, y, batch["token_weights"][:, 1:], ref_hidden=rh, beta=cfg.beta,
                                 kl_coef=cfg.kl_coef)
    if method == "ovip":
        hni, rhni, yni = pair("noimg")
        hng, rhng, yng = pair("negimg")
        return oracle.ovip_loss(W, h, y, hni, yni, hng, yng, ref_hidden=rh, ref_noimg_hidden=rhni,
                                ref_negimg_hidden=rhng, beta=cfg.beta, beta1=cfg.ovip_beta1, beta2=cfg.ovip_beta2)
    if method == "lpoi":
        hl, rhl, yl = pair("list")
        B, L = h.shape[0] // 2, LIST_SIZE
        drop = lambda t: t.reshape(B, L, *t.shape[1:])[:, 1:]  # x_1 is scored by the main pass  # noqa: E731
        return oracle.lpoi_loss(W, h, y, drop(hl), drop(yl), ref_hidden=rh, ref_list_hidden=drop(rhl),
                                beta=cfg.beta, delta=cfg.anchor_delta)
    if method == "mdpo":
        hc, rhc, yc = pair("crop")
        return oracle.mdpo_loss(W, h, y, hc, yc, ref_hidden=rh, ref_corrupt_hidden=rhc, beta=cfg.beta,
                                delta=cfg.anchor_delta)
    raise AssertionError(method)


@pytest.mark.parametrize("family,method,data", CASES)
def test_step_equals_oracle_and_only_lora_learns(tmp_path, family, method, data):
    # Cat-PO with the batch's token weights here (random ones from the synthetic collator; the real collator's are
    # 1.0 without precomputed weights); computed from the reference in test_catpo_weights_from_the_reference.
    kwargs = {"collator_kwargs": {"token_weights": True}} if method == "catpo" and data == "synthetic" else {}
    trainer, tiny, collator, records = make_trainer(tmp_path, family, method, data=data,
                                                    catpo_token_weights="batch", **kwargs)
    model = trainer.model
    perturb_lora(model)
    batch = collator(records[:2])
    model.train()
    loss, metrics = trainer.compute_loss(model, batch, return_outputs=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads), sorted(n for n in grads if "lora_" not in n)[:5]
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    model.zero_grad(set_to_none=True)

    expected, expected_metrics = oracle_loss(method, model, batch, trainer.args)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    common = sorted(set(metrics) & set(expected_metrics))
    assert "rewards/margins" in common
    for key in common:
        torch.testing.assert_close(metrics[key].float(), expected_metrics[key].float(), rtol=1e-4, atol=1e-5,
                                   msg=key)


def test_tpo_without_reward_grad_runs_noised_policy_pass_without_graph(tmp_path):
    trainer, tiny, collator, records = make_trainer(tmp_path, "llava", "tpo", reward_grad=False)
    model = trainer.model
    perturb_lora(model)
    batch = collator(records[:2])
    model.train()
    passes = Passes(batch, model, trainer.reference, list_size=LIST_SIZE)
    loss, _ = compute(passes, trainer.args)
    assert not passes.hidden("noised").requires_grad and passes.hidden().requires_grad
    expected, _ = oracle_loss("tpo", model, batch, trainer.args)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_reference_pass_changes_nothing_and_is_the_base_model(tmp_path, family):
    trainer, tiny, collator, records = make_trainer(tmp_path, family, "dpo")
    model = trainer.model
    perturb_lora(model)
    batch = collator(records[:2])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.disable_adapters for m in model.modules() if hasattr(m, "lora_A")]
    passes = Passes(batch, model, trainer.reference)
    ref = passes.ref_hidden()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.disable_adapters for m in model.modules() if hasattr(m, "lora_A")] and not any(flags)
    assert model.training and not ref.requires_grad
    base = BUILDERS[family]().model  # same seed, never wrapped: the model the reference must be
    with torch.no_grad():
        expected = base.model(**model_inputs(batch), use_cache=False).last_hidden_state[:, :-1]
    torch.testing.assert_close(ref, expected[:, passes.window()], rtol=0, atol=1e-6)
    assert (passes.hidden() - ref).abs().max() > 1e-3  # the adapter does change the policy


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_passes_cut_the_image_and_prompt_columns_before_the_head(tmp_path, family):
    """The fused losses see only the columns where some row has a target: every target is kept, the image/prompt
    columns in front are not (they would cost GEMM work for nothing); the loss is the full-length loss."""
    trainer, tiny, collator, records = make_trainer(tmp_path, family, "dpo")
    batch = collator(records[:2])
    passes = Passes(batch, trainer.model, trainer.reference)
    full = batch["labels"][:, 1:]
    w = passes.window()
    has = (full != -100).any(0).nonzero().flatten()
    assert (w.start, w.stop) == (int(has[0]), int(has[-1]) + 1)
    assert w.start > 0 and passes.labels().shape[1] < full.shape[1]
    assert int((passes.labels() != -100).sum()) == int((full != -100).sum())
    assert passes.hidden().shape[:2] == passes.labels().shape
    import vpo
    with torch.no_grad():
        h_full = forward_hidden(trainer.model, model_inputs(batch))[:, :-1]
        r_full = passes.ref_hidden()
        cut, _ = vpo.fused_dpo_loss(passes.weight, passes.hidden(), passes.labels(), ref_hidden=r_full)
        pad = torch.zeros(r_full.shape[0], full.shape[1], r_full.shape[2], dtype=r_full.dtype)
        pad[:, w] = r_full
        whole, _ = vpo.fused_dpo_loss(passes.weight, h_full, full, ref_hidden=pad)
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_lora_targets_only_the_language_model(family):
    model = BUILDERS[family]().model
    prefix = language_model_prefix(model)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.get_decoder().modules())
    peft = apply_lora(model, r=2, targets="all-linear")
    adapted = [n for n, m in peft.get_base_model().named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == n_linear and all(n.startswith(prefix + ".") for n in adapted)

    # q_proj/v_proj also name attention projections of the vision side: only the LM's are adapted.
    model = BUILDERS[family]().model
    vision_named = [n for n, m in model.named_modules()
                    if n.rsplit(".", 1)[-1] in ("q_proj", "v_proj") and not n.startswith(prefix + ".")]
    regex = lora_target_regex(model, ["q_proj", "v_proj"])
    peft = apply_lora(model, r=2, targets=["q_proj", "v_proj"])
    adapted = [n for n, m in peft.get_base_model().named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(n.startswith(prefix + ".") and n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")
                           for n in adapted), regex
    if vision_named:  # the scope matters here: "all" would hit the vision tower
        model = BUILDERS[family]().model
        peft = apply_lora(model, r=2, targets=["q_proj", "v_proj"], scope="all")
        assert any(not n.startswith(prefix + ".")
                   for n, m in peft.get_base_model().named_modules() if hasattr(m, "lora_A"))
    with pytest.raises(ValueError, match="name no nn.Linear"):
        lora_target_regex(BUILDERS[family]().model, ["not_a_layer"])


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.mark.parametrize("method,data", [("dpo", "synthetic"), ("mdpo", "real")])
def test_resume_continues_the_same_run(tmp_path, method, data):
    """mDPO with the real collator: its crops are drawn per collator call, so the resumed run must restart the
    collator's counter where the interrupted one was."""
    common = dict(max_steps=5, save_strategy="steps", save_steps=2, learning_rate=5e-2)
    full, *_ = make_trainer(tmp_path / "full", method=method, data=data, n=8, **common)
    full.train()
    reference = _losses(full)
    assert sorted(reference) == [1, 2, 3, 4, 5]
    assert os.path.isdir(tmp_path / "full" / "checkpoint-2")

    resumed, *_ = make_trainer(tmp_path / "full", method=method, data=data, n=8, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    after = _losses(resumed)
    for step in (3, 4, 5):  # step 5 starts the second epoch: the shuffled order must continue too
        assert after[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, after, reference)


@pytest.mark.parametrize("method", METHODS)
def test_precomputed_reference_equals_adapter_mode(tmp_path, method):
    overrides = {"kl_coef": 0.0} if method == "catpo" else {}
    # The real collator, except for mDPO: its crops are drawn per call even with fixed_noise (the synthetic collator
    # fixes them per example), and a precomputed reference needs the same crop at precompute and training time.
    data = "synthetic" if method == "mdpo" else "real"
    collator_kwargs = {"fixed_noise": True} if method == "tpo" else None
    trainer, tiny, collator, records = make_trainer(tmp_path, "llava", method, data=data,
                                                    collator_kwargs=collator_kwargs, **overrides)
    model = trainer.model
    perturb_lora(model)
    cfg = make_args(tmp_path, method, ref_mode="precomputed", fixed_noise=True, **overrides)
    table = precompute_reference(model, records, collator, cfg, batch_size=2, progress=False)
    assert sorted(table) == sorted(r["id"] if isinstance(r, dict) else r.id for r in records)
    batch = collator(records[2:4])
    model.train()
    on_the_fly, m1 = compute(Passes(batch, model, Reference("adapter"), list_size=LIST_SIZE), trainer.args)
    precomputed, m2 = compute(Passes(batch, model, Reference("precomputed", table=table), list_size=LIST_SIZE), cfg)
    torch.testing.assert_close(precomputed, on_the_fly, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2["rewards/margins"], m1["rewards/margins"], rtol=1e-5, atol=1e-6)


def test_precomputed_training_run_equals_adapter_run(tmp_path):
    adapter, tiny, collator, records = make_trainer(tmp_path / "a", max_steps=3)
    table = precompute_reference(adapter.model, records, collator, adapter.args, progress=False)
    adapter.train()
    tiny2 = tiny_llava()
    pre = VPOTrainer(tiny2.model, make_args(tmp_path / "p", max_steps=3, ref_mode="precomputed"), ref_table=table,
                     train_dataset=records, data_collator=collator)
    pre.train()
    a, p = _losses(adapter), _losses(pre)
    assert sorted(a) == [1, 2, 3]
    for step in a:
        assert p[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7)


def test_reference_model_mode(tmp_path):
    """ref_mode='model' (CSR's previous iterate): the reference's own hidden states and LM head."""
    tiny = tiny_llava()
    ref = tiny_llava(seed=1).model
    records = synthetic_records(4, tiny)
    collator = TinyPreferenceCollator(tiny, "csr")
    trainer = VPOTrainer(tiny.model, make_args(tmp_path, "csr", ref_mode="model"), ref_model=ref,
                         train_dataset=records, data_collator=collator)
    model = trainer.model
    perturb_lora(model)
    batch = collator(records[:2])
    model.train()
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        rh = ref.model(**model_inputs(batch), use_cache=False).last_hidden_state[:, :-1]
    expected, _ = oracle.dpo_loss(model.get_base_model().lm_head.weight, backbone_hidden(model, batch),
                                  batch["labels"][:, 1:], ref_hidden=rh, ref_weight=ref.lm_head.weight)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad for p in ref.parameters())


@pytest.mark.parametrize("heads_text, heads", [(None, None), ("1:2,0:0", {1: [2], 0: [0]})])
def test_catpo_weights_from_the_reference(tmp_path, heads_text, heads):
    """Without batch token weights, Cat-PO's are computed from the reference (the adapter-disabled policy), from the
    attention heads that ``catpo_heads`` selects."""
    trainer, tiny, collator, records = make_trainer(tmp_path, "llava", "catpo", catpo_heads=heads_text)
    model = trainer.model
    perturb_lora(model)
    batch = collator(records[:2])
    assert "token_weights" not in batch
    model.train()
    passes = Passes(batch, model, trainer.reference)
    cfg = trainer.args
    loss, _ = compute(passes, cfg)
    base = tiny_llava().model
    expected_w = catpo_weights_for_batch(base, model_inputs(batch), shift_labels_full(batch["labels"]),
                                         alpha=cfg.catpo_alpha, lambda_ref=cfg.catpo_lambda_ref, heads=heads)[:, :-1]
    if heads is not None:  # the selection matters on this model
        every = catpo_weights_for_batch(base, model_inputs(batch), shift_labels_full(batch["labels"]),
                                        alpha=cfg.catpo_alpha, lambda_ref=cfg.catpo_lambda_ref)[:, :-1]
        assert (every - expected_w).abs().max() > 1e-4
    # the passes hand out the label window's columns only (zero weight outside it: no targets there)
    torch.testing.assert_close(passes.token_weights(alpha=cfg.catpo_alpha, lambda_ref=cfg.catpo_lambda_ref),
                               expected_w[:, passes.window()])
    expected, _ = oracle.catpo_loss(model.get_base_model().lm_head.weight, backbone_hidden(model, batch),
                                    batch["labels"][:, 1:], expected_w, ref_hidden=backbone_hidden(model, batch,
                                                                                                   adapter=False),
                                    beta=cfg.beta, kl_coef=cfg.kl_coef)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_catpo_heads_config_errors(tmp_path):
    with pytest.raises(ValueError, match="catpo_heads must be comma-separated head indices"):
        make_args(tmp_path, "catpo", catpo_heads="first")
    with pytest.raises(ValueError, match=r"catpo_heads names layers \[2\] that are not in catpo_layers \[0, 1\]"):
        make_args(tmp_path, "catpo", catpo_heads="2:0", catpo_layers="0,1")
    assert make_args(tmp_path, "catpo", catpo_heads="3,1").catpo_head_selection() == [3, 1]


def test_ovip_symmetric_variant(tmp_path):
    trainer, tiny, collator, records = make_trainer(tmp_path, "llava", "ovip", ovip_image_loss="symmetric",
                                                    ovip_anchor="bi-anchor",
                                                    collator_kwargs={"ovip_rejected": True})
    model = trainer.model
    perturb_lora(model)
    batch = collator(records[:2])
    model.train()
    loss = trainer.compute_loss(model, batch)
    W, y = model.get_base_model().lm_head.weight, batch["labels"][:, 1:]
    sub = batch["sub"]
    h = {k: backbone_hidden(model, b) for k, b in (("main", batch), ("noimg", sub["noimg"]), ("negimg", sub["negimg"]))}
    rh = {k: backbone_hidden(model, b, adapter=False)
          for k, b in (("main", batch), ("noimg", sub["noimg"]), ("negimg", sub["negimg"]))}
    expected, _ = oracle.ovip_loss(W, h["main"], y, h["noimg"], sub["noimg"]["labels"][:, 1:], h["negimg"],
                                   sub["negimg"]["labels"][:, 1:], ref_hidden=rh["main"], ref_noimg_hidden=rh["noimg"],
                                   ref_negimg_hidden=rh["negimg"], image_loss="symmetric", anchor="bi-anchor")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_select_rows_regroups_qwen_images():
    tiny = tiny_qwen2_vl()
    collator = TinyPreferenceCollator(tiny, "lpoi", list_size=LIST_SIZE)
    batch = collator(synthetic_records(2, tiny))
    full = batch["sub"]["list"]
    keep = torch.tensor([1, 2, 4, 5])
    part = select_rows(full, keep)
    assert part["pixel_values"].shape[0] == 4 * full["pixel_values"].shape[0] // 6
    with torch.no_grad():
        h_full = tiny.model.model(**model_inputs(full), use_cache=False).last_hidden_state
        h_part = tiny.model.model(**model_inputs(part), use_cache=False).last_hidden_state
    torch.testing.assert_close(h_part, h_full[keep], rtol=1e-5, atol=1e-5)


def test_skipped_records_are_counted_and_training_goes_on(tmp_path):
    trainer, tiny, collator, records = make_trainer(tmp_path, n=4, bad=(1,), max_steps=2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert sum(h.get("data/skipped_empty_response", 0) for h in logged) == 1
    # A batch with no valid record: a zero loss, no crash (single process).
    empty = collator([records[1]])
    assert empty["input_ids"].shape[0] == 0 and empty["skipped"] == {"empty_response": 1}
    loss = trainer.compute_loss(trainer.model, empty)
    assert loss.item() == 0.0 and loss.requires_grad


def test_real_collator_skips_are_counted(tmp_path):
    from vpo.data import PreferenceRecord

    trainer, tiny, collator, records = make_trainer(tmp_path, data="real", n=4, max_steps=2)
    bad = PreferenceRecord("bad", records[0].image, "what is in the image ?", "", "a dog .")  # empty response
    trainer.train_dataset = [records[0], bad, records[1], records[2]]
    with pytest.warns(Warning):
        trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert sum(h.get("data/skipped_missing_field", 0) for h in logged) == 1
    with pytest.warns(Warning):
        empty = collator([bad])
    assert empty == {"ids": [], "skipped": {"missing_field": 1}}
    loss = trainer.compute_loss(trainer.model, empty)
    assert loss.item() == 0.0


def test_cli_train_from_yaml_with_eval_tensorboard_checkpointing_and_precompute(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from vpo.trainer.cli import parse_config, precompute_ref_main, train_main

    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "method: dpo\nmodel_name_or_path: tiny:llava\ndata_path: synthetic:6\neval_data_path: synthetic:2\n"
        f"output_dir: {out}\nmax_steps: 2\nper_device_train_batch_size: 2\nper_device_eval_batch_size: 2\n"
        "learning_rate: 1.0e-3\nlogging_steps: 1\nsave_steps: 2\nuse_cpu: true\nreport_to: tensorboard\n"
        "activation_checkpointing: true\nlora_dropout: 0.0\ndisable_tqdm: true\n"
    )
    cfg = parse_config(["--config", str(config)])
    assert cfg.method == "dpo" and cfg.remove_unused_columns is False and cfg.activation_checkpointing
    assert parse_config(["--config", str(config), "--beta", "0.5"]).beta == 0.5
    assert train_main(["--config", str(config)]) == 0
    assert (out / "checkpoint-2").is_dir() and (out / "adapter_model.safetensors").is_file()
    assert glob.glob(str(out / "**" / "events.out.tfevents*"), recursive=True)

    assert precompute_ref_main(["--config", str(config)]) == 0
    assert (out / "ref_dpo.jsonl").is_file()
    out2 = tmp_path / "run2"
    assert train_main(["--config", str(config), "--ref_mode", "precomputed", "--output_dir", str(out2),
                       "--ref_logps_path", str(out / "ref_dpo.jsonl"), "--report_to", "none",
                       "--activation_checkpointing", "false"]) == 0
    assert (out2 / "adapter_model.safetensors").is_file()

    # A JSONL file read by vpo.data with the tiny model's processor: the production data path.
    lines = []
    for rec in real_records(4):
        path = tmp_path / f"{rec.id}.png"
        rec.image.save(path)
        lines.append(json.dumps({"id": rec.id, "image": path.name, "prompt": rec.prompt, "chosen": rec.chosen,
                                 "rejected": rec.rejected}))
    lines.append("{not json")
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    out3 = tmp_path / "run3"
    capsys.readouterr()
    assert train_main(["--config", str(config), "--model_name_or_path", "tiny:qwen2_vl", "--method", "tpo",
                       "--data_path", str(tmp_path / "train.jsonl"),
                       "--eval_data_path", str(tmp_path / "train.jsonl"),
                       "--output_dir", str(out3), "--report_to", "none", "--max_length", "64"]) == 0
    assert (out3 / "adapter_model.safetensors").is_file()
    # the bad line: one summary line per file (vpo.trainer.cli_report), not a warning per record
    err = capsys.readouterr().err
    assert f"train data {tmp_path / 'train.jsonl'}: kept 4 of 5 records; skipped 1 (" in err


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        make_args(tmp_path, "ppo")
    with pytest.raises(ValueError, match="fixed_noise"):
        make_args(tmp_path, "tpo", ref_mode="precomputed")
    with pytest.raises(ValueError, match="kl_coef=0"):
        make_args(tmp_path, "catpo", ref_mode="precomputed")
    with pytest.raises(ValueError, match="use_lora"):
        make_args(tmp_path, ref_mode="adapter", use_lora=False)


def test_full_finetune_freezes_vision_and_trains_the_head(tmp_path):
    tiny = tiny_llava()
    records = synthetic_records(4, tiny)
    collator = TinyPreferenceCollator(tiny, "dpo")
    trainer = VPOTrainer(tiny.model, make_args(tmp_path, use_lora=False, ref_mode="model"),
                         ref_model=tiny_llava().model, train_dataset=records, data_collator=collator)
    model = trainer.model
    prefix = language_model_prefix(model) + "."
    with torch.no_grad():  # move the policy away from the reference
        g = torch.Generator().manual_seed(0)
        model.lm_head.weight.add_(0.05 * torch.randn(model.lm_head.weight.shape, generator=g))
    model.train()
    trainer.compute_loss(model, collator(records[:2])).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "lm_head.weight" in with_grad and any(n.startswith(prefix) for n in with_grad)
    assert all(n.startswith(prefix) or n == "lm_head.weight" for n in with_grad), sorted(with_grad)[:5]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)


def test_merge_and_save_gives_the_next_csr_iterate(tmp_path):
    from vpo.data import build_tiny_processor
    from vpo.trainer.modeling import load_model, merge_and_save

    trainer, tiny, collator, records = make_trainer(tmp_path, method="csr")
    perturb_lora(trainer.model)
    merge_and_save(trainer.model, str(tmp_path / "merged"), processor=build_tiny_processor("llava", tiny=tiny))
    merged, processor, _ = load_model(str(tmp_path / "merged"), dtype="float32")
    assert processor is not None and processor.image_token_id == tiny.image_token_id
    batch = collator(records[:2])
    with torch.no_grad():
        expected = backbone_hidden(trainer.model, batch)
        got = merged.model(**model_inputs(batch), use_cache=False).last_hidden_state[:, :-1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert any(hasattr(m, "lora_A") for m in trainer.model.modules())  # the trainer's adapter is untouched


def test_example_configs_parse():
    from vpo.trainer.cli import parse_config

    root = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert paths
    for path in paths:
        # The GPU examples ask for bf16, which TrainingArguments refuses on a machine without a bf16 GPU.
        extra = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
        cfg = parse_config(["--config", path] + extra)
        assert cfg.method in METHODS, path


def test_evaluate_logs_eval_metrics_and_skips(tmp_path):
    trainer, tiny, collator, records = make_trainer(tmp_path, "llava", "tpo", n=4, bad=(1,))
    trainer.eval_dataset = records
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and "eval_rewards/margins" in metrics and "eval_tpo/c_mean_chosen" in metrics
    assert metrics["eval_data/skipped_empty_response"] == 1
    assert trainer.prediction_step(trainer.model, collator([records[1]]), True) == (None, None, None)
