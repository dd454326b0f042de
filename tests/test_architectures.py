"""Every tiny image-text-to-text architecture trains correctly through the generic collator or is refused in one line
(issue 20): the trainer's log-probs equal the model's own on the scored tokens, no response token sees a later one,
LoRA adapts only plain linear layers of the language model, DPO and TPO train, and ``vpo train`` runs a saved folder.

Architectures whose head soft-caps or scales its logits (PaliGemma 2, Gemma 3n, Aya Vision) need the fused functions'
``logit_softcap`` / ``logit_scale``: until this vpo build has them they are refused before any data is read (tested),
and their equality tests are skipped with that reason."""
import copy
import inspect
import json
import math
import warnings

import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

import vpo  # noqa: E402
from vpo.data import PreferenceCollator, record_from_row  # noqa: E402
from vpo.models.tiny_generic import ARCHS as GENERIC_ARCHS  # noqa: E402
from vpo.models.tiny_zoo import ZOO, tiny_architecture  # noqa: E402
from vpo.testing import check_causal, check_logprobs_match_model, trainer_and_model_logprobs  # noqa: E402
from vpo.trainer import methods  # noqa: E402
from vpo.trainer.passes import Passes  # noqa: E402
from vpo.trainer.reference import Reference  # noqa: E402
from vpo.trainer import VPOConfig, VPOTrainer  # noqa: E402
from vpo.trainer.modeling import apply_lora, head_transform, language_model_prefix  # noqa: E402

ARCHITECTURES = sorted((*GENERIC_ARCHS, *ZOO))
HEAD_KEYWORDS = set(inspect.signature(vpo.fused_dpo_loss).parameters)
NEEDS = {"paligemma2": "logit_softcap", "gemma3n": "logit_softcap", "aya_vision": "logit_scale"}  # their heads
COLORS = ["red", "green", "blue", "white"]


def rows(n=2):
    return [{"id": f"r{i}", "images": [Image.new("RGB", (24, 16), COLORS[i % 4])], "prompt": "what color is the cat ?",
             "chosen": f"the cat is {COLORS[i % 4]} .", "rejected": f"the cat is {COLORS[(i + 1) % 4]} . it is big"}
            for i in range(n)]


def supported(arch) -> bool:
    return NEEDS.get(arch) is None or NEEDS[arch] in HEAD_KEYWORDS


def skip_unsupported(arch):
    if not supported(arch):
        pytest.skip(f"{arch} needs vpo.fused_dpo_loss(..., {NEEDS[arch]}=...), which this build does not have yet")


def test_at_least_16_architectures():
    assert len(ARCHITECTURES) >= 16


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logprobs_equal_the_models(arch):
    skip_unsupported(arch)
    model, proc = tiny_architecture(arch)
    batch = PreferenceCollator(proc, "generic", method="tpo")([record_from_row(r) for r in rows()])
    assert batch["skipped"] == {} and batch["input_ids"].shape[0] == 4
    check_logprobs_match_model(model, batch, atol=1e-4)
    check_logprobs_match_model(model, dict(batch["sub"]["noised"]), atol=1e-4)
    text = proc.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    assert "red" in text and "image" not in text.lower()
    # the fused DPO loss gets the same head (soft-cap / logit scale included): its logps metrics are the model's
    ours, theirs = trainer_and_model_logprobs(model, batch)
    with torch.no_grad():
        p = Passes(batch, model, Reference("model", model=model), need_grad=False, impl="torch")
        _, metrics = methods.dpo(p, VPOConfig(output_dir="unused", report_to="none", use_cpu=True, loss_impl="torch"))
        per_row = torch.zeros(4, dtype=torch.float64).index_add_(
            0, (p.labels() != -100).nonzero()[:, 0], theirs)  # [2B] the model's Σ logp per row
    assert float(metrics["logps/chosen"]) == pytest.approx(float(per_row[:2].mean()), abs=1e-3)
    assert float(metrics["logps/rejected"]) == pytest.approx(float(per_row[2:].mean()), abs=1e-3)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_responses_are_causal(arch):
    model, proc = tiny_architecture(arch)
    batch = PreferenceCollator(proc, "generic", method="dpo")([record_from_row(r) for r in rows()])
    for row in (0, 3):  # a chosen row and the longest rejected one
        check_causal(model, batch, row=row, atol=1e-5)


