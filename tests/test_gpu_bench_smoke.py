"""Smoke test of benchmarks/gpu_bench.py on CPU (tiny shapes), so that the script a GPU session
runs once, unattended, is known to work end to end before it gets there."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "benchmarks", "gpu_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bench_quick_on_cpu(tmp_path):
    bench = _load()
    assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path),
                       "--backends", "reference,torch,sdpa,triton"]) == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    env = report["environment"]
    for key in ("device_name", "torch", "triton", "git_commit", "backends"):
        assert key in env, key
    names = {"patch_stats", "masked_attention", "ptl", "ltl"}
    assert set(report["settings"]) == names
    timed = {(r["bench"], r["backend"]) for r in report["results"] if "error" not in r}
    errors = [r for r in report["results"] if "error" in r]
    assert not errors, errors[0]["error"]
    for name in names:
        for backend in ("reference", "torch"):
            assert (name, backend) in timed
    assert ("masked_attention", "sdpa") in timed
    for r in report["results"]:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_peak_mb"] is None
    # the interpreter is never timed on CPU, and says so
    assert any(s["backend"] == "triton" for s in report["skipped"])


def test_collect_files_a_run_and_the_readme_shows_it(tmp_path):
    """benchmarks/collect_gpu.py on a real (CPU, tiny) gpu_bench run: the JSON and the step logs
    are filed, and the README block shows the device, the table and the criteria."""
    import shutil
    import sys
    run, results = tmp_path / "run", tmp_path / "results"
    run.mkdir()
    results.mkdir()
    assert _load().main(["--device", "cpu", "--quick", "--out", str(run)]) == 0
    (run / "steps.log").write_text("bench rc=0 4s\n")
    shutil.copyfile(os.path.join(ROOT, "benchmarks", "results", "cpu.json"), results / "cpu.json")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n\n## After\n")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("collect_gpu", os.path.join(ROOT, "benchmarks", "collect_gpu.py"))
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    assert collect.main([str(run), "--results", str(results), "--readme", str(readme)]) == 0
    assert (results / "gpu_bench-cpu-gpu-bench.json").exists()
    assert (results / "logs-cpu-gpu-bench" / "steps.log").read_text() == "bench rc=0 4s\n"
    text = readme.read_text()
    report = json.loads((run / "gpu_bench.json").read_text())
    assert f"### Acceptance settings on {report['environment']['device_name']}" in text
    assert "| `ptl` |" in text and "| criterion | measured / baseline | bound | checked | holds |" in text
    assert "- `ptl` on `native`: `" in text   # where the time goes
    assert "No GPU result yet" in text          # a CPU run is not a GPU result
    assert "\nold\n" not in text and text.endswith("## After\n")


def test_isolated_backends_merge_into_one_report(tmp_path):
    """--isolate (what gpu_check.sh runs): one process per backend, one JSON in bench order."""
    assert _load().main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--isolate",
                         "--backends", "reference,native", "--only", "patch_stats,ptl"]) == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert [(r["bench"], r["backend"]) for r in report["results"]] == [
        ("patch_stats", "reference"), ("patch_stats", "native"), ("ptl", "reference"), ("ptl", "native")]
    assert not any("error" in r for r in report["results"])
    assert "native PTL fwd+bwd >= 10x faster than reference (fp32)" in report["acceptance"]
    for r in report["results"]:   # the profile the next optimisation step starts from
        assert bool(r.get("fwd_bwd_profile")) == (r["backend"] == "native"), r


def test_blob_mask_covers_the_requested_fraction():
    torch = pytest.importorskip("torch")
    m = _load().blob_mask(3, 64, 64, 0.2, torch.device("cpu"))
    assert m.shape == (3, 1, 64, 64) and 0 <= m.min() and m.max() <= 1
    frac = m.mean((1, 2, 3))
    assert ((frac - 0.2).abs() < 0.02).all(), frac


def test_host_overhead_script_runs_without_a_gpu():
    """benchmarks/host_overhead.py (compiled kernels, launches stubbed) works on a CPU machine."""
    import subprocess
    import sys

    pytest.importorskip("triton", reason="times the triton backend's host side")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_overhead.py"),
                           "--reps", "3"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if "host side" in ln]
    assert [ln.split(" fwd+bwd")[0].strip() for ln in lines] == \
        ["masked_attention", "patch_stats", "PTL (one node)", "PTL (unfused)",
         "PTL native (C++ node)", "PTL native (Python node)", "PTL native (unfused)"], proc.stdout


def test_profiles_name_the_ops_and_their_time():
    import torch

    bench = _load()
    x = torch.randn(64, 64)
    fn = lambda: (x @ x).relu_()  # noqa: E731
    rows = bench.host_profile(fn)
    assert any("aten::mm" in name for name, _, _ in rows), rows
    assert all(calls >= 1 and us >= 0 for _, calls, us in rows)
    rows, total = bench.kernel_profile(fn, torch.device("cpu"))
    assert rows and total >= max(us for _, _, us in rows)


def test_enqueue_time_is_the_host_part_of_a_call(monkeypatch):
    """fwd_bwd_enqueue_ms (GPU runs): the host time of one call, each start on an idle GPU;
    here with the GPU waits stubbed, a call that spends 3 ms on the host takes >= 3 ms."""
    import time

    import torch
    bench = _load()
    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: waits.append(1))
    ms = bench.enqueue_ms(lambda: time.sleep(0.003), reps=3)
    assert 3.0 <= ms < 50.0
    assert len(waits) == 4  # before each call and once at the end


def test_compiled_layer_variants(tmp_path):
    """"<backend>+compile" times the layers under torch.compile (opt-in); op benchmarks say why
    they are skipped."""
    bench = _load()
    assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--only",
                       "ptl,masked_attention", "--backends", "native,native+compile"]) == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = {(r["bench"], r["backend"]): r for r in report["results"]}
    assert "error" not in rows[("ptl", "native+compile")], rows[("ptl", "native+compile")]
    assert rows[("ptl", "native+compile")]["fwd_bwd_ms"] > 0
    assert ("masked_attention", "native") in rows
    skipped = {(s["bench"], s["backend"]): s["reason"] for s in report["skipped"]}
    assert skipped[("masked_attention", "native+compile")] == "compiled variants time the layers only"


def _attention_case(bench):
    import torch
    return bench.attention_case(dict(B=2, L=64, N=16, D=8, E=8, fg=0.3), torch.device("cpu"), torch.float32)


def test_bench_check_passes_right_results_and_names_a_wrong_one():
    """The check behind every timed entry: right results pass; an output or a gradient that is
    wrong on the last image only (where batch offsets are largest) fails, named."""
    import torch
    bench = _load()
    import bench_check  # importable once gpu_bench is (it puts benchmarks/ on the path)
    make, run_with = _attention_case(bench)
    run = run_with("native")
    good = bench_check.check(make, run, run.reference64, torch.float32)
    assert good["ok"] and good["excess"] <= 1 and "grad of input 1" in good["compared"]

    def wrong_output(q, k, v, kb, qm):
        out = run(q, k, v, kb, qm)
        return torch.cat([out[:-1], out[-1:] * 1.01])
    bad = bench_check.check(make, wrong_output, run.reference64, torch.float32)
    assert not bad["ok"] and bad["worst"] == "output 0" and bad["excess"] > 1

    def make_wrong_grad():
        q, k, v, kb, qm = make()
        k.register_hook(lambda g: g * 1.01)
        return q, k, v, kb, qm
    bad = bench_check.check(make_wrong_grad, run, run.reference64, torch.float32)
    assert not bad["ok"] and bad["worst"] == "grad of input 1"

    # the layers compare with a float64 copy of the timed module (same weights)
    make, run_with = bench.layer_case(dict(layer="ptl", B=2, C=4, H=16, patch=4, stride=2, fg=0.3),
                                      torch.device("cpu"), torch.float32)
    run = run_with("native")
    assert bench_check.check(make, run, run.reference64, torch.float32)["ok"]


def test_a_criterion_holds_only_where_its_backend_was_checked():
    bench = _load()
    entry = dict(bench="ptl", backend="triton", fwd_bwd_ms=1.0)
    base = dict(bench="ptl", backend="torch", fwd_bwd_ms=10.0)
    label = "triton PTL fwd+bwd >= 2x faster than torch (fp32)"
    for check, holds, shown in ((dict(ok=True), True, "ok"), (None, False, "not run"),
                                (dict(ok=False, worst="output 0", excess=3.0), False, "fails (output 0: 3.0x"),
                                (dict(ok=False, error="OutOfMemoryError"), False, "fails (OutOfMemoryError")):
        e = dict(entry, **({"check": check} if check else {}))
        a = bench.acceptance([e, base])[label]
        assert a["ratio"] == 0.1 and a["holds"] is holds and a["checked"].startswith(shown)


def test_pairs_time_each_criterion_alternately(tmp_path):
    """--pairs (gpu_check.sh passes 5): each time criterion is timed again in one process as
    alternating ours/baseline pairs, and its ratio becomes their median, the range and the
    separate runs' ratio kept beside it (and shown in the README's criteria table)."""
    bench = _load()
    assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--isolate",
                       "--pairs", "2", "--backends", "reference,sdpa,native",
                       "--only", "masked_attention"]) == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    label = "native masked_attention fwd+bwd >= 2x faster than SDPA (bf16 on GPU)"
    pair = report["paired"][label]
    assert len(pair["ratios"]) == 2 and len(pair["ms"]["native"]) == len(pair["ms"]["sdpa"]) == 2
    for r, a, b in zip(pair["ratios"], pair["ms"]["native"], pair["ms"]["sdpa"]):
        assert abs(r - a / b) <= 1e-3 * r
    crit = report["acceptance"][label]
    assert crit["pairs"] == 2 and crit["ratio"] == round(sum(pair["ratios"]) / 2, 4)
    assert crit["ratio_range"] == [min(pair["ratios"]), max(pair["ratios"])]
    times = {r["backend"]: r["fwd_bwd_ms"] for r in report["results"] if r["bench"] == "masked_attention"}
    assert crit["ratio_separate"] == round(times["native"] / times["sdpa"], 4)
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import report as report_md
    assert "over 2 pairs; separate runs" in report_md.acceptance_section(report)


def test_pairs_run_before_the_variant_rows(tmp_path, monkeypatch):
    """A deadline that cuts gpu_check.sh's bench step short takes variant rows, not the pairs
    that decide the acceptance lines: the pairs run right after the backends they name."""
    bench = _load()
    real, order = bench.subprocess.run, []

    def run(cmd, *a, **k):
        for flag in ("--pair", "--backends"):  # a child of gpu_bench.py (not git, say)
            if flag in cmd:
                order.append(cmd[cmd.index(flag) + 1])
                break
        return real(cmd, *a, **k)

    monkeypatch.setattr(bench.subprocess, "run", run)
    assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--isolate",
                       "--pairs", "1", "--backends", "native_dq_atomic,sdpa,native",
                       "--only", "masked_attention"]) == 0
    pair = str(next(i for i, c in enumerate(bench.CRITERIA) if c[1] == "masked_attention"))
    assert order == ["sdpa", "native", pair, "native_dq_atomic"], order
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    done = {r["backend"] for r in report["results"]} | {str(r) for r in report["skipped"]}
    assert {"sdpa", "native"} <= done and any("native_dq_atomic" in d for d in done), report["skipped"]


def test_lines_then_variants_make_one_report(tmp_path):
    """gpu_check.sh's two bench steps: --rows lines (the criteria's backends and their pairs),
    later --rows variants (the rest, added to the same JSON, pairs kept)."""
    bench = _load()
    common = ["--device", "cpu", "--quick", "--out", str(tmp_path), "--isolate", "--only",
              "masked_attention", "--backends", "native_dq_atomic,sdpa,native"]
    assert bench.main(common + ["--rows", "lines", "--pairs", "1"]) == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert {r["backend"] for r in report["results"]} == {"sdpa", "native"}
    assert len(report["paired"]) == 1
    assert bench.main(common + ["--rows", "variants"]) == 0
    merged = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert merged["paired"] == report["paired"]
    assert [r for r in merged["results"] if r["backend"] in ("sdpa", "native")] == report["results"]
    done = {r["backend"] for r in merged["results"]} | {str(r) for r in merged["skipped"]}
    assert any("native_dq_atomic" in d for d in done)
    label = next(c[0] for c in bench.CRITERIA if c[1] == "masked_attention")
    assert merged["acceptance"][label]["pairs"] == 1


def test_variants_run_newest_first(tmp_path, monkeypatch):
    """The variants step times the rows of the newest PERF_NOTES items first (VARIANTS_FIRST),
    the others in BACKENDS order: a step limit then cuts rows an earlier GPU run measured."""
    bench = _load()
    assert set(bench.VARIANTS_FIRST) <= set(bench.VARIANTS)
    real, order = bench.subprocess.run, []

    def run(cmd, *a, **k):
        if "--backends" in cmd:
            order.append(cmd[cmd.index("--backends") + 1])
        return real(cmd, *a, **k)

    monkeypatch.setattr(bench.subprocess, "run", run)
    assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--isolate",
                       "--rows", "variants", "--only", "masked_attention", "--backends",
                       "native_tiles,native_dq_atomic,native_pixel_gather,native_key_raster"]) == 0
    assert order == ["native_key_raster", "native_pixel_gather", "native_tiles",
                     "native_dq_atomic"], order


def _collect_module():
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("collect_gpu", os.path.join(ROOT, "benchmarks", "collect_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_collect_files_the_logs_of_a_run_cut_off_mid_json(tmp_path, capsys):
    """A device call killed at its limit can leave an empty or cut JSON: the logs (the CUDA
    tests' verdicts among them) are still filed, under the GPU that steps.log names."""
    run, results = tmp_path / "run", tmp_path / "results"
    run.mkdir()
    (run / "gpu_bench.json").write_text('{"environment": {"device_na')
    (run / "cuda.json").write_text("")
    (run / "steps.log").write_text("== env\nname, memory.total [MiB], driver_version, clocks.max.sm [MHz]\n"
                                   "NVIDIA H200, 143771 MiB, 580.95.05, 1980 MHz\nbuild rc=0 80s\n")
    (run / "tests.log").write_text("116 passed\n")
    written = _collect_module().collect(str(run), str(results))
    err = capsys.readouterr().err
    assert "gpu_bench.json: not readable JSON" in err and "filing the logs only" in err
    logs = results / "logs-cuda-nvidia-h200"
    assert sorted(os.path.basename(p) for p in written) == ["steps.log", "tests.log"]
    assert (logs / "tests.log").read_text() == "116 passed\n"


def test_a_tool_past_its_limit_is_killed_with_its_children(tmp_path):
    """compute-sanitizer or ncu past its budget: the driver it started must not go on running
    on the GPU beside the next steps' timings."""
    import subprocess
    import sys
    import time
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from cuda_tools import run_tool
    pid_file = tmp_path / "child.pid"
    tool = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)")
    out, rc = run_tool([sys.executable, "-c", tool], limit=3)
    assert rc == "timed out after 3 s" and "started" in out
    child = int(pid_file.read_text())
    for _ in range(50):   # reaped by init once killed
        if subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True, text=True).stdout.strip() \
                in ("", "Z"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the tool's child {child} is still running")


def test_a_second_call_of_one_session_joins_the_first_when_filed(tmp_path):
    """gpu_check.sh's second call starts with an empty $OUT: its report holds the variant rows
    only. Filed after the first (same commit), it adds them; the acceptance lines and the first
    call's logs stay. A run of another commit replaces the report."""
    env = {"device": "cuda:0", "device_name": "NVIDIA H200", "git_commit": "abc123"}
    first = {"environment": env, "settings": {}, "skipped": [], "results": [
        {"bench": "ptl", "backend": "triton", "fwd_bwd_ms": 1.0, "check": {"ok": True}},
        {"bench": "ptl", "backend": "torch", "fwd_bwd_ms": 3.0, "check": {"ok": True}}]}
    second = {"environment": env, "settings": {}, "skipped": [], "acceptance": {}, "results": [
        {"bench": "ptl", "backend": "native_tiles", "fwd_bwd_ms": 2.0, "check": {"ok": True}}]}
    results, collect = tmp_path / "results", _collect_module()
    for i, report in enumerate((first, second)):
        run = tmp_path / f"call{i}"
        run.mkdir()
        (run / "gpu_bench.json").write_text(json.dumps(report))
        (run / "steps.log").write_text(f"call {i}\n")
        collect.collect(str(run), str(results))
    filed = json.loads((results / "gpu_bench-cuda-nvidia-h200.json").read_text())
    assert {r["backend"] for r in filed["results"]} == {"triton", "torch", "native_tiles"}
    line = filed["acceptance"]["triton PTL fwd+bwd >= 2x faster than torch (fp32)"]
    assert line["holds"] and line["ratio"] == round(1 / 3, 4)
    steps = (results / "logs-cuda-nvidia-h200" / "steps.log").read_text()
    assert steps.startswith("call 0\n") and "a later call of the same commit" in steps and "call 1" in steps
    run = tmp_path / "other"
    run.mkdir()
    (run / "gpu_bench.json").write_text(json.dumps(dict(second, environment=dict(env, git_commit="def456"))))
    collect.collect(str(run), str(results))
    filed = json.loads((results / "gpu_bench-cuda-nvidia-h200.json").read_text())
    assert [r["backend"] for r in filed["results"]] == ["native_tiles"]
