"""End to end on the shapes world, on CPU: each data-construction subcommand writes a dataset, ``vpo train`` trains on
it (both in-process through ``vpo.cli.main``), and the logs carry the method's metrics.

- ``vpo ovip`` (the offline builder) -> ``vpo train`` (``method: ovip``); and OViP ONLINE inside the trainer
  (``method: ovip, online: true``): sampling, judging and training timed separately in the logs;
- ``vpo csr --iterations 2 --train-config``: the iterative loop (build, train with the previous iterate as the
  reference, merge) twice;
- ``vpo lpoi-lists`` -> ``vpo train`` (``method: lpoi``): the listwise term;
- ``vpo mdpo-crops`` -> ``vpo train`` (``method: mdpo``): the conditional term, and the trainer sees exactly the
  recorded crop of every example, every epoch.

Tiny sizes throughout (a tiny LLaVA with the shapes world's vocabulary, 2-4 examples, 1-2 steps).
"""
import json
import math
import os

import pytest
import torch

from vpo.cli import main as vpo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models run fastest on one thread; the cores are shared
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The shapes world's preference data (4 records) and a tiny LLaVA folder whose processor knows its words."""
    from vpo.construct.csr import load_policy
    from vpo.worlds import shapes

    root = tmp_path_factory.mktemp("e2e")
    data = str(root / "shapes")
    shapes.make_dataset(data, 4, seed=0)
    model, processor = load_policy("tiny:llava")
    folder = str(root / "tiny_llava_shapes")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return {"root": root, "data": data, "model": folder}


def _config(path, **values):
    base = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1.0e-3, lora_r=4, lora_dropout=0.0,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                max_length=256)
    base.update(values)
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(base, f)
    return str(path)