def test_causality_check_catches_paligemmas_prefix_types():
    """With response tokens typed 0 (PaliGemma's bidirectional prefix), as the collator did before, a response token
    sees the later ones and the check fails."""
    model, proc = tiny_architecture("paligemma")
    batch = PreferenceCollator(proc, "generic", method="dpo")([record_from_row(r) for r in rows()])
    assert (batch["token_type_ids"][batch["labels"] != -100] == 1).all()
    check_causal(model, batch, row=0)
    bad = dict(batch, token_type_ids=torch.zeros_like(batch["token_type_ids"]))
    with pytest.raises(AssertionError, match="sees a later one"):
        check_causal(model, bad, row=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_adapts_plain_linear_layers_of_the_language_model_only(arch):
    model, _ = tiny_architecture(arch)
    prefix = language_model_prefix(model) + "."
    head = model.get_output_embeddings()
    want = {n for n, m in model.named_modules() if n.startswith(prefix) and type(m) is torch.nn.Linear
            and m is not head and n.rsplit(".", 1)[-1] not in ("router", "gate")}
    peft = apply_lora(model, r=2, dropout=0.0)
    adapted = {n for n, m in peft.get_base_model().named_modules() if hasattr(m, "lora_A")}
    assert adapted == want and adapted
    if arch == "llama4":  # the MoE router (an nn.Linear subclass returning a tuple) is left out
        assert any(n.endswith(".router") for n, _ in model.named_modules())
        assert not any(n.endswith(".router") for n in adapted)
    if arch == "gemma3n":  # altup_projections.0 is adapted as itself: its leaf "0" reaches no decoder layer
        assert any(".altup_projections.0" in n for n in adapted)
        assert not any(n.endswith(".layers.0") for n in adapted)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dpo_and_tpo_train_two_steps(arch, tmp_path):
    import datasets

    skip_unsupported(arch)
    fresh, proc = tiny_architecture(arch)
    for method in ("dpo", "tpo"):
        model = copy.deepcopy(fresh)
        args = VPOConfig(output_dir=str(tmp_path / method), method=method, max_steps=2, per_device_train_batch_size=1,
                         learning_rate=5e-3, report_to="none", use_cpu=True, lora_dropout=0.0, lora_r=2,
                         logging_steps=1, save_strategy="no", disable_tqdm=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = VPOTrainer(model, args, train_dataset=datasets.Dataset.from_list(rows(2)),
                                 processing_class=proc)
            trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs), (method, logs)
        assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA starts at the reference
        assert logs[-1]["num_tokens/chosen"] > 0
        lora = [q for n, q in trainer.model.named_parameters() if "lora_B" in n]
        assert lora and any(q.abs().sum() > 0 for q in lora), method  # the adapter moved


# `vpo train` from a saved folder: architectures whose processor AutoProcessor reloads without torchvision
CLI_ARCHS = ["mllama", "vipllava", "aya_vision"]


@pytest.mark.parametrize("arch", CLI_ARCHS)
def test_vpo_train_from_a_saved_folder(arch, tmp_path):
    from vpo.trainer.cli import train_main

    skip_unsupported(arch)
    model, proc = tiny_architecture(arch)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    lines = []
    for i, r in enumerate(rows(4)):
        r["images"][0].save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"id": r["id"], "image": f"{i}.png", "prompt": r["prompt"], "chosen": r["chosen"],
                                 "rejected": r["rejected"]}))
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main(["--model_name_or_path", str(folder), "--data", str(data), "--output_dir", str(out),
                           "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true",
                           "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
                           "--logging_steps", "1", "--lora_r", "2"]) == 0
    card = (out / "README.md").read_text()
    assert "| method | dpo |" in card and "num_tokens/chosen | 0 |" not in card


def test_head_transforms_are_read_from_the_config():
    assert head_transform(tiny_architecture("paligemma2")[0]) == (30.0, None)
    assert head_transform(tiny_architecture("aya_vision")[0]) == (None, 0.5)
    assert head_transform(tiny_architecture("gemma3n")[0]) == (30.0, None)
    assert head_transform(tiny_architecture("paligemma")[0]) == (None, None)
    # Gemma 3's *ForConditionalGeneration does not apply its text config's cap: nothing to apply here either
    model, _ = tiny_architecture("gemma3")
    model.config.text_config.final_logit_softcapping = 30.0
    assert head_transform(model) == (None, None)


@pytest.mark.parametrize("arch", sorted(NEEDS))
def test_a_loss_without_the_head_transform_is_refused_in_one_line(arch):
    """Every vpo loss takes logit_softcap / logit_scale; a loss function that does not (a user's, an older build's)
    is refused in one line naming the model type and the keyword, instead of training on the wrong log-probs."""
    from vpo.trainer.modeling import head_kwargs

    model, _ = tiny_architecture(arch)
    transform = head_transform(model)
    assert head_kwargs(vpo.fused_dpo_loss, transform, model.config.model_type) == {
        k: v for k, v in zip(("logit_softcap", "logit_scale"), transform) if v is not None}

    def plain_loss(weight, hidden, labels):
        return hidden.sum()

    with pytest.raises(ValueError) as err:
        head_kwargs(plain_loss, transform, model.config.model_type)
    msg = str(err.value)
    assert "\n" not in msg and model.config.model_type in msg and NEEDS[arch] in msg and "plain_loss" in msg


