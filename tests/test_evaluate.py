"""Metrics on hand-computable cases, the Reinhard baseline, evaluate() and its CLI end to end on a
tiny iHarmony4 tree."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regharm_ext.baselines import reinhard
from regharm_ext.data import SyntheticComposites
from regharm_ext.evaluate import evaluate, format_table
from regharm_ext.evaluate import main as evaluate_main
from regharm_ext.metrics import image_metrics

from data_helpers import export_tree, tiny_checkpoint, tiny_harmonizer

REPO = Path(__file__).resolve().parents[1]


def _case():
    """4x4 image of value 127.5, prediction +10 on a 2x2 foreground."""
    target = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[..., :2, :2] = 1
    pred = target + mask * (10 / 255)
    return pred, target, mask


def test_metrics_hand_computed():
    pred, target, mask = _case()
    r = image_metrics(pred, target, mask)
    # squared error 100 on 4 of 16 pixels, 3 channels
    assert r["mse"].item() == pytest.approx(25.0)
    assert r["fmse"].item() == pytest.approx(100.0)
    assert r["psnr"].item() == pytest.approx(10 * math.log10(127.5 ** 2 / 25.0))
    assert image_metrics(pred, target, mask, peak=255)["psnr"].item() == pytest.approx(10 * math.log10(255 ** 2 / 25.0))


def test_metrics_clamp_prediction_and_weight_soft_masks():
    pred, target, mask = _case()
    over = pred.clone()
    over[..., :2, :2] = 3.0  # clamped to 255: error 127.5
    assert image_metrics(over, target, mask)["fmse"].item() == pytest.approx(127.5 ** 2)
    soft = mask * 0.5
    soft[..., 3, 3] = 1.0  # an error-free pixel with full weight
    # Σ m·err² = 4 px · 0.5 · 100 · 3 channels, Σ m = 3
    assert image_metrics(pred, target, soft)["fmse"].item() == pytest.approx(600 / 9)
    with pytest.raises(ValueError, match="mask"):
        image_metrics(pred, target, mask[:, :, :3])


def _colour_shift_case(seed=0):
    """Foreground and background from the same texture, the foreground's colour shifted."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(2, 3, 32, 32, generator=g) * 0.6 + 0.2
    real = torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
    real = (real + 0.03 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 16:44, 20:50] = 1
    gains = torch.tensor([1.35, 0.95, 0.7]).view(1, 3, 1, 1)
    comp = real * (1 - mask) + (real * gains + 0.05).clamp(0, 1) * mask
    return comp, mask, real


@pytest.mark.parametrize("space", ["lab-alpha-beta", "cielab"])
def test_reinhard_undoes_a_colour_shift(space):
    comp, mask, real = _colour_shift_case()
    before = image_metrics(comp, real, mask)["fmse"]
    out = reinhard(comp, mask, space=space)
    after = image_metrics(out, real, mask)["fmse"]
    assert (after < 0.4 * before).all(), (before, after)
    outside = (mask == 0).expand_as(comp)
    assert torch.equal(out[outside], comp[outside])


def test_reinhard_without_foreground_or_background_is_identity():
    comp, _, _ = _colour_shift_case()
    for m in (torch.zeros(2, 1, 64, 64), torch.ones(2, 1, 64, 64)):
        assert torch.allclose(reinhard(comp, m), comp)


def test_evaluate_structure_and_identity_model():
    ds = SyntheticComposites("val", size=64, length=6)
    comp = evaluate("composite", ds, batch_size=4, progress=False)
    assert comp["method"] == "composite" and list(comp["subsets"]) == ["Synthetic", "All"]
    assert comp["subsets"]["All"]["n"] == 6
    # an untrained residual model outputs its input: the composite's scores
    model = evaluate(tiny_harmonizer(input_size=64), ds, batch_size=4, progress=False)
    assert model["method"] == "model"
    for k in ("mse", "fmse", "psnr"):
        assert model["subsets"]["All"][k] == pytest.approx(comp["subsets"]["All"][k], rel=1e-6)
    # a model trained at 32² still scores at the data's 64² (residual upsampled)
    moved = evaluate(tiny_harmonizer(input_size=32, head_std=0.05), ds, batch_size=4, progress=False)
    assert moved["subsets"]["All"]["fmse"] != pytest.approx(comp["subsets"]["All"]["fmse"])
    table = format_table([comp, model])
    assert "| Synthetic | 6 | PSNR ↑ |" in table and "| All | 6 | PSNR ↑ |" in table
    assert table.splitlines()[0].endswith("| composite | model |")


