"""torch.compile(fullgraph=True) of PTL + LTL on the `triton` backend traces on a CPU machine:
every kernel launch of the forward and of the backward lands in the graphs, and torch's mutation
analysis lowers each kernel (tests/triton_compile_trace.py; the GPU runs the compiled module in
tests/test_triton_cuda.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the triton backend needs triton")

DRIVER = Path(__file__).with_name("triton_compile_trace.py")
AOT_CHECK = Path(__file__).parents[1] / "benchmarks" / "triton_aot_check.py"
# PTL: patch_stats, its masked norm, then its attention; LTL: one attention. Backward: each in
# reverse.
FORWARD = sorted(["_ps_fwd", "_norm_stats", "_norm_tokens"] + 2 * ["_compact_kernel", "_attn_fwd"])
BACKWARD = sorted(["_ps_bwd_patch", "_ps_bwd_pixel", "_norm_grad_sums", "_norm_dx"]
                  + 2 * ["_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_ptl_ltl_traces_every_triton_launch(dtype):
    proc = subprocess.run([sys.executable, str(DRIVER), "--dtype", dtype], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["error"] is None, report["error"]
    assert report["mutation_fallbacks"] == 0, "torch could not lower a kernel to find what it writes"
    assert report["fw"] == FORWARD
    assert report["bw"] == BACKWARD


def test_kernels_compile_with_the_scalar_types_torch_compile_passes():
    """Inductor passes Python floats (the attention scale, eps, min_mass) to user Triton kernels
    as fp64 where a direct launch passes fp32; every kernel must still compile for sm_90 (an
    fp64 scale once made _attn_fwd's running max change type inside its loop, on the GPU only)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(AOT_CHECK), "--float", "fp64", "--dtypes", "fp32",
                           "--one-per-kernel"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # 12: the compaction takes the key bias (fp32) since it orders the keys too
    assert "12 kernel variants compiled for sm_90, 0 failed" in proc.stdout, proc.stdout[-2000:]
    proc = subprocess.run([sys.executable, str(AOT_CHECK), "--kernels", "_compact_kernel",
                           "--one-per-kernel"], capture_output=True, text=True, timeout=300, env=env)
    assert "1 kernel variants compiled for sm_90, 0 failed" in proc.stdout, (proc.stdout + proc.stderr)[-2000:]
