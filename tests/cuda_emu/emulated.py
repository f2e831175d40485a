"""The CUDA kernels of csrc/cuda, built for the CPU emulator (emu_runtime.h) and called like the
torch glue calls them (csrc/cuda/*_cuda.cpp): same conversions, same strides, same outputs.

Every tensor handed to a kernel sits between NaN guard zones (so an out-of-bounds read poisons
the result) and every output between sentinel zones that must be intact afterwards (an
out-of-bounds write is an error).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SOURCES = [*sorted((ROOT / "csrc/cuda").glob("*.cu")), HERE / "emu_exports.cpp"]
HEADERS = [HERE / "emu_runtime.h", *sorted((ROOT / "csrc/cuda").glob("*.h")),
           *sorted((ROOT / "csrc/cuda").glob("*.cuh"))]
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
FLAGS = ["-std=c++17", "-O1", "-g", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas",
         "-x", "c++", "-DREGHARM_CUDA_EMULATION", "-include", str(HERE / "emu_runtime.h"),
         f"-I{CUDA_INCLUDE}", f"-I{ROOT / 'csrc'}"]
# -Bsymbolic: the emulator's cuda* functions must win over the real libcudart that a CUDA build
# of torch has already loaded into the process (else the kernels' launches reach the driver)
LINK_FLAGS = ["-Wl,-Bsymbolic"]

DTYPE_TAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
GUARD = 64  # elements


def unavailable() -> Optional[str]:
    """None when the emulator can be built here, else why not."""
    if shutil.which("g++") is None:
        return "g++ not found"
    if not (CUDA_INCLUDE / "cuda_fp16.h").exists():
        return f"CUDA headers not found in {CUDA_INCLUDE} (set CUDA_HOME)"
    return None


def build() -> Path:
    """Compiles the emulator library once per source version (cached in the temp dir)."""
    digest = hashlib.sha256()
    for p in SOURCES + HEADERS:
        digest.update(p.read_bytes())
    digest.update(" ".join(FLAGS + LINK_FLAGS).encode())
    out_dir = Path(tempfile.gettempdir()) / f"regharm_cuda_emu_{digest.hexdigest()[:16]}"
    lib = out_dir / "emu.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    objs = [out_dir / (s.name + ".o") for s in SOURCES]

    def compile_one(src_obj):
        src, obj = src_obj
        proc = subprocess.run(["g++", *FLAGS, "-c", str(src), "-o", str(obj)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"emulator build failed for {src.name}:\n{proc.stderr[-6000:]}")

    with ThreadPoolExecutor(len(SOURCES)) as pool:
        list(pool.map(compile_one, zip(SOURCES, objs)))
    tmp = out_dir / f"emu.{os.getpid()}.so"
    subprocess.run(["g++", "-shared", *LINK_FLAGS, "-o", str(tmp), *map(str, objs)], check=True)
    tmp.replace(lib)
    return lib


def _guarded(t: torch.Tensor, fill=float("nan")) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of t (same strides pattern, dense) inside a buffer with GUARD elements of `fill`
    on both sides. Returns (view, buffer)."""
    buf = torch.full((t.numel() + 2 * GUARD,), fill, dtype=t.dtype)
    view = buf[GUARD:GUARD + t.numel()].view(t.shape)
    view.copy_(t)
    return view, buf


def _output(shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + 2 * GUARD,), 12345.0, dtype=dtype)
    return buf[GUARD:GUARD + n].view(shape), buf


def _check_guards(buf: torch.Tensor, name: str) -> None:
    for zone in (buf[:GUARD], buf[-GUARD:]):
        if not (zone == 12345.0).all():
            raise AssertionError(f"kernel wrote outside {name}")


