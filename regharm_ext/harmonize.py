"""Harmonize composites of any size with a trained Harmonizer.

    python -m regharm_ext.harmonize [--checkpoint RUN_DIR_OR_FILE] --image comp.jpg --mask mask.png
        --out out.png [--explain map.png]
    python -m regharm_ext.harmonize [--checkpoint ...] --input-dir D --out-dir O [--explain-dir E]

Folder mode pairs ``D/<name>.<ext>`` with ``D/<name>_mask.<ext>`` (the convention of other
harmonization tools) and writes ``O/<name>.png`` (and ``E/<name>.png``); a pair that fails is
reported on one line and the others go on (exit status 1 if any failed). Two images of one name,
two masks for one image, or a result that would overwrite an input are refused before any work.

Output paths are checked before anything is read (known, writable format; folders that exist or
can be made); files are written atomically with the usual permissions.

Resolution: the network runs at its training resolution (``input_size`` of the checkpoint); its
residual Î is upsampled bilinearly and applied to the full-resolution image with the
full-resolution mask (:mod:`regharm_ext.inference`), so the output has the input's size and detail.

Files (:mod:`regharm_ext.data.image_file`): EXIF orientation is applied; grayscale, palette,
RGBA (alpha dropped), CMYK and 16-bit images are converted to 8-bit RGB; 32-bit float images are
refused. Masks are grayscale weights ``m = value / 255`` (a cut-out's alpha channel is its mask; a
0/1 label mask is read as 0/255; a colour picture is refused). The network sees them resized, and
the correction at full resolution is ``I + Î·m`` (an antialiased edge gets a partial correction
rather than a halo). Pixels whose mask value is 0 are copied from the input unchanged (the final
composite is done on 8-bit values), so save the output as PNG. The foreground is the set of pixels
above 127: a mask with none is rejected as empty, a mask with no pixel at or below 127 as full
(nothing left to harmonize against).

Large images: sizes are read from the file headers first, so an image above ``--max-pixels``
(default: Pillow's bomb limit, about 179 megapixels), an image/mask size mismatch, or an image
needing more memory than is available is refused before any pixel is decoded. Full-resolution
work (upsampling the residual, compositing, the explanation map) runs in strips of rows, and
above 16 megapixels the image is shrunk for the network by Pillow on 8-bit data, so memory stays
near 31 bytes per pixel (15 above 16 megapixels; ``--explain`` adds 17): :func:`memory_needed`.

``--explain`` writes the PTL contribution map (the paper's Fig. 5): how much the foreground as a
whole attends to each background region, as a heat map over a dimmed copy of the image, with the
foreground outlined.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from .backends import NAMES
from .data.image_file import (ImageFileError, check_memory, image_size, read_mask, read_rgb,
                              rgb_icc_profile, sixteen_bit_advice, sixteen_bit_peak)
from .errors import one_line, warnings_as_notes
from .inference import _EvalMode, _param_dtype, model_size, pick_device, resize
from .paths import nearest_existing, same_file

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# piecewise-linear "inferno"-like colormap: value -> RGB
_CMAP_X = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_CMAP_RGB = np.array([[0, 0, 40], [90, 10, 110], [200, 50, 70], [250, 140, 20], [255, 250, 160]], np.float64)


class InputError(Exception):
    """A problem with the user's files; reported as one line."""


# Above LEAN_PIXELS the image is shrunk for the network by Pillow on 8-bit data instead of torch on
# a float copy (16 bytes per pixel); full-resolution work runs in strips of about STRIP_PIXELS.
LEAN_PIXELS = 16_000_000
STRIP_PIXELS = 262_144
_MODEL_BYTES = 512 * 2**20   # weights and activations at the training resolution, generously


def memory_needed(width: int, height: int, explain: bool = False) -> int:
    """Peak bytes to harmonize a ``width`` x ``height`` image (estimate, on the safe side)."""
    px = width * height
    per_px = 3 + 1 + 3 + 8          # image, mask, output; decoding / EXIF-rotation working copy
    if px <= LEAN_PIXELS:
        per_px += 16                # float image and mask for torch's resize
    if explain:
        per_px += 4 + 8 + 3 + 2     # contribution map, its background percentile copies, overlay, edges
    return px * per_px + 128 * STRIP_PIXELS + _MODEL_BYTES   # float64 overlay strips: ~100 B/px


