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

After timing, every entry but ``reference``'s is checked (``benchmarks/bench_check.py``): its
outputs and input gradients at the timed sizes against the float64 reference; a criterion holds
only where that check passed.

With ``--pairs N`` (``gpu_check.sh`` passes 5), each time criterion is then timed again in one
process as N alternating ours/baseline pairs, and its ratio becomes their median (the range and
the separate runs' ratio are kept): the host-bound timings drifted by ~30 % between processes on
the H100, enough to move a line across its bound. Under ``--isolate`` the pairs run right after
the backends the criteria name, before the variant rows, so a deadline takes variants first.

Results are written after every measurement, so a crash keeps what was measured; errors are
recorded per entry. ``python benchmarks/collect_gpu.py OUT`` files the JSON of a GPU run under
benchmarks/results/ and regenerates the README's tables.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import regharm_ext  # noqa: E402
from regharm_ext import LTL, PTL  # noqa: E402
from regharm_ext.backends import unavailable_reason  # noqa: E402
from regharm_ext.ops import masked_attention, patch_stats  # noqa: E402
from benchlib import git_commit  # noqa: E402
import bench_check  # noqa: E402

BACKENDS = ("reference", "torch", "sdpa", "triton", "native", "native_tf32x3", "native_tiles",
            "native_norm_composite", "triton_norm_composite", "native_dq_kernel",
            "native_dq_atomic", "native_unfused", "triton_unfused", "native_mma_lanes",
            "native_fwd_whole", "native_pynode", "native_aten_glue", "native_pixel_gather",
            "native_key_raster", "triton_key_raster", "native_one_stage")
# sdpa: masked_attention's baseline. Variants: a backend run under environment settings, timed
# where the setting changes something: native_tf32x3 (float32 attention products on tensor
# cores, 3xTF32) on float32 benchmarks, native_tiles (attention on the shared-memory tile
# kernels instead of the register kernels: run 1's kernels, the comparison for both),
# *_norm_composite (PTL's masked norm as torch ops instead of the op's kernels: before/after of
# PERF_NOTES item 9, on the PTL benchmarks only), native_dq_kernel / native_dq_atomic (dQ by its
# own kernel, or added up with atomics by the dK/dV kernel: the path the default does not take
# for the dtype; PERF_NOTES item 11), *_unfused (PTL's ops as four autograd nodes instead of one:
# before/after of PERF_NOTES item 15, on the PTL benchmarks only), native_mma_lanes (float32's
# CUDA-core kernels with mma.sync's lane order instead of PairedLanes: before/after of PERF_NOTES
# item 16), native_fwd_whole (float32's forward with one block per query tile instead of two key
# halves: before/after of PERF_NOTES item 17), native_pynode (PTL's node run from Python, step
# by step, instead of its two C++ ops: before/after of PERF_NOTES item 18), native_aten_glue (PTL's
# blend as torch ops in that node instead of its CUDA kernels: before/after of item 19),
# native_pixel_gather (patch_stats' backward gathers each pixel's gradient from its covering
# patches one by one instead of by cells: before/after of item 21), native_key_raster (the
# attention's register kernels over the keys in raster order instead of the kept keys first:
# before/after of item 26), triton_key_raster (the same for the Triton kernels: item 27),
# native_one_stage (the 16-bit attention kernels' streamed tiles through one stage of shared
# memory instead of two: before/after of item 29).
_COMPOSITE_NORM = {"REGHARM_MASKED_NORM": "composite"}
_UNFUSED = {"REGHARM_PTL_NODE": "0"}
VARIANTS = {"native_tf32x3": ("native", {"REGHARM_CUDA_FP32_MATH": "tf32x3"}),
            "native_tiles": ("native", {"REGHARM_CUDA_ATTENTION": "tiles"}),
            "native_norm_composite": ("native", _COMPOSITE_NORM),
            "triton_norm_composite": ("triton", _COMPOSITE_NORM),
            "native_dq_kernel": ("native", {"REGHARM_CUDA_DQ": "kernel"}),
            "native_dq_atomic": ("native", {"REGHARM_CUDA_DQ": "atomic"}),
            "native_unfused": ("native", _UNFUSED),
            "triton_unfused": ("triton", _UNFUSED),
            "native_mma_lanes": ("native", {"REGHARM_CUDA_SIMT_LANES": "mma"}),
            "native_fwd_whole": ("native", {"REGHARM_CUDA_FWD_SPLIT": "off"}),
            "native_pynode": ("native", {"REGHARM_PTL_NODE": "python"}),
            "native_aten_glue": ("native", {"REGHARM_CUDA_PTL_GLUE": "aten"}),
            "native_pixel_gather": ("native", {"REGHARM_CUDA_PS_GATHER": "pixels"}),
            "native_key_raster": ("native", {"REGHARM_CUDA_KEY_ORDER": "raster"}),
            "triton_key_raster": ("triton", {"REGHARM_TRITON_KEY_ORDER": "raster"}),
            "native_one_stage": ("native", {"REGHARM_CUDA_PIPELINE": "off"})}
# The order the variants step times them in, the newest PERF_NOTES items first (no GPU has run
# them): a step limit that cuts the variants short leaves out rows an earlier run measured.
# Variants not named here follow in BACKENDS order.
VARIANTS_FIRST = ("native_one_stage", "native_key_raster", "triton_key_raster", "native_pixel_gather",
                  "native_aten_glue", "native_pynode", "native_fwd_whole", "native_mma_lanes",
                  "native_unfused", "native_dq_kernel", "triton_unfused")
VARIANT_DTYPES = {"native_tf32x3": (torch.float32,),
                  "native_tiles": (torch.float32, torch.float16, torch.bfloat16),
                  "native_norm_composite": (torch.float32, torch.bfloat16),
                  "triton_norm_composite": (torch.float32, torch.bfloat16),
                  "native_dq_kernel": (torch.float32,),
                  "native_dq_atomic": (torch.float16, torch.bfloat16),
                  "native_unfused": (torch.float32, torch.bfloat16),
                  "triton_unfused": (torch.float32, torch.bfloat16),
                  "native_mma_lanes": (torch.float32,),
                  "native_fwd_whole": (torch.float32,),
                  "native_pynode": (torch.float32, torch.bfloat16),
                  "native_aten_glue": (torch.float32, torch.bfloat16),
                  "native_pixel_gather": (torch.float32,),
                  "native_key_raster": (torch.float32, torch.bfloat16),
                  "triton_key_raster": (torch.float32, torch.bfloat16),
                  "native_one_stage": (torch.float16, torch.bfloat16)}
VARIANT_BENCHES = {"native_norm_composite": ("ptl", "ptl_bf16"),
                   "triton_norm_composite": ("ptl", "ptl_bf16"),
                   "native_dq_kernel": ("ptl",),
                   "native_dq_atomic": ("masked_attention", "ptl_bf16"),
                   "native_unfused": ("ptl", "ptl_bf16"),
                   "triton_unfused": ("ptl", "ptl_bf16"),
                   "native_mma_lanes": ("masked_attention", "ptl"),
                   "native_fwd_whole": ("masked_attention", "ptl"),
                   "native_pynode": ("ptl", "ptl_bf16"),
                   "native_aten_glue": ("ptl", "ptl_bf16"),
                   "native_pixel_gather": ("patch_stats", "ptl"),
                   "native_key_raster": ("masked_attention", "ptl"),
                   "triton_key_raster": ("masked_attention", "ptl"),
                   "native_one_stage": ("masked_attention", "ptl_bf16")}


@contextlib.contextmanager
def environ(settings):
    """os.environ with ``settings`` for the duration, restored afterwards."""
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# "<backend>+compile": the layer benchmarks under torch.compile (opt-in, not in BACKENDS: each
# takes a compile per benchmark). The PTL calls were host-bound on the H100 (PERF_NOTES.md),
# and compiling fuses the layer's own ops: this measures how much that buys per backend.
COMPILED = "+compile"


def split_backend(backend):
    """(variant name without the compile suffix, implementation, environment settings,
    compiled) of a benchmarked backend name."""
    compiled = backend.endswith(COMPILED)
    base = backend[:-len(COMPILED)] if compiled else backend
    impl, env = VARIANTS.get(base, (base, {}))
    return base, impl, env, compiled


def variant_skip_reason(backend, device, dtype, bench=None):
    """Why a variant is not timed here (None: it is)."""
    if backend not in VARIANTS:
        return None
    if device.type != "cuda":
        return "a CUDA-only setting"
    if dtype not in VARIANT_DTYPES[backend]:
        return f"a setting for {', '.join(str(d) for d in VARIANT_DTYPES[backend])} only"
    if bench is not None and bench not in VARIANT_BENCHES.get(backend, (bench,)):
        return f"a setting of the {', '.join(VARIANT_BENCHES[backend])} benchmarks only"
    return None


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


def _fwd_bwd(inputs, run):
    """(forward-only fn, forward+backward fn) over the leaf ``inputs``."""

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
        run = lambda x, bg, w, b: patch_stats(x, bg, w, b, ph, st, backend=backend)[:3]  # noqa: E731
        run.reference64 = lambda x, bg, w, b: patch_stats(x, bg, w, b, ph, st, backend="reference")[:3]
        return run

    return make, run_with


def kernel_profile(fn, device, top=8):
    """Where one call's time goes: on a GPU the CUDA kernels (torch.profiler), on CPU the ops'
    self time; ([(name, calls, total µs)] largest first, the sum over all of them in µs). On a
    GPU, that sum well under the measured time means the host (launches, Python) sets the pace.
    For the next optimisation step, read from the JSON."""
    from torch.profiler import ProfilerActivity
    from torch.autograd import DeviceType
    cuda = device.type == "cuda"
    prof = _profile_one(fn, [ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU], cuda)
    if not cuda:
        rows = _self_cpu_rows(prof)
        return rows[:top], round(sum(us for _, _, us in rows), 1)
    totals = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            calls, us = totals.get(e.name, (0, 0.0))
            totals[e.name] = (calls + 1, us + e.time_range.elapsed_us())
    rows = sorted(((n[:100], c, round(us, 1)) for n, (c, us) in totals.items()), key=lambda r: -r[2])
    return rows[:top], round(sum(us for _, us in totals.values()), 1)


def _profile_one(fn, activities, cuda: bool):
    """torch.profiler over one call of ``fn``, after a call the same session runs unrecorded: run
    2's host profile charged a single ``aten::sub``, the first op of PTL's forward, with 0.6 ms
    of self time in both dtypes, what a session's start-up looks like, not the op (the
    ``ProfilerStep*`` row holds the Python between the recorded ops)."""
    from torch.profiler import profile, schedule
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=1),
                 acc_events=True) as prof:
        for _ in range(2):
            fn()
            if cuda:
                torch.cuda.synchronize()
            prof.step()
    return prof


