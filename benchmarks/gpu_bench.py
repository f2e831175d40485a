"""Times both ops and the PTL/LTL layers on every available backend; writes one JSON file.

Forward and forward+backward, median over timed repetitions after warm-up (CUDA events on a GPU,
``perf_counter`` on CPU), and the peak extra memory of each call
(``torch.cuda.max_memory_allocated`` minus what was allocated before it; GPU only).

Settings (paper §4 / issue 4): PTL B=4, C=64, 128², patch 16, stride 4, foreground 20 %;
LTL B=4, C=64 at 128² and at 32²; ``masked_attention`` L=16384, N=841, D=64, E=128, 20 % active
queries in bf16, also against ``F.scaled_dot_product_attention`` on all queries with the same
bias (a dense masked attention).

    python benchmarks/gpu_bench.py                   # GPU, writes $OUT/gpu_bench.json
    python benchmarks/gpu_bench.py --out DIR
    python benchmarks/gpu_bench.py --device cpu --quick   # smoke test: tiny shapes

Results are written after every measurement, so a crash keeps what was measured; errors are
recorded per entry. A copy goes to benchmarks/results/ unless ``--no-copy``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import regharm_ext  # noqa: E402
from regharm_ext import LTL, PTL  # noqa: E402
from regharm_ext.backends import unavailable_reason  # noqa: E402
from regharm_ext.ops import masked_attention, patch_stats  # noqa: E402

BACKENDS = ("reference", "torch", "triton", "native")


# ------------------------------------------------------------------------------------ inputs


def blob_mask(B, H, W, fraction, device, seed=0):
    """(B, 1, H, W) soft masks: an ellipse of ``fraction`` of the area at a random place per
    image, edges soft as after area resizing (drawn at 4x, then average-pooled)."""
    g = torch.Generator().manual_seed(seed)
    hs, ws = 4 * H, 4 * W
    yy, xx = torch.meshgrid(torch.arange(hs) + 0.5, torch.arange(ws) + 0.5, indexing="ij")
    masks = []
    for _ in range(B):
        aspect = 0.6 + 0.8 * float(torch.rand(1, generator=g))
        ry = math.sqrt(fraction * hs * ws / math.pi * aspect)
        rx = fraction * hs * ws / (math.pi * ry)
        cy = ry + float(torch.rand(1, generator=g)) * max(hs - 2 * ry, 0)
        cx = rx + float(torch.rand(1, generator=g)) * max(ws - 2 * rx, 0)
        masks.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).float())
    m = torch.stack(masks)[:, None]
    return F.avg_pool2d(m, 4).to(device)


# ----------------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, device, quick):
        self.cuda = device.type == "cuda"
        self.warmup = 1 if quick else 3
        self.max_reps = 3 if quick else 20
        self.budget_s = 0.2 if quick else 1.0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def measure(self, fn):
        """Median ms over repetitions, and peak extra MB of one call (None on CPU)."""
        for _ in range(self.warmup):
            fn()
        self._sync()
        peak = None
        if self.cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        times, spent = [], 0.0
        while len(times) < self.max_reps and (spent < self.budget_s * 1e3 or len(times) < 3):
            t = self.once(fn)
            times.append(t)
            spent += t
        return statistics.median(times), peak, len(times)


# ------------------------------------------------------------------------------- benchmarks


def _fwd_bwd(make_inputs, run):
    """(forward-only fn, forward+backward fn) over freshly made leaf inputs."""
    inputs = make_inputs()

    def fwd():
        with torch.no_grad():
            run(*inputs)

    def fwd_bwd():
        outs = run(*inputs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        loss = sum(o.float().sum() for o in outs if o.requires_grad)
        loss.backward()
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.grad is not None:
                t.grad = None

    return fwd, fwd_bwd


def patch_case(s, device, dtype):
    B, C, H, ph, st = s["B"], s["C"], s["H"], s["patch"], s["stride"]

    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, C, H, H, generator=g).to(device, dtype).requires_grad_()
        bg = (1 - blob_mask(B, H, H, s["fg"], device)).to(dtype)
        w = (torch.randn(ph * ph, generator=g) / ph).to(device, dtype).requires_grad_()
        b = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        return x, bg, w, b

    def run_with(backend):
        return lambda x, bg, w, b: patch_stats(x, bg, w, b, ph, st, backend=backend)[:3]

    return make, run_with


def attention_case(s, device, dtype):
    B, L, N, D, E = s["B"], s["L"], s["N"], s["D"], s["E"]

    def make():
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, L, D, generator=g).to(device, dtype).requires_grad_()
        k = torch.randn(B, N, D, generator=g).to(device, dtype).requires_grad_()
        v = torch.randn(B, N, E, generator=g).to(device, dtype).requires_grad_()
        side = int(round(math.sqrt(L)))
        qm = blob_mask(B, side, L // side, s["fg"], device).flatten(1) > 0
        kb = torch.zeros(B, N, device=device)
        kb[torch.rand(B, N, generator=g).to(device) < 0.1] = float("-inf")  # invalid patches
        return q, k, v, kb, qm

    def run_with(backend):
        if backend == "sdpa":  # dense masked attention: every query, bias as an additive mask
            def sdpa(q, k, v, kb, qm):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=kb.to(q.dtype)[:, None, :])
                return out * qm[..., None]
            return sdpa
        return lambda q, k, v, kb, qm: masked_attention(q, k, v, kb, qm, backend=backend)

    return make, run_with


def layer_case(s, device, dtype):
    B, C, H = s["B"], s["C"], s["H"]

    def make():
        torch.manual_seed(0)
        x = torch.randn(B, C, H, H, device=device, dtype=dtype, requires_grad=True)
        return x, blob_mask(B, H, H, s["fg"], device).to(dtype)

    modules = {}

    def run_with(backend):
        if s["layer"] == "ptl":
            mod = PTL(C, patch=s["patch"], stride=s["stride"], backend=backend)
        else:
            mod = LTL(C, backend=backend)
        mod = mod.to(device, dtype)
        modules[backend] = mod
        return lambda x, m: mod(x, m)

    return make, run_with


def settings(quick: bool, device):
    """name -> (case builder, its sizes, dtype)."""
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quick:
        return {
            "patch_stats": (patch_case, dict(B=1, C=8, H=32, patch=4, stride=2, fg=0.2), torch.float32),
            "masked_attention": (attention_case, dict(B=1, L=256, N=49, D=16, E=32, fg=0.2), torch.float32),
            "ptl": (layer_case, dict(layer="ptl", B=1, C=8, H=32, patch=4, stride=2, fg=0.2), torch.float32),
            "ltl": (layer_case, dict(layer="ltl", B=1, C=8, H=16, fg=0.2), torch.float32),
        }
    return {
        "patch_stats": (patch_case, dict(B=4, C=64, H=128, patch=16, stride=4, fg=0.2), torch.float32),
        "masked_attention": (attention_case, dict(B=4, L=16384, N=841, D=64, E=128, fg=0.2), bf16),
        "ptl": (layer_case, dict(layer="ptl", B=4, C=64, H=128, patch=16, stride=4, fg=0.2), torch.float32),
        "ptl_bf16": (layer_case, dict(layer="ptl", B=4, C=64, H=128, patch=16, stride=4, fg=0.2), bf16),
        "ltl128": (layer_case, dict(layer="ltl", B=4, C=64, H=128, fg=0.2), torch.float32),
        "ltl32": (layer_case, dict(layer="ltl", B=4, C=64, H=32, fg=0.2), torch.float32),
        "ltl32_c256": (layer_case, dict(layer="ltl", B=4, C=256, H=32, fg=0.2), torch.float32),
    }


# ----------------------------------------------------------------------------------- report


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def environment(device):
    env = dict(device=str(device), torch=torch.__version__, python=platform.python_version(),
               git_commit=_git_commit(), date=datetime.datetime.now().isoformat(timespec="seconds"),
               backends=regharm_ext.backends(device.type))
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def acceptance(results):
    """The issue's two numeric criteria, from the entries measured (None when missing)."""
    def get(name, backend, key):
        for r in results:
            if r["bench"] == name and r["backend"] == backend and r.get(key) is not None:
                return r[key]
        return None

    out = {}
    t_torch, t_triton = get("ptl", "torch", "fwd_bwd_ms"), get("ptl", "triton", "fwd_bwd_ms")
    if t_torch and t_triton:
        out["ptl_fwd_bwd_speedup_triton_vs_torch"] = t_torch / t_triton
        out["ptl_speedup_ok (>= 2)"] = t_torch / t_triton >= 2
    m_ref, m_tri = get("ltl128", "reference", "fwd_bwd_peak_mb"), get("ltl128", "triton", "fwd_bwd_peak_mb")
    if m_ref and m_tri:
        out["ltl128_peak_ratio_triton_vs_reference"] = m_tri / m_ref
        out["ltl128_memory_ok (<= 0.1)"] = m_tri / m_ref <= 0.1
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"),
                    help="folder for gpu_bench.json (default $OUT, else benchmarks/results)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--no-copy", action="store_true", help="do not copy into benchmarks/results/")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    timer = Timer(device, args.quick)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_bench.json")
    report = dict(environment=environment(device), settings={}, results=[], skipped=[])
    wanted = [b for b in args.backends.split(",") if b]

    def save():
        report["acceptance"] = acceptance(report["results"])
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(tmp, path)

    save()
    only = {n for n in args.only.split(",") if n}
    for name, (builder, sizes, dtype) in settings(args.quick, device).items():
        if only and name not in only:
            continue
        report["settings"][name] = dict(sizes, dtype=str(dtype))
        make, run_with = builder(sizes, device, dtype)
        candidates = list(wanted) + (["sdpa"] if name == "masked_attention" else [])
        for backend in candidates:
            if backend != "sdpa":
                reason = unavailable_reason(backend, device)
                if device.type == "cpu" and backend == "triton":
                    reason = reason or "the interpreter is far too slow to time"
                if reason:
                    report["skipped"].append(dict(bench=name, backend=backend, reason=reason))
                    continue
            entry = dict(bench=name, backend=backend, dtype=str(dtype))
            try:
                fwd, fwd_bwd = _fwd_bwd(make, run_with(backend))
                entry["fwd_ms"], entry["fwd_peak_mb"], entry["fwd_reps"] = timer.measure(fwd)
                entry["fwd_bwd_ms"], entry["fwd_bwd_peak_mb"], entry["fwd_bwd_reps"] = timer.measure(fwd_bwd)
            except Exception as exc:  # keep going: one backend failing must not lose the rest
                entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                entry["traceback"] = traceback.format_exc()[-4000:]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report["results"].append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "traceback"}), flush=True)
            save()
    print(json.dumps(report["acceptance"]), flush=True)
    if not args.no_copy:
        dest = os.path.join(ROOT, "benchmarks", "results")
        os.makedirs(dest, exist_ok=True)
        tag = "cpu-quick" if args.quick else report["environment"]["device_name"].replace(" ", "_")
        copy = os.path.join(dest, f"gpu_bench_{tag}.json")
        if os.path.abspath(copy) != os.path.abspath(path):
            shutil.copyfile(path, copy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