def load_pair(image_path, mask_path, max_pixels: Optional[int] = None,
              explain: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3], mask uint8 [H, W]) after the checks of the CLI.

    Sizes, the pixel limit and the memory estimate are checked from the file headers before
    anything is decoded; then the pixels are read and the mask checked (not empty, not full)."""
    image_path, mask_path = Path(image_path), Path(mask_path)
    try:
        iw, ih = image_size(image_path, "image", max_pixels)
        mw, mh = image_size(mask_path, "mask", max_pixels)
        if (iw, ih) != (mw, mh):
            raise InputError(f"image {image_path} is {iw}x{ih} but mask {mask_path} is {mw}x{mh}: "
                             f"they must have the same size")
        check_memory(memory_needed(iw, ih, explain), f"image {image_path} ({iw}x{ih})")
        img = read_rgb(image_path, "image", max_pixels)
        mask = read_mask(mask_path, "mask", max_pixels)
    except ImageFileError as e:
        raise InputError(str(e)) from None
    if img.shape[:2] != mask.shape:   # an orientation only decoding revealed (a late EXIF chunk)
        raise InputError(f"image {image_path} decodes to {img.shape[1]}x{img.shape[0]} but mask {mask_path} "
                         f"to {mask.shape[1]}x{mask.shape[0]} (EXIF orientation applied): they must "
                         f"have the same size")
    if not (mask > 127).any():
        raise InputError(f"mask {mask_path} is empty: no pixel above 127 marks a foreground"
                         + _sixteen_bit_hint(mask_path))
    if not (mask <= 127).any():
        raise InputError(f"mask {mask_path} is full: no pixel at or below 127 is left as background "
                         f"to harmonize the foreground with")
    return img, mask


def _sixteen_bit_hint(mask_path: Path) -> str:
    """Why a 16-bit mask came out empty: 0/255 stored in 16 bits scales to 0/1 (read only on this
    error path, so the usual read stays single-pass)."""
    try:
        peak = sixteen_bit_peak(mask_path)
    except ImageFileError:
        return ""
    if peak is None or peak <= 1:
        return ""
    return f"; {sixteen_bit_advice(peak)}"


def _strips(height: int, width: int):
    rows = max(1, STRIP_PIXELS // max(1, width))
    for y0 in range(0, height, rows):
        yield y0, min(height, y0 + rows)


class _Upsampler:
    """Bilinear upsampling (``align_corners=False``, like ``F.interpolate``) of a small map to
    (H, W), produced a strip of rows at a time: the width is interpolated once (C x h x W), the
    rows on demand, so no full-resolution float map is ever held."""

    def __init__(self, small: torch.Tensor, size: Tuple[int, int]):
        self.h = small.shape[-2]
        self.H = size[0]
        self.wide = F.interpolate(small.float(), size=(self.h, size[1]), mode="bilinear", align_corners=False)

    def rows(self, y0: int, y1: int) -> torch.Tensor:
        """Rows y0..y1-1 of the upsampled map (Tensor[B, C, y1 - y0, W])."""
        y = torch.arange(y0, y1, device=self.wide.device, dtype=torch.float32)
        src = ((y + 0.5) * (self.h / self.H) - 0.5).clamp_min(0)
        i0 = src.floor().long().clamp_max(self.h - 1)
        i1 = (i0 + 1).clamp_max(self.h - 1)
        lam = (src - i0).view(1, 1, -1, 1)
        return torch.lerp(self.wide.index_select(2, i0), self.wide.index_select(2, i1), lam)


def _batch(a: np.ndarray, dev) -> torch.Tensor:
    """uint8 image [H, W, 3] or mask [H, W] -> float Tensor[1, 3 or 1, H, W] in [0, 1] on ``dev``."""
    t = torch.from_numpy(a if a.flags.writeable else a.copy())   # torch warns on read-only arrays
    t = t[None, None] if a.ndim == 2 else t.permute(2, 0, 1)[None]
    return t.to(dev, torch.float32) / 255.0


def _model_inputs(model, image: np.ndarray, mask: np.ndarray, dev) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image (Tensor[1, 3, S, S]) and mask (Tensor[1, 1, S, S]) at the model's input size, in its
    parameters' dtype (a 16-bit model takes 16-bit input): torch's antialiased resize as in
    :mod:`regharm_ext.inference`, or Pillow's on 8-bit data for images above LEAN_PIXELS (no
    full-resolution float copy)."""
    h, w = mask.shape
    size = model_size(model) or (h, w)
    if h * w > LEAN_PIXELS and (h, w) != size:
        x = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
        m = np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.BILINEAR))
        pair = _batch(x, dev), _batch(m, dev)
    else:
        pair = resize(_batch(image, dev), size), resize(_batch(mask, dev), size).clamp(0, 1)
    dtype = _param_dtype(model) or torch.float32
    return pair[0].to(dtype), pair[1].to(dtype)