def test_a_processor_needing_torchvision_is_one_line_naming_the_extra(tmp_path, capsys):
    """InternVL's saved processor loads a torchvision video processor: `vpo train` stops in one line naming it."""
    from vpo.trainer.cli import train_main

    model, proc = tiny_architecture("internvl")
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed: nothing to refuse")
    except ImportError:
        pass
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "a", "image": "a.png", "prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    code = train_main(["--model_name_or_path", str(folder), "--data", str(data), "--output_dir", str(tmp_path / "o"),
                       "--max_steps", "1", "--use_cpu", "true", "--report_to", "none"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code != 0 and len(err) == 1
    assert "internvl: its processor needs torchvision" in err[0] and "vpo[vision]" in err[0]


def test_mllama_cross_attention_mask_covers_the_row_and_a_mismatch_names_the_input():
    from vpo.data.encoding import _cat_vision
    from vpo.trainer.passes import forward_hidden, model_inputs

    model, proc = tiny_architecture("mllama")
    batch = PreferenceCollator(proc, "generic", method="dpo")([record_from_row(r) for r in rows()])
    mask, attn = batch["cross_attention_mask"], batch["attention_mask"]
    assert mask.shape[:2] == batch["input_ids"].shape
    sees = mask[..., 0, 0].bool()
    assert sees[batch["labels"] != -100].all() and not sees[attn == 0].any()  # the response sees it, padding not
    short = dict(batch, cross_attention_mask=mask[:, :10])  # as the prompt-only processor output was
    with pytest.raises(ValueError, match=r"^mllama: model input cross_attention_mask has shape \(4, 10, 1, 1\) but "
                                         r"input_ids has shape \(4, \d+\)"):
        forward_hidden(model, model_inputs(short))
    with pytest.raises(ValueError, match="^MllamaProcessor: cannot batch vision input pixel_values: its rank differs"):
        _cat_vision([{"pixel_values": torch.zeros(1, 3)}, {"pixel_values": torch.zeros(1, 3, 2)}], "MllamaProcessor")


@pytest.mark.parametrize("arch", sorted(NEEDS))
def test_the_head_transform_read_from_the_config_reproduces_the_models_logits(arch):
    """Independent of the fused functions' new keywords: the trainer's hidden states through the LM head, transformed
    as head_transform says (materialized here), give the model's own log-probs on the scored tokens."""
    from vpo.trainer.passes import Passes, model_inputs
    from vpo.trainer.reference import Reference

    model, proc = tiny_architecture(arch)
    batch = PreferenceCollator(proc, "generic", method="dpo")([record_from_row(r) for r in rows()])
    softcap, scale = head_transform(model)
    with torch.no_grad():
        p = Passes(batch, model, Reference("model", model=model), need_grad=False, impl="torch")
        z = (p.hidden().double() @ p.weight.double().T)  # [R, T, V]
        z = z * scale if scale is not None else z
        z = softcap * torch.tanh(z / softcap) if softcap is not None else z
        logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1][:, p.window()].double()
    labels = p.labels()
    mask = labels != -100
    ours = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0][mask]
    theirs = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0][mask]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    plain = torch.log_softmax(p.hidden().double() @ p.weight.double().T, -1)
    plain = plain.gather(-1, labels.clamp_min(0)[..., None])[..., 0][mask]
    assert (plain - theirs).abs().max() > 1e-3  # without the transform the log-probs are not the model's


def test_a_model_without_a_linear_head_is_refused_before_any_data_is_read(tmp_path):
    model, proc = tiny_architecture("llava_generic")
    model.get_output_embeddings = lambda: None  # e.g. a model whose head is not an nn.Linear

    class Unreadable(torch.utils.data.Dataset):
        def __len__(self):
            raise AssertionError("the data was read")

    with pytest.raises(ValueError, match=r"^llava: LlavaForConditionalGeneration.get_output_embeddings\(\) returned "
                                         r"no linear head") as err:
        VPOTrainer(model, VPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                   train_dataset=Unreadable(), processing_class=proc)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ["paligemma", "paligemma2", "mllama"])
def test_catpo_on_a_model_the_capture_cannot_read_is_refused_before_any_data(arch, tmp_path):
    """Cat-PO's image-attention capture needs causal self-attention over the image tokens: PaliGemma's bidirectional
    prefix and Mllama's cross-attention are refused in one line when the trainer is built, not at the first step."""
    model, proc = tiny_architecture(arch)

    class Unreadable(torch.utils.data.Dataset):
        def __len__(self):
            raise AssertionError("the data was read")

        def __getitem__(self, i):
            raise AssertionError("the data was read")

    args = VPOConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, method="catpo")
    with pytest.raises(ValueError) as err:
        VPOTrainer(model, args, train_dataset=Unreadable(), processing_class=proc)
    msg = str(err.value)
    assert "\n" not in msg and model.config.model_type in msg and "catpo" in msg
    VPOTrainer(model, VPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, report_to="none", use_cpu=True),
               train_dataset=[], processing_class=proc)  # DPO on the same model is accepted

