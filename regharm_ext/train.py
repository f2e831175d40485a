"""Training: ``python -m regharm_ext.train [--preset demo|paper|smoke] [--out RUN_DIR]
[--data-root DIR] [--resume] [--<field> VALUE ...]``.

Presets (every :class:`TrainConfig` field can be overridden, e.g. ``--lr 1e-3 --variant rbase``):

- ``demo`` (the default): the embedded synthetic composites, sized so that training plus the
  final validation finish within 15 minutes on a 2-core CPU.
- ``paper``: SPEC §6 / §4.1 — iHarmony4 (``--data-root``), 256², batch 4, Adam(0.9, 0.999),
  lr 1e-3 divided by 10 at epoch 120 of 140, random crop + horizontal flip; validated on the
  iHarmony4 test split.
- ``smoke``: a few seconds, for tests.

A run directory holds everything the run writes: ``config.json``, ``log.jsonl`` (one JSON line per
epoch), ``checkpoints/`` + ``latest.json`` (a checkpoint every epoch, see
:mod:`regharm_ext.checkpoint`), ``val.json`` (the final table: model vs composite vs Reinhard),
``samples.png`` (a few validation images as composite | model | real, rewritten after every
epoch; the final validation's adds Reinhard) and ``tensorboard/`` when TensorBoard is installed.
``--resume`` continues from the latest checkpoint at the same step, with the same data order and
RNG states, so its next loss is the one the uninterrupted run would have had.

Reliability and scale-out (README, "Training on several GPUs and nodes"):

- ``torchrun --nproc_per_node=N -m regharm_ext.train ...`` (and multi-node with torchrun's
  rendezvous) trains data-parallel (:mod:`regharm_ext.distributed`): ``batch_size`` is the global
  batch, split across the processes; results equal one process's up to float rounding.
- ``--amp bf16|fp16``: autocast (fp16 with a gradient scaler, checkpointed).
- Checkpoints are atomic (a SIGKILL at any moment leaves the last complete one for ``--resume``);
  ``--deterministic`` makes the resumed losses equal the uninterrupted ones (exactly on CPU).
- A NaN/Inf loss stops the run before it reaches the weights, without saving (the last good
  checkpoint stays ``latest.json``).

Exit status: 0 done, 1 stopped early (interrupted, ``--max-steps``), 2 bad input or configuration
(a one-line ``error: ...``), 3 stopped on a non-finite loss.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import distributed
from .backends import NAMES as BACKENDS, BackendUnavailable, unavailable_reason
from .checkpoint import (CheckpointError, clean_partial, has_checkpoint, load_checkpoint, load_weights,
                         create_json, resolve_checkpoint, save_checkpoint, write_json, write_text)
from .cpu_cores import CoreMeter, allowed_cores, idle_cores, threads_for
from .errors import one_line
from .losses import fmse_loss
from .model import Harmonizer, memory_format_for, parse_variant
from .paths import nearest_existing


@dataclass
class TrainConfig:
    """Every setting of a run (the ``paper`` recipe by default; presets override some)."""
    preset: str = "paper"
    # model
    variant: str = "rbase+ltl+ptl"
    width: float = 1.0
    base_channels: int = 32
    ltl_levels: Tuple[int, ...] = (32,)
    input_size: int = 256
    backend: Optional[str] = None
    # data
    data: str = "iharmony4"                  # "iharmony4" or "synth" (embedded photos)
    data_root: Optional[str] = None
    subsets: Optional[Tuple[str, ...]] = None
    augment: bool = True                     # iHarmony4: random crop + horizontal flip
    images_per_epoch: int = 0                # synth: samples per epoch; iharmony4: 0 = all
    fresh_data: bool = True                  # synth: new draws every epoch
    val_images: int = 0                      # 0 = the whole validation split
    holdout: int = 0                         # iharmony4: training images kept out to select on
    # optimization
    epochs: int = 140
    batch_size: int = 4
    lr: float = 1e-3
    lr_milestones: Tuple[int, ...] = (120,)  # epochs after which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    a_min: float = 100.0
    seed: int = 0
    # run control (may change on --resume)
    device: str = "auto"
    threads: int = 0                         # 0: auto (CPU: the cores not busy elsewhere)
    num_workers: int = -1                    # -1: auto (0 on CPU, up to 8 loader processes on GPU)
    eval_batch_size: int = 16
    max_steps: int = 0                       # > 0: stop after this global step, as if interrupted
    max_minutes: float = 0.0                 # > 0: end training after this long, then validate
    validate: bool = True                    # the final table
    val_every: int = 0                       # > 0: score val_subset images every N epochs, keep the best
    val_subset: int = 0                      # images for those scores (0 = the whole split)
    keep_checkpoints: int = 2
    progress: bool = True                    # tqdm bar
    amp: str = "none"                        # mixed precision: "bf16", "fp16" or "none"
    deterministic: bool = False              # deterministic algorithms and thread count: exact resumption
    memory_format: str = "auto"              # weights' layout: auto (channels_last on CPU), channels_last, contiguous
    inject_nan_step: int = 0                 # tests: the loss of this global step becomes NaN


EVAL_SIZE = 256   # the iDIH protocol's resolution for every score (SPEC §6)
RUN_CONTROL = {"device", "threads", "num_workers", "eval_batch_size", "max_steps", "max_minutes",
               "validate", "progress", "data_root", "epochs", "backend", "val_every", "val_subset",
               "keep_checkpoints", "amp", "deterministic", "memory_format", "inject_nan_step"}
# run control that a resumed run keeps unless given again: what shapes the run's outcome (the
# time budget, model selection, the checkpoints kept, the final table) and how it was asked to
# run. The rest returns to the preset's value: the machine's (device, threads, workers, eval
# batch) and the stops of one process (max_steps).
INHERITED = {"epochs", "data_root", "backend", "amp", "deterministic", "memory_format",
             "max_minutes", "validate", "val_every", "val_subset", "keep_checkpoints", "progress"}
AMP_MODES = ("none", "bf16", "fp16")

PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {},
    # Sized on a shared 2-core CPU: see the report in the README for the measured time and table.
    "demo": dict(data="synth", input_size=128, base_channels=8, width=1.0, batch_size=8,
                 images_per_epoch=1600, epochs=10, lr=2e-3, lr_milestones=(8,), max_minutes=12.5),
    "smoke": dict(data="synth", input_size=64, base_channels=4, batch_size=4, images_per_epoch=8,
                  epochs=6, lr=3e-3, lr_milestones=(), fresh_data=False, val_images=4,
                  eval_batch_size=4, progress=False, threads=1),
}


def preset_config(name: str, **overrides) -> TrainConfig:
    """The config of a preset with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name], preset=name)
    values.update(overrides)
    return _make(values)


