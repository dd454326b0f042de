"""Checks before compute (vpo.trainer.preflight): output folder writable with room for a checkpoint, data and model
paths, the judge endpoint; a failing run stops before its first step with one line."""
from __future__ import annotations

import http.server
import os
import socket
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import make_trainer  # noqa: E402

from vpo.trainer.preflight import (  # noqa: E402
    PreflightError,
    check_judge,
    check_output_dir,
    check_paths,
    estimate_checkpoint_bytes,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_output_dir_that_is_a_file_or_lacks_space(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(PreflightError, match=f"^output_dir {target}: exists and is not a folder$"):
        check_output_dir(str(target))
    check_output_dir(str(tmp_path / "new" / "run"))  # created
    assert os.path.isdir(tmp_path / "new" / "run") and os.listdir(tmp_path / "new" / "run") == []  # probe removed
    with pytest.raises(PreflightError, match=r"free, but one checkpoint needs about .* \(weights \+ optimizer"):
        check_output_dir(str(tmp_path), need_bytes=1 << 62)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to switch to nobody")
def test_output_dir_without_write_permission_as_a_non_root_user(tmp_path):
    """root writes anywhere, so the probe runs in a forked child that became ``nobody``, on a root-owned 0o755
    folder (and on a folder to be created inside it)."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    for path in (locked, locked / "run"):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop to nobody, probe, report the message through the pipe
            code = 0
            try:
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                check_output_dir(str(path))
            except PreflightError as e:
                os.write(write, str(e).encode())
                code = 1
            except BaseException as e:  # noqa: BLE001
                os.write(write, repr(e).encode())
                code = 2
            os._exit(code)
        os.close(write)
        message = os.read(read, 4096).decode()
        os.close(read)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 1, message
        assert message in (f"output_dir {path}: not writable (Permission denied)",
                           f"output_dir {path}: cannot be created (Permission denied)"), message
    assert os.listdir(locked) == []


def test_checkpoint_estimate_counts_saved_weights_and_adamw_state():
    from vpo.models import tiny_llava
    from vpo.trainer.modeling import apply_lora

    model = tiny_llava().model
    full = sum(p.numel() * 4 for p in model.parameters())
    assert estimate_checkpoint_bytes(model) == int(3 * full * 1.1) + 2 ** 20  # all saved, all trained: 1 + 2
    lora = apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    trainable = sum(p.numel() * 4 for p in lora.parameters() if p.requires_grad)
    assert 0 < trainable < full and estimate_checkpoint_bytes(lora) == int(3 * trainable * 1.1) + 2 ** 20
    assert estimate_checkpoint_bytes(lora, with_optimizer=False) == int(trainable * 1.1) + 2 ** 20


def test_data_and_model_paths(tmp_path):
    from types import SimpleNamespace as NS

    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    ok = dict(data_path=str(data), eval_data_path=None, image_root=None, model_name_or_path="tiny:llava",
              ref_model_path=None)
    check_paths(NS(**ok))
    check_paths(NS(**dict(ok, data_path="synthetic:8", model_name_or_path="llava-hf/llava-1.5-7b-hf")))
    for change, message in (
        (dict(data_path=str(tmp_path / "missing.jsonl")), f"data_path {tmp_path}/missing.jsonl: no such file"),
        (dict(eval_data_path=str(tmp_path / "e.jsonl")), "eval_data_path"),
        (dict(image_root=str(tmp_path / "imgs")), "image_root"),
        (dict(model_name_or_path=str(tmp_path / "nope")), f"model_name_or_path: {tmp_path}/nope is not a folder"),
        (dict(model_name_or_path=str(model)), "has no config.json"),
        (dict(ref_model_path=str(data)), "ref_model_path: .* is not a folder"),
    ):
        with pytest.raises(PreflightError, match=message):
            check_paths(NS(**dict(ok, **change)))


def test_judge_endpoint_must_answer():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_judge(f"http://127.0.0.1:{server.server_port}/v1/chat/completions")  # any status is an answer
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PreflightError, match=f"online_judge_url http://127.0.0.1:{port}/v1: the judge endpoint does "
                                             "not answer"):
        check_judge(f"http://127.0.0.1:{port}/v1", timeout=2)


def test_trainer_fails_before_its_first_step(tmp_path, monkeypatch):
    """TPO that would only save past its last step, on a disk without room for one checkpoint: it stops before any
    compute (not one batch collated), instead of training every step and failing at the save."""
    import shutil

    trainer, tiny, collator, _ = make_trainer(tmp_path, method="tpo", n=4, max_steps=2, save_strategy="steps",
                                              save_steps=100)
    need = estimate_checkpoint_bytes(trainer.model)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * need, 9 * need, need - 1))
    with pytest.raises(PreflightError, match=f"output_dir {tmp_path}: .* free, but one checkpoint needs about"):
        trainer.train()
    assert trainer.state.global_step == 0 and collator.draw == 0


def test_cli_unusable_output_dir_is_one_line_and_exit_1(tmp_path, capsys):
    from vpo.cli import main as vpo

    out = tmp_path / "out"
    out.write_text("a file")
    code = vpo(["train", "--model_name_or_path", "tiny:llava", "--data", "synthetic:4", "--output_dir", str(out),
                "--method", "tpo", "--max_steps", "2", "--save_steps", "100", "--use_cpu", "true", "--report_to",
                "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and f"output_dir {out}: exists and is not a folder" in err[0], err
