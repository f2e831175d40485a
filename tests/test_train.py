"""Loss (Eq. 8), checkpoints (safetensors + JSON, atomic, clear errors) and the training CLI."""
import collections
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from regharm_ext.checkpoint import (DEFAULT_WEIGHTS, CheckpointError, _decode, _encode, load_checkpoint,
                                    load_model, save_checkpoint, save_weights)
from regharm_ext.losses import fmse_loss
from regharm_ext.model import Harmonizer
from regharm_ext.train import main, preset_config, train


# --------------------------------------------------------------------------- loss
def test_fmse_loss_hand_computed():
    out = torch.zeros(2, 3, 20, 20)
    target = torch.zeros(2, 3, 20, 20)
    mask = torch.zeros(2, 1, 20, 20)
    mask[0, :, :2, :2] = 1                  # 4 foreground pixels: the A_min = 100 floor applies
    target[0, :, :2, :2] = 0.1              # Σ err² = 4 px * 3 ch * 0.01 = 0.12 -> 0.12 / 100
    mask[1, :, :10] = 1                     # 200 foreground pixels
    target[1, :, :10] = 0.5                 # Σ err² = 200 * 3 * 0.25 = 150 -> 150 / 200
    expected = (0.12 / 100 + 150 / 200) / 2
    assert fmse_loss(out, target, mask).item() == pytest.approx(expected, rel=1e-6)
    assert fmse_loss(out, target, mask, a_min=1.0).item() == pytest.approx((0.12 / 4 + 0.75) / 2, rel=1e-6)
    # background errors count too (Σ over all pixels), divided by the foreground area
    target[1, :, 19, 19] = 1.0
    assert fmse_loss(out, target, mask).item() == pytest.approx(expected + 3 / 200 / 2, rel=1e-6)
    with pytest.raises(ValueError, match="mask must have shape"):
        fmse_loss(out, target, mask[:, :, :10])


# --------------------------------------------------------------------------- checkpoints
def _tiny(variant="rbase+ltl+ptl"):
    torch.manual_seed(0)
    return Harmonizer(variant, input_size=64, base_channels=4)


def _inputs():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 64, 64, generator=g)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:40, 8:50] = 1
    return image, mask


def test_state_codec_round_trip():
    random.seed(5)
    state = {"counter": collections.Counter({120: 1}), 3: (1.5, "x", None), "nested": [{"a": torch.arange(4)}],
             "np": np.random.get_state(), "py": random.getstate(), "flag": True}
    tensors = {}
    tree = json.loads(json.dumps(_encode(state, tensors, "")))
    back = _decode(tree, tensors)
    assert back["counter"] == state["counter"] and back[3] == state[3] and back["flag"] is True
    assert torch.equal(back["nested"][0]["a"], torch.arange(4))
    assert back["np"][0] == "MT19937" and np.array_equal(back["np"][1], state["np"][1])
    assert back["np"][1].dtype == state["np"][1].dtype
    assert back["py"] == state["py"]