class ConfigError(ValueError):
    """A setting, or the run directory, that the run cannot use; the CLI prints it on one line
    (``error: ...``) and exits with status 2."""


def _make(values: Dict[str, Any]) -> TrainConfig:
    """A checked config: a bad value fails here, before the run writes anything."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config fields {unknown}")
    cfg = TrainConfig(**values)
    for f in ("ltl_levels", "lr_milestones", "subsets"):
        v = getattr(cfg, f)
        if isinstance(v, (list, tuple)):
            setattr(cfg, f, tuple(v))
    _check_types(cfg)
    _check_values(cfg)
    return cfg


def _type_ok(annotation: str, v: Any) -> bool:
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    checks = {
        "int": lambda: number and isinstance(v, int),
        "float": lambda: number and math.isfinite(v),
        "bool": lambda: isinstance(v, bool),
        "str": lambda: isinstance(v, str),
        "Optional[str]": lambda: v is None or isinstance(v, str),
        "Tuple[int, ...]": lambda: isinstance(v, tuple) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v),
        "Optional[Tuple[str, ...]]": lambda: v is None or (isinstance(v, tuple) and all(isinstance(x, str) for x in v)),
    }
    return checks[annotation]()


def _check_types(cfg: TrainConfig) -> None:
    # a hand-edited config.json can hold any JSON value; the run would fail deep inside with it
    for f in fields(TrainConfig):
        v = getattr(cfg, f.name)
        if not _type_ok(str(f.type), v):
            raise ConfigError(f"{f.name} must be {'a finite ' if f.type == 'float' else 'of type '}"
                              f"{f.type}, got {v!r}")


# (field, test, what it must be)
_RANGES = [
    ("seed", lambda v: v >= 0, ">= 0"),
    ("width", lambda v: v > 0, "> 0"), ("base_channels", lambda v: v >= 1, ">= 1"),
    ("epochs", lambda v: v >= 1, ">= 1"), ("batch_size", lambda v: v >= 1, ">= 1"),
    ("lr", lambda v: v > 0, "> 0"), ("lr_gamma", lambda v: v > 0, "> 0"),
    ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"), ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("a_min", lambda v: v > 0, "> 0 (an empty mask's area is floored at it)"), ("images_per_epoch", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("val_images", lambda v: v >= 0, ">= 0 (0 = all)"), ("threads", lambda v: v >= 0, ">= 0 (0 = auto)"),
    ("num_workers", lambda v: v >= -1, ">= -1 (-1 = auto)"), ("eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("max_steps", lambda v: v >= 0, ">= 0 (0 = no limit)"), ("max_minutes", lambda v: v >= 0, ">= 0 (0 = none)"),
    ("val_every", lambda v: v >= 0, ">= 0 (0 = never)"), ("val_subset", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("holdout", lambda v: v >= 0, ">= 0 (0 = none)"),
    ("keep_checkpoints", lambda v: v >= 1, ">= 1"), ("inject_nan_step", lambda v: v >= 0, ">= 0"),
]


def _check_values(cfg: TrainConfig) -> None:
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    for name, ok, must in _RANGES:
        if not ok(getattr(cfg, name)):
            raise ConfigError(f"{name} must be {must}, got {getattr(cfg, name)!r}")
    if cfg.data not in ("synth", "iharmony4"):
        raise ConfigError(f"data must be 'synth' or 'iharmony4', got {cfg.data!r}")
    if cfg.holdout and cfg.data != "iharmony4":
        raise ConfigError("--holdout is for --data iharmony4; on the synthetic data --val-every selects on "
                          "other composites of the validation photos than the final table's")
    if cfg.val_every and cfg.data == "iharmony4" and not cfg.holdout:
        # a checkpoint picked by its test scores would make the test table optimistic
        raise ConfigError("iHarmony4 has no validation split, and a checkpoint picked on the test split "
                          "makes its test scores optimistic: --val-every needs --holdout N (training "
                          "images kept out of training to score and select on, e.g. 1000), given when "
                          "the run starts")
    if cfg.amp not in AMP_MODES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}, got {cfg.amp!r}")
    if cfg.backend is not None and cfg.backend not in BACKENDS:
        raise ConfigError(f"unknown backend {cfg.backend!r}; choose one of {', '.join(BACKENDS)} "
                          f"(none = the fastest available)")
    _device_type(cfg.device)
    try:   # the messages name the field and its choices
        memory_format_for(cfg.memory_format, "cpu")
        parse_variant(cfg.variant)
        with torch.device("meta"):   # the model's own checks (ltl_levels, input_size, ...), no memory
            build_model(cfg)
    except (ValueError, TypeError) as exc:
        raise ConfigError(one_line(exc)) from exc


def _device_type(device: str) -> str:
    """"cpu" or "cuda" for a ``device`` setting ("auto", "cpu", "cuda", "cuda:N")."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return kind


def _check_runnable(cfg: TrainConfig) -> None:
    """What this machine must offer the config: checked before anything is written."""
    kind = _device_type(cfg.device)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: PyTorch sees no CUDA GPU here; use --device cpu (or auto)")
    if cfg.backend is not None:
        reason = unavailable_reason(cfg.backend, kind)
        if reason is not None:
            raise ConfigError(f"--backend {cfg.backend} cannot run on {kind}: {reason}")


