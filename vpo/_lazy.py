"""Names a package exports but imports on first use (PEP 562), in one place for ``vpo``, ``vpo.construct`` and
``vpo.trainer``: the command line's light paths (``vpo --help``, ``vpo train --help``) must not pay for importing
torch, transformers and the kernels (benchmarks/cli_startup.py measures it).

A package's ``__init__`` lists what each public name is defined in and hands the two module hooks to Python::

    from vpo import _lazy

    _ATTRS = {"fused_dpo_loss": "vpo.fused", "VPOConfig": ".config"}
    __getattr__, __dir__ = _lazy.lazy_exports(__name__, _ATTRS, submodules=("losses",))

This module imports nothing beyond the standard library.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Iterable, List, Mapping, Tuple


def lazy_exports(package: str, attrs: Mapping[str, str],
                 submodules: Iterable[str] = ()) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """The ``(__getattr__, __dir__)`` pair of a package whose public names load on first use.

    Args:
        package: the package's ``__name__`` (it must be in ``sys.modules`` by the first lookup, as it is while its
            ``__init__`` runs).
        attrs: public name -> the module that defines it: absolute (``"vpo.fused"``) or relative to ``package``
            (``".config"``). The first lookup imports that module and stores the value in the package, so later
            lookups are plain attribute reads.
        submodules: the package's submodules that ``package.<name>`` imports (``vpo.losses``); not stored, the import
            system sets them on the package.

    Returns:
        ``__getattr__(name)``, which raises ``AttributeError("module '<package>' has no attribute '<name>'")`` for
        any other name, and ``__dir__()``, the package's names plus every lazy one, sorted.

    Raises:
        ValueError: ``package`` is not a non-empty string, ``attrs`` is not a mapping of names to non-empty module
            names, ``submodules`` is not names, or a name is both in ``attrs`` and in ``submodules``.

    Example:
        >>> import types, sys
        >>> pkg = sys.modules["lazy_demo"] = types.ModuleType("lazy_demo")
        >>> pkg.__getattr__, pkg.__dir__ = lazy_exports("lazy_demo", {"dumps": "json"})
        >>> pkg.dumps([1])
        '[1]'
        >>> "dumps" in vars(pkg)  # stored: the next read does not call __getattr__
        True
        >>> del sys.modules["lazy_demo"]
    """
    if not isinstance(package, str) or not package:
        raise ValueError(f"package must be the package's __name__ (a non-empty string), got {package!r}")
    if not isinstance(attrs, Mapping):
        raise ValueError(f"attrs must be a mapping of public names to module names, got {type(attrs).__name__}")
    bad = [(k, v) for k, v in attrs.items() if not (isinstance(k, str) and k and isinstance(v, str) and v.strip("."))]
    if bad:
        raise ValueError(f"attrs must map names to module names (non-empty strings), got {bad[0][0]!r}: "
                         f"{bad[0][1]!r}")
    if isinstance(submodules, str):
        raise ValueError(f"submodules must be a collection of names, not one string ({submodules!r})")
    subs = frozenset(submodules)
    if not all(isinstance(s, str) and s.isidentifier() for s in subs):
        raise ValueError(f"submodules must be names of {package}'s submodules, got {sorted(map(repr, subs))}")
    both = sorted(subs & set(attrs))
    if both:
        raise ValueError(f"attrs and submodules both name {', '.join(both)}: a name is either a submodule or an "
                         "attribute of one")
    attrs = dict(attrs)

    def __getattr__(name: str):
        if name in subs:
            return importlib.import_module(f"{package}.{name}")
        module = attrs.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> List[str]:
        return sorted(set(vars(sys.modules[package])) | set(attrs) | subs)

    return __getattr__, __dir__


__all__ = ["lazy_exports"]
