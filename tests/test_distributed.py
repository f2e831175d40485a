"""Data-parallel helpers (regharm_ext/distributed.py): batch sharding through DistributedSampler,
BatchNorm with global-batch statistics on CPU (Gloo), and DDP steps equal to one process's steps
on the whole global batch. Multi-process cases run 2 spawned CPU processes with Gloo."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from regharm_ext import distributed as D


def test_single_process_is_a_no_op(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    d, dev = D.setup("cpu")
    assert (d.world, d.rank, d.enabled, d.is_main, dev.type) == (1, 0, False, True, "cpu")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert D.wrap(model, d, dev) is model and D.unwrap(model) is model
    assert D.mean_across([1.5, 2.0], d, dev) == [1.5, 2.0]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(SystemExit, match="inconsistent torchrun environment"):
        D.from_env()


def test_shards_of_a_global_batch_are_that_batch():
    batches = [[7, 3, 9, 1], [0, 5, 2, 8], [6, 4, 11, 10]]
    assert D.shard_batches(batches, D.Dist()) == batches
    shards = [D.shard_batches(batches, D.Dist(rank=r, world=2)) for r in range(2)]
    assert shards[0] == [[7, 9], [0, 2], [6, 11]] and shards[1] == [[3, 1], [5, 8], [4, 10]]
    four = [D.shard_batches(batches, D.Dist(rank=r, world=4)) for r in range(4)]
    for k, b in enumerate(batches):
        assert sorted(i for s in four for i in s[k]) == sorted(b) and all(len(s[k]) == 1 for s in four)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        D.shard_batches(batches, D.Dist(rank=0, world=3))


# --------------------------------------------------------------------------- 2-process checks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return D.setup("cpu")


def _run(fn, world: int, *args):
    mp.start_processes(fn, args=(world, _free_port()) + args, nprocs=world, start_method="spawn", join=True)


def _bn_check(rank, world, dev, out):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6) * 3 + 10               # the global batch; this rank takes its half
    bn = D.sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), dev)[0]
    assert isinstance(bn, D.CpuSyncBatchNorm)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    mine = x[rank::world].clone().requires_grad_(True)
    y = bn(mine)
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    save_file({"y": y.detach(), "gx": mine.grad, "gw": bn.weight.grad, "gb": bn.bias.grad,
               "rm": bn.running_mean, "rv": bn.running_var}, str(Path(out) / f"bn{rank}.safetensors"))


def _check_batchnorm(tmp_path):
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 6) * 3 + 10).requires_grad_(True)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    y = bn(x)
    parts = [load_file(str(tmp_path / f"bn{r}.safetensors")) for r in range(2)]
    weights = torch.empty_like(y)
    for r in range(2):   # each rank's loss weights were laid out over its own half
        weights[r::2] = torch.arange(parts[r]["y"].numel()).view_as(parts[r]["y"]).sin()
    (y * weights).sum().backward()
    for r in range(2):
        torch.testing.assert_close(parts[r]["y"], y[r::2].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parts[r]["gx"], x.grad[r::2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(parts[r]["rm"], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(parts[r]["rv"], bn.running_var, rtol=1e-5, atol=1e-6)
    # parameter gradients: each rank holds its share; DDP sums (averages) them
    torch.testing.assert_close(parts[0]["gw"] + parts[1]["gw"], bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parts[0]["gb"] + parts[1]["gb"], bn.bias.grad, rtol=1e-4, atol=1e-5)


def _steps(model, opt, batches, comp, mask, real):
    from regharm_ext.losses import fmse_loss
    for b in batches:
        loss = fmse_loss(model(comp[b], mask[b]), real[b], mask[b])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _ddp_data():
    from regharm_ext.model import Harmonizer
    g = torch.Generator().manual_seed(1)
    comp, real = torch.rand(8, 3, 64, 64, generator=g), torch.rand(8, 3, 64, 64, generator=g)
    mask = (torch.rand(8, 1, 64, 64, generator=g) > 0.6).float()
    torch.manual_seed(0)
    model = Harmonizer("rbase+ltl+ptl", input_size=64, base_channels=4)
    return model, comp, mask, real, [[0, 5, 2, 7], [6, 1, 3, 4]]


def _worker(rank, world, port, out):
    d, dev = _join(rank, world, port)
    try:
        _bn_check(rank, world, dev, out)
        model, comp, mask, real, batches = _ddp_data()
        ddp = D.wrap(model, d, dev)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        _steps(ddp, opt, D.shard_batches(batches, d), comp, mask, real)
        if d.is_main:
            save_file({k: v.contiguous() for k, v in D.unwrap(ddp).state_dict().items()},
                      str(Path(out) / "ddp.safetensors"))
        _resumed_states(d, dev, out)
    finally:
        D.cleanup()


def _resumed_states(d, dev, out):
    """Every rank checks that all resumed the same state: alike, nothing is said; a rank that
    found another checkpoint (a node without the shared run directory) stops every rank."""
    from regharm_ext.checkpoint import CheckpointError
    from regharm_ext.train import _same_state_everywhere

    same = {"step": 8, "epoch": 4, "batch": 0}
    _same_state_everywhere(same, Path(out), d, dev)
    try:
        _same_state_everywhere(dict(same, step=8 if d.is_main else 0), Path(out), d, dev)
        said = "nothing"
    except CheckpointError as exc:
        said = str(exc)
    (Path(out) / f"resumed{d.rank}.txt").write_text(said)


def test_two_gloo_processes_sync_batchnorm_and_ddp_steps(tmp_path):
    """One spawn of 2 processes (spawning costs seconds) checks both: CpuSyncBatchNorm equals
    BatchNorm2d on the global batch (outputs, input and parameter gradients, running stats), and
    2 DDP Adam steps of a Harmonizer on sharded global batches equal one process's steps; and
    that ranks which resumed different states all stop, naming the shared-file-system rule."""
    _run(_worker, 2, str(tmp_path))
    _check_batchnorm(tmp_path)
    for rank in range(2):   # (and the resume check of train._same_state_everywhere)
        said = (tmp_path / f"resumed{rank}.txt").read_text()
        assert said.startswith(f"the processes resumed from different checkpoints (rank 0 at step 8, "
                               f"rank {rank} at step {8 if rank == 0 else 0})"), said
        assert "on a file system that every node shares" in said
    model, comp, mask, real, batches = _ddp_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _steps(model, opt, batches, comp, mask, real)
    got = load_file(str(tmp_path / "ddp.safetensors"))
    ref = model.state_dict()
    assert set(got) == set(ref), "checkpoint keys are the plain model's"
    worst = max(float((got[k].double() - ref[k].double()).abs().max()) for k in ref)
    print(f"largest weight difference after 2 DDP steps: {worst:.2e}")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)


# --------------------------------------------------------------------------- torchrun end to end
LR = 3e-5   # the torchrun tests' learning rate: see the next test's docstring


def test_torchrun_two_gloo_processes_match_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m regharm_ext.train` (Gloo on CPU) stops after 4 steps; the
    run, resumed by one process, logs the losses of an uninterrupted single-process run and ends
    with its weights (float tolerance): the global batch, not the process count, sets the result.

    The variant is ``rbase``: in LTL/PTL a few biases (attention key/value/output biases, PTL's
    bias) have identically zero gradients, so Adam turns their rounding noise into updates of up
    to ~lr. The learning rate is ``LR`` (3e-5, not smoke's 3e-3): while a component's second
    moment is still tiny Adam moves it by ~±lr whatever its size, so at 3e-3 any two runs that
    round differently (2 processes or 1, another CPU) part within 4 steps. Measured on an Intel
    AVX-512 host: weights perturbed by 1e-6 at the start moved the step-3 gradients by 10 % (median)
    at lr 3e-3 and by 0.02 % at 3e-5, and the 2-process run's losses there were 1.7e-3 away from
    one process's by epoch 3 (an AMD host had agreed to 1e-5); at 3e-5 they agree to 1e-7 and the
    final weights to 1e-7 of the training update."""
    import json
    import subprocess
    import sys

    from regharm_ext.checkpoint import load_model
    from regharm_ext.train import build_model, preset_config, train

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    run = tmp_path / "ddp"
    cfg = dict(epochs=3, validate=False, variant="rbase", lr=LR)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "regharm_ext.train", "--preset", "smoke", "--out", str(run), "--epochs", "3",
         "--variant", "rbase", "--lr", str(LR), "--max-steps", "4", "--validate", "false",
         "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr          # 1: stopped early (--max-steps)
    assert proc.stdout.count("2 processes (gloo)") == 1, "rank 0 alone prints"
    assert json.loads((run / "latest.json").read_text())["step"] == 4

    rest = train(preset_config("smoke", **cfg), run, resume=True)
    ref = train(preset_config("smoke", **cfg), tmp_path / "one")
    assert rest["stopped"] == ref["stopped"] == "done"
    logs = [[json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()]
            for d in (run, tmp_path / "one")]
    print("epoch losses, 2 processes then 1:", logs[0], "\none process:", logs[1])
    assert logs[0] == pytest.approx(logs[1], rel=1e-5, abs=0)
    torch.manual_seed(0)
    init = build_model(preset_config("smoke", **cfg)).state_dict()
    got, want = load_model(run)[0].state_dict(), load_model(tmp_path / "one")[0].state_dict()
    floats = [k for k in want if want[k].is_floating_point()]
    diff = sum(float(((got[k].double() - want[k].double()) ** 2).sum()) for k in floats) ** 0.5
    moved = sum(float(((want[k].double() - init[k].double()) ** 2).sum()) for k in floats) ** 0.5
    worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in floats)
    print(f"final weights: |2-process - 1-process| / |training update| = {diff / moved:.1e}, "
          f"largest difference {worst:.1e}")
    assert set(got) == set(want) and diff < 1e-3 * moved


