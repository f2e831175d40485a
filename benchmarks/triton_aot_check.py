"""Compiles every Triton kernel launch of the `triton` backend for a GPU target without a GPU.

The ops are called on CPU tensors with the launches intercepted; each launch (its argument types,
constexprs, num_warps, num_stages) is compiled ahead of time with ``triton.compile`` for
``--arch`` (default sm_90, the H100/H200) and ``cuobjdump`` reports registers, local (spill)
memory and shared memory. A kernel that cannot be lowered for the GPU (a construct the
interpreter accepts but the compiler does not, too much shared memory) fails here, on a CPU-only
machine.

    python benchmarks/triton_aot_check.py            # triton's bundled ptxas/cuobjdump, no GPU
    python benchmarks/triton_aot_check.py --json out.json
    python benchmarks/triton_aot_check.py --float fp64   # Python floats typed as torch.compile types them
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from regharm_ext.ops import triton_attention as ta
from regharm_ext.ops import triton_masked_norm as tn
from regharm_ext.ops import triton_patch_stats as tp

_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
          torch.float64: "*fp64", torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class _Capture:
    """Stands in for ``launcher(kernel)[grid](...)``: records the launch in ``log`` instead of
    running it (``log=None``: drops it)."""

    def __init__(self, log):
        self.log = log

    def __call__(self, kernel):
        def grid_fn(grid):
            def launch(*args, **kwargs):
                if self.log is not None:
                    self.log.append((kernel, grid, args, kwargs))
            return launch
        return _Indexable(grid_fn)


class _Indexable:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn(grid)


def _signature(kernel, args, kwargs, float_type="fp32"):
    names = kernel.arg_names
    sig, constexprs = {}, {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = _TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = float_type
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} of type {type(value)}")
    options = {}
    for name, value in kwargs.items():
        if name in LAUNCH_OPTIONS:
            options[name] = value
        else:
            sig[name] = "constexpr"
            constexprs[name] = value
    return sig, constexprs, options


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local (spill) bytes per thread from ``cuobjdump`` on the cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    stats = {}
    for key, pat in (("registers", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"),
                     ("local", r"LOCAL:(\d+)")):
        m = re.search(pat, res.stdout)
        stats[key] = int(m.group(1)) if m else None
    return stats


def capture_launches():
    """Every launch of the ops' forwards and backwards at the shapes that matter."""
    log = []
    cap = _Capture(log)
    ta.launcher = tp.launcher = tn.launcher = cap
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = torch.zeros(4, 64, 128, 128, dtype=dtype) if dtype != torch.float64 else \
            torch.zeros(1, 3, 20, 20, dtype=dtype)
        bg = torch.ones_like(x[:, :1])
        p = 16 if dtype != torch.float64 else 4
        w, b = torch.zeros(p * p, dtype=dtype), torch.zeros(1, dtype=dtype)
        mu, sigma, content, mass = tp.patch_stats_fwd(x, bg, w, b, p, p, 4, 4, 1e-5, 0.5)
        tp.patch_stats_bwd(mu, sigma, content, x, bg, w, mu, sigma, mass, p, p, 4, 4, 0.5)
        # (512, 512): LTL at width 2, where float32's dK/dV kernel needs its one-stage pipeline
        sizes = [(64, 128), (64, 64), (128, 256), (256, 256), (256, 512), (512, 512), (3, 6)]
        if dtype == torch.float64:
            sizes = [(3, 2), (8, 6)]
        for D, E in sizes:
            for masked in (True, False):
                q = torch.zeros(2, 300, D, dtype=dtype)
                k = torch.zeros(2, 200, D, dtype=dtype)
                v = torch.zeros(2, 200, E, dtype=dtype)
                kb = torch.zeros(2, 200)
                qm = torch.ones(2, 300, dtype=torch.bool) if masked else None
                out, lse, idx, cnt = ta.masked_attention_fwd(q, k, v, kb, qm, 0.125)
                ta.masked_attention_bwd(out, q, k, v, kb, qm, out, lse, idx, cnt, 0.125)
        xn = torch.zeros(4, 64, 128, 128, dtype=dtype) if dtype != torch.float64 else \
            torch.zeros(2, 3, 9, 7, dtype=dtype)
        wn = torch.ones(xn.shape[0], 1, *xn.shape[2:], dtype=dtype)
        y, mu_n, rstd_n = tn.masked_norm_fwd(xn, wn, 1e-5)
        tn.masked_norm_bwd(y, xn, wn, mu_n, rstd_n)
    # float32 with TF32 allowed (PyTorch's flag) takes the tensor-core path
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        q, k, v = torch.zeros(2, 300, 64), torch.zeros(2, 200, 64), torch.zeros(2, 200, 128)
        kb, qm = torch.zeros(2, 200), torch.ones(2, 300, dtype=torch.bool)
        out, lse, idx, cnt = ta.masked_attention_fwd(q, k, v, kb, qm, 0.125)
        ta.masked_attention_bwd(out, q, k, v, kb, qm, out, lse, idx, cnt, 0.125)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return log


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90", help="sm_XX target (90 = H100/H200)")
    ap.add_argument("--json", help="write the per-launch report here")
    ap.add_argument("--kernels", default="", help="only kernels whose name contains this")
    ap.add_argument("--float", default="fp32", choices=("fp32", "fp64"),
                    help="type of Python float arguments: fp32 as a direct launch passes them, "
                         "fp64 as torch.compile's inductor does")
    ap.add_argument("--one-per-kernel", action="store_true",
                    help="only the first matching launch of each kernel (a quick check)")
    ap.add_argument("--dtypes", default="", help="only launches with these pointer types, e.g. fp16,bf16")
    args = ap.parse_args(argv)
    cc = int(args.arch.split("_")[1].rstrip("a"))
    target = GPUTarget("cuda", cc, 32)
    seen, report, failures = set(), [], 0
    for kernel, grid, a, kw in capture_launches():
        if args.kernels and args.kernels not in kernel.__name__:
            continue
        sig, constexprs, options = _signature(kernel, a, kw, args.float)
        if args.dtypes and not any(f"*{t}" in sig.values() for t in args.dtypes.split(",")):
            continue
        key = (kernel.__name__,) if args.one_per_kernel else \
            (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())),
             tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        entry = dict(kernel=kernel.__name__, constexprs=constexprs, options=options,
                     types=sorted({t for t in sig.values() if t[:2] in ("*f", "*b")}))
        try:
            compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=target,
                                      options=options)
            entry["shared_bytes"] = compiled.metadata.shared
            entry.update(_resource_usage(compiled.asm["cubin"]))
            entry["ok"] = entry["shared_bytes"] <= 227 * 1024
        except Exception as exc:  # report every failure, not just the first
            entry["ok"], entry["error"] = False, f"{type(exc).__name__}: {str(exc)[:400]}"
        failures += not entry["ok"]
        report.append(entry)
        print(json.dumps(entry), flush=True)
    print(f"{len(report)} kernel variants compiled for {args.arch}, {failures} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, triton=triton.__version__, launches=report), f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
