"""Benchmark session plumbing: shape-major ordering, the heavy-test gate, progress lines, the summary table at the end
of the run (``_report.summary``), and the ``--vpo-results DIR`` results writer.

``--vpo-results DIR`` writes ``DIR/<name>.json`` (device, versions, the inputs' softmax statistics, every benchmark's
pytest-benchmark stats with raw timings and its ``extra_info``, the skipped benchmarks and why, the run's peak RSS) and
``DIR/<name>.md`` (the summary table, then every benchmark; the device named at the top). ``<name>`` is
``--vpo-results-name`` or a slug of the device name. The files are rewritten after every benchmark, so a run stopped
by a time limit still leaves what it measured.
"""
from __future__ import annotations

import ctypes
import gc
import os
import time

import pytest
import torch

import _harness as H
import _report
from _memory import close_worker

HERE = os.path.dirname(os.path.abspath(__file__))

try:  # as the memory worker does (MALLOC_MMAP_THRESHOLD_): big blocks are unmapped on free, so this process's RSS
    _LIBC = ctypes.CDLL("libc.so.6")  # follows its live tensors instead of keeping every freed GiB of the run
    _LIBC.mallopt(-3, 131072)  # M_MMAP_THRESHOLD
except (OSError, AttributeError):
    _LIBC = None


def pytest_addoption(parser):
    group = parser.getgroup("vpo benchmarks")
    group.addoption("--vpo-results", metavar="DIR", default=None,
                    help="write DIR/<name>.json (raw) and DIR/<name>.md (table) with every benchmark's results")
    group.addoption("--vpo-results-name", metavar="NAME", default=None,
                    help="file stem for --vpo-results (default: a slug of the device name)")


def pytest_configure(config):
    config._vpo_start = time.time()
    config.addinivalue_line("markers", "vpo_heavy: a long measurement (GiB-sized naive baseline); "
                                       "runs only with --benchmark-only")


def pytest_sessionstart(session):
    H.REPORTER = session.config.pluginmanager.get_plugin("terminalreporter")  # registered after our configure
    H.CAPTURE = session.config.pluginmanager.get_plugin("capturemanager")
    global _ROOT
    _ROOT = str(session.config.rootpath)


_ROOT = ""  # pytest's rootdir: reports name their file relative to it


def _in_benchmarks(item) -> bool:
    return str(item.path).startswith(HERE + os.sep)


def pytest_collection_modifyitems(config, items):
    only = config.getoption("benchmark_only", default=False)
    heavy_skip = pytest.mark.skip(reason="heavy memory comparison: runs only with --benchmark-only")
    for item in items:
        if _in_benchmarks(item) and "vpo_heavy" in item.keywords and not only:
            item.add_marker(heavy_skip)

    # Shape-major order across both files: the inputs for one shape are built once (the cache holds one shape), and a
    # run cut short by a time limit has already measured every implementation at the smaller shapes.
    def key(pair):
        i, item = pair
        if not _in_benchmarks(item):
            return (0, 0, i)
        case = getattr(getattr(item, "callspec", None), "params", {}).get("case")
        rank = H.SHAPE_ORDER.get(case.shape, 0) if case is not None else len(H.SHAPE_ORDER)
        return (1, rank, i)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()  # keep only the cached inputs between benchmarks
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif _LIBC is not None:
        _LIBC.malloc_trim(0)


# ----------------------------------------------------------------------------------------------------------------------
# Results writer
# ----------------------------------------------------------------------------------------------------------------------


def pytest_runtest_logreport(report):
    where = os.path.join(_ROOT, str(report.fspath))
    if report.skipped and where.startswith(HERE + os.sep) and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        _report.SKIPS.append({"test": report.nodeid, "reason": reason})
        H.progress(f"  skipped {report.nodeid.split('::')[-1]}: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the benchmark fixture hands its stats to the session during teardown
    if _in_benchmarks(item):
        _report.write_results(item.config)


def pytest_sessionfinish(session, exitstatus):
    close_worker()
    _report.write_results(session.config)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the run ends with this
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if getattr(config, "_benchmarksession", None) is None:
        return
    data = _report.collect(config)
    if not data["benchmarks"]:
        return
    terminalreporter.section("vpo benchmark summary")
    terminalreporter.write_line(f"{data['device']['name']} ({data['device']['kind']}); "
                                f"{time.time() - config._vpo_start:.0f} s wall. Time and peak-memory ratios at the same "
                                "shape (benchmarks/README.md):")
    for line in _report.summary(data):
        terminalreporter.write_line(line)
