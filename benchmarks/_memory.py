"""Peak memory of one benchmark step, over what its inputs already hold.

- CUDA (:func:`cuda_peak_mib`): ``torch.cuda.max_memory_allocated() − torch.cuda.memory_allocated()`` around the step
  (after ``reset_peak_memory_stats``): the caching allocator's live-tensor peak, not the reserved pool.
- CPU (:func:`cpu_peak_rss`): torch's CPU allocator keeps no statistics, so steps run in a separate worker process
  (this file's ``__main__``, one per session, cases sent one by one): build the inputs, warm up on a tiny shape,
  reset the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs`` sets ``VmHWM`` back to the current RSS,
  Linux >= 4.0), run one step, report the rise of ``VmHWM`` over the RSS at the reset.
  Not ``getrusage().ru_maxrss``: without a reset it holds the input builder's temporaries, and Linux folds the
  parent's peak into a child's at ``exec`` (``signal_struct.maxrss``), which ``clear_refs`` does not reset, so under
  a pytest parent it reads a constant. Without ``/proc`` write access the worker reports the ``VmHWM`` rise without
  a reset and says so in ``method``.
  The worker runs with ``MALLOC_MMAP_THRESHOLD_=131072`` (unless set): every block of 128 KiB or more is its own
  mmap, unmapped on free, so RSS follows the live tensors as CUDA's ``max_memory_allocated`` does (with glibc's
  dynamic threshold, freed blocks up to 32 MiB stay in the heap and the peak depends on that history).
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import traceback
from typing import Callable, Optional, Tuple

import torch

from _cases import Case, Unavailable
from _shapes import DEVICE, MiB

_RESULT = "@@vpo-memory-result "


def cuda_peak_mib(step: Callable[[], None]) -> float:
    """Peak of live CUDA tensors during ``step()`` above what was allocated before it, in MiB."""
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MiB


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (``VmHWM``) to the current RSS; False if that is impossible here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024  # the mark really dropped to ~RSS


_PROCESS_PEAK_KIB = [0]  # the worker's own peak RSS over its whole life (VmHWM is reset before every step)


def _note_peak() -> None:
    _PROCESS_PEAK_KIB[0] = max(_PROCESS_PEAK_KIB[0], _proc_status_kib("VmHWM") or 0)


def _measure(case: Case) -> dict:
    """In the worker: one step of ``case`` on CPU; the peak-RSS rise over the post-input baseline."""
    from _harness import prepare

    prepare(Case(case.bench, case.impl, case.shape.tiny()), "cpu", cache=False)()  # kernels, threads, lazy state
    step = prepare(case, "cpu")
    gc.collect()
    _note_peak()
    reset = _reset_peak_rss()
    base = _proc_status_kib("VmRSS") if reset else _proc_status_kib("VmHWM")
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = _proc_status_kib("VmHWM")
    _note_peak()
    del step
    gc.collect()
    return {
        "peak_mib": (peak - base) / 1024.0,
        "baseline_rss_mib": base / 1024.0,
        "seconds": seconds,
        "worker_peak_rss_mib": _PROCESS_PEAK_KIB[0] / 1024.0,
        "method": ("VmHWM rise in a worker process (clear_refs reset)" if reset
                   else "VmHWM rise in a worker process (no reset possible: under-reports)")
        + (f"; MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
           if os.environ.get("MALLOC_MMAP_THRESHOLD_") else ""),
    }


def _serve() -> None:
    """The worker loop: one ``Case`` JSON per stdin line, one result line per case on stdout."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            out = _measure(Case.from_json(line))
        except Unavailable as e:
            out = {"unavailable": str(e)}
        except Exception:
            out = {"error": traceback.format_exc()[-3000:]}
        sys.stdout.write(_RESULT + json.dumps(out) + "\n")
        sys.stdout.flush()


class _Worker:
    proc: Optional[subprocess.Popen] = None
    peak_rss_mib = 0.0  # the largest peak RSS any worker reported (the whole run's child side)

    @classmethod
    def ask(cls, case: Case) -> dict:
        if cls.proc is None or cls.proc.poll() is not None:
            env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ}  # an outer value wins
            cls.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
        cls.proc.stdin.write(case.to_json() + "\n")
        cls.proc.stdin.flush()
        for line in cls.proc.stdout:
            if line.startswith(_RESULT):
                r = json.loads(line[len(_RESULT):])
                cls.peak_rss_mib = max(cls.peak_rss_mib, r.get("worker_peak_rss_mib", 0.0))
                return r
        rc = cls.proc.wait()
        cls.proc = None
        raise RuntimeError(f"peak-RSS worker for {case.id} exited (rc {rc}) without a result")

    @classmethod
    def close(cls) -> None:
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.stdin.close()
            try:
                cls.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                cls.proc.kill()
        cls.proc = None


def cpu_peak_rss(case: Case) -> dict:
    """One step of ``case`` in the session's worker process: ``{peak_mib, baseline_rss_mib, seconds, method}``."""
    r = _Worker.ask(case)
    if "unavailable" in r:
        raise Unavailable(r["unavailable"])
    if "error" in r:
        raise RuntimeError(f"peak-RSS worker failed on {case.id}:\n{r['error']}")
    return r


def close_worker() -> None:
    _Worker.close()


def worker_peak_rss_mib() -> float:
    """The memory worker's peak RSS over the session (0 if none ran), MiB."""
    return _Worker.peak_rss_mib


def peak_memory_mib(case: Case, step: Callable[[], None]) -> Tuple[float, str]:
    """``(peak MiB above the inputs, method)`` for one step of ``case`` (on CPU in the worker process)."""
    if DEVICE == "cuda":
        return cuda_peak_mib(step), "CUDA max_memory_allocated rise over the inputs"
    r = cpu_peak_rss(case)
    return r["peak_mib"], r["method"]


if __name__ == "__main__":  # python _memory.py --serve
    if sys.argv[1:] != ["--serve"]:
        sys.exit("usage: python _memory.py --serve  (reads Case JSON lines on stdin)")
    _serve()
