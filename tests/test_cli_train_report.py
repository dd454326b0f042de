"""What `vpo train` says, by subprocess: settings errors before anything loads (one line, the option named), negative
numbers after a flag, the start banner and the "saved to" line, one summary of skipped records with the columns
found, missing image files before training, and Ctrl-C's step / last checkpoint / resume line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

VPO = [sys.executable, "-m", "vpo.cli", "train"]
TINY = ["--model_name_or_path", "tiny:llava", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
        "--per_device_train_batch_size", "2", "--lora_dropout", "0.0"]


def _run(args, timeout=300):
    return subprocess.run([*VPO, *args], capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip()]


# (beta, batch sizes and accumulation go through the same check: tests/test_trl_trainer_options.py, in process)
@pytest.mark.parametrize("flag,value,option", [("--max_steps", "0", "max_steps"),
                                               ("--learning_rate", "-1e-4", "learning_rate")])
def test_settings_errors_name_the_option_before_anything_loads(tmp_path, flag, value, option):
    # the model folder does not exist: had anything loaded first, the error would be about the model
    res = _run(["--model_name_or_path", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"),
                "--output_dir", str(tmp_path / "o"), flag, value])
    lines = _error_lines(res.stderr)
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"vpo train: error: {option} must be")
    assert float(lines[0].split(", got ")[1].split()[0]) == float(value)
    assert not (tmp_path / "o").exists()


def test_a_bad_flag_value_is_one_usage_line(tmp_path):
    res = _run(["--model_name_or_path", "tiny:llava", "--data", "synthetic:2", "--learning_rate", "fast"])
    lines = _error_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 2 and "learning_rate" in lines[1], res.stderr


def _images(tmp_path, n=4):
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (24, 24), ["red", "green", "blue", "white"][i % 4]).save(p)
        paths.append(str(p))
    return paths


def test_banner_saved_to_and_the_model_card_folder(tmp_path):
    # the banner's every line: tests/test_practice.py (the README's CPU path); here the loss list and the model card
    out = tmp_path / "run"
    res = _run([*TINY, "--data", "synthetic:4", "--output_dir", str(out), "--max_steps", "1",
                "--loss_type", "sigmoid,sft", "--loss_weights", "1,0.5"])
    assert res.returncode == 0, res.stderr
    assert "vpo train: method dpo, loss sigmoid, 0.5*sft, beta 0.1, reference adapter" in res.stdout
    assert "vpo train: model tiny:llava (llava), LoRA r=8; collator TinyPreferenceCollator" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == f"vpo train: saved to {out}"
    card = (out / "README.md").read_text()
    assert f'"{out}"' in card and '"PATH"' not in card


def test_skipped_records_one_summary_with_the_columns_found(tmp_path):
    imgs = _images(tmp_path)
    rows = [{"image": imgs[i], "prompt": "what color ?", "chosen": "red .", "rejected": "black ."} for i in range(2)]
    rows += [{"image": imgs[i], "prompt": "what color ?", "answer_good": "red .", "rejected": "black ."}
             for i in range(2, 4)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = _run([*TINY, "--data", str(data), "--output_dir", str(tmp_path / "o"), "--max_steps", "1"])
    assert res.returncode == 0, res.stderr
    summary = [line for line in res.stderr.splitlines() if "skipped" in line and "skipped records: TOTAL" not in line]
    assert len(summary) == 1, res.stderr  # one line for the file, not one warning per skipped record
    assert "kept 2 of 4 records; skipped 2 (" in summary[0]
    assert "columns found: image, prompt, chosen, rejected, answer_good" in summary[0]
    # nothing usable: one error line that still lists the columns
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    res = _run([*TINY, "--data", str(data), "--output_dir", str(tmp_path / "o2"), "--max_steps", "1"])
    lines = _error_lines(res.stderr)
    assert res.returncode == 1 and len(lines) == 1 and "columns found: image, prompt, answer_good" in lines[0]


def test_missing_image_files_are_found_before_training(tmp_path):
    imgs = _images(tmp_path, 2)
    rows = [{"image": p, "prompt": "what color ?", "chosen": "red .", "rejected": "black ."}
            for p in imgs + [str(tmp_path / "gone1.png"), str(tmp_path / "gone2.png")]]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = _run([*TINY, "--data", str(data), "--output_dir", str(tmp_path / "o"), "--max_steps", "1"])
    lines = _error_lines(res.stderr)
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert "train data: 2 of 4 image files do not exist" in lines[0] and "gone1.png" in lines[0]
    assert "vpo train: method" not in res.stdout  # the trainer was never built


@pytest.mark.skipif(os.name != "posix", reason="SIGINT to a child process")
def test_ctrl_c_says_the_step_the_last_checkpoint_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([*VPO, *TINY, "--data", "synthetic:8", "--output_dir", str(out), "--max_steps", "100000",
                             "--save_steps", "1", "--save_total_limit", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(p.startswith("checkpoint-") for p in
                                                 (os.listdir(out) if out.exists() else [])):
            time.sleep(0.5)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    line = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(line) == 1, err
    assert line[0].startswith("vpo train: interrupted at step ")
    assert f"last checkpoint {out}{os.sep}checkpoint-" in line[0]
    assert line[0].endswith("; resume with --resume_from_checkpoint last")


def test_a_trl_field_vpo_does_not_take_names_the_equivalent(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: tiny:llava\ndata_path: synthetic:2\nprecompute_ref_log_probs: true\n")
    for args, name, hint in ((["--config", str(cfg)], "precompute_ref_log_probs", "ref_mode: precomputed"),
                             (["--model_name_or_path", "tiny:llava", "--data", "synthetic:2", "--padding_free", "true"],
                              "padding_free", "pads each batch")):
        res = _run(args)
        lines = _error_lines(res.stderr)
        assert res.returncode == 1 and len(lines) == 1, res.stderr
        assert f"{name} is a TRL DPOConfig field vpo does not take: " in lines[0] and hint in lines[0]
