"""Harmonize composites of any size with a trained Harmonizer.

    python -m regharm_ext.harmonize [--checkpoint RUN_DIR_OR_FILE] --image comp.jpg --mask mask.png
        --out out.png [--explain map.png]
    python -m regharm_ext.harmonize [--checkpoint ...] --input-dir D --out-dir O [--explain-dir E]

Folder mode pairs ``D/<name>.<ext>`` with ``D/<name>_mask.<ext>`` (the convention of other
harmonization tools) and writes ``O/<name>.png`` (and ``E/<name>.png``); a pair that fails is
reported on one line and the others go on (exit status 1 if any failed).

Resolution: the network runs at its training resolution (``input_size`` of the checkpoint); its
residual Î is upsampled bilinearly and applied to the full-resolution image with the
full-resolution mask (:mod:`regharm_ext.inference`), so the output has the input's size and detail.

Masks: read as 8-bit grayscale (any mode is converted to L). Values are weights ``m = value / 255``:
the network sees them resized, and the correction at full resolution is ``I + Î·m`` (an
antialiased edge gets a partial correction rather than a halo). Pixels whose mask value is 0 are
copied from the input unchanged (the final composite is done on 8-bit values), so save the output
as PNG. The foreground is the set of pixels above 127: a mask with none is rejected as empty.
Pixel grids are used as stored (EXIF orientation is not applied to either file).

``--explain`` writes the PTL contribution map (the paper's Fig. 5): how much the foreground as a
whole attends to each background region, as a heat map over a dimmed copy of the image, with the
foreground outlined.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, UnidentifiedImageError

from .inference import predict_raw_at, resize

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# piecewise-linear "inferno"-like colormap: value -> RGB
_CMAP_X = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_CMAP_RGB = np.array([[0, 0, 40], [90, 10, 110], [200, 50, 70], [250, 140, 20], [255, 250, 160]], np.float64)


class InputError(Exception):
    """A problem with the user's files; reported as one line."""


def _open(path: Path, mode: str, what: str) -> np.ndarray:
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    try:
        with Image.open(path) as f:
            img = f.convert(mode)
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from None
    return np.array(img)  # a writable copy: torch warns on read-only arrays


