"""Synthetic composites (determinism, split disjointness, content), masks, the iHarmony4 exporter
and loader (layout, errors that name the file)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from regharm_ext.data import DataError, IHarmony4, SyntheticComposites, photo_names, split_photos
from regharm_ext.data import synth as synth_mod
from regharm_ext.data.masks import KINDS, random_mask

from data_helpers import export_tree


def test_val_split_is_fixed_and_disjoint_from_train():
    names = photo_names()
    val, train = split_photos("val"), split_photos("train")
    assert val == names[::6]
    assert not set(val) & set(train)
    assert sorted(val + train) == names
    assert len(val) >= 10 and len(train) >= 50


@pytest.mark.parametrize("split", ["val", "train"])
def test_split_only_reads_its_own_photos(split, monkeypatch):
    """Targets and colour references alike come from the split's photos."""
    seen = []
    real_load = synth_mod.load_photo
    monkeypatch.setattr(synth_mod, "load_photo", lambda n: seen.append(n) or real_load(n))
    ds = SyntheticComposites(split, size=32, length=40)
    for i in range(len(ds)):
        ds.sample(i)
    assert seen and set(seen) <= set(split_photos(split))


def test_synthetic_is_deterministic_per_seed_and_index():
    a = SyntheticComposites("train", size=48, length=6, seed=3)
    b = SyntheticComposites("train", size=48, length=6, seed=3)
    for i in (0, 5):
        x, y = a[i], b[i]
        assert x["name"] == y["name"]
        for k in ("comp", "mask", "real"):
            assert torch.equal(x[k], y[k])
    assert not torch.equal(a[0]["comp"], a[1]["comp"])
    other = SyntheticComposites("train", size=48, length=6, seed=4)
    assert not torch.equal(a[0]["comp"], other[0]["comp"])
    a.set_epoch(1)
    assert not torch.equal(a[0]["comp"], b[0]["comp"])


def test_synthetic_item_content():
    ds = SyntheticComposites("val", size=64)
    assert len(ds) == 8 * len(split_photos("val"))
    for i in range(6):
        it = ds[i]
        assert it["subset"] == "Synthetic"
        for k, c in (("comp", 3), ("mask", 1), ("real", 3)):
            assert it[k].shape == (c, 64, 64) and it[k].dtype == torch.float32
            assert 0 <= float(it[k].min()) and float(it[k].max()) <= 1
        m = it["mask"]
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert 0.04 <= float(m.mean()) <= 0.41
        outside = (m == 0).expand(3, -1, -1)
        assert torch.equal(it["comp"][outside], it["real"][outside])
        err = ((it["comp"] - it["real"]) * 255) ** 2 * m
        assert float(err.sum() / (3 * m.sum())) > 1.0  # the foreground was shifted


@pytest.mark.parametrize("kind", KINDS)
def test_masks_cover_the_drawn_area(kind):
    rng = np.random.default_rng(1)
    for _ in range(5):
        m = random_mask(rng, 96, area=(0.05, 0.40), kind=kind)
        assert m.shape == (96, 96) and 0.045 <= m.mean() <= 0.405


def test_export_writes_the_ihamony4_layout(tmp_path):
    root = export_tree(tmp_path, subsets=("HCOCO", "Hday2night"), n=2, n_train=1, size=64)
    assert (root / "IHD_train.txt").read_text().splitlines() == [
        "HCOCO/composite_images/t00000_1_1.jpg", "Hday2night/composite_images/t00000_1_1.jpg"]
    assert len((root / "IHD_test.txt").read_text().splitlines()) == 4
    assert (root / "HCOCO" / "HCOCO_test.txt").read_text().split() == ["v00000_1_1.jpg", "v00001_1_1.jpg"]
    for d, name in (("composite_images", "v00001_1_1.jpg"), ("masks", "v00001_1.png"), ("real_images", "v00001.jpg")):
        assert (root / "Hday2night" / d / name).is_file()
    assert Image.open(root / "HCOCO" / "masks" / "v00000_1.png").mode == "L"


