"""Checks of the images and masks that users hand to the public functions (inference, metrics,
loss, baselines), so that each names the argument, the shape or dtype it got and the fix.

Dtype and shape checks only cost Python; the value checks (:func:`check_mask_values`,
:func:`check_image_values`) read the data, so they are kept to entry points that are not in a
training step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def mask_weights(mask: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A mask as weights: a float mask as it is (in ``dtype`` when given), a bool mask as 0/1.
    Integer masks are refused (an 8-bit picture's 255 would be a weight of 255)."""
    if mask.dtype == torch.bool:
        return mask.to(dtype or torch.float32)
    if not mask.is_floating_point():
        raise TypeError(f"mask must be a float tensor of weights in [0, 1] (or bool), got {mask.dtype}; "
                        f"for an 8-bit mask picture use mask.float() / 255")
    return mask if dtype is None else mask.to(dtype)


def check_images(*named) -> torch.Size:
    """Each ``(name, tensor)`` a float Tensor[B, 3, H, W], all of one shape; returns it."""
    shape = None
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor with values in [0, 1], got {t.dtype}; "
                            f"for 8-bit data use {name}.float() / 255")
        if shape is not None and t.shape != shape:
            raise ValueError(f"{named[0][0]} {tuple(shape)} and {name} {tuple(t.shape)} must have one shape")
        shape = t.shape
    return shape


def check_mask(mask: torch.Tensor, image_shape: torch.Size, name: str = "mask") -> torch.Tensor:
    """``mask`` a Tensor[B, 1, H, W] (bool or float weights) matching an image of
    ``image_shape``; returns it as weights (:func:`mask_weights`)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    want = (image_shape[0], 1, *image_shape[-2:])
    if tuple(mask.shape) != want:
        raise ValueError(f"{name} must have shape (B, 1, H, W) = {want} to match the image, got "
                         f"{tuple(mask.shape)}")
    return mask_weights(mask)


def check_image_values(image: torch.Tensor, name: str = "image") -> None:
    """Values finite and in [0, 1] (1e-3 of slack for a resize's rounding): a 0..255 image would
    come back far off, and one NaN spreads through the network to the whole foreground."""
    if not image.numel():
        return
    lo, hi = (float(v) for v in image.aminmax())
    if not (math.isfinite(lo) and math.isfinite(hi)):   # NaN anywhere makes both NaN
        raise ValueError(f"{name} holds NaN or infinite values: it must be colours in [0, 1]")
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = f"; for 8-bit values use {name} / 255" if hi > 1 else ""
        raise ValueError(f"{name} must hold colours in [0, 1], got values in [{lo:g}, {hi:g}]{hint}")


def check_mask_values(weights: torch.Tensor, name: str = "mask") -> None:
    """Weights finite and in [0, 1] (a 0..255 mask would scale the foreground by 255)."""
    if not weights.numel():
        return
    if not torch.isfinite(weights).all():
        raise ValueError(f"{name} holds NaN or infinite values: it must be weights in [0, 1]")
    lo, hi = (v.item() for v in weights.aminmax())
    if lo < 0 or hi > 1:
        hint = f"; for a 0..255 mask picture use {name} / 255" if hi > 1 else ""
        raise ValueError(f"{name} weights must be in [0, 1], got values in [{lo:g}, {hi:g}]{hint}")
