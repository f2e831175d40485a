"""Crash safety and safe loading: a process killed (os._exit, as SIGKILL leaves it: no cleanup
runs) at any file operation of save_checkpoint leaves the previous checkpoint as the one a resume
loads; a training run killed with SIGKILL resumes and finishes; --deterministic resumption is
exact; a non-finite loss stops the run keeping the last good checkpoint; pickle files, unknown
JSON keys and misshapen tensors are refused; bad data ends the train CLI with one line."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from regharm_ext import checkpoint as ck
from regharm_ext.model import Harmonizer
from regharm_ext.train import build_model, preset_config, train
from regharm_ext.train import main as _train_main


def _model(seed):
    torch.manual_seed(seed)
    return Harmonizer("rbase+ptl", input_size=64, base_channels=4)


def _killed_during_save(run_dir, model, opt, state, at_call: int) -> int:
    """Fork; in the child, die at the ``at_call``-th os.replace of save_checkpoint (before it
    happens). Returns the child's exit status."""
    pid = os.fork()
    if pid == 0:   # child: no pytest machinery, no cleanup on the way out
        try:
            calls = [0]
            real = os.replace

            def replace(src, dst):
                calls[0] += 1
                if calls[0] == at_call:
                    os._exit(137)
                real(src, dst)
            ck.os.replace = replace
            ck.save_checkpoint(run_dir, model, opt, state=state)
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# os.replace calls of one save: model.safetensors, model.json, train_state.safetensors,
# train_state.json, the checkpoint folder, latest.json
@pytest.mark.parametrize("at_call", range(1, 7))
def test_kill_at_any_point_of_a_save_keeps_the_previous_checkpoint(at_call, tmp_path):
    old, new = _model(0), _model(1)
    opt = torch.optim.Adam(old.parameters())
    ck.save_checkpoint(tmp_path, old, opt, state={"step": 10, "epoch": 1})
    assert _killed_during_save(tmp_path, new, opt, {"step": 20, "epoch": 2}, at_call) == 137

    fresh = _model(2)
    state = ck.load_checkpoint(tmp_path, fresh, torch.optim.Adam(fresh.parameters()))
    assert state["step"] == 10
    for k, v in old.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    # the run goes on: the next save succeeds and is the one loaded
    ck.save_checkpoint(tmp_path, new, opt, state={"step": 20, "epoch": 2})
    assert ck.load_checkpoint(tmp_path, fresh)["step"] == 20
    for k, v in new.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_leftovers_of_a_killed_save_are_removed_and_a_lone_checkpoint_is_found(tmp_path):
    model = _model(0)
    assert _killed_during_save(tmp_path, model, None, {"step": 3}, at_call=3) == 137
    leftovers = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".step-")]
    assert leftovers and not ck.has_checkpoint(tmp_path)
    assert sorted(ck.clean_partial(tmp_path)) == sorted(leftovers)
    assert not list((tmp_path / "checkpoints").iterdir())
    # killed after the first checkpoint's rename, before latest.json: that checkpoint is found
    assert _killed_during_save(tmp_path, model, None, {"step": 3}, at_call=6) == 137
    assert not (tmp_path / "latest.json").exists() and ck.has_checkpoint(tmp_path)
    assert ck.load_checkpoint(tmp_path, _model(1))["step"] == 3


# --------------------------------------------------------------------------- training runs
def train_main(argv):
    return _train_main([str(a) for a in argv])