def test_checkpoint_round_trip(tmp_path):
    model = _tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3], gamma=0.1)
    image, mask = _inputs()
    for _ in range(2):     # move the head off zero and fill the optimizer state
        opt.zero_grad()
        fmse_loss(model(image, mask), image * 0.5, mask).backward()
        opt.step()
    model.eval()
    expected = model(image, mask)
    ck = save_checkpoint(tmp_path, model, opt, sched, {"step": 2, "epoch": 1, "trained": {"note": "test"}})
    assert sorted(p.name for p in ck.iterdir()) == ["model.json", "model.safetensors",
                                                   "train_state.json", "train_state.safetensors"]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")], "no temporary files left"

    for source in (tmp_path, ck, ck / "model.safetensors"):
        loaded, config = load_model(source, memory_format="contiguous")   # the saved model's layout
        assert config["variant"] == "rbase+ltl+ptl" and config["trained"] == {"note": "test"}
        assert not loaded.training
        torch.testing.assert_close(loaded(image, mask), expected, rtol=0, atol=0)
    # the CPU default is channels_last: the same weights, their convolutions summed in another order
    loaded = load_model(ck)[0]
    assert loaded.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loaded(image, mask), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="memory_format must be one of"):
        load_model(ck, memory_format="NHWC")

    fresh = _tiny()
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, milestones=[3], gamma=0.1)
    torch.manual_seed(123)
    rng_before = torch.rand(3)
    state = load_checkpoint(tmp_path, fresh, opt2, sched2)
    assert state["step"] == 2 and sched2.milestones == sched.milestones
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for k in a:
            assert torch.equal(a[k], b[k])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert not torch.equal(torch.rand(3), rng_before), "RNG restored to its state at saving time"
    # into a channels_last model: Adam's moments take their parameters' layout, with the same values
    cl = _tiny().to(memory_format=torch.channels_last)
    opt3 = torch.optim.Adam(cl.parameters(), lr=1e-3)
    load_checkpoint(tmp_path, cl, opt3, restore_rng=False)
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt3.state[cl.stem[0].weight][k].is_contiguous(memory_format=torch.channels_last), k
    for a, b in zip(opt.state_dict()["state"].values(), opt3.state_dict()["state"].values()):
        for k in a:
            assert torch.equal(a[k], b[k])

    # weights file + JSON beside it, as shipped for the default weights
    save_weights(tmp_path / "w.safetensors", model, {"trained": {"preset": "x"}})
    loaded, config = load_model(tmp_path / "w.safetensors", memory_format="contiguous")
    assert config["trained"] == {"preset": "x"}
    torch.testing.assert_close(loaded(image, mask), expected, rtol=0, atol=0)
    # a channels_last model saves the same tensors
    save_weights(tmp_path / "cl.safetensors", model.to(memory_format=torch.channels_last))
    again = load_model(tmp_path / "cl.safetensors", memory_format="contiguous")[0]
    for k, v in again.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]) and v.is_contiguous(), k


def test_checkpoints_are_pruned_and_latest_wins(tmp_path):
    model = _tiny("rbase")
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, model, state={"step": step}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000004"]
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 4
    assert load_model(tmp_path)[1]["step"] == 4


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model(tmp_path)
    model = _tiny()
    w = save_weights(tmp_path / "m.safetensors", model)
    meta = json.loads((tmp_path / "m.json").read_text())

    (tmp_path / "m.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing model config .*m\.json"):
        load_model(w)

    (tmp_path / "m.json").write_text(json.dumps(dict(meta, model=dict(meta["model"], depth=9))))
    with pytest.raises(CheckpointError, match=r"unknown model config keys \['depth'\]"):
        load_model(w)

    (tmp_path / "m.json").write_text(json.dumps(dict(meta, model=dict(meta["model"], base_channels=5))))
    with pytest.raises(CheckpointError, match="shape mismatch .*stem"):
        load_model(w)

    (tmp_path / "m.json").write_text(json.dumps(meta))
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    del tensors["head.bias"]
    save_file(tensors, str(w))
    with pytest.raises(CheckpointError, match=r"missing \['head.bias'\]"):
        load_model(w)

    w.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_model(w)


def test_default_weights_ship_and_run():
    assert DEFAULT_WEIGHTS.stat().st_size <= 20e6
    model, config = load_model()
    trained = config["trained"]
    print("default weights:", config["variant"], config["input_size"], trained.get("validation"))
    assert trained["preset"] and trained["steps"] > 0 and "validation" in trained
    assert trained["validation"]["model"]["fmse"] < trained["validation"]["reinhard"]["fmse"]
    image, mask = _inputs()
    size = model.input_size
    image = torch.nn.functional.interpolate(image, size=size)
    mask = torch.nn.functional.interpolate(mask, size=size)
    out = model(image, mask)
    assert torch.isfinite(out).all() and torch.equal(out[(mask == 0).expand_as(out)], image[(mask == 0).expand_as(image)])


