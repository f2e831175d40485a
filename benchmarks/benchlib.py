"""Shared machinery of the benchmark suite: devices, timing, peak memory, inputs, paper settings.

Timing
- GPU: CUDA events around every run, the median of many runs after warm-up (``time_s``);
  pytest-benchmark's own wall-clock statistics are kept too (they include a synchronize).
- CPU: pytest-benchmark's timer (``time.perf_counter``), the median of the timed rounds.

Peak memory (``peak_bytes``), always of one run after warm-up, inputs and parameters excluded
- GPU: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the run
  (the statistics reset just before it): every byte the caching allocator handed out.
- CPU: :class:`TensorMemoryTracker`, the peak of the running total of the bytes of every tensor
  storage created by an op during the run (autograd-saved tensors and gradients included), each
  counted until the storage is freed. Scratch memory that a fused kernel allocates and frees
  inside one op (the C++/SDPA kernels' internal buffers) is not seen; everything an op returns or
  autograd keeps is. Deterministic, unlike the process RSS.
"""
from __future__ import annotations

import gc
import math
import os
import re
import statistics
import subprocess
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import regharm_ext
from regharm_ext.backends import NAMES as BACKENDS  # noqa: F401  (the suites parametrize over it)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

MEM_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() - memory_allocated() before one run (stats reset "
            "just before it): every byte the caching allocator handed out during the run",
    "cpu": "TensorMemoryTracker: peak of the live bytes of every tensor storage created by an op "
           "during one run (TorchDispatchMode + weakref finalizers on the storages; autograd-saved "
           "tensors and gradients included, scratch freed inside one fused kernel not seen)",
}
TIME_METHOD = {
    "cuda": "CUDA events around each run, median of the timed runs after warm-up",
    "cpu": "pytest-benchmark timer (perf_counter), median of the timed rounds (1 to 5) after one "
           "warm-up run; the batch-4 paper-table settings and the training step: a single run under "
           "the memory tracker (timing = 'single')",
}
MiB = 2 ** 20


# ---------------------------------------------------------------------------------------- device
def device_kind(device: torch.device) -> str:
    """File-name tag of a device: ``cpu`` or ``cuda-<gpu name slug>``."""
    if device.type != "cuda":
        return "cpu"
    return gpu_kind(torch.cuda.get_device_name(device))


def gpu_kind(name: str) -> str:
    """``cuda-<slug>`` of a GPU's name: "NVIDIA H100 80GB HBM3" -> cuda-nvidia-h100-80gb-hbm3."""
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)".strip()


def git_commit() -> Tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the checkout, or the commit named by ``REGHARM_COMMIT`` (dirty unknown:
    None) where that is set: a device copy of the tree can carry a .git from an earlier commit
    (seen: HEAD at the session's first commit under a later working tree)."""
    if os.environ.get("REGHARM_COMMIT"):
        return os.environ["REGHARM_COMMIT"], None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = None if commit is None else bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
            capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return commit, dirty


def machine_facts(device: torch.device) -> Dict:
    """What a reader needs to place the numbers: device, versions, commit, methods."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        triton_version = None
    commit, dirty = git_commit()
    return {
        "device": device.type,
        "device_kind": device_kind(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "regharm_ext": regharm_ext.__version__,
        "commit": commit,
        "commit_dirty": dirty,
        "backends": regharm_ext.backends(device),
        "time_method": TIME_METHOD[device.type if device.type == "cuda" else "cpu"],
        "memory_method": MEM_METHOD[device.type if device.type == "cuda" else "cpu"],
        "threads": torch.get_num_threads(),
    }


def backend_skip_reason(name: str, device: torch.device) -> Optional[str]:
    """None when ``name`` runs on ``device``, else why not (as ``regharm_ext.backends`` says)."""
    status = regharm_ext.backends(device)[name]
    if status == "available" and name == "triton" and device.type != "cuda":
        return "the Triton interpreter on CPU (TRITON_INTERPRET=1) is a correctness tool, not timed here"
    return None if status == "available" else status


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- memory
class TensorMemoryTracker(TorchDispatchMode):
    """Peak of the live bytes of the tensor storages that ops create while the mode is active.

    Every op's outputs are inspected; a storage that is new (not one of the op's inputs, not seen
    before) is counted from then until it is freed (a ``weakref.finalize`` on the storage, whose
    Python object PyTorch keeps alive exactly as long as the storage). Views and in-place results
    share an input's storage and are not counted again; tensors that existed before the mode are
    never counted.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: Dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def _count(self, t: torch.Tensor, inputs: set) -> None:
        if t.layout != torch.strided or t.device.type == "meta":
            return
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(s)
        if key in inputs or key in self._sizes:
            return
        n = s.nbytes()
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(s, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = set()
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor) and a.layout == torch.strided and a.device.type != "meta":
                try:
                    inputs.add(id(a.untyped_storage()))
                except (RuntimeError, NotImplementedError):
                    pass
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t, inputs)
        return out


