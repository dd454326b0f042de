"""The ``vpo`` command line.

    vpo demo [--quick] [--steps N] [--impl auto|torch|triton]   the main job (README quickstart)
    vpo info                                                   what is built and available
    vpo train --config FILE.yaml                               train a VLM with any method (vpo.trainer)
    vpo precompute-ref --config FILE.yaml                      reference terms stored with the dataset
    vpo csr | lpoi-lists | mdpo-crops ...                      build CSR / LPOI / mDPO datasets (vpo.construct)

Until the trainer lands, ``vpo demo`` shows the fused losses on random inputs: it checks them against the
materializing oracle, then optimizes a small policy head with DPO and with TPO and prints the curves' end points.
"""
from __future__ import annotations

import argparse
import sys
import time


def _progress(it, total: int, desc: str):
    """A minimal progress bar on stderr (no extra dependency)."""
    width = 30
    tty = sys.stderr.isatty()
    start = time.perf_counter()
    for i, x in enumerate(it, 1):
        yield x
        if tty or i == total:  # redraw in a terminal; one closing line in logs
            done = int(width * i / total)
            rate = i / max(time.perf_counter() - start, 1e-9)
            sys.stderr.write(f"{chr(13) if tty else ''}{desc} [{'#' * done}{'.' * (width - done)}] {i}/{total} "
                             f"{rate:5.1f} it/s")
            sys.stderr.flush()
    sys.stderr.write("\n")


def _demo(args) -> int:
    import torch

    import vpo
    from vpo.testing import make_linear_head_inputs

    torch.manual_seed(args.seed)
    B, T, D, V = (2, 16, 32, 257) if args.quick else (4, 48, 64, 2053)
    print(f"vpo {vpo.__version__} | available: {dict(vpo.AVAILABLE)}")
    print(f"batch: {B} pairs x {T} tokens, hidden {D}, vocab {V}, impl={args.impl}\n")

    # 1. The fused losses equal the oracle that materializes [tokens x vocab] logits.
    x = make_linear_head_inputs(2 * B, T, D, V, dtype=torch.float64, prompt_len=T // 4, bias=True, seed=args.seed)
    noised = (x.hidden.detach() + 0.3 * torch.randn_like(x.hidden)).requires_grad_()
    ref_h, ref_hn = x.hidden.detach() * 0.98, noised.detach() * 0.98
    rows = []
    for name, fused, oracle in [
        ("dpo", lambda: vpo.fused_dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_h, impl=args.impl),
         lambda: vpo.oracle.dpo_loss(x.weight, x.hidden, x.labels, x.bias, ref_h)),
        ("tpo", lambda: vpo.fused_tpo_loss(x.weight, x.hidden, noised, x.labels, x.bias, ref_h, ref_hn, impl=args.impl),
         lambda: vpo.oracle.tpo_loss(x.weight, x.hidden, noised, x.labels, x.bias, ref_h, ref_hn)),
    ]:
        lf, _ = fused()
        gf = torch.autograd.grad(lf, (x.weight, x.hidden))
        lo, _ = oracle()
        go = torch.autograd.grad(lo, (x.weight, x.hidden))
        err = max((a - b).abs().max().item() for a, b in zip(gf, go))
        rows.append((name, lf.item(), lo.item(), err))
    print(f"{'loss':<6}{'fused':>14}{'oracle':>14}{'max |grad diff|':>18}")
    for name, lf, lo, err in rows:
        print(f"{name:<6}{lf:>14.8f}{lo:>14.8f}{err:>18.2e}")
    print()

    # 2. Optimize a small policy (hidden states + head) from a frozen reference with each loss.
    steps = args.steps or (20 if args.quick else 150)
    base = make_linear_head_inputs(2 * B, T, D, V, dtype=torch.float32, prompt_len=T // 4, seed=args.seed + 1,
                                   requires_grad=False)
    noise = 0.5 * torch.randn_like(base.hidden)
    print(f"{'method':<8}{'loss start':>12}{'loss end':>12}{'margin start':>14}{'margin end':>12}{'acc end':>9}")
    for method in ("dpo", "tpo"):
        h = base.hidden.clone().requires_grad_()
        W = base.weight.clone().requires_grad_()
        opt = torch.optim.Adam([h, W], lr=1e-2)
        first = last = None
        for _ in _progress(range(steps), steps, f"{method} "):
            opt.zero_grad()
            if method == "dpo":
                loss, out = vpo.fused_dpo_loss(W, h, base.labels, ref_hidden=base.hidden, ref_weight=base.weight,
                                               impl=args.impl)
            else:
                loss, out = vpo.fused_tpo_loss(W, h, h + noise, base.labels, ref_hidden=base.hidden,
                                               ref_hidden_noised=base.hidden + noise, ref_weight=base.weight,
                                               impl=args.impl)
            loss.backward()
            opt.step()
            last = (loss.item(), out.margins.mean().item(), out.accuracy.item())
            first = first or last
        print(f"{method:<8}{first[0]:>12.4f}{last[0]:>12.4f}{first[1]:>14.4f}{last[1]:>12.4f}{last[2]:>9.2f}")
    return 0


def _info(args) -> int:
    import vpo

    print(f"vpo {vpo.__version__}")
    for k, v in vpo.AVAILABLE.items():
        print(f"  {k:<12} {v}")
    if not vpo.AVAILABLE["cpp"]:
        from vpo._ext import EXT_IMPORT_ERROR

        print(f"  vpo._C import error: {EXT_IMPORT_ERROR}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vpo", description="Fused kernels and losses for visual preference optimization")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the main job: fused losses vs the oracle, then a short DPO/TPO optimization")
    d.add_argument("--quick", action="store_true", help="tiny sizes for CI")
    d.add_argument("--steps", type=int, default=None, help="optimization steps per method")
    d.add_argument("--impl", choices=["auto", "torch", "triton"], default="auto")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
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

        for name in ("train", "precompute-ref", "csr", "lpoi-lists", "mdpo-crops"):
            stub = sub.add_parser(name, help=f"(needs pip install '.[train]')", add_help=False)
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(func=_needs_train)
        return
    add_subcommands(sub)
    register(sub)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
