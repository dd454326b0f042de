"""The `vpo` command line: the README's main job runs, and what it prints is right."""
import json
import re
import subprocess
import sys

import pytest

VPO = [sys.executable, "-m", "vpo.cli"]


def _run(*args, timeout=300):
    return subprocess.run([*VPO, *args], capture_output=True, text=True, timeout=timeout)


def test_demo_help_lists_its_options():
    # The quick demo itself runs end to end in tests/test_demo.py.
    res = _run("demo", "--help")
    assert res.returncode == 0, res.stderr
    for opt in ("--quick", "--out", "--seed", "--methods", "--steps", "--sft-steps", "--threads", "--impl"):
        assert opt in res.stdout


def test_info_lists_availability():
    res = _run("info")
    assert res.returncode == 0, res.stderr
    for key in ("cpp", "cuda_ext", "cuda_device", "triton"):
        assert re.search(rf"^\s+{key}\s+(True|False)$", res.stdout, flags=re.M), res.stdout


def test_help_lists_every_subcommand():
    res = _run("--help")
    assert res.returncode == 0
    for cmd in ("demo", "eval", "visualize", "info", "train", "precompute-ref", "csr", "lpoi-lists", "mdpo-crops"):
        assert cmd in res.stdout


@pytest.mark.parametrize("args", [["demo", "--impl", "fast"], ["nope"], ["visualize", "pictures"]])
def test_bad_arguments_exit_nonzero_with_a_message(args):
    res = _run(*args)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_demo_rejects_unknown_methods():
    res = _run("demo", "--methods", "tpo,ppo")
    assert res.returncode == 2 and "--methods" in res.stderr


def test_demo_compare_runs_one_worker_per_seed_by_default(monkeypatch):
    from vpo.demo_cli import default_jobs

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_jobs(3) == 3 and default_jobs(1) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert default_jobs(3) == 1
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert default_jobs(3) == 1


@pytest.mark.parametrize("args,flag", [(["--jobs", "0"], "--jobs"), (["--threads", "0"], "--threads"),
                                       (["--steps", "0"], "--steps"), (["--seeds", "a,b", "--methods", "all"], "--seeds")])
def test_demo_usage_errors_name_the_flag(args, flag, tmp_path):
    res = _run("demo", "--out", str(tmp_path / "out"), *args)
    assert res.returncode == 2 and flag in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


# ------------------------------------------------------------------------------------------------ vpo train manners
def test_train_help_is_short_and_puts_config_and_method_first():
    res = _run("train", "--help")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) <= 100
    head = "\n".join(lines[:30])
    for opt in ("--config", "--data", "--help-all", "--debug", "--method", "--loss_type"):
        assert opt in head, opt
    assert res.stdout.index("--method") < res.stdout.index("--per_device_train_batch_size")
    assert "--adam_beta1" not in res.stdout  # the full TrainingArguments stay behind --help-all


def test_train_help_all_lists_every_training_argument(capsys):
    from vpo.trainer.cli import train_main

    assert train_main(["--help-all"]) == 0
    out = capsys.readouterr().out
    assert "--adam_beta1" in out and "--method" in out and len(out.splitlines()) > 200


def test_train_without_config_or_data_is_a_usage_error_and_writes_nothing(tmp_path):
    res = subprocess.run([*VPO, "train"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2
    assert "usage: vpo train" in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []  # no silent synthetic run, no ./trainer_output
    res = subprocess.run([*VPO, "train", "--data", "d.jsonl"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 2 and "--model_name_or_path" in res.stderr  # never a random tiny model on real data


def _one_line_error(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vpo train: error:")]
    assert len(err) == 1, err
    return err[0]


def test_missing_model_folder_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from vpo.trainer.cli import train_main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": "a.png", "prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    argv = ["--model_name_or_path", str(tmp_path / "no-such-model"), "--data", str(data),
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    assert train_main(argv) == 1
    line = _one_line_error(capsys)
    assert "no-such-model" in line and "Repo id" not in line
    with pytest.raises(ValueError, match="no-such-model"):
        train_main(argv + ["--debug"])


def test_unreadable_or_all_skipped_data_names_the_first_reason(tmp_path, capsys):
    from vpo.trainer.cli import train_main

    common = ["--model_name_or_path", "tiny:llava", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
              "--max_steps", "1", "--report_to", "none"]
    # a TRL-layout file read as vpo's layout: every record misses 'image' (the silent zero-loss run)
    trl = tmp_path / "trl.jsonl"
    trl.write_text("".join(json.dumps({"images": ["a.png"], "prompt": "what ?", "chosen": "a .", "rejected": "b ."})
                           + "\n" for _ in range(3)))
    assert train_main(common + ["--data", str(trl), "--data_layout", "vpo"]) == 1
    line = _one_line_error(capsys)
    assert "all 3 records were skipped" in line and "missing field 'image'" in line
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\x01 not json\n")
    assert train_main(common + ["--data", str(garbage)]) == 1
    assert "bad_json" in _one_line_error(capsys)
    assert train_main(common + ["--data", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl" in _one_line_error(capsys)


def test_synthetic_data_when_named_and_a_filled_model_card(tmp_path):
    from vpo.trainer.cli import train_main

    out = tmp_path / "run"
    assert train_main(["--model_name_or_path", "tiny:llava", "--data", "synthetic:4", "--output_dir", str(out),
                       "--max_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu", "true",
                       "--report_to", "none", "--logging_steps", "1", "--lora_dropout", "0.0",
                       "--disable_tqdm", "true", "--loss_type", "sigmoid,sft", "--loss_weights", "1.0,0.5"]) == 0
    card = (out / "README.md").read_text()
    for text in ("base_model: tiny:llava", "| method | dpo |", "sigmoid, 0.5·sft", "`synthetic:4`",
                 "rewards/accuracies", "logps/chosen", "LoRA r=8", "| steps | 2"):
        assert text in card, text
