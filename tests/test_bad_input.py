"""Bad input in the harmonize CLI and in the iHarmony4 loader / evaluate CLI: every case is either
refused with one line naming the file (non-zero exit, no output written, nothing decoded when
the headers already tell) or converted as documented in regharm_ext/data/image_file.py.

The case lists below also generate the failure-mode table of README.md
(tests/failure_modes.py)."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from regharm_ext import harmonize as hz
from regharm_ext.data import image_file
from regharm_ext.data.iharmony4 import DataError, IHarmony4
from regharm_ext.evaluate import evaluate
from regharm_ext.evaluate import main as evaluate_main
from regharm_ext.losses import fmse_loss
from regharm_ext.metrics import image_metrics

from data_helpers import export_tree, tiny_harmonizer

W, H = 96, 72


# --------------------------------------------------------------------------- file builders
def _rgb(w=W, h=H, seed=0) -> np.ndarray:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return np.clip(base + g.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _mask(w=W, h=H, value=255) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = value
    return m


def _png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG (gray [H, W] or RGB [H, W, 3] uint16), written by hand: Pillow cannot write
    16-bit colour PNGs."""
    h, w = a.shape[:2]
    colour = {2: 0, 3: 2}[a.ndim]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _huge_png_header(w: int, h: int) -> bytes:
    """A valid 8x8 PNG whose header claims ``w`` x ``h`` pixels (decoding it would need w·h bytes)."""
    b = io.BytesIO()
    Image.new("L", (8, 8)).save(b, "PNG")
    d = bytearray(b.getvalue())
    ihdr = bytes(d[12:16]) + struct.pack(">II", w, h) + bytes(d[24:29])
    d[12:29] = ihdr
    d[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(d)


def _jpeg_bytes(a: np.ndarray, **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


def _save(path: Path, a: np.ndarray, fmt="PNG", **kw) -> Path:
    Image.fromarray(a).save(path, fmt, **kw)
    return path


# --------------------------------------------------------------------------- harmonize: refusals
class Refusal(NamedTuple):
    id: str
    situation: str          # the docs' wording of the input
    expect: str             # a fragment of the one-line message
    build: Callable         # (dir, image path, mask path) -> (image path, mask path, extra CLI args)


def _replace(which, data):
    def build(d, image, mask):
        target = image if which == "image" else mask
        target.write_bytes(data() if callable(data) else data)
        return image, mask, []
    return build


def _truncated_jpeg():
    d = _jpeg_bytes(_rgb())
    return d[: len(d) * 6 // 10]


def _truncated_png():
    b = io.BytesIO()
    Image.fromarray(_rgb()).save(b, "PNG")
    return b.getvalue()[: len(b.getvalue()) // 2]


def _corrupt_jpeg():
    d = bytearray(_jpeg_bytes(_rgb()))
    d[len(d) // 2: len(d) // 2 + 64] = b"\xff" * 64      # a damaged entropy-coded segment
    return bytes(d)


def _float_tiff(d, image, mask):
    image = d / "float.tif"
    Image.fromarray(np.random.default_rng(0).random((H, W)).astype(np.float32)).save(image)
    return image, mask, []


def _colour_mask(d, image, mask):
    m = np.zeros((H, W, 3), np.uint8)
    m[..., 2] = 200                                       # blue background
    m[_mask() > 0] = (255, 0, 0)                          # red foreground
    _save(mask, m)
    return image, mask, []


def _size_mismatch(d, image, mask):
    _save(mask, _mask(W + 1, H))
    return image, mask, []


def _exif_mismatch(d, image, mask):
    """The image is stored 96x72 but shown (EXIF orientation 6) as 72x96; the mask is 96x72."""
    exif = Image.Exif()
    exif[0x0112] = 6
    image = d / "rotated.jpg"
    Image.fromarray(_rgb()).save(image, quality=90, exif=exif)
    return image, mask, []


def _mask_value(value):
    def build(d, image, mask):
        _save(mask, np.full((H, W), value, np.uint8) if value is not None else _mask())
        return image, mask, []
    return build


def _directory(d, image, mask):
    folder = d / "folder.png"
    folder.mkdir()
    return folder, mask, []


def _missing(d, image, mask):
    return d / "nope.jpg", mask, []


def _max_pixels(d, image, mask):
    return image, mask, ["--max-pixels", "5000"]


def _bomb(d, image, mask):
    image.write_bytes(_huge_png_header(60000, 60000))   # 3.6 gigapixels, 10.8 GB once decoded
    mask.write_bytes(_huge_png_header(60000, 60000))
    return image, mask, []


def _unknown_out(d, image, mask):
    return image, mask, ["--out", str(d / "out.xyz")]


def _extra(*args):
    """Extra CLI arguments (paths relative to the test folder); the last --out wins."""
    def build(d, image, mask):
        return image, mask, [str(d / a) if a.endswith((".png", ".xyz", ".xbm", ".h5")) else a
                             for a in args]
    return build


def _explain_under_file(d, image, mask):
    (d / "afile").write_text("a plain file")
    return image, mask, ["--explain", str(d / "afile" / "map.png")]


def _out_is_image(d, image, mask):
    return image, mask, ["--out", str(image)]


def _mask16_255(d, image, mask):
    """0/255 stored in a 16-bit PNG: 255/65535 scales to 1, below the foreground threshold."""
    mask.write_bytes(_png16(_mask().astype(np.uint16)))
    return image, mask, []


REFUSALS = [
    Refusal("missing", "image or mask file missing", "image not found", _missing),
    Refusal("directory", "a folder given as the image", "image is not a file", _directory),
    Refusal("empty_file", "empty (0-byte) file", "not an image file", _replace("image", b"")),
    Refusal("not_image", "not an image (a text file)", "not an image file", _replace("image", b"hello, world\n")),
    Refusal("truncated_jpeg", "truncated JPEG", "file is truncated", _replace("image", _truncated_jpeg)),
    Refusal("truncated_png", "truncated PNG", "file is truncated", _replace("image", _truncated_png)),
    Refusal("corrupt_jpeg", "corrupt JPEG data (damaged entropy-coded segment)", "cannot read image",
            _replace("image", _corrupt_jpeg)),
    Refusal("corrupt_mask", "corrupt mask file (PNG signature, broken body)", "cannot read mask",
            _replace("mask", b"\x89PNG\r\n\x1a\n broken")),
    Refusal("float_image", "32-bit float image (TIFF mode F)", "32-bit float pixels", _float_tiff),
    Refusal("colour_mask", "colour picture as the mask", "is a colour image", _colour_mask),
    Refusal("size_mismatch", "image and mask of different sizes", "must have the same size", _size_mismatch),
    Refusal("exif_mismatch", "mask drawn on the stored pixels of an EXIF-rotated image",
            "must have the same size", _exif_mismatch),
    Refusal("empty_mask", "empty mask (all 0)", "is empty", _mask_value(0)),
    Refusal("weak_mask", "mask with no value above 127 (all 127)", "is empty", _mask_value(127)),
    Refusal("full_mask", "full mask (all 255: no background)", "is full", _mask_value(255)),
    Refusal("mask16_255", "16-bit mask holding 0/255 (scaled to 0/1)",
            "its pixels are 16-bit (0..65535) and the largest, 255, scales to 1 of 255: save the mask with 8 bits",
            _mask16_255),
    Refusal("max_pixels", "image above --max-pixels", "above the limit of 0.005 megapixels", _max_pixels),
    Refusal("bomb", "image whose header claims 60000x60000 (decompression bomb)", "too large", _bomb),
    Refusal("unknown_out", "output file with an unknown extension", "cannot tell the image format", _unknown_out),
    Refusal("unknown_explain", "`--explain` file with an unknown extension (checked before any work)",
            "cannot tell the image format of --explain", _extra("--explain", "map.xyz")),
    Refusal("unwritable_out", "output format Pillow cannot write as RGB (e.g. `.xbm`)",
            "cannot write --out", _extra("--out", "out.xbm")),
    Refusal("explain_under_file", "`--explain` in a folder that is a file", "is a file, not a folder",
            _explain_under_file),
    Refusal("explain_is_out", "`--explain` the same file as `--out`", "the map would overwrite",
            _extra("--explain", "out.png")),
    Refusal("out_is_image", "`--out` the same file as `--image`", "is the --image file", _out_is_image),
]


@pytest.fixture
def pair(tmp_path):
    image = _save(tmp_path / "comp.png", _rgb())
    mask = _save(tmp_path / "comp_mask.png", _mask())
    return tmp_path, image, mask


@pytest.fixture
def no_model(monkeypatch):
    """A tiny model instead of the packaged weights; ``loaded`` tells whether it was asked for."""
    calls = []
    monkeypatch.setattr(hz, "_load_model", lambda ck, dev, backend=None: calls.append(1) or tiny_harmonizer(64, head_std=0.05))
    return calls


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if a pixel buffer is decoded: refusals must come from the headers."""
    def load(self, *a, **k):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def _run(args, capsys):
    rc = hz.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.err


@pytest.mark.parametrize("case", REFUSALS, ids=[c.id for c in REFUSALS])
def test_harmonize_refuses_in_one_line(case, pair, no_model, capsys):
    d, image, mask = pair
    image, mask, extra = case.build(d, image, mask)
    out = d / "out.png"
    args = ["--image", image, "--mask", mask, "--out", out] + extra
    rc, err = _run(args, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and case.expect in lines[0], err
    assert not no_model, "bad inputs and outputs are refused before a model is loaded"
    assert not [p for p in d.iterdir() if p.name.startswith(("out.", ".out."))], "no output file"


@pytest.mark.parametrize("build", [_max_pixels, _bomb, _size_mismatch], ids=["max_pixels", "bomb", "size_mismatch"])
def test_header_refusals_decode_nothing(build, pair, no_decoding):
    d, image, mask = pair
    image, mask, extra = build(d, image, mask)
    limit = int(extra[1]) if extra else None
    with pytest.raises(hz.InputError, match="megapixels|too large|same size"):
        hz.load_pair(image, mask, max_pixels=limit)


def test_not_enough_memory_is_refused_before_decoding(pair, no_decoding, monkeypatch, capsys):
    d, image, mask = pair
    monkeypatch.setattr(image_file, "available_memory", lambda: 64 * 2**20)
    with pytest.raises(hz.InputError, match=r"needs about .* GiB of memory but only 0\.1 GiB"):
        hz.load_pair(image, mask)


_PEAK_RSS = """
import sys
import regharm_ext.harmonize as h

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

assert h.main(sys.argv[1:11]) == 0               # warm-up on a small image: imports, first forward
for lean in (10**12, 0):                         # torch's resize, then Pillow's shrink
    h.LEAN_PIXELS = lean
    with open("/proc/self/clear_refs", "w") as f:    # reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    before = status("VmRSS:")
    assert h.main(sys.argv[11:]) == 0
    print("peak", status("VmHWM:") - before)     # the CLI prints what it wrote on the same stdout
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_memory_estimate_covers_a_real_run(tmp_path):
    """The CLI's peak memory (RSS high-water mark above the RSS before the call) on a 1.5
    megapixel image with --explain stays below memory_needed's estimate (model allowance aside),
    on both resize paths."""
    import subprocess
    import sys
    ck = _tiny_ck(tmp_path)
    args, sizes = [], ((120, 90), (1500, 1000))
    for w, h in sizes:
        image = _save(tmp_path / f"i{w}.bmp", _rgb(w, h), "BMP")     # BMP: fast to read and write
        mask = _save(tmp_path / f"m{w}.bmp", _mask(w, h), "BMP")
        args += ["--checkpoint", str(ck), "--image", str(image), "--mask", str(mask),
                 "--out", str(tmp_path / f"o{w}.bmp"), "--explain", str(tmp_path / f"e{w}.bmp")]
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS] + args, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode and "clear_refs" in proc.stderr:
        pytest.skip("cannot reset the peak RSS here")
    assert proc.returncode == 0, proc.stderr
    peaks = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("peak ")]
    assert len(peaks) == 2, proc.stdout
    w, h = sizes[1]
    estimated = [hz.memory_needed(w, h, True) - hz._MODEL_BYTES]
    estimated.append(estimated[0] - 16 * w * h)               # no float copies on Pillow's path
    for name, peak, est in zip(("torch resize", "Pillow shrink"), peaks, estimated):
        print(f"{name}: peak {peak / 2**20:.0f} MiB = {peak / (w * h):.1f} B/pixel; estimated {est / 2**20:.0f} MiB")
        assert 0 < peak < est


# --------------------------------------------------------------------------- harmonize: conversions
class Conversion(NamedTuple):
    id: str
    situation: str
    outcome: str
    build: Callable         # dir -> (image path, mask path, expected image uint8 [H, W, 3], expected mask uint8 [H, W])


def _conv_image(make, expected):
    def build(d):
        image = make(d)
        mask = _save(d / "m.png", _mask())
        return image, mask, expected(), _mask()
    return build


def _gray(d):
    return _save(d / "g.png", _rgb()[..., 0])


def _rgba(d):
    a = np.concatenate([_rgb(), np.full((H, W, 1), 90, np.uint8)], -1)
    return _save(d / "a.png", a)


def _gray16(d):
    p = d / "g16.png"
    p.write_bytes(_png16(_rgb()[..., 0].astype(np.uint16) * 256 + 100))
    return p


def _rgb16(d):
    p = d / "c16.png"
    p.write_bytes(_png16(_rgb().astype(np.uint16) * 256 + 200))
    return p


def _cmyk(d):
    p = d / "cmyk.jpg"
    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(p, quality=95)
    return p


def _palette_file(d):
    p = d / "p.gif"
    Image.fromarray(_rgb()).quantize(16).save(p)
    return p


def _exif_rotated(d):
    exif = Image.Exif()
    exif[0x0112] = 6                                      # shown rotated 90° clockwise
    p = d / "rot.png"
    Image.fromarray(_rgb(H, W)).save(p, exif=exif)       # stored 72x96, shown 96x72
    return p


def _conv_mask(make, expected_mask):
    def build(d):
        image = _save(d / "i.png", _rgb())
        return image, make(d), _rgb(), expected_mask()
    return build


def _mask01(d):
    return _save(d / "m01.png", _mask(value=1))


def _mask16(d):
    p = d / "m16.png"
    p.write_bytes(_png16(_mask().astype(np.uint16) * 257))
    return p


def _mask_bilevel(d):
    p = d / "m1.png"
    Image.fromarray(_mask() > 0).save(p)                  # mode "1"
    return p


def _mask_cutout(d):
    rgba = np.concatenate([_rgb(seed=5), _mask()[..., None]], -1)   # colours anywhere, alpha = mask
    return _save(d / "cut.png", rgba)


def _mask_gray_jpeg(d):
    p = d / "m.jpg"
    Image.fromarray(np.repeat(_mask()[..., None], 3, 2)).save(p, quality=90)
    return p


def _soft_expected():
    m = _mask()
    m[H // 4: 3 * H // 4, W // 3 - 4: W // 3] = 100       # a soft edge: weights 100/255
    return m


def _mask_soft(d):
    return _save(d / "soft.png", _soft_expected())


CONVERSIONS = [
    Conversion("gray", "grayscale image", "converted to RGB (gray replicated)", _conv_image(
        _gray, lambda: np.repeat(_rgb()[..., :1], 3, 2))),
    Conversion("rgba", "RGBA image", "alpha dropped, colours used as stored", _conv_image(_rgba, _rgb)),
    Conversion("gray16", "16-bit grayscale PNG", "scaled to 8 bits: round(v·255/65535)", _conv_image(
        _gray16, lambda: np.repeat(((_rgb()[..., :1].astype(np.int64) * 256 + 100) * 255 + 32767)
                                   // 65535, 3, 2).astype(np.uint8))),
    Conversion("rgb16", "16-bit colour PNG", "8 bits (Pillow keeps the high byte)", _conv_image(_rgb16, _rgb)),
    Conversion("cmyk", "CMYK JPEG", "converted to RGB by Pillow (no colour management)", _conv_image(
        _cmyk, lambda: np.broadcast_to(np.array([255, 0, 0], np.uint8), (H, W, 3)))),
    Conversion("palette", "palette image (GIF)", "palette expanded to RGB", _conv_image(
        _palette_file, lambda: np.asarray(Image.fromarray(_rgb()).quantize(16).convert("RGB")))),
    Conversion("exif", "image with an EXIF orientation", "rotated as viewers show it", _conv_image(
        _exif_rotated, lambda: np.rot90(_rgb(H, W), -1))),
    Conversion("mask01", "mask with values 0/1 (a label map)", "read as 0/255", _conv_mask(_mask01, _mask)),
    Conversion("mask16", "16-bit mask", "scaled to 8 bits", _conv_mask(_mask16, _mask)),
    Conversion("mask_bilevel", "1-bit mask", "read as 0/255", _conv_mask(_mask_bilevel, _mask)),
    Conversion("mask_cutout", "RGBA cut-out as the mask", "its alpha channel is the mask",
               _conv_mask(_mask_cutout, _mask)),
    Conversion("mask_gray_jpeg", "gray mask saved as an RGB JPEG", "read as gray (JPEG noise stays soft weight)",
               _conv_mask(_mask_gray_jpeg, lambda: np.asarray(Image.open(io.BytesIO(_jpeg_bytes(
                   np.repeat(_mask()[..., None], 3, 2)))).convert("L")))),
    Conversion("mask_soft", "soft mask (values between 0 and 255)", "values are weights m = v/255",
               _conv_mask(_mask_soft, _soft_expected)),
]


@pytest.mark.parametrize("case", CONVERSIONS, ids=[c.id for c in CONVERSIONS])
def test_harmonize_converts_as_documented(case, tmp_path):
    image, mask, want_img, want_mask = case.build(tmp_path)
    img, m = hz.load_pair(image, mask)
    assert img.dtype == np.uint8 and img.shape == want_img.shape and m.shape == want_mask.shape
    if case.id == "cmyk":                                  # JPEG: close to pure red
        assert np.abs(img.astype(int) - want_img).max() <= 3
    else:
        assert np.array_equal(img, want_img)
    assert np.array_equal(m, want_mask)
    out = tmp_path / "out.png"
    assert hz.main(["--image", str(image), "--mask", str(mask), "--out", str(out), "--checkpoint",
                    str(_tiny_ck(tmp_path))]) == 0
    res = np.asarray(Image.open(out))
    assert res.shape == want_img.shape
    assert np.array_equal(res[want_mask == 0], img[want_mask == 0])   # background exact
    assert (res[want_mask == 255] != img[want_mask == 255]).any()     # foreground corrected


def _tiny_ck(d: Path) -> Path:
    from data_helpers import tiny_checkpoint
    p = d / "tiny.safetensors"
    return p if p.exists() else tiny_checkpoint(p, input_size=64, head_std=0.1)


def test_large_images_run_in_strips_like_the_direct_path(monkeypatch):
    """The strip-wise upsampling equals F.interpolate, and the Pillow shrink used above
    LEAN_PIXELS changes the result by at most a few levels."""
    model = tiny_harmonizer(64, head_std=0.1)
    img, mask = _rgb(300, 200), _mask(300, 200)
    direct = hz.harmonize_array(model, img, mask)
    with torch.no_grad():
        raw = model.predict_raw(*hz._model_inputs(model, img, mask, torch.device("cpu")))
    full = torch.nn.functional.interpolate(raw, size=(200, 300), mode="bilinear", align_corners=False)
    up = hz._Upsampler(raw, (200, 300))
    torch.testing.assert_close(torch.cat([up.rows(0, 7), up.rows(7, 200)], 2), full, rtol=0, atol=1e-6)
    monkeypatch.setattr(hz, "STRIP_PIXELS", 1000)          # 3 rows per strip
    monkeypatch.setattr(hz, "LEAN_PIXELS", 10_000)         # Pillow shrink
    lean = hz.harmonize_array(model, img, mask)
    assert np.array_equal(lean[mask == 0], img[mask == 0])
    assert np.abs(lean.astype(int) - direct).max() <= 3
    c = hz.contribution_map(model, img, mask)
    assert c.shape == (200, 300) and abs(float(c.sum()) - 1) < 1e-4
    assert hz.heatmap_overlay(img, c, mask).shape == (200, 300, 3)


# --------------------------------------------------------------------------- datasets
def _tree(tmp_path, n=2):
    return export_tree(tmp_path / "ihd", subsets=("HCOCO",), n=n, n_train=0, size=32)


def _item_files(root, i=0):
    ds = IHarmony4(root, "test", size=32, check_files=False)
    return ds, ds.paths(i)


class DatasetCase(NamedTuple):
    id: str
    situation: str
    expect: str             # DataError message fragment
    build: Callable         # (root, (comp, mask, real)) -> None


def _list_bytes(data):
    def build(root, paths):
        (root / "HCOCO" / "HCOCO_test.txt").write_bytes(data)
    return build


def _rm_list(root, paths):
    (root / "HCOCO" / "HCOCO_test.txt").unlink()
    (root / "IHD_test.txt").unlink()


def _write(which, data):
    def build(root, paths):
        paths[which].write_bytes(data() if callable(data) else data)
    return build


def _ds_bomb(root, paths):
    paths[0].write_bytes(_huge_png_header(60000, 60000))


def _ds_mismatch(root, paths):
    _save(paths[1], _mask(31, 32), "PNG")


DATASET_REFUSALS = [
    DatasetCase("missing_list", "missing list file", "missing list", _rm_list),
    DatasetCase("binary_list", "list file that is not text", "cannot read list", _list_bytes(b"\xff\xfe\x00bad")),
    DatasetCase("bad_entry", "list entry not named <id>_<m>_<k>.jpg", "is not <id>_<m>_<k>.jpg",
                _list_bytes(b"badname.jpg\n")),
    DatasetCase("missing_entry", "listed file missing", "listed file(s) missing", lambda r, p: p[2].unlink()),
    DatasetCase("truncated", "truncated composite", "file is truncated", _write(0, _truncated_jpeg)),
    DatasetCase("not_image", "mask that is not an image", "not an image file", _write(1, b"text")),
    DatasetCase("corrupt", "corrupt real image", "cannot read real image", _write(2, _corrupt_jpeg)),
    DatasetCase("mismatch", "composite/mask size mismatch", "size mismatch", _ds_mismatch),
    DatasetCase("bomb", "image too large (header claims 60000x60000)", "too large", _ds_bomb),
    DatasetCase("mask16_255", "16-bit mask holding 0/255 (weights of 1/255 once scaled)",
                "its pixels are 16-bit (0..65535) and the largest, 255, scales to 1 of 255",
                _write(1, lambda: _png16(_mask(32, 32).astype(np.uint16)))),
]


@pytest.mark.parametrize("case", DATASET_REFUSALS, ids=[c.id for c in DATASET_REFUSALS])
def test_dataset_refuses_naming_file_and_list(case, tmp_path):
    root = _tree(tmp_path)
    _, paths = _item_files(root)
    case.build(root, paths)
    with pytest.raises(DataError) as e:
        IHarmony4(root, "test", size=32)[0]
    msg = str(e.value)
    assert case.expect in msg and len(msg.splitlines()) == 1, msg
    if case.id not in ("missing_list", "binary_list"):
        assert "HCOCO_test.txt" in msg, msg                 # the list line that named it
    else:
        assert "HCOCO_test.txt" in msg or "IHD_test.txt" in msg


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluate_cli_reports_a_bad_file_in_one_line(workers, tmp_path, capsys):
    root = _tree(tmp_path)
    _, paths = _item_files(root, 1)
    paths[0].write_bytes(_truncated_jpeg())
    rc = evaluate_main(["--data-root", str(root), "--method", "composite", "--size", "32", "--no-progress",
                        "--workers", str(workers)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "file is truncated" in lines[0] and "v00001_1_1.jpg" in lines[0] and "Traceback" not in err


def test_dataset_converts_gray_16bit_and_01_masks(tmp_path):
    root = _tree(tmp_path)
    ds, (comp, mask, real) = _item_files(root)
    before = ds[0]
    rgb = (before["comp"] * 255).round().byte().permute(1, 2, 0).numpy()
    comp.write_bytes(_png16(rgb[..., 0].astype(np.uint16) * 257))        # 16-bit gray, PNG under .jpg
    m = (before["mask"][0] > 0.5).numpy().astype(np.uint8)
    _save(mask, m)                                                        # 0/1 label map
    _save(real, (before["real"] * 255).round().byte()[0].numpy())         # 8-bit gray
    it = IHarmony4(root, "test", size=32)[0]
    assert it["comp"].shape == (3, 32, 32) and it["real"].shape == (3, 32, 32)
    assert torch.equal(it["comp"][0], it["comp"][1]) and torch.equal(it["real"][1], it["real"][2])
    assert torch.equal((it["comp"][0] * 255).round().byte(), torch.from_numpy(rgb[..., 0]))
    assert torch.equal(it["mask"][0], torch.from_numpy(m).float())


def test_empty_and_full_masks_keep_loss_and_metrics_finite(tmp_path):
    root = _tree(tmp_path)
    ds, _ = _item_files(root, 0)
    _save(ds.paths(0)[1], np.zeros((32, 32), np.uint8))
    _save(ds.paths(1)[1], np.full((32, 32), 255, np.uint8))
    ds = IHarmony4(root, "test", size=32)
    items = [ds[0], ds[1]]
    assert float(items[0]["mask"].sum()) == 0 and float(items[1]["mask"].min()) == 1
    comp, mask, real = (torch.stack([it[k] for it in items]) for k in ("comp", "mask", "real"))
    model = tiny_harmonizer(32, head_std=0.1).train()
    loss = fmse_loss(model(comp, mask), real, mask)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    metrics = image_metrics(comp, real, mask)
    assert all(torch.isfinite(v).all() for v in metrics.values()) and metrics["fmse"][0] == 0
    res = evaluate("composite", ds, batch_size=2, progress=False)
    assert res["subsets"]["All"]["n"] == 2 and np.isfinite(res["subsets"]["All"]["fmse"])


@pytest.mark.parametrize("cli", ["harmonize", "evaluate"])
def test_cli_device_errors_are_one_line(cli, tmp_path, capsys, monkeypatch):
    """--device: a GPU asked for where none is usable, or a name that is no device, is refused in
    words before any work (both CLIs share regharm_ext.inference.pick_device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    img, mask = tmp_path / "c.png", tmp_path / "m.png"
    Image.new("RGB", (64, 64)).save(img)
    Image.new("L", (64, 64), 255).save(mask)
    args = {"harmonize": ["--image", str(img), "--mask", str(mask), "--out", str(tmp_path / "o.png")],
            "evaluate": ["--val-length", "2", "--no-progress"]}[cli]
    main = hz.main if cli == "harmonize" else evaluate_main
    for device, words in (("cuda", "PyTorch sees no CUDA GPU (use --device cpu)"),
                          ("gpu", "'gpu' is not a device: use cpu, cuda, cuda:N or auto")):
        assert main(args + ["--device", device]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_image_size_of_a_rotated_tiff_is_its_decoded_size(tmp_path):
    """EXIF orientation 6 in a TIFF: Pillow >= 11 opens it with the upright size already, which
    image_size turned a second time, refusing the mask drawn on the upright image."""
    ex = Image.Exif()
    ex[0x0112] = 6
    tif = tmp_path / "cam.tif"
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tif, exif=ex, compression="tiff_lzw")
    decoded = image_file.read_rgb(tif)
    assert image_file.image_size(tif) == (decoded.shape[1], decoded.shape[0])
    mask = tmp_path / "cam_mask.png"
    _save(mask, _mask(decoded.shape[1], decoded.shape[0]))
    img, m = hz.load_pair(tif, mask)
    assert img.shape[:2] == m.shape


def test_image_size_of_a_png_reads_the_header_only(tmp_path, monkeypatch):
    from PIL import PngImagePlugin
    png = tmp_path / "a.png"
    _save(png, np.zeros((30, 40, 3), np.uint8), "PNG")

    loads, load = [], PngImagePlugin.PngImageFile.load

    def counted(self):
        loads.append(1)
        return load(self)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counted)
    assert image_file.image_size(png) == (40, 30)
    assert not loads, "image_size decoded the PNG (getexif() loads it without an early eXIf chunk)"


def test_opening_files_in_threads_leaves_pillows_limit_as_it_was(tmp_path):
    import threading
    png = tmp_path / "a.png"
    _save(png, np.zeros((8, 8, 3), np.uint8), "PNG")
    before = Image.MAX_IMAGE_PIXELS

    def work(limit):
        for _ in range(200):
            image_file.image_size(png, max_pixels=limit)
    threads = [threading.Thread(target=work, args=(1000 + i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Image.MAX_IMAGE_PIXELS == before