# --------------------------------------------------------------------------- data
def _datasets(cfg: TrainConfig):
    """(train, val, select): the training set, the final table's, and the one ``--val-every``
    scores to pick the best checkpoint (never the final table's images)."""
    if cfg.data == "synth":
        from .data.synth import SyntheticComposites

        train = SyntheticComposites("train", size=cfg.input_size, length=cfg.images_per_epoch or 2000,
                                    seed=cfg.seed)
        # scored like every evaluation (SPEC §6): at 256², the model at its own size, Î upsampled
        val = SyntheticComposites("val", size=EVAL_SIZE, length=cfg.val_images or None, seed=0)
        # the 70 training photos are trained on, the 15 others make the table: selection draws
        # other masks and appearance shifts on those 15 (seed 1), the nearest to unseen data
        select = SyntheticComposites("val", size=EVAL_SIZE, seed=1)
        return train, val, select
    if cfg.data == "iharmony4":
        if not cfg.data_root:
            raise ConfigError("the iharmony4 data (preset 'paper') needs --data-root DIR pointing at iHarmony4 "
                             "(or use --preset demo for the embedded synthetic data)")
        from .data.iharmony4 import IHarmony4

        train = IHarmony4(cfg.data_root, "train", subsets=cfg.subsets, size=cfg.input_size, augment=cfg.augment)
        val = IHarmony4(cfg.data_root, "test", subsets=cfg.subsets, size=EVAL_SIZE, augment=False)
        if cfg.val_images:
            val = torch.utils.data.Subset(val, range(min(cfg.val_images, len(val))))
        select = None
        if cfg.holdout:
            if cfg.holdout >= len(train):
                raise ConfigError(f"--holdout {cfg.holdout} keeps out all {len(train)} training images; "
                                  f"hold out fewer")
            held, kept = _holdout_split(train, cfg.holdout, cfg.seed)
            as_eval = IHarmony4(cfg.data_root, "train", subsets=cfg.subsets, size=EVAL_SIZE, augment=False,
                                check_files=False)   # the training set's construction checked them
            select = torch.utils.data.Subset(as_eval, held)
            train = torch.utils.data.Subset(train, kept)
        return train, val, select
    raise ValueError(f"data must be 'synth' or 'iharmony4', got {cfg.data!r}")


def _holdout_split(train, holdout: int, seed: int) -> Tuple[List[int], List[int]]:
    """(held, kept) item indices: whole real images held out, drawn in an order fixed by the
    seed (a resumed run trains on the same images) until ``holdout`` composites are held. An
    iHarmony4 real image has several composites (masks and appearance shifts): one of them
    trained on would make its siblings' scores optimistic (the target was learned)."""
    groups: Dict[Path, List[int]] = {}
    for i in range(len(train)):
        groups.setdefault(train.paths(i)[2], []).append(i)
    keys = list(groups)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    held: List[int] = []
    for g in order:
        if len(held) >= holdout:
            break
        held += groups[keys[g]]
    if len(held) == len(train):
        raise ConfigError(f"--holdout {holdout} keeps out every one of the {len(keys)} real images of "
                          f"the training set (a real image's composites are held out together); "
                          f"hold out fewer")
    kept = sorted(set(range(len(train))) - set(held))
    return sorted(held), kept


def _epoch_batches(cfg: TrainConfig, n: int, epoch: int) -> List[List[int]]:
    """The batches of an epoch: a permutation seeded by (seed, epoch), so a resumed run sees the
    same order. Incomplete last batches are dropped (BatchNorm and a constant step size)."""
    per_epoch = min(n, cfg.images_per_epoch) if cfg.images_per_epoch else n
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)[:per_epoch].tolist()
    return [order[i:i + cfg.batch_size] for i in range(0, per_epoch - cfg.batch_size + 1, cfg.batch_size)]


class _SeededSamples(torch.utils.data.Dataset):
    """Seeds the global RNGs from (seed, epoch, index) before each sample, so that random
    augmentation drawn from them does not depend on workers, order or resumption."""

    def __init__(self, dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        import random

        import numpy as np

        # below 2**63 (torch.manual_seed's range) for any seed; unchanged for seeds < ~1.8 M
        s = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i)) % 2 ** 63
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2 ** 32)
        return self.dataset[i]


