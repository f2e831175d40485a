"""The harmonize CLI: any image size, exact background, contribution maps, folder mode, and
one-line rejections that leave no output file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from regharm_ext import harmonize as hz
from regharm_ext.data.photo_set import PHOTO_DIR

from data_helpers import tiny_checkpoint, tiny_harmonizer

REPO = Path(__file__).resolve().parents[1]


def _pair(d: Path, size=(1000, 750), name="comp"):
    img = Image.open(PHOTO_DIR / "explore_monuments__colosseum.jpg").convert("RGB").resize(size)
    img.save(d / f"{name}.jpg", quality=92)
    mask = Image.new("L", size, 0)
    w, h = size
    ImageDraw.Draw(mask).ellipse((w * 0.3, h * 0.25, w * 0.6, h * 0.7), fill=255)
    mask.save(d / f"{name}_mask.png")
    return d / f"{name}.jpg", d / f"{name}_mask.png"


def test_cli_keeps_size_and_background_exactly(tmp_path):
    image, mask = _pair(tmp_path)
    ck = tiny_checkpoint(tmp_path / "tiny.safetensors", input_size=64, head_std=0.05)
    out, explain = tmp_path / "out.png", tmp_path / "map.png"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "regharm_ext.harmonize", "--checkpoint", str(ck),
                           "--image", str(image), "--mask", str(mask), "--out", str(out),
                           "--explain", str(explain)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(out), str(explain)]  # what was written, as in folder mode
    src = np.asarray(Image.open(image).convert("RGB"))
    res = Image.open(out)
    assert res.size == (1000, 750) and res.mode == "RGB"
    res = np.asarray(res)
    m = np.asarray(Image.open(mask)) > 0
    assert np.array_equal(res[~m], src[~m])
    assert (res[m] != src[m]).any()  # the (random) residual did change the foreground
    ex = Image.open(explain)
    assert ex.size == (1000, 750)


def test_soft_mask_values_are_weights(tmp_path):
    model = tiny_harmonizer(input_size=64, head_std=0.1)
    img = np.asarray(Image.open(_pair(tmp_path, (96, 80))[0]).convert("RGB")).copy()
    mask = np.zeros((80, 96), np.uint8)
    mask[20:60, 30:70] = 255
    mask[20:60, 25:30] = 100  # a soft edge
    out = hz.harmonize_array(model, img, mask)
    full = out[20:60, 30:70].astype(int) - img[20:60, 30:70]
    edge = out[20:60, 25:30].astype(int) - img[20:60, 25:30]
    assert np.array_equal(out[mask == 0], img[mask == 0])
    assert np.abs(edge).mean() < np.abs(full).mean()
    assert np.abs(edge).sum() > 0


def _run_main(args, capsys):
    rc = hz.main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", ["size", "unreadable", "empty", "missing", "not_image"])
def test_rejections_are_one_line_with_no_output(case, tmp_path, capsys, monkeypatch):
    image, mask = _pair(tmp_path, (120, 90))
    monkeypatch.setattr(hz, "_load_model", lambda ck, dev, backend=None: tiny_harmonizer(input_size=64))
    if case == "size":
        Image.new("L", (121, 90), 255).save(mask)
        expect = "same size"
    elif case == "unreadable":
        mask.write_bytes(b"\x89PNG\r\n\x1a\n broken")
        expect = "cannot read mask"
    elif case == "empty":
        Image.new("L", (120, 90), 127).save(mask)
        expect = "empty"
    elif case == "missing":
        image = tmp_path / "nope.jpg"
        expect = "not found"
    else:
        image.write_text("hello")
        expect = "cannot read image"
    out = tmp_path / "out.png"
    rc, err = _run_main(["--image", image, "--mask", mask, "--out", out], capsys)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.png")]


def test_explain_needs_ptl(tmp_path, capsys, monkeypatch):
    image, mask = _pair(tmp_path, (64, 64))
    monkeypatch.setattr(hz, "_load_model", lambda ck, dev, backend=None: tiny_harmonizer(input_size=64, variant="rbase"))
    rc, err = _run_main(["--image", image, "--mask", mask, "--out", tmp_path / "o.png",
                         "--explain", tmp_path / "m.png"], capsys)
    assert rc != 0 and "PTL" in err and not (tmp_path / "o.png").exists()


def test_folder_mode(tmp_path, capsys, monkeypatch):
    src, dst, maps = tmp_path / "in", tmp_path / "out", tmp_path / "maps"
    src.mkdir()
    _pair(src, (100, 70), "a")
    _pair(src, (64, 96), "b")
    Image.new("RGB", (50, 50)).save(src / "lonely.jpg")  # no mask: reported, the others go on
    monkeypatch.setattr(hz, "_load_model", lambda ck, dev, backend=None: tiny_harmonizer(input_size=64, head_std=0.05))
    rc = hz.main([str(a) for a in ["--input-dir", src, "--out-dir", dst, "--explain-dir", maps]])
    out, err = capsys.readouterr()
    assert rc == 1 and "lonely" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in dst.iterdir()) == ["a.png", "b.png"]
    # what was written, results and maps, as single mode lists them
    assert out.split() == [str(dst / "a.png"), str(maps / "a.png"), str(dst / "b.png"), str(maps / "b.png")]
    assert Image.open(dst / "b.png").size == (64, 96) and Image.open(maps / "a.png").size == (100, 70)


# --------------------------------------------------------------------------- output paths
def _tiny(monkeypatch, calls=None):
    def load(ck, dev, backend=None):
        if calls is not None:
            calls.append(1)
        return tiny_harmonizer(input_size=64, head_std=0.05)
    monkeypatch.setattr(hz, "_load_model", load)


@pytest.mark.parametrize("explain, expect", [
    ("o.xyz", "cannot tell the image format of --explain"),
    ("afile/map.png", "afile is a file, not a folder"),
    ("afile/sub/map.png", "so folder"),
    ("o.png", "the map would overwrite"),
    ("o.h5", "cannot write --explain"),
    ("o.xbm", "cannot write --explain"),
])
def test_a_bad_explain_path_writes_no_result(explain, expect, tmp_path, capsys, monkeypatch):
    image, mask = _pair(tmp_path, (64, 48))
    (tmp_path / "afile").write_text("a plain file")
    calls = []
    _tiny(monkeypatch, calls)
    rc, err = _run_main(["--image", image, "--mask", mask, "--out", tmp_path / "o.png",
                         "--explain", tmp_path / explain], capsys)
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists() and not calls, "checked before any work"


def test_folder_mode_checks_the_output_folders_first(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    _pair(src, (64, 48), "t")
    (tmp_path / "afile").write_text("a plain file")
    _tiny(monkeypatch)
    rc, err = _run_main(["--input-dir", src, "--out-dir", tmp_path / "out", "--explain-dir",
                         tmp_path / "afile"], capsys)
    assert rc == 2 and "--explain-dir" in err and "is a file, not a folder" in err, err
    assert not (tmp_path / "out").exists()
    rc, err = _run_main(["--input-dir", src, "--out-dir", tmp_path / "out", "--explain-dir",
                         tmp_path / "out"], capsys)
    assert rc == 2 and "--explain-dir" in err and "is the --out-dir" in err, err
    rc, err = _run_main(["--input-dir", tmp_path / "afile", "--out-dir", tmp_path / "out"], capsys)
    assert rc == 2 and "is a file, not a folder" in err, err


def test_outputs_get_the_usual_permissions(tmp_path, capsys, monkeypatch):
    image, mask = _pair(tmp_path, (64, 48))
    _tiny(monkeypatch)
    old = os.umask(0o027)
    try:
        rc, err = _run_main(["--image", image, "--mask", mask, "--out", tmp_path / "o.png",
                             "--explain", tmp_path / "m.png"], capsys)
    finally:
        os.umask(old)
    assert rc == 0, err
    for name in ("o.png", "m.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~0o027, name


def _folder(tmp_path, *names):
    src = tmp_path / "in"
    src.mkdir()
    img = Image.new("RGB", (64, 48), (120, 90, 60))
    mask = Image.new("L", (64, 48), 0)
    ImageDraw.Draw(mask).rectangle((10, 10, 40, 30), fill=255)
    for n in names:
        (mask if Path(n).stem.endswith("_mask") else img).save(src / n)
    return src


@pytest.mark.parametrize("names, expect", [
    (["a.jpg", "a.png", "a_mask.png"], "{src}/a.jpg and {src}/a.png would both be written as a.png"),
    (["d.jpg", "d_mask.jpg", "d_mask.png"], "{src}/d_mask.jpg and {src}/d_mask.png are masks for the same image d"),
])
def test_folder_mode_refuses_clashing_names_up_front(names, expect, tmp_path, capsys, monkeypatch):
    src = _folder(tmp_path, *names)
    _tiny(monkeypatch)
    rc, err = _run_main(["--input-dir", src, "--out-dir", tmp_path / "out"], capsys)
    assert rc == 2 and expect.format(src=src) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_folder_mode_never_overwrites_an_input(tmp_path, capsys, monkeypatch):
    src = _folder(tmp_path, "a.png", "a_mask.png", "b.jpg", "b_mask.png")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    _tiny(monkeypatch)
    rc, err = _run_main(["--input-dir", src, "--out-dir", src], capsys)
    assert rc == 2 and f"{src}/a.png would overwrite the input {src}/a.png" in err, err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_folder_mode_reads_gifs_and_notes_orphan_masks(tmp_path, capsys, monkeypatch):
    src = _folder(tmp_path, "g.gif", "g_mask.png", "x_mask.png")
    _tiny(monkeypatch)
    rc, err = _run_main(["--input-dir", src, "--out-dir", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert err.strip() == f"note: skipping {src}/x_mask.png: no image x.<ext> beside it"
    assert Image.open(tmp_path / "out" / "g.png").size == (64, 48)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "0.5"])
def test_max_pixels_must_be_a_finite_count(value, tmp_path, capsys):
    image, mask = _pair(tmp_path, (64, 48))
    with pytest.raises(SystemExit) as exc:
        hz.main(["--image", str(image), "--mask", str(mask), "--out", str(tmp_path / "o.png"),
                 "--max-pixels", value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--max-pixels must be a finite number" in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_small_pixel_limits_print_significant_digits(tmp_path):
    image, mask = _pair(tmp_path, (64, 48))
    with pytest.raises(hz.InputError, match=r"= 0\.00307 megapixels, above the limit of 0\.003 megapixels"):
        hz.load_pair(image, mask, max_pixels=3000)


def test_an_empty_looking_16bit_tiff_mask_says_why(tmp_path):
    """A mode I TIFF holding 0/255 (as some tools write label masks) scales to 0/1 like 16-bit."""
    image, mask = _pair(tmp_path, (64, 48))
    m = (np.asarray(Image.open(mask)) > 0).astype(np.int32) * 255
    tif = tmp_path / "m.tif"
    Image.fromarray(m).save(tif)
    assert Image.open(tif).mode == "I"
    # refused when read (the dataset loader refuses it too), before the empty-mask check
    with pytest.raises(hz.InputError, match=r"m\.tif: its pixels are 16-bit .* largest, 255, .* 8 bits per "
                                            r"pixel, or scale it to 0\.\.65535"):
        hz.load_pair(image, tif)


def test_outputs_are_written_all_or_none(tmp_path, capsys, monkeypatch):
    """The disk fills up while the second output (--explain) is encoded: neither file is left
    (the harmonized image used to stay), no temporary file either, and the error names the
    output that failed."""
    from PIL import Image as PILImage

    image, mask = _pair(tmp_path, (64, 48))
    _tiny(monkeypatch)
    save, calls = PILImage.Image.save, []

    def full_disk(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", full_disk)
    rc, err = _run_main(["--image", image, "--mask", mask, "--out", tmp_path / "o.png",
                         "--explain", tmp_path / "m.png"], capsys)
    assert rc == 2 and "cannot write --explain" in err and "No space left on device" in err, err
    assert len(calls) == 2
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "m.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(PILImage.Image, "save", save)
    rc, err = _run_main(["--image", image, "--mask", mask, "--out", tmp_path / "o.png",
                         "--explain", tmp_path / "m.png"], capsys)
    assert rc == 0 and (tmp_path / "o.png").is_file() and (tmp_path / "m.png").is_file(), err


def test_outputs_keep_the_inputs_rgb_colour_profile(tmp_path, capsys, monkeypatch):
    """A photo with a colour profile (Display P3 and the like) gets it back on the result and the
    map, single and folder mode: without it the whole picture, background included, would be
    shown in other colours. A profile of another colour space (here Lab) is not copied."""
    from PIL import ImageCms
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    src = tmp_path / "in"
    src.mkdir()
    for name, icc in (("a", srgb), ("b", lab)):
        image, _ = _pair(src, (64, 48), name)
        Image.open(image).save(image, quality=92, icc_profile=icc)
    _tiny(monkeypatch)
    out, maps = tmp_path / "out", tmp_path / "maps"
    assert hz.main([str(a) for a in ["--input-dir", src, "--out-dir", out, "--explain-dir", maps]]) == 0
    assert Image.open(out / "a.png").info.get("icc_profile") == srgb
    assert Image.open(maps / "a.png").info.get("icc_profile") == srgb
    assert "icc_profile" not in Image.open(out / "b.png").info
    single = tmp_path / "single.jpg"
    assert hz.main([str(a) for a in ["--image", src / "a.jpg", "--mask", src / "a_mask.png",
                                     "--out", single]]) == 0
    assert Image.open(single).info.get("icc_profile") == srgb


def test_a_grey_composite_stays_grey(tmp_path):
    """Three equal channels in, three equal channels out: the foreground changes in tone only
    (the network, trained on colour photos, tinted it)."""
    image, mask = _pair(tmp_path, (96, 64))
    img = np.repeat(np.asarray(Image.open(image).convert("L"))[..., None], 3, axis=2)
    m = np.asarray(Image.open(mask))
    out = hz.harmonize_array(tiny_harmonizer(input_size=64, head_std=0.05), img, m)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.array_equal(out[m == 0], img[m == 0]) and (out[m > 127] != img[m > 127]).any()


def test_harmonize_array_refuses_what_it_cannot_read_rightly():
    """The array API takes what load_pair returns; a mask of another size (it returned rows of
    uninitialised memory), float or 0/1 data (silently wrong), tensors and channel axes are
    refused with the fix."""
    import torch
    model = tiny_harmonizer(input_size=64, head_std=0.05)
    img = np.full((80, 72, 3), 100, np.uint8)
    mask = np.zeros((80, 72), np.uint8)
    mask[20:50, 10:40] = 255
    for args, error, match in [
        ((img, mask[:70]), ValueError, "image 72x80 and mask 72x70 .* must have one size"),
        ((img / 255.0, mask), TypeError, r"image must be uint8 .* \(image \* 255\).round\(\)"),
        ((img, mask / 255.0), TypeError, "mask must be uint8"),
        ((img, mask // 255), ValueError, r"mask holds only 0 and 1: .* \(mask \* 255\)"),
        ((img, mask[..., None]), ValueError, r"mask must have shape \(H, W\), got \(80, 72, 1\)"),
        ((img[..., 0], mask), ValueError, r"image must have shape \(H, W, 3\), got \(80, 72\)"),
        ((torch.from_numpy(img), mask), TypeError, "for torch tensors: regharm_ext.inference.harmonize_tensor"),
    ]:
        with pytest.raises(error, match=match):
            hz.harmonize_array(model, *args)


def test_harmonize_array_runs_a_16_bit_model():
    import torch
    model = tiny_harmonizer(input_size=64, head_std=0.05)
    image, mask = _pair_arrays()
    want = hz.harmonize_array(model, image, mask)
    got = hz.harmonize_array(model.to(torch.bfloat16), image, mask)
    assert np.array_equal(got[mask == 0], image[mask == 0])
    assert np.abs(got.astype(int) - want).max() <= 8   # bfloat16's 8 bits of mantissa
    assert hz.contribution_map(model, image, mask).shape == mask.shape


def _pair_arrays():
    img = np.random.default_rng(0).integers(0, 256, (80, 72, 3), dtype=np.uint8)
    mask = np.zeros((80, 72), np.uint8)
    mask[20:50, 10:40] = 255
    return img, mask
