"""vpo, vpo.construct and vpo.trainer load their public names on first use through one helper (vpo._lazy): importing
the packages stays free of torch, transformers and triton, and every listed name resolves."""
import subprocess
import sys
import textwrap

import pytest

from vpo._lazy import lazy_exports


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A throwaway package ``lazypkg`` whose ``__init__`` uses lazy_exports for ``.inner``'s name, json's ``dumps``
    and its submodule ``sub``; a counter in ``inner`` says how often it was imported."""
    root = tmp_path / "lazypkg"
    root.mkdir()
    (root / "__init__.py").write_text(textwrap.dedent("""\
        from vpo._lazy import lazy_exports
        __getattr__, __dir__ = lazy_exports(__name__, {"VALUE": ".inner", "dumps": "json"}, submodules=("sub",))
        """))
    (root / "inner.py").write_text("import builtins\nbuiltins.lazypkg_loads = getattr(builtins, 'lazypkg_loads', 0) + 1"
                                   "\nVALUE = 42\n")
    (root / "sub.py").write_text("NAME = 'sub'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import builtins

    builtins.lazypkg_loads = 0
    yield "lazypkg"
    for name in [m for m in sys.modules if m == "lazypkg" or m.startswith("lazypkg.")]:
        del sys.modules[name]
    del builtins.lazypkg_loads


def test_names_load_on_first_use_once(package):
    import builtins
    import importlib

    pkg = importlib.import_module(package)
    assert "lazypkg.inner" not in sys.modules and builtins.lazypkg_loads == 0  # nothing imported yet
    assert {"VALUE", "dumps", "sub"} <= set(dir(pkg))
    assert pkg.VALUE == 42 and builtins.lazypkg_loads == 1
    assert vars(pkg)["VALUE"] == 42  # stored: the next read is a plain attribute read
    assert pkg.VALUE == 42 and builtins.lazypkg_loads == 1
    assert pkg.dumps([1]) == "[1]"  # an absolute module name
    assert pkg.sub.NAME == "sub" and sys.modules["lazypkg.sub"] is pkg.sub
    with pytest.raises(AttributeError, match="^module 'lazypkg' has no attribute 'missing'$"):
        pkg.missing  # noqa: B018
    assert not hasattr(pkg, "missing")


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="^package must be"):
        lazy_exports("", {})
    with pytest.raises(ValueError, match="^attrs must be a mapping"):
        lazy_exports("p", [("a", "b")])
    with pytest.raises(ValueError, match="^attrs must map names to module names"):
        lazy_exports("p", {"a": ""})
    with pytest.raises(ValueError, match="^submodules must be a collection of names, not one string"):
        lazy_exports("p", {}, submodules="losses")
    with pytest.raises(ValueError, match="^submodules must be names"):
        lazy_exports("p", {}, submodules=("not a name",))
    with pytest.raises(ValueError, match="^attrs and submodules both name losses"):
        lazy_exports("p", {"losses": "p.x"}, submodules=("losses",))


def test_vpo_packages_import_light_and_resolve_every_name():
    """In a fresh interpreter: importing the three packages loads none of the heavy libraries and no other vpo module
    than vpo._lazy; every name in each package's table (and ``__all__``) is in dir(); the errors read as before the
    helper."""
    code = textwrap.dedent("""\
        import sys
        before = set(sys.modules)
        import vpo, vpo.construct, vpo.trainer
        heavy = sorted(m for m in ("torch", "transformers", "triton", "numpy", "PIL") if m in sys.modules)
        ours = sorted(m for m in set(sys.modules) - before if m.startswith("vpo"))
        print(heavy, ours)
        tables = ((vpo, vpo._ATTRS), (vpo.construct, vpo.construct._ATTRS), (vpo.trainer, vpo.trainer._EXPORTS))
        for pkg, table in tables:
            assert set(table) <= set(dir(pkg)) and set(pkg.__all__) <= set(dir(pkg)) | {"__version__"}, pkg
        for name in ("losses", "oracle"):
            assert name in dir(vpo)
        for pkg in (vpo, vpo.construct, vpo.trainer):
            try:
                pkg.nothing_here
            except AttributeError as e:
                assert str(e) == f"module {pkg.__name__!r} has no attribute 'nothing_here'", e
        print("ok")
        """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    first, last = res.stdout.strip().splitlines()[0], res.stdout.strip().splitlines()[-1]
    assert first == "[] ['vpo', 'vpo._lazy', 'vpo.construct', 'vpo.trainer']" and last == "ok"


def test_vpo_packages_resolve_their_names():
    """Each lazy name is the object its module defines (the heavy imports happen here, in this process)."""
    import importlib

    import vpo
    import vpo.construct
    import vpo.trainer

    tables = [(vpo, vpo._ATTRS), (vpo.construct, vpo.construct._ATTRS),
              (vpo.trainer, {k: f"vpo.trainer.{v}" for k, v in vpo.trainer._EXPORTS.items()})]
    for pkg, table in tables:
        for name, module in table.items():
            assert getattr(pkg, name) is getattr(importlib.import_module(module), name), (pkg.__name__, name)
    assert vpo.losses is importlib.import_module("vpo.losses")
