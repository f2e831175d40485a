"""Drop-in layers of the paper: LTL (§3.2) and PTL (§3.3), exactly as SPEC §4 fixes them."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import preload
from .image_args import mask_weights  # noqa: F401  (re-exported: model.py and users import it here)
from .ops import _checks, masked_attention, masked_norm, patch_stats
from .ops.norm_composite import composite
from .ptl_node import (Blend, FusedPTLNode, PTLNode, attention_keys, blend_weight,
                       inactive_content_zeroed, node_ops, node_steps)

Size = Union[int, float, Tuple[Union[int, float], Union[int, float]]]


def resize_mask(mask: torch.Tensor, size: Tuple[int, int], batch: Optional[int] = None) -> torch.Tensor:
    """Mask (Tensor[B, 1, H, W]) at a feature size by area averaging; soft values stay weights.

    Float or bool masks (:func:`mask_weights`). ``batch``: the B the mask must have (the
    features' batch), checked so that a mismatch is named here rather than inside an op."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor (B, 1, H, W), got {type(mask).__name__}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape (B, 1, H, W), got {tuple(mask.shape)}")
    if batch is not None and mask.shape[0] != batch:
        raise ValueError(f"mask holds {mask.shape[0]} image(s) but x holds {batch}: give one mask per "
                         f"image, shape ({batch}, 1, H, W)")
    mask = mask_weights(mask)
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=size, mode="area")


