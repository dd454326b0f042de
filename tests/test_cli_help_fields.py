"""`vpo train --help` is built without importing transformers (vpo.trainer.cli_help reads config.py's source): the
fields it shows must be VPOConfig's own, with their real defaults and help. Startup time is measured in
benchmarks/cli_startup.py, not asserted here."""
import dataclasses
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def test_help_fields_are_vpoconfig_s():
    from vpo.trainer.cli_help import SECTIONS, TRAINING_FIELDS, config_fields
    from vpo.trainer.config import VPOConfig

    real = {f.name: f for f in dataclasses.fields(VPOConfig)}
    ours = config_fields()
    assert len(ours) >= 60
    for name, (default, text) in ours.items():
        f = real[name]
        assert default == (f.default if f.default is not dataclasses.MISSING else None), name
        assert text == f.metadata.get("help", ""), name
    for name, (default, _) in TRAINING_FIELDS.items():
        if name not in ours:
            assert real[name].default == default, name
    shown = [n for _, names in SECTIONS for n in names]
    assert all(n in ours or n in TRAINING_FIELDS for n in shown)


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys, io, contextlib\nfrom vpo.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['train', '--help'])\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"