REPO = Path(__file__).resolve().parents[1]


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "regharm_ext.train", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_finishes_like_an_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL some time after its first checkpoint resumes from its last
    complete checkpoint, finishes, and (with --deterministic) logs the uninterrupted run's losses."""
    epochs = 30
    opts = ["--preset", "smoke", "--epochs", epochs, "--deterministic", "--validate", "false"]
    proc = _cli(*opts, "--out", tmp_path / "cut")
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "latest.json").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.02)
    time.sleep(0.1)                       # somewhere in the run, maybe in the middle of a save
    proc.kill()
    proc.communicate()
    assert proc.returncode == -9, "the run ended before it could be killed: raise epochs"
    done = json.loads((tmp_path / "cut" / "latest.json").read_text())
    assert 0 < done["epoch"] < epochs

    proc = _cli("--out", tmp_path / "cut", "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"done: step {2 * epochs}" in out
    assert not [p for p in (tmp_path / "cut").rglob(".*")], "no temporary leftovers"

    full = train(preset_config("smoke", epochs=epochs, deterministic=True, validate=False), tmp_path / "full")
    assert full["stopped"] == "done"
    cut, ref = _log(tmp_path / "cut"), _log(tmp_path / "full")
    assert [r["epoch"] for r in cut] == list(range(1, epochs + 1)), "one record per epoch, none twice"
    assert [r["loss"] for r in cut] == [r["loss"] for r in ref]


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_deterministic_resume_equals_the_uninterrupted_run(amp, tmp_path):
    """Interrupted mid-epoch (step 3 of 2-step epochs), resumed: every loss equals the
    uninterrupted run's exactly, gradient scaler state included (fp16)."""
    cfg = dict(validate=False, epochs=3, deterministic=True, amp=amp)
    full = train(preset_config("smoke", **cfg), tmp_path / "full")
    part = train(preset_config("smoke", max_steps=3, **cfg), tmp_path / "cut")
    assert part["stopped"] == "max_steps"
    rest = train(preset_config("smoke", **cfg), tmp_path / "cut", resume=True)
    assert [s for s, _ in rest["step_losses"]] == [4, 5, 6]
    assert part["step_losses"] + rest["step_losses"] == full["step_losses"]
    assert not torch.are_deterministic_algorithms_enabled(), "global setting restored after the run"


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, capsys):
    """Killed before its first checkpoint, a run has its config.json and no checkpoint: --resume
    starts it from the beginning (the same losses as a fresh run)."""
    out = tmp_path / "run"
    assert train_main(["--preset", "smoke", "--out", out, "--epochs", "2", "--validate", "false"]) == 0
    first = _log(out)
    for p in [out / "latest.json", out / "log.jsonl"]:
        p.unlink()
    shutil.rmtree(out / "checkpoints")
    assert train_main(["--out", out, "--resume"]) == 0
    assert "no checkpoint yet: starting from the beginning" in capsys.readouterr().out
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in first]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_main(["--preset", "smoke", "--out", out, "--epochs", "4", "--inject-nan-step", "5",
                     "--validate", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1, err
    assert err[0].startswith("error: the loss became nan at step 5 (epoch 3)") and "step-00000004" in err[0]
    assert json.loads((out / "latest.json").read_text())["step"] == 4
    assert [r["step"] for r in _log(out)] == [2, 4]
    state = ck.load_checkpoint(out, _smoke_model())
    assert state["step"] == 4
    # the run goes on from there once the cause is gone
    assert train_main(["--out", out, "--resume"]) == 0
    assert json.loads((out / "latest.json").read_text())["step"] == 8


def _smoke_model():
    return build_model(preset_config("smoke"))


def test_exploding_lr_stops_with_a_clear_message(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_main(["--preset", "smoke", "--out", out, "--lr", "1e30", "--validate", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1 and "error: the loss became" in err[0], err
    if (out / "latest.json").exists():            # whatever was saved holds finite weights
        model = _smoke_model()
        ck.load_checkpoint(out, model)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_train_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    from data_helpers import export_tree
    root = export_tree(tmp_path / "ihd", subsets=("HFlickr",), n=2, n_train=8, size=64)
    bad = root / "HFlickr" / "composite_images" / "t00005_1_1.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    rc = train_main(["--preset", "paper", "--data-root", root, "--out", tmp_path / "run", "--input-size", "64",
                     "--base-channels", "4", "--epochs", "2", "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "t00005_1_1.jpg" in err[0] and "HFlickr_train.txt:6" in err[0] and "truncated" in err[0]


def test_pickle_is_never_loaded(tmp_path):
    model = _model(0)
    for suffix in (".pt", ".pth", ".ckpt", ".bin"):
        p = tmp_path / f"weights{suffix}"
        p.write_bytes(b"\x80\x04K\x01.")      # a pickle stream
        with pytest.raises(ck.CheckpointError, match="pickle-based weights .* are never loaded"):
            ck.load_model(p)
    ck.save_weights(tmp_path / "ok.safetensors", model)
    assert ck.load_model(tmp_path / "ok.safetensors")[0] is not None
    # no code path unpickles: torch.load and pickle appear nowhere in the package
    for src in (REPO / "regharm_ext").rglob("*.py"):
        text = src.read_text(encoding="utf-8")
        assert not re.search(r"torch\.load\(|\bimport pickle\b|pickle\.loads?\(|weights_only\s*=\s*False", text), src


def test_unsafe_or_mismatched_checkpoints_are_refused(tmp_path, capsys):
    from safetensors.torch import save_file
    model = _model(0)
    w = ck.save_weights(tmp_path / "m.safetensors", model)
    meta = json.loads((tmp_path / "m.json").read_text())

    def refused(new_meta, match):
        (tmp_path / "m.json").write_text(json.dumps(new_meta))
        with pytest.raises(ck.CheckpointError, match=match):
            ck.load_model(w)

    refused(dict(meta, extra_code="x"), r"unknown keys \['extra_code'\]")
    refused(dict(meta, format="other/v9"), "format 'other/v9' is not")
    refused(dict(meta, model=dict(meta["model"], depth=9)), r"unknown model config keys \['depth'\]")
    refused(dict(meta, model=dict(meta["model"], base_channels=5)),
            r"shape mismatch \['stem\.0\.weight: file \(4, 4, 3, 3\) vs model \(5, 4, 3, 3\)'")
    (tmp_path / "m.json").write_text(json.dumps(meta))
    tensors = dict(model.state_dict())
    tensors["extra.weight"] = torch.zeros(2)
    del tensors["head.bias"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(w))
    with pytest.raises(ck.CheckpointError, match=r"missing \['head\.bias'\]; unexpected \['extra\.weight'\]"):
        ck.load_model(w)
    w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ck.CheckpointError, match="cannot read weights"):
        ck.load_model(w)

    # a run: unknown fields in config.json or the training state are refused on --resume
    out = tmp_path / "run"
    assert train_main(["--preset", "smoke", "--out", out, "--epochs", "1", "--validate", "false"]) == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, bogus=1)))
    capsys.readouterr()
    assert train_main(["--out", out, "--resume"]) == 2
    assert "error: unknown config fields ['bogus']" in capsys.readouterr().err
    (out / "config.json").write_text(json.dumps(config))
    state_json = out / json.loads((out / "latest.json").read_text())["checkpoint"] / "train_state.json"
    tree = json.loads(state_json.read_text())
    tree["__dict__"]["hook"] = "os.system"
    state_json.write_text(json.dumps(tree))
    capsys.readouterr()
    assert train_main(["--out", out, "--resume", "--epochs", "2"]) == 2
    assert "unknown or missing sections (unknown ['hook'])" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_training_and_deterministic_resume(amp, tmp_path):
    """On a GPU: autocast through the ops of the chosen backend lowers the loss, and a resumed
    --deterministic run follows the uninterrupted one (to float tolerance: bilinear upsampling's
    CUDA backward is not deterministic)."""
    cfg = dict(validate=False, epochs=4, deterministic=True, amp=amp, device="cuda")
    full = train(preset_config("smoke", **cfg), tmp_path / "full")
    losses = [v for _, v in full["step_losses"]]
    assert full["stopped"] == "done" and all(np.isfinite(losses)) and losses[-1] < losses[0]
    train(preset_config("smoke", max_steps=3, **cfg), tmp_path / "cut")
    rest = train(preset_config("smoke", **cfg), tmp_path / "cut", resume=True)
    ref = dict(full["step_losses"])
    for step, value in rest["step_losses"]:
        assert value == pytest.approx(ref[step], rel=1e-2), step


def test_weights_load_only_into_the_model_they_describe(tmp_path):
    """base and rbase (or one non-PTL variant at two input sizes) have the same tensors: the
    description beside the weights decides, in another spelling of one config too."""
    rbase = Harmonizer("rbase", input_size=64, base_channels=4)
    w = ck.save_weights(tmp_path / "r.safetensors", rbase)
    for other, field in ((Harmonizer("base", input_size=64, base_channels=4), "variant"),
                         (Harmonizer("rbase", input_size=128, base_channels=4), "input_size")):
        with pytest.raises(ck.CheckpointError, match=rf"another model config \(differs in \['{field}'\]"):
            ck.load_weights(other, w)
    ck.load_weights(Harmonizer("rbase", input_size=(64, 64), base_channels=4, backend="torch"), w)
    # a run saved with another spelling of one model resumes into it
    model = Harmonizer("rbase+ptl+ltl", input_size=(64, 64), base_channels=4)
    assert model.config["variant"] == "rbase+ltl+ptl" and model.config["input_size"] == 64
    ck.save_checkpoint(tmp_path / "run", model, state={"step": 1})
    meta_path = next((tmp_path / "run" / "checkpoints").iterdir()) / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["model"].update(variant="rbase+ptl+ltl", input_size=[64, 64], ltl_levels=[32])
    meta_path.write_text(json.dumps(meta))
    ck.load_checkpoint(tmp_path / "run", Harmonizer("rbase+ltl+ptl", input_size=64, base_channels=4))


def test_weights_and_their_description_are_written_together(tmp_path):
    """A description that cannot be written leaves neither file new (the weights were in place
    before the JSON failed, beside an old or no description)."""
    w = ck.save_weights(tmp_path / "m.safetensors", _model(0))
    before = w.read_bytes(), (tmp_path / "m.json").read_text()
    with pytest.raises(TypeError):
        ck.save_weights(w, _model(1), extra={"bad": object()})
    assert (w.read_bytes(), (tmp_path / "m.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


@pytest.mark.parametrize("kw, match", [
    (dict(base_channels=4.6), "base_channels must be an int >= 1, got 4.6"),
    (dict(ltl_levels=32), r"ltl_levels must be a list of sizes such as \[32\]"),
    (dict(width=None), "width must be a number > 0"),
    (dict(width=True), "width must be a number > 0"),
    (dict(input_size="64"), r"input_size must be an int or \(H, W\) of ints, got '64'"),
    (dict(input_size=64.7), r"input_size must be an int or \(H, W\) of ints"),
])
def test_model_config_values_are_refused_before_they_are_stored(kw, match):
    """The config must rebuild the very model: a float base_channels built channels from 4.6
    and stored 4, so its checkpoint never loaded again."""
    with pytest.raises(ValueError, match=match):
        Harmonizer("rbase+ltl+ptl", **{"input_size": 64, "base_channels": 4, **kw})