def peak_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Bytes at the peak of one call of ``fn`` beyond what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with TensorMemoryTracker() as tr:
        fn()
    return int(tr.peak)


# ---------------------------------------------------------------------------------------- timing
@dataclass
class Budget:
    """How many runs a benchmark gets: enough for ``target_s`` of timed runs, within bounds."""
    warmup: int
    min_rounds: int
    max_rounds: int
    target_s: float


BUDGET = {"cpu": Budget(warmup=0, min_rounds=1, max_rounds=5, target_s=0.5),
          "cuda": Budget(warmup=3, min_rounds=10, max_rounds=100, target_s=0.5)}


def sweep_batch(device: torch.device) -> int:
    """Batch of the sweeps: the paper's 4 on GPU; 1 on CPU so that the suite fits a few minutes
    on 2 cores (the paper-table benchmarks always use batch 4)."""
    return PAPER_B if device.type == "cuda" else 1


def measure(benchmark, fn: Callable[[], None], device: torch.device,
            setup: Optional[Callable[[], None]] = None, info: Optional[Dict] = None,
            single_cpu_run: bool = False) -> Dict:
    """Time ``fn`` with pytest-benchmark and take its peak memory; fill ``benchmark.extra_info``.

    ``setup`` (e.g. dropping gradients) runs before every call, untimed. On CPU the memory run is
    also the warm-up (lazy initialization happens there, and its duration sizes the rounds).
    ``single_cpu_run``: on CPU run ``fn`` once only, under the memory tracker, and report that
    run's time (tracker overhead included, no warm-up): for the heavy paper-table settings.
    """
    kind = "cuda" if device.type == "cuda" else "cpu"
    budget = BUDGET[kind]
    setup = setup or (lambda: None)
    if kind == "cpu" and single_cpu_run:
        peaks: List[int] = []
        benchmark.pedantic(lambda: peaks.append(peak_memory(fn, device)), setup=setup, rounds=1,
                           warmup_rounds=0, iterations=1)
        stats = getattr(benchmark, "stats", None)
        extra = dict(info or {})
        extra.update(device=device.type, time_s=stats.stats.median if stats is not None else None,
                     peak_bytes=peaks[0] if peaks else None, rounds=1, timing="single")
        benchmark.extra_info.update(extra)
        return extra

    def once():
        setup()
        fn()

    for _ in range(budget.warmup):
        once()
    sync(device)
    setup()
    t0 = time.perf_counter()
    peak = peak_memory(fn, device)
    first = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(budget.max_rounds, max(budget.min_rounds, budget.target_s // first)))

    event_ms: List[float] = []
    if kind == "cuda":
        def target():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            event_ms.append(start.elapsed_time(end))
    else:
        target = fn
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)

    if event_ms:
        t = statistics.median(event_ms) / 1e3
    else:
        stats = getattr(benchmark, "stats", None)
        t = stats.stats.median if stats is not None else first
    extra = dict(info or {})
    extra.update(device=device.type, time_s=t, peak_bytes=peak, rounds=rounds, timing="median")
    benchmark.extra_info.update(extra)
    return extra


# ---------------------------------------------------------------------------------------- inputs
def blob_mask(B: int, size: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """Foreground masks (Tensor[B, 1, size, size]) in {0, 1}: an ellipse of area ``fraction`` of
    the image, placed differently in each image (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    masks = []
    for _ in range(B):
        aspect = 0.6 + 0.8 * float(torch.rand((), generator=g))
        # area = pi * a * b = fraction * size^2, b = aspect * a
        a = size * math.sqrt(fraction / (math.pi * aspect))
        b = aspect * a
        cy = b + (size - 2 * b) * float(torch.rand((), generator=g)) if size > 2 * b else size / 2
        cx = a + (size - 2 * a) * float(torch.rand((), generator=g)) if size > 2 * a else size / 2
        masks.append((((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1).float())
    return torch.stack(masks)[:, None]


def patch_count(H: int, W: int, patch: Tuple[int, int], stride: Tuple[int, int]) -> int:
    return ((H - patch[0]) // stride[0] + 1) * ((W - patch[1]) // stride[1] + 1)


def frac_size(value: float, extent: int) -> int:
    """A fractional patch/stride in pixels, as PTL resolves it (rounded, at least 1)."""
    return max(1, int(round(value * extent)))


# Table 4's (patch, stride) as fractions of the feature side; at 128² these are
# (32,32) (32,16) (32,8) (16,16) (16,8) (16,4).
TABLE4 = [(1 / 4, 1 / 4), (1 / 4, 1 / 8), (1 / 4, 1 / 16), (1 / 8, 1 / 8), (1 / 8, 1 / 16), (1 / 8, 1 / 32)]
TABLE4_LABELS = ["h/4, h/4", "h/4, h/8", "h/4, h/16", "h/8, h/8", "h/8, h/16", "h/8, h/32"]
TABLE4_PAPER_MB = [175, 214, 348, 169, 230, 463]
TABLE3_LEVELS = ["16", "32", "64", "all"]
TABLE3_PAPER_MB = [97, 120, 379, 410]
PAPER_B, PAPER_INPUT = 4, 256

# Decoder channels of the paper's model at width 1 per feature size at a 256² input, used when
# regharm_ext.model cannot be imported (the same values as its documented table).
_FALLBACK_CHANNELS = {128: 64, 64: 128, 32: 256, 16: 256}


def paper_channels() -> Tuple[Dict[int, int], str]:
    """Channels of the decoder feature at each size (256² input, width 1) and where they came from."""
    try:
        from regharm_ext.model import Harmonizer
        ch = Harmonizer("rbase", width=1, input_size=PAPER_INPUT).channels
        return {PAPER_INPUT >> lvl: ch[lvl] for lvl in range(1, 5)}, "regharm_ext.model.Harmonizer(width=1).channels"
    except Exception:  # noqa: BLE001 - the model may not exist yet
        return dict(_FALLBACK_CHANNELS), "fallback table (regharm_ext.model not importable)"


def reference_too_big(elements: int, device: torch.device, table: bool = False) -> Optional[str]:
    """``reference`` materializes B·C·P·K blocks and B·L·N scores: on CPU keep it to sizes that
    run in a few seconds (larger for the paper-table settings, which run once)."""
    if device.type == "cuda":
        limit = 1_500_000_000
    else:
        limit = 70_000_000 if table else 5_000_000
    if elements > limit:
        return (f"reference would materialize {elements / 1e6:.0f} M elements per tensor "
                f"(limit {limit / 1e6:.0f} M on {device.type}): too slow/large here")
    return None


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


FG = [0.05, 0.1, 0.2, 0.35, 0.5]
FG_CPU = [0.05, 0.2, 0.5]


def fg_skip_reason(fg: float, device: torch.device) -> Optional[str]:
    if device.type != "cuda" and fg not in FG_CPU:
        return f"foreground {fg:.0%}: the CPU run keeps {', '.join(f'{f:.0%}' for f in FG_CPU)} (time budget)"
    return None


def dtype_skip_reason(dtype_name: str, device: torch.device) -> Optional[str]:
    if dtype_name != "fp32" and device.type != "cuda":
        return f"{dtype_name} is benchmarked on GPU only (CPU runs fp32)"
    return None


def zero_grads(*tensors_or_modules) -> Callable[[], None]:
    """A setup callable that drops the gradients of tensors and modules' parameters."""
    def run():
        for t in tensors_or_modules:
            if isinstance(t, torch.nn.Module):
                for p in t.parameters():
                    p.grad = None
            elif isinstance(t, torch.Tensor):
                t.grad = None
    return run
