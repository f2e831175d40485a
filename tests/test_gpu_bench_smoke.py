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
    assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--no-copy",
                       "--backends", "reference,torch,triton"]) == 0
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


def test_blob_mask_covers_the_requested_fraction():
    torch = pytest.importorskip("torch")
    m = _load().blob_mask(3, 64, 64, 0.2, torch.device("cpu"))
    assert m.shape == (3, 1, 64, 64) and 0 <= m.min() and m.max() <= 1
    frac = m.mean((1, 2, 3))
    assert ((frac - 0.2).abs() < 0.02).all(), frac
