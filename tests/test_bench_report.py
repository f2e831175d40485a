"""The benchmark tooling itself (no benchmark runs here):

- ``benchmarks/report.py`` on a tiny JSON FABRICATED in this file (its numbers are made up to test
  the formatting and selection code, they are not measurements);
- ``benchlib.TensorMemoryTracker`` (the CPU peak-memory method) on allocations of known size.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
MiB = 2 ** 20


def _load(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)   # report.py and benchlib import floor.py next to them
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


report = _load("report")
benchlib = _load("benchlib")


def _rec(**kw):
    base = dict(kind="layer", name="PTL", mode="fwdbwd", dtype="fp32", B=4, C=64, H=128, W=128,
                patch=16, stride=4, P=256, K=841, L=16384, fg=0.2, device="cpu", rounds=1)
    base.update(kw)
    return {"extra_info": base}


def _fabricated():
    """A made-up result file: Table 4 rows for two settings, a paper point, an e2e row."""
    t4 = dict(table="table4", sweeps=["table4"])
    benches = [
        _rec(**t4, backend="reference", setting="h/8, h/32", paper_mb=463, time_s=2.0, peak_bytes=2000 * MiB),
        _rec(**t4, backend="torch", setting="h/8, h/32", paper_mb=463, time_s=0.5, peak_bytes=300 * MiB),
        _rec(**t4, backend="native", setting="h/8, h/32", paper_mb=463, time_s=0.25, peak_bytes=200 * MiB),
        _rec(**t4, backend="reference", setting="h/8, h/8", paper_mb=169, K=64, stride=16, time_s=1.0,
             peak_bytes=250 * MiB),
        _rec(**t4, backend="native", setting="h/8, h/8", paper_mb=169, K=64, stride=16, time_s=0.2,
             peak_bytes=199 * MiB),
        _rec(sweeps=["paper", "size"], backend="native", mode="fwd", B=1, time_s=0.0123, peak_bytes=29 * MiB),
        _rec(sweeps=["paper", "size"], backend="native", B=1, time_s=0.05, peak_bytes=49 * MiB),
        _rec(sweeps=["size"], backend="native", B=1, H=64, W=64, patch=8, stride=2, time_s=0.01,
             peak_bytes=13 * MiB),
        _rec(kind="e2e", name="harmonizer", variant="rbase+ltl+ptl", width=1, network_input=256,
             params=10_000_000, backend="native", mode="train", B=4, H=256, time_s=2.0, peak_bytes=900 * MiB),
    ]
    return {"benchmarks": benches, "datetime": "2000-01-01T00:00:00",
            "regharm": {"device": "cpu", "device_kind": "cpu", "device_name": "FABRICATED TEST DEVICE",
                        "torch": "x", "triton": None, "commit": "0123456789abcdef", "commit_dirty": False,
                        "backends": {"reference": "available", "torch": "available", "native": "available",
                                     "triton": "not here"},
                        "time_method": "T", "memory_method": "M"}}


def test_report_tables_from_fabricated_json():
    md = report.markdown([_fabricated()])
    assert "FABRICATED TEST DEVICE" in md
    lines = md.splitlines()
    # Table 4 row of the paper's setting: paper 463 MB beside reference 2000, torch 300, native 200
    row = next(line for line in lines if line.startswith("| h/8, h/32 |"))
    assert row == "| h/8, h/32 | 841 | 463 | 2000 | 300 | 200 | `native` 250 ms |"
    # a backend missing at a setting shows a dash, not a number from another setting
    row = next(line for line in lines if line.startswith("| h/8, h/8 |"))
    assert row == "| h/8, h/8 | 64 | 169 | 250 | — | 199 | `native` 200 ms |"
    # paper-point table: fwd and fwd+bwd of one backend on one row
    assert "| `PTL` | B=1, 128², K=841 | `native` | 12.3 ms | 50.0 ms | 29 | 49 |" in md
    # sweep table sorted by size; end-to-end images/s = B / time
    assert md.index("| 64² | 10.0 ms · 13 |") < md.index("| 128² | 50.0 ms · 49 |")
    assert "| `native` | 2.00 | 900 |" in md
    assert "`triton` (not here)" in md


def test_report_e2e_rows_per_layout_auto_first():
    e2e = dict(kind="e2e", name="harmonizer", variant="rbase+ltl+ptl", width=1, network_input=256,
               params=10_000_000, backend="native", B=4, H=256)
    data = _fabricated()
    data["benchmarks"] = [   # the other layout's rows first in the file: the report still puts auto's first
        _rec(**e2e, mode="train", time_s=4.0, peak_bytes=800 * MiB, memory_format="contiguous",
             memory_format_is_auto=False),
        _rec(**e2e, mode="train", time_s=2.0, peak_bytes=900 * MiB, memory_format="channels_last",
             memory_format_is_auto=True),
        _rec(**e2e, mode="infer256", time_s=0.1, peak_bytes=0, memory_format="channels_last",
             memory_format_is_auto=True),
    ]
    lines = report.e2e_section([b["extra_info"] for b in data["benchmarks"]]).splitlines()
    rows = [line for line in lines if line.startswith("| `native`")]
    assert rows == ["| `native` | `channels_last` | 2.00 | 900 | 100 ms | — | — |",
                    "| `native` | `contiguous` | 1.00 | 800 | — | — | — |"], rows
    assert "| backend | layout | train images/s |" in "\n".join(lines)
    # one layout: no column, the layout named in the text (old files without the field: contiguous)
    old = report.e2e_section([b["extra_info"] for b in _fabricated()["benchmarks"]])
    assert "weights `contiguous`" in old and "| layout |" not in old


def test_report_formatting_units():
    assert report.fmt_time(1.5) == "1.50 s"
    assert report.fmt_time(0.25) == "250 ms"
    assert report.fmt_time(0.0123) == "12.3 ms"
    assert report.fmt_time(4.2e-5) == "42.0 µs"
    assert report.fmt_mib(3 * MiB) == "3.0" and report.fmt_mib(300 * MiB) == "300"
    assert report.fmt_count(4.23e9) == "4.23 G"


def test_report_splices_readme_between_markers():
    text = "# Title\n\nintro\n"
    once = report.splice(text, "TABLES v1\n")
    assert once.startswith(text.rstrip("\n")) and once.count(report.BEGIN) == 1
    twice = report.splice(once + "\n## After\n", "TABLES v2\n")
    assert "TABLES v1" not in twice and "TABLES v2" in twice and twice.endswith("## After\n")


@pytest.mark.parametrize("pillow", [True, False])
def test_report_plot_writes_png(tmp_path, pillow):
    if not pillow:
        pytest.importorskip("matplotlib")
    from PIL import Image

    path = report.plot(report.records(_fabricated()), str(tmp_path / "p.png"), "FABRICATED", force_pillow=pillow)
    assert path is not None
    with Image.open(path) as im:
        assert im.size[0] > 400 and im.size[1] > 300


def test_report_cli_writes_files(tmp_path):
    src = tmp_path / "cpu.json"
    src.write_text(json.dumps(_fabricated()))
    other = tmp_path / "gpu_bench_x.json"          # another tool's JSON is refused by name
    other.write_text(json.dumps({"results": []}))
    assert report.main([str(other), "--out", str(tmp_path / "o2")]) == 1
    readme = tmp_path / "README.md"
    readme.write_text("# R\n")
    assert report.main([str(src), "--out", str(tmp_path / "out"), "--readme", str(readme), "--pillow"]) == 0
    assert (tmp_path / "out" / "README_tables.md").read_text().count("| h/8, h/32 |") == 1
    assert (tmp_path / "out" / "cpu.png").exists()
    text = readme.read_text()
    assert report.BEGIN in text and "](out/cpu.png)" in text


def test_memory_tracker_counts_a_known_allocation():
    cpu = torch.device("cpu")

    def one_mib():
        t = torch.empty(MiB // 4, dtype=torch.float32)
        t.fill_(1.0)   # in place: the same storage, not counted twice

    assert benchlib.peak_memory(one_mib, cpu) == MiB


def test_memory_tracker_releases_freed_storage_and_counts_autograd():
    cpu = torch.device("cpu")
    x = torch.randn(256, 1024, requires_grad=True)   # 1 MiB, existed before: not counted

    def sequential():
        for _ in range(3):
            a = torch.empty(MiB // 4)   # freed at the next iteration: the peak stays near 1 MiB
            del a

    assert MiB <= benchlib.peak_memory(sequential, cpu) < 2 * MiB

    def views():
        y = x.view(-1)[: 1024]      # a view of an input: no new storage
        y.t() if y.dim() == 2 else y

    assert benchlib.peak_memory(views, cpu) == 0

    def train_like():
        # exp saves its 1 MiB output for backward; mul makes another; backward makes grads
        (x.exp() * 2).sum().backward()

    peak = benchlib.peak_memory(train_like, cpu)
    assert 3 * MiB <= peak < 6 * MiB
    x.grad = None


def test_interrupted_suite_saves_the_benchmarks_that_finished():
    """SIGINT at a device call's deadline: the benchmark cut off mid-run (no rounds) and those
    never started are dropped before pytest-benchmark saves, and the JSON says it was cut."""
    from types import SimpleNamespace
    conftest = _load("conftest")

    def bench(rounds):
        return SimpleNamespace(stats=None if rounds is None else SimpleNamespace(data=rounds))

    done, cut, never = bench([0.1, 0.2]), bench([]), bench(None)
    bs = SimpleNamespace(benchmarks=[done, cut, never])
    config = SimpleNamespace(_benchmarksession=bs, getoption=lambda name: "cpu")
    wrapper = conftest.pytest_sessionfinish(SimpleNamespace(config=config), pytest.ExitCode.INTERRUPTED)
    next(wrapper)   # the part that runs before pytest-benchmark's own saving
    assert bs.benchmarks == [done]
    out = {"benchmarks": []}
    conftest.pytest_benchmark_update_json(config, [], out)
    assert out["regharm"]["interrupted"] == {"dropped_unfinished": 2}
    assert out["regharm"]["device"] == "cpu"
    data = _fabricated()
    data["regharm"]["interrupted"] = out["regharm"]["interrupted"]
    assert "interrupted" in report.header_section(data)
    assert "interrupted" not in report.header_section(_fabricated())


def test_default_json_path_saves_with_old_and_new_pytest_benchmark(tmp_path):
    """The suite's default JSON (benchmarks/results/<device>.json) is a stand-in created only at
    saving time: pytest-benchmark < 5.2 enters it as an open file, 5.2 on opens it as a path
    (5.3.1 failed at the end of a whole CPU run when it could only be entered)."""
    conftest = _load("conftest")
    for n, save in enumerate((lambda j: j, lambda j: open(j, "wb"))):
        lazy = conftest._LazyJson(str(tmp_path / f"results{n}" / "cpu.json"))
        assert not os.path.exists(lazy.path)
        with save(lazy) as fh:
            fh.write(b"{}")
        assert json.loads(open(lazy.path).read()) == {}