def _torchrun(tmp_path, args, extra_env, torchrun_args=()):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", **extra_env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *torchrun_args, str(repo / "tests" / "train_with_faults.py"), "--preset", "smoke",
           "--validate", "false", "--device", "cpu", *args]
    # its own session, killed whole on a timeout: subprocess.run's timeout kills torchrun alone
    # and leaves its workers running (a hung one stayed behind, competing with later tests)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 300 s:\n{out}{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_torchrun_ranks_wait_for_rank_0s_validation_and_last_save(tmp_path):
    """Rank 0 alone validates and saves. With step collectives that time out after 4 s and a rank 0
    that takes 8 s more per validation and per save, the job still runs: the other rank waits at
    a barrier of its own (no collective times out), and at --max-steps it leaves only after rank
    0's checkpoint is complete (torchrun kills the rest of a job when one rank exits 1: rank 0
    used to be killed mid-save, leaving latest.json at the step before)."""
    import json

    run = tmp_path / "slow"
    proc = _torchrun(tmp_path, ["--out", str(run), "--epochs", "3", "--val-every", "1",
                                "--max-steps", "3"], {"FAULT_SLOW_MAIN": "8"})
    assert proc.returncode == 1, proc.stdout + proc.stderr           # 1: stopped at --max-steps
    assert "max_steps: step 3" in proc.stdout, proc.stdout + proc.stderr   # rank 0 finished
    assert json.loads((run / "latest.json").read_text())["step"] == 3
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]