def _train_logs(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        logs = [h for h in json.load(f)["log_history"] if "loss" in h]
    assert logs, "no training log"
    for h in logs:
        assert math.isfinite(h["loss"]), h
    return logs


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _train(tmp_path, name, **values):
    out = str(tmp_path / f"run_{name}")
    assert vpo(["train", "--config", _config(tmp_path / f"{name}.yaml", output_dir=out, **values)]) == 0
    return _train_logs(out)


# --------------------------------------------------------------------------------------------------------- OViP
def test_ovip_offline_builder_then_train(world, tmp_path, capsys):
    out = str(tmp_path / "ovip")
    assert vpo(["ovip", "--data", os.path.join(world["data"], "train.jsonl"), "--out", out, "--model", world["model"],
                "--k", "4", "--max-new-tokens", "6", "--prompts-per-step", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = _rows(os.path.join(out, "train.jsonl"))
    assert summary["records"] == len(rows) >= 2 and summary["responses"] == 16
    assert all(os.path.isfile(os.path.join(out, r["neg_image"])) and r["ovip"]["k"] == 4 for r in rows)
    logs = _train(tmp_path, "ovip", method="ovip", model_name_or_path=world["model"],
                  data_path=os.path.join(out, "train.jsonl"), max_steps=1)
    assert {"image/loss", "image/margin", "dpo/loss"} <= set(logs[0])


def test_ovip_online_in_the_trainer(world, tmp_path):
    logs = _train(tmp_path, "ovip_online", method="ovip", online=True, model_name_or_path=world["model"],
                  data_path=os.path.join(world["data"], "train.jsonl"), online_k=4, online_max_new_tokens=6,
                  online_buffer_size=2, online_prompts_per_step=2, per_device_train_batch_size=2, max_steps=2)
    assert len(logs) == 2
    for h in logs:
        for key in ("online/sampling_s", "online/scoring_s", "online/negatives_s", "online/training_s"):
            assert h[key] >= 0 and math.isfinite(h[key]), (key, h)
        assert h["online/training_s"] > 0 and h["online/sampling_s"] > 0
        assert {"image/loss", "dpo/loss"} <= set(h)
    # every step trained on buffer takes of fresh pairs (2 prompts x 4 samples per online step)
    assert sum(h.get("online/pairs", 0) for h in logs) >= 4
    assert all(h.get("online/responses", 8) % 4 == 0 for h in logs)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_online_batches_are_sampled_from_the_weights_of_the_step_before(world, tmp_path, accumulation):
    """Each step's pairs are sampled after the previous optimizer step (no look-ahead fetch), with the live policy."""
    from vpo.construct.csr import load_policy
    from vpo.data import PreferenceCollator
    from vpo.online import OViPOnlineDataset, ShapesNegativeGenerator, ShapesWorldJudge
    from vpo.trainer import VPOConfig, VPOTrainer

    model, processor = load_policy("tiny:llava")
    data = os.path.join(world["data"], "train.jsonl")
    calls, holder = [], {}

    def sample_fn(prompts, images, *, k, seed, keys):
        trainer = holder["trainer"]
        calls.append(trainer.state.global_step)
        # the ground truth twice and a wrong caption twice: sigma = 5 blocks pairing -> one fallback pair per prompt
        return [["a green cross.", "a green cross.", "nothing.", "nothing."] for _ in prompts]

    args = VPOConfig(output_dir=str(tmp_path / "o"), method="ovip", online=True, data_path=data, max_steps=3,
                     per_device_train_batch_size=2, use_cpu=True, report_to="none", lora_r=4, lora_dropout=0.0,
                     logging_steps=1, save_strategy="no", disable_tqdm=True,
                     gradient_accumulation_steps=accumulation)
    ds = OViPOnlineDataset(data, processor, judge=ShapesWorldJudge(), negatives=ShapesNegativeGenerator(),
                           buffer_size=2, prompts_per_step=2, sample_fn=sample_fn, k=4)
    trainer = holder["trainer"] = VPOTrainer(model, args, train_dataset=ds,
                                             data_collator=PreferenceCollator(processor, "llava", method="ovip"))
    assert ds.policy is None  # a sample_fn replaces the policy's own sampling
    trainer.train()
    # one sampling round per batch (micro-batch), after the previous optimizer update
    assert calls == [step for step in range(3) for _ in range(accumulation)]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["online/pairs"] for h in logs] == [2.0 * accumulation] * 3  # per optimizer step
    assert [h["online/fallback_pairs"] for h in logs] == [2.0 * accumulation] * 3
    assert all(h["online/training_s"] > 0 for h in logs)
    # without a sample_fn the trainer points the dataset at its (LoRA-wrapped) policy
    ds2 = OViPOnlineDataset(data, processor, judge=ShapesWorldJudge(), negatives=ShapesNegativeGenerator(),
                            buffer_size=2)
    t2 = VPOTrainer(load_policy("tiny:llava")[0], args, train_dataset=ds2,
                    data_collator=PreferenceCollator(processor, "llava", method="ovip"))
    assert ds2.policy is t2.model and hasattr(t2.model, "disable_adapter")
    with pytest.raises(ValueError, match="buffer"):
        VPOTrainer(load_policy("tiny:llava")[0], args, train_dataset=OViPOnlineDataset(
            data, processor, judge=ShapesWorldJudge(), negatives=ShapesNegativeGenerator(), buffer_size=3),
            data_collator=PreferenceCollator(processor, "llava", method="ovip"))


def _ddp_online_worker(out_dir: str) -> None:
    """``torchrun --nproc_per_node 2 THIS_FILE OUT_DIR``: online OViP under DDP (gloo, CPU) through ``vpo train``'s
    code path; each rank writes what it sampled from, its logs and a digest of its LoRA weights."""
    import hashlib

    from vpo.trainer.cli import parse_config, train

    torch.set_num_threads(1)
    trainer = train(parse_config(["--config", os.path.join(out_dir, "online.yaml")]))
    digest = hashlib.sha256()
    for name, p in sorted(trainer.model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().contiguous().numpy().tobytes())
    result = {"rows": [r["id"] for r in trainer._online.rows], "world_size": trainer.args.world_size,
              "logs": [h for h in trainer.state.log_history if "loss" in h], "params_sha256": digest.hexdigest()}
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)


def test_ovip_online_under_ddp_splits_prompts_by_rank(world, tmp_path):
    import socket
    import subprocess
    import sys

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    _config(tmp_path / "online.yaml", output_dir=str(tmp_path / "run"), method="ovip", online=True,
            model_name_or_path=world["model"], data_path=os.path.join(world["data"], "train.jsonl"), online_k=4,
            online_max_new_tokens=6, online_buffer_size=2, online_prompts_per_step=2, max_steps=2,
            ddp_backend="gloo")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), os.path.abspath(__file__), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["rows"]) == len(r1["rows"]) == 2 and not set(r0["rows"]) & set(r1["rows"])
    assert r0["logs"] == r1["logs"] and len(r0["logs"]) == 2  # metrics averaged over the ranks
    assert all(math.isfinite(h["loss"]) and h["online/training_s"] > 0 for h in r0["logs"])
    assert r0["params_sha256"] == r1["params_sha256"]  # gradients all-reduced


