"""The training CLI's edges: Ctrl-C stops at a step boundary (the checkpoint equals an
uninterrupted run's at that step), bad settings and run folders are refused on one line with exit
status 2 before anything is written, and --resume with --epochs / --max-steps does what it says."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from regharm_ext import checkpoint as ck
from regharm_ext import train as tr
from regharm_ext.cpu_cores import allowed_cores

SMOKE = ["--preset", "smoke", "--validate", "false"]


def run(*args):
    return tr.main([str(a) for a in args])


def _one_error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --------------------------------------------------------------------------- Ctrl-C
def _interrupt_at_forward(monkeypatch, step: int, action):
    """Calls ``action()`` inside the model's forward of training step ``step`` (a forward hook on
    the first layer: BatchNorm statistics of that step are being updated)."""
    calls = [0]
    build = tr.build_model

    def hooked(cfg):
        model = build(cfg)

        def pre(module, args):
            if model.training:
                calls[0] += 1
                if calls[0] == step:
                    action()
        model.stem.register_forward_pre_hook(pre)
        return model
    monkeypatch.setattr(tr, "build_model", hooked)


def _saved(run_dir):
    cfg = tr.preset_config("smoke")
    model = tr.build_model(cfg)
    opt = torch.optim.Adam(model.parameters())
    state = ck.load_checkpoint(run_dir, model, opt)
    return state, model.state_dict(), opt.state_dict()["state"]


def _assert_same(a, b):
    (sa, ma, oa), (sb, mb, ob) = a, b
    assert sa["step"] == sb["step"]
    assert ma.keys() == mb.keys()
    for k in ma:   # weights and BatchNorm buffers (running stats, num_batches_tracked)
        assert torch.equal(ma[k], mb[k]), k
    assert oa.keys() == ob.keys()
    for i in oa:   # Adam: step count and both moments
        for k in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k])), (i, k)


def test_ctrl_c_mid_forward_saves_the_step_boundary(tmp_path, monkeypatch, capsys):
    """SIGINT inside step 4's forward: step 4 completes, the run stops there (exit 1) and its
    checkpoint equals an uninterrupted run's at step 4; the handler is put back afterwards."""
    cfg = dict(validate=False, epochs=3, deterministic=True)
    tr.train(tr.preset_config("smoke", max_steps=4, **cfg), tmp_path / "ref")
    before = signal.getsignal(signal.SIGINT)
    _interrupt_at_forward(monkeypatch, 4, lambda: os.kill(os.getpid(), signal.SIGINT))
    rc = run(*SMOKE, "--epochs", 3, "--deterministic", "--out", tmp_path / "cut")
    assert rc == 1
    assert "interrupted at step 4" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before
    assert json.loads((tmp_path / "cut" / "latest.json").read_text())["step"] == 4
    _assert_same(_saved(tmp_path / "cut"), _saved(tmp_path / "ref"))


