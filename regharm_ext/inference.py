"""Running a Harmonizer on images of any size (shared by ``evaluate`` and ``harmonize``).

The network sees the image at its training resolution ``model.input_size`` (bilinear resize with
antialiasing, like the synthetic training data; the iHarmony4 loader resizes without it); it runs in
its parameters' dtype, and its raw output Î (``model.predict_raw``: the residual, or
the foreground for ``base``) is upsampled bilinearly to the original size and applied there with
the original mask (``model.compose``: Eq. 7 / Eq. 6). At the training resolution this is exactly
``model(image, mask)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .image_args import check_image_values, check_images, check_mask, check_mask_values


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
    """Î at the image's resolution: computed at ``model.input_size`` and upsampled, with the
    model in eval mode and in its parameters' dtype (as :func:`harmonize_tensor`).

    image (Tensor[B, 3, H, W]) in [0, 1], mask (Tensor[B, 1, H, W]) -> Tensor[B, 3, H, W] in
    the image's dtype."""
    mask = check_pair(image, mask)
    with _EvalMode(model):
        return _predict_raw_at(model, image, mask, _param_dtype(model) or image.dtype)


def _predict_raw_at(model, image: torch.Tensor, mask: torch.Tensor,
                    run_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Î in the image's dtype; the network runs in ``run_dtype`` (default: the image's). Resizes
    run in float32 (or float64): PyTorch's CPU antialiasing has no 16-bit kernels."""
    size = model_size(model)
    run = run_dtype or image.dtype
    if size is None or tuple(image.shape[-2:]) == size:
        return model.predict_raw(image.to(run), mask.to(run)).to(image.dtype)
    wide = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    small = resize(image.to(wide), size), resize(mask.to(wide), size).clamp(0, 1)
    raw = model.predict_raw(*(t.to(run) for t in small))
    return F.interpolate(raw.to(wide), size=tuple(image.shape[-2:]), mode="bilinear",
                         align_corners=False).to(image.dtype)


def check_pair(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The checks of the user-facing entry points, before anything is resized: image
    (Tensor[B, 3, H, W] float in [0, 1]) and mask (Tensor[B, 1, H, W], bool or float weights in
    [0, 1]) of one batch and size. Returns the mask as weights in the image's dtype."""
    weights = check_mask(mask, check_images(("image", image)))  # integer masks refused uncast
    check_image_values(image)
    check_mask_values(weights)
    return weights.to(image.dtype)


class _EvalMode:
    """The model in eval mode for the duration (BatchNorm's running statistics are inference's,
    and a model built in training mode must not have them updated), every submodule's mode
    restored after (a fine-tuning setup may keep some BatchNorm layers in eval mode)."""

    def __init__(self, model):
        self.model = model
        modules = model.modules() if hasattr(model, "modules") else ()
        self.modes = [(m, m.training) for m in modules]

    def __enter__(self):
        if any(training for _, training in self.modes):
            self.model.eval()

    def __exit__(self, *exc):
        for m, training in self.modes:
            m.training = training


def _param_dtype(model) -> Optional[torch.dtype]:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.dtype if p is not None and p.is_floating_point() else None


@torch.no_grad()
def harmonize_tensor(model, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Harmonized image (Tensor[B, 3, H, W]) at the input's resolution, not clamped, in the
    image's dtype (the network runs in its parameters' dtype), with the model in eval mode.

    ``model`` is a Harmonizer (``predict_raw``, ``compose``, ``input_size``); any other module
    with ``forward(image, mask) -> O`` is called directly. ``image`` is float in [0, 1], ``mask``
    bool or float weights in [0, 1] of shape (B, 1, H, W)."""
    mask = check_pair(image, mask)
    run_dtype = _param_dtype(model) or image.dtype
    with _EvalMode(model):
        if not (hasattr(model, "predict_raw") and hasattr(model, "compose")):
            return model(image.to(run_dtype), mask.to(run_dtype)).to(image.dtype)
        # composed in the image's dtype: a 16-bit model must not round the background
        return model.compose(image, _predict_raw_at(model, image, mask, run_dtype), mask)