def test_loader_reads_the_tree_and_matches_the_source(tmp_path):
    root = export_tree(tmp_path, n=2, n_train=1, size=64)
    test = IHarmony4(root, "test", size=64)
    assert test.subsets == ["HCOCO", "Hday2night"] and len(test) == 4
    it = test[0]
    assert it["name"] == "HCOCO/v00000_1_1.jpg" and it["subset"] == "HCOCO"
    src = SyntheticComposites("val", size=64, length=2, seed=0)[0]
    for k in ("comp", "real"):  # JPEG quality 95 round trip
        assert float((it[k] - src[k]).abs().mean()) < 0.02
    assert torch.equal(it["mask"], src["mask"])
    resized = IHarmony4(root, "test", subsets=["Hday2night"], size=32)[1]
    assert resized["comp"].shape == (3, 32, 32) and resized["mask"].shape == (1, 32, 32)
    soft = resized["mask"][(resized["mask"] > 0) & (resized["mask"] < 1)]
    assert soft.numel() > 0  # bilinear resize leaves a soft edge
    torch.manual_seed(0)
    train = IHarmony4(root, "train", size=48, augment=True)
    assert len(train) == 2 and train[0]["comp"].shape == (3, 48, 48)


def test_loader_subsets_present_and_missing(tmp_path):
    root = export_tree(tmp_path, subsets=("HFlickr",), n=1, n_train=0, size=32)
    assert IHarmony4(root, "test").subsets == ["HFlickr"]
    with pytest.raises(DataError, match="HCOCO"):
        IHarmony4(root, "test", subsets=["HCOCO", "HFlickr"])
    ds = IHarmony4(root, "test", subsets=["HCOCO", "HFlickr"], skip_missing=True)
    assert ds.subsets == ["HFlickr"] and ds.skipped == ["HCOCO"]
    with pytest.raises(DataError, match="no iHarmony4 subset"):
        IHarmony4(tmp_path / "HFlickr" / "masks", "test")


def test_loader_errors_name_the_file_and_the_list(tmp_path):
    root = export_tree(tmp_path, subsets=("HCOCO",), n=2, n_train=0, size=32)
    (root / "HCOCO" / "real_images" / "v00001.jpg").unlink()
    with pytest.raises(DataError, match=r"1 listed file\(s\) missing: .*v00001\.jpg .*HCOCO_test\.txt:2"):
        IHarmony4(root, "test")           # checked before any item is read
    ds = IHarmony4(root, "test", check_files=False)
    ds[0]
    with pytest.raises(DataError) as e:
        ds[1]
    msg = str(e.value)
    assert "v00001.jpg" in msg and "real_images" in msg and "HCOCO_test.txt:2" in msg
    (root / "HCOCO" / "masks" / "v00000_1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read mask .*v00000_1\.png"):
        ds[0]
    Image.new("L", (31, 32)).save(root / "HCOCO" / "masks" / "v00000_1.png")
    with pytest.raises(DataError, match="size mismatch"):
        ds[0]
    (root / "HCOCO" / "HCOCO_test.txt").write_text("badname.jpg\n")
    with pytest.raises(DataError, match="badname.jpg"):
        IHarmony4(root, "test")
    (root / "HCOCO" / "HCOCO_test.txt").unlink()
    (root / "IHD_test.txt").unlink()
    with pytest.raises(DataError, match="HCOCO_test.txt"):
        IHarmony4(root, "test")


def test_loader_falls_back_on_the_root_list(tmp_path):
    root = export_tree(tmp_path, subsets=("HCOCO", "HFlickr"), n=2, n_train=0, size=32)
    (root / "HFlickr" / "HFlickr_test.txt").unlink()
    ds = IHarmony4(root, "test", subsets=["HFlickr"])
    assert [ds.items[i][1] for i in range(len(ds))] == ["v00000_1_1.jpg", "v00001_1_1.jpg"]


def _ids(ds):
    return [name for _, name, _ in ds.items]


def test_loader_reads_lists_with_a_byte_order_mark_or_backslashes(tmp_path):
    """Lists saved by Windows editors: a UTF-8 BOM stuck to the first name, backslash separators
    hid the ``<Subset>/`` prefix of the root list."""
    root = export_tree(tmp_path, subsets=("HCOCO", "HFlickr"), n=2, n_train=0, size=32)
    expected = ["v00000_1_1.jpg", "v00001_1_1.jpg"]
    own = root / "HCOCO" / "HCOCO_test.txt"
    own.write_bytes(b"\xef\xbb\xbf" + own.read_bytes())
    assert _ids(IHarmony4(root, "test", subsets=["HCOCO"])) == expected
    (root / "HFlickr" / "HFlickr_test.txt").unlink()   # falls back on IHD_test.txt
    ihd = root / "IHD_test.txt"
    lines = sorted(ihd.read_text().splitlines(), key=lambda line: not line.startswith("HFlickr/"))
    text = "\n".join(lines) + "\n"  # an HFlickr line first, where the mark lands
    ihd.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert _ids(IHarmony4(root, "test", subsets=["HFlickr"])) == expected
    ihd.write_text(text.replace("/", "\\"), newline="\r\n")
    assert _ids(IHarmony4(root, "test", subsets=["HFlickr"])) == expected


