"""Data-parallel training across processes, GPUs and nodes with PyTorch's own engine (torchrun).

One process per device, launched by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT)::

    torchrun --standalone --nproc_per_node=N -m regharm_ext.train ...              # one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29400 --rdzv_id=JOB -m regharm_ext.train ...        # on every node

Backend NCCL on GPUs (each process takes ``cuda:LOCAL_RANK``), Gloo on CPUs. Started without
torchrun (no WORLD_SIZE, or WORLD_SIZE=1) everything here is a no-op and training runs in one
process.

Same results as one process for the same global batch: every global batch (of ``batch_size``
images, in the run's seeded, resumable order) is split into equal slices, one per rank, by a
:class:`~torch.utils.data.DistributedSampler` over that order; DDP averages the gradients of the
per-rank mean losses, which is the gradient of the global mean; and BatchNorm uses the statistics
of the global batch (``nn.SyncBatchNorm`` on GPUs, :class:`CpuSyncBatchNorm` on CPUs, since
PyTorch's SyncBatchNorm only runs on GPUs). Only float rounding differs.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DistributedSampler


# Rank 0 alone validates, writes samples and saves checkpoints; the other ranks wait for it at
# wait_for_main, on a Gloo group of their own whose timeout is long enough for a validation of
# the whole iHarmony4 test split on CPUs (7404 images at 0.3 s each, measured for the paper's
# model at 256² on one thread: ~40 min). The job's own collectives keep the usual timeout, which
# still catches a hung step.
PATIENT_TIMEOUT = datetime.timedelta(hours=24)
_patient = None


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job. ``world == 1``: a plain single-process run."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, prints, validates and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise SystemExit(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def from_env() -> Dist:
    """The job layout from torchrun's environment variables (no process group is started)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise SystemExit(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, "
                         f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world}")
    return Dist(rank, world, local_rank, local_world)


def setup(device: str = "auto", timeout_minutes: float = 30.0) -> "tuple[Dist, torch.device]":
    """Join the job torchrun started (if any) and pick this process's device.

    ``device``: "auto" (a GPU when there is one, else the CPU), "cpu", "cuda" or "cuda:N". Under
    torchrun with GPUs each process takes ``cuda:LOCAL_RANK``; an explicit "cuda:N" is refused
    there (it would put several processes on one GPU). Returns (Dist, torch.device)."""
    d = from_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("device 'cuda' asked for, but PyTorch sees no CUDA GPU (use --device cpu)")
        if d.enabled:
            if dev.index is not None:
                raise SystemExit(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; "
                                 f"pass --device cuda (or auto)")
            if d.local_rank >= torch.cuda.device_count():
                raise SystemExit(f"LOCAL_RANK {d.local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                                 f"use --nproc_per_node={torch.cuda.device_count()} or fewer")
            dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev if dev.index is not None else torch.device("cuda", 0))
    if not d.enabled:
        return d, dev
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        kwargs = dict(timeout=timeout, **_restart_store(d, timeout))
        if backend == "nccl":
            kwargs["device_id"] = dev   # binds the communicator to this GPU (torch >= 2.3)
        try:
            dist.init_process_group(backend, **kwargs)
        except TypeError:               # older torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(backend, **kwargs)
    global _patient
    if _patient is None:   # a collective: every rank creates it here, none waits on rank 0 yet
        _patient = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
    return Dist(d.rank, d.world, d.local_rank, d.local_world, backend), dev


