"""Atomic checkpoints and resume from the newest complete one (vpo.trainer.checkpoint, vpo.trainer.resume).

Partial checkpoints are planted (a copy of a real one with a part removed or truncated), never raced with a kill."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import _losses, make_trainer  # noqa: E402

from vpo.trainer.checkpoint import (  # noqa: E402
    MANIFEST,
    CheckpointError,
    checkpoint_problem,
    latest_complete_checkpoint,
    resolve_resume,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
RUN = dict(max_steps=3, save_strategy="steps", save_steps=1, learning_rate=5e-2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 3-step run that saved every step; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("run")
    trainer, *_ = make_trainer(out, n=6, **RUN)
    trainer.train()
    return out, _losses(trainer)


def _copy(run, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(run[0], dst)
    return dst


def test_saved_checkpoints_are_complete_with_a_manifest_and_no_staging_left(run):
    out, _ = run
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "skipped.json"]
    for step in (1, 2, 3):
        ckpt = out / f"checkpoint-{step}"
        assert checkpoint_problem(str(ckpt)) is None
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        assert {"trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors",
                "vpo_state.json", "rng_state.pth"} <= set(files)
        assert all(os.path.getsize(ckpt / f) == n for f, n in files.items())


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage,reason", [
    (lambda c: (os.remove(c / "trainer_state.json"), os.remove(c / MANIFEST)), "no trainer_state.json"),
    (lambda c: (_truncate(c / "trainer_state.json"), os.remove(c / MANIFEST)), "trainer_state.json does not parse"),
    (lambda c: os.remove(c / "adapter_model.safetensors"), "listed in vpo_checkpoint.json but missing"),
    (lambda c: (os.remove(c / "adapter_model.safetensors"), os.remove(c / MANIFEST)), "no model weights"),
    (lambda c: (os.remove(c / "optimizer.pt"), os.remove(c / MANIFEST)), "no optimizer state"),
    (lambda c: (os.remove(c / "scheduler.pt"), os.remove(c / MANIFEST)), "no scheduler state"),
    (lambda c: (_truncate(c / "optimizer.pt"), os.remove(c / MANIFEST)), "optimizer.pt: truncated"),
    (lambda c: (_truncate(c / "adapter_model.safetensors", 0.9), os.remove(c / MANIFEST)),
     "adapter_model.safetensors: truncated"),
    (lambda c: _truncate(c / "optimizer.pt", 0.99), "optimizer.pt has"),  # the manifest's sizes catch it first
])
def test_partial_checkpoints_are_recognised(run, tmp_path, damage, reason):
    """Each way a save can be cut short (or a copy be incomplete), with and without vpo's manifest (an older vpo or
    stock transformers wrote none): the newest one is rejected with the reason, the one before it is picked."""
    out = _copy(run, tmp_path)
    damage(out / "checkpoint-3")
    problem = checkpoint_problem(str(out / "checkpoint-3"))
    assert problem is not None and reason in problem, problem
    path, skipped = latest_complete_checkpoint(str(out))
    assert path == str(out / "checkpoint-2") and skipped == [(str(out / "checkpoint-3"), problem)]


def test_resume_last_skips_a_partial_folder_warns_and_leaves_it(run, tmp_path, capsys):
    """A planted partial checkpoint-3 (a kill during its save, as an older version left it): "last" resumes from
    checkpoint-2 with a warning, reproduces step 3 exactly, and the partial folder is moved aside — not deleted —
    when step 3 is saved again."""
    out = _copy(run, tmp_path)
    os.remove(out / "checkpoint-3" / "optimizer.pt")
    os.remove(out / "checkpoint-3" / MANIFEST)
    trainer, *_ = make_trainer(out, n=6, **RUN)
    trainer.train(resume_from_checkpoint="last")
    err = capsys.readouterr().err
    assert f"skipped the incomplete checkpoint {out / 'checkpoint-3'} (no optimizer state" in err
    assert f"resuming from {out / 'checkpoint-2'} (global step 2)" in err
    assert _losses(trainer)[3] == run[1][3]
    displaced = out / "displaced-checkpoint-3"
    assert displaced.is_dir() and not (displaced / "optimizer.pt").exists()  # the old partial folder, as it was
    assert checkpoint_problem(str(out / "checkpoint-3")) is None


def test_a_save_that_fails_midway_leaves_no_checkpoint_folder(tmp_path, monkeypatch):
    """A full disk while the optimizer state is written: nothing named checkpoint-2 appears, resume picks
    checkpoint-1."""
    from transformers import Trainer

    trainer, *_ = make_trainer(tmp_path, n=6, **RUN)
    real = Trainer._save_optimizer_and_scheduler

    def failing(self, output_dir):
        if self.state.global_step == 2:
            raise OSError(28, "No space left on device")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", failing)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    names = sorted(os.listdir(tmp_path))
    assert "checkpoint-2" not in names and "checkpoint-1" in names and ".staging-checkpoint-2" in names
    assert resolve_resume("last", str(tmp_path)) == (str(tmp_path / "checkpoint-1"), [])


def test_resume_last_without_a_complete_checkpoint_is_an_error_naming_the_folder(tmp_path):
    with pytest.raises(CheckpointError, match=f"resume_from_checkpoint=last: no complete checkpoint in {tmp_path}$"):
        resolve_resume("last", str(tmp_path))
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in .*\(incomplete: checkpoint-4: no "
                                              r"trainer_state.json\)"):
        resolve_resume(True, str(tmp_path))
    with pytest.raises(CheckpointError, match=r"checkpoint-4: not a complete checkpoint \(no trainer_state"):
        resolve_resume(str(tmp_path / "checkpoint-4"), str(tmp_path))
    assert resolve_resume(None, str(tmp_path)) == (None, []) and resolve_resume("false", str(tmp_path)) == (None, [])
    trainer, *_ = make_trainer(tmp_path, n=4, max_steps=1)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


def test_cli_resume_last_on_an_empty_folder_exits_non_zero_with_one_line(tmp_path, capsys):
    from vpo.cli import main as vpo

    code = vpo(["train", "--model_name_or_path", "tiny:llava", "--data", "synthetic:4", "--output_dir",
                str(tmp_path), "--resume_from_checkpoint", "last", "--max_steps", "1", "--use_cpu", "true",
                "--report_to", "none", "--per_device_train_batch_size", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and f"no complete checkpoint in {tmp_path}" in err[0], err


def test_rotation_keeps_complete_checkpoints_and_never_deletes_a_partial_one(run, tmp_path):
    out = _copy(run, tmp_path)
    partial = out / "checkpoint-9"
    partial.mkdir()
    (partial / "weights.tmp").write_bytes(b"x")
    trainer, *_ = make_trainer(out, n=6, **dict(RUN, max_steps=5, save_total_limit=2))
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    names = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-4", "checkpoint-5", "checkpoint-9"]
    assert (partial / "weights.tmp").read_bytes() == b"x"


def test_save_only_model_rotates_but_is_not_resumable(tmp_path):
    trainer, *_ = make_trainer(tmp_path, n=4, **dict(RUN, save_only_model=True, save_total_limit=1))
    trainer.train()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")) == ["checkpoint-3"]
    assert checkpoint_problem(str(tmp_path / "checkpoint-3"), resumable=False) is None
    with pytest.raises(CheckpointError, match=r"checkpoint-3: no optimizer state"):
        resolve_resume("last", str(tmp_path))