def check_arrays(image, mask) -> None:
    """``image`` uint8 [H, W, 3] and ``mask`` uint8 [H, W] (255 = foreground) of one size, as
    :func:`load_pair` returns them; anything else is refused with the fix (nothing is cast)."""
    for name, a, shape in (("image", image, "(H, W, 3)"), ("mask", mask, "(H, W)")):
        if not isinstance(a, np.ndarray):
            other = " (for torch tensors: regharm_ext.inference.harmonize_tensor)" \
                if isinstance(a, torch.Tensor) else ""
            raise TypeError(f"{name} must be a numpy array, uint8 {shape}, got {type(a).__name__}{other}")
        if a.dtype != np.uint8:
            raise TypeError(f"{name} must be uint8 (0-255), got {a.dtype}; convert it with "
                            f"({name} * 255).round().astype(np.uint8) if it holds values in [0, 1]")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}; convert a grey or "
                         f"RGBA picture to RGB first (read_rgb does)")
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {mask.shape} (one channel: mask[..., 0])")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} and mask {mask.shape[1]}x{mask.shape[0]} "
                         f"(width x height) must have one size")
    if mask.size and int(mask.max()) == 1:
        raise ValueError("mask holds only 0 and 1: it is read as weights of 1/255; give 255 for the "
                         "foreground (mask * 255), as read_mask does for 0/1 label maps")


def harmonize_array(model, image: np.ndarray, mask: np.ndarray, device="cpu") -> np.ndarray:
    """Harmonized image (uint8 [H, W, 3]) of ``image`` (uint8 [H, W, 3]) with ``mask`` (uint8
    [H, W], 255 = foreground, soft values are weights); identical to ``image`` wherever ``mask``
    is 0. A grey image (three equal channels) stays grey: the network, trained on colour
    photos, would tint its foreground. The model runs in eval mode and its own dtype."""
    check_arrays(image, mask)
    dev = torch.device(device)
    out = np.empty_like(image)
    grey = bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
    with torch.no_grad(), _EvalMode(model):
        up = _Upsampler(model.predict_raw(*_model_inputs(model, image, mask, dev)), mask.shape)
        for y0, y1 in _strips(*mask.shape):
            o = model.compose(_batch(image[y0:y1], dev), up.rows(y0, y1), _batch(mask[y0:y1], dev))
            if grey:
                o = o.mean(1, keepdim=True).expand_as(o)
            o = (o.clamp(0, 1) * 255.0).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
            out[y0:y1] = np.where(mask[y0:y1, :, None] > 0, o, image[y0:y1])
    return out


def contribution_map(model, image: np.ndarray, mask: np.ndarray, device="cpu") -> np.ndarray:
    """PTL contribution (float32 [H, W], sums to 1 over the image) at the image's resolution."""
    check_arrays(image, mask)
    dev = torch.device(device)
    out = np.empty(mask.shape, np.float32)
    with torch.no_grad(), _EvalMode(model):
        c = model.ptl_contribution(*_model_inputs(model, image, mask, dev))
        up = _Upsampler(c[:, None], mask.shape)
        for y0, y1 in _strips(*mask.shape):
            out[y0:y1] = up.rows(y0, y1)[0, 0].clamp_min(0).cpu().numpy()
    out /= max(float(out.sum(dtype=np.float64)), 1e-12)
    return out


