"""The embedded photos (package data under ``photos/``) and their fixed train/validation split.

Validation split: the photos whose index in the name-sorted list is a multiple of 6
(``sorted(names)[0::6]``: 15 of the 85 photos); training uses the other 70. Colour references for
the synthetic shifts are drawn from the same split, so no validation pixel is ever seen in training.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, List

from PIL import Image

PHOTO_DIR = Path(__file__).resolve().parent / "photos"
CREDITS = PHOTO_DIR / "CREDITS.tsv"
VAL_EVERY = 6

_cache: Dict[str, Image.Image] = {}
_lock = threading.Lock()


def photo_names() -> List[str]:
    """File names of the embedded photos, sorted."""
    names = sorted(p.name for p in PHOTO_DIR.glob("*.jpg"))
    if not names:
        raise FileNotFoundError(f"no photos found in {PHOTO_DIR} (package data missing?)")
    return names


def split_photos(split: str) -> List[str]:
    """Photo names of ``split``: "val" (every 6th by sorted name, from the first) or "train"."""
    names = photo_names()
    if split == "val":
        return names[::VAL_EVERY]
    if split == "train":
        return [n for i, n in enumerate(names) if i % VAL_EVERY]
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def load_photo(name: str) -> Image.Image:
    """Decoded RGB photo, cached per process (each DataLoader worker decodes a photo once)."""
    img = _cache.get(name)
    if img is None:
        with Image.open(PHOTO_DIR / name) as f:
            img = f.convert("RGB")
            img.load()
        with _lock:
            _cache[name] = img
    return img