def test_evaluate_cli_on_a_tiny_ihamony4_tree(tmp_path):
    root = export_tree(tmp_path / "ihd", subsets=("HCOCO", "Hday2night"), n=2, n_train=1, size=64)
    ck = tiny_checkpoint(tmp_path / "tiny.safetensors", input_size=64)
    out = tmp_path / "res.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "regharm_ext.evaluate", "--checkpoint", str(ck), "--data-root", str(root),
         "--subsets", "HCOCO", "HFlickr", "Hday2night", "--method", "model", "composite",
         "--size", "64", "--json", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HFlickr" in proc.stderr  # noted as skipped
    assert "| HCOCO | 2 | PSNR ↑ |" in proc.stdout and "| Hday2night | 2 |" in proc.stdout
    results = json.loads(out.read_text())
    assert [r["method"] for r in results] == ["model", "composite"]
    assert f"model: {ck} (rbase+ltl+ptl)" in proc.stderr
    for r in results:
        assert set(r) == {"method", "subsets", "settings"}
        settings = r["settings"]
        assert (settings["data"], settings["split"], settings["size"], settings["peak"]) == (str(root), "test", 64, "target")
        assert settings["subsets"] == ["HCOCO", "HFlickr", "Hday2night"] and settings["protocol"] is False
        assert ("model" in settings) == (r["method"] == "model")
        assert list(r["subsets"]) == ["HCOCO", "Hday2night", "All"]
        for s, v in r["subsets"].items():
            assert set(v) == {"n", "mse", "fmse", "psnr"}
            assert v["n"] == (4 if s == "All" else 2)
            assert 0 < v["mse"] <= v["fmse"] < 20000 and 10 < v["psnr"] < 60
    # the untrained residual model is the identity: same figures as the composite
    assert results[0]["subsets"]["All"]["fmse"] == pytest.approx(results[1]["subsets"]["All"]["fmse"], rel=1e-6)

    # one method: the JSON is a single object
    one = tmp_path / "one.json"
    assert evaluate_main(["--data-root", str(root), "--method", "reinhard", "--size", "64",
                          "--json", str(one), "--no-progress"]) == 0
    single = json.loads(one.read_text())
    assert single["method"] == "reinhard" and single["subsets"]["All"]["n"] == 4