def test_online_config_errors(world):
    from vpo.trainer import VPOConfig

    data = os.path.join(world["data"], "train.jsonl")
    kw = dict(output_dir="/tmp/vpo-online-x", use_cpu=True, report_to="none", max_steps=1, data_path=data)
    with pytest.raises(ValueError, match="method='ovip'"):
        VPOConfig(method="dpo", online=True, **kw)
    with pytest.raises(ValueError, match="online_judge_url"):
        VPOConfig(method="ovip", online=True, online_judge="http", **kw)
    with pytest.raises(ValueError, match="max_steps"):
        VPOConfig(method="ovip", online=True, **{**kw, "max_steps": -1})
    with pytest.raises(ValueError, match="precomputed"):
        VPOConfig(method="ovip", online=True, ref_mode="precomputed", **kw)
    with pytest.raises(ValueError, match="dataloader_num_workers"):
        VPOConfig(method="ovip", online=True, dataloader_num_workers=2, **kw)
    cfg = VPOConfig(method="ovip", online=True, online_buffer_size=3, **kw)
    assert cfg.per_device_train_batch_size == 3 and cfg.ignore_data_skip


# ---------------------------------------------------------------------------------------------------------- CSR
def test_csr_iterations_end_to_end(world, tmp_path, capsys):
    out = str(tmp_path / "csr")
    cfg = _config(tmp_path / "csr.yaml", max_steps=1, per_device_train_batch_size=1)
    assert vpo(["csr", "--data", world["data"], "--out", out, "--model", "tiny:llava", "--iterations", "2",
                "--train-config", cfg, "--limit", "1", "--max-new-tokens", "3", "--num-candidates", "3",
                "--token-beams", "2", "--max-sentences", "1"]) == 0
    captured = capsys.readouterr()
    its = json.loads(captured.out)  # only the loop's summary: the Trainer's log lines go to stderr
    assert "--token-beams 2 is not a multiple of CSR's 5 beam groups: plain beam search" in captured.err
    pi0 = os.path.join(out, "iter0_model")
    assert [(i["iteration"], i["ref_model_path"], i["model_path"]) for i in its] == [
        (1, pi0, os.path.join(out, "iter1_model")), (2, os.path.join(out, "iter1_model"),
                                                     os.path.join(out, "iter2_model"))]
    for t in (1, 2):
        assert all(r["csr"]["iteration"] == t for r in _rows(os.path.join(out, f"iter{t}", "train.jsonl")))
        logs = _train_logs(os.path.join(out, f"iter{t}_run"))
        assert {"rewards/margins", "logps/chosen"} <= set(logs[0])
        assert os.path.isfile(os.path.join(out, f"iter{t}_model", "config.json"))
    # each iterate moved away from its reference (LoRA merged in)
    from vpo.construct.csr import load_policy

    w = [dict(load_policy(os.path.join(out, f"iter{t}_model"))[0].named_parameters()) for t in (0, 1, 2)]
    moved = [any(not torch.equal(w[t][n], w[t + 1][n]) for n in w[t]) for t in (0, 1)]
    assert moved == [True, True]


def test_make_csr_train_fn_errors(tmp_path):
    from vpo.trainer import make_csr_train_fn

    with pytest.raises(ValueError, match="precomputed"):
        make_csr_train_fn({"ref_mode": "precomputed"}, str(tmp_path))
    with pytest.raises(ValueError, match="no such file"):
        make_csr_train_fn(str(tmp_path / "missing.yaml"), str(tmp_path))


