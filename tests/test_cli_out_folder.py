"""`--out` of the dataset builders (vpo csr | lpoi-lists | mdpo-crops | ovip) takes a folder, or says it must be one."""
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


@pytest.mark.parametrize("command", ["mdpo-crops", "lpoi-lists", "csr", "ovip"])
def test_out_must_be_a_folder(tmp_path, command):
    res = subprocess.run([sys.executable, "-m", "vpo.cli", command, "--data", str(tmp_path / "d.jsonl"), "--out",
                          str(tmp_path / "x.jsonl")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "argument --out:" in res.stderr and "must be a folder" in res.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_an_existing_file_is_refused_and_a_folder_name_passes(tmp_path):
    from vpo.construct.cli import out_folder

    f = tmp_path / "notes"
    f.write_text("x")
    with pytest.raises(Exception, match="must be a folder"):
        out_folder(str(f))
    assert out_folder(str(tmp_path / "crops")) == str(tmp_path / "crops")
