"""Synthetic composites from the embedded photos: the default training and validation data.

A sample is a photo (the real image, the target), an object-like random mask and a composite whose
foreground has been given another appearance (colour transfer from another photo or region,
exposure, gamma, white balance, saturation, hue, contrast, tone curve, day<->night relighting; see
:mod:`.shifts`). Everything is drawn from a generator seeded by ``(seed, split, epoch, index)``, so
a sample is the same in every process and run.

Splits: ``val`` uses only ``sorted(photos)[0::6]`` (15 photos) and shows each whole photo resized
to ``size``² by Pillow's bilinear filter (antialiased when shrinking, unlike the protocol's plain
bilinear resize of iHarmony4 images, which :mod:`.iharmony4` follows; the mask is drawn at
``size``², hard-edged); ``train`` uses the 70 others with a random resized
crop (scale 0.5-1 of the area, the photo's aspect ratio ×[3/4, 4/3]) and a random horizontal flip.

Export to the iHarmony4 layout (SPEC §6)::

    python -m regharm_ext.data.synth --out DIR --n 200 [--n-train 1000] [--subsets Synthetic] [--force]

Existing image lists under DIR (an iHarmony4 root's ``IHD_*.txt``) are kept: the export refuses
to run there unless ``--force`` is given.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import one_line
from .masks import random_mask
from .photo_set import load_photo, split_photos
from .shifts import random_shift

SUBSET = "Synthetic"
_SPLIT_CODE = {"train": 1, "val": 2}
MIN_SHIFT = 4.0 / 255  # foreground RMS change below which a shift is redrawn
VAL_PER_PHOTO = 8


def _to_float(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0


def _train_box(rng: np.random.Generator, w: int, h: int):
    """Random resized crop box: 0.5-1 of the area, aspect ratio of the photo ×[3/4, 4/3]."""
    area = rng.uniform(0.5, 1.0) * w * h
    ratio = (w / h) * math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(w, max(8, int(round(math.sqrt(area * ratio)))))
    ch = min(h, max(8, int(round(math.sqrt(area / ratio)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return (x0, y0, x0 + cw, y0 + ch)


class SyntheticComposites(Dataset):
    """Map-style dataset of synthetic composites, made on the fly.

    Args:
        split: "train" or "val" (disjoint photo sets, see the module doc).
        size: output side S.
        length: number of samples (default: 2000 for train, 8 per photo = 120 for val).
        seed: base seed; sample ``i`` depends only on (seed, split, epoch, i).

    Item: ``{"comp": Tensor[3, S, S] float in [0, 1], "mask": Tensor[1, S, S] (1 = foreground),
    "real": Tensor[3, S, S], "name": str, "subset": "Synthetic"}``.
    """

    def __init__(self, split: str = "train", size: int = 256, length: Optional[int] = None, seed: int = 0):
        if split not in _SPLIT_CODE:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if size < 16:
            raise ValueError(f"size must be >= 16, got {size}")
        self.split, self.size, self.seed = split, int(size), int(seed)
        if self.seed < 0:   # numpy's SeedSequence would refuse it only when a sample is drawn
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.photos = split_photos(split)
        if length is None:
            length = 2000 if split == "train" else VAL_PER_PHOTO * len(self.photos)
        self.length = int(length)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """New draws for training epochs; epoch 0 is the default sequence."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        key = [self.seed, _SPLIT_CODE[self.split], index]
        if self.epoch:
            key.append(self.epoch)
        return np.random.default_rng(np.random.SeedSequence(key))

    def _view(self, name: str, rng: np.random.Generator, train: bool) -> np.ndarray:
        img = load_photo(name)
        s = self.size
        if not train:
            return _to_float(img.resize((s, s), Image.BILINEAR))
        out = img.resize((s, s), Image.BILINEAR, box=_train_box(rng, *img.size))
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_float(out)

    def sample(self, index: int) -> Dict[str, np.ndarray]:
        """The sample as numpy arrays: comp/real float32 [S, S, 3], mask float32 [S, S]."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        rng = self._rng(index)
        train = self.split == "train"
        # validation cycles through its photos so each appears equally often
        name = self.photos[index % len(self.photos)] if not train else \
            self.photos[int(rng.integers(len(self.photos)))]
        real = self._view(name, rng, train)
        mask = random_mask(rng, self.size)
        others = [p for p in self.photos if p != name]

        def reference() -> np.ndarray:
            return self._view(others[int(rng.integers(len(others)))], rng, True)

        m3 = mask[..., None]
        comp = real
        for _ in range(6):
            shifted = random_shift(real, mask, rng, reference)
            comp = np.round((real * (1 - m3) + shifted * m3) * 255.0) / 255.0
            err = ((comp - real) ** 2 * m3).sum() / (3 * mask.sum())
            if math.sqrt(err) >= MIN_SHIFT:
                break
        return {"comp": comp.astype(np.float32), "mask": mask, "real": real,
                "name": f"{self.split}{index:05d}_{Path(name).stem}"}

    def __getitem__(self, index: int):
        s = self.sample(int(index))
        return {
            "comp": torch.from_numpy(np.ascontiguousarray(s["comp"].transpose(2, 0, 1))),
            "mask": torch.from_numpy(s["mask"][None].copy()),
            "real": torch.from_numpy(np.ascontiguousarray(s["real"].transpose(2, 0, 1))),
            "name": s["name"],
            "subset": SUBSET,
        }


def _u8(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8))


def _check_export(out: Path, counts: Sequence[int], subsets: Sequence[str], size: int) -> None:
    """Refuses bad arguments before anything is created, so that a mistake leaves no folders."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16 (pixels per side), got {size!r}")
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be >= 0, got {list(counts)}")
    if not subsets:
        raise ValueError("give at least one subset name")
    for name in subsets:
        # a name is one folder under --out: a separator or '..' would write elsewhere
        if not name or name in (".", "..") or any(c in name for c in "/\\") or name != name.strip():
            raise ValueError(f"subset name {name!r} must be one folder name (no '/', '\\', '..', "
                             f"or surrounding spaces), e.g. Synthetic")
    dupes = sorted({name for name in subsets if list(subsets).count(name) > 1})
    if dupes:
        raise ValueError(f"subset names repeat: {dupes}; give each subset once")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give a folder to write the dataset into")