def heatmap_overlay(image: np.ndarray, value: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``value`` (float [H, W] >= 0) as a colour heat map over a dimmed grey ``image``, the
    foreground (mask > 127) outlined in white. Returns uint8 [H, W, 3].

    The colours span the background's 2nd to 99.5th percentile of ``value``: attention spread
    almost evenly would otherwise show as one flat colour."""
    bg = value[mask <= 127]
    lo, hi = (np.percentile(bg, [2, 99.5]) if bg.size else (0.0, float(value.max())))
    del bg
    edge = np.asarray(Image.fromarray((mask > 127).astype(np.uint8) * np.uint8(255)).filter(ImageFilter.FIND_EDGES)) > 0
    out = np.empty(image.shape, np.uint8)
    for y0, y1 in _strips(*mask.shape):
        v = np.clip((value[y0:y1].astype(np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)
        heat = np.stack([np.interp(v, _CMAP_X, _CMAP_RGB[:, c]) for c in range(3)], -1)
        grey = (image[y0:y1].astype(np.float64) @ np.array([0.299, 0.587, 0.114]))[..., None] * 0.6
        alpha = (0.25 + 0.65 * np.sqrt(v))[..., None]
        strip = (1 - alpha) * grey + alpha * heat
        strip[edge[y0:y1]] = 255
        out[y0:y1] = np.clip(np.round(strip), 0, 255).astype(np.uint8)
    return out


def _output_format(path: Path, role: str) -> str:
    """Pillow's format name for ``path``'s extension, refused unless it can store an 8-bit RGB image
    (some formats are read-only here, or take other modes: found with a tiny in-memory image)."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"cannot tell the image format of {role} {path} from its extension (use .png)")
    try:
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=fmt)
    except Exception as exc:  # Pillow raises OSError, KeyError, ValueError, ... per plugin
        raise InputError(f"cannot write {role} {path} as {fmt}: {one_line(exc)} (use .png)") from None
    return fmt


def _check_folder(folder: Path, role: str, target: Optional[Path] = None) -> None:
    """``folder`` is a folder or can be created: its nearest existing ancestor is a writable folder."""
    existing = nearest_existing(folder)
    if target is None and existing == folder and not folder.is_dir():
        raise InputError(f"{role} {folder} is a file, not a folder; give a folder (it is created if missing)")
    what = f"{role} {target if target is not None else folder}"
    if not existing.is_dir():
        also = f", so folder {folder} cannot be created" if existing != folder else ""
        raise InputError(f"{what}: {existing} is a file, not a folder{also}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what}: cannot write in folder {existing} (permission denied)")


def check_output(path, role: str = "output", inputs=()) -> None:
    """Refuse, before any work, an output file that could not be written (unknown or read-only
    format, a folder in its place, a file where its folder should be) or that is one of the
    ``inputs`` (``(role, path)`` pairs), which writing it would overwrite."""
    path = Path(path)
    _output_format(path, role)
    if path.is_dir():
        raise InputError(f"{role} {path} is a folder; give a file name such as {path / 'out.png'}")
    _check_folder(path.parent, role, path)
    for in_role, src in inputs:
        if same_file(path, src):
            raise InputError(f"{role} {path} is the {in_role} file: it would be overwritten; "
                             f"give another name")


def save_image(array: np.ndarray, path, role: str = "output",
               icc_profile: Optional[bytes] = None) -> None:
    """Write atomically with the usual permissions (checkpoint._atomic_write): an error leaves no
    partial file, and its message names the file and its ``role`` (e.g. ``--out``).
    ``icc_profile``: the input's colour profile (:func:`rgb_icc_profile`), to display alike."""
    save_images([(array, path, role)], icc_profile)


def save_images(items, icc_profile: Optional[bytes] = None) -> None:
    """``(array, path, role)`` outputs, all or none: each is staged in a temporary file beside its
    target (checkpoint._stage), and only when every one is written are they renamed into place,
    so that a failed second write (a full disk) leaves neither (the first used to stay behind).
    ``icc_profile``: the input's colour profile, embedded where the format takes one."""
    from .checkpoint import _commit, _discard, _stage   # as samples.save_sheet; keeps bad-input runs light

    staged: List[Tuple[str, Path, str]] = []
    try:
        for array, path, role in items:
            path = Path(path)
            fmt = _output_format(path, role)
            try:
                extra = {"icc_profile": icc_profile} if icc_profile else {}
                staged.append((_stage(path, lambda tmp: Image.fromarray(array).save(tmp, format=fmt, **extra)),
                               path, role))
            except Exception as exc:
                raise InputError(f"cannot write {role} {path}: {one_line(exc)}") from None
        for tmp, path, role in staged:
            try:
                _commit(tmp, path)
            except OSError as exc:
                raise InputError(f"cannot write {role} {path}: {one_line(exc)}") from None
    finally:
        for tmp, _, _ in staged:
            _discard(tmp)


