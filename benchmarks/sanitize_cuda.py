"""The native CUDA kernels under NVIDIA's compute-sanitizer: what the CPU emulator of
tests/cuda_emu cannot show, seen on the GPU itself — out-of-bounds and misaligned accesses
(memcheck), shared-memory races (racecheck), barrier misuse (synccheck) and reads of global
memory nothing wrote (initcheck). benchmarks/gpu_check.sh runs it as its `sanitize` step.

    python benchmarks/sanitize_cuda.py [--tools memcheck,racecheck] [--budget 150]
    python benchmarks/sanitize_cuda.py --run [--device cpu]     # the driver alone, no sanitizer
    python benchmarks/sanitize_cuda.py --backend triton --rounds 5 --tools memcheck,racecheck

The driver (``--run``) calls every kernel of the ops once per dtype and float32 mode — forward
and backward of patch_stats, masked_attention and masked_norm on small odd inputs with soft
masks, removed keys, inactive queries and an image with every key removed — and compares each
result with the reference computed in float64 on the CPU, so a race that changes values fails too.
Before each run the allocator's free memory is filled with 0xFF bytes, so an output element no
kernel writes (or an index read from one) is NaN or -1 rather than a lucky zero. ``--backend
triton`` runs the same driver on the Triton kernels, with a stress test of the query compaction
(a GPU run once hit an intermittent illegal address in the Triton attention).
Every tool runs the driver in a child process with PYTORCH_NO_CUDA_MEMORY_CACHING=1: each tensor
is then its own allocation, and memcheck sees an access one element past a tensor. Exit status:
0 when every tool ran clean and every value matched, 1 otherwise, 2 when nothing could be
sanitized (no CUDA device, or no compute-sanitizer: the driver then runs alone, so the values
are still checked).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from cuda_tools import cuda_available, find_tool, run_tool  # noqa: E402

TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
# the native attention's environment switches (csrc/cuda/masked_attention_cuda.cpp)
_SETTINGS = ("REGHARM_CUDA_FP32_MATH", "REGHARM_CUDA_ATTENTION", "REGHARM_CUDA_DQ",
             "REGHARM_CUDA_SIMT_LANES", "REGHARM_CUDA_FWD_SPLIT", "REGHARM_CUDA_PIPELINE")


def _poison(device) -> None:
    """Fills the caching allocator's free memory with 0xFF bytes (-1 as an index, NaN as a
    float), so an output element a kernel never writes, or an index read from it, shows up."""
    import torch
    if device.type == "cuda":
        torch.empty(64 << 20, dtype=torch.uint8, device=device).fill_(255)


def _compaction_stress(device, rounds: int) -> int:
    """The Triton query compaction against torch on random masks (poisoned memory each time):
    every index written once, active queries first, the counts right. Returns the mismatches."""
    import torch
    from regharm_ext.ops.triton_attention import _compact
    g = torch.Generator().manual_seed(0)
    bad = 0
    shapes = [(2, 70), (4, 16384), (3, 1), (1, 1025), (5, 333)]
    for r in range(rounds):
        B, L = shapes[r % len(shapes)]
        qm = torch.rand(B, L, generator=g) < float(torch.rand(1, generator=g))
        _poison(device)
        idx, cnt = _compact(qm.to(device))
        want = torch.sort((~qm).to(torch.int8), dim=1, stable=True).indices  # actives first
        if not (torch.equal(idx.cpu().long(), want) and torch.equal(cnt.cpu().long(), qm.sum(1))):
            bad += 1
            print(f"MISMATCH  compaction {B, L} round {r}", flush=True)
    print(f"{'ok' if not bad else 'FAILED'}        compaction: {rounds} random masks", flush=True)
    return bad


def _driver(device_name: str, backend: str = "native", rounds: int = 1) -> int:
    """Runs the kernels of ``backend`` on poisoned memory (the attention cases ``rounds`` times,
    Triton's compaction on 40 × ``rounds`` masks); returns the number of mismatches."""
    import torch
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    from helpers import assert_close, make_attention_inputs, make_norm_inputs, make_patch_inputs
    from regharm_ext.ops import masked_attention, masked_norm, patch_stats

    device = torch.device(device_name)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    # (attention setting, dtype): float32 on CUDA cores and as 3xTF32, the 16-bit dtypes on the
    # register kernels (the default), bfloat16 and float32 once more on the shared-memory tile
    # kernels, each on the dQ path its default does not take (float32: atomic dQ), and float32
    # in mma.sync's lane order and with its forward's keys unsplit, and bfloat16 with its key
    # tiles through one stage instead of two
    modes = [("simt", torch.float32), ("tf32x3", torch.float32)] + \
        [("", d) for d in dtypes[1:]] + [("tiles", torch.bfloat16), ("tiles", torch.float32)] + \
        [("dq_kernel", torch.float32), ("dq_atomic", torch.bfloat16),
         ("mma_lanes", torch.float32), ("fwd_whole", torch.float32),
         ("one_stage", torch.bfloat16)]
    if backend != "native":  # the settings are the native kernels'
        # (Triton's CPU interpreter has no bfloat16 arithmetic)
        dtypes = [d for d in dtypes if device.type == "cuda" or d != torch.bfloat16]
        modes = [("", d) for d in dtypes]
    settings = {"simt": {"REGHARM_CUDA_FP32_MATH": "simt"},
                "tf32x3": {"REGHARM_CUDA_FP32_MATH": "tf32x3"},
                "tiles": {"REGHARM_CUDA_ATTENTION": "tiles"},
                "dq_kernel": {"REGHARM_CUDA_DQ": "kernel"}, "dq_atomic": {"REGHARM_CUDA_DQ": "atomic"},
                "mma_lanes": {"REGHARM_CUDA_SIMT_LANES": "mma"},
                "fwd_whole": {"REGHARM_CUDA_FWD_SPLIT": "off"},
                "one_stage": {"REGHARM_CUDA_PIPELINE": "off"},
                "": {}}
    # few launches (every one is slow under a sanitizer), every path: odd sizes, several tiles
    # and query splits, masks and no mask, one image with every key removed (make_*_inputs)
    # (PTL's patch and stride: the rotated sweep, tiles 16 patches wide and of equal heights)
    patch_cases = [dict(B=2, C=3, H=37, W=50, patch=(7, 5), stride=(3, 2)),
                   dict(B=1, C=2, H=92, W=96, patch=(16, 16), stride=(4, 4))]
    # (N = 140: two tiles of kept keys, so the 16-bit kernels' second stage loads while the
    # first is in use; more keys cost the sanitizer step's time)
    attn_cases = [(dict(B=2, L=150, N=140, D=24, E=40), True),
                  (dict(B=3, L=37, N=23, D=3, E=6, active=1.0), False)]
    failures = _compaction_stress(device, 40 * rounds) if backend == "triton" else 0

    def run(fn, leaves, others, dev, dtype, backend, seed):
        """Outputs and the gradients of sum(output * fixed cotangent) w.r.t. the leaves."""
        _poison(torch.device(dev))
        ls = [t.to(dev, dtype).requires_grad_(True) for t in leaves]
        outs = fn(*ls, *[o.to(dev) if o is not None else None for o in others], backend)
        g = torch.Generator().manual_seed(seed)
        cots = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
        acc = torch.promote_types(dtype, torch.float32)  # no 16-bit sums
        loss = sum((o.to(acc) * c.to(dev, acc)).sum() for o, c in zip(outs, cots))
        grads = torch.autograd.grad(loss, ls)
        return [t.detach().cpu() for t in (*outs, *grads)], len(outs)

    def compare(label, got, want, n_out, dtype):
        nonlocal failures
        try:
            for i, (a, e) in enumerate(zip(got, want)):
                assert_close(a, e, dtype, grad=i >= n_out, msg=f"output {i}")
            print(f"ok        {label}", flush=True)
        except AssertionError as exc:
            failures += 1
            detail = " ".join([ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:4])
            print(f"MISMATCH  {label}: {detail[:300]}", flush=True)

    for case in patch_cases:
        for dtype in dtypes:
            x, bg, w, b = make_patch_inputs(**case, dtype=dtype)  # the reference gets these too

            def ps(x_, w_, b_, bg_, backend, case=case):
                return patch_stats(x_, bg_.to(x_.dtype), w_, b_, case["patch"], case["stride"],
                                   backend=backend)[:3]

            got, n = run(ps, (x, w, b), (bg,), device, dtype, backend, seed=1)
            want, _ = run(ps, (x, w, b), (bg,), "cpu", torch.float64, "reference", seed=1)
            compare(f"patch_stats {case['B'], case['C'], case['H'], case['W']} {dtype}", got, want,
                    n, dtype)

    for case, masked in attn_cases * rounds:
        for mode, dtype in modes:
            for name in _SETTINGS:
                os.environ.pop(name, None)
            os.environ.update(settings[mode])
            q, k, v, kb, qm = make_attention_inputs(**case, dtype=dtype)
            for mask in ((qm,) if masked else (None,)):

                def ma(q_, k_, v_, kb_, qm_, backend):
                    return (masked_attention(q_, k_, v_, kb_, qm_, backend=backend),)

                got, n = run(ma, (q, k, v), (kb, mask), device, dtype, backend, seed=2)
                want, _ = run(ma, (q, k, v), (kb.double(), mask), "cpu", torch.float64,
                              "reference", seed=2)
                label = " ".join([f"masked_attention {tuple(case.values())} {dtype}",
                                  *([f"setting {mode}"] if mode else []),
                                  *(["no mask"] if mask is None else [])])
                compare(label, got, want, n, dtype)
    for name in _SETTINGS:
        os.environ.pop(name, None)

    for shape in ((2, 40, 9, 11), (1, 3, 1, 37)):  # ragged 32 x 32 tiles; one row
        for dtype in dtypes:
            x, w = make_norm_inputs(*shape, dtype=dtype, offset=100.0)

            def mn(x_, w_, backend):
                return (masked_norm(x_, w_.to(x_.device), backend=backend),)

            got, n = run(mn, (x,), (w,), device, dtype, backend, seed=3)
            want, _ = run(mn, (x,), (w.double(),), "cpu", torch.float64, "reference", seed=3)
            compare(f"masked_norm {shape} {dtype}", got, want, n, dtype)
    # the PTL layer: on native, its C++ node and on CUDA the blend's kernels (ptl_glue_kernels.cu);
    # 37 channels and 21 x 19 positions cross their 32 x 32 tiles, the second image is all
    # foreground (no valid patch: it passes through)
    from regharm_ext import PTL
    from torch.func import functional_call

    gen = torch.Generator().manual_seed(4)
    x, mask = torch.randn(2, 37, 21, 19, generator=gen), torch.zeros(2, 1, 21, 19)
    mask[0, :, 4:15, 3:11] = 0.5 + 0.5 * torch.rand(11, 8, generator=gen)
    mask[1] = 1.0
    weight, bias = torch.randn(20, generator=gen) / 4, torch.randn(1, generator=gen)
    for dtype in dtypes:

        def ptl(x_, w_, b_, mask_, backend):
            layer = PTL(37, patch=(5, 4), stride=(2, 3), backend=backend)
            return (functional_call(layer, {"weight": w_, "bias": b_}, (x_, mask_.to(x_.dtype))),)

        got, n = run(ptl, (x, weight, bias), (mask,), device, dtype, backend, seed=5)
        want, _ = run(ptl, (x, weight, bias), (mask.double(),), "cpu", torch.float64, "reference",
                      seed=5)
        compare(f"PTL (2, 37, 21, 19) {dtype}", got, want, n, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"driver: {failures} mismatch(es)", flush=True)
    return failures


def _summary(output: str) -> str:
    lines = [ln.strip("= ").strip() for ln in output.splitlines() if "SUMMARY" in ln]
    return "; ".join(lines[-2:]) or "no summary line"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="run the driver itself (what a tool wraps)")
    ap.add_argument("--device", default="cuda", help="the driver's device (cpu to check it alone)")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"default: {','.join(TOOLS)}")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for all tools together")
    ap.add_argument("--backend", default="native", choices=("native", "triton"),
                    help="whose kernels (triton: the compaction stress test too)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the attention cases (an intermittent fault needs several tries)")
    args = ap.parse_args(argv)
    if args.run:
        return 1 if _driver(args.device, args.backend, args.rounds) else 0

    print(f"sanitize: budget {args.budget:.0f} s", flush=True)
    if args.device.startswith("cuda"):
        if not cuda_available():
            print("no CUDA device here: nothing to sanitize (--device cpu checks the driver alone)")
            return 2
    this = [sys.executable, os.path.abspath(__file__), "--run", "--device", args.device,
            "--backend", args.backend, "--rounds", str(args.rounds)]
    sanitizer = find_tool("compute-sanitizer", "COMPUTE_SANITIZER")
    if sanitizer is None:
        print("compute-sanitizer not found (COMPUTE_SANITIZER, PATH, $CUDA_HOME/bin, "
              "/usr/local/cuda/bin): the driver runs alone, without the sanitizer", flush=True)
        rc = subprocess.run(this).returncode
        return 2 if rc == 0 else 1
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    tools = [t for t in args.tools.split(",") if t]
    deadline = time.time() + args.budget
    rows, bad = [], False
    for i, tool in enumerate(tools):
        # in order of worth: a tool may take what is left but 20 s for each one after it
        limit = deadline - time.time() - 20 * (len(tools) - i - 1)
        if limit < 10:
            rows.append((tool, "skipped", f"{limit:.0f} s left"))
            continue
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", "3", "--print-limit", "20", *this]
        start = time.time()
        print(f"== {tool}: {' '.join(cmd)}", flush=True)
        output, rc = run_tool(cmd, limit, env)
        print(output[-6000:], flush=True)
        mismatches = re.search(r"driver: (\d+) mismatch", output)
        verdict = ("clean" if rc == 0 else "sanitizer errors" if rc == 3 else
                   "value mismatches" if rc == 1 and mismatches else f"rc {rc}")
        bad |= rc != 0
        rows.append((tool, verdict, f"{time.time() - start:.0f} s; {_summary(output)}"))
    print("\ntool       result            details")
    for tool, verdict, details in rows:
        print(f"{tool:<10} {verdict:<17} {details}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
