"""TRL's habits: VPOTrainer(model, args, train_dataset, processing_class=..., peft_config=...), the collator from the
processor, a frozen reference copy for full fine-tuning, datasets opened (and refused when nothing survives)."""
import warnings

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

from vpo.data import PreferenceCollator, build_tiny_processor  # noqa: E402
from vpo.data.sources import NoUsableRecordError  # noqa: E402
from vpo.models import tiny_llava  # noqa: E402
from vpo.trainer import VPOConfig, VPOTrainer  # noqa: E402

COLORS = ["red", "green", "blue", "white"]


def trl_dataset():
    rows = [{"images": [Image.new("RGB", (24, 24), c)],
             "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"{c} ."}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "black ."}]}]} for c in COLORS]
    return datasets.Dataset.from_list(rows)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                report_to="none", use_cpu=True, lora_dropout=0.0, logging_steps=1, save_strategy="no",
                disable_tqdm=True)
    base.update(kw)
    return VPOConfig(**base)


@pytest.fixture(scope="module")
def proc():
    return build_tiny_processor("llava", tiny=tiny_llava())


def test_full_fine_tuning_gets_a_frozen_reference_copy(tmp_path, proc):
    model = tiny_llava().model
    a = args(tmp_path, use_lora=False)
    assert a.ref_mode == "model"  # auto -> a separate reference without LoRA
    trainer = VPOTrainer(model, a, train_dataset=trl_dataset(), processing_class=proc)
    assert isinstance(trainer.data_collator, PreferenceCollator) and trainer.data_collator.family == "llava"
    ref = trainer.ref_model
    assert ref is not None and ref is not model and not any(p.requires_grad for p in ref.parameters())
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    head0 = model.get_output_embeddings().weight.detach().clone()
    trainer.train()
    assert not torch.equal(model.get_output_embeddings().weight, head0)  # the policy trained
    assert all(torch.equal(before[n], p) for n, p in ref.named_parameters())  # the reference did not
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "num_tokens/chosen", "entropy/chosen"):
        assert key in logs[-1], key


def test_peft_config_is_applied_and_the_reference_is_the_adapter_off(tmp_path, proc):
    from peft import LoraConfig

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    a = args(tmp_path, max_steps=1)
    trainer = VPOTrainer(tiny_llava().model, a, train_dataset=trl_dataset(), processing_class=proc, peft_config=cfg)
    assert hasattr(trainer.model, "peft_config") and trainer.model.peft_config["default"].r == 2
    assert trainer.ref_model is None and trainer.reference.mode == "adapter"
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # adapter starts at 0
    with pytest.raises(ValueError, match="lm_head"):
        VPOTrainer(tiny_llava().model, a, train_dataset=trl_dataset(), processing_class=proc,
                   peft_config=LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))


def test_without_collator_or_processor_and_bad_heads(tmp_path, proc):
    with pytest.raises(ValueError, match="processing_class"):
        VPOTrainer(tiny_llava().model, args(tmp_path), train_dataset=trl_dataset())
    with pytest.raises(ValueError, match="processing_class must be the model's multimodal processor"):
        VPOTrainer(tiny_llava().model, args(tmp_path), train_dataset=trl_dataset(), processing_class=proc.tokenizer)
    # LLaVA's forward never soft-caps, whatever its config says: nothing to refuse (a model whose head does:
    # tests/test_architectures.py, refused before any data while the fused losses lack logit_softcap)
    model = tiny_llava().model
    model.config.text_config.final_logit_softcapping = 30.0
    VPOTrainer(model, args(tmp_path), train_dataset=trl_dataset(), processing_class=proc)


def test_a_dataset_with_no_usable_record_fails_before_training(tmp_path, proc):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoUsableRecordError, match="missing field 'image'"):
            VPOTrainer(tiny_llava().model, args(tmp_path, data_layout="vpo"), train_dataset=trl_dataset(),
                       processing_class=proc)


def test_rows_and_paths_as_train_dataset(tmp_path, proc):
    rows = [{"image": Image.new("RGB", (24, 24), c), "prompt": "what color ?", "chosen": f"{c} .",
             "rejected": "black ."} for c in COLORS]
    trainer = VPOTrainer(tiny_llava().model, args(tmp_path, max_steps=1), train_dataset=rows, eval_dataset=rows[:2],
                         processing_class=proc)
    assert len(trainer.train_dataset) == 4 and trainer.train_dataset.stats.kept == 4
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_rewards/accuracies" in metrics and metrics["eval_loss"] > 0