def _load_model(checkpoint, device, backend=None):
    from .checkpoint import load_model
    with warnings_as_notes():
        model, _config = load_model(checkpoint, device, backend=backend)
    return model


def _check_explainable(model) -> None:
    if getattr(model, "patch_kind", None) != "ptl":
        variant = getattr(model, "config", {}).get("variant", type(model).__name__)
        raise InputError(f"--explain needs a model with PTL (this one is {variant!r})")


def process(model, image_path, mask_path, out_path, explain_path=None, device="cpu",
            max_pixels: Optional[int] = None, roles=("--out", "--explain")) -> None:
    """One composite: checks, harmonization, optional explanation; writes only on success."""
    img, mask = load_pair(image_path, mask_path, max_pixels, explain_path is not None)
    process_arrays(model, img, mask, out_path, explain_path, device, roles, rgb_icc_profile(image_path))


def process_arrays(model, img, mask, out_path, explain_path=None, device="cpu",
                   roles=("--out", "--explain"), icc_profile: Optional[bytes] = None) -> None:
    """``roles`` name the outputs in error messages (the options the user gave); ``icc_profile``
    (the input's, :func:`rgb_icc_profile`) goes into both: their pixels are in its colours."""
    out = harmonize_array(model, img, mask, device)
    overlay = heatmap_overlay(img, contribution_map(model, img, mask, device), mask) \
        if explain_path is not None else None
    outputs = [(out, out_path, roles[0])]
    if overlay is not None:
        outputs.append((overlay, explain_path, roles[1]))
    save_images(outputs, icc_profile)


def _is_mask(p: Path) -> bool:
    return p.stem.endswith("_mask")


def _group(paths, key) -> Dict[str, List[Path]]:
    groups: Dict[str, List[Path]] = {}
    for p in paths:
        groups.setdefault(key(p), []).append(p)
    return groups