def _self_cpu_rows(prof):
    """[(op, calls, self CPU µs)] of a finished torch.profiler run, largest first."""
    rows = [(e.key[:100], e.count, round(e.self_cpu_time_total, 1)) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[2])


def host_profile(fn, top=10):
    """What the host does during one call on a GPU: the ops' self CPU time (torch.profiler, CPU
    activity only) [(name, calls, µs)] largest first. A custom op's self time holds its Python
    wrapper and its kernel launches; where the kernels take a small share of the measured time
    (see kernel_profile) this says which of them to cut. (On CPU, kernel_profile is this.)"""
    from torch.profiler import ProfilerActivity
    return _self_cpu_rows(_profile_one(fn, [ProfilerActivity.CPU], False))[:top]


def enqueue_ms(fn, reps=5):
    """Host time to issue one call on a GPU without waiting for it (best of ``reps``, each
    started on an idle GPU). Close to the measured time: the host sets the pace, and only fewer
    or cheaper host steps (not faster kernels) make the call faster."""
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    torch.cuda.synchronize()
    return best * 1e3


PROFILED = {"patch_stats", "masked_attention", "ptl", "ptl_bf16", "ltl128"}


def _sdpa_args(q, k, v, kb):
    """q, k, v and the additive mask in 4-d (B, 1, L, D): the layout SDPA's fused
    memory-efficient kernel takes with a bias (3-d inputs fall back to the slower math path)."""
    return q[:, None], k[:, None], v[:, None], kb.to(q.dtype)[:, None, None, :]


