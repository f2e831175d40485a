"""Sample sheets (regharm_ext.samples): layout, what each tile shows, and the evaluate/train
outputs that use them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from regharm_ext.evaluate import main as evaluate_main
from regharm_ext.samples import CAPTION, OUTLINE, sample_sheet, save_sheet, spread
from regharm_ext.train import preset_config, train


def test_spread_is_even_and_bounded():
    assert spread(10, 4) == [0, 3, 6, 9]
    assert spread(3, 8) == [0, 1, 2]
    assert spread(5, 1) == [0] and spread(5, 0) == [] and spread(0, 3) == []


class _Squares(torch.utils.data.Dataset):
    """Grey composites with a square foreground, real images a shade lighter."""

    def __init__(self, n=5, size=32):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        s = self.size
        mask = torch.zeros(1, s, s)
        mask[:, 8:24, 8:24] = 1
        comp = torch.full((3, s, s), 0.25 + 0.1 * i)
        return {"comp": comp, "mask": mask, "real": comp + 0.1 * mask, "name": f"sq{i}", "subset": "S"}


def _tile(sheet: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    """The image part (caption excluded) of one tile of a sheet."""
    top = CAPTION + row * (size + CAPTION)
    return sheet[top:top + size, col * size:(col + 1) * size]


def test_sheet_layout_and_tiles():
    ds, s = _Squares(), 32
    white = lambda comp, mask: torch.ones_like(comp)  # noqa: E731
    sheet = sample_sheet(ds, [("white", white), ("identity", lambda c, m: c)], count=3)
    assert sheet.size == (4 * s, CAPTION + 3 * (s + CAPTION))
    px = np.asarray(sheet)
    rows = spread(len(ds), 3)
    for r, i in enumerate(rows):
        item = ds[i]
        comp = _tile(px, r, 0, s)
        expected = round(255 * float(item["comp"][0, 0, 0]))
        assert (comp[0, 0] == expected).all()                      # background untouched
        assert (comp[8, 12] == OUTLINE).all()                      # the mask's edge is outlined
        assert (comp[16, 16] == expected).all()                    # its inside is not
        assert (_tile(px, r, 1, s) == 255).all()                   # the "white" method
        assert (_tile(px, r, 2, s) == comp[0, 0]).all()            # the identity method
        real = _tile(px, r, 3, s)
        assert (real[16, 16] == round(255 * float(item["real"][0, 16, 16]))).all()
    # captions and the header are drawn (white text on black bands)
    assert px[:CAPTION].max() > 200 and px[CAPTION + s:2 * CAPTION + s].max() > 200


def test_sheet_refuses_an_empty_dataset():
    with pytest.raises(ValueError, match="no images"):
        sample_sheet(_Squares(n=0), [])


def test_save_sheet_replaces_the_file_whole(tmp_path):
    path = tmp_path / "s.png"
    save_sheet(Image.new("RGB", (4, 4)), path)
    save_sheet(Image.new("RGB", (6, 5), (9, 9, 9)), path)
    assert Image.open(path).size == (6, 5) and [p.name for p in tmp_path.iterdir()] == ["s.png"]


def test_evaluate_cli_writes_samples(tmp_path, capsys):
    out = tmp_path / "sheet.png"
    rc = evaluate_main(["--method", "composite", "reinhard", "--size", "64", "--val-length", "5",
                        "--samples", str(out), "--samples-count", "2", "--no-progress"])
    assert rc == 0 and str(out) in capsys.readouterr().err
    # composite (first column), reinhard, real: the composite method adds no column of its own
    assert Image.open(out).size == (3 * 64, CAPTION + 2 * (64 + CAPTION))
    bad = tmp_path / "sheet.jpg"
    rc = evaluate_main(["--method", "composite", "--val-length", "2", "--samples", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and ".png" in err and len(err.strip().splitlines()) == 1 and not bad.exists()


def test_training_writes_samples_and_survives_a_failed_write(tmp_path, monkeypatch, capsys):
    cfg = dict(epochs=2, val_images=4)
    train(preset_config("smoke", **cfg), tmp_path / "ok")
    sheet = Image.open(tmp_path / "ok" / "samples.png")   # the final one: composite, model, reinhard, real
    assert sheet.size[0] == 4 * 256 and sheet.size[1] == CAPTION + 4 * (256 + CAPTION)

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("regharm_ext.samples.save_sheet", fail)
    result = train(preset_config("smoke", **cfg), tmp_path / "full")
    assert result["stopped"] == "done" and result["val"] is not None
    assert "could not write" in capsys.readouterr().err and not (tmp_path / "full" / "samples.png").exists()


def test_training_sends_the_sheet_to_tensorboard(tmp_path, monkeypatch):
    """With TensorBoard installed the sheet also goes to its event file (a stand-in writer here:
    TensorBoard is optional and CI does not install it)."""
    calls = []

    class Writer:
        def add_scalar(self, *a, **k):
            pass

        def add_image(self, tag, img, step, dataformats):
            calls.append((tag, img.shape, img.dtype, step, dataformats))

        def close(self):
            pass
    monkeypatch.setattr("regharm_ext.train._tensorboard", lambda run_dir: Writer())
    train(preset_config("smoke", epochs=2, validate=False), tmp_path)
    assert [c[0] for c in calls] == ["samples", "samples"] and [c[3] for c in calls] == [2, 4]
    tag, shape, dtype, _, fmt = calls[0]
    assert fmt == "HWC" and shape[2] == 3 and dtype == np.uint8
