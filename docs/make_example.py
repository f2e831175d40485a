"""Make the README's before/after picture with ``harmonize`` (run from the repository root).

    python docs/make_example.py [--checkpoint RUN_DIR_OR_FILE] [--photo NAME] [--seed N]

A validation photo (never seen in training) gets an object-like mask and a foreground shift at its
full resolution, as the synthetic data makes them; ``python -m regharm_ext.harmonize`` then
harmonizes it (with ``--explain``), and ``docs/harmonize_example.png`` shows composite | harmonized
| real | PTL contribution map side by side. Without ``--checkpoint`` the packaged default weights
are used.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from regharm_ext.data.masks import random_mask
from regharm_ext.data.photo_set import load_photo, split_photos
from regharm_ext.data.shifts import PHOTOMETRIC

DOCS = Path(__file__).resolve().parent


def make_composite(photo: str, seed: int):
    real = np.asarray(load_photo(photo), dtype=np.float32) / 255.0
    h, w = real.shape[:2]
    rng = np.random.default_rng(seed)
    sq = random_mask(rng, 256, area=(0.12, 0.25), kind="ellipse")
    mask = np.asarray(Image.fromarray((sq * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) > 127
    # a warm, bright cast: easy to see in a small picture
    shifted = PHOTOMETRIC["white_balance"](real, mask.astype(np.float32), np.random.default_rng(seed + 1))
    shifted = PHOTOMETRIC["exposure"](shifted, mask.astype(np.float32), np.random.default_rng(seed + 2))
    comp = np.where(mask[..., None], shifted, real)
    to8 = lambda a: Image.fromarray(np.clip(np.round(a * 255), 0, 255).astype(np.uint8))  # noqa: E731
    return to8(comp), Image.fromarray((mask * 255).astype(np.uint8), "L"), to8(real)


def label(img: Image.Image, text: str) -> Image.Image:
    out = img.copy()
    d = ImageDraw.Draw(out)
    d.rectangle((0, 0, 8 + 7 * len(text), 16), fill=(0, 0, 0))
    d.text((4, 2), text, fill=(255, 255, 255))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--photo", default=None, help="a validation photo (default: the second one)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", type=Path, default=DOCS / "harmonize_example.png")
    a = p.parse_args(argv)
    photo = a.photo or split_photos("val")[1]
    if photo not in split_photos("val"):
        p.error(f"{photo} is not a validation photo: {split_photos('val')}")
    comp, mask, real = make_composite(photo, a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        comp.save(tmp / "comp.png")
        mask.save(tmp / "mask.png")
        cmd = [sys.executable, "-m", "regharm_ext.harmonize", "--image", str(tmp / "comp.png"),
               "--mask", str(tmp / "mask.png"), "--out", str(tmp / "out.png"), "--explain", str(tmp / "map.png")]
        if a.checkpoint:
            cmd += ["--checkpoint", a.checkpoint]
        subprocess.run(cmd, check=True)
        out, ptl = Image.open(tmp / "out.png").convert("RGB"), Image.open(tmp / "map.png").convert("RGB")
        tiles = [label(comp, "composite"), label(out, "harmonized"), label(real, "real"), label(ptl, "PTL map")]
        w, h = comp.size
        sheet = Image.new("RGB", (2 * w, 2 * h))
        for i, t in enumerate(tiles):
            sheet.paste(t, ((i % 2) * w, (i // 2) * h))
        sheet.save(a.out)
    print(f"{a.out} ({photo}, seed {a.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
