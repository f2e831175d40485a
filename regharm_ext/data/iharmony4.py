"""iHarmony4 as it lies on disk (SPEC §6), for training and for the iDIH evaluation protocol.

Layout::

    ROOT/IHD_train.txt, IHD_test.txt
    ROOT/<Subset>/{composite_images, masks, real_images}/, <Subset>_train.txt, <Subset>_test.txt

A list line names a composite ``<id>_<m>_<k>.jpg`` (bare, or with a ``<Subset>/composite_images/``
prefix); its mask is ``masks/<id>_<m>.png`` (white = foreground) and its real image
``real_images/<id>.jpg``. Per-subset lists are read; a subset without one falls back to the
root ``IHD_<split>.txt`` lines of that subset.

Protocol without ``augment`` (the iDIH evaluation, Sofiiuk et al.): composite, real and mask are
resized to ``size``² with bilinear interpolation (no antialiasing, like OpenCV's INTER_LINEAR);
images are rounded back to 8-bit levels as an 8-bit resize would leave them; the mask stays soft.
With ``augment`` (training): a random resized crop (0.5-1 of the area, aspect ratio ×[3/4, 4/3])
and a random horizontal flip, then the same resize. Random draws come from torch's generator, so
``torch.manual_seed`` fixes them and every DataLoader worker draws differently.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .image_file import DEFAULT_MAX_PIXELS, ImageFileError, read_mask, read_rgb

SUBSETS = ("HCOCO", "HAdobe5k", "HFlickr", "Hday2night")
_DIRS = ("composite_images", "masks", "real_images")


class DataError(RuntimeError):
    """A dataset file is missing, unreadable or inconsistent; the message names it."""


def find_subsets(root: Path) -> List[str]:
    """Subset folders under ``root``: the four of iHarmony4 in the usual order, then any other
    folder with a ``composite_images/`` directory (e.g. an exported synthetic set), sorted."""
    root = Path(root)
    found = [s for s in SUBSETS if (root / s / "composite_images").is_dir()]
    extra = sorted(p.name for p in root.iterdir()
                   if p.is_dir() and p.name not in SUBSETS and (p / "composite_images").is_dir()) \
        if root.is_dir() else []
    return found + extra


def _parse(name: str) -> Tuple[str, str]:
    """``<id>_<m>_<k>.jpg`` -> (mask name ``<id>_<m>.png``, real name ``<id>.jpg``)."""
    stem = Path(name).stem
    parts = stem.rsplit("_", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"composite name {name!r} is not <id>_<m>_<k>.jpg")
    return f"{parts[0]}_{parts[1]}.png", f"{parts[0]}.jpg"


def _read(path: Path, what: str, origin: str, max_pixels: int) -> np.ndarray:
    """uint8 [H, W, 3] (images) or [H, W] (masks), converted as :mod:`.image_file` documents."""
    if not path.is_file():
        raise DataError(f"missing {what} {path} (listed in {origin})")
    try:
        return (read_mask if what == "mask" else read_rgb)(path, what, max_pixels)
    except ImageFileError as e:
        raise DataError(f"{e} (listed in {origin})") from None


def _list_line(line: str) -> str:
    """A list line as a POSIX relative path: lists written on Windows use backslashes, which
    would hide the ``<Subset>/`` prefix and the file name on other systems."""
    return line.strip().replace("\\", "/")


def _tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 [C, H, W] of a uint8 [H, W] or [H, W, C] array."""
    return torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1)