# --------------------------------------------------------------------------- loop helpers
def _set_threads(cfg: TrainConfig, device: torch.device, per_node: int = 1
                 ) -> Tuple[int, Optional[CoreMeter]]:
    """CPU: the cores that other processes leave idle now (at least 1), shared by the
    ``per_node`` training processes of this machine (:mod:`regharm_ext.cpu_cores`), and the meter
    that :func:`_retune_threads` reads at each epoch's end (None where the count stays as it is:
    set by hand, not on CPU, several processes per node, no ``/proc/stat``, or ``deterministic``,
    which takes all cores whatever the load: a thread count that changes between runs changes
    float reductions)."""
    if cfg.threads > 0:
        n, meter = _capped_threads(cfg.threads), None
    elif device.type == "cpu":
        if cfg.deterministic:
            n, meter = max(1, len(allowed_cores()) // max(1, per_node)), None
        else:
            meter = CoreMeter()
            cores, busy, _ = idle_cores(meter=meter)
            n = threads_for(cores, busy, per_node)
            if not meter.available or per_node > 1:   # (the other ranks would count as others)
                meter = None
    else:
        return torch.get_num_threads(), None
    torch.set_num_threads(n)
    return n, meter


def _capped_threads(asked: int) -> int:
    """--threads N above the usable cores only slows every step (threads contend): the core count."""
    cores = len(allowed_cores())
    if cores and asked > cores:
        print(f"warning: --threads {asked} is more than the {cores} usable cores; using {cores}",
              file=sys.stderr, flush=True)
        return cores
    return asked


def _retune_threads(meter: Optional[CoreMeter]) -> Optional[str]:
    """At an epoch's end: the thread count for what other processes did during the epoch (a job
    that started or ended since); a line saying so when it changes."""
    if meter is None:
        return None
    busy = meter.others_busy()
    if busy is None:
        return None
    old, new = torch.get_num_threads(), threads_for(len(meter.cores), busy)
    if new == old:
        return None
    torch.set_num_threads(new)
    return f"threads {old} -> {new}: other processes kept {busy:.1f} of {len(meter.cores)} cores busy"


class _Deterministic:
    """Context: deterministic algorithms (errors on CPU, warnings on CUDA where bilinear
    upsampling's backward has no deterministic kernel), fixed cuDNN algorithms and cuBLAS
    workspace; the previous global settings come back on exit."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device

    def __enter__(self):
        if not self.enabled:
            return self
        self.saved = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled(),
                      torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=self.device.type != "cpu")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        return self

    def __exit__(self, *exc):
        if self.enabled:
            on, warn_only, bench, det = self.saved
            torch.use_deterministic_algorithms(on, warn_only=warn_only)
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = bench, det
        return False


def _amp(cfg: TrainConfig, device: torch.device):
    """(autocast dtype or None, GradScaler or None) for ``cfg.amp``."""
    if cfg.amp == "none":
        return None, None
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return dtype, scaler


class NonFiniteLoss(RuntimeError):
    """The loss (or the weights) stopped being finite; the run stops without saving."""


def _finite_weights(model) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def _trim_log(run_dir: Path, step: int) -> None:
    """Drop epoch records past ``step`` (written before a crash that came before their checkpoint),
    so that the resumed run's records follow on without duplicates."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass   # a line cut short by the crash
    if len(keep) != len(lines):
        write_text(path, "".join(f"{line}\n" for line in keep))


def build_model(cfg: TrainConfig) -> Harmonizer:
    return Harmonizer(variant=cfg.variant, width=cfg.width, ltl_levels=cfg.ltl_levels,
                      input_size=cfg.input_size, backend=cfg.backend, base_channels=cfg.base_channels)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: JSON lines only
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")


def _trained_info(cfg: TrainConfig, state: Dict) -> Dict:
    return {"preset": cfg.preset, "data": cfg.data, "input_size": cfg.input_size,
            "epochs_done": state["epoch"], "steps": state["step"], "batch_size": cfg.batch_size,
            "images_per_epoch": cfg.images_per_epoch, "lr": cfg.lr, "lr_milestones": list(cfg.lr_milestones),
            "train_seconds": round(state["elapsed"], 1)}


def final_validation(model, val, cfg: TrainConfig, device: torch.device, run_dir: Path,
                     checkpoint: str = "") -> Dict:
    """Model vs composite vs Reinhard on the validation split; prints the table, writes val.json."""
    from .evaluate import evaluate, format_table

    model.eval()
    kw = dict(device=str(device), batch_size=cfg.eval_batch_size, progress=cfg.progress)
    results = [evaluate(model, val, **kw)]
    for baseline in ("composite", "reinhard"):
        results.append(evaluate(baseline, val, **kw))
    print(format_table(results), flush=True)
    write_samples(model, val, device, run_dir, baselines=("reinhard",))
    fm = [r["subsets"]["All"]["fmse"] for r in results]
    out = {"checkpoint": checkpoint, "results": results, "fmse_vs_composite": fm[0] / fm[1] if fm[1] else None,
           "fmse_vs_reinhard": fm[0] / fm[2] if fm[2] else None}
    write_json(run_dir / "val.json", out)
    return out


def _set_lr(opt, cfg: TrainConfig, state: Dict, elapsed: float) -> None:
    """Step decay: ``lr · gamma^k`` after k milestones (epochs). With a time budget
    (``max_minutes``) a milestone also passes when that fraction of the budget is spent, so that a
    run cut short by a slow machine still ends with the lower learning rate."""
    passed = 0
    for m in cfg.lr_milestones:
        by_time = cfg.max_minutes > 0 and elapsed >= 60 * cfg.max_minutes * m / max(1, cfg.epochs)
        passed += state["epoch"] >= m or by_time
    state["lr_drops"] = max(state.get("lr_drops", 0), passed)
    lr = cfg.lr * cfg.lr_gamma ** state["lr_drops"]
    for group in opt.param_groups:
        group["lr"] = lr


SAMPLE_ROWS = 6   # validation images in the run folder's samples.png


def write_samples(model, val, device: torch.device, run_dir: Path, baselines: Sequence[str] = (),
                  writer=None, step: int = 0) -> Optional[Path]:
    """``run_dir/samples.png``: the first columns of the validation table as pictures (composite |
    model | baselines | real, :mod:`regharm_ext.samples`), also to TensorBoard when it logs. A
    failure to write it is reported and training goes on: a picture is not worth a run."""
    from .evaluate import method_fn
    from .samples import sample_sheet, save_sheet

    was_training = model.training
    model.eval()
    try:
        methods = [("model", method_fn(model))] + [(b, method_fn(b)) for b in baselines]
        sheet = sample_sheet(val, methods, SAMPLE_ROWS, device)
        path = save_sheet(sheet, run_dir / "samples.png")
        if writer is not None:
            writer.add_image("samples", np.asarray(sheet), step, dataformats="HWC")
        return path
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        print(f"warning: could not write {run_dir / 'samples.png'}: {one_line(exc)}", file=sys.stderr, flush=True)
        return None
    finally:
        model.train(was_training)


def _quick_val(model, val, cfg: TrainConfig, device: torch.device) -> float:
    """fMSE of the model on the first ``val_subset`` images of the selection set (during
    training; see :func:`_datasets`)."""
    from .evaluate import evaluate

    if cfg.val_subset:
        val = torch.utils.data.Subset(val, range(min(cfg.val_subset, len(val))))
    res = evaluate(model, val, device=str(device), batch_size=cfg.eval_batch_size, progress=False)
    return float(res["subsets"]["All"]["fmse"])


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)   # Ctrl-C; schedulers, `timeout`, `docker stop`


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM while training: the first asks the loop to stop at the next
    step boundary, where a checkpoint is exact (a KeyboardInterrupt inside a step would leave
    BatchNorm statistics or Adam moments with part of that step); a second one interrupts at once."""

    def __init__(self, main: bool):
        self.main, self.requested, self.previous = main, False, {}

    def install(self) -> None:
        # Python lets only the main thread set handlers; elsewhere Ctrl-C stays a KeyboardInterrupt
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in _STOP_SIGNALS}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.main:   # os.write: print could be the very call this handler interrupted
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            os.write(2, f"\n{name}: stopping after this step (again: stop at once, without saving "
                        f"it)\n".encode())

    def restore(self) -> None:
        for s, previous in self.previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self.previous = {}


def _ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers: Ctrl-C (or a SIGTERM to the process group) reaches them too; they keep
    serving the step that the main process finishes before it stops."""
    for s in _STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _save_if_new(checkpoint, saved_step: List[int], state: Dict) -> None:
    # a stop right after an epoch's checkpoint would write the same step again
    if saved_step[0] != state["step"]:
        checkpoint()


def _continue_finished(cfg: TrainConfig, state: Dict) -> None:
    """``--resume --epochs N`` on a run that finished after fewer epochs trains on up to N. A run
    that ended on its time budget stays finished: its clock (kept in the state) has run out."""
    if state.get("finished") and not state.get("time_budget") and cfg.epochs > state["epoch"]:
        state["finished"] = False


