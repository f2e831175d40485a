"""Nsight Compute's view of the native CUDA kernels at the paper's setting, for the next speed-up:
how close each kernel runs to the GPU's compute and memory throughput (SpeedOfLight), how many
warps it keeps resident and what limits that (Occupancy, LaunchStats), and what its warps wait
for (WarpStateStats: long-scoreboard stalls are waits on global loads, PERF_NOTES item 28).
benchmarks/gpu_check.sh runs it in its `diagnose` step, after the sanitizer; gpu_bench.json
already holds the kernels' times (kernel_profile), this says why they take them.

    python benchmarks/ncu_kernels.py [--budget 90]
    python benchmarks/ncu_kernels.py --run [--device cpu]     # the workload alone

The workload (``--run``) is one forward+backward of each: masked_attention at PTL's paper setting
(B = 4, L = 128², N = 841, D = 64, E = 128, 20 % foreground) in bfloat16 and in float32 on CUDA
cores and as 3xTF32, and patch_stats (B = 4, C = 64, 128², patch 16, stride 4) in float32.
ncu profiles only our kernels (attn_*, patch_stats_*) and prints one summary per kernel. Exit
status: 0 when ncu ran, 1 when it failed, 2 when there is nothing to profile (no CUDA, no ncu).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cuda_tools import cuda_available, find_tool, run_tool  # noqa: E402

KERNELS = "regex:attn_|patch_stats"
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats")
# shared-memory load wavefronts and load instructions: their ratio is what PairedLanes
# (PERF_NOTES item 16) halves in the model of simt_products.cuh, 4 -> 2 for the float32
# kernels' 16-byte loads
METRICS = ("l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
           "smsp__sass_inst_executed_op_shared_ld.sum")


def _workload(device_name: str, only: str | None = None) -> None:
    import torch
    import gpu_bench  # the acceptance settings and their input builders

    device = torch.device(device_name)
    cases = gpu_bench.settings(quick=device.type != "cuda", device=device)
    # masked_attention in bf16 (register kernels, streamed tiles through two stages and
    # through one), bf16 on the tile kernels, float32 on CUDA
    # cores (register kernels in PairedLanes and in mma.sync's lane order, with the forward's
    # keys unsplit, then tile kernels) and as 3xTF32; patch_stats, its backward gathering by
    # cells (the default) and by pixels
    runs = [("masked_attention", None), ("masked_attention", "one_stage"),
            ("masked_attention", "tiles"),
            ("masked_attention", "simt"), ("masked_attention", "simt+mma_lanes"),
            ("masked_attention", "simt+fwd_whole"),
            ("masked_attention", "simt+tiles"), ("masked_attention", "tf32x3"),
            ("patch_stats", None), ("patch_stats", "pixel_gather")]
    settings = ("REGHARM_CUDA_ATTENTION", "REGHARM_CUDA_FP32_MATH", "REGHARM_CUDA_SIMT_LANES",
                "REGHARM_CUDA_FWD_SPLIT", "REGHARM_CUDA_PS_GATHER", "REGHARM_CUDA_PIPELINE")
    if only is not None:  # e.g. "simt,simt+mma_lanes"
        runs = [r for r in runs if (r[1] or "") in only.split(",")]
    for name, setting in runs:
        builder, sizes, dtype = cases[name]
        for var in settings:
            os.environ.pop(var, None)
        for part in (setting or "").split("+"):
            if part == "tiles":
                os.environ["REGHARM_CUDA_ATTENTION"] = "tiles"
            elif part == "mma_lanes":
                os.environ["REGHARM_CUDA_SIMT_LANES"] = "mma"
            elif part == "fwd_whole":
                os.environ["REGHARM_CUDA_FWD_SPLIT"] = "off"
            elif part == "pixel_gather":
                os.environ["REGHARM_CUDA_PS_GATHER"] = "pixels"
            elif part == "one_stage":
                os.environ["REGHARM_CUDA_PIPELINE"] = "off"
            elif part:
                dtype = torch.float32
                os.environ["REGHARM_CUDA_FP32_MATH"] = part
        make, run_with = builder(sizes, device, dtype)
        inputs = make()
        outs = run_with("native")(*inputs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        sum(o.float().sum() for o in outs).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"ran {name} {dtype} {setting or ''}".rstrip(), flush=True)
    for var in settings:
        os.environ.pop(var, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="run the workload itself (what ncu wraps)")
    ap.add_argument("--device", default="cuda", help="the workload's device (cpu: quick sizes)")
    ap.add_argument("--runs", default=None, help="with --run: only these settings (comma list)")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds ncu may take")
    args = ap.parse_args(argv)
    if args.run:
        _workload(args.device, args.runs)
        return 0
    print(f"profile: budget {args.budget:.0f} s", flush=True)
    if args.device.startswith("cuda") and not cuda_available():
        print("no CUDA device here: nothing to profile (--run --device cpu runs the workload)")
        return 2
    ncu = find_tool("ncu", "NCU")
    if ncu is None:
        print("ncu (Nsight Compute) not found (NCU, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
        return 2
    start = time.monotonic()
    cmd = [ncu, "--kernel-name", KERNELS, "--launch-count", "60", "--clock-control", "none",
           *[a for s in SECTIONS for a in ("--section", s)], "--print-summary", "per-kernel",
           sys.executable, os.path.abspath(__file__), "--run", "--device", args.device]
    print("== " + " ".join(cmd), flush=True)
    output, rc = run_tool(cmd, args.budget)
    print(output[-60000:], flush=True)
    print(f"ncu: rc {rc}")
    # the shared-load metrics of float32's register kernels in both lane orders, in a run of
    # their own: metric names that this ncu does not know fail only this part
    left = args.budget - (time.monotonic() - start)
    if rc == 0 and left > 15:
        cmd = [ncu, "--kernel-name", "regex:attn_.*reg_kernel", "--clock-control", "none",
               "--metrics", ",".join(METRICS), "--print-summary", "per-kernel",
               sys.executable, os.path.abspath(__file__), "--run", "--device", args.device,
               "--runs", "simt,simt+mma_lanes"]
        print("== " + " ".join(cmd), flush=True)
        metrics_out, metrics_rc = run_tool(cmd, left)
        print(metrics_out[-20000:], flush=True)
        print(f"ncu shared-load metrics: rc {metrics_rc}")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
