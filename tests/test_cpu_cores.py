"""The training's CPU thread count: others' busy cores measured now, not the lagging load average."""
import os
import sys

import pytest
import torch

from regharm_ext import train
from regharm_ext.cpu_cores import CoreMeter, allowed_cores, idle_cores, read_proc_stat, threads_for


class FakeCounters:
    """Per-core (busy, total) ticks, this process's CPU seconds and a clock, advanced by hand."""

    def __init__(self, cores=2):
        self.ticks = {c: [0, 0] for c in range(cores)}
        self.own = 0.0
        self.now = 0.0
        self.readable = True

    def advance(self, seconds, busy_per_core, own_seconds=0.0):
        for c, busy in busy_per_core.items():
            self.ticks[c][0] += int(round(100 * seconds * busy))
            self.ticks[c][1] += int(round(100 * seconds))
        self.own += own_seconds
        self.now += seconds

    def meter(self, cores=None):
        return CoreMeter(cores=cores if cores is not None else sorted(self.ticks),
                         read=lambda: ({c: tuple(v) for c, v in self.ticks.items()}
                                       if self.readable else None),
                         own=lambda: self.own, clock=lambda: self.now)


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cores, busy, per_node, want", [
    (2, 0.0, 1, 2), (2, 0.3, 1, 2), (2, 1.0, 1, 1), (2, 1.8, 1, 1), (2, 7.0, 1, 1),
    (8, 0.0, 2, 4), (8, 3.0, 1, 5), (1, 0.0, 1, 1)])
def test_threads_for_counts_a_core_busy_from_three_quarters(cores, busy, per_node, want):
    assert threads_for(cores, busy, per_node) == want


def test_meter_subtracts_this_process_and_reads_only_its_cores():
    fake = FakeCounters(cores=3)
    meter = fake.meter(cores=[0, 1])
    # 2 s: core 0 full (1 s of it ours), core 1 half busy, core 2 (not ours to use) full
    fake.advance(2.0, {0: 1.0, 1: 0.5, 2: 1.0}, own_seconds=2.0)
    assert meter.others_busy() == pytest.approx(0.5)
    # the next reading covers only the span since this one
    fake.advance(1.0, {0: 0.0, 1: 0.0, 2: 1.0})
    assert meter.others_busy() == pytest.approx(0.0)


def test_meter_says_none_where_the_counters_cannot_be_read():
    fake = FakeCounters()
    fake.readable = False
    meter = fake.meter()
    assert not meter.available
    fake.advance(1.0, {0: 1.0, 1: 1.0})
    assert meter.others_busy() is None


def test_idle_cores_falls_back_to_the_load_average():
    fake = FakeCounters()
    fake.readable = False
    cores, busy, how = idle_cores(window_s=0.0, meter=fake.meter())
    assert cores == 2 and busy >= 0
    assert how == ("1-minute load average" if hasattr(os, "getloadavg") else "no load information")


def test_read_proc_stat_parses_per_core_lines(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 0 10 100 5 0 0 0 0 0\n"
                    "cpu0 6 0 4 50 2 1 1 1 0 0\n"
                    "cpu1 4 0 6 50 3 0 0 0 0 0\n"
                    "intr 12345\nctxt 678\n")
    # busy = user nice system irq softirq steal; total adds idle and iowait
    assert read_proc_stat(str(stat)) == {0: (13, 65), 1: (10, 63)}
    assert read_proc_stat(str(tmp_path / "missing")) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_this_machines_counters_cover_every_allowed_core():
    ticks = read_proc_stat()
    assert ticks is not None
    for core in allowed_cores():
        busy, total = ticks[core]
        assert 0 <= busy <= total


def test_retune_follows_what_others_did_during_the_epoch(keep_threads):
    fake = FakeCounters()
    meter = fake.meter()
    torch.set_num_threads(2)
    fake.advance(60.0, {0: 1.0, 1: 1.0}, own_seconds=60.0)   # another job took a core
    line = train._retune_threads(meter)
    assert torch.get_num_threads() == 1
    assert line == "threads 2 -> 1: other processes kept 1.0 of 2 cores busy"
    fake.advance(60.0, {0: 1.0, 1: 0.0}, own_seconds=60.0)   # it ended
    assert train._retune_threads(meter) == "threads 1 -> 2: other processes kept 0.0 of 2 cores busy"
    fake.advance(60.0, {0: 1.0, 1: 1.0}, own_seconds=120.0)  # ours alone: no change
    assert train._retune_threads(meter) is None
    assert torch.get_num_threads() == 2
    assert train._retune_threads(None) is None


def test_threads_by_hand_and_deterministic_are_not_measured(keep_threads):
    cpu = torch.device("cpu")
    n, meter = train._set_threads(train.preset_config("smoke", threads=1), cpu)
    assert (n, meter, torch.get_num_threads()) == (1, None, 1)
    n, meter = train._set_threads(train.preset_config("smoke", threads=0, deterministic=True), cpu)
    assert meter is None and n == len(allowed_cores())
