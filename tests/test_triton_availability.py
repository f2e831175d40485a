"""What the `triton` backend says about itself when it cannot run: without triton, and on CPU
tensors without the interpreter. Each case needs a fresh interpreter (the choice is made at
import), hence subprocesses."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import json, sys, torch
{prelude}
from regharm_ext.ops import triton_backend
from regharm_ext import backends
print(json.dumps(dict(cpu=triton_backend.unavailable(torch.device("cpu")),
                      listing=backends("cpu")["triton"])))
"""


def _probe(prelude="", interpret="0"):
    env = dict(os.environ, TRITON_INTERPRET=interpret, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", PROBE.format(prelude=prelude)], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cpu_without_interpreter_says_how_to_enable_it():
    out = _probe(interpret="0")
    assert "set TRITON_INTERPRET=1 before importing triton to run on CPU (slow)" in out["cpu"]
    assert out["listing"] == out["cpu"]


def test_cpu_with_interpreter_is_available():
    """Where this suite runs (CI included) the interpreter must work: test_triton.py skips when it
    does not, and this test keeps such an environment from passing quietly."""
    out = _probe(interpret="1")
    assert out["cpu"] is None and out["listing"] == "available", out["cpu"]


def test_import_without_triton_does_not_fail():
    out = _probe(prelude="sys.modules['triton'] = None  # as if triton were not installed")
    assert "triton is not installed" in out["cpu"]
    assert "triton is not installed" in out["listing"]
