"""The training loss of the paper: foreground-normalized MSE (Eq. 8, after iDIH [23])."""
from __future__ import annotations

import torch


def fmse_loss(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, a_min: float = 100.0) -> torch.Tensor:
    """Eq. 8, per image, then the mean over the batch::

        L_b = Σ_{h,w,c} (O_bchw - H_bchw)² / max(A_min, Σ_{h,w} M_bhw)

    The squared error is summed over every pixel and channel (background included: the residual
    and base outputs copy the background, so it contributes ~0) and divided by the foreground
    area in pixels, floored at ``a_min`` so that tiny foregrounds do not blow the loss up.

    Args:
        output, target (Tensor[B, 3, H, W]): images in [0, 1].
        mask (Tensor[B, 1, H, W]): foreground weights in [0, 1].
        a_min (float): the area floor A_min (100 in the paper).

    Returns:
        Scalar tensor (float32, or float64 for float64 inputs).
    """
    if output.shape != target.shape:
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} must have one shape")
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != output.shape[0] \
            or mask.shape[-2:] != output.shape[-2:]:
        raise ValueError(f"mask must have shape (B, 1, H, W) = {(output.shape[0], 1, *output.shape[-2:])}, "
                         f"got {tuple(mask.shape)}")
    dt = torch.float64 if output.dtype == torch.float64 else torch.float32
    err = ((output.to(dt) - target.to(dt)) ** 2).flatten(1).sum(1)
    area = mask.to(dt).flatten(1).sum(1).clamp_min(a_min)
    return (err / area).mean()