def sdpa_baseline(q, k, v, kb, qm):
    """Dense masked attention with F.scaled_dot_product_attention: every query, the bias as an
    additive mask (see :func:`sdpa_kernel_used` for the kernel it gets)."""
    q4, k4, v4, mask = _sdpa_args(q, k, v, kb)
    return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)[:, 0] * qm[..., None]


def sdpa_kernel_used(inputs) -> str:
    """The SDPA kernel torch's dispatcher picks for the baseline's inputs (FLASH_ATTENTION,
    EFFICIENT_ATTENTION, CUDNN_ATTENTION or MATH), so the comparison says what it beat."""
    try:
        from torch.nn.attention import SDPBackend
        return SDPBackend(torch._fused_sdp_choice(*_sdpa_args(*inputs[:4]), 0.0, False)).name
    except Exception as exc:  # noqa: BLE001 - a private API: report, do not fail the benchmark
        return f"unknown ({type(exc).__name__})"


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
        if backend == "sdpa":
            run = lambda *inputs: sdpa_baseline(*inputs)  # noqa: E731
        else:
            run = lambda q, k, v, kb, qm: masked_attention(q, k, v, kb, qm, backend=backend)  # noqa: E731
        run.reference64 = lambda q, k, v, kb, qm: masked_attention(q, k, v, kb, qm, backend="reference")
        return run

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
        run = lambda x, m: mod(x, m)  # noqa: E731

        def reference64(x, m):  # the timed module's weights, in float64 on the reference backend
            ref = copy.deepcopy(mod).double()
            for layer in ref.modules():
                if hasattr(layer, "backend"):
                    layer.backend = "reference"
            return ref(x, m)
        run.reference64 = reference64
        return run

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