def _folder_files(input_dir: Path) -> List[Path]:
    return sorted(p for p in input_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def folder_pairs(input_dir: Path):
    """[(name, image path, mask path or None)] for the images of ``input_dir`` that are not masks.

    Two images with one name (``a.jpg``, ``a.png``) would both be written to ``a.png``, and two
    masks for one name leave the choice to chance: both are refused, naming the files."""
    files = _folder_files(input_dir)
    images = _group([p for p in files if not _is_mask(p)], lambda p: p.stem)
    masks = _group([p for p in files if _is_mask(p)], lambda p: p.stem[:-len("_mask")])
    clashes = [f"{' and '.join(map(str, ps))} would both be written as {name}.png"
               for name, ps in images.items() if len(ps) > 1]
    clashes += [f"{' and '.join(map(str, ms))} are masks for the same image {name}"
                for name, ms in masks.items() if len(ms) > 1]
    if clashes:
        raise InputError(f"in {input_dir}: " + "; ".join(clashes) + ": keep one file per name")
    return [(name, ps[0], masks.get(name, [None])[0]) for name, ps in images.items()]


def orphan_masks(input_dir: Path) -> List[Path]:
    """Masks of ``input_dir`` without an image of their name (skipped by folder mode)."""
    files = _folder_files(input_dir)
    names = {p.stem for p in files if not _is_mask(p)}
    return [p for p in files if _is_mask(p) and p.stem[:-len("_mask")] not in names]


def _check_single_paths(a) -> None:
    """Every output of single mode can be written and overwrites neither an input nor the other."""
    outputs = [("--out", a.out)] + ([("--explain", a.explain)] if a.explain is not None else [])
    for role, path in outputs:
        check_output(path, role, inputs=(("--image", a.image), ("--mask", a.mask)))
    if a.explain is not None and same_file(a.out, a.explain):
        raise InputError(f"--explain {a.explain} is the --out file: the map would overwrite the "
                         f"harmonized image; give another name")


def _check_folder_paths(a, pairs) -> None:
    """The output folders can be made, are not one folder, and no result or map overwrites an input."""
    _check_folder(a.out_dir, "--out-dir")
    if a.explain_dir is not None:
        _check_folder(a.explain_dir, "--explain-dir")
        if same_file(a.out_dir, a.explain_dir):
            raise InputError(f"--explain-dir {a.explain_dir} is the --out-dir: the maps would overwrite "
                             f"the harmonized images; give another folder")
    inputs = {Path(p).resolve(): p for p in _folder_files(a.input_dir)}
    clashes = [f"{out} would overwrite the input {inputs[out.resolve()]}"
               for name, _, _ in pairs
               for out in (a.out_dir / f"{name}.png",
                           *([a.explain_dir / f"{name}.png"] if a.explain_dir is not None else []))
               if out.resolve() in inputs]
    if clashes:
        raise InputError("; ".join(clashes) + ": give another --out-dir (or --explain-dir)")


def _folder_inputs(a):
    """(pairs, orphan masks) of --input-dir, refused when it is not a folder of usable pairs."""
    if not a.input_dir.is_dir():
        what = "is a file, not a folder" if a.input_dir.exists() else "not found"
        raise InputError(f"--input-dir {a.input_dir} {what}: give the folder holding <name>.jpg "
                         f"and <name>_mask.png")
    pairs = folder_pairs(a.input_dir)
    if not pairs:
        raise InputError(f"no images in {a.input_dir} (expected <name>.jpg with <name>_mask.png)")
    return pairs, orphan_masks(a.input_dir)


def _check_max_pixels(p, value: Optional[float]) -> Optional[int]:
    # int() of nan/inf raises, and a limit under one pixel refuses every image
    if value is None:
        return None
    if not math.isfinite(value) or value < 1:
        p.error(f"--max-pixels must be a finite number of pixels of at least 1 (e.g. 50e6), got {value}")
    return int(value)


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
    p.add_argument("--backend", default=None, choices=("auto",) + NAMES,
                   help="op backend of PTL/LTL (default: the one the model trained with where it can "
                        "run on --device, else auto)")
    p.add_argument("--max-pixels", type=float, default=None,
                   help="refuse larger images (default: about 179e6, Pillow's decompression-bomb limit)")
    a = p.parse_args(argv)
    max_pixels = _check_max_pixels(p, a.max_pixels)
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
        device = pick_device(a.device)
        if single:
            # bad outputs, then bad inputs, fail before any pixel is read or a model loaded
            _check_single_paths(a)
            img, mask = load_pair(a.image, a.mask, max_pixels, a.explain is not None)
            model = _load_model(a.checkpoint, device, a.backend)
            if a.explain is not None:
                _check_explainable(model)
            process_arrays(model, img, mask, a.out, a.explain, device,
                           icc_profile=rgb_icc_profile(a.image))
            print(a.out if a.explain is None else f"{a.out}\n{a.explain}")  # as folder mode lists them
            return 0
        pairs, orphans = _folder_inputs(a)
        _check_folder_paths(a, pairs)
        for m in orphans:
            print(f"note: skipping {m}: no image {m.stem[:-len('_mask')]}.<ext> beside it", file=sys.stderr)
        model = _load_model(a.checkpoint, device, a.backend)
        if a.explain_dir is not None:
            _check_explainable(model)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line for the user, no traceback
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    failed = 0
    for name, img_path, mask_path in pairs:
        try:
            if mask_path is None:
                raise InputError(f"no mask for {img_path} (expected {a.input_dir / (name + '_mask.png')})")
            explain = a.explain_dir / f"{name}.png" if a.explain_dir is not None else None
            process(model, img_path, mask_path, a.out_dir / f"{name}.png", explain, device, max_pixels,
                    roles=("--out-dir", "--explain-dir"))
            print(f"{a.out_dir / (name + '.png')}" + (f"\n{explain}" if explain is not None else ""))
        except KeyboardInterrupt:
            return 130
        except Exception as e:
            failed += 1
            print(f"error: {one_line(e)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