def strided_copy(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t with a non-contiguous layout whose gaps hold NaN. kind: "pad" (rows padded),
    "channels_last" (4-d) / "transposed" (3-d, feature dim not dense)."""
    if kind == "pad":
        big = torch.full((*t.shape[:-1], t.shape[-1] + 3), float("nan"), dtype=t.dtype)
        big[..., : t.shape[-1]] = t
        return big[..., : t.shape[-1]]
    if kind == "channels_last" and t.dim() == 4:
        return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    if kind == "transposed" and t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(kind)


def _ptr(t: Optional[torch.Tensor]):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _i64(values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*[int(v) for v in values])


class Emulator:
    def __init__(self, lib: Path):
        self.lib = ctypes.CDLL(str(lib))
        self.lib.emu_take_errors.restype = ctypes.c_char_p
        self.lib.emu_take_launches.restype = ctypes.c_char_p
        self.lib.emu_patch_stats_backward_workspace.restype = ctypes.c_int64
        self.lib.emu_attention_backward_workspace.restype = ctypes.c_int64
        self.lib.emu_attention_forward_workspace.restype = ctypes.c_int64
        self.lib.emu_masked_norm_backward_workspace.restype = ctypes.c_int64
        self.lib.emu_take_tf32_mma_count.restype = ctypes.c_longlong
        self.lib.emu_take_mma_sync_count.restype = ctypes.c_longlong
        self.lib.emu_take_simt_product_count.restype = ctypes.c_longlong
        self.lib.emu_take_atomic_count.restype = ctypes.c_longlong
        self.lib.emu_take_vector_atomic_count.restype = ctypes.c_longlong
        self.lib.emu_take_flag_count.restype = ctypes.c_longlong
        self.lib.emu_take_async_copy_count.restype = ctypes.c_longlong
        self.lib.emu_take_async_copy4_count.restype = ctypes.c_longlong
        self.lib.emu_take_launch_overlaps.restype = ctypes.c_char_p
        self.tf32x3 = False
        self.tiles = False
        self.dq_atomic = None
        self.simt_lanes = "paired"
        self.fwd_split = None
        self.ps_gather = "auto"
        self.key_order = True
        self.pipeline = True

    def configure(self, smem_optin=227 * 1024, sm_count=4, order=0, seed=1, tf32x3=False,
                  tiles=False, cc_major=9, dq_atomic=None, simt_lanes="paired",
                  fwd_split=None, reverse_blocks=False, ps_gather="auto", key_order=True,
                  pipeline=True):
        """tf32x3: float32 attention products on (emulated) tensor cores, as the glue asks for
        with REGHARM_CUDA_FP32_MATH=tf32x3. tiles: attention on the shared-memory tile
        kernels instead of the register kernels (REGHARM_CUDA_ATTENTION=tiles); cc_major: the
        GPU generation the launchers see (the register kernels need 8 or more); dq_atomic: the
        register kernels' dK/dV kernel adds dQ up with atomics (REGHARM_CUDA_DQ=atomic), False
        gives dQ its own kernel (=kernel), None does what the glue does by default (atomic for
        float32 only); simt_lanes: the lane order of the float32 CUDA-core kernels, "paired"
        (the default) or "mma" (REGHARM_CUDA_SIMT_LANES=mma); fwd_split: the float32 register
        forward splits each query tile's keys over two blocks (None: what the glue does by
        default, float32 only; False: REGHARM_CUDA_FWD_SPLIT=off); reverse_blocks: every
        launch runs its blocks from the last one back (the emulator runs blocks one at a time);
        ps_gather: "pixels" gathers patch_stats' input gradient pixel by pixel even where the
        cells' shared sums apply (REGHARM_CUDA_PS_GATHER=pixels); key_order: the register
        kernels visit the kept keys first (False: REGHARM_CUDA_KEY_ORDER=raster); pipeline: the
        16-bit register kernels stream their tiles through two stages (False:
        REGHARM_CUDA_PIPELINE=off; float32 has one either way, as in the glue)."""
        if ps_gather not in ("auto", "pixels"):
            raise ValueError(f"ps_gather must be 'auto' or 'pixels', got {ps_gather!r}")
        if simt_lanes not in ("paired", "mma"):
            raise ValueError(f"simt_lanes must be 'paired' or 'mma', got {simt_lanes!r}")
        self.lib.emu_configure(smem_optin, sm_count, order, seed, cc_major, int(reverse_blocks))
        self.tf32x3 = tf32x3
        self.tiles = tiles
        self.dq_atomic = dq_atomic
        self.simt_lanes = simt_lanes
        self.fwd_split = fwd_split
        self.ps_gather = ps_gather
        self.key_order = key_order
        self.pipeline = pipeline
        self.take_shared_load_model()
        self.take_launches()
        self.take_flag_count()
        self.take_tf32_mma_count()
        self.take_mma_sync_count()
        self.take_simt_product_count()
        self.take_atomic_count()
        self.take_vector_atomic_count()
        self.take_async_copy_count()
        self.take_async_copy4_count()
        self.take_launch_overlaps()

    def take_shared_load_model(self) -> dict:
        """The float32 CUDA-core products' 16-byte shared-memory loads since the last call:
        warp instructions, how many had paired lanes, and their cycles in emu_runtime.h's model
        of the SM's shared memory (4 per load, 2 with paired lanes)."""
        out = (ctypes.c_longlong * 3)()
        self.lib.emu_take_shared_load_model(out)
        return {"loads": int(out[0]), "paired": int(out[1]), "cycles": int(out[2])}

    def take_launches(self) -> list[str]:
        """The kernels launched since the last call, as each launcher's REGHARM_LAUNCH names
        them (e.g. "cells_kern")."""
        return self.lib.emu_take_launches().decode().split()

    def take_flag_count(self) -> int:
        """Flags published with atomicExch (the forward's key splits) since the last call."""
        return int(self.lib.emu_take_flag_count())

    def take_atomic_count(self) -> int:
        """float32 atomic additions (the atomic dQ) since the last call."""
        return int(self.lib.emu_take_atomic_count())

    def take_vector_atomic_count(self) -> int:
        """Of the atomic additions, sm_90's float2 and float4 ones since the last call."""
        return int(self.lib.emu_take_vector_atomic_count())

    def take_async_copy_count(self) -> int:
        """16-byte cp.async copies (the attention kernels' tile loads) since the last call."""
        return int(self.lib.emu_take_async_copy_count())

    def take_async_copy4_count(self) -> int:
        """4-byte cp.async copies (the two-stage kernels' key bias, lse and Δ) since the last
        call."""
        return int(self.lib.emu_take_async_copy4_count())

    def take_launch_overlaps(self) -> dict[str, int]:
        """mma.sync products a warp ran while its lane 0 had cp.async copies in flight (the
        next tile loading during this one's products), by launch expression (e.g. "rk.dq"),
        since the last call."""
        rows = self.lib.emu_take_launch_overlaps().decode().split("\n")
        return {name: int(n) for name, n in (r.rsplit(" ", 1) for r in rows if r)}

    def take_tf32_mma_count(self) -> int:
        """Warp-level tf32 tensor-core products since the last call."""
        return int(self.lib.emu_take_tf32_mma_count())

    def take_mma_sync_count(self) -> int:
        """Warp-level mma.sync products (the register kernels) since the last call."""
        return int(self.lib.emu_take_mma_sync_count())

    def take_simt_product_count(self) -> int:
        """Warp-level float32 CUDA-core products of the register kernels since the last call."""
        return int(self.lib.emu_take_simt_product_count())

    def take_register_products(self) -> int:
        """Warp-level products of the register kernels (either policy) since the last call."""
        return self.take_mma_sync_count() + self.take_simt_product_count()

    def _attn_shape(self, B, L, N, D, E, dtype) -> ctypes.Array:
        dq_atomic = dtype == torch.float32 if self.dq_atomic is None else self.dq_atomic
        fwd_split = dtype == torch.float32 if self.fwd_split is None else self.fwd_split
        return _i64([B, L, N, D, E, int(self.tf32x3), int(self.tiles), int(dq_atomic),
                     int(self.simt_lanes == "mma"), int(fwd_split), int(self.key_order),
                     int(self.pipeline and dtype.itemsize == 2)])

    def _patch_shape(self, B, C, H, W, ph, pw, sh, sw) -> ctypes.Array:
        return _i64([B, C, H, W, ph, pw, sh, sw, int(self.ps_gather == "pixels")])

    def _done(self, rc: int, what: str) -> None:
        errors = self.lib.emu_take_errors().decode()
        if rc != 0 or errors:
            raise AssertionError(f"{what}: error code {rc}\n{errors}")

    # ---- patch_stats: like csrc/cuda/patch_stats_cuda.cpp -----------------------------------

    def patch_fits(self, dtype, shape8) -> tuple[bool, int]:
        need = ctypes.c_int64(0)
        ok = self.lib.emu_patch_stats_fits(DTYPE_TAG[dtype], self._patch_shape(*shape8),
                                           ctypes.byref(need))
        return bool(ok), need.value

    def patch_stats(self, x, bg, weight, bias, patch, stride, eps=1e-5, min_mass=0.5):
        B, C, H, W = x.shape
        (ph, pw), (sh, sw) = patch, stride
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = self._patch_shape(B, C, H, W, ph, pw, sh, sw)
        xg = _strided_guarded(x)
        bga = _strided_guarded(bg.to(acc))
        wa, _ = _guarded(weight.to(acc).contiguous())
        ba, _ = _guarded(bias.to(acc).contiguous())
        K = ((H - ph) // sh + 1) * ((W - pw) // sw + 1)
        outs = [_output((B, K, C), x.dtype) for _ in range(3)] + [_output((B, K), x.dtype)]
        rc = self.lib.emu_patch_stats_forward(
            DTYPE_TAG[x.dtype], _ptr(xg), _i64(xg.stride()), _ptr(bga),
            _i64([bga.stride(0), bga.stride(2), bga.stride(3)]), _ptr(wa), _ptr(ba), shape,
            ctypes.c_double(eps), ctypes.c_double(min_mass), *[_ptr(o) for o, _ in outs])
        self._done(rc, "patch_stats_forward")
        for (o, buf), name in zip(outs, ("mu", "sigma", "content", "mass")):
            _check_guards(buf, name)
        return tuple(o.clone() for o, _ in outs)

    def patch_stats_backward(self, grads, x, bg, weight, patch, stride, eps=1e-5, min_mass=0.5):
        B, C, H, W = x.shape
        (ph, pw), (sh, sw) = patch, stride
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = self._patch_shape(B, C, H, W, ph, pw, sh, sw)
        K = ((H - ph) // sh + 1) * ((W - pw) // sw + 1)
        gs = [_grad_rows(g, acc, K, C) for g in grads]
        xg = _strided_guarded(x)
        bga = _strided_guarded(bg.to(acc))
        wa, _ = _guarded(weight.to(acc).contiguous())
        workspace = _workspace(
            self.lib.emu_patch_stats_backward_workspace(DTYPE_TAG[x.dtype], shape))
        gx, gx_buf = _output((B, C, H, W), x.dtype)
        gw, gw_buf = _output((ph * pw,), acc)
        gb, gb_buf = _output((1,), acc)
        rc = self.lib.emu_patch_stats_backward(
            DTYPE_TAG[x.dtype], *[_ptr(g) for g, _ in gs], _i64([r for _, r in gs]), _ptr(xg),
            _i64(xg.stride()), _ptr(bga), _i64([bga.stride(0), bga.stride(2), bga.stride(3)]),
            _ptr(wa), shape, ctypes.c_double(eps), ctypes.c_double(min_mass), _ptr(workspace),
            _ptr(gx), _ptr(gw), _ptr(gb))
        self._done(rc, "patch_stats_backward")
        _check_guards(gx_buf, "grad_x")
        _check_guards(gw_buf, "grad_weight")
        _check_guards(gb_buf, "grad_bias")
        return gx.clone(), gw.to(weight.dtype), gb.to(grads[2].dtype)

    # ---- masked_attention: like csrc/cuda/masked_attention_cuda.cpp --------------------------

    def attention_fits(self, dtype, shape5) -> tuple[bool, int]:
        need = ctypes.c_int64(0)
        ok = self.lib.emu_attention_fits(DTYPE_TAG[dtype], self._attn_shape(*shape5, dtype),
                                         ctypes.byref(need))
        return bool(ok), need.value

    def attention(self, q, k, v, key_bias, query_mask, scale):
        B, L, D = q.shape
        N, E = k.shape[1], v.shape[2]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        shape = self._attn_shape(B, L, N, D, E, q.dtype)
        qd, kd, vd = (_strided_guarded(_dense_rows(t)) for t in (q, k, v))
        bias, _ = _guarded(key_bias.to(acc).contiguous())
        mask = query_mask.contiguous() if query_mask is not None else None
        out, out_buf = _output((B, L, E), q.dtype)
        lse, lse_buf = _output((B, L), torch.float32)
        strides = _i64([s for t in (qd, kd, vd) for s in t.stride()[:2]])
        workspace = _workspace(self.lib.emu_attention_forward_workspace(shape))
        rc = self.lib.emu_attention_forward(
            DTYPE_TAG[q.dtype], _ptr(qd), _ptr(kd), _ptr(vd), strides, _ptr(bias), _ptr(mask),
            shape, ctypes.c_double(scale), _ptr(out), _ptr(lse), _ptr(workspace))
        self._done(rc, "masked_attention_forward")
        _check_guards(out_buf, "out")
        _check_guards(lse_buf, "lse")
        return out.clone(), lse.clone()

    def attention_backward(self, grad_out, q, k, v, key_bias, query_mask, out, lse, scale):
        B, L, D = q.shape
        N, E = k.shape[1], v.shape[2]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        shape = self._attn_shape(B, L, N, D, E, q.dtype)
        tensors = [_strided_guarded(_dense_rows(t)) for t in (grad_out.to(q.dtype), q, k, v,
                                                              out.to(q.dtype))]
        bias, _ = _guarded(key_bias.to(acc).contiguous())
        mask = query_mask.contiguous() if query_mask is not None else None
        lse_g, _ = _guarded(lse.float().contiguous())
        workspace = _workspace(
            self.lib.emu_attention_backward_workspace(DTYPE_TAG[q.dtype], shape))
        grads = [_output(s, q.dtype) for s in ((B, L, D), (B, N, D), (B, N, E))]
        strides = _i64([s for t in tensors for s in t.stride()[:2]])
        rc = self.lib.emu_attention_backward(
            DTYPE_TAG[q.dtype], *[_ptr(t) for t in tensors], strides, _ptr(bias), _ptr(mask),
            _ptr(lse_g), shape, ctypes.c_double(scale), _ptr(workspace),
            *[_ptr(g) for g, _ in grads])
        self._done(rc, "masked_attention_backward")
        for (g, buf), name in zip(grads, ("dq", "dk", "dv")):
            _check_guards(buf, name)
        return tuple(g.clone() for g, _ in grads)


    # ---- masked_norm: like csrc/cuda/masked_norm_cuda.cpp ------------------------------------

    def masked_norm(self, x, weight, eps=1e-5):
        """y (B, HW, C), mu, rstd (B, C)."""
        B, C, H, W = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = _i64([B, C, H * W])
        xg, _ = _guarded(x.contiguous())
        wa, _ = _guarded(weight.to(acc).contiguous())
        outs = [_output((B, H * W, C), x.dtype), _output((B, C), acc), _output((B, C), acc)]
        rc = self.lib.emu_masked_norm_forward(DTYPE_TAG[x.dtype], _ptr(xg), _ptr(wa), shape,
                                              ctypes.c_double(eps), *[_ptr(o) for o, _ in outs])
        self._done(rc, "masked_norm_forward")
        for (_, buf), name in zip(outs, ("y", "mu", "rstd")):
            _check_guards(buf, name)
        return tuple(o.clone() for o, _ in outs)

    def masked_norm_backward(self, grad, x, weight, mu, rstd):
        B, C, H, W = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = _i64([B, C, H * W])
        ins = [_guarded(t.contiguous())[0] for t in
               (grad.to(x.dtype), x, weight.to(acc), mu.to(acc), rstd.to(acc))]
        workspace = _workspace(self.lib.emu_masked_norm_backward_workspace(DTYPE_TAG[x.dtype], shape))
        dx, dx_buf = _output((B, C, H, W), x.dtype)
        rc = self.lib.emu_masked_norm_backward(DTYPE_TAG[x.dtype], *[_ptr(t) for t in ins], shape,
                                               _ptr(workspace), _ptr(dx))
        self._done(rc, "masked_norm_backward")
        _check_guards(dx_buf, "dx")
        return dx.clone()

    # ---- PTL's blend: like the CUDA branch of csrc/ptl_node.cpp ------------------------------

    def attention_order(self, mask):
        """(order (B, L) int32, count (B,) int32) of attn_order_kernel for a (B, L) bool mask."""
        B, L = mask.shape
        mg, _ = _guarded(mask.contiguous(), fill=True)
        order, order_buf = _output((B, L), torch.int32)
        count, count_buf = _output((B,), torch.int32)
        rc = self.lib.emu_attention_order(_ptr(mg), ctypes.c_int64(B), ctypes.c_int64(L),
                                          _ptr(order), _ptr(count))
        self._done(rc, "attention_order")
        _check_guards(order_buf, "order")
        _check_guards(count_buf, "count")
        return order.clone(), count.clone()

    def ptl_mask(self, m):
        """bg = 1 - m and active = m > 0 of the mask m (B, 1, H, W)."""
        mg, _ = _guarded(m.contiguous())
        bg, bg_buf = _output(m.shape, m.dtype)
        active = torch.zeros(m.numel() + 2 * GUARD, dtype=torch.bool)
        rc = self.lib.emu_ptl_mask(DTYPE_TAG[m.dtype], _ptr(mg), ctypes.c_int64(m.numel()),
                                   _ptr(bg), ctypes.c_void_p(active.data_ptr() + GUARD))
        self._done(rc, "ptl_mask")
        _check_guards(bg_buf, "bg")
        assert not active[:GUARD].any() and not active[-GUARD:].any(), "kernel wrote outside active"
        return bg.clone(), active[GUARD:-GUARD].view(m.shape[0], -1).clone()

    def ptl_keys(self, mass, mu, sigma, m, min_mass):
        """key_bias (B, K) float32, values (B, K, 2C), blend weight (B, 1, H, W)."""
        B, K, C = mu.shape
        H, W = m.shape[-2:]
        ins = [_guarded(t.contiguous())[0] for t in (mass, mu, sigma, m)]
        outs = [_output((B, K), torch.float32), _output((B, K, 2 * C), mu.dtype),
                _output((B, 1, H, W), m.dtype)]
        rc = self.lib.emu_ptl_keys(DTYPE_TAG[mu.dtype], *[_ptr(t) for t in ins],
                                   _i64([B, C, H, W, K]), ctypes.c_double(min_mass),
                                   *[_ptr(o) for o, _ in outs])
        self._done(rc, "ptl_keys")
        for (_, buf), name in zip(outs, ("key_bias", "values", "weight")):
            _check_guards(buf, name)
        return tuple(o.clone() for o, _ in outs)

    def ptl_blend_forward(self, x, av, c_f, weight):
        """out (B, C, H, W) = lerp(x, A + C_f·V, weight); av (B, HW, 2C), weight (B, HW)."""
        B, C, H, W = x.shape
        ins = [_guarded(t.contiguous())[0] for t in (x, av, c_f, weight)]
        out, buf = _output((B, C, H, W), x.dtype)
        rc = self.lib.emu_ptl_blend_forward(DTYPE_TAG[x.dtype], *[_ptr(t) for t in ins],
                                            _i64([B, C, H, W]), _ptr(out))
        self._done(rc, "ptl_blend_forward")
        _check_guards(buf, "out")
        return out.clone()

    def ptl_blend_backward(self, grad, weight, c_f):
        """gav (B, HW, 2C) = [g·w | g·w·C_f]; grad (B, C, H, W) read through its strides."""
        B, C, H, W = grad.shape
        g = _strided_guarded(grad)
        w, cf = (_guarded(t.contiguous())[0] for t in (weight, c_f))
        gav, buf = _output((B, H * W, 2 * C), grad.dtype)
        rc = self.lib.emu_ptl_blend_backward(DTYPE_TAG[grad.dtype], _ptr(g), _i64(g.stride()),
                                             _ptr(w), _ptr(cf), _i64([B, C, H, W]), _ptr(gav))
        self._done(rc, "ptl_blend_backward")
        _check_guards(buf, "gav")
        return gav.clone()

    def ptl_grad_x(self, gx, gxp, grad, weight):
        """(gx + gxp) + grad·(1 - weight), written over a copy of gx."""
        B, C, H, W = gx.shape
        out, buf = _output((B, C, H, W), gx.dtype)
        out.copy_(gx)
        g = _strided_guarded(grad)
        gp, w = (_guarded(t.contiguous())[0] for t in (gxp, weight))
        rc = self.lib.emu_ptl_grad_x(DTYPE_TAG[gx.dtype], _ptr(out), _ptr(gp), _ptr(g),
                                     _i64(g.stride()), _ptr(w), _i64([B, C, H, W]))
        self._done(rc, "ptl_grad_x")
        _check_guards(buf, "gx")
        return out.clone()


def _workspace(nbytes: int) -> torch.Tensor:
    """Scratch of nbytes, filled with NaN bytes (a read before a write shows)."""
    return torch.full((nbytes // 8 + 1,), float("nan"), dtype=torch.float64)


def _grad_rows(g: torch.Tensor, acc: torch.dtype, K: int, C: int):
    """(tensor, row stride) as csrc/cuda/patch_stats_cuda.cpp's grad_rows hands a (B, K, C)
    gradient to the kernels: kept in place (gaps NaN) where its rows are evenly spaced."""
    if (g.dtype == acc and (C == 1 or g.stride(2) == 1) and g.stride(1) >= C
            and g.stride(0) == K * g.stride(1)):
        return _strided_guarded(g), g.stride(1)
    return _guarded(g.to(acc).contiguous())[0], C


def _dense_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _strided_guarded(t: torch.Tensor) -> torch.Tensor:
    """t keeping its strides (gaps stay NaN), inside NaN guard zones. An expanded tensor (zero
    strides, as out.sum()'s gradient) keeps its storage: its span is copied as it is."""
    if t.is_contiguous():
        return _guarded(t)[0]
    # the smallest storage span that holds t's layout, NaN wherever t has no element
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    buf = torch.full((span + 2 * GUARD,), float("nan"), dtype=t.dtype)
    view = buf.as_strided(t.shape, t.stride(), GUARD)
    if 0 in t.stride():  # elements share storage: copy_ would write one place twice
        buf[GUARD:GUARD + span] = t.as_strided((span,), (1,))
    else:
        view.copy_(t)
    return view
