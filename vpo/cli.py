"""The ``vpo`` command line.

    vpo demo [--quick] [--out DIR] [--methods tpo,dpo] ...     the main job (README quickstart)
    vpo eval --model PATH|tiny-cache --data DIR [--out F]      CHAIR / POPE / coverage on held-out images
    vpo visualize rewards|curves ...                           per-token TPO rewards (HTML + PNG); training curves
    vpo diagnose --model DIR --data PAIRS [--create N]         each method's signal against ground truth (AUROCs)
    vpo practice [--out DIR]                                   a tiny model folder + data to practise vpo train on
    vpo info                                                   what is built and available
    vpo train --config FILE.yaml                               train a VLM with any method (vpo.trainer)
    vpo precompute-ref --config FILE.yaml                      reference terms stored with the dataset
    vpo csr | lpoi-lists | mdpo-crops | ovip ...               build CSR / LPOI / mDPO / OViP datasets (vpo.construct)

``vpo demo`` (:mod:`vpo.demo`) fine-tunes a tiny LLaVA on the synthetic shapes world, measures its hallucinations,
trains it with TPO and DPO on preference pairs and measures again: a CPU run of a few minutes (``--quick``: about
a minute and a half). ``demo``, ``eval`` and ``visualize`` need the ``train`` extra.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional


def _needs_train_extra(args, err: ImportError) -> int:
    print(f"vpo {args.command} needs the train extra ({err}): pip install -e '.[train]'", file=sys.stderr)
    return 2


def _demo(args) -> int:
    try:
        from vpo.demo_cli import main
    except ImportError as err:  # pragma: no cover - exercised only without the train extra
        return _needs_train_extra(args, err)
    return main(args)


def _eval(args) -> int:
    try:
        import transformers  # noqa: F401

        from vpo.eval.cli import main
    except ImportError as err:  # pragma: no cover
        return _needs_train_extra(args, err)
    return main(args)


def _visualize(args) -> int:
    try:
        import matplotlib  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:  # pragma: no cover
        return _needs_train_extra(args, err)
    return args.run(args)


def _info(args) -> int:
    import vpo

    print(f"vpo {vpo.__version__}")
    for k, v in vpo.AVAILABLE.items():
        print(f"  {k:<12} {v}")
    if not vpo.AVAILABLE["cpp"]:
        from vpo._ext import EXT_IMPORT_ERROR

        print(f"  vpo._C import error: {EXT_IMPORT_ERROR}")
    return 0


def build_parser(command: Optional[str] = "") -> argparse.ArgumentParser:
    """The ``vpo`` parser. ``command``: the subcommand about to run — only its arguments are built, so ``vpo --help``
    and ``vpo train --help`` do not import torch through the other subcommands (benchmarks/cli_startup.py); ``None``
    builds every subcommand's arguments."""
    p = argparse.ArgumentParser(prog="vpo", description="Fused kernels and losses for visual preference optimization")
    sub = p.add_subparsers(dest="command", required=True)

    def wanted(name: str) -> bool:
        return command is None or command == name

    d = sub.add_parser("demo", help="the main job: SFT a tiny VLM, measure, TPO and DPO, measure again (CPU, minutes)",
                       description="SFT a tiny LLaVA on the shapes world, measure hallucination, train TPO and DPO "
                                   "on preference pairs, measure again; print the before/after table.")
    if wanted("demo"):
        from vpo import demo_cli

        demo_cli.add_arguments(d)
        d.add_argument("--impl", choices=["auto", "torch", "triton"], default="auto",
                       help="kernel choice of the fused losses (SFT and preference stages)")
    d.set_defaults(func=_demo)
    e = sub.add_parser("eval", help="CHAIR / POPE / coverage of a model on held-out shapes-world images",
                       description="Hallucination metrics of a model on held-out images of the shapes world.")
    if wanted("eval"):
        from vpo.eval import cli as eval_cli

        eval_cli.add_arguments(e)
    e.set_defaults(func=_eval)
    v = sub.add_parser("visualize", help="per-token TPO rewards / Cat-PO weights (HTML + PNG); training curves (PNG)")
    if wanted("visualize"):
        from vpo import visualize_cli

        visualize_cli.add_subcommands(v)
    v.set_defaults(func=_visualize)
    g = sub.add_parser("diagnose", help="each method's signal on pairs with ground truth: AUROCs, rates (table + PNG)",
                       description="Does each method's signal (TPO's s and c, Cat-PO's weights, CSR's reward, LPOI's "
                                   "order, OViP's negative image) separate grounded from hallucinated content?")
    if wanted("diagnose"):
        from vpo import diagnose_cli

        diagnose_cli.add_arguments(g)
        g.set_defaults(func=lambda args: diagnose_cli.main(args))
    r = sub.add_parser("practice", help="export the demo's tiny model and a small dataset to folders, to practise "
                                        "vpo train on a CPU", description="Write DIR/model (a model folder) and "
                                        "DIR/data (shapes-world preference pairs) for examples/configs/cpu_dpo.yaml.")
    if wanted("practice"):
        from vpo import practice

        practice.add_arguments(r)
        r.set_defaults(func=practice.main)
    i = sub.add_parser("info", help="what is built and available")
    i.set_defaults(func=_info)
    _register_optional(sub)
    return p


def _register_optional(sub) -> None:
    """Subcommands that need the ``train`` extra (transformers, peft, ...): registered when it imports, else a stub
    that says how to get it."""
    try:
        from vpo.trainer.cli import add_subcommands
        from vpo.construct.cli import register
    except ImportError as err:  # pragma: no cover - exercised only without the train extra
        missing = str(err)

        def _needs_train(args) -> int:
            print(f"vpo {args.command} needs the train extra ({missing}): pip install -e '.[train]'", file=sys.stderr)
            return 2

        for name in ("train", "precompute-ref", "csr", "lpoi-lists", "mdpo-crops", "ovip"):
            stub = sub.add_parser(name, help=f"(needs pip install '.[train]')", add_help=False)
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(func=_needs_train)
        return
    add_subcommands(sub)
    register(sub)


def _command_of(argv) -> Optional[str]:
    """The subcommand named on the command line (the first word that is not an option), or None."""
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv) or "").parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
