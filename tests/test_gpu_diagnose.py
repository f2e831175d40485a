"""The diagnose steps of the GPU script, on CPU. benchmarks/sanitize_cuda.py: its driver compares
every kernel with the reference, and its wrapper runs each compute-sanitizer tool and reads the
verdicts and exit codes right (with a stand-in for compute-sanitizer that runs the driver and
reports what it is told to). benchmarks/ncu_kernels.py: its workload runs, and its wrapper hands
it to ncu (a stand-in again)."""
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sanitize_cuda.py"
NCU_SCRIPT = ROOT / "benchmarks" / "ncu_kernels.py"

# Drops the sanitizer's own options, runs the wrapped command, then fails the tools named in
# FAKE_SANITIZER_FAIL as compute-sanitizer does (its summary line, --error-exitcode).
FAKE = """#!/usr/bin/env python3
import os, subprocess, sys
args = sys.argv[1:]
tool = args[args.index("--tool") + 1]
cmd = args[args.index("--print-limit") + 2:]
rc = subprocess.run(cmd).returncode
if tool in os.environ.get("FAKE_SANITIZER_FAIL", "").split(","):
    print("========= ERROR SUMMARY: 2 errors")
    sys.exit(3)
print("========= ERROR SUMMARY: 0 errors")
sys.exit(rc)
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _wrapper(tmp_path, fail=""):
    fake = _executable(tmp_path / "compute-sanitizer", FAKE)
    env = dict(os.environ, COMPUTE_SANITIZER=str(fake), FAKE_SANITIZER_FAIL=fail)
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tools",
                           "memcheck,racecheck", "--budget", "240"], env=env, capture_output=True,
                          text=True, timeout=300)


def test_driver_matches_the_reference_on_every_case():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--run", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ok", "MISMATCH"))]
    # two patch_stats cases in 4 dtypes, two attention cases (with and without a mask) in 12
    # settings: float32 simt and tf32x3, float16, bfloat16, float64, bfloat16 and float32 on
    # the tile kernels, float32 with dQ by its kernel, bfloat16 with atomic dQ, float32 in
    # mma.sync's lane order and with its forward unsplit, bfloat16 with one stage of key
    # tiles; two masked_norm cases in 4 dtypes; the PTL layer (native's C++ node, on CUDA the
    # blend's kernels) in 4 dtypes
    assert len(lines) == 2 * 4 + 2 * 12 + 2 * 4 + 4 and all(ln.startswith("ok") for ln in lines)
    assert sum(ln.startswith("ok        masked_norm") for ln in lines) == 8
    assert sum(ln.startswith("ok        PTL") for ln in lines) == 4
    assert sum("no mask" in ln for ln in lines) == 12
    assert sum("setting mma_lanes" in ln for ln in lines) == 2
    assert sum("setting one_stage" in ln for ln in lines) == 2
    assert sum("setting tiles" in ln for ln in lines) == 4
    assert "driver: 0 mismatch(es)" in proc.stdout


def test_wrapper_reports_clean_tools(tmp_path):
    proc = _wrapper(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "memcheck   clean" in proc.stdout and "racecheck  clean" in proc.stdout


def test_wrapper_reports_a_tool_that_finds_errors(tmp_path):
    proc = _wrapper(tmp_path, fail="racecheck")
    assert proc.returncode == 1
    assert "memcheck   clean" in proc.stdout
    assert "racecheck  sanitizer errors" in proc.stdout and "ERROR SUMMARY: 2 errors" in proc.stdout


def test_driver_reports_a_wrong_kernel(monkeypatch, capsys):
    """A native result 30 % off must fail the driver in every dtype (a race that changes values
    would); 16-bit tolerances are a few per cent."""
    import importlib.util

    import regharm_ext.ops as ops
    spec = importlib.util.spec_from_file_location("sanitize_cuda", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    real = ops.masked_attention

    def wrong(*args, backend=None, **kw):
        out = real(*args, backend=backend, **kw)
        return out * 1.3 if backend == "native" else out

    monkeypatch.setattr(ops, "masked_attention", wrong)
    assert mod._driver("cpu") == 24   # every attention case; patch_stats stays right
    out = capsys.readouterr().out
    assert out.count("MISMATCH  masked_attention") == 24 and "MISMATCH  patch_stats" not in out


# Runs what follows ncu's own options (the interpreter onwards) and prints a summary line.
FAKE_NCU = """#!/usr/bin/env python3
import subprocess, sys
args = sys.argv[1:]
cmd = args[args.index("per-kernel") + 1:]
assert "--kernel-name" in args and ("--section" in args or "--metrics" in args), args
rc = subprocess.run(cmd).returncode
print("==PROF== Disconnected")
sys.exit(rc)
"""


def test_ncu_wrapper_profiles_the_workload(tmp_path):
    fake = _executable(tmp_path / "ncu", FAKE_NCU)
    proc = subprocess.run([sys.executable, str(NCU_SCRIPT), "--device", "cpu", "--budget", "120"],
                          env=dict(os.environ, NCU=str(fake)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # eight settings of masked_attention in the sections' run, then the two float32 lane orders
    # in the shared-load metrics' run
    assert proc.stdout.count("ran masked_attention") == 8 + 2 and "ran patch_stats" in proc.stdout
    assert proc.stdout.count("ran masked_attention torch.float32 simt+mma_lanes") == 2
    assert "ncu shared-load metrics: rc 0" in proc.stdout
    assert any(ln.startswith("ran masked_attention") and ln.endswith(" tiles")
               for ln in proc.stdout.splitlines())
    assert any(ln.startswith("ran masked_attention torch.float32 simt+tiles")
               for ln in proc.stdout.splitlines())
    assert "==PROF== Disconnected" in proc.stdout and "ncu: rc 0" in proc.stdout