def test_loader_loads_a_repeated_subset_once(tmp_path):
    root = export_tree(tmp_path, subsets=("HCOCO", "HFlickr"), n=2, n_train=0, size=32)
    ds = IHarmony4(root, "test", subsets=["HFlickr", "HCOCO", "HFlickr"])
    assert ds.subsets == ["HFlickr", "HCOCO"] and len(ds) == 4


def test_loader_names_the_requested_and_the_present_subsets(tmp_path):
    root = export_tree(tmp_path, subsets=("HFlickr",), n=1, n_train=0, size=32)
    with pytest.raises(DataError, match=r"none of the subsets named \(HCOCO, HAdobe5k\) is under .*; "
                                        r"present there: HFlickr"):
        IHarmony4(root, "test", subsets=["HCOCO", "HAdobe5k"], skip_missing=True)


def test_loader_records_subsets_whose_list_names_nothing(tmp_path):
    root = export_tree(tmp_path, subsets=("HCOCO", "HFlickr", "Hday2night"), n=1, n_train=0, size=32)
    (root / "HFlickr" / "HFlickr_test.txt").write_text("\n")
    (root / "Hday2night" / "Hday2night_test.txt").unlink()
    (root / "IHD_test.txt").write_text("HCOCO/composite_images/v00000_1_1.jpg\n")
    ds = IHarmony4(root, "test")
    assert len(ds) == 1 and ds.subsets == ["HCOCO", "HFlickr", "Hday2night"]
    assert ds.unlisted == [("HFlickr", root / "HFlickr" / "HFlickr_test.txt"),
                           ("Hday2night", root / "IHD_test.txt")]


def test_credits_table_in_the_docs_is_generated():
    """Every photo is credited, and the tables in the docs are the generated ones."""
    from pathlib import Path

    from regharm_ext.data.credits import BEGIN, markdown_table, read_credits, update

    rows = read_credits()
    assert sorted(r["file"] for r in rows) == photo_names()
    assert all(r["author"].strip() and r["licence"].strip() and r["source"].startswith("http") for r in rows)
    table = markdown_table()
    assert table.count("| val |") == len(split_photos("val"))
    repo = Path(__file__).resolve().parents[1]
    checked = 0
    for doc in (repo / "README.md",):
        if doc.is_file() and BEGIN in doc.read_text(encoding="utf-8"):
            text = doc.read_text(encoding="utf-8")
            assert update(text) == text, f"{doc}: run python -m regharm_ext.data.credits --update {doc.name}"
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("shape", [(64, 96), (333, 777)], ids=["halved", "odd_ratio"])
def test_loader_resize_rounds_like_exact_arithmetic(tmp_path, shape):
    # a 2x downscale averages 2x2 pixels: many land on .5 ties; at other ratios float32 leaves
    # values near .5 to the CPU code path (the thread count), float64 of whole numbers does not
    root = export_tree(tmp_path, subsets=("HCOCO",), n=1, n_train=1, size=64)
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    sub = root / "HCOCO"
    Image.fromarray(img).save(sub / "composite_images" / "v00000_1_1.png")
    Image.fromarray(img).save(sub / "real_images" / "v00000.jpg")
    mask = np.zeros(shape, np.uint8)
    mask[10:40, 20:60] = 255
    Image.fromarray(mask).save(sub / "masks" / "v00000_1.png")
    (sub / "HCOCO_test.txt").write_text("v00000_1_1.png\n")
    size = 32 if shape == (64, 96) else 256
    ds = IHarmony4(root, "test", size=size)
    exact = torch.from_numpy(img.astype(np.float64)).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(exact, size=(size, size), mode="bilinear", align_corners=False)[0].round()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            item = ds[0]
            got = item["comp"].double() * 255
            assert torch.equal(got.round(), want), f"{n} thread(s): {int((got.round() != want).sum())} pixels"
            assert item["comp"].dtype == item["mask"].dtype == torch.float32
    finally:
        torch.set_num_threads(threads)