def test_sigterm_mid_forward_saves_the_step_boundary_too(tmp_path, monkeypatch, capfd):
    """SIGTERM (schedulers, `timeout`, `docker stop`) stops like Ctrl-C: at the step boundary,
    with the same checkpoint as an uninterrupted run's (it killed the run, losing the epoch)."""
    cfg = dict(validate=False, epochs=3, deterministic=True)
    tr.train(tr.preset_config("smoke", max_steps=3, **cfg), tmp_path / "ref")
    before = signal.getsignal(signal.SIGTERM)
    _interrupt_at_forward(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert run(*SMOKE, "--epochs", 3, "--deterministic", "--out", tmp_path / "cut") == 1
    err = capfd.readouterr().err   # the handler writes to fd 2 directly
    assert "SIGTERM: stopping after this step" in err and "interrupted at step 3" in err
    assert signal.getsignal(signal.SIGTERM) is before
    _assert_same(_saved(tmp_path / "cut"), _saved(tmp_path / "ref"))


def test_ctrl_c_in_the_final_table_is_one_line(tmp_path, monkeypatch, capsys):
    """Training is saved by then; Ctrl-C while the table is computed prints how to get it
    (--resume recomputes it), not a traceback."""
    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(tr, "final_validation", stop)
    out = tmp_path / "run"
    assert run("--preset", "smoke", "--epochs", 1, "--out", out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"interrupted; continue with: python -m regharm_ext.train --out {out} --resume"]


def test_hard_interrupt_inside_a_step_saves_nothing_of_it(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt inside a step (a second Ctrl-C) cannot finish the step: no checkpoint
    is written, the last one (step 2, end of epoch 1) stays latest and holds step 2 exactly."""
    cfg = dict(validate=False, epochs=3, deterministic=True)
    tr.train(tr.preset_config("smoke", max_steps=2, **cfg), tmp_path / "ref")

    def hard():
        raise KeyboardInterrupt
    _interrupt_at_forward(monkeypatch, 4, hard)
    assert run(*SMOKE, "--epochs", 3, "--deterministic", "--out", tmp_path / "cut") == 1
    assert "not saved" in capsys.readouterr().err
    assert json.loads((tmp_path / "cut" / "latest.json").read_text())["step"] == 2
    _assert_same(_saved(tmp_path / "cut"), _saved(tmp_path / "ref"))


# --------------------------------------------------------------------------- refusals
BAD_NEW_RUN = [
    (["--variant", "foo"], "variant 'foo'"),
    (["--width", "0"], "width must be > 0"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--ltl-levels", "7"], "ltl_levels [7]"),
    (["--input-size", "50"], "multiples of 32"),
    (["--data", "foo"], "data must be"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--batch-size", "100"], "--batch-size 100 is larger than an epoch"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--a-min", "0"], "a_min must be > 0"),
    (["--backend", "nat"], "unknown backend 'nat'"),
    (["--device", "tpu"], "device must be auto, cpu, cuda"),
    (["--amp", "fp8"], "amp must be one of"),
    (["--threads", "-3"], "threads must be >= 0"),
    (["--data-root", "/tmp"], "--data-root is used by --data iharmony4 only"),
    (["--variant", "rbase", "--ltl-levels", "16"], "--ltl-levels applies to variants with ltl or sa"),
    (["--holdout", "3"], "--holdout is for --data iharmony4"),
    (["--subsets", "HCOCO"], "--subsets is used by --data iharmony4 only"),
    (["--augment", "false"], "--augment is used by --data iharmony4 only"),
    (["--data", "iharmony4", "--data-root", "/tmp", "--fresh-data", "false"], "--fresh-data is used by --data synth only"),
    (["--val-subset", "3"], "--val-subset sizes the scores of --val-every"),
    (["--lr-gamma", "0.5"], "--lr-gamma multiplies the lr at --lr-milestones, and this run has none"),
    (["--data", "iharmony4", "--data-root", "/tmp", "--val-every", "1"],
     "a checkpoint picked on the test split makes its test scores optimistic: --val-every needs --holdout N"),
]


@pytest.mark.parametrize("args,expect", BAD_NEW_RUN, ids=[" ".join(a) for a, _ in BAD_NEW_RUN])
def test_bad_settings_are_one_line_exit_2_and_write_nothing(args, expect, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(*SMOKE, "--out", out, *args) == 2
    assert expect in _one_error_line(capsys)
    assert not out.exists()


def test_unavailable_backend_and_device_are_refused(tmp_path, capsys):
    from regharm_ext.backends import unavailable_reason
    if unavailable_reason("triton", "cpu") is not None:
        assert run(*SMOKE, "--out", tmp_path / "t", "--backend", "triton", "--device", "cpu") == 2
        assert "--backend triton cannot run on cpu" in _one_error_line(capsys)
    if not torch.cuda.is_available():
        assert run(*SMOKE, "--out", tmp_path / "c", "--device", "cuda") == 2
        assert "PyTorch sees no CUDA GPU" in _one_error_line(capsys)
    assert not (tmp_path / "t").exists() and not (tmp_path / "c").exists()


def test_unusable_out_is_refused(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    for out, expect in [(file, "is a file"), (file / "sub", "is under"),
                        ("/proc/regharm-no-such-dir", "cannot write the run directory")]:
        assert run(*SMOKE, "--epochs", 1, "--out", out) == 2
        assert expect in _one_error_line(capsys)
    assert file.read_text() == "x"


def _finished_run(tmp_path, capsys, *extra):
    out = tmp_path / "run"
    assert run(*SMOKE, "--epochs", 1, "--out", out, *extra) == 0
    capsys.readouterr()
    return out


def test_resume_refusals_are_one_line_exit_2(tmp_path, capsys):
    out = _finished_run(tmp_path, capsys)
    config = (out / "config.json").read_text()
    for args, expect in [(["--variant", "rbase"], "cannot change variant"),
                         (["--preset", "demo"], "is a 'smoke' run, not 'demo'")]:
        assert run("--out", out, "--resume", *args) == 2
        assert expect in _one_error_line(capsys)
    assert run("--preset", "smoke", "--out", out) == 2
    assert "already holds a run" in _one_error_line(capsys)
    assert run("--out", tmp_path, "--resume") == 2
    assert "not found (is" in _one_error_line(capsys)
    assert (out / "config.json").read_text() == config
    for field, value, expect in [("lr", -1, "lr must be > 0"), ("width", "wide", "width must be"),
                                 ("variant", "foo", "variant 'foo'")]:
        saved = json.loads(config)
        saved[field] = value
        (out / "config.json").write_text(json.dumps(saved))
        assert run("--out", out, "--resume") == 2
        assert expect in _one_error_line(capsys)


# --------------------------------------------------------------------------- resume edges
def test_resume_with_more_epochs_continues_a_finished_run(tmp_path, capsys):
    """--resume --epochs 2 on a finished 1-epoch run trains epoch 2: the same losses as a 2-epoch
    run. A plain --resume of a finished run rewrites nothing."""
    out = _finished_run(tmp_path, capsys, "--deterministic")
    config = (out / "config.json").read_text()
    assert run("--out", out, "--resume") == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert (out / "config.json").read_text() == config

    assert run("--out", out, "--resume", "--epochs", 2) == 0
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    assert json.loads((out / "latest.json").read_text())["step"] == 4
    full = tr.train(tr.preset_config("smoke", epochs=2, deterministic=True, validate=False), tmp_path / "full")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == [r["loss"] for r in ref]
    assert full["stopped"] == "done"


def test_resume_past_max_steps_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(*SMOKE, "--out", out, "--max-steps", 5) == 1
    assert run("--out", out, "--resume", "--max-steps", 3) == 1
    assert "max_steps: step 5" in capsys.readouterr().out
    assert json.loads((out / "latest.json").read_text())["step"] == 5
    assert not list((out / "checkpoints").glob("step-00000006*"))


def test_threads_above_the_cores_are_capped_with_a_warning(tmp_path, capsys):
    n = len(allowed_cores())
    saved = torch.get_num_threads()
    try:
        assert run(*SMOKE, "--epochs", 1, "--out", tmp_path / "run", "--threads", n + 100) == 0
    finally:
        torch.set_num_threads(saved)
    captured = capsys.readouterr()
    assert f"warning: --threads {n + 100} is more than the {n} usable cores" in captured.err
    assert f", {n} threads" in captured.out


# --------------------------------------------------------------------------- from a review
def test_resume_may_change_the_backend(tmp_path, capsys):
    """The op backend is run control: a run started on one backend resumes on another (e.g. on a
    machine without the compiled extension); the architecture fields are still compared."""
    out = tmp_path / "r"
    assert run(*SMOKE, "--out", out, "--epochs", "1", "--backend", "reference") == 0
    assert run("--out", out, "--resume", "--epochs", "2", "--backend", "torch") == 0
    assert json.loads((out / "latest.json").read_text())["step"] == 4
    assert ck.load_checkpoint(out, tr.build_model(tr.preset_config("smoke")))["epoch"] == 2
    with pytest.raises(ck.CheckpointError, match=r"another model config \(differs in \['base_channels'\]: "):
        ck.load_checkpoint(out, tr.build_model(tr.preset_config("smoke", base_channels=8)))


def test_any_non_negative_seed_trains_and_a_negative_one_is_refused(tmp_path, capsys):
    """Per-sample seeds stay in torch's range for any seed (20240101 overflowed it at the first
    sample, after config.json was written); a negative seed is refused before anything is."""
    assert run(*SMOKE, "--out", tmp_path / "big", "--epochs", "1", "--seed", "20240101") == 0
    assert run(*SMOKE, "--out", tmp_path / "neg", "--seed", "-1") == 2
    assert "seed must be >= 0, got -1" in _one_error_line(capsys)
    assert not (tmp_path / "neg").exists()
    from regharm_ext.data.synth import SyntheticComposites
    with pytest.raises(ValueError, match="seed must be >= 0"):
        SyntheticComposites(seed=-1)


def test_damaged_training_state_is_named(tmp_path, capsys):
    """A checkpoint whose JSON parses but lacks what resuming reads (a counter, an RNG state) or
    whose model.json is not an object: a one-line error naming the file, not a KeyError."""
    out = tmp_path / "r"
    assert run(*SMOKE, "--out", out, "--epochs", "1") == 0
    ckdir = out / json.loads((out / "latest.json").read_text())["checkpoint"]
    good = {name: (ckdir / name).read_text() for name in ("train_state.json", "model.json")}
    for name, damage, expect in [
            ("train_state.json", lambda t: t["__dict__"]["state"]["__dict__"].pop("epoch"),
             "lacks the training counters ['epoch']"),
            ("train_state.json", lambda t: t["__dict__"]["rng"]["__dict__"].pop("python"),
             "lacks ['rng.python']"),
            ("model.json", None, "holds no model config")]:
        tree = json.loads(good[name])
        if damage is None:
            tree = [tree]
        else:
            damage(tree)
        (ckdir / name).write_text(json.dumps(tree))
        assert run("--out", out, "--resume", "--epochs", "2") == 2
        assert expect in _one_error_line(capsys)
        (ckdir / name).write_text(good[name])


def test_a_failed_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """A disk that fills up while a checkpoint is written (safetensors reports it as its own
    SafetensorError, a plain write as OSError): `error: cannot write a checkpoint ...` naming the
    checkpoint that stays the latest, exit status 2; nothing half-written is left."""
    from safetensors import SafetensorError
    out = tmp_path / "r"
    assert run(*SMOKE, "--out", out, "--epochs", "1") == 0
    save_file = ck.save_file
    for exc in (SafetensorError("Error while serializing: No space left on device (os error 28)"),
                OSError(28, "No space left on device")):
        def full(*args, _exc=exc, **kwargs):
            raise _exc
        monkeypatch.setattr(ck, "save_file", full)
        assert run("--out", out, "--resume", "--epochs", "2") == 2
        line = _one_error_line(capsys)
        assert "cannot write a checkpoint in" in line and "No space left on device" in line
        assert "the last complete checkpoint" in line and "step-00000002, is kept" in line
        assert json.loads((out / "latest.json").read_text())["step"] == 2
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(ck, "save_file", save_file)
    assert run("--out", out, "--resume", "--epochs", "2") == 0


def test_resume_keeps_the_runs_own_settings(tmp_path, capsys):
    """A plain --resume keeps what the run was started with: the time budget, model selection
    (--val-every, --val-subset), the checkpoints kept, the final table's switch; --max-steps is
    one process's stop and is not kept. (It reset them to the preset's values, which pruned
    kept checkpoints and stopped picking the best one.)"""
    out = tmp_path / "run"
    assert run(*SMOKE, "--out", out, "--max-steps", 4, "--keep-checkpoints", 10, "--val-every", 1,
               "--val-subset", 2, "--max-minutes", 30) == 1
    assert run("--out", out, "--resume") == 0
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("keep_checkpoints", "val_every", "val_subset", "max_minutes",
                                   "validate", "max_steps")} == dict(
        keep_checkpoints=10, val_every=1, val_subset=2, max_minutes=30, validate=False, max_steps=0)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    # step 4 twice: the stop's checkpoint, then its epoch's end (scored, logged) as step-4.2
    assert kept == [f"step-{s:08d}" for s in (2, 4)] + ["step-00000004.2"] + [
        f"step-{s:08d}" for s in (6, 8, 10, 12)], kept
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all("val_fmse" in r for r in log)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch, capsys):
    """Default run names are per second: a second run in that second gets NAME-2 (it shared the
    first one's directory, interleaving logs and overwriting checkpoints); a failed start
    leaves no empty directory behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tr.time, "strftime", lambda fmt, *a: "20260101-000000")
    assert run(*SMOKE, "--epochs", 1) == 0
    assert run(*SMOKE, "--epochs", 1, "--lr", "1e-3") == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["smoke-20260101-000000", "smoke-20260101-000000-2"]
    assert json.loads((tmp_path / "runs" / runs[1] / "config.json").read_text())["lr"] == 1e-3
    assert run(*SMOKE, "--epochs", 1, "--batch-size", 100) == 2   # larger than an epoch
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "runs").write_text("")
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert run(*SMOKE, "--epochs", 1) == 2
    assert "runs here is a file, not a folder" in _one_error_line(capsys)


def test_a_new_run_never_takes_over_a_directory_with_a_config(tmp_path, capsys):
    """A directory with a run's config.json (killed before its first checkpoint, or being
    started by another process) is refused to a new run: --resume continues it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert run(*SMOKE, "--epochs", 1, "--out", out) == 2
    assert "already holds a run; use --resume" in _one_error_line(capsys)
    # the exclusive creation itself, for the process that loses a race after both checked
    config = tr.preset_config("smoke")
    with pytest.raises(tr.ConfigError, match="already holds a run"):
        tr._write_config(config, out, new=True)
    assert (out / "config.json").read_text() == "{}"
    tr._write_config(config, tmp_path / "fresh", new=True)
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["preset"] == "smoke"
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == ["config.json"]   # no temporary left


def test_subset_lists_take_spaces_and_stray_commas():
    parse = lambda text: tr.build_parser().parse_args(["--subsets", text]).subsets   # noqa: E731
    assert parse("HCOCO, HFlickr,") == ("HCOCO", "HFlickr") == parse("HCOCO HFlickr")
    assert parse("all") is None and parse("") is None and parse(" , ") is None
