"""The README's newcomer path, as written: `vpo practice` exports the demo's tiny model and a small dataset, and
`vpo train --config examples/configs/cpu_dpo.yaml` trains on them on a CPU (fewer steps here)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_practice_export_then_the_cpu_config_trains(tmp_path):
    vpo = [sys.executable, "-m", "vpo.cli"]
    res = subprocess.run([*vpo, "practice", "--out", "practice", "--records", "4", "--eval-records", "2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "practice/model/config.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "practice/data/train.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all((tmp_path / "practice/data" / r["image"]).is_file() for r in rows)
    assert "next: vpo train --config examples/configs/cpu_dpo.yaml" in res.stdout
    config = os.path.join(ROOT, "examples/configs/cpu_dpo.yaml")
    res = subprocess.run([*vpo, "train", "--config", config, "--max_steps", "2", "--eval_steps", "2",
                          "--save_steps", "2", "--per_device_train_batch_size", "2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "runs/cpu-dpo"
    for line in ("vpo train: model practice/model (llava), LoRA r=8; collator PreferenceCollator (llava)",
                 "vpo train: method dpo, loss sigmoid, beta 0.1, reference adapter",
                 "vpo train: train records: 4 kept, 0 skipped", "vpo train: eval records: 2 kept, 0 skipped",
                 "vpo train: device cpu, dtype float32 (no mixed precision); 2 steps",
                 f"vpo train: output folder {out}"):
        assert line in res.stdout.splitlines(), (line, res.stdout)  # the start banner
    assert res.stdout.strip().splitlines()[-1] == f"vpo train: saved to {out}"
    assert (out / "adapter_config.json").is_file() and (out / "README.md").is_file()


def test_practice_refuses_a_file_and_bad_counts(tmp_path):
    from vpo.practice import export_practice

    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="must be a folder"):
        export_practice(str(tmp_path / "f"))
    with pytest.raises(ValueError, match="records must be an int >= 1, got 0"):
        export_practice(str(tmp_path / "p"), records=0)


def test_readme_newcomer_path_is_the_tested_one():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "vpo practice --out practice" in readme
    assert "vpo train --config examples/configs/cpu_dpo.yaml" in readme
