"""Non-learned baselines scored under the same protocol as the model (see :mod:`.evaluate`).

- ``composite``: the unharmonized input, ``O = I``.
- ``reinhard``: Reinhard et al., "Color transfer between images" (2001; the paper's [22]): in the
  decorrelated lαβ space (RGB -> LMS -> log10 -> lαβ, the paper's matrices), every channel of the
  foreground is moved to the background's mean and standard deviation,
  ``t = (s - μ_fg) · σ_bg / σ_fg + μ_bg``, then converted back and pasted inside the mask,
  ``O = I (1 - M) + RGB(t) M``. Statistics are weighted by the soft mask (``M`` for the
  foreground, ``1 - M`` for the background). An image without foreground or background is
  returned unchanged.
- ``reinhard-cielab``: the same transfer in CIELAB (D65), the space most re-implementations use;
  on the embedded validation split it is the stronger of the two (see the README's table).
"""
from __future__ import annotations

import math

import torch

from .image_args import check_images, check_mask, check_mask_values

_RGB2LMS = torch.tensor([[0.3811, 0.5783, 0.0402],
                         [0.1967, 0.7244, 0.0782],
                         [0.0241, 0.1288, 0.8444]], dtype=torch.float64)
_LMS2RGB = torch.tensor([[4.4679, -3.5873, 0.1193],
                         [-1.2186, 2.3809, -0.1624],
                         [0.0497, -0.2439, 1.2045]], dtype=torch.float64)
_LOG2LAB = torch.diag(torch.tensor([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)], dtype=torch.float64)) \
    @ torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
_LAB2LOG = torch.linalg.inv(_LOG2LAB)
# log10 needs positive LMS: black pixels are lifted to this floor (1/255 of the white point)
_FLOOR = 1.0 / 255.0


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the channel axis of x (Tensor[B, 3, H, W])."""
    return torch.einsum("ij,bjhw->bihw", m.to(x), x)


def rgb_to_lab_reinhard(rgb: torch.Tensor) -> torch.Tensor:
    """lαβ of Reinhard et al. for rgb (Tensor[B, 3, H, W]) in [0, 1]."""
    lms = _mix(_RGB2LMS, rgb).clamp_min(_FLOOR)
    return _mix(_LOG2LAB, torch.log10(lms))


def lab_to_rgb_reinhard(lab: torch.Tensor) -> torch.Tensor:
    return _mix(_LMS2RGB, torch.pow(10.0, _mix(_LAB2LOG, lab)))


_RGB2XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64).view(1, 3, 1, 1)
_D = 6 / 29


def rgb_to_cielab(rgb: torch.Tensor) -> torch.Tensor:
    """CIELAB (D65) of sRGB rgb (Tensor[B, 3, H, W]) in [0, 1]."""
    rgb = rgb.clamp(0, 1)
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = _mix(_RGB2XYZ, lin) / _WHITE.to(rgb)
    f = torch.where(xyz > _D ** 3, xyz.clamp_min(_D ** 3) ** (1 / 3), xyz / (3 * _D * _D) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def cielab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], 1)
    xyz = torch.where(f > _D, f ** 3, 3 * _D * _D * (f - 4 / 29)) * _WHITE.to(lab)
    lin = _mix(torch.linalg.inv(_RGB2XYZ), xyz).clamp(0, 1)
    return torch.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin.clamp_min(1e-12) ** (1 / 2.4) - 0.055)


_SPACES = {"lab-alpha-beta": (rgb_to_lab_reinhard, lab_to_rgb_reinhard), "cielab": (rgb_to_cielab, cielab_to_rgb)}


def reinhard(image: torch.Tensor, mask: torch.Tensor, space: str = "lab-alpha-beta",
             eps: float = 1e-6) -> torch.Tensor:
    """Reinhard colour transfer of the foreground to the background.

    Args:
        image (Tensor[B, 3, H, W]) in [0, 1], mask (Tensor[B, 1, H, W]) in [0, 1].
        space: "lab-alpha-beta" (the original paper's lαβ) or "cielab".
    Returns: Tensor[B, 3, H, W] in [0, 1], the input dtype.
    """
    if space not in _SPACES:
        raise ValueError(f"space must be one of {sorted(_SPACES)}, got {space!r}")
    to_lab, from_lab = _SPACES[space]
    m = check_mask(mask, check_images(("image", image))).double()
    check_mask_values(m)
    x = image.double()
    lab = to_lab(x)

    def stats(w):
        mass = w.sum((2, 3), keepdim=True)
        safe = mass.clamp_min(eps)
        mu = (w * lab).sum((2, 3), keepdim=True) / safe
        sd = torch.sqrt((w * (lab - mu) ** 2).sum((2, 3), keepdim=True) / safe + eps)
        return mass, mu, sd

    fmass, fmu, fsd = stats(m)
    bmass, bmu, bsd = stats(1 - m)
    moved = from_lab((lab - fmu) * (bsd / fsd) + bmu).clamp(0, 1)
    out = x * (1 - m) + moved * m
    ok = ((fmass > 0.5) & (bmass > 0.5)).to(x.dtype)
    return (ok * out + (1 - ok) * x).to(image.dtype)


def reinhard_cielab(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`reinhard` in CIELAB."""
    return reinhard(image, mask, space="cielab")


def composite(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The unharmonized input (Tensor[B, 3, H, W])."""
    return image