def load_pair(image_path, mask_path) -> Tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3], mask uint8 [H, W]) after the checks of the CLI."""
    image_path, mask_path = Path(image_path), Path(mask_path)
    img = _open(image_path, "RGB", "image")
    mask = _open(mask_path, "L", "mask")
    if img.shape[:2] != mask.shape:
        raise InputError(f"image {image_path} is {img.shape[1]}x{img.shape[0]} but mask {mask_path} is "
                         f"{mask.shape[1]}x{mask.shape[0]}: they must have the same size")
    if not (mask > 127).any():
        raise InputError(f"mask {mask_path} is empty: no pixel above 127 marks a foreground")
    return img, mask


def harmonize_array(model, image: np.ndarray, mask: np.ndarray, device="cpu") -> np.ndarray:
    """Harmonized image (uint8 [H, W, 3]) of ``image`` (uint8 [H, W, 3]) with ``mask`` (uint8
    [H, W]); identical to ``image`` wherever ``mask`` is 0."""
    dev = torch.device(device)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(dev, torch.float32) / 255.0
    m = torch.from_numpy(mask)[None, None].to(dev, torch.float32) / 255.0
    with torch.no_grad():
        raw = predict_raw_at(model, x, m)
        out = model.compose(x, raw, m)
    out = (out.clamp(0, 1) * 255.0).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
    return np.where(mask[..., None] > 0, out, image)


def contribution_map(model, image: np.ndarray, mask: np.ndarray, device="cpu") -> np.ndarray:
    """PTL contribution (float [H, W], sums to 1 over the image) at the image's resolution."""
    dev = torch.device(device)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(dev, torch.float32) / 255.0
    m = torch.from_numpy(mask)[None, None].to(dev, torch.float32) / 255.0
    size = getattr(model, "input_size", tuple(x.shape[-2:]))
    size = (size, size) if isinstance(size, int) else tuple(size)
    with torch.no_grad():
        c = model.ptl_contribution(resize(x, size), resize(m, size).clamp(0, 1))
        c = F.interpolate(c[:, None].float(), size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    c = c.clamp_min(0).cpu().numpy()
    return c / max(float(c.sum()), 1e-12)


def heatmap_overlay(image: np.ndarray, value: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``value`` (float [H, W] >= 0) as a colour heat map over a dimmed grey ``image``, the
    foreground (mask > 127) outlined in white. Returns uint8 [H, W, 3].

    The colours span the background's 2nd to 99.5th percentile of ``value``: attention spread
    almost evenly would otherwise show as one flat colour."""
    bg = value[mask <= 127]
    lo, hi = (np.percentile(bg, [2, 99.5]) if bg.size else (0.0, float(value.max())))
    v = np.clip((value - lo) / max(hi - lo, 1e-12), 0, 1)
    heat = np.stack([np.interp(v, _CMAP_X, _CMAP_RGB[:, c]) for c in range(3)], -1)
    grey = (image.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))[..., None] * 0.6
    alpha = (0.25 + 0.65 * np.sqrt(v))[..., None]
    out = (1 - alpha) * grey + alpha * heat
    edge = np.asarray(Image.fromarray(((mask > 127) * 255).astype(np.uint8)).filter(ImageFilter.FIND_EDGES)) > 0
    out[edge] = 255
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def save_image(array: np.ndarray, path) -> None:
    """Write atomically (a temporary file renamed into place): an error leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"cannot tell the image format of {path} from its extension (use .png)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_model(checkpoint, device):
    from .checkpoint import load_model
    model, _config = load_model(checkpoint, device)
    return model


def _check_explainable(model) -> None:
    if getattr(model, "patch_kind", None) != "ptl":
        variant = getattr(model, "config", {}).get("variant", type(model).__name__)
        raise InputError(f"--explain needs a model with PTL (this one is {variant!r})")


def process(model, image_path, mask_path, out_path, explain_path=None, device="cpu") -> None:
    """One composite: checks, harmonization, optional explanation; writes only on success."""
    img, mask = load_pair(image_path, mask_path)
    process_arrays(model, img, mask, out_path, explain_path, device)


def process_arrays(model, img, mask, out_path, explain_path=None, device="cpu") -> None:
    out = harmonize_array(model, img, mask, device)
    overlay = heatmap_overlay(img, contribution_map(model, img, mask, device), mask) \
        if explain_path is not None else None
    save_image(out, out_path)
    if overlay is not None:
        save_image(overlay, explain_path)


def folder_pairs(input_dir: Path):
    """[(name, image path, mask path or None)] for the images of ``input_dir`` that are not masks."""
    files = sorted(p for p in input_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    masks = {p.stem[:-len("_mask")]: p for p in files if p.stem.endswith("_mask")}
    return [(p.stem, p, masks.get(p.stem)) for p in files if not p.stem.endswith("_mask")]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m regharm_ext.harmonize",
                                description="Harmonize a composite (image + foreground mask) of any size.")
    p.add_argument("--checkpoint", default=None, help="run folder or weights file (default: packaged weights)")
    p.add_argument("--image", type=Path, help="composite image")
    p.add_argument("--mask", type=Path, help="foreground mask (grayscale, white = foreground)")
    p.add_argument("--out", type=Path, help="output image (PNG keeps the background exact)")
    p.add_argument("--explain", type=Path, default=None, help="also write the PTL contribution map here")
    p.add_argument("--input-dir", type=Path, help="folder of <name>.jpg + <name>_mask.png pairs")
    p.add_argument("--out-dir", type=Path, help="folder for <name>.png results (folder mode)")
    p.add_argument("--explain-dir", type=Path, default=None, help="folder for contribution maps (folder mode)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    a = p.parse_args(argv)
    single = a.image is not None or a.mask is not None or a.out is not None
    folder = a.input_dir is not None or a.out_dir is not None
    if single == folder:
        p.error("give either --image, --mask and --out, or --input-dir and --out-dir")
    if single and not (a.image and a.mask and a.out):
        p.error("--image, --mask and --out go together")
    if folder and not (a.input_dir and a.out_dir):
        p.error("--input-dir and --out-dir go together")
    if single and a.explain_dir is not None or folder and a.explain is not None:
        p.error("--explain is for one image, --explain-dir for folder mode")
    try:
        device = _device(a.device)
        if single:
            img, mask = load_pair(a.image, a.mask)  # bad inputs fail before a model is loaded
            model = _load_model(a.checkpoint, device)
            if a.explain is not None:
                _check_explainable(model)
            process_arrays(model, img, mask, a.out, a.explain, device)
            return 0
        if not a.input_dir.is_dir():
            raise InputError(f"input folder not found: {a.input_dir}")
        pairs = folder_pairs(a.input_dir)
        if not pairs:
            raise InputError(f"no images in {a.input_dir} (expected <name>.jpg with <name>_mask.png)")
        model = _load_model(a.checkpoint, device)
        if a.explain_dir is not None:
            _check_explainable(model)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line for the user, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for name, img_path, mask_path in pairs:
        try:
            if mask_path is None:
                raise InputError(f"no mask for {img_path} (expected {a.input_dir / (name + '_mask.png')})")
            explain = a.explain_dir / f"{name}.png" if a.explain_dir is not None else None
            process(model, img_path, mask_path, a.out_dir / f"{name}.png", explain, device)
            print(f"{a.out_dir / (name + '.png')}")
        except KeyboardInterrupt:
            return 130
        except Exception as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
