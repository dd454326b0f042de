"""`--out` of the dataset builders (vpo csr | lpoi-lists | mdpo-crops | ovip) takes a folder, or says it must be one."""
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def test_out_must_be_a_folder(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vpo.cli", "mdpo-crops", "--data", str(tmp_path / "d.jsonl"),
                          "--out", str(tmp_path / "x.jsonl")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "argument --out:" in res.stderr and "must be a folder" in res.stderr
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("command", ["lpoi-lists", "csr", "ovip"])
def test_every_builder_checks_out(tmp_path, command, capsys):
    from vpo.cli import main

    with pytest.raises(SystemExit) as info:
        main([command, "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "x.parquet")])
    assert info.value.code == 2 and "must be a folder" in capsys.readouterr().err


def test_an_existing_file_is_refused_and_a_folder_name_passes(tmp_path):
    from vpo.construct.cli import out_folder

    f = tmp_path / "notes"
    f.write_text("x")
    with pytest.raises(Exception, match="must be a folder"):
        out_folder(str(f))
    assert out_folder(str(tmp_path / "crops")) == str(tmp_path / "crops")