# --------------------------------------------------------------------------- training
def _epoch_losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_smoke_training_lowers_the_loss(tmp_path):
    result = train(preset_config("smoke", validate=False), tmp_path)
    losses = _epoch_losses(tmp_path)
    print("smoke epoch losses:", [round(v, 4) for v in losses])
    assert result["stopped"] == "done" and len(losses) == 6
    assert losses[-1] < 0.8 * losses[0]


def test_resume_continues_with_the_same_next_loss(tmp_path):
    cfg = dict(validate=False, epochs=3)
    full = train(preset_config("smoke", **cfg), tmp_path / "full")
    part = train(preset_config("smoke", max_steps=3, **cfg), tmp_path / "cut")   # stops mid-epoch 2
    assert part["stopped"] == "max_steps" and part["state"]["step"] == 3
    rest = train(preset_config("smoke", **cfg), tmp_path / "cut", resume=True)
    expected = dict(full["step_losses"])
    assert [s for s, _ in rest["step_losses"]] == list(range(4, 7))
    for step, loss in part["step_losses"] + rest["step_losses"]:
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=0), f"step {step}"
    # the epoch log of the resumed run equals the uninterrupted one
    assert _epoch_losses(tmp_path / "cut") == pytest.approx(_epoch_losses(tmp_path / "full"), rel=1e-6)


def test_memory_format_of_a_run(tmp_path, capsys):
    """CPU runs train a channels_last model unless told otherwise; a resumed run keeps the choice."""
    assert main(["--preset", "smoke", "--out", str(tmp_path / "cl"), "--epochs", "1", "--validate", "false"]) == 0
    assert ", channels_last" in capsys.readouterr().out
    out = tmp_path / "flat"
    assert main(["--preset", "smoke", "--out", str(out), "--epochs", "1", "--validate", "false",
                 "--memory-format", "contiguous"]) == 0
    assert "channels_last" not in capsys.readouterr().out
    assert main(["--out", str(out), "--resume", "--epochs", "2", "--validate", "false"]) == 0
    assert "channels_last" not in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["memory_format"] == "contiguous"
    with pytest.raises(ValueError, match="memory_format must be one of auto, channels_last, contiguous"):
        preset_config("smoke", memory_format="nhwc")