def _holds_run(run_dir: Path) -> bool:
    return (run_dir / "config.json").exists() or (run_dir / "latest.json").exists()


def _write_config(cfg: TrainConfig, run_dir: Path, new: bool) -> None:
    """config.json; a new run creates it exclusively, so that two processes started with one
    --out (or one default name) cannot train into the same directory."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (create_json if new else write_json)(run_dir / "config.json", dataclasses.asdict(cfg))
    except FileExistsError:
        raise ConfigError(f"{run_dir} already holds a run (another process started it); use "
                          f"--resume to continue it or another --out") from None
    except OSError as exc:
        raise ConfigError(f"--out {run_dir}: cannot write the run directory there "
                          f"({exc.strerror or exc}); choose another --out") from None


@contextlib.contextmanager
def _setup_errors():
    """A run's set-up (model, optimizer, data) failing on a setting: a ConfigError, one line in the
    CLI. Errors of the training loop itself stay as they are (they are bugs, not settings)."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError, BackendUnavailable) as exc:
        raise ConfigError(one_line(exc)) from exc


def _check_out(run_dir: Path) -> None:
    """Refuses an --out that cannot become a directory (a file, a path under a file) up front."""
    p = nearest_existing(run_dir)
    if p.exists() and not p.is_dir():
        what = "is" if p == run_dir else f"is under {p}, which is"
        raise ConfigError(f"--out {run_dir} {what} a file, not a directory; choose another --out")


# --------------------------------------------------------------------------- training
def train(cfg: TrainConfig, run_dir, resume: bool = False) -> Dict[str, Any]:
    """Run (or resume) training in ``run_dir``; under torchrun, one rank of a data-parallel job
    (:mod:`regharm_ext.distributed`: only rank 0 prints, logs, checkpoints and validates).

    Returns ``{"run_dir", "state", "step_losses": [(step, loss of the global batch), ...] of this
    process, "val": the final table or None, "stopped": "done" | "max_steps" | "time" |
    "interrupted" | "nan", "error": the message when stopped on a non-finite loss}``.
    """
    run_dir = Path(run_dir)
    _check_runnable(cfg)
    d, device = distributed.setup(cfg.device)
    try:
        with _Deterministic(cfg.deterministic, device):
            return _train(cfg, run_dir, resume, d, device)
    finally:
        distributed.cleanup()


def _same_state_everywhere(state: Dict, run_dir: Path, d: "distributed.Dist", device: torch.device) -> None:
    """Every rank resumed from rank 0's checkpoint (a node that does not share the run directory
    would silently start over, with other data and fresh Adam moments)."""
    if not d.enabled:
        return
    mine = [float(state[k]) for k in ("step", "epoch", "batch")]
    main = distributed.from_main(mine, d, device)
    if distributed.mean_across([float(mine != main)], d, device)[0] > 0:
        raise CheckpointError(
            f"the processes resumed from different checkpoints (rank 0 at step {int(main[0])}, rank "
            f"{d.rank} at step {int(mine[0])}): --resume needs {run_dir} on a file system that every "
            f"node shares")


