"""Running a Harmonizer on images of any size (shared by ``evaluate`` and ``harmonize``).

The network sees the image at its training resolution ``model.input_size`` (bilinear resize with
antialiasing, like the training data); its raw output Î (``model.predict_raw``: the residual, or
the foreground for ``base``) is upsampled bilinearly to the original size and applied there with
the original mask (``model.compose``: Eq. 7 / Eq. 6). At the training resolution this is exactly
``model(image, mask)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .layers import mask_weights


def pick_device(name: str) -> torch.device:
    """The ``--device`` of the command-line tools: "auto" (a GPU when one is usable, else the
    CPU), "cpu", "cuda" or "cuda:N". A GPU asked for where none is usable is refused in words."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for, but PyTorch sees no CUDA GPU (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0 ...)")
    return dev


def model_size(model) -> Optional[Tuple[int, int]]:
    """The (H, W) a model runs at (``input_size``), or None for a model without one."""
    s = getattr(model, "input_size", None)
    if s is None:
        return None
    return (s, s) if isinstance(s, int) else tuple(int(v) for v in s)


def resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of x (Tensor[B, C, H, W]), antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


@torch.no_grad()
def predict_raw_at(model, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Î at the image's resolution: computed at ``model.input_size`` and upsampled.

    image (Tensor[B, 3, H, W]) in [0, 1], mask (Tensor[B, 1, H, W]) -> Tensor[B, 3, H, W]."""
    mask = mask_weights(mask, image.dtype)
    size = model_size(model)
    if size is None or tuple(image.shape[-2:]) == size:
        return model.predict_raw(image, mask)
    raw = model.predict_raw(resize(image, size), resize(mask, size).clamp(0, 1))
    return F.interpolate(raw, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)


@torch.no_grad()
def harmonize_tensor(model, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Harmonized image (Tensor[B, 3, H, W]) at the input's resolution, not clamped.

    ``model`` is a Harmonizer (``predict_raw``, ``compose``, ``input_size``); any other module
    with ``forward(image, mask) -> O`` is called directly."""
    mask = mask_weights(mask, image.dtype)
    if not (hasattr(model, "predict_raw") and hasattr(model, "compose")):
        return model(image, mask)
    return model.compose(image, predict_raw_at(model, image, mask), mask)
