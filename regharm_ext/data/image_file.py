"""Reading user and dataset images safely: one-line errors, documented conversions, size limits.

Everything goes through Pillow. ``Image.open`` only reads the header, so the pixel count is known
(and checked against ``max_pixels``) before any pixel buffer is allocated; decoding errors of any
kind (truncated files, broken data streams, files that are not images) become an
:class:`ImageFileError` whose message names the file.

Conversions (the same for the ``harmonize`` CLI and the iHarmony4 loader):

- EXIF orientation is applied (``ImageOps.exif_transpose``) to images and masks alike, as image
  viewers and OpenCV's ``imread`` (the iDIH code) do.
- Images become 8-bit RGB: grayscale is replicated, palettes are expanded, an alpha channel is
  dropped (the stored colours are used), CMYK / YCbCr / LAB go through Pillow's conversion (no
  colour management). 16-bit grayscale images are scaled to 8 bits (``round(v · 255 / 65535)``;
  Pillow itself would clip them), 16-bit colour ones keep their high byte (Pillow's conversion).
  32-bit float images are refused.
- Masks become 8-bit grayscale weights ``m = value / 255`` (soft values are weights):
  a mask with a not fully opaque alpha channel (a cut-out) uses its alpha; a gray image stored
  as RGB is read as gray; a mask whose colour channels differ (a colour picture) is refused; a mask
  holding only the values 0 and 1 (a label map) is read as 0 / 255; 16-bit masks are scaled like
  images.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own decompression-bomb error threshold (2 x MAX_IMAGE_PIXELS, about 179 megapixels)
DEFAULT_MAX_PIXELS = 2 * 89_478_485
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# a mask is "colour" when more than this fraction of its pixels has channels further apart than
# _COLOUR_SPREAD levels (JPEG-compressed gray masks stay far below both)
_COLOUR_SPREAD = 24
_COLOUR_FRACTION = 0.005


class ImageFileError(ValueError):
    """A file cannot be used as an image or mask; the message is one line naming the file."""


# Image.MAX_IMAGE_PIXELS is Pillow's global: threads opening files at once would restore each
# other's values (and leave the process with a raised decompression-bomb limit)
_PIXEL_LIMIT_LOCK = threading.Lock()


def _open(path: Path, what: str, max_pixels: Optional[int]) -> Image.Image:
    """The file opened lazily (header only) after the existence and size checks."""
    path = Path(path)
    if not path.exists():
        raise ImageFileError(f"{what} not found: {path}")
    if not path.is_file():
        raise ImageFileError(f"{what} is not a file: {path}")
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    with _PIXEL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        try:
            # our own check below gives the message; Pillow's (at 2 x its limit) stays a safety net
            Image.MAX_IMAGE_PIXELS = max(limit, 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)
        except Image.DecompressionBombError:
            raise ImageFileError(f"{what} {path} is too large: above the limit of "
                                 f"{_megapixels(limit)} megapixels") from None
        except UnidentifiedImageError:
            raise ImageFileError(f"cannot read {what} {path}: not an image file that Pillow can read") from None
        except OSError as exc:
            raise ImageFileError(f"cannot read {what} {path}: {_reason(exc)}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old
    w, h = img.size
    if w * h > limit:
        img.close()
        raise ImageFileError(f"{what} {path} is {w}x{h} = {_megapixels(w * h)} megapixels, above the "
                             f"limit of {_megapixels(limit)} megapixels")
    if w == 0 or h == 0:
        img.close()
        raise ImageFileError(f"{what} {path} has no pixels ({w}x{h})")
    return img


def _megapixels(pixels: float) -> str:
    # 3 significant digits: a small --max-pixels (5000) must not read as "0.0 megapixels"
    return f"{pixels / 1e6:.3g}"


def _reason(exc: BaseException) -> str:
    """Pillow's message on one line; truncation (worded variously by the plugins) said plainly."""
    text = getattr(exc, "strerror", None) or str(exc)
    reason = text.splitlines()[0] if text else type(exc).__name__
    return f"the file is truncated ({reason})" if "truncated" in reason.lower() else reason


def _orientation_swaps(img: Image.Image) -> bool:
    """EXIF orientations 5-8 rotate by 90 degrees: width and height trade places. Read from the
    header: a PNG's getexif() decodes the whole image when no eXIf chunk precedes the pixels, so
    a PNG's orientation comes from the chunk alone (one after the pixels is seen on decoding)."""
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return False
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        return exif.get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # an unreadable EXIF block is ignored, as exif_transpose ignores it
        return False


def _already_upright(img: Image.Image) -> bool:
    """Pillow >= 11 opens a TIFF of orientation 5-8 with its upright size already: the size
    differs from the stored one (tags 256, 257)."""
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return False
    stored = (tags.get(256), tags.get(257))
    return None not in stored and stored != tuple(img.size)


def image_size(path, what: str = "image", max_pixels: Optional[int] = None) -> Tuple[int, int]:
    """(width, height) as the file will be read (EXIF orientation applied), from the header only.

    Raises :class:`ImageFileError` for a missing, unidentifiable or too large file."""
    with _open(Path(path), what, max_pixels) as img:
        w, h = img.size
        return (h, w) if _orientation_swaps(img) and not _already_upright(img) else (w, h)


