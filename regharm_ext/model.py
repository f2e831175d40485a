"""The generator of the paper (§3.1, §3.4, SPEC §5): a U-Net on ``concat(I, M)`` with LTL and PTL.

Architecture (``input_size`` S = 256, ``width`` 1, ``base_channels`` 32; channels scale with
``width * base_channels / 32`` and are capped at 1024, the paper's "restriction of 1024", Table 5):

============  ========  ========  ==================================================================
level         size      channels  blocks
============  ========  ========  ==================================================================
stem          S    256  32        conv3x3(4 -> 32)
enc 1         S/2  128  64        conv3x3 stride 2, conv3x3
enc 2         S/4   64  128       conv3x3 stride 2, conv3x3
enc 3         S/8   32  256       conv3x3 stride 2, conv3x3
enc 4         S/16  16  256       conv3x3 stride 2, conv3x3
bottleneck    S/32   8  512       conv3x3 stride 2
dec 4         S/16  16  256       up x2, conv3x3, concat enc 4, conv3x3   [+ LTL if 16 in ltl_levels]
dec 3         S/8   32  256       up x2, conv3x3, concat enc 3, conv3x3   [+ LTL, default level]
dec 2         S/4   64  128       up x2, conv3x3, concat enc 2, conv3x3   [+ LTL if 64 in ltl_levels]
dec 1         S/2  128  64        up x2, conv3x3, concat enc 1, conv3x3   [+ PTL / RAIN]
dec 0         S    256  32        up x2, conv3x3, concat stem, conv3x3
head          S    256  3         conv1x1 -> Î (no activation)
============  ========  ========  ==================================================================

Every conv3x3 is followed by BatchNorm and an activation (LeakyReLU 0.2 in the encoder, ReLU in the
decoder); "up x2" is bilinear upsampling. Parameters of ``rbase+ltl+ptl``: 8.83 M at width 1,
35.29 M / 72.30 M / 122.23 M at widths 2 / 3 / 4 (paper, Table 5: 9.48 / 37.81 / 72.39 / 117.42 M);
``base``/``rbase`` 8.43 M (LTL adds 0.39 M at 32², PTL 257 weights).

Input: ``concat(2 I - 1, M)``. Output (Eq. 6 / Eq. 7):
- ``base``: ``O = I * (1 - M) + Î * M``;
- residual variants (``rbase...``): ``O = I + Î * M``; the head starts at zero, so an untrained
  residual model returns the composite.

Variants (Table 2), one config string: ``base``, ``rbase``, ``rbase+ltl``, ``rbase+sa`` (plain
self-attention with a residual, ``x + SA(x)``, where LTL would be), ``rbase+adain`` (RainNet's RAIN,
:class:`regharm_ext.rain.RAIN`, where PTL would be), ``rbase+ptl``, ``rbase+ltl+ptl`` (the paper's).

``ltl_levels`` name decoder levels by their size at a 256² input (Table 3: 16, 32, 64), i.e. as
the fractions S/16, S/8, S/4 of the input, so that other input sizes work: ``(32,)`` at a 128²
input puts LTL on the 16² decoder feature. PTL always sits on the S/2 decoder feature, with the
SPEC's fractional patch (1/8) and stride (1/32) of that feature.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .image_args import check_images, check_mask, mask_weights
from .layers import LTL, PTL, SelfAttention
from .rain import RAIN

VARIANTS = ("base", "rbase", "rbase+ltl", "rbase+sa", "rbase+adain", "rbase+ptl", "rbase+ltl+ptl")
# channel multipliers of levels 0..5 (sizes S, S/2, ..., S/32) relative to base_channels
_MULT = (1, 2, 4, 8, 8, 16)
_CAP = 1024
_LTL_SIZES = {16: 4, 32: 3, 64: 2}   # size at a 256² input -> decoder level (S / 2**level)
_PTL_LEVEL = 1
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def memory_format_for(name: str, device: Union[str, torch.device]) -> torch.memory_format:
    """The layout a Harmonizer's weights (hence its activations) take on ``device``.

    ``"auto"`` is ``channels_last`` on the CPU, where oneDNN's convolutions then run without
    reordering every activation (measured on 2 cores: a demo training step 12-15 % faster, a paper
    step 9-20 %, batched inference 13-24 %, one image 5-8 %: the README's benchmark table), and
    ``contiguous`` elsewhere (unmeasured on GPUs).
    PTL and LTL accept either layout; their ops return contiguous tensors."""
    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {name!r}")
    if name == "auto":
        name = "channels_last" if torch.device(device).type == "cpu" else "contiguous"
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def canonical_variant(variant: str) -> str:
    """The variant's name with its parts in :data:`VARIANTS`' order (``rbase+ptl+ltl`` ->
    ``rbase+ltl+ptl``): one model, one name, in configs and checkpoints."""
    residual, token, patch = parse_variant(variant)
    return "+".join(["rbase" if residual else "base"] + [p for p in (token, patch) if p])


def parse_variant(variant: str) -> Tuple[bool, Optional[str], Optional[str]]:
    """``"rbase+ltl+ptl"`` -> (residual, token module ("ltl"/"sa"/None), patch module
    ("ptl"/"adain"/None)). Any ``base``/``rbase`` followed by at most one of ``ltl``/``sa`` and at
    most one of ``ptl``/``adain`` is accepted; Table 2 uses :data:`VARIANTS`."""
    if not isinstance(variant, str) or not variant:
        raise ValueError(f"variant must be a string like 'rbase+ltl+ptl', got {variant!r}")
    parts = variant.lower().split("+")
    if parts[0] not in ("base", "rbase"):
        raise ValueError(f"variant {variant!r} must start with 'base' or 'rbase'; known: {', '.join(VARIANTS)}")
    token = patch = None
    for p in parts[1:]:
        if p in ("ltl", "sa"):
            if token is not None:
                raise ValueError(f"variant {variant!r} names both {token!r} and {p!r}; pick one")
            token = p
        elif p in ("ptl", "adain"):
            if patch is not None:
                raise ValueError(f"variant {variant!r} names both {patch!r} and {p!r}; pick one")
            patch = p
        else:
            raise ValueError(f"unknown part {p!r} in variant {variant!r}; parts: ltl, sa, ptl, adain "
                             f"(known variants: {', '.join(VARIANTS)})")
    return parts[0] == "rbase", token, patch


def _conv(cin: int, cout: int, stride: int = 1, act: str = "relu") -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    layers.append(nn.LeakyReLU(0.2, inplace=True) if act == "lrelu" else nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _Up(nn.Module):
    """Bilinear x2, conv3x3 to the skip's width, concat the skip, conv3x3."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.reduce = _conv(cin, cout)
        self.merge = _conv(2 * cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.merge(torch.cat([self.reduce(x), skip], 1))


class _Residual(nn.Module):
    """``x + SelfAttention(x)``: the ``sa`` variant's layer (mask unused)."""

    def __init__(self, channels: int):
        super().__init__()
        self.attn = SelfAttention(channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _pair(size) -> Tuple[int, int]:
    items = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if len(items) != 2 or not all(_int(v) for v in items):
        raise ValueError(f"input_size must be an int or (H, W) of ints, got {size!r}")
    return int(items[0]), int(items[1])


class Harmonizer(nn.Module):
    """The paper's generator and its ablation variants (see the module docstring for the layout).

    Args:
        variant: one of :data:`VARIANTS` (``"rbase+ltl+ptl"`` is the paper's model).
        width: channel multiplier of Table 5 (1 to 4; channels capped at 1024).
        ltl_levels: decoder levels for LTL (or ``sa``), by their size at a 256² input: any of
            16, 32, 64 (Table 3); ignored by variants without LTL/SA.
        input_size: training/inference resolution S (int or (H, W)), each a multiple of 32. PTL's
            learned patch projection depends on it (its patch is a fraction of the feature).
        backend: op backend of PTL/LTL (None picks; see :mod:`regharm_ext.backends`).
        base_channels: stem channels at width 1 (32 = the paper-size model, 8.8 M parameters); smaller values
            give light models for CPU demos.

    Shapes: image (Tensor[B, 3, H, W]) in [0, 1], mask (Tensor[B, 1, H, W]) in [0, 1]
    -> output (Tensor[B, 3, H, W]).
    """

    def __init__(self, variant: str = "rbase+ltl+ptl", width: float = 1, ltl_levels: Iterable[int] = (32,),
                 input_size: Union[int, Sequence[int]] = 256, backend: Optional[str] = None,
                 base_channels: int = 32):
        super().__init__()
        self.residual, self.token_kind, self.patch_kind = parse_variant(variant)
        # checked as the config stores them: a checkpoint must rebuild this very model
        if isinstance(width, bool) or not isinstance(width, numbers.Real) or not (0 < width < math.inf):
            raise ValueError(f"width must be a number > 0 (Table 5: 1 to 4), got {width!r}")
        if not _int(base_channels) or base_channels < 1:
            raise ValueError(f"base_channels must be an int >= 1, got {base_channels!r}")
        if isinstance(ltl_levels, (str, bytes)) or not hasattr(ltl_levels, "__iter__") \
                or not all(_int(v) for v in ltl_levels):
            raise ValueError(f"ltl_levels must be a list of sizes such as [32] or [16, 32, 64], "
                             f"got {ltl_levels!r}")
        levels = tuple(sorted({int(v) for v in ltl_levels}))
        bad = [v for v in levels if v not in _LTL_SIZES]
        if bad:
            raise ValueError(f"ltl_levels {bad} unknown: choose among {sorted(_LTL_SIZES)} "
                             f"(decoder sizes at a 256² input)")
        if self.token_kind is not None and not levels:
            raise ValueError(f"variant {variant!r} needs at least one ltl_levels entry")
        h, w = _pair(input_size)
        step = 2 ** (len(_MULT) - 1)
        if h % step or w % step or h <= 0 or w <= 0:
            raise ValueError(f"input_size {(h, w)} must be positive multiples of {step}")
        self.input_size = (h, w)
        self.config: Dict = {
            "variant": canonical_variant(variant), "width": float(width) if width != int(width) else int(width),
            "ltl_levels": list(levels), "input_size": h if h == w else [h, w],
            "backend": backend, "base_channels": int(base_channels),
        }
        ch = [max(1, min(_CAP, int(round(base_channels * width * m)))) for m in _MULT]
        self.channels = ch

        self.stem = _conv(4, ch[0], act="lrelu")
        self.down = nn.ModuleList()
        for i in range(1, len(ch)):
            blocks = [_conv(ch[i - 1], ch[i], 2, "lrelu")]
            if i < len(ch) - 1:               # the bottleneck has a single conv
                blocks.append(_conv(ch[i], ch[i], act="lrelu"))
            self.down.append(nn.Sequential(*blocks))
        # up[i] produces decoder level i (size S / 2**i) from level i + 1
        self.up = nn.ModuleList(_Up(ch[i + 1], ch[i]) for i in range(len(ch) - 1))
        self.head = nn.Conv2d(ch[0], 3, 1)
        if self.residual:   # start as the identity O = I: the residual is learned from zero
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

        self.token_layers = nn.ModuleDict()
        if self.token_kind is not None:
            for size in levels:
                lvl = _LTL_SIZES[size]
                layer = LTL(ch[lvl], backend=backend) if self.token_kind == "ltl" else _Residual(ch[lvl])
                self.token_layers[str(lvl)] = layer
        self.patch_layer: Optional[nn.Module] = None
        if self.patch_kind == "ptl":
            self.patch_layer = PTL(ch[_PTL_LEVEL], feature_size=(h // 2, w // 2), backend=backend)
        elif self.patch_kind == "adain":
            self.patch_layer = RAIN(ch[_PTL_LEVEL])

    # ------------------------------------------------------------------ network
    def _check(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The inputs' checks; returns the mask as weights in the image's dtype."""
        weights = check_mask(mask, check_images(("image", image))).to(image.dtype)
        step = 2 ** (len(self.channels) - 1)
        if image.shape[-2] % step or image.shape[-1] % step:
            raise ValueError(f"image size {tuple(image.shape[-2:])} must be a multiple of {step}; "
                             f"resize to the model's input_size {self.input_size}")
        if self.patch_kind == "ptl" and tuple(image.shape[-2:]) != self.input_size:
            raise ValueError(f"this model (with PTL) runs at its input_size {self.input_size}, got an image "
                             f"of {tuple(image.shape[-2:])}; resize it (harmonize does this for you)")
        return weights

    def _run(self, image: torch.Tensor, mask: torch.Tensor, stop_at_patch: bool = False):
        mask = self._check(image, mask)
        skips = [self.stem(torch.cat([image * 2 - 1, mask], 1))]
        for blk in self.down:
            skips.append(blk(skips[-1]))
        x = skips.pop()
        for lvl in range(len(self.up) - 1, -1, -1):
            x = self.up[lvl](x, skips[lvl])
            if str(lvl) in self.token_layers:
                x = self.token_layers[str(lvl)](x, mask)
            if lvl == _PTL_LEVEL and self.patch_layer is not None:
                if stop_at_patch:
                    return x
                x = self.patch_layer(x, mask)
        if stop_at_patch:
            raise RuntimeError("unreachable: no patch layer")
        return self.head(x)

    def predict_raw(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The head's output Î (Tensor[B, 3, H, W], no activation): the residual for ``rbase``
        variants, the foreground itself for ``base``."""
        return self._run(image, mask)

    def compose(self, image: torch.Tensor, raw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 6 (``base``: ``I (1 - M) + Î M``) or Eq. 7 (residual: ``I + Î M``).

        Works at any resolution: ``image`` and ``mask`` (Tensor[B, 3|1, H, W]) may be the full
        resolution originals and ``raw`` an upsampled prediction (Tensor[B, 3, H, W])."""
        mask = mask_weights(mask, image.dtype)
        if self.residual:
            return image + raw * mask
        return image * (1 - mask) + raw * mask

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.compose(image, self.predict_raw(image, mask), mask)

    @torch.no_grad()
    def ptl_contribution(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fig. 5: how much the foreground attends to each background pixel of the PTL feature
        (Tensor[B, S/2, S/2], each map sums to 1). Only for variants with PTL. Runs in the
        module's mode, as forward does (in training mode BatchNorm updates its statistics);
        :func:`regharm_ext.harmonize.contribution_map` runs it in eval mode."""
        if self.patch_kind != "ptl":
            raise ValueError(f"variant {self.config['variant']!r} has no PTL: contribution maps need "
                             f"a variant with '+ptl' (e.g. 'rbase+ltl+ptl')")
        x = self._run(image, mask, stop_at_patch=True)
        return self.patch_layer.contribution(x, mask.to(x.dtype))

    def count_parameters(self) -> int:
        """Number of learned parameters."""
        return sum(p.numel() for p in self.parameters())
