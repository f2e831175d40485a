"""The runnable examples in python/ run as a user runs them (a fresh interpreter from the
repository root) and do what their docstrings say."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "regharm_ext" / "data" / "photos"


def _run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_harmonize_features_example():
    out = _run("python/harmonize_features.py")
    assert "backends on cpu:" in out
    changes = dict(re.findall(r"(PTL|LTL): forward\+backward [\d.]+ ms; mean \|change\| inside the "
                              r"mask ([\d.]+)", out))
    assert set(changes) == {"PTL", "LTL"}, out
    assert all(float(v) > 0 for v in changes.values()), out
    # PTL leaves the background alone (x' = bg * x + m * T_fb with a binary mask)
    assert re.search(r"PTL: .* outside 0\.000\b", out), out


def test_harmonize_image_example(tmp_path):
    photo = sorted(PHOTOS.glob("*.jpg"))[0]  # a validation photo: the weights never saw it
    image = Image.open(photo).convert("RGB").resize((200, 150))
    real = np.asarray(image)
    mask = np.zeros((150, 200), np.uint8)
    mask[40:110, 60:150] = 255
    # a composite: the foreground region darkened and tinted
    comp = real.copy()
    region = comp[40:110, 60:150].astype(np.float32) * [0.6, 0.7, 1.1]
    comp[40:110, 60:150] = region.clip(0, 255).astype(np.uint8)
    comp_path, mask_path, out_path = tmp_path / "comp.png", tmp_path / "mask.png", tmp_path / "out.png"
    Image.fromarray(comp).save(comp_path)
    Image.fromarray(mask).save(mask_path)

    out = _run("python/harmonize_image.py", comp_path, mask_path, out_path)
    assert "model ->" in out
    result = np.asarray(Image.open(out_path))
    assert result.shape == comp.shape
    outside = mask == 0
    np.testing.assert_array_equal(result[outside], comp[outside])
    # inside, the default weights undo much of the shift (measured: MSE 903 -> 367 on 0-255)
    fg = ~outside
    err_comp = ((comp[fg].astype(float) - real[fg]) ** 2).mean()
    err_out = ((result[fg].astype(float) - real[fg]) ** 2).mean()
    assert err_out < 0.8 * err_comp, (err_out, err_comp)


def test_harmonize_image_example_reads_files_like_the_cli(tmp_path):
    """An EXIF-rotated photo with a 0/1 label mask drawn on it as shown, written to a folder that
    does not exist yet: handled as `harmonize` handles them; an empty mask is refused in one line."""
    photo = sorted(PHOTOS.glob("*.jpg"))[0]
    image = Image.open(photo).convert("RGB").resize((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6                                     # shown rotated: 64 wide, 96 high
    comp_path = tmp_path / "rotated.jpg"
    image.save(comp_path, quality=95, exif=exif)
    labels = np.zeros((96, 64), np.uint8)
    labels[20:70, 10:50] = 1
    mask_path, out_path = tmp_path / "labels.png", tmp_path / "new" / "out.png"
    Image.fromarray(labels).save(mask_path)

    assert "model ->" in _run("python/harmonize_image.py", comp_path, mask_path, out_path)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(comp_path)).convert("RGB"))
    result = np.asarray(Image.open(out_path))
    assert result.shape == shown.shape
    assert np.array_equal(result[labels == 0], shown[labels == 0])
    assert (result[labels == 1] != shown[labels == 1]).any()   # the label-1 pixels were corrected

    Image.fromarray(np.zeros_like(labels)).save(mask_path)
    proc = subprocess.run([sys.executable, "python/harmonize_image.py", str(comp_path), str(mask_path),
                           str(tmp_path / "empty.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: ") and "is empty" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "empty.png").exists()


def test_harmonize_image_example_refuses_bad_arguments(tmp_path):
    """The example refuses, in one line and before any work, a missing argument and an OUT that
    is its IMAGE (it would have overwritten the user's photo)."""
    photo = sorted(PHOTOS.glob("*.jpg"))[0]
    comp_path, mask_path = tmp_path / "comp.png", tmp_path / "mask.png"
    Image.open(photo).convert("RGB").resize((64, 48)).save(comp_path)
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(mask_path)
    before = comp_path.read_bytes()
    for args, expect in [((comp_path, mask_path), "usage: "),
                         ((comp_path, mask_path, comp_path), "error: OUT ")]:
        proc = subprocess.run([sys.executable, "python/harmonize_image.py", *map(str, args)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and proc.stderr.strip().startswith(expect), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "is the IMAGE file" in proc.stderr and comp_path.read_bytes() == before
