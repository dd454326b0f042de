"""``vpo demo``'s command line (:func:`add_arguments`, :func:`main`): the flags, their checks (a usage error exits
with 2), and the dispatch to :func:`vpo.demo.run_demo` or, with ``--methods all``, :func:`vpo.compare.run_compare`."""
from __future__ import annotations

import dataclasses
import os
import sys

from vpo.demo import METHODS, PRESETS, run_demo


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="fewer images and steps (CI; about 1.5 min on 2 cores)")
    p.add_argument("--out", default="vpo-demo", help="output folder (data, models, curves, pictures, summary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated, from: tpo, catpo, ovip, csr, lpoi, mdpo, dpo; or 'all': every method over "
                        "--seeds, with means and standard errors (vpo.compare)")
    p.add_argument("--seeds", default="0,1,2", help="with --methods all: the preference-stage seeds")
    p.add_argument("--jobs", type=int, default=None,
                   help="with --methods all: seeds run in this many worker processes (same numbers as 1, less wall "
                        "time; default: one per seed on a machine with 2 or more cores, else 1)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="preference steps per method (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="preference learning rate (default: the preset's)")
    p.add_argument("--eval-split", default="test", choices=("test", "val"),
                   help="the held-out split measured (tune on val, report on test)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: at these sizes more threads only help on an idle machine)")
    p.add_argument("--cache-dir", default=None, help="model cache root (default $VPO_CACHE or ~/.cache/vpo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def default_jobs(n_seeds: int) -> int:
    """``--jobs``'s default: one worker per seed when the machine has 2 or more cores, else 1. Three workers on two
    cores finish three seeds sooner than two (19.6 vs 22.3 min in ``benchmarks/results/compare-cpu.md``)."""
    return max(1, n_seeds) if (os.cpu_count() or 1) >= 2 else 1


def main(args) -> int:
    from vpo.demo_methods import ALL_METHODS

    compare = args.methods.strip() == "all"
    methods = list(ALL_METHODS) if compare else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        print(f"vpo demo: --methods must be 'all' or drawn from {', '.join(ALL_METHODS)}, got {args.methods!r}",
              file=sys.stderr)
        return 2
    settings = PRESETS["quick" if args.quick else "full"]
    changes = {}
    for name, field in (("sft_steps", "sft_steps"), ("steps", "pref_steps")):
        v = getattr(args, name)
        if v is not None:
            if v < 1:
                print(f"vpo demo: --{name.replace('_', '-')} must be >= 1, got {v}", file=sys.stderr)
                return 2
            changes[field] = v
    if args.lr is not None:
        if not args.lr > 0:
            print(f"vpo demo: --lr must be > 0, got {args.lr}", file=sys.stderr)
            return 2
        changes["pref_lr"] = args.lr
    if args.jobs is not None and args.jobs < 1:
        print(f"vpo demo: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"vpo demo: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    settings = dataclasses.replace(settings, **changes)
    if compare:
        from vpo.compare import run_compare

        try:
            seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
        except ValueError:
            seeds = []
        if not seeds:
            print(f"vpo demo: --seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
            return 2
        run_compare(args.out, quick=args.quick, seeds=seeds, methods=methods, settings=settings,
                    threads=args.threads, cache_dir=args.cache_dir, progress=not args.no_progress,
                    impl=getattr(args, "impl", "auto"), eval_split=args.eval_split, data_seed=args.seed,
                    jobs=args.jobs if args.jobs is not None else default_jobs(len(seeds)))
        return 0
    run_demo(args.out, quick=args.quick, seed=args.seed, methods=methods, settings=settings, threads=args.threads,
             cache_dir=args.cache_dir, progress=not args.no_progress, impl=getattr(args, "impl", "auto"),
             eval_split=args.eval_split)
    return 0
