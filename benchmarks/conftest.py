"""pytest-benchmark suite of regharm_ext: run ``pytest benchmarks/ --benchmark-only``.

- ``--bench-device cpu|cuda`` picks the device (default: cuda when usable, else cpu);
  ``--bench-target SECONDS`` the timed seconds per benchmark (default 0.5).
- Without ``--benchmark-json PATH`` the JSON goes to ``benchmarks/results/<device kind>.json``
  (``cpu.json``, ``cuda-nvidia-h100-80gb-hbm3.json``, ...) when the whole suite runs, and to
  ``<device kind>-partial.json`` when only part of it runs (``-k``, ``-m``, single files or tests),
  so that a partial run never overwrites the full results. ``python benchmarks/report.py`` turns
  the JSON into the README's tables and plots.
- The JSON gets a ``regharm`` block: device name, torch/triton versions, commit, backends, and
  how time and memory were measured (see ``benchlib``).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-device", choices=["cpu", "cuda"], default=None,
                     help="device of the regharm_ext benchmarks (default: cuda when usable, else cpu)")
    parser.addoption("--bench-target", type=float, default=None, metavar="SECONDS",
                     help="timed seconds per benchmark (rounds = target / one run, within the device's "
                          "bounds; default 0.5 on both devices)")


def _device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


class _LazyJson:
    """Stands in for pytest-benchmark's ``--benchmark-json`` file, created only when it saves:
    an open file to enter (pytest-benchmark < 5.2) or a path to open (5.2 on)."""

    def __init__(self, path: str):
        self.path = path

    def __fspath__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        return self.path

    def __enter__(self):
        self._fh = open(self, "wb")
        return self._fh

    def __exit__(self, *exc):
        self._fh.close()

    def __str__(self):
        return self.path


def _whole_suite(config) -> bool:
    if config.getoption("keyword") or config.getoption("markexpr"):
        return False
    here = os.path.dirname(os.path.abspath(__file__))
    args = [os.path.abspath(a) for a in config.args]
    return all(a.rstrip(os.sep) == here for a in args)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    target = config.getoption("--bench-target")
    if target is not None:
        for budget in benchlib.BUDGET.values():
            budget.target_s = target
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or session.json is not None:
        return
    kind = benchlib.device_kind(_device(config))
    name = kind if _whole_suite(config) else f"{kind}-partial"
    session.json = _LazyJson(os.path.join(benchlib.RESULTS, f"{name}.json"))


def pytest_report_header(config):
    dev = _device(config)
    return [f"regharm_ext benchmarks on {benchlib.device_name(dev)}",
            f"backends: {benchlib.regharm_ext.backends(dev)}"]


_LOAD_START = []


def pytest_sessionstart(session):
    if hasattr(os, "getloadavg"):
        _LOAD_START.append(os.getloadavg()[0])


_INTERRUPTED = []


def _rounds(bench) -> int:
    stats = getattr(bench, "stats", None)
    stats = getattr(stats, "stats", stats)  # Metadata.stats in older pytest-benchmark
    return len(getattr(stats, "data", None) or ())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """An interrupted run (SIGINT at a device call's deadline, Ctrl-C) still saves what it
    measured: the benchmark cut off mid-run has no rounds and would break pytest-benchmark's
    saving (runs before its own hook)."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None:
        kept = [b for b in bs.benchmarks if _rounds(b)]
        if len(kept) != len(bs.benchmarks) or exitstatus == pytest.ExitCode.INTERRUPTED:
            _INTERRUPTED.append(len(bs.benchmarks) - len(kept))
        bs.benchmarks[:] = kept
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    dev = _device(config)
    facts = benchlib.machine_facts(dev)
    if _LOAD_START:   # other jobs on the machine make times noisy: say how busy it was
        facts.update(load_start=_LOAD_START[0], load_end=os.getloadavg()[0], cpus=os.cpu_count())
    channels, source = benchlib.paper_channels()
    facts["paper_channels"] = {str(k): v for k, v in channels.items()}
    facts["paper_channels_source"] = source
    if _INTERRUPTED:   # the report says so beside the numbers
        facts["interrupted"] = dict(dropped_unfinished=_INTERRUPTED[0])
    output_json["regharm"] = facts
    for bench in output_json.get("benchmarks", []):   # per-round arrays: the stats suffice
        bench.get("stats", {}).pop("data", None)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return _device(request.config)


@pytest.fixture(autouse=True)
def _fresh_memory(device):
    """Each benchmark starts without the previous one's leftovers (allocator caches, garbage)."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The floor (bytes and FLOPs that must move/run, H100 roofline) beside the measured times."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    import report
    recs = [b.extra_info for b in session.benchmarks if b.extra_info.get("time_s") is not None]
    text = report.floor_section(recs, _device(config).type)
    if text:
        terminalreporter.write_sep("-", "regharm_ext: the floor of the two ops at the paper setting")
        terminalreporter.write_line(text)