def test_torchrun_restart_after_a_rank_dies_resumes_the_run(tmp_path):
    """`torchrun --max-restarts 1` with one command: rank 1 dies at its third step (after the
    epoch-1 checkpoint); the restarted job resumes the run in --out (it used to refuse: "already
    holds a run; use --resume") and finishes it."""
    import json

    run = tmp_path / "restart"
    proc = _torchrun(tmp_path, ["--out", str(run), "--epochs", "3"], {"FAULT_KILL_RANK1_AT": "3"},
                     torchrun_args=("--max-restarts", "1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"torchrun restarted the job: resuming {run}" in proc.stdout
    assert json.loads((run / "latest.json").read_text())["step"] == 6
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_torchrun_two_gpus_nccl_match_one_gpu(tmp_path):
    """On 2 GPUs: the NCCL job (SyncBatchNorm, DDP) logs the losses of a one-GPU run."""
    import json
    import subprocess
    import sys

    from regharm_ext.train import preset_config, train

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "regharm_ext.train", "--preset", "smoke", "--out", str(tmp_path / "ddp"), "--epochs", "3",
         "--variant", "rbase", "--lr", str(LR), "--validate", "false", "--device", "cuda"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("2 processes (nccl)") == 1
    train(preset_config("smoke", epochs=3, validate=False, variant="rbase", lr=LR, device="cuda"),
          tmp_path / "one")
    logs = [[json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("ddp", "one")]
    assert logs[0] == pytest.approx(logs[1], rel=1e-3)


def test_a_non_zero_rank_does_not_judge_rank_0s_default_run_directory(tmp_path, monkeypatch):
    """Without --out, rank 0 claims runs/<preset>-<time> (or -2 when taken); another rank names
    it by its own clock, without the suffix, and refused a taken name ("already holds a run"),
    which killed the job. It writes nothing to a new run, so it does not check."""
    from regharm_ext import train as tr

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tr.time, "strftime", lambda fmt, *a: "20260101-000000")
    taken = tmp_path / "runs" / "smoke-20260101-000000"
    taken.mkdir(parents=True)
    (taken / "config.json").write_text("{}")
    args = tr.build_parser().parse_args(["--preset", "smoke"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert tr._cli_config(args, {})[1] == Path("runs/smoke-20260101-000000")
    monkeypatch.setenv("RANK", "0")
    assert tr._cli_config(args, {})[1] == Path("runs/smoke-20260101-000000-2")


def test_torchrun_with_restarts_stops_where_asked(tmp_path):
    """--max-steps under `torchrun --max-restarts N`: the job ends there (exit status 0, said in
    the last line); on 1 torchrun restarted it, and the restart resumed past the stop."""
    import json

    run = tmp_path / "stop"
    proc = _torchrun(tmp_path, ["--out", str(run), "--epochs", "4", "--max-steps", "3"], {},
                     torchrun_args=("--max-restarts", "2"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max_steps: step 3" in proc.stdout and "torchrun --max-restarts would restart" in proc.stdout
    assert "restarted the job" not in proc.stdout
    assert json.loads((run / "latest.json").read_text())["step"] == 3