# --------------------------------------------------------------------------------------------------------- LPOI
def test_lpoi_lists_then_train(world, tmp_path, capsys):
    out = str(tmp_path / "lpoi")
    assert vpo(["lpoi-lists", "--data", world["data"], "--out", out, "--list-size", "3", "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2
    rows = _rows(os.path.join(out, "train.jsonl"))
    assert all(len(r["image_list"]) == 2 and r["lpoi"]["L"] == 3 for r in rows)
    logs = _train(tmp_path, "lpoi", method="lpoi", list_size=3, model_name_or_path=world["model"],
                  data_path=os.path.join(out, "train.jsonl"), max_steps=1)
    assert {"listwise/loss", "listwise/accuracy", "anchor/loss", "dpo/loss"} <= set(logs[0])


# --------------------------------------------------------------------------------------------------------- mDPO
def test_mdpo_crops_then_train_sees_the_recorded_crop(world, tmp_path, capsys, monkeypatch):
    from vpo.data import PreferenceCollator
    from vpo.trainer.trainer import VPOTrainer

    out = str(tmp_path / "mdpo")
    assert vpo(["mdpo-crops", "--data", world["data"], "--out", out, "--seed", "5", "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2
    recorded = {r["id"]: r["mdpo"]["crop_box"] for r in _rows(os.path.join(out, "train.jsonl"))}
    assert any(box != [0, 0, 64, 64] for box in recorded.values())

    # the crop the collator cuts for each example of each batch, and the ids of the batches the trainer trains on
    cut, trained = [], []
    example_crop_box, compute_loss = PreferenceCollator.example_crop_box, VPOTrainer.compute_loss

    def spy_crop(self, rec, *args):
        box = example_crop_box(self, rec, *args)
        cut.append((id(self), rec.id, list(box)))
        return box

    def spy_loss(self, model, inputs, *args, **kwargs):
        trained.extend(inputs["ids"])
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(PreferenceCollator, "example_crop_box", spy_crop)
    monkeypatch.setattr(VPOTrainer, "compute_loss", spy_loss)
    # the trainer's seed (0) differs from the crops' (5): only the recorded boxes can match; 2 steps = 2 epochs
    logs = _train(tmp_path, "mdpo", method="mdpo", model_name_or_path=world["model"],
                  data_path=os.path.join(out, "train.jsonl"), max_steps=2, seed=0)
    assert {"conditional/loss", "conditional/margin", "anchor/loss", "dpo/loss"} <= set(logs[0])
    assert len(trained) == 4 and set(trained) == set(recorded)  # every example twice
    # the training collator's crops (the pre-flight probe of scored tokens crops with a copy of it first)
    cut = [(i, box) for who, i, box in cut if who == cut[-1][0]]
    assert [i for i, _ in cut] == trained and all(box == recorded[i] for i, box in cut)


def test_collator_crop_is_fixed_with_fixed_noise_and_honours_the_record(world):
    from PIL import Image

    from vpo.data import PreferenceCollator, read_preference_jsonl
    from vpo.data.collator import crop_box

    from vpo.construct.csr import load_policy

    _, processor = load_policy("tiny:llava")
    records, _ = read_preference_jsonl(os.path.join(world["data"], "train.jsonl"))
    W, H = Image.open(records[0].image).size
    fixed = PreferenceCollator(processor, "llava", method="mdpo", seed=3, fixed_noise=True)
    drawn = PreferenceCollator(processor, "llava", method="mdpo", seed=3)
    ids = [r.id for r in records]

    def boxes(collator):
        out = [collator.example_crop_box(r, W, H, collator.draw) for r in records]
        batch = collator(records)  # the crop pass encodes those very crops
        for b, (r, box) in enumerate(zip(records, out)):
            img = Image.open(r.image).convert("RGB")
            ref = processor(text=["USER: <image>"], images=[img.crop(box).resize(img.size, Image.Resampling.BICUBIC)],
                            return_tensors="pt")["pixel_values"]
            assert torch.equal(batch["sub"]["crop"]["pixel_values"][b:b + 1], ref)
        return out

    first = [boxes(fixed) for _ in range(3)]
    assert first[0] == first[1] == first[2] == [crop_box(i, W, H, seed=3, draw=0) for i in ids]
    per_call = [boxes(drawn) for _ in range(3)]
    assert per_call[0] == first[0] and per_call[1] != per_call[0]
    records[0].extra["mdpo"] = {"crop_box": [1, 2, 60, 61]}
    assert boxes(drawn)[0] == (1, 2, 60, 61) and boxes(fixed)[0] == (1, 2, 60, 61)
    records[0].extra["mdpo"] = {"crop_box": [0, 0, 65, 64]}  # outside the image: skipped, not redrawn
    with pytest.warns(Warning, match="crop_box"):
        batch = drawn(records)
    assert batch["skipped"] == {"bad_field": 1} and records[0].id not in batch["ids"]


if __name__ == "__main__":
    import sys

    _ddp_online_worker(sys.argv[1])
    from vpo.testing import end_process_group

    end_process_group()  # every rank done before gloo is torn down