# the counters a training state always holds (the initial state below; a resumed one must too)
_STATE_KEYS = ("epoch", "batch", "step", "elapsed", "loss_sum", "loss_count")


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, d: "distributed.Dist", device: torch.device):
    if cfg.batch_size % d.world:
        raise ConfigError(f"batch_size {cfg.batch_size} (the global batch) is not divisible by the "
                         f"{d.world} processes; use a multiple of {d.world}")
    main = d.is_main
    threads, core_meter = _set_threads(cfg, device, d.local_world)
    torch.manual_seed(cfg.seed)
    with _setup_errors():
        layout = memory_format_for(cfg.memory_format, device)
        model = build_model(cfg).to(device, memory_format=layout)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        amp_dtype, scaler = _amp(cfg, device)
        train_ds, val_ds, select_ds = _datasets(cfg)
    n_batches = len(_epoch_batches(cfg, len(train_ds), 0))
    if n_batches == 0:   # refused before the run directory is written
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than an epoch "
                          f"({min(len(train_ds), cfg.images_per_epoch or len(train_ds))} images); "
                          f"use a smaller --batch-size or more --images-per-epoch")

    state = {"epoch": 0, "batch": 0, "step": 0, "elapsed": 0.0, "loss_sum": 0.0, "loss_count": 0}
    was_finished = False
    if resume:
        if main:
            removed = clean_partial(run_dir)
            if removed:
                print(f"removed {len(removed)} incomplete checkpoint file(s) left by a crash", flush=True)
        distributed.barrier(d)
        if has_checkpoint(run_dir):
            state = load_checkpoint(run_dir, model, opt)
            lacking = sorted(set(_STATE_KEYS) - set(state))
            if lacking:
                raise CheckpointError(f"the latest checkpoint of {run_dir} lacks the training counters "
                                      f"{lacking}; it is damaged: remove it (or point latest.json at "
                                      f"an earlier one) and resume again")
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
        elif main:
            print(f"{run_dir} has no checkpoint yet: starting from the beginning", flush=True)
        _same_state_everywhere(state, run_dir, d, device)
        if main:
            _trim_log(run_dir, state["step"])
        _continue_finished(cfg, state)
        was_finished = bool(state.get("finished"))
        if state.get("finished") and main:
            print(f"{run_dir} already finished ({state['epoch']} epochs); nothing to resume", flush=True)
    if main:
        if not state.get("finished"):   # a finished run keeps the config it finished with
            _write_config(cfg, run_dir, new=not resume)
        job = f", {d.world} processes ({d.backend})" if d.enabled else ""
        print(f"run {run_dir}: {cfg.variant}, {model.count_parameters() / 1e6:.2f} M parameters, "
              f"{cfg.input_size}², {device}, {threads} threads{job}"
              f"{', channels_last' if layout == torch.channels_last else ''}"
              f"{', amp ' + cfg.amp if amp_dtype else ''}{', deterministic' if cfg.deterministic else ''}",
              flush=True)
    net = distributed.wrap(model, d, device)   # after loading: DDP starts from rank 0's weights

    workers = cfg.num_workers
    if workers < 0:   # on CPU the loader would compete with the training threads for the cores
        workers = 0 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 2) // d.local_world - 1))
    total = cfg.epochs * n_batches
    writer = _tensorboard(run_dir) if main else None
    bar = _progress(total, state["step"], main and cfg.progress and not state.get("finished"))
    step_losses: List[Tuple[int, float]] = []
    stopped, error = "done", None
    start = time.time() - state["elapsed"]
    running = None

    def elapsed() -> float:
        # time decides the lr schedule and the budget: every rank must decide alike, so rank 0's clock
        e = time.time() - start
        return distributed.from_main([e], d, device)[0] if d.enabled and cfg.max_minutes else e

    saved_step = [state["step"] if resume and has_checkpoint(run_dir) else -1]

    def checkpoint(best=False):
        if not _finite_weights(model):
            raise NonFiniteLoss(f"the weights stopped being finite after step {state['step']}")
        saved_step[0] = state["step"]
        if not main:
            return
        state["elapsed"] = time.time() - start
        state["trained"] = _trained_info(cfg, state)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        save_checkpoint(run_dir, model, opt, None, state, keep=cfg.keep_checkpoints, best=best)

    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    ctrl_c = _StopRequest(main)
    in_step = False   # True from a step's forward until its counters are updated
    if cfg.max_steps and state["step"] >= cfg.max_steps and not state.get("finished"):
        stopped = "max_steps"   # e.g. --resume --max-steps 3 at step 5: not one more step
    try:
        ctrl_c.install()
        while state["epoch"] < cfg.epochs and not state.get("finished") and stopped == "done":
            epoch = state["epoch"]
            if cfg.data == "synth" and cfg.fresh_data:
                train_ds.set_epoch(epoch)
            batches = _epoch_batches(cfg, len(train_ds), epoch)[state["batch"]:]
            loader = DataLoader(_SeededSamples(train_ds, cfg.seed, epoch),
                                batch_sampler=distributed.shard_batches(batches, d),
                                num_workers=workers, pin_memory=device.type == "cuda",
                                worker_init_fn=_ignore_sigint)
            net.train()
            for batch in loader:
                if ctrl_c.requested and not d.enabled:   # (ranks decide together, below)
                    stopped = "interrupted"
                    break
                in_step = True
                now = elapsed()
                _set_lr(opt, cfg, state, now)
                comp, mask, real = (batch[k].to(device, non_blocking=True) for k in ("comp", "mask", "real"))
                with autocast():
                    out = net(comp, mask)
                loss = fmse_loss(out.float(), real, mask, cfg.a_min)
                if cfg.inject_nan_step and state["step"] + 1 == cfg.inject_nan_step:
                    loss = loss * float("nan")
                # the global batch's loss (mean of the equal slices), checked before it can reach the weights
                # with the Ctrl-C flags: every rank finishes this step and stops after it alike
                value, stop_any = distributed.mean_across([float(loss.detach()), float(ctrl_c.requested)],
                                                          d, device)
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"the loss became {value} at step {state['step'] + 1} (epoch {epoch + 1})")
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                state["step"] += 1
                state["batch"] += 1
                state["loss_sum"] += value
                state["loss_count"] += 1
                in_step = False
                step_losses.append((state["step"], value))
                running = value if running is None else 0.95 * running + 0.05 * value
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{running:.4f}")
                if stop_any > 0 or (ctrl_c.requested and not d.enabled):
                    stopped = "interrupted"
                    break
                if cfg.max_steps and state["step"] >= cfg.max_steps:
                    stopped = "max_steps"
                    break
                if cfg.max_minutes and now > 60 * cfg.max_minutes:
                    stopped = "time"
                    break
            if stopped in ("max_steps", "interrupted"):
                break
            # epoch end (or the time budget ran out inside it: log it as the last epoch)
            record = {"epoch": epoch + 1, "step": state["step"],
                      "loss": state["loss_sum"] / max(1, state["loss_count"]),
                      "lr": opt.param_groups[0]["lr"], "images": state["loss_count"] * cfg.batch_size,
                      "seconds": round(time.time() - start, 2)}
            state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_count=0)
            if stopped == "time":
                record["stopped"] = "time budget (max_minutes)"
                state["finished"] = True
                state["time_budget"] = True   # --resume --epochs N cannot continue it (_continue_finished)
            elif state["epoch"] >= cfg.epochs:
                state["finished"] = True
            best = False
            if main and cfg.val_every and (record["epoch"] % cfg.val_every == 0 or state.get("finished")):
                record["val_fmse"] = _quick_val(model, select_ds, cfg, device)
                best = record["val_fmse"] < state.get("best_fmse", float("inf"))
                if best:
                    state["best_fmse"] = record["val_fmse"]
            if writer is not None:
                writer.add_scalar("loss/train", record["loss"], state["step"])
                writer.add_scalar("lr", record["lr"], state["step"])
                if "val_fmse" in record:
                    writer.add_scalar("fmse/val", record["val_fmse"], state["step"])
            if main:   # the record goes first: a crash before the checkpoint is undone by _trim_log
                with open(run_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            checkpoint(best)
            if main:   # six images through the model: cheap next to an epoch
                write_samples(model, val_ds, device, run_dir, writer=writer, step=state["step"])
                bar.write(f"epoch {record['epoch']}/{cfg.epochs}: loss {record['loss']:.4f}, "
                          f"{record['seconds']:.0f} s")
            distributed.wait_for_main(d)   # rank 0's validation and checkpoint may take long
            retuned = _retune_threads(core_meter)
            if retuned and main:
                bar.write(retuned)
        if stopped in ("max_steps", "interrupted"):   # at a step boundary: exact for --resume
            _save_if_new(checkpoint, saved_step, state)
            distributed.wait_for_main(d)   # no rank exits (status 1) while rank 0 still saves
    except NonFiniteLoss as exc:
        stopped = "nan"
        try:   # what --resume continues from
            last = resolve_checkpoint(run_dir, prefer="latest").parent
        except CheckpointError:
            last = None
        error = (f"{exc}; stopped without saving. "
                 + (f"The last good checkpoint is {last}: fix the cause (e.g. a lower --lr, --amp bf16 "
                    f"instead of fp16) and continue with --resume" if last else "No checkpoint had been written."))
    except KeyboardInterrupt:
        # a second Ctrl-C (or one this process could not catch): inside a step, part of it may
        # already be in the weights, BatchNorm statistics or Adam moments, so nothing is saved
        stopped = "interrupted"
        if in_step:
            if main:
                print(f"\ninterrupted inside step {state['step'] + 1}: not saved (a partial step would make "
                      f"--resume inexact)", file=sys.stderr, flush=True)
        else:
            _save_if_new(checkpoint, saved_step, state)
    finally:
        ctrl_c.restore()
        bar.close()
        if writer is not None:
            writer.close()
    if stopped == "interrupted" and main:
        try:
            last = resolve_checkpoint(run_dir, prefer="latest").parent.name
        except CheckpointError:
            last = "none yet"
        print(f"\ninterrupted at step {state['step']} (last checkpoint: {last}); continue with: "
              f"python -m regharm_ext.train --out {run_dir} --resume", file=sys.stderr, flush=True)

    val = None
    # a finished run resumed with nothing left to train keeps its table
    revalidate = not (was_finished and (run_dir / "val.json").is_file())
    if stopped in ("done", "time") and cfg.validate and main and revalidate:
        # the table describes what --checkpoint RUN_DIR loads: the best checkpoint when there is one
        weights = resolve_checkpoint(run_dir)
        load_weights(model, weights)
        val = final_validation(model, val_ds, cfg, device, run_dir, weights.parent.name)
    return {"run_dir": str(run_dir), "state": state, "step_losses": step_losses, "val": val,
            "stopped": stopped, "error": error}


# --------------------------------------------------------------------------- CLI
def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_parser(f: dataclasses.Field):
    """(argparse kwargs) for a TrainConfig field, from its annotation."""
    ann = str(f.type)
    if "Tuple[int" in ann:
        def ints(text):
            text = text.strip()
            return tuple(int(v) for v in text.replace(",", " ").split()) if text and text != "none" else ()
        return dict(type=ints, metavar="N,N")
    if "Tuple[str" in ann:
        def names(text):   # "A,B", "A, B" or "A B"; none/all (or nothing) = every one present
            items = tuple(text.replace(",", " ").split())
            return None if not items or (len(items) == 1 and items[0].lower() in ("none", "all")) else items
        return dict(type=names, metavar="A,B")
    if ann == "bool":   # "--deterministic" alone means true
        return dict(type=_parse_bool, metavar="BOOL", nargs="?", const=True)
    if ann == "int":
        return dict(type=int)
    if ann == "float":
        return dict(type=float)
    if "Optional[str]" in ann:
        return dict(type=lambda t: None if t.lower() == "none" else t)
    return dict(type=str)


HELP = {
    "variant": "base, rbase, rbase+ltl, rbase+sa, rbase+adain, rbase+ptl, rbase+ltl+ptl",
    "width": "channel multiplier (Table 5)",
    "base_channels": "stem channels at width 1 (32 = the 8.8 M paper-size model)",
    "ltl_levels": "LTL decoder levels by their size at a 256² input: 16, 32, 64",
    "input_size": "training resolution (multiple of 32)",
    "backend": "op backend: reference, torch, native, triton (none = fastest available)",
    "data": "synth (embedded photos) or iharmony4 (--data-root)",
    "subsets": "iHarmony4 subsets, comma-separated (none = all present)",
    "images_per_epoch": "images per epoch (0 = iharmony4: the whole training list; synth: 2000)",
    "fresh_data": "synth: new composites every epoch",
    "val_images": "validation images for the final table (0 = all)",
    "lr_milestones": "epochs after which lr *= lr_gamma",
    "a_min": "A_min of the loss (Eq. 8)",
    "threads": "CPU threads (0 = the idle cores)",
    "num_workers": "DataLoader processes (-1 = auto)",
    "max_steps": "stop after this global step, as an interruption (0 = no limit)",
    "max_minutes": "training time budget, then validate (0 = none); lr milestones also pass by time",
    "validate": "print and save the final table",
    "val_every": "score val_subset images every N epochs and keep the best checkpoint (0 = never); "
                 "scored on images the final table does not use (iharmony4: needs --holdout)",
    "holdout": "iharmony4: at least this many training composites kept out of training, whole "
               "real images at a time, on which --val-every scores (the test split never picks a "
               "checkpoint)",
    "amp": "mixed precision: bf16, fp16 (with a gradient scaler) or none",
    "deterministic": "deterministic algorithms and thread count: a resumed run's losses equal an "
                     "uninterrupted run's (exactly on CPU)",
    "memory_format": "weights' layout: auto (channels_last on CPU, where oneDNN's convolutions run "
                     "faster; contiguous on GPU), channels_last or contiguous",
    "inject_nan_step": "for tests: make the loss of this global step NaN (0 = never)",
    "device": "auto, cpu, cuda (under torchrun each process takes cuda:LOCAL_RANK)",
}


def _show(v) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "none"
    return str(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m regharm_ext.train",
                                description="Train the harmonizer (every config field is an option).")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="demo (default: embedded data, ≤ 15 min on 2 CPU cores), paper (SPEC §6 "
                        "recipe on iHarmony4, needs --data-root) or smoke (seconds)")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (default: the newest "
                                                         "runs/<preset>-*) from its latest checkpoint")
    presets = {n: preset_config(n) for n in ("demo", "paper", "smoke")}   # checked once, not per field
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        kw = _field_parser(f)
        defaults = ", ".join(f"{n} {_show(getattr(c, f.name))}" for n, c in presets.items())
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                       help=f"{HELP.get(f.name, '')} [{defaults}]".strip(), **kw)
    return p