def environment(device):
    commit, dirty = git_commit()
    env = dict(device=str(device), torch=torch.__version__, python=platform.python_version(),
               git_commit=commit, git_dirty=dirty, date=datetime.datetime.now().isoformat(timespec="seconds"),
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


def _native_ptl(backend, bench, dtype, with_peak=True):
    """Issue 5's PTL criteria for one native setting: >= 3x torch, >= 10x reference, peak <= 1/10."""
    rows = [(f"{backend} PTL fwd+bwd >= 3x faster than torch ({dtype})", bench, backend, "torch",
             "fwd_bwd_ms", 1 / 3),
            (f"{backend} PTL fwd+bwd >= 10x faster than reference ({dtype})", bench, backend,
             "reference", "fwd_bwd_ms", 1 / 10)]
    if with_peak:
        rows.append((f"{backend} PTL fwd+bwd peak <= 1/10 of reference ({dtype})", bench, backend,
                     "reference", "fwd_bwd_peak_mb", 1 / 10))
    return tuple(rows)


# (label, bench, backend, baseline backend, key, bound): measured/baseline must be <= bound
# (a speed-up of n is a time ratio of 1/n); issues 4 and 5 of the tracker
CRITERIA = (
    ("triton PTL fwd+bwd >= 2x faster than torch (fp32)", "ptl", "triton", "torch", "fwd_bwd_ms", 1 / 2),
    ("triton LTL 128^2 fwd+bwd peak <= 1/10 of reference", "ltl128", "triton", "reference",
     "fwd_bwd_peak_mb", 1 / 10),
    *_native_ptl("native", "ptl", "fp32"),
    ("native masked_attention fwd+bwd >= 2x faster than SDPA (bf16 on GPU)", "masked_attention", "native",
     "sdpa", "fwd_bwd_ms", 1 / 2),
    # the issues name no dtype for PTL: bf16 too, where fp32 attention runs on CUDA cores (native)
    ("triton PTL fwd+bwd >= 2x faster than torch (bf16)", "ptl_bf16", "triton", "torch", "fwd_bwd_ms", 1 / 2),
    *_native_ptl("native", "ptl_bf16", "bf16", with_peak=False),
    # fp32 with attention products on tensor cores (3xTF32), the setting a GPU run decides on:
    # issue 5 asks for CUDA cores, its speed bound may need these
    *_native_ptl("native_tf32x3", "ptl", "fp32"),
)


def check_summary(entry) -> str:
    """"ok", "fails (...)" or "not run" for an entry's bench_check result."""
    c = entry.get("check") if entry else None
    if not c:
        return "not run"
    if c.get("ok"):
        return "ok"
    return "fails (" + (c.get("error") or f"{c.get('worst')}: {c.get('excess')}x the tolerance") + ")"


def acceptance(results, paired=None):
    """Each criterion the entries measured: the ratio measured/baseline and whether it holds (the
    ratio within the bound, and the measured backend's results checked correct at that setting).
    Where ``paired`` has the criterion (:func:`paired_ratios`), the ratio is the median of its
    alternating pairs and the one of the separate runs is kept as ``ratio_separate``."""
    def find(name, backend, key):
        for r in results:
            if r["bench"] == name and r["backend"] == backend and r.get(key) is not None:
                return r
        return None

    out = {}
    for label, bench, backend, base, key, bound in CRITERIA:
        entry, ref = find(bench, backend, key), find(bench, base, key)
        if entry is not None and ref is not None and ref[key]:
            ratio, checked = entry[key] / ref[key], check_summary(entry)
            extra = {}
            pair = (paired or {}).get(label)
            if pair and pair.get("ratios"):
                extra = dict(ratio_separate=round(ratio, 4), pairs=len(pair["ratios"]),
                             ratio_range=[round(min(pair["ratios"]), 4), round(max(pair["ratios"]), 4)])
                ratio = statistics.median(pair["ratios"])
            out[label] = dict(ratio=round(ratio, 4), bound=round(bound, 4), checked=checked,
                              holds=ratio <= bound and checked == "ok", **extra)
    return out


def write_report(report, path) -> None:
    """``report`` with its acceptance block, to ``path`` atomically (a crash keeps the last one)."""
    report["acceptance"] = acceptance(report["results"], report.get("paired"))
    with open(path + ".tmp", "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    os.replace(path + ".tmp", path)


def paired_ratios(index: int, device, quick: bool, pairs: int) -> dict:
    """Criterion ``CRITERIA[index]``, timed as ours/baseline in one process, alternately (which
    goes first alternates too), ``pairs`` times: {"label", "ratios", "ms": {backend: [...]}}.
    Host-bound calls on a GPU drift between processes: run 2 on the H100 timed PTL on `torch` at
    7.55 ms in one call and 5.65 ms in the next, so a ratio of two separate runs can move a line
    across its bound; pairs put both sides under the same conditions and show the spread."""
    label, bench, ours, base, _key, _bound = CRITERIA[index]
    builder, sizes, dtype = settings(quick, device)[bench]
    make, run_with = builder(sizes, device, dtype)
    timer = Timer(device, quick)
    calls = {}
    for backend in (ours, base):
        _, impl, env, compiled = split_backend(backend)
        with environ(env):
            run = run_with(impl)
            calls[backend] = (env, _fwd_bwd(make(), torch.compile(run) if compiled else run)[1])
    for env, fwd_bwd in calls.values():  # a discarded round: first calls pay one-off costs
        with environ(env):
            timer.measure(fwd_bwd)
    ms = {ours: [], base: []}
    for i in range(pairs):
        for backend in ((ours, base) if i % 2 == 0 else (base, ours)):
            env, fwd_bwd = calls[backend]
            with environ(env):
                ms[backend].append(timer.measure(fwd_bwd)[0])
    ratios = [a / b for a, b in zip(ms[ours], ms[base])]
    return dict(label=label, ratios=[round(r, 4) for r in ratios],
                ms={b: [round(t, 4) for t in v] for b, v in ms.items()})


def _pairable(report, index: int) -> bool:
    """A time criterion whose two backends both timed their benchmark without an error."""
    _, bench, ours, base, key, _ = CRITERIA[index]
    done = {r["backend"] for r in report["results"] if r["bench"] == bench and "error" not in r}
    return key == "fwd_bwd_ms" and ours in done and base in done


def isolated(args) -> int:
    """``main`` once per backend in a child process; their JSON merged into ``args.out``.
    ``args.rows``: "all", "lines" (the criteria's backends and their pairs) or "variants" (the
    other backends, added to the report a "lines" run left in ``args.out``)."""
    import tempfile
    device = torch.device(args.device)
    report = dict(environment=environment(device), settings={}, results=[], skipped=[])
    path = os.path.join(args.out, "gpu_bench.json")
    os.makedirs(args.out, exist_ok=True)
    if args.rows == "variants" and os.path.exists(path):
        with open(path) as fh:
            report = json.load(fh)
    interrupted = False
    asked = [b for b in args.backends.split(",") if b]
    # the acceptance lines' backends, then their pairs, then the variants: a deadline that
    # cuts the run short (gpu_check.sh's bench step) takes variants, not the lines' pairs
    needed = {c[2] for c in CRITERIA} | {c[3] for c in CRITERIA}
    first, rest = [b for b in asked if b in needed], [b for b in asked if b not in needed]
    rest.sort(key=lambda b: VARIANTS_FIRST.index(b) if b in VARIANTS_FIRST else len(VARIANTS_FIRST))
    if args.rows == "lines":
        rest = []
    elif args.rows == "variants":
        first = []

    def run_backends(tmp, backends) -> bool:
        """Each backend's child process, merged into the report; True when interrupted."""
        for backend in backends:
            out = os.path.join(tmp, backend)
            cmd = [sys.executable, os.path.abspath(__file__), "--out", out, "--device", args.device,
                   "--backends", backend] + (["--quick"] if args.quick else []) + \
                  (["--only", args.only] if args.only else [])
            interrupted = False
            try:
                rc = subprocess.run(cmd).returncode
            except KeyboardInterrupt:  # a deadline (timeout -s INT reaches the child too): keep its part
                rc, interrupted = "interrupted", True
            try:
                with open(os.path.join(out, "gpu_bench.json")) as fh:
                    part = json.load(fh)
            except (OSError, ValueError):
                part = dict(settings={}, results=[], skipped=[])
            report["settings"].update(part["settings"])
            report["results"] += part["results"]
            report["skipped"] += part["skipped"]
            if rc != 0:
                report["results"].append(dict(bench="*", backend=backend, error=f"process exited with {rc}"))
            order = list(report["settings"]) + ["*"]
            report["results"].sort(key=lambda r: (order.index(r["bench"]) if r["bench"] in order else len(order),
                                                  BACKENDS.index(r["backend"]) if r["backend"] in BACKENDS else 99))
            write_report(report, path)
            if interrupted:
                return True
        return False

    with tempfile.TemporaryDirectory() as tmp:
        interrupted = run_backends(tmp, first)
        for index in range(len(CRITERIA)) if args.pairs and first and not interrupted else ():
            if not _pairable(report, index):
                continue
            out = os.path.join(tmp, f"pair{index}")
            cmd = [sys.executable, os.path.abspath(__file__), "--out", out, "--device", args.device,
                   "--pair", str(index), "--pairs", str(args.pairs)] + (["--quick"] if args.quick else [])
            try:
                subprocess.run(cmd)
            except KeyboardInterrupt:
                interrupted = True
            try:
                with open(os.path.join(out, "pair.json")) as fh:
                    part = json.load(fh)
                report.setdefault("paired", {})[part["label"]] = part
            except (OSError, ValueError, KeyError):
                report.setdefault("paired_errors", []).append(CRITERIA[index][0])
            write_report(report, path)
            if interrupted:
                break
        if not interrupted:
            interrupted = run_backends(tmp, rest)
    write_report(report, path)
    print(json.dumps(report["acceptance"]), flush=True)
    return 130 if interrupted else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results", "run"),
                    help="folder for gpu_bench.json (default $OUT, else benchmarks/results/run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--isolate", action="store_true",
                    help="each backend in a process of its own, merged into one JSON: a kernel that "
                         "breaks its CUDA context (an illegal access) cannot take the others down")
    ap.add_argument("--rows", choices=("all", "lines", "variants"), default="all",
                    help="with --isolate: every backend, only the criteria's backends and their "
                         "pairs, or only the variant rows (added to the JSON already in --out)")
    ap.add_argument("--pairs", type=int, default=0,
                    help="after the timings, each time criterion again as N alternating "
                         "ours/baseline pairs in one process; its ratio is then their median")
    ap.add_argument("--pair", type=int, default=None, help=argparse.SUPPRESS)  # one criterion (child)
    args = ap.parse_args(argv)
    if args.pair is not None:
        os.makedirs(args.out, exist_ok=True)
        part = paired_ratios(args.pair, torch.device(args.device), args.quick, max(args.pairs, 1))
        with open(os.path.join(args.out, "pair.json"), "w") as fh:
            json.dump(part, fh)
        return 0
    if args.isolate:
        return isolated(args)

    device = torch.device(args.device)
    timer = Timer(device, args.quick)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_bench.json")
    report = dict(environment=environment(device), settings={}, results=[], skipped=[])
    wanted = [b for b in args.backends.split(",") if b]

    write_report(report, path)
    only = {n for n in args.only.split(",") if n}
    for name, (builder, sizes, dtype) in settings(args.quick, device).items():
        if only and name not in only:
            continue
        report["settings"][name] = dict(sizes, dtype=str(dtype))
        make, run_with = builder(sizes, device, dtype)
        candidates = [b for b in wanted if b != "sdpa" or name == "masked_attention"]
        for backend in candidates:
            base, impl, env, compiled = split_backend(backend)
            if backend != "sdpa":
                reason = variant_skip_reason(base, device, dtype, name) or unavailable_reason(impl, device)
                if compiled and builder is not layer_case:
                    reason = reason or "compiled variants time the layers only"
                if device.type == "cpu" and backend == "triton":
                    reason = reason or "the interpreter is far too slow to time"
                if reason:
                    report["skipped"].append(dict(bench=name, backend=backend, reason=reason))
                    continue
            entry = dict(bench=name, backend=backend, dtype=str(dtype), **({"env": env} if env else {}))
            try:
                with environ(env):  # the native op reads its settings on every call
                    inputs = make()
                    if backend == "sdpa":
                        entry["sdpa_kernel"] = sdpa_kernel_used(inputs)
                    run = run_with(impl)
                    timed = torch.compile(run) if compiled else run
                    fwd, fwd_bwd = _fwd_bwd(inputs, timed)
                    entry["fwd_ms"], entry["fwd_peak_mb"], entry["fwd_reps"] = timer.measure(fwd)
                    entry["fwd_bwd_ms"], entry["fwd_bwd_peak_mb"], entry["fwd_bwd_reps"] = timer.measure(fwd_bwd)
                    if name in PROFILED and device.type == "cuda":
                        entry["fwd_bwd_enqueue_ms"] = enqueue_ms(fwd_bwd)
                    if name in PROFILED and impl in ("native", "triton"):
                        try:   # extra information: a profiler failure must not cost the timings
                            entry["fwd_bwd_profile"], entry["fwd_bwd_kernel_us"] = \
                                kernel_profile(fwd_bwd, device)
                            if device.type == "cuda":  # on CPU the kernel profile is this
                                entry["fwd_bwd_host_profile"] = host_profile(fwd_bwd)
                        except Exception as exc:  # noqa: BLE001
                            entry["profile_error"] = f"{type(exc).__name__}: {exc}"[:500]
                    if backend != "reference":  # the expected values come from reference in float64
                        try:
                            entry["check"] = bench_check.check(make, timed, run.reference64, dtype)
                        except Exception as exc:  # noqa: BLE001 - recorded: an unchecked entry holds no line
                            entry["check"] = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
            except Exception as exc:  # keep going: one backend failing must not lose the rest
                entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                entry["traceback"] = traceback.format_exc()[-4000:]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report["results"].append(entry)
            print(json.dumps({k: v for k, v in entry.items()
                              if k not in ("traceback", "fwd_bwd_profile", "fwd_bwd_host_profile", "check")}
                              | {"check": check_summary(entry)}),
                  flush=True)
            write_report(report, path)
    for index in range(len(CRITERIA)) if args.pairs else ():
        if _pairable(report, index):
            part = paired_ratios(index, device, args.quick, args.pairs)
            report.setdefault("paired", {})[part["label"]] = part
    write_report(report, path)   # the skips and settings of benchmarks that timed nothing
    print(json.dumps(report["acceptance"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
