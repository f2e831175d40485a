"""Argument checks shared by every backend, so that each op rejects bad input the same way.

Errors name the argument, the shape or dtype received and what was expected (the fix).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

IntPair = Union[int, Sequence[int]]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def no_gpu_reason() -> Optional[str]:
    """Why no backend can run CUDA tensors in this process (None when a GPU is usable)."""
    if torch.cuda.is_available():
        return None
    return "CUDA tensors need a GPU, and torch sees none (torch.cuda.is_available() is False)"


def _as_int(v) -> Optional[int]:
    """An int of any kind (numpy ints, 0-d integer tensors) as an int; None for anything else
    (bools included). No exception is used to decide: torch.compile traces this on every call."""
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point() \
            and not v.is_complex() and v.dtype != torch.bool:
        return int(v)
    return None


def pair(value: IntPair, name: str) -> Tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 2) -> (3, 2)``; anything else is a clear error."""
    one = _as_int(value)
    if one is not None:
        out = (one, one)
    else:
        # a tuple, a list, or e.g. a numpy array of two ints
        items = list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) else None
        ints = [_as_int(v) for v in items] if items is not None and len(items) == 2 else [None]
        if None in ints:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        out = (ints[0], ints[1])
    if out[0] < 1 or out[1] < 1:
        raise ValueError(f"{name} must be >= 1, got {out}")
    return out


def number(value, name: str, positive: bool = True, why: str = "") -> float:
    """A finite float (eps and min_mass also > 0; a scale may be any finite number)."""
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    # comparisons, not math.isfinite: torch.compile(dynamic=True) traces a float argument as a
    # symbol, which compares (a guard) but cannot go through math.isfinite; NaN fails both
    if not -math.inf < out < math.inf or (positive and not out > 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}{why}, "
                         f"got {value!r}")
    return out


def _float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}; convert it with {name}.float()"
        )


def _rank(t: torch.Tensor, name: str, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)} ({t.dim()} dims)")


def _same_device(named: Sequence[Tuple[str, Optional[torch.Tensor]]]) -> None:
    devices = {(n, t.device) for n, t in named if t is not None}
    if len({d for _, d in devices}) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in sorted(devices, key=str))
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_patch_stats(x, bg, weight, bias, patch_size, stride, eps, min_mass):
    """Validates the arguments of ``patch_stats``; returns ``(ph, pw), (sh, sw)``.

    ``bg``, ``weight`` and ``bias`` may come in any float dtype: every backend casts them to the
    precision it computes x in (a float64 mask with float32 features is common, and refusing it
    on one backend only made backends disagree)."""
    for t, n in ((x, "x"), (bg, "bg"), (weight, "weight"), (bias, "bias")):
        _float(t, n)
    _rank(x, "x", 4, "(B, C, H, W)")
    _rank(bg, "bg", 4, "(B, 1, H, W)")
    B, C, H, W = x.shape
    if C == 0:
        raise ValueError(f"x must have at least one channel, got x {tuple(x.shape)}")
    if bg.shape != (B, 1, H, W):
        raise ValueError(
            f"bg must have shape (B, 1, H, W) = {(B, 1, H, W)} to match x {tuple(x.shape)}, "
            f"got {tuple(bg.shape)}"
        )
    ph, pw = pair(patch_size, "patch_size")
    sh, sw = pair(stride, "stride")
    if H < ph or W < pw:
        raise ValueError(
            f"patch_size {(ph, pw)} is larger than the feature map {(H, W)} of x "
            f"{tuple(x.shape)}; use a patch of at most {(H, W)}"
        )
    if weight.shape != (ph * pw,):
        raise ValueError(f"weight must have shape (ph*pw,) = ({ph * pw},), got {tuple(weight.shape)}")
    if bias.shape != (1,):
        raise ValueError(f"bias must have shape (1,), got {tuple(bias.shape)}")
    number(eps, "eps")
    number(min_mass, "min_mass", why=" (an empty patch has no statistics)")
    _same_device([("x", x), ("bg", bg), ("weight", weight), ("bias", bias)])
    return (ph, pw), (sh, sw)


def check_masked_attention(q, k, v, key_bias, query_mask):
    """Validates the arguments of ``masked_attention``."""
    for t, n in ((q, "q"), (k, "k"), (v, "v"), (key_bias, "key_bias")):
        _float(t, n)
    _rank(q, "q", 3, "(B, L, D)")
    _rank(k, "k", 3, "(B, N, D)")
    _rank(v, "v", 3, "(B, N, E)")
    _rank(key_bias, "key_bias", 2, "(B, N)")
    B, L, D = q.shape
    if D == 0:  # the default scale D ** -0.5 would divide by zero
        raise ValueError(f"q must have at least one feature per token (D >= 1), got q {tuple(q.shape)}")
    if k.shape[0] != B or k.shape[2] != D:
        raise ValueError(f"k must have shape (B, N, D) with B={B}, D={D} from q {tuple(q.shape)}, got {tuple(k.shape)}")
    N = k.shape[1]
    if v.shape[:2] != (B, N):
        raise ValueError(f"v must have shape (B, N, E) with B={B}, N={N} from k, got {tuple(v.shape)}")
    if key_bias.shape != (B, N):
        raise ValueError(f"key_bias must have shape (B, N) = {(B, N)}, got {tuple(key_bias.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if query_mask is not None:
        if not isinstance(query_mask, torch.Tensor) or query_mask.dtype != torch.bool:
            got = query_mask.dtype if isinstance(query_mask, torch.Tensor) else type(query_mask).__name__
            raise TypeError(f"query_mask must be a bool tensor of shape (B, L) or None, got {got}")
        if query_mask.shape != (B, L):
            raise ValueError(f"query_mask must have shape (B, L) = {(B, L)}, got {tuple(query_mask.shape)}")
    _same_device([("q", q), ("k", k), ("v", v), ("key_bias", key_bias), ("query_mask", query_mask)])


def check_masked_norm(x, weight, eps):
    """Validates the arguments of ``masked_norm``."""
    for t, n in ((x, "x"), (weight, "weight")):
        _float(t, n)
    _rank(x, "x", 4, "(B, C, H, W)")
    B, C, H, W = x.shape
    if weight.shape != (B, 1, H, W):
        raise ValueError(f"weight must have shape (B, 1, H, W) = {(B, 1, H, W)} to match x "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    number(eps, "eps")
    _same_device([("x", x), ("weight", weight)])