def _newest_run(preset: str) -> Path:
    runs = sorted(Path("runs").glob(f"{preset}-*"))
    if not runs:
        raise ConfigError(f"--resume: no runs/{preset}-* directory here; pass --out RUN_DIR")
    return runs[-1]


def _new_run_dir(preset: str) -> Path:
    """runs/<preset>-<time>, with -2, -3, ... when that is taken: the main process claims it by
    creating it (two runs started in the same second get two directories; main() removes it
    again, empty, when the run fails before writing anything)."""
    base = Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not distributed.from_env().is_main:
        return base   # only the main process writes a new run
    if base.parent.exists() and not base.parent.is_dir():
        raise ConfigError(f"{base.parent} here is a file, not a folder: the default run directory "
                          f"{base} cannot be made; pass --out")
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot create the run directory {path} ({exc.strerror or exc}); "
                              f"pass --out") from None
        _CLAIMED.append(path)
        return path
    raise ConfigError(f"no free run directory {base}-N in runs/; pass --out")


_CLAIMED: List[Path] = []   # default run directories this process made


def _resume_config(run_dir: Path, preset: Optional[str], overrides: Dict[str, Any]) -> TrainConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume: {path} not found (is {run_dir} a run directory?)")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: cannot read {path}: {exc}") from None
    if not isinstance(saved, dict) or saved.get("preset") not in PRESETS:
        raise ConfigError(f"--resume: {path} is not a run configuration (no known 'preset')")
    if preset is not None and preset != saved.get("preset"):
        raise ConfigError(f"--resume: {run_dir} is a {saved.get('preset')!r} run, not {preset!r}")
    base = preset_config(saved["preset"])
    values = dict(saved)
    for name in RUN_CONTROL - INHERITED:
        values[name] = getattr(base, name)      # run control is not inherited, e.g. max_steps
    cfg = _make(values)
    for name, v in overrides.items():
        if name not in RUN_CONTROL and v != getattr(cfg, name):
            raise ConfigError(f"--resume: cannot change {name} of an existing run "
                             f"({getattr(cfg, name)!r} -> {v!r}); start a new run instead")
        setattr(cfg, name, v)
    return _make(dataclasses.asdict(cfg))