def _existing_lists(out: Path, subsets: Sequence[str]) -> list:
    """The image lists an export would replace (an iHarmony4 root keeps its own IHD_*.txt)."""
    lists = [out / f"IHD_{split}.txt" for split in ("train", "test")]
    lists += [out / s / f"{s}_{split}.txt" for s in subsets for split in ("train", "test")]
    return [p for p in lists if p.exists()]


def export(out: Path, n: int, n_train: Optional[int] = None, subsets: Sequence[str] = (SUBSET,),
           size: int = 256, seed: int = 0, quality: int = 95,
           force: bool = False) -> Dict[str, Dict[str, int]]:
    """Write composites in the iHarmony4 layout (SPEC §6) under ``out``.

    Each subset folder gets ``n`` test composites (from the val photos) and ``n_train`` (default
    ``n``) training composites, as ``composite_images/<id>_1_1.jpg``, ``masks/<id>_1.png`` (0/255)
    and ``real_images/<id>.jpg`` with ids ``v00000``... (test) and ``t00000``... (train), plus
    ``<Subset>_train.txt`` / ``<Subset>_test.txt`` (bare names); the root gets ``IHD_train.txt`` /
    ``IHD_test.txt`` (``<Subset>/composite_images/<name>``). Subset k draws with seed ``seed + k``.
    Existing lists (``IHD_*.txt``, ``<Subset>_*.txt``) are never replaced unless ``force``: a
    real iHarmony4 root would lose its own lists (``FileExistsError``). Returns
    {subset: {"train": count, "test": count}}.
    """
    n_train = n if n_train is None else n_train
    out = Path(out)
    _check_export(out, (n, n_train), subsets, size)
    existing = _existing_lists(out, subsets)
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise FileExistsError(f"{out} already holds image lists ({shown}); exporting would replace "
                              f"them: give an empty --out, or --force to overwrite")
    root_lists = {"train": [], "test": []}
    counts = {}
    for k, subset in enumerate(subsets):
        base = out / subset
        for d in ("composite_images", "masks", "real_images"):
            (base / d).mkdir(parents=True, exist_ok=True)
        counts[subset] = {}
        for split, count, prefix in (("test", n, "v"), ("train", n_train, "t")):
            ds = SyntheticComposites("val" if split == "test" else "train", size, count, seed + k)
            names = []
            for i in range(count):
                s = ds.sample(i)
                sid = f"{prefix}{i:05d}"
                _u8(s["comp"]).save(base / "composite_images" / f"{sid}_1_1.jpg", quality=quality, subsampling=0)
                Image.fromarray((s["mask"] > 0.5).astype(np.uint8) * 255, "L").save(base / "masks" / f"{sid}_1.png")
                _u8(s["real"]).save(base / "real_images" / f"{sid}.jpg", quality=quality, subsampling=0)
                names.append(f"{sid}_1_1.jpg")
            (base / f"{subset}_{split}.txt").write_text("".join(f"{x}\n" for x in names))
            root_lists[split] += [f"{subset}/composite_images/{x}" for x in names]
            counts[subset][split] = count
    for split, lines in root_lists.items():
        (out / f"IHD_{split}.txt").write_text("".join(f"{x}\n" for x in lines))
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m regharm_ext.data.synth",
                                description="Export synthetic composites in the iHarmony4 layout.")
    p.add_argument("--out", required=True, type=Path, help="root folder to write")
    p.add_argument("--n", required=True, type=int, help="test composites per subset (val photos)")
    p.add_argument("--n-train", type=int, default=None, help="training composites per subset (default: --n)")
    p.add_argument("--subsets", nargs="+", default=[SUBSET], help="subset folder names (default: Synthetic)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true",
                   help="replace existing IHD_*.txt and the exported subsets' lists and images under "
                        "--out (other subset folders are left alone, and noted)")
    a = p.parse_args(argv)
    if a.n < 0 or (a.n_train is not None and a.n_train < 0):
        p.error("counts must be >= 0")
    try:
        counts = export(a.out, a.n, a.n_train, a.subsets, a.size, a.seed, force=a.force)
    except (OSError, ValueError) as exc:  # the user's mistake: one line, no traceback
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    for subset, c in counts.items():
        print(f"{a.out / subset}: {c['test']} test, {c['train']} train composites")
    others = _other_subsets(a.out, a.subsets)
    if others:   # left as they are (they may be real data), but a loader would still find them
        print(f"note: {a.out} also holds the subset(s) {', '.join(others)} from before, with lists "
              f"of their own: evaluate and train read them too unless --subsets names the ones "
              f"exported now (or remove those folders)", file=sys.stderr)
    return 0


def _other_subsets(out: Path, subsets: Sequence[str]) -> list:
    """Subset folders under ``out`` with image lists that this export did not write."""
    return sorted(d.name for d in Path(out).iterdir() if d.is_dir() and d.name not in subsets
                  and any((d / f"{d.name}_{split}.txt").is_file() for split in ("train", "test")))


if __name__ == "__main__":
    sys.exit(main())