def test_evaluate_cli_reports_a_bad_root_in_one_line(tmp_path, capsys):
    rc = evaluate_main(["--data-root", str(tmp_path / "none"), "--method", "composite", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "none") in err
    root = export_tree(tmp_path / "ihd", subsets=("HCOCO",), n=1, n_train=0, size=32)
    (root / "HCOCO" / "HCOCO_test.txt").write_text("")
    rc = evaluate_main(["--data-root", str(root), "--method", "composite", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "no images" in err and len(err.strip().splitlines()) == 1


def _no_scoring(monkeypatch):
    """Make scoring fail loudly: a refusal must come before any image is scored."""
    def scored(*a, **k):
        raise AssertionError("scored before the refusal")
    monkeypatch.setattr("regharm_ext.evaluate.evaluate", scored)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("flag,where", [("--json", "under_a_file"), ("--json", "a_folder"),
                                        ("--samples", "under_a_file"), ("--samples", "a_folder")])
def test_evaluate_cli_refuses_an_unwritable_output_before_scoring(flag, where, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.png").mkdir()
    out = {"under_a_file": tmp_path / "afile" / "r.png", "a_folder": tmp_path / "adir.png"}[where]
    _no_scoring(monkeypatch)
    assert evaluate_main(["--val-length", "2", "--method", "composite", "--no-progress", flag, str(out)]) == 2
    err = _one_error_line(capsys)
    assert f"{flag} {out}" in err
    assert ("afile is a file, not a folder" if where == "under_a_file" else "is a folder") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.png", "afile"]   # nothing left behind


def test_evaluate_cli_reports_a_folder_it_cannot_create(tmp_path, monkeypatch, capsys):
    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "mkdir", refuse)
    _no_scoring(monkeypatch)
    out = tmp_path / "new" / "r.json"
    assert evaluate_main(["--val-length", "2", "--method", "composite", "--no-progress", "--json", str(out)]) == 2
    err = _one_error_line(capsys)
    assert f"--json {out} cannot be written: cannot create folder {out.parent} (Permission denied)" in err


def test_evaluate_cli_writes_json_atomically_and_keeps_the_table_if_the_sheet_fails(tmp_path, monkeypatch, capsys):
    out, sheet = tmp_path / "res" / "r.json", tmp_path / "s.png"
    out.parent.mkdir()
    out.write_text("previous")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("regharm_ext.samples.save_sheet", disk_full)
    rc = evaluate_main(["--val-length", "2", "--size", "32", "--method", "composite", "--no-progress",
                        "--json", str(out), "--samples", str(sheet), "--samples-count", "1"])
    cap = capsys.readouterr()
    assert rc == 2 and "| All | 2 | PSNR ↑ |" in cap.out
    assert f"error: --samples {sheet} cannot be written: No space left on device" in cap.err
    assert json.loads(out.read_text())["subsets"]["All"]["n"] == 2
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]   # no temporary file left


def test_evaluate_json_names_the_checkpoint_and_the_protocol(tmp_path, capsys):
    run = tmp_path / "run"
    ck = tiny_checkpoint(tmp_path / "w.safetensors", input_size=64)
    out = tmp_path / "r.json"
    assert evaluate_main(["--checkpoint", str(ck), "--val-length", "2", "--no-progress", "--json", str(out),
                          "--peak", "255"]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["size"] == 256 and settings["peak"] == 255.0 and settings["protocol"] is False
    assert settings["data"] == "embedded synthetic validation split"
    from regharm_ext.backends import chosen
    assert settings["model"] == {"checkpoint": str(ck), "variant": "rbase+ltl+ptl",
                                 "backend": f"auto ({chosen(None, torch.device('cpu'))})"}
    assert evaluate_main(["--checkpoint", str(ck), "--val-length", "2", "--no-progress", "--json", str(out),
                          "--backend", "torch"]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["protocol"] is True and settings["model"]["backend"] == "torch"
    assert not run.exists()


def test_a_model_trained_on_a_backend_this_device_lacks_loads_on_the_automatic_one(tmp_path, monkeypatch, capsys):
    from regharm_ext.checkpoint import load_model
    from regharm_ext.ops import triton_backend
    if triton_backend.unavailable(torch.device("cpu")) is not None:
        pytest.skip(f"needs the Triton interpreter to train the model first: "
                    f"{triton_backend.unavailable(torch.device('cpu'))}")
    ck = tiny_checkpoint(tmp_path / "w.safetensors", input_size=64)
    meta = json.loads(ck.with_suffix(".json").read_text())
    meta["model"]["backend"] = "triton"
    ck.with_suffix(".json").write_text(json.dumps(meta))
    assert load_model(ck)[1]["backend"] == "triton"   # where it can run, the stored one is kept
    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)   # now it cannot
    with pytest.warns(UserWarning, match="trained with backend 'triton', which cannot run on cpu .*TRITON_INTERPRET"):
        model, config = load_model(ck)
    assert config["backend"] is None
    out = tmp_path / "r.json"
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(ck), "--val-length", "2", "--size", "64", "--no-progress",
                          "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["model"]["backend"].startswith("auto (")
    # the CLI's style: one note line, not Python's warning with its source line
    assert capsys.readouterr().err.splitlines()[0].startswith(f"note: {ck} was trained with backend 'triton'")
    # asked for by name, it is refused with the reason
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(ck), "--val-length", "2", "--size", "64", "--no-progress",
                          "--backend", "triton"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: backend='triton' cannot run on cpu: ") and "TRITON_INTERPRET=1" in err[-1]


def test_evaluate_cli_subset_selection(tmp_path, capsys):
    """A repeated name counts once; a named subset whose list names nothing is noted, not dropped
    in silence; requested subsets that are all absent are named with the ones present."""
    root = export_tree(tmp_path / "ihd", subsets=("HCOCO", "HFlickr"), n=2, n_train=0, size=32)
    (root / "HFlickr" / "HFlickr_test.txt").write_text("")
    out = tmp_path / "r.json"
    assert evaluate_main(["--data-root", str(root), "--subsets", "HCOCO", "HFlickr", "HCOCO", "--size", "32",
                          "--method", "composite", "--no-progress", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"note: no test images listed for HFlickr in {root / 'HFlickr' / 'HFlickr_test.txt'}; skipped" in err
    assert {s: v["n"] for s, v in json.loads(out.read_text())["subsets"].items()} == {"HCOCO": 2, "All": 2}
    # train's comma-separated form too
    assert evaluate_main(["--data-root", str(root), "--subsets", "HCOCO,", "--size", "32",
                          "--method", "composite", "--no-progress", "--json", str(out)]) == 0
    assert {s: v["n"] for s, v in json.loads(out.read_text())["subsets"].items()} == {"HCOCO": 2, "All": 2}
    assert evaluate_main(["--data-root", str(root), "--subsets", "HAdobe5k", "Hday2night",
                          "--method", "composite", "--no-progress"]) == 2
    err = _one_error_line(capsys)
    assert "none of the subsets named (HAdobe5k, Hday2night)" in err and "present there: HCOCO, HFlickr" in err


@pytest.mark.parametrize("args,words", [
    (["--subsets", "HCOCO"], "--subsets needs --data-root"),
    (["--data-root", "ihd", "--val-length", "3"], "--val-length sizes the embedded validation split"),
    (["--val-length", "0"], "--val-length must be at least 1"),
    (["--val-length", "-5"], "--val-length must be at least 1"),
    (["--peak", "0"], "--peak must be 'target' or a positive number"),
    (["--peak", "nan"], "--peak must be 'target' or a positive number"),
    (["--peak", "-255"], "--peak must be 'target' or a positive number"),
    (["--peak", "inf"], "--peak must be 'target' or a positive number"),
    (["--size", "0"], "--size must be at least 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
    (["--workers", "-1"], "--workers must be at least 0, got -1"),
    (["--json", "out/x.png", "--samples", "out/../out/x.png"], "--json and --samples name the same file"),
])
def test_evaluate_cli_refuses_flags_that_do_not_apply_or_make_no_sense(args, words, monkeypatch, capsys):
    _no_scoring(monkeypatch)
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--method", "composite", "--no-progress"] + args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {words}" in err and err.count("error:") == 1