def _restart_store(d: Dist, timeout: datetime.timedelta) -> dict:
    """On a torchrun restart (``--max-restarts``), init_process_group's arguments for a store of
    this attempt's own: the workers share the agent's store, which outlives an attempt, and the
    process groups' keys carry no attempt number, so a new attempt could read the dead one's
    addresses ("Gloo connectFullMesh failed ... Connection refused": seen in about half the
    restarts here). Empty on a first attempt and outside torchrun."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt in ("", "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), d.world,
                          is_master=False, timeout=timeout)
    return dict(store=dist.PrefixStore(f"regharm/attempt-{attempt}", store), rank=d.rank,
                world_size=d.world)


def cleanup() -> None:
    """Leave the process group (end of training, also after an error)."""
    global _patient
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _patient = None


# --------------------------------------------------------------------------- data
class _Positions(torch.utils.data.Dataset):
    """Only a length: DistributedSampler hands out positions 0..n-1 of the epoch's order."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def shard_batches(batches: Sequence[Sequence[int]], d: Dist) -> List[List[int]]:
    """This rank's slice of each global batch.

    ``batches`` are the global batches of an epoch in order (equal sizes B, divisible by the
    world size). A DistributedSampler (no shuffling: the order is already the run's seeded one,
    which also lets a resumed run start mid-epoch) deals the positions of the flattened order to
    the ranks round-robin, so local batch k of rank r holds global batch k's images r, r + W, ...:
    the ranks' local batches k together are exactly global batch k."""
    if not batches:
        return []
    size = len(batches[0])
    if any(len(b) != size for b in batches):
        raise ValueError("global batches must all have the same size")
    if size % d.world:
        raise ValueError(f"batch_size {size} is not divisible by the {d.world} processes; "
                         f"use a multiple of {d.world} (the batch size is the global one)")
    order = [i for b in batches for i in b]
    sampler = DistributedSampler(_Positions(len(order)), num_replicas=d.world, rank=d.rank,
                                 shuffle=False, drop_last=True)
    mine = [order[p] for p in sampler]
    per = size // d.world
    return [mine[i:i + per] for i in range(0, len(mine), per)]


# --------------------------------------------------------------------------- model
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the gradients (every rank's loss
    depends on the sum). torch.distributed.nn.functional.all_reduce does the same but is
    deprecated in recent PyTorch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone()
        dist.all_reduce(g)
        return g


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training under a process group of several ranks, normalizes with the
    statistics of the whole global batch (all ranks), like ``nn.SyncBatchNorm`` (GPU-only in
    PyTorch) but through Gloo on any device. Same parameters and buffers as BatchNorm2d, so
    checkpoints are interchangeable; otherwise it is plain BatchNorm2d.

    Statistics in float32, two passes (mean, then the mean squared deviation), through a
    differentiable all-reduce so that the backward pass sums the gradient terms across ranks.
    Shapes: x (Tensor[B, C, H, W]) -> Tensor[B, C, H, W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), xf.numel() // c, dtype=torch.float32, device=x.device)
        total = all_reduce(torch.cat([xf.sum((0, 2, 3)), count]))
        n = total[c]
        mean = total[:c] / n
        dev = xf - mean.view(1, c, 1, 1)
        var = all_reduce((dev * dev).sum((0, 2, 3))) / n
        y = dev * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach().to(self.running_var.dtype), alpha=m)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm2d synchronized across ranks (in place where possible):
    ``nn.SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, device=device)
            new.load_state_dict(child.state_dict())
            if child.affine:   # keep the Parameter objects: optimizers may already hold them
                new.weight, new.bias = child.weight, child.bias
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """The model ready for data-parallel training: BatchNorm synchronized, then
    DistributedDataParallel (rank 0's weights broadcast to all). Unchanged when ``world == 1``."""
    if not d.enabled:
        return model
    model = sync_batchnorm(model, device)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (what checkpoints store)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- collectives
def mean_across(values: Sequence[float], d: Dist, device: torch.device) -> List[float]:
    """Means over ranks (e.g. of the per-rank mean losses: the global batch's mean loss, since
    slices are equal). Identity for one process. NaN/Inf on any rank make the mean NaN/Inf, so
    every rank sees a bad loss at the same step."""
    if not d.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / d.world).tolist()


def from_main(values: Sequence[float], d: Dist, device: torch.device) -> List[float]:
    """Rank 0's values on every rank (e.g. the elapsed time that decides time budgets and the
    learning-rate schedule, so that no rank decides differently)."""
    if not d.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def wait_for_main(d: Dist) -> None:
    """Every rank waits here until rank 0 arrives (after its checkpoint and validation), so that
    no rank leaves while rank 0 is still saving: torchrun ends the whole job when one rank
    exits with an error status, and rank 0 would be killed mid-save."""
    if d.enabled:
        dist.barrier(group=_patient)