def _scaled(t: torch.Tensor, size: Tuple[int, int], whole: bool) -> torch.Tensor:
    """float32 [C, S, S] in [0, 1] of uint8 ``t`` (Tensor[C, H, W]), bilinearly resized to ``size``
    and, with ``whole``, rounded to 8-bit levels first. The resize runs on the 0-255 values in
    float64, one channel at a time: float32 (or the 0-1 scale) left values near .5 to the CPU
    code path, so a pixel in a few images moved by one level between 1 and 2 threads; one float64
    channel also takes less memory than the three float32 ones did."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t.float() / 255
    out = torch.empty(t.shape[0], *size, dtype=torch.float32)
    for i in range(t.shape[0]):
        ch = F.interpolate(t[i][None, None].double(), size=size, mode="bilinear", align_corners=False)[0, 0]
        out[i] = (ch.round().clamp(0, 255) if whole else ch) / 255
    return out


class IHarmony4(Dataset):
    """iHarmony4 (or any tree in its layout), one item per composite of the official list.

    Args:
        root: the folder holding ``IHD_*.txt`` and the subset folders.
        split: "train" or "test".
        subsets: names to load (default: all present, see :func:`find_subsets`); a name given
            twice is loaded once. A named subset missing from ``root`` is an error unless
            ``skip_missing``; skipped names are kept in ``self.skipped``. Subsets whose list
            names no composite are kept in ``self.unlisted`` as (name, list file).
        size: output side S.
        augment: random resized crop + horizontal flip (training); otherwise the evaluation resize.
        check_files: verify at construction that every listed composite, mask and real image
            exists (a missing one is reported before training or evaluation starts).
        max_pixels: larger images are refused before they are decoded.

    Files are read as :mod:`.image_file` documents (EXIF orientation applied; grayscale, RGBA,
    16-bit, CMYK images converted to 8-bit RGB; soft masks kept as weights, 0/1 label masks read
    as 0/255). Empty and full masks are valid items (the loss floors the area at A_min; fMSE of an
    empty mask is 0).

    Item: ``{"comp": Tensor[3, S, S], "mask": Tensor[1, S, S] (soft after resizing), "real":
    Tensor[3, S, S], "name": "<Subset>/<composite name>", "subset": str}``; floats in [0, 1].
    Raises :class:`DataError` naming the file (and the list that referenced it) when something is
    missing, unreadable or of mismatched size.
    """

    def __init__(self, root, split: str = "test", subsets: Optional[Sequence[str]] = None,
                 size: int = 256, augment: bool = False, skip_missing: bool = False,
                 check_files: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root, self.split, self.size, self.augment = Path(root), split, int(size), bool(augment)
        self.max_pixels = int(max_pixels)
        if not self.root.is_dir():
            raise DataError(f"dataset root {self.root} does not exist or is not a folder")
        self.skipped: List[str] = []
        self.subsets = self._wanted(subsets, skip_missing)
        # (subset, composite name, "list file:line" that named it)
        self.items: List[Tuple[str, str, str]] = []
        self.unlisted: List[Tuple[str, Path]] = []
        for s in self.subsets:
            src, items = self._list(s)
            self.items += items
            if not items:
                self.unlisted.append((s, src))
        if check_files:
            self._check_files()

    def _wanted(self, subsets: Optional[Sequence[str]], skip_missing: bool) -> List[str]:
        present = find_subsets(self.root)
        if subsets is None:
            wanted = present
        else:
            wanted = []
            for s in dict.fromkeys(subsets):  # a repeated name would count its images twice
                if s in present:
                    wanted.append(s)
                elif skip_missing:
                    self.skipped.append(s)
                else:
                    raise DataError(f"subset {s} not found: {self.root / s / 'composite_images'} is missing")
        if wanted:
            return wanted
        if subsets and present:
            raise DataError(f"none of the subsets named ({', '.join(self.skipped)}) is under {self.root}; "
                            f"present there: {', '.join(present)}")
        raise DataError(f"no iHarmony4 subset found under {self.root} "
                        f"(expected folders like {', '.join(SUBSETS)} with composite_images/)")

    def _check_files(self) -> None:
        missing = []
        for i, (_, _, origin) in enumerate(self.items):
            for p in self.paths(i):
                if not p.is_file():
                    missing.append(f"{p} (listed in {origin})")
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataError(f"{len(missing)} listed file(s) missing: {missing[0]}{more}")

    def _list(self, subset: str) -> Tuple[Path, List[Tuple[str, str, str]]]:
        """(the list file read, its items of ``subset``)."""
        own = self.root / subset / f"{subset}_{self.split}.txt"
        ihd = self.root / f"IHD_{self.split}.txt"
        if own.is_file():
            src, keep = own, None
        elif ihd.is_file():
            src, keep = ihd, f"{subset}/"
        else:
            raise DataError(f"missing list {own} (and no {ihd} to fall back on)")
        try:
            # utf-8-sig: a byte-order mark (Notepad's UTF-8) would stick to the first name
            lines = src.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read list {src}: {e}") from None
        out = []
        for no, line in enumerate(lines, 1):
            line = _list_line(line)
            if not line or (keep and not line.startswith(keep)):
                continue
            name = Path(line).name
            origin = f"{src}:{no}"
            try:
                _parse(name)
            except ValueError as e:
                raise DataError(f"{e} (line {origin})") from None
            out.append((subset, name, origin))
        return src, out

    def __len__(self) -> int:
        return len(self.items)

    def paths(self, index: int) -> Tuple[Path, Path, Path]:
        """(composite, mask, real) paths of item ``index``."""
        subset, name, _ = self.items[index]
        mask_name, real_name = _parse(name)
        base = self.root / subset
        return base / "composite_images" / name, base / "masks" / mask_name, base / "real_images" / real_name

    def _crop_box(self, w: int, h: int):
        r = torch.rand(4).tolist()
        area = (0.5 + 0.5 * r[0]) * w * h
        ratio = (w / h) * math.exp(math.log(3 / 4) + r[1] * math.log(16 / 9))
        cw = min(w, max(1, int(round(math.sqrt(area * ratio)))))
        ch = min(h, max(1, int(round(math.sqrt(area / ratio)))))
        x0, y0 = int(r[2] * (w - cw + 1)), int(r[3] * (h - ch + 1))
        return x0, y0, min(w, x0 + cw), min(h, y0 + ch)

    def __getitem__(self, index: int):
        subset, name, origin = self.items[index]
        cp, mp, rp = self.paths(index)
        comp = _read(cp, "composite image", origin, self.max_pixels)
        mask = _read(mp, "mask", origin, self.max_pixels)
        real = _read(rp, "real image", origin, self.max_pixels)
        if not comp.shape[:2] == mask.shape == real.shape[:2]:
            wh = lambda a: f"{a.shape[1]}x{a.shape[0]}"  # noqa: E731
            raise DataError(f"size mismatch (listed in {origin}): composite {cp} {wh(comp)}, "
                            f"mask {mp} {wh(mask)}, real {rp} {wh(real)}")
        c, m, r = _tensor(comp), _tensor(mask), _tensor(real)
        if self.augment:
            x0, y0, x1, y1 = self._crop_box(comp.shape[1], comp.shape[0])
            c, m, r = (t[:, y0:y1, x0:x1] for t in (c, m, r))
            if bool(torch.rand(()) < 0.5):
                c, m, r = (t.flip(-1) for t in (c, m, r))
        s = (self.size, self.size)
        c, m, r = _scaled(c, s, True), _scaled(m, s, False).clamp(0, 1), _scaled(r, s, True)
        return {"comp": c, "mask": m, "real": r, "name": f"{subset}/{name}", "subset": subset}
