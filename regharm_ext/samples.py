"""Sample sheets: a few composites beside each method's result and the real image, with the
mask's outline and each result's fMSE, for people who would rather look than read a table.

``train`` writes one into the run folder (``samples.png``) after every epoch, ``evaluate
--samples PATH`` on request. Rows are spread evenly over the dataset, so the same images come
back in every sheet of a run and for every checkpoint scored on one dataset.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .metrics import image_metrics

Method = Tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
CAPTION = 14          # pixels of the band under each tile (Pillow's default bitmap font is 11 high)
OUTLINE = (255, 40, 200)


def spread(n_items: int, count: int) -> List[int]:
    """``count`` indices spread evenly over ``range(n_items)``, first and last included."""
    count = max(0, min(count, n_items))
    if count <= 1:
        return list(range(count))
    return [round(i * (n_items - 1) / (count - 1)) for i in range(count)]


def _to_image(x: torch.Tensor) -> Image.Image:
    """x (Tensor[3, H, W]) in [0, 1] -> RGB image."""
    a = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(a))


def _outline(mask: torch.Tensor) -> np.ndarray:
    """Boolean (H, W): foreground pixels (mask > 0.5) with a background 4-neighbour."""
    fg = (mask[0] > 0.5).float()[None, None]
    eroded = -F.max_pool2d(-fg, 3, stride=1, padding=1)
    return ((fg - eroded)[0, 0] > 0).cpu().numpy()


def _caption(tile: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (tile.width, tile.height + CAPTION), (0, 0, 0))
    out.paste(tile, (0, 0))
    ImageDraw.Draw(out).text((3, tile.height + 1), text[: max(1, tile.width // 6)], fill=(255, 255, 255))
    return out


@torch.no_grad()
def sample_sheet(dataset, methods: Sequence[Method], count: int = 8, device="cpu",
                 peak="target") -> Image.Image:
    """The sheet as an RGB image: a header, then one row per image: composite (mask outlined,
    captioned with its fMSE and name), one column per method (captioned with its fMSE on that
    image), real.

    Args:
        dataset: items ``{"comp", "mask", "real", "name", ...}`` of one size.
        methods: ``(label, fn)`` pairs, ``fn(comp Tensor[B, 3, H, W], mask Tensor[B, 1, H, W])``
            -> Tensor[B, 3, H, W] in [0, 1] (clamped for display), as :func:`regharm_ext.evaluate.evaluate` calls them.
        count: rows (at most ``len(dataset)``).
    """
    idx = spread(len(dataset), count)
    if not idx:
        raise ValueError("the dataset holds no images to show")
    items = [dataset[i] for i in idx]
    comp, mask, real = (torch.stack([it[k] for it in items]).float().to(device) for k in ("comp", "mask", "real"))
    comp_fmse = image_metrics(comp, real, mask, peak)["fmse"]
    outputs = []
    for label, fn in methods:
        pred = fn(comp, mask).float()
        outputs.append((label, pred, image_metrics(pred, real, mask, peak)["fmse"]))

    rows = []
    for r, it in enumerate(items):
        shown = _to_image(comp[r])
        px = np.asarray(shown).copy()
        px[_outline(mask[r])] = OUTLINE
        name = str(it.get("name", idx[r]))
        tiles = [_caption(Image.fromarray(px), f"fMSE {float(comp_fmse[r]):.1f}  {name}")]
        tiles += [_caption(_to_image(pred[r]), f"fMSE {float(fm[r]):.1f}") for _, pred, fm in outputs]
        tiles.append(_caption(_to_image(real[r]), "real"))
        rows.append(tiles)

    w, h = rows[0][0].size
    heads = ["composite"] + [label for label, _, _ in outputs] + ["real"]
    sheet = Image.new("RGB", (w * len(heads), CAPTION + h * len(rows)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for c, head in enumerate(heads):
        draw.text((c * w + 3, 1), head, fill=(255, 255, 255))
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            sheet.paste(tile, (c * w, CAPTION + r * h))
    return sheet


def save_sheet(sheet: Image.Image, path: Union[str, Path]) -> Path:
    """Write the sheet as PNG atomically: a reader sees the previous sheet or this one."""
    from .checkpoint import _atomic_write

    path = Path(path)
    _atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path
