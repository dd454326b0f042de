"""Any image-text-to-text model: tiny random LLaVA-NeXT, Gemma 3, Idefics3 (SmolVLM) and Qwen3-VL, each with its real
processor, train through the GENERIC collator (no family-specific code) and VPOTrainer's TRL-style construction."""
import math
import warnings

import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from vpo.data import PreferenceCollator, record_from_row  # noqa: E402
from vpo.models.tiny_generic import ARCHS, tiny_generic  # noqa: E402
from vpo.trainer import VPOConfig, VPOTrainer  # noqa: E402
from vpo.trainer.passes import Passes, forward_hidden, model_inputs  # noqa: E402
from vpo.trainer.reference import Reference  # noqa: E402

COLORS = ["red", "green", "blue", "white"]


def rows(n=4, images=1):
    out = []
    for i in range(n):
        c, other = COLORS[i % 4], COLORS[(i + 1) % 4]
        imgs = [Image.new("RGB", (24, 16), c) for _ in range(images)]
        out.append({"id": f"r{i}", "images": imgs, "prompt": "what color is the cat ?", "chosen": f"the cat is {c} .",
                    "rejected": f"the cat is {other} ."})
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_generic_collator_logps_match_full_logits(arch):
    """The backbone hook + lm_head give the same per-sequence log-probs as the model's own logits."""
    model, proc = tiny_generic(arch)
    col = PreferenceCollator(proc, "generic", method="dpo")
    batch = col([record_from_row(r) for r in rows(2)])
    assert batch["skipped"] == {} and batch["input_ids"].shape[0] == 4
    p = Passes(batch, model, Reference("model", model=model), need_grad=False, impl="torch")
    got = p.logps()
    with torch.no_grad():
        logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    want = (lp * mask).sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # the labels are exactly the response tokens (+ end of turn), never image tokens
    text = proc.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    assert "red" in text and "image" not in text


@pytest.mark.parametrize("arch", ARCHS)
def test_generic_model_trains_with_processing_class(arch, tmp_path):
    import datasets

    model, proc = tiny_generic(arch)
    args = VPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=5e-3,
                     report_to="none", use_cpu=True, lora_dropout=0.0, logging_steps=1, save_strategy="no",
                     disable_tqdm=True)
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = VPOTrainer(model, args, train_dataset=datasets.Dataset.from_list(rows(4)), processing_class=proc)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA starts at the reference
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "num_tokens/chosen"):
        assert key in logs[-1]
    lora = [q for n, q in trainer.model.named_parameters() if "lora_B" in n]
    assert lora and any(q.abs().sum() > 0 for q in lora)  # the adapter moved
    base = dict(trainer.model.get_base_model().named_parameters())
    assert all(torch.equal(base[n], v) for n, v in before.items() if n in base)  # base weights frozen


def test_several_images_per_example_train(tmp_path):
    model, proc = tiny_generic("idefics3")
    col = PreferenceCollator(proc, "generic", method="dpo")
    batch = col([record_from_row(r) for r in rows(2, images=2)])
    assert batch["pixel_values"].shape[:2] == (4, 2)  # two images per row
    h = forward_hidden(model, model_inputs(batch))
    assert h.shape[0] == 4 and torch.isfinite(h).all()


def test_saved_folder_loads_through_auto_classes(tmp_path):
    """A model folder that AutoModelForImageTextToText + AutoProcessor load trains by `vpo train` (generic family)."""
    from vpo.trainer.cli import train_main
    from vpo.trainer.modeling import load_model
    from vpo.trainer.trl_compat import family_for

    model, proc = tiny_generic("llava_next")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    loaded, lproc, tiny = load_model(str(folder))
    assert tiny is None and type(loaded).__name__ == "LlavaNextForConditionalGeneration"
    assert family_for(loaded) == "generic" and type(lproc).__name__ == "LlavaNextProcessor"
    import json

    data = tmp_path / "train.jsonl"
    for i, r in enumerate(rows(4)):
        r["images"][0].save(tmp_path / f"{i}.png")
    data.write_text("".join(json.dumps({"id": r["id"], "image": f"{i}.png", "prompt": r["prompt"], "chosen": r["chosen"],
                                        "rejected": r["rejected"]}) + "\n" for i, r in enumerate(rows(4))))
    out = tmp_path / "run"
    assert train_main(["--model_name_or_path", str(folder), "--data", str(data), "--output_dir", str(out),
                       "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true",
                       "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
                       "--logging_steps", "1"]) == 0
    card = (out / "README.md").read_text()
    assert str(folder) in card and "| method | dpo |" in card and "rewards/accuracies" in card
