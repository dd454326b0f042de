"""Start-up time of the command line's light paths: ``vpo --help`` and ``vpo train --help`` (issue: under 2 s on the CI
machine). Each runs in a fresh interpreter; we report the median and the spread of N runs and which heavy modules got
imported (none should: vpo, vpo.construct and the help text load lazily).

    python benchmarks/cli_startup.py [--runs 7] [--json benchmarks/results/cli-startup.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["train", "--help"])
PROBE = ("import sys, io, contextlib, runpy\nsys.argv = ['vpo'] + {argv!r}\n"
         "with contextlib.redirect_stdout(io.StringIO()):\n"
         "    try:\n        runpy.run_module('vpo.cli', run_name='__main__')\n    except SystemExit:\n        pass\n"
         "print(','.join(m for m in ('torch', 'transformers', 'numpy', 'PIL') if m in sys.modules))")


def time_command(argv, runs: int):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vpo.cli", *argv], stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    heavy = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                           check=True).stdout.strip()
    return {"command": "vpo " + " ".join(argv), "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "runs": runs, "heavy_imports": heavy.split(",") if heavy else []}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    rows = [time_command(c, args.runs) for c in COMMANDS]
    for r in rows:
        print(f"{r['command']:<18} median {r['median_s']:.3f} s  (min {r['min_s']:.3f}, max {r['max_s']:.3f}, "
              f"{r['runs']} runs)  heavy imports: {r['heavy_imports'] or 'none'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": platform.processor() or platform.machine(), "python": platform.python_version(),
                       "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
