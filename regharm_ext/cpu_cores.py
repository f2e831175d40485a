"""How many of this process's CPU cores other processes keep busy, measured now.

The 1-minute load average says what the machine did over the last minutes, not what it does now:
right after ``pip install .`` compiled the extension on both cores of a 2-core machine it still
reads ~1.5-2, and a training run that trusted it took 1 thread for its whole length where 2 were
idle (the demo's steps: 272 ms with 1 thread, 193 ms with 2). :class:`CoreMeter` reads the
kernel's per-core counters (``/proc/stat``, Linux) of the cores this process may run on, and
subtracts this process's own CPU time, so it can also be read while training runs.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

_IDLE_FIELDS = (3, 4)   # idle, iowait in a /proc/stat cpuN line's counters


def allowed_cores() -> Sequence[int]:
    """The cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return list(range(os.cpu_count() or 1))


def read_proc_stat(path: str = "/proc/stat") -> Optional[Dict[int, Tuple[int, int]]]:
    """Per core: (busy, total) clock ticks since boot; None where the file is unreadable."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ticks = {}
    for line in lines:
        name, *values = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        counts = [int(v) for v in values[:8]]   # user nice system idle iowait irq softirq steal
        idle = sum(counts[i] for i in _IDLE_FIELDS if i < len(counts))
        ticks[int(name[3:])] = (sum(counts) - idle, sum(counts))
    return ticks or None


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CoreMeter:
    """Busy cores of others over the span between two readings. ``read`` (``read_proc_stat`` by
    default), ``own`` and ``clock`` are replaceable for tests."""

    def __init__(self, cores: Optional[Sequence[int]] = None,
                 read: Callable[[], Optional[Dict[int, Tuple[int, int]]]] = read_proc_stat,
                 own: Callable[[], float] = _own_cpu_seconds,
                 clock: Callable[[], float] = time.monotonic):
        self.cores = list(cores) if cores is not None else list(allowed_cores())
        self._read, self._own, self._clock = read, own, clock
        self._last = self._sample()

    @property
    def available(self) -> bool:
        """Whether the counters could be read (at construction or the last reading)."""
        return self._last is not None

    def _sample(self):
        ticks = self._read()
        if ticks is None or not all(c in ticks for c in self.cores):
            return None
        busy = sum(ticks[c][0] for c in self.cores)
        total = sum(ticks[c][1] for c in self.cores)
        return busy, total, self._own(), self._clock()

    def others_busy(self) -> Optional[float]:
        """Cores (0 .. len(cores)) that other processes kept busy since the last call (or since
        construction); None where the counters cannot be read. Ticks are shared out in
        proportion to the wall time, so the kernel's tick rate need not be known."""
        now, last = self._sample(), self._last
        self._last = now
        if now is None or last is None:
            return None
        d_busy, d_total = now[0] - last[0], now[1] - last[1]
        d_wall = now[3] - last[3]
        if d_total <= 0 or d_wall <= 0:
            return None
        n = len(self.cores)
        busy = n * d_busy / d_total                 # cores busy on average, ours included
        ours = (now[2] - last[2]) / d_wall          # cores this process kept busy
        return min(float(n), max(0.0, busy - ours))


def idle_cores(window_s: float = 0.5, meter: Optional[CoreMeter] = None) -> Tuple[int, float, str]:
    """(cores, others' busy cores, how it was measured) right now: over ``window_s`` of this
    process sleeping where ``/proc/stat`` can be read, else the 1-minute load average."""
    meter = meter or CoreMeter()
    cores = len(meter.cores)
    if meter.available:
        time.sleep(window_s)
        busy = meter.others_busy()
        if busy is not None:
            return cores, busy, f"/proc/stat over {window_s:g} s"
    try:
        return cores, float(os.getloadavg()[0]), "1-minute load average"
    except (OSError, AttributeError):   # AttributeError: Windows
        return cores, 0.0, "no load information"


def threads_for(cores: int, busy: float, per_node: int = 1) -> int:
    """Threads for one of ``per_node`` training processes given ``busy`` cores of others'. A core
    counts as busy from 0.75 on: more threads than free cores is far slower than fewer, as
    OpenMP workers spin waiting for each other (measured: 2 threads 4x slower than 1 at load 7 on
    2 cores)."""
    free = min(cores, int(cores - busy + 0.75))
    return max(1, free // max(1, per_node))