def _decode(path: Path, what: str, max_pixels: Optional[int]) -> Image.Image:
    img = _open(path, what, max_pixels)
    try:
        img.load()
        out = ImageOps.exif_transpose(img)
    except MemoryError:
        img.close()
        raise ImageFileError(f"not enough memory to decode {what} {path} "
                             f"({img.size[0]}x{img.size[1]})") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error, ...
        img.close()
        raise ImageFileError(f"cannot read {what} {path}: {_reason(exc)}") from None
    if out is not img:   # exif_transpose made a rotated copy
        img.close()
    return out


def _sixteen_bit(img: Image.Image, path: Path, what: str) -> np.ndarray:
    """Integer pixels (I;16*, I) as a uint16-range int64 array; refused outside 0..65535."""
    a = np.asarray(img).astype(np.int64)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ImageFileError(f"{what} {path} has 32-bit integer pixels ({lo}..{hi}), which are not "
                             f"supported: save it with 8 or 16 bits per channel")
    return a


def _to_8bit(a: np.ndarray) -> np.ndarray:
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _refuse_float(img: Image.Image, path: Path, what: str) -> None:
    if img.mode == "F":
        raise ImageFileError(f"{what} {path} has 32-bit float pixels (mode F), which are not supported: "
                             f"save it with 8 or 16 bits per channel")


def read_rgb(path, what: str = "image", max_pixels: Optional[int] = None) -> np.ndarray:
    """The image as uint8 [H, W, 3] (writable), converted as the module doc says."""
    path = Path(path)
    img = _decode(path, what, max_pixels)
    _refuse_float(img, path, what)
    if img.mode in _SIXTEEN_BIT:
        g = _to_8bit(_sixteen_bit(img, path, what))
        return np.repeat(g[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img)


def rgb_icc_profile(path) -> Optional[bytes]:
    """The colour profile embedded in an RGB image (ICC bytes), or None: none there, or one for
    another colour space (a grey or CMYK profile does not describe the RGB pixels read_rgb
    returns). An output written with it displays in the input's colours (Display P3 and other
    wide-gamut photos would otherwise be shown as sRGB)."""
    try:
        with Image.open(path) as img:
            icc = img.info.get("icc_profile")
    except Exception:  # noqa: BLE001 - the pixels were read already: no profile is not an error
        return None
    # bytes 16-19 of an ICC header name the data colour space
    return icc if isinstance(icc, bytes) and icc[16:20] == b"RGB " else None


def read_mask(path, what: str = "mask", max_pixels: Optional[int] = None) -> np.ndarray:
    """The mask as uint8 [H, W] (writable; 255 = foreground), converted as the module doc says."""
    path = Path(path)
    img = _decode(path, what, max_pixels)
    _refuse_float(img, path, what)
    if img.mode in _SIXTEEN_BIT:
        a = _sixteen_bit(img, path, what)
        peak = int(a.max(initial=0))
        if 1 < peak <= 255:
            # 8-bit values stored in 16 bits: scaled, the mask would be weights of 1/255 or less
            raise ImageFileError(f"{what} {path}: {sixteen_bit_advice(peak)}")
        return (a * 255).astype(np.uint8) if peak == 1 else _to_8bit(a)
    if img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return _label_map(np.array(alpha))
    if img.mode in ("1", "L"):
        return _label_map(np.array(img.convert("L")))
    rgb = np.asarray(img.convert("RGB"))
    spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    if float((spread > _COLOUR_SPREAD).mean()) > _COLOUR_FRACTION:
        raise ImageFileError(f"{what} {path} is a colour image; expected a grayscale mask "
                             f"(white = foreground, black = background)")
    return _label_map(np.array(img.convert("L")))


def sixteen_bit_advice(peak: int) -> str:
    """What to do about a 16-bit mask whose largest value is ``peak``: its scaling to 8 bits
    leaves it near 0 (0/255 stored in 16 bits becomes 0/1)."""
    return (f"its pixels are 16-bit (0..65535) and the largest, {peak}, scales to "
            f"{round(peak * 255 / 65535)} of 255: save the mask with 8 bits per pixel, or scale it to 0..65535")


def sixteen_bit_peak(path, what: str = "mask", max_pixels: Optional[int] = None) -> Optional[int]:
    """The largest stored value of a 16-bit (or 32-bit integer) grayscale file, None for other
    files: explains a mask whose 0/255 values became 0/1 in the 16-bit scaling above."""
    path = Path(path)
    with _open(path, what, max_pixels) as img:
        if img.mode not in _SIXTEEN_BIT:
            return None
    img = _decode(path, what, max_pixels)
    try:
        return int(np.asarray(img).max(initial=0))
    finally:
        img.close()


def _label_map(m: np.ndarray) -> np.ndarray:
    """A mask holding only 0 and 1 is a label map: read it as 0 / 255."""
    if m.size and int(m.max()) == 1:
        return m * np.uint8(255)
    return m


def available_memory() -> Optional[int]:
    """Bytes this process may still allocate: the smaller of the system's available memory and
    what the cgroup (container) limit leaves; None when neither is known."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(need: int, what: str) -> None:
    """Refuse (:class:`ImageFileError`) when ``need`` bytes exceed the memory available now."""
    have = available_memory()
    if have is not None and need > have:
        raise ImageFileError(f"{what} needs about {need / 2**30:.1f} GiB of memory but only "
                             f"{have / 2**30:.1f} GiB is available; use a smaller image")