def test_cli_overrides_table_and_resume_rules(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--out", str(out), "--epochs", "1", "--variant", "rbase+sa",
                 "--ltl-levels", "16,32", "--lr", "0.002", "--val-every", "1", "--val-subset", "2"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "| model | composite | reinhard |" in printed and "fMSE" in printed
    assert "evaluate" not in captured.err   # the smoke preset's progress=False: no bars, the table's either
    config = json.loads((out / "config.json").read_text())
    assert config["variant"] == "rbase+sa" and config["ltl_levels"] == [16, 32] and config["lr"] == 0.002
    val = json.loads((out / "val.json").read_text())
    assert [r["method"] for r in val["results"]] == ["model", "composite", "reinhard"]
    # the table scores what --checkpoint RUN_DIR loads: the best checkpoint
    assert val["checkpoint"] == json.loads((out / "best.json").read_text())["checkpoint"].split("/")[-1]
    assert "val_fmse" in json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert load_model(out)[1]["trained"]["preset"] == "smoke"

    from regharm_ext.checkpoint import main as package_main
    assert package_main([str(out), "--out", str(tmp_path / "w.safetensors"), "--note", "machine=test box"]) == 0
    trained = load_model(tmp_path / "w.safetensors")[1]["trained"]
    assert trained["machine"] == "test box" and trained["config"]["variant"] == "rbase+sa"
    assert set(trained["validation"]) == {"model", "composite", "reinhard"}

    # refusals: one line `error: ...`, exit status 2
    for argv, expect in [(["--out", str(out), "--resume", "--variant", "rbase"], "cannot change variant"),
                         (["--preset", "smoke", "--out", str(out)], "already holds a run"),
                         (["--preset", "paper", "--out", str(tmp_path / "paper")], "--data-root")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    with pytest.raises(SystemExit):
        main(["--preset", "smoke", "--no-such-field", "1"])


def test_paper_preset_trains_on_an_iharmony4_tree(tmp_path):
    from regharm_ext.data.synth import export

    export(tmp_path / "ihd", n=4, n_train=8, subsets=("HFlickr", "Hday2night"), size=64)
    out = tmp_path / "run"
    assert main(["--preset", "paper", "--data-root", str(tmp_path / "ihd"), "--out", str(out),
                 "--input-size", "64", "--base-channels", "4", "--epochs", "2", "--lr-milestones", "1",
                 "--progress", "false"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([1e-3, 1e-4])        # ÷10 after the milestone
    assert [r["images"] for r in log] == [16, 16]                        # 2 subsets x 8 images
    val = json.loads((out / "val.json").read_text())
    assert set(val["results"][0]["subsets"]) == {"HFlickr", "Hday2night", "All"}


def test_iharmony4_picks_its_best_checkpoint_on_held_out_training_images(tmp_path):
    """--val-every never scores the test split (a checkpoint picked there makes the test table
    optimistic): --holdout training images are kept out of training and scored instead."""
    from regharm_ext.data.synth import export
    from regharm_ext.train import _datasets, preset_config

    export(tmp_path / "ihd", n=2, n_train=8, subsets=("HFlickr", "Hday2night"), size=64)
    out = tmp_path / "run"
    args = ["--preset", "paper", "--data-root", str(tmp_path / "ihd"), "--out", str(out), "--input-size", "64",
            "--base-channels", "4", "--epochs", "2", "--progress", "false", "--val-every", "1",
            "--holdout", "4", "--eval-batch-size", "4"]
    assert main(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["images"] for r in log] == [12, 12] and all("val_fmse" in r for r in log)
    assert (out / "best.json").is_file()
    cfg = preset_config("paper", data_root=str(tmp_path / "ihd"), input_size=64, holdout=4, val_every=1)
    train, val, select = _datasets(cfg)
    names = lambda ds: {ds.dataset.items[i][:2] for i in ds.indices}   # (subset, file)  # noqa: E731
    assert len(select) == 4 and not names(train) & names(select)
    assert len(names(train) | names(select)) == 16 and all(n.startswith("t") for _, n in names(select))
    assert {item[1][0] for item in val.items} == {"v"}   # the table: the test split alone


def test_holdout_keeps_every_composite_of_a_held_out_real_image_out(tmp_path):
    """iHarmony4 has several composites per real image (masks, appearance shifts): holding out
    composites one by one trained on the held-out targets through their siblings."""
    import shutil
    from regharm_ext.data.synth import export
    from regharm_ext.train import ConfigError, _datasets, preset_config

    root = tmp_path / "ihd"
    export(root, n=1, n_train=6, subsets=("HFlickr",), size=32)
    base, lines = root / "HFlickr", []
    for i in range(6):   # three composites per real image: masks 1 and 2, shifts 1 and 2
        sid = f"t{i:05d}"
        shutil.copy(base / "masks" / f"{sid}_1.png", base / "masks" / f"{sid}_2.png")
        for extra in ("_1_2", "_2_1"):
            shutil.copy(base / "composite_images" / f"{sid}_1_1.jpg", base / "composite_images" / f"{sid}{extra}.jpg")
        lines += [f"{sid}{k}.jpg" for k in ("_1_1", "_1_2", "_2_1")]
    (base / "HFlickr_train.txt").write_text("".join(f"{x}\n" for x in lines))
    for holdout in (1, 4, 7):
        cfg = preset_config("paper", data_root=str(root), input_size=32, holdout=holdout, val_every=1)
        train, _, select = _datasets(cfg)
        real = lambda ds: {ds.dataset.paths(i)[2] for i in ds.indices}   # noqa: E731
        assert not real(train) & real(select)
        assert len(select) == 3 * -(-holdout // 3) and len(train) + len(select) == 18
    with pytest.raises(ConfigError, match="keeps out every one of the 6 real images"):
        _datasets(preset_config("paper", data_root=str(root), input_size=32, holdout=17, val_every=1))