def masked_instance_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Instance norm of x (Tensor[B, C, H, W]) with statistics over ``weight`` (Tensor[B, 1, H, W]).

    ``(x - mu) / sqrt(var + eps)`` at every position, ``mu``/``var`` the weighted mean/variance of
    each channel. An image whose weights sum to 0 gets ``mu = 0, var = 0`` (callers discard it).
    Gradients flow to ``x``; a ``weight`` that needs a gradient takes the plain autograd formula.
    """
    _checks.check_masked_norm(x, weight, eps)
    return composite(x, weight, eps, tokens=False)


def _resolve_size(value, extent: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an int (pixels) or a float (fraction of the map), got {value!r}")
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"{name} as a fraction must lie in (0, 1], got {value}")
        return max(1, int(round(value * extent)))
    if value < 1:
        raise ValueError(f"{name} must be >= 1 pixel, got {value}")
    return value


def _as_pair(value: Size):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _check_channels(channels, layer: str) -> None:
    # refused here: 0 would surface as a ZeroDivisionError in the attention scale
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
        raise ValueError(f"{layer} channels must be an int >= 1 (C of the input), got {channels!r}")


def _check_sizes(pair, name: str) -> None:
    """patch/stride checked at construction, not at the first forward (or in reset_parameters)."""
    if len(pair) != 2:
        raise ValueError(f"{name} must be one size or a pair (height, width), got {pair!r}")
    for value in pair:
        _resolve_size(value, 1, name)  # the same rules as at forward time; the extent is irrelevant


class PTL(nn.Module):
    """Patches-to-Location Translation (§3.3, SPEC §4).

    Every foreground position takes the appearance (mean, std) of the background patches whose
    content matches its own: ``T_fb = C_f * V + A`` with ``[A | V]`` one attention of the
    foreground content over the patch contents, valued by ``[mu | sigma]``.

    Args:
        channels: C of the input.
        patch, stride: int (pixels) or float (fraction of the feature height/width, rounded
            half to even as Python's round does, at least 1: 1/32 of 80 is 2, of 144 is 4), or a
            pair of them. Defaults 1/8 and 1/32: 16 and 4 at 128².
        eps: variance epsilon of every normalization.
        scale: attention scale; ``"auto"`` is ``C ** -0.5``, ``1.0`` the printed equation.
        feature_size: (H, W) of the input, to size ``weight`` at construction when ``patch`` is a
            fraction. Without it ``weight`` and ``bias`` are ``nn.UninitializedParameter``s until
            the first forward sizes them, as in torch's lazy modules: an optimizer built before
            that trains them, ``load_state_dict`` sizes them, ``torch.compile(fullgraph=True)``
            needs them sized first (one eager forward, or ``feature_size``).
        min_mass: patches with less background mass are ignored.
        backend: op backend (None picks; see :mod:`regharm_ext.backends`).

    Shapes: x (Tensor[B, C, H, W]), mask (Tensor[B, 1, H', W']) in [0, 1] -> (Tensor[B, C, H, W]).
    """

    def __init__(self, channels: int, patch: Size = 1 / 8, stride: Size = 1 / 32, eps: float = 1e-5,
                 scale: Union[str, float] = "auto", feature_size: Optional[Tuple[int, int]] = None,
                 min_mass: float = 0.5, backend: Optional[str] = None):
        super().__init__()
        if scale != "auto" and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise TypeError(f"scale must be 'auto' or a number, got {scale!r}")
        _check_channels(channels, "PTL")
        # refused here rather than at the first forward (the ops check them again there)
        _checks.number(eps, "eps")
        _checks.number(min_mass, "min_mass", why=" (an empty patch has no statistics)")
        if scale != "auto":
            _checks.number(scale, "scale", positive=False)
        self.channels = channels
        self.patch, self.stride = _as_pair(patch), _as_pair(stride)
        _check_sizes(self.patch, "patch")
        _check_sizes(self.stride, "stride")
        self.eps, self.min_mass, self.backend = eps, min_mass, backend
        preload(backend)  # torch.compile cannot import a backend while it traces
        self.scale = channels ** -0.5 if scale == "auto" else float(scale)
        fixed = all(isinstance(p, int) and not isinstance(p, bool) for p in self.patch)
        if fixed or feature_size is not None:
            hw = _as_pair(feature_size) if feature_size is not None else (0, 0)
            ph, pw = self.patch_size(*hw) if not fixed else self.patch
            self.weight = nn.Parameter(torch.empty(ph * pw))
            self.bias = nn.Parameter(torch.empty(1))
            self.reset_parameters()
        else:  # sized on the first forward; in parameters() (optimizers, .to()) from now on
            self.weight = nn.UninitializedParameter()
            self.bias = nn.UninitializedParameter()

    def extra_repr(self) -> str:
        return f"{self.channels}, patch={self.patch}, stride={self.stride}, backend={self.backend!r}"

    def patch_size(self, h: int, w: int) -> Tuple[int, int]:
        return (_resolve_size(self.patch[0], h, "patch"), _resolve_size(self.patch[1], w, "patch"))

    def stride_size(self, h: int, w: int) -> Tuple[int, int]:
        return (_resolve_size(self.stride[0], h, "stride"), _resolve_size(self.stride[1], w, "stride"))

    def reset_parameters(self) -> None:
        # like nn.Linear(ph*pw, 1): uniform weights would give content 0 (SPEC §2)
        if isinstance(self.weight, nn.UninitializedParameter):
            return  # done when the first forward sizes it
        bound = 1 / math.sqrt(self.weight.numel())
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def _params(self, ph: int, pw: int, x: torch.Tensor):
        if isinstance(self.weight, nn.UninitializedParameter):  # a fractional patch's first forward
            with torch.no_grad():  # the same Parameter objects: an optimizer built earlier keeps them
                self.weight.materialize((ph * pw,))
                self.bias.materialize((1,))
            self.reset_parameters()
        if self.weight.numel() != ph * pw:
            raise ValueError(
                f"PTL was built for {self.weight.numel()} positions per patch but this input "
                f"{tuple(x.shape)} gives patches of {(ph, pw)}; run it at its training resolution "
                f"or give integer patch/stride sizes"
            )
        return self.weight, self.bias

    # state_dict of a PTL that has not sized its weight yet, and loading into one, as torch's
    # lazy modules do: a sized weight loaded into an unsized PTL sizes it; unsized into unsized
    # leaves it unsized.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not isinstance(self.weight, nn.UninitializedParameter):
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, value in self._parameters.items():
            destination[prefix + name] = value
        for name, buf in self._buffers.items():
            if buf is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = buf if keep_vars else buf.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        unsized = []
        for name in ("weight", "bias"):
            key, param = prefix + name, self._parameters[name]
            if key in state_dict and isinstance(param, nn.UninitializedParameter):
                if isinstance(state_dict[key], nn.UninitializedParameter):
                    state_dict.pop(key)
                    unsized.append(key)
                else:
                    with torch.no_grad():
                        param.materialize(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        missing_keys[:] = [k for k in missing_keys if k not in unsized]

    def attention_inputs(self, x: torch.Tensor, mask: torch.Tensor):
        """The pieces of the forward pass; :meth:`contribution` reuses them."""
        return self._attention_inputs(x, *self._prepare(x, mask))

    def _prepare(self, x: torch.Tensor, mask: torch.Tensor):
        """m (the mask at x's size, in x's dtype), the patch and stride sizes, weight and bias."""
        B, C, H, W = x.shape
        m = resize_mask(mask, (H, W), B).to(x.dtype)
        ps, st = self.patch_size(H, W), self.stride_size(H, W)
        return (m, ps, st) + tuple(self._params(*ps, x))

    def _attention_inputs(self, x, m, ps, st, weight, bias):
        mu, sigma, content, mass = patch_stats(x, 1 - m, weight.to(x.dtype), bias.to(x.dtype), ps, st,
                                               self.eps, self.min_mass, backend=self.backend)
        c_f = masked_norm(x, m, self.eps, backend=self.backend)                  # (B, HW, C)
        valid, key_bias, query_mask, values = attention_keys(m, mu, sigma, mass, self.min_mass)
        c_f = inactive_content_zeroed(c_f, query_mask)
        return m, c_f, content, values, key_bias, query_mask, valid

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"PTL({self.channels}) expects x of shape (B, {self.channels}, H, W), got {tuple(x.shape)}")
        B, C, H, W = x.shape
        prepared = self._prepare(x, mask)
        m, ps, st, weight, bias = prepared
        steps = node_steps(self.backend, x, m, weight, bias)
        if steps is not None:  # one autograd node for the kernel backends (ptl_node.py)
            geometry = _checks.check_patch_stats(x, m, weight, bias, ps, st, self.eps, self.min_mass)
            # the unfused path checks the scale in masked_attention, which the node never calls
            scale = _checks.number(self.scale, "scale", positive=False)
            args = (geometry, float(self.eps), float(self.min_mass), scale)
            ops = node_ops(self.backend, x, m, weight, bias)
            if ops is not None:  # the same node in C++ (csrc/ptl_node.cpp)
                return FusedPTLNode.apply(x, weight, bias, m, ops, *args)
            return PTLNode.apply(x, weight, bias, m, steps, *args)
        m, c_f, content, values, key_bias, query_mask, valid = self._attention_inputs(x, *prepared)
        av = masked_attention(c_f, content, values, key_bias, query_mask, self.scale, backend=self.backend)
        m = blend_weight(m, valid)
        if m.requires_grad:  # a mask that learns: Blend treats m as data
            a, v = av.split(C, dim=-1)
            return torch.lerp(x, torch.addcmul(a, c_f, v).transpose(1, 2).reshape(B, C, H, W), m)
        return Blend.apply(x, av, c_f, m)  # (1 - m) x + m T_fb

    @torch.no_grad()
    def contribution(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fig. 5's contribution map (Tensor[B, H, W]): how much attention the whole foreground pays
        to each background pixel (the mean over the patches that cover it); each map sums to 1."""
        B, C, H, W = x.shape
        m, c_f, content, _, key_bias, query_mask, _ = self.attention_inputs(x, mask)
        # attention of each active query over the patches, summed over the foreground with
        # weights m; queries in chunks so that the L x K probabilities never exist at once
        per_patch = torch.zeros(B, content.shape[1], dtype=torch.float32, device=x.device)
        weights = (m.flatten(1) * query_mask).float()
        for start in range(0, c_f.shape[1], 4096):
            s = self.scale * c_f[:, start:start + 4096].float() @ content.float().transpose(1, 2)
            p = torch.softmax(s + key_bias.float()[:, None, :], -1).nan_to_num(0.0)
            per_patch += (p * weights[:, start:start + 4096, None]).sum(1)
        ps, st = self.patch_size(H, W), self.stride_size(H, W)
        kh, kw = (H - ps[0]) // st[0] + 1, (W - ps[1]) // st[1] + 1
        grid = per_patch.view(B, 1, kh, kw).float()
        # a pixel gets the mean share of the patches covering it: dividing by the coverage count
        # keeps borders (covered by fewer patches) from fading
        box = torch.ones(1, 1, *ps, device=x.device)
        spread = F.conv_transpose2d(grid, box, stride=st)
        cover = F.conv_transpose2d(torch.ones_like(grid[:1]), box, stride=st)
        spread = spread / cover.clamp_min(1)
        spread = F.pad(spread, (0, W - spread.shape[-1], 0, H - spread.shape[-2]))[:, 0]
        spread = spread * (1 - m[:, 0].float())
        return spread / spread.flatten(1).sum(1).clamp_min(1e-12).view(B, 1, 1)


class SelfAttention(nn.Module):
    """Plain self-attention over all positions, 1x1-conv projections, residual outside.

    Shapes: x (Tensor[B, C, H, W]) -> (Tensor[B, C, H, W]) (the attention term only).
    """

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        if isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads < 1:
            raise ValueError(f"heads must be an int >= 1, got {heads!r}")
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape

        def split(t):  # (B, C, H, W) -> (B, heads, HW, C/heads)
            # contiguous: SDPA's CPU flash path needs it; strided views fall back to the
            # math path, which holds the full HW x HW score matrix
            return t.view(B, self.heads, C // self.heads, H * W).transpose(2, 3).contiguous()

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(2, 3).reshape(B, C, H, W))


class LTL(nn.Module):
    """Locations-to-Location Translation (§3.2, SPEC §4).

    ``z = IN(x + SelfAttention(x))``; each foreground token attends to the background tokens
    (``key_bias = log(1 - m)``) and is fused with what it found: ``T_h = Linear(T ‖ T_r)``.

    Shapes: x (Tensor[B, C, H, W]), mask (Tensor[B, 1, H', W']) -> (Tensor[B, C, H, W]).
    """

    def __init__(self, channels: int, heads: int = 1, backend: Optional[str] = None):
        super().__init__()
        _check_channels(channels, "LTL")
        self.channels, self.backend = channels, backend
        preload(backend)
        self.attn = SelfAttention(channels, heads)
        self.fuse = nn.Linear(2 * channels, channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"LTL({self.channels}) expects x of shape (B, {self.channels}, H, W), got {tuple(x.shape)}")
        B, C, H, W = x.shape
        z = F.instance_norm(x + self.attn(x))
        t = z.flatten(2).transpose(1, 2)                                    # (B, HW, C)
        m = resize_mask(mask, (H, W), B)
        # the bias from the mask before any 16-bit rounding: bfloat16 rounds 0.999 to 1, which
        # would turn log(1 - m) = -6.9 into -inf (a key removed)
        mf = m.flatten(1).detach()
        key_bias = torch.log1p(-mf.float().clamp(0, 1))                      # -inf at pure foreground
        t_r = masked_attention(t, t, t, key_bias, mf > 0, backend=self.backend)
        t_h = self.fuse(torch.cat([t, t_r], -1)).transpose(1, 2).reshape(B, C, H, W)
        m = m.to(x.dtype)
        return (1 - m) * z + m * t_h