def test_data_path_of_the_config_when_no_dataset_is_passed(tmp_path, proc):
    import json

    for i, c in enumerate(COLORS):
        Image.new("RGB", (24, 24), c).save(tmp_path / f"{i}.png")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "prompt": "what color ?",
                                                          "chosen": f"{c} .", "rejected": "black ."}) + "\n"
                                              for i, c in enumerate(COLORS)))
    trainer = VPOTrainer(tiny_llava().model, args(tmp_path / "o", data_path=str(tmp_path / "d.jsonl")),
                         processing_class=proc)
    assert len(trainer.train_dataset) == 4 and trainer.eval_dataset is None


def test_the_data_it_reads_gets_one_summary_of_what_was_skipped(tmp_path, proc, caplog):
    """VPOTrainer logs the line `vpo train` prints for each file (vpo.trainer.data_report), once per dataset it reads
    itself, only when records were skipped; a dataset the caller opened is the caller's to report."""
    import json
    import logging

    from vpo.data import open_preference_data
    from vpo.trainer.data_report import data_summary

    for i, c in enumerate(COLORS):
        Image.new("RGB", (24, 24), c).save(tmp_path / f"{i}.png")
    good = [json.dumps({"image": f"{i}.png", "prompt": "what color ?", "chosen": f"{c} .", "rejected": "black ."})
            for i, c in enumerate(COLORS)]
    (tmp_path / "d.jsonl").write_text("\n".join(good + ["{not json", json.dumps({"image": "0.png", "prompt": "x",
                                                                                  "answer": "y ."})]) + "\n")
    (tmp_path / "clean.jsonl").write_text("\n".join(good) + "\n")
    rows = trl_dataset().to_list()
    rows.append(dict(rows[0], chosen=None))  # no chosen response

    def logged(**data):
        caplog.clear()
        with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="vpo.trainer"):
            warnings.simplefilter("ignore")  # the per-record DataWarnings are the reader's, tested in test_data.py
            trainer = VPOTrainer(tiny_llava().model, args(tmp_path / "o", image_root=str(tmp_path)),
                                 processing_class=proc, **data)
        return trainer, [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("vpo.trainer")]

    path = str(tmp_path / "d.jsonl")
    trainer, lines = logged(train_dataset=path, eval_dataset=datasets.Dataset.from_list(rows))
    assert lines == [
        (logging.WARNING, f"vpo: train data {path}: kept 4 of 6 records; skipped 2 (bad_json 1, missing_field 1); "
                          "columns found: image, prompt, chosen, rejected, answer"),
        (logging.WARNING, "vpo: eval data datasets.Dataset (5 rows): kept 4 of 5 records; skipped 1 (missing_field "
                          "1); columns found: images, prompt, chosen, rejected"),
    ]
    # the command line's line, from the same function: only the speaker differs
    assert data_summary("train", path, trainer.train_dataset, prefix="vpo train") == "vpo train" + lines[0][1][3:]
    assert logged(train_dataset=str(tmp_path / "clean.jsonl"))[1] == []  # nothing skipped: nothing said
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opened = open_preference_data(path, image_root=str(tmp_path))
    assert logged(train_dataset=opened)[1] == []  # opened (and reported) by the caller, as vpo train does


def test_data_summary_checks_its_arguments():
    from types import SimpleNamespace

    from vpo.data import DataStats
    from vpo.trainer.data_report import data_summary, describe_source

    read = SimpleNamespace(stats=DataStats(seen=2, kept=2))
    assert data_summary("eval", [{"a": 1}, {"a": 2}], read) == "vpo: eval data 2 rows: kept 2 of 2 records"
    assert data_summary("eval", "x.jsonl", object()) is None  # no reader stats: nothing to say
    assert describe_source(3) == "int"
    with pytest.raises(ValueError, match="^name must be a non-empty string"):
        data_summary("", "x.jsonl", read)
    with pytest.raises(ValueError, match="^prefix must be a non-empty string"):
        data_summary("train", "x.jsonl", read, prefix=None)