def _cli_config(args, overrides: Dict[str, Any]) -> Tuple[TrainConfig, Path]:
    """The checked config and run directory of a command line (ConfigError when unusable)."""
    try:
        if args.resume:
            run_dir = Path(args.out) if args.out else _newest_run(args.preset or "demo")
            cfg = _resume_config(run_dir, args.preset, overrides)
        else:
            preset = args.preset or "demo"
            cfg = preset_config(preset, **overrides)
            run_dir = Path(args.out) if args.out else _new_run_dir(preset)
            # a default directory was just claimed (rank 0) or is not this rank's to write (the
            # others name it by their own clock, without rank 0's -2 suffix): --out only
            if args.out and _holds_run(run_dir):
                raise ConfigError(f"{run_dir} already holds a run; use --resume to continue it or another --out")
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:   # e.g. the model's own checks of a field
        raise ConfigError(f"bad configuration: {one_line(exc)}") from exc
    _refuse_ignored(cfg, overrides)
    _check_out(run_dir)
    return cfg, run_dir


def _refuse_ignored(cfg: TrainConfig, overrides: Dict[str, Any]) -> None:
    # an option that would change nothing is a mistake the user should hear about
    if "data_root" in overrides and cfg.data_root is not None and cfg.data != "iharmony4":
        raise ConfigError(f"--data-root is used by --data iharmony4 only; this run's data is {cfg.data!r} "
                          f"(use --preset paper or --data iharmony4, or drop --data-root)")
    if "ltl_levels" in overrides and parse_variant(cfg.variant)[1] is None:
        raise ConfigError(f"--ltl-levels applies to variants with ltl or sa; {cfg.variant!r} has neither "
                          f"(drop --ltl-levels or pick e.g. --variant rbase+ltl+ptl)")
    for name, data in (("subsets", "iharmony4"), ("augment", "iharmony4"), ("fresh_data", "synth")):
        if name in overrides and cfg.data != data:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} is used by --data {data} only; this run's data is {cfg.data!r} "
                              f"(drop {flag})")
    if "lr_gamma" in overrides and not cfg.lr_milestones:
        raise ConfigError("--lr-gamma multiplies the lr at --lr-milestones, and this run has none "
                          "(add --lr-milestones E1,E2 or drop --lr-gamma)")
    if "val_subset" in overrides and cfg.val_subset and not cfg.val_every:
        raise ConfigError("--val-subset sizes the scores of --val-every, which this run does not take "
                          "(add --val-every N, or drop --val-subset; the final table's size is --val-images)")


def _elastic_restart(args) -> bool:
    """Under ``torchrun --max-restarts N``, a restart after a failed rank continues the run in
    ``--out`` (as ``--resume`` would) instead of refusing a directory that holds a run; the
    first attempt starts it. Sets ``args.resume``; True when it did."""
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if args.resume or not args.out or not restarts.isdigit() or int(restarts) == 0:
        return False
    if not (Path(args.out) / "config.json").is_file():
        return False   # the failure came before the run was written: start it afresh
    args.resume = True
    return True


def main(argv=None) -> int:
    """Exit status: 0 done, 1 stopped early (interrupted, --max-steps; 0 under torchrun
    --max-restarts, which restarts a job on 1), 2 bad input or configuration (one-line
    message), 3 stopped on a non-finite loss."""
    from .data.image_file import ImageFileError
    from .data.iharmony4 import DataError

    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("preset", "out", "resume")}
    if _elastic_restart(args) and distributed.from_env().is_main:
        print(f"torchrun restarted the job: resuming {args.out}", flush=True)
    t0, run_dir = time.time(), None
    try:
        cfg, run_dir = _cli_config(args, overrides)
        result = train(cfg, run_dir, resume=args.resume)
    except (ConfigError, DataError, ImageFileError, CheckpointError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:   # outside the training loop (set-up, the final table): no traceback
        written = run_dir is not None and (run_dir / "config.json").is_file()
        where = f"; continue with: python -m regharm_ext.train --out {run_dir} --resume" if written else ""
        print(f"\ninterrupted{where}", file=sys.stderr, flush=True)
        return 1
    finally:
        for path in _CLAIMED:   # a default run directory that nothing was written into
            with contextlib.suppress(OSError):
                path.rmdir()
        _CLAIMED.clear()
    if result["stopped"] == "nan":
        if distributed.from_env().is_main:
            print(f"error: {result['error']}", file=sys.stderr, flush=True)
        return 3
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    # a stop asked for (--max-steps, Ctrl-C, SIGTERM) under torchrun --max-restarts: a non-zero
    # status would make torchrun restart the job, which resumes and goes on past the stop
    elastic = restarts.isdigit() and int(restarts) > 0
    if distributed.from_env().is_main:
        note = (" (exit status 0: torchrun --max-restarts would restart the job on 1)"
                if elastic and result["stopped"] in ("max_steps", "interrupted") else "")
        print(f"{result['stopped']}: step {result['state']['step']}, {time.time() - t0:.0f} s in this process; "
              f"run directory {run_dir}{note}", flush=True)
    return 0 if result["stopped"] in ("done", "time") or elastic else 1


if __name__ == "__main__":
    sys.exit(main())
