"""Triton ``masked_attention`` (SPEC §3): flash-attention forward, FA2 backward, one file.

Layout of the work:

- Active queries are compacted first (``_compact``: their indices, active first, and a count per
  image), so a query tile holds only active queries and the tiles past the count do nothing. This
  is the "skip query tiles with no active query" of SPEC §3 in its strongest form: with a 20 %
  foreground blob no tile is wasted on half-inactive rows.
- The keys are compacted the same way (kept ones first, ``key_bias`` not -inf) where there is
  more than one key tile, in the same launch: removed keys (PTL's patches mostly in the
  foreground, LTL's foreground tokens) are spread over every raster tile, so skipping tiles whose
  keys are all removed, which the loops still do, skipped little on its own.
  ``REGHARM_TRITON_KEY_ORDER=raster`` keeps the keys in their own order.
- The forward keeps an online softmax (running max ``m``, sum ``l``) and never materializes the
  ``L x N`` scores; it saves the log-sum-exp ``lse`` (float32, -inf for inactive queries and for
  rows whose keys are all removed).
- The backward recomputes ``P = exp(scale·qk + bias - lse)`` tile by tile: a preprocess kernel
  for ``Δ = rowsum(dO ∘ O)``, a kernel over key tiles for ``dK, dV`` (looping over the active
  queries only) and one over query tiles for ``dQ``: each output has a single writer, no atomics.

Accumulation is float32 (float64 for float64 inputs, where products are broadcast-and-sum instead
of ``tl.dot``: fp64 ``tl.dot`` is not supported on every GPU target); float32 products use
``tf32x3`` (see ``_flags``). ``D`` and ``E`` are padded to powers of two (at least 16, the
smallest ``tl.dot`` tile) and masked.

Registered as ``torch.ops.regharm_triton.masked_attention`` (returns ``out, lse``) and
``masked_attention_backward`` with ``torch.library.triton_op`` so that ``torch.compile`` sees the
kernels, and autograd through ``register_autograd``.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._eager import Direct, eager_grad, register_autograd
from ._triton_util import (BF16_DOT_PROBLEM, acc_dtype, cdiv, check_batch, interpreting, join_f32, launcher,
                           next_pow2, split_f32, traced_op)

# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """a (M, K) @ b (K, N) -> (M, N) in the accumulation dtype."""
    if USE_DOT:
        return tl.dot(a, b, input_precision=PREC)
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _rows(IDX, CNT, b, start, L, LN, HAS_MASK: tl.constexpr, BM: tl.constexpr):
    """Query rows at compacted positions [start, start + BM): their indices, which of them are
    active, the active count, and which exist (< L; the inactive ones get zeros written, so the
    outputs need no fill beforehand). IDX: (B, LN) with the query order in its first L columns;
    CNT: (B, 2), the active count first."""
    offs = start + tl.arange(0, BM)
    exists = offs < L
    if HAS_MASK:
        count = tl.load(CNT + 2 * b)
        ok = offs < count
        rows = tl.load(IDX + b * LN + offs, mask=exists, other=0)
    else:
        count = L
        ok = exists
        rows = offs
    return rows, ok, count, exists


@triton.jit
def _keys(IDX, CNT, b, start, L, N, LN, KEY_ORDER: tl.constexpr, BN: tl.constexpr):
    """Keys at positions [start, start + BN) of the key order (IDX's last N columns, the kept
    count second in CNT), or of the keys themselves: their indices, which may be kept (a kept
    position; removed keys past it), which exist (< N), and the positions that may hold a kept
    key."""
    offs = start + tl.arange(0, BN)
    exists = offs < N
    if KEY_ORDER:
        span = tl.load(CNT + 2 * b + 1)
        cols = tl.load(IDX + b * LN + L + offs, mask=exists, other=0)
    else:
        span = N
        cols = offs
    return cols, offs < span, span, exists


@triton.jit
def _abt(A, ra, oka, Bm, rb, okb, E, acc, USE_DOT: tl.constexpr, PREC: tl.constexpr,
         BE: tl.constexpr, EC: tl.constexpr):
    """acc + A[ra, :E] @ B[rb, :E]ᵀ (A, B row-major with rows of E), reduced over E in chunks of
    EC loaded from memory: for wide values (E = 512) register-resident operands spill."""
    for e0 in tl.static_range(0, BE, EC):
        offs = e0 + tl.arange(0, EC)
        a = tl.load(A + ra[:, None] * E + offs[None, :],
                    mask=oka[:, None] & (offs[None, :] < E), other=0.0)
        bt = tl.load(Bm + rb[None, :] * E + offs[:, None],
                     mask=okb[None, :] & (offs[:, None] < E), other=0.0)
        acc += _mm(a, bt, USE_DOT, PREC).to(acc.dtype)
    return acc


@triton.jit
def _attn_fwd(Q, K, V, KB, IDX, CNT, O, LSE, L, N, LN, D, E, scale, scale_lo,
              HAS_MASK: tl.constexpr, KEY_ORDER: tl.constexpr, USE_DOT: tl.constexpr,
              PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
              BE: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_t = LSE.dtype.element_ty
    scale = join_f32(scale, scale_lo, acc_t)
    rows, row_ok, count, exists = _rows(IDX, CNT, b, pid_m * BM, L, LN, HAS_MASK, BM)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    q = tl.load(Q + b * L * D + rows[:, None] * D + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full((BM,), float("-inf"), acc_t)
    l_i = tl.zeros((BM,), acc_t)
    acc = tl.zeros((BM, BE), acc_t)
    span = _keys(IDX, CNT, b, 0, L, N, LN, KEY_ORDER, BN)[2]
    hi = tl.where(pid_m * BM < count, span, 0)  # a tile past the active count has no work
    for start in range(0, hi, BN):
        cols, col_ok = _keys(IDX, CNT, b, start, L, N, LN, KEY_ORDER, BN)[:2]
        kb = tl.load(KB + b * N + cols, mask=col_ok, other=float("-inf")).to(acc_t)
        if tl.max(kb, 0) > float("-inf"):  # skip tiles whose keys are all removed
            kt = tl.load(K + b * N * D + cols[None, :] * D + offs_d[:, None],
                         mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            s = _mm(q, kt, USE_DOT, PREC).to(acc_t) * scale + kb[None, :]
            # some key of the tile is live, so the row max is finite and exp never sees inf - inf
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * N * E + cols[:, None] * E + offs_e[None, :],
                        mask=col_ok[:, None] & (offs_e[None, :] < E), other=0.0)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, USE_DOT, PREC).to(acc_t)
            m_i = m_new
    live = (l_i > 0) & row_ok  # an inactive row of an active tile attended with q = 0: drop it
    l_safe = tl.where(live, l_i, 1.0)
    out = tl.where(live[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(live, m_i + tl.log(l_safe), float("-inf"))
    tl.store(O + b * L * E + rows[:, None] * E + offs_e[None, :], out.to(O.dtype.element_ty),
             mask=exists[:, None] & (offs_e[None, :] < E))  # inactive rows: 0 and -inf
    tl.store(LSE + b * L + rows, lse, mask=exists)


@triton.jit
def _order(SRC, n, IDX, CNT, BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """The positions of n flags in compacted order (those that are on first, each group in
    raster order) by two sweeps, the first counting, the second placing each one by a running
    prefix sum. Flags: a bool mask, or with BIAS a key bias that is on unless -inf (a NaN bias
    is a kept key, as in the kernels' tile skipping)."""
    total = tl.sum(tl.zeros((BLOCK,), tl.int32), 0)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += tl.sum(_flag(SRC, offs, n, BIAS), 0)
    before = total * 0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = _flag(SRC, offs, n, BIAS)
        act = before + tl.cumsum(m, 0) - m                    # flags on before each one
        dest = tl.where(m != 0, act, total + offs - act)      # off: after all that are on
        tl.store(IDX + dest, offs.to(tl.int32), mask=offs < n)
        before += tl.sum(m, 0)
    tl.store(CNT, total)


@triton.jit
def _flag(SRC, offs, n, BIAS: tl.constexpr):
    if BIAS:
        kb = tl.load(SRC + offs, mask=offs < n, other=float("-inf"))
        return (kb != float("-inf")).to(tl.int32)
    else:
        return tl.load(SRC + offs, mask=offs < n, other=0).to(tl.int32)


@triton.jit
def _compact_kernel(QM, KB, IDX, CNT, L, N, LN, QUERIES: tl.constexpr, KEYS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Program (b, 0): image b's queries (QUERIES), into IDX[b, :L] and CNT[b, 0]; program
    (b, 1), or (b, 0) without QUERIES: its keys (KEYS), into IDX[b, L:] and CNT[b, 1]."""
    b = tl.program_id(0).to(tl.int64)
    job = tl.program_id(1)
    if QUERIES:
        if job == 0:
            _order(QM + b * L, L, IDX + b * LN, CNT + 2 * b, False, BLOCK)
    if KEYS:
        if job == QUERIES:
            _order(KB + b * N, N, IDX + b * LN + L, CNT + 2 * b + 1, True, BLOCK)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, L, E, BM: tl.constexpr, BE: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_t = DELTA.dtype.element_ty
    rows = pid_m * BM + tl.arange(0, BM)
    offs_e = tl.arange(0, BE)
    mask = (rows[:, None] < L) & (offs_e[None, :] < E)
    off = b * L * E + rows[:, None] * E + offs_e[None, :]
    o = tl.load(O + off, mask=mask, other=0.0).to(acc_t)
    do = tl.load(DO + off, mask=mask, other=0.0).to(acc_t)
    tl.store(DELTA + b * L + rows, tl.sum(o * do, 1), mask=rows < L)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, KB, IDX, CNT, DO, LSE, DELTA, DK, DV, L, N, LN, D, E, scale,
                   scale_lo, HAS_MASK: tl.constexpr, KEY_ORDER: tl.constexpr,
                   USE_DOT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BD: tl.constexpr, BE: tl.constexpr, EC: tl.constexpr):
    """dK, dV of the keys at positions [pid_n BN, ...) of the key order: those past the kept
    count are removed keys, written as zeros (every key row is written)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_t = DELTA.dtype.element_ty
    scale = join_f32(scale, scale_lo, acc_t)
    # (named, not _: the loop below assigns _ a value of another type, which Triton refuses)
    cols, col_ok, key_span, col_exists = _keys(IDX, CNT, b, pid_n * BN, L, N, LN, KEY_ORDER, BN)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    kb = tl.load(KB + b * N + cols, mask=col_ok, other=float("-inf")).to(acc_t)
    kd_mask = col_ok[:, None] & (offs_d[None, :] < D)
    ve_mask = col_ok[:, None] & (offs_e[None, :] < E)
    k = tl.load(K + b * N * D + cols[:, None] * D + offs_d[None, :], mask=kd_mask, other=0.0)
    if BE <= EC:  # narrow values stay in registers; wide ones are streamed by _abt
        v = tl.load(V + b * N * E + cols[:, None] * E + offs_e[None, :], mask=ve_mask, other=0.0)
    dk = tl.zeros((BN, BD), acc_t)
    dv = tl.zeros((BN, BE), acc_t)
    if HAS_MASK:
        count = tl.load(CNT + 2 * b)
    else:
        count = L
    hi = tl.where(tl.max(kb, 0) > float("-inf"), count, 0)  # all keys removed: dK = dV = 0
    for start in range(0, hi, BM):
        rows, row_ok, _, _ = _rows(IDX, CNT, b, start, L, LN, HAS_MASK, BM)
        # everything below is (keys, queries): q (and narrow dO) are loaded transposed
        qt = tl.load(Q + b * L * D + rows[None, :] * D + offs_d[:, None],
                     mask=row_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        lse = tl.load(LSE + b * L + rows, mask=row_ok, other=float("inf"))
        # a dead row (lse = -inf) must give P = 0: +inf makes exp(s - lse) = 0 for every s
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(DELTA + b * L + rows, mask=row_ok, other=0.0)
        st = _mm(k, qt, USE_DOT, PREC).to(acc_t) * scale + kb[:, None]   # (BN, BM)
        pt = tl.exp(st - lse[None, :])
        if BE <= EC:
            dot_ = tl.load(DO + b * L * E + rows[None, :] * E + offs_e[:, None],
                           mask=row_ok[None, :] & (offs_e[:, None] < E), other=0.0)
            dv += _mm(pt.to(dot_.dtype), tl.trans(dot_), USE_DOT, PREC).to(acc_t)
            dpt = _mm(v, dot_, USE_DOT, PREC).to(acc_t)                    # (BN, BM)
        else:
            do = tl.load(DO + b * L * E + rows[:, None] * E + offs_e[None, :],
                         mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
            dv += _mm(pt.to(do.dtype), do, USE_DOT, PREC).to(acc_t)
            dpt = _abt(V + b * N * E, cols, col_ok, DO + b * L * E, rows, row_ok, E,
                       tl.zeros((BN, BM), acc_t), USE_DOT, PREC, BE, EC)
        dst = pt * (dpt - delta[None, :])
        dk += _mm(dst.to(qt.dtype), tl.trans(qt), USE_DOT, PREC).to(acc_t)
    tl.store(DK + b * N * D + cols[:, None] * D + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty),
             mask=col_exists[:, None] & (offs_d[None, :] < D))
    tl.store(DV + b * N * E + cols[:, None] * E + offs_e[None, :], dv.to(DV.dtype.element_ty),
             mask=col_exists[:, None] & (offs_e[None, :] < E))


@triton.jit
def _attn_bwd_dq(Q, K, V, KB, IDX, CNT, DO, LSE, DELTA, DQ, L, N, LN, D, E, scale, scale_lo,
                 HAS_MASK: tl.constexpr, KEY_ORDER: tl.constexpr, USE_DOT: tl.constexpr,
                 PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                 BE: tl.constexpr, EC: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_t = DELTA.dtype.element_ty
    scale = join_f32(scale, scale_lo, acc_t)
    rows, row_ok, count, exists = _rows(IDX, CNT, b, pid_m * BM, L, LN, HAS_MASK, BM)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    qd_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * L * D + rows[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
    if BE <= EC:
        do = tl.load(DO + b * L * E + rows[:, None] * E + offs_e[None, :],
                     mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    lse = tl.load(LSE + b * L + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + b * L + rows, mask=row_ok, other=0.0)
    dq = tl.zeros((BM, BD), acc_t)
    span = _keys(IDX, CNT, b, 0, L, N, LN, KEY_ORDER, BN)[2]
    hi = tl.where(pid_m * BM < count, span, 0)
    for start in range(0, hi, BN):
        cols, col_ok = _keys(IDX, CNT, b, start, L, N, LN, KEY_ORDER, BN)[:2]
        kb = tl.load(KB + b * N + cols, mask=col_ok, other=float("-inf")).to(acc_t)
        if tl.max(kb, 0) > float("-inf"):
            kt = tl.load(K + b * N * D + cols[None, :] * D + offs_d[:, None],
                         mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            s = _mm(q, kt, USE_DOT, PREC).to(acc_t) * scale + kb[None, :]
            p = tl.exp(s - lse[:, None])
            if BE <= EC:
                vt = tl.load(V + b * N * E + cols[None, :] * E + offs_e[:, None],
                             mask=col_ok[None, :] & (offs_e[:, None] < E), other=0.0)
                dp = _mm(do, vt, USE_DOT, PREC).to(acc_t)
            else:
                dp = _abt(DO + b * L * E, rows, row_ok, V + b * N * E, cols, col_ok, E,
                          tl.zeros((BM, BN), acc_t), USE_DOT, PREC, BE, EC)
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(kt.dtype), tl.trans(kt), USE_DOT, PREC).to(acc_t)
    tl.store(DQ + b * L * D + rows[:, None] * D + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty),
             mask=exists[:, None] & (offs_d[None, :] < D))  # inactive rows: 0


# ---------------------------------------------------------------------------------- launcher


def _pow2(n: int) -> int:
    return max(16, next_pow2(n))


def _fit(budget: int, per_row: int, hi: int = 64) -> int:
    """Largest tile height in (hi, ..., 16) with ``height * per_row <= budget``."""
    t = hi
    while t > 16 and t * per_row > budget:
        t //= 2
    return t


def _blocks(BD: int, BE: int, dtype: torch.dtype):
    """(query tile BM, key tile BN, num_warps) per kernel. ``fwd`` and ``dq`` keep a query
    tile's accumulators in registers and stream key tiles; ``dkdv`` keeps a key tile and streams
    query tiles. Budgets: accumulator values per program (halved for float32, whose dot operands
    are split in two for tf32x3) and ~48 KB per streamed tile. Chosen so that the sm_90 builds
    spill nothing (16-bit) or little (float32) at D=64, E=128 (benchmarks/triton_aot_check.py)."""
    if dtype == torch.float64:
        return dict(fwd=(16, 16, 4), dq=(16, 16, 4), dkdv=(16, 16, 4))
    if interpreting():  # numpy: bigger tiles are just fewer Python-level iterations
        return dict(fwd=(64, 64, 4), dq=(64, 64, 4), dkdv=(64, 64, 4))
    wide, elt = BD + BE, torch.finfo(dtype).bits // 8
    fp32 = dtype == torch.float32
    acc, warps = (6144, 8) if fp32 else (12288, 4)
    stream = _fit(48 * 1024, wide * elt)
    return dict(fwd=(_fit(acc, wide), stream, warps),
                dq=(_fit(acc, 2 * BD + BE), _fit(24 * 1024, wide * elt) if fp32 else stream, 4),
                dkdv=(stream, _fit(6144, wide), warps))


def _dkdv_stages(BD: int, BE: int, dtype: torch.dtype) -> int:
    """Software-pipeline stages of the dK/dV kernel: float32 tiles with BD + BE = 1024 need
    233,600 B of shared memory at two stages on sm_90 (an H100/H200 has 232,448 B per block) and
    167,936 B at one (Triton 3.6's compiler, benchmarks/triton_aot_check.py)."""
    return 1 if dtype == torch.float32 and BD + BE >= 1024 else 2


def _orders(query_mask: Optional[torch.Tensor], key_bias: torch.Tensor, keys: bool, L: int,
            block: Optional[int] = None):
    """The query order (active queries first, in order, then the inactive ones; with a mask)
    and the key order (kept keys first; with ``keys``) in one launch, no sync (the query order
    was ~8 small torch ops, and the op's fwd+bwd is host-bound on a GPU): idx (Tensor[B, L] int32,
    or with ``keys`` Tensor[B, L + N], the key order in the last N columns) and cnt
    (Tensor[B, 2] int32: active queries, kept keys). Empty tensors when neither is asked.
    ``block``: elements per step (tests)."""
    B, N = key_bias.shape
    dev = key_bias.device
    if query_mask is None and not keys:
        return key_bias.new_empty(0, dtype=torch.int32), key_bias.new_empty(0, dtype=torch.int32)
    idx = torch.empty(B, L + (N if keys else 0), device=dev, dtype=torch.int32)
    cnt = torch.empty(B, 2, device=dev, dtype=torch.int32)
    if not B:
        return idx, cnt
    queries = query_mask is not None
    block = block or min(4096 if interpreting() else 1024, _pow2(max(L, N)))
    qm = query_mask.contiguous() if queries else key_bias
    launcher(_compact_kernel)[(B, int(queries) + int(keys))](
        qm, key_bias, idx, cnt, L, N, idx.shape[1], QUERIES=queries, KEYS=keys, BLOCK=block,
        num_warps=4)
    return idx, cnt


def _compact(query_mask: torch.Tensor, block: Optional[int] = None):
    """The query order alone: (Tensor[B, L] int32, active count Tensor[B] int32)."""
    B, L = query_mask.shape
    if not (B and L):
        return (torch.empty(B, L, device=query_mask.device, dtype=torch.int32),
                torch.zeros(B, device=query_mask.device, dtype=torch.int32))
    idx, cnt = _orders(query_mask, query_mask.new_zeros(B, 0, dtype=torch.float32), False, L,
                       block)
    return idx, cnt[:, 0]


def _key_order(N: int, BN: int) -> bool:
    """Whether the kernels visit the keys in compacted order: more than one key tile, unless
    ``REGHARM_TRITON_KEY_ORDER=raster`` (read at each call: the benchmarks time both ways in one
    process)."""
    mode = os.environ.get("REGHARM_TRITON_KEY_ORDER", "auto") or "auto"
    if mode not in ("auto", "raster"):
        raise ValueError(f"REGHARM_TRITON_KEY_ORDER must be 'auto' (kept keys first) or 'raster' "
                         f"(the keys in their own order), got {mode!r}")
    return mode == "auto" and N > BN


def _ld(idx: torch.Tensor, L: int) -> int:
    """The row length of :func:`_orders`' idx: L, or L + N with the key order."""
    return idx.shape[1] if idx.dim() == 2 else L


def _flags(q, query_mask, idx) -> dict:
    """Kernel switches: the query mask, the key order (``idx`` holds it past the queries'
    columns), float64 products without tl.dot, and the float32 dot:
    ``tf32x3`` (three TF32 products: float32 accuracy on tensor cores; Triton's ``ieee`` float32
    dot runs on FMA units and spills kilobytes of registers at these tiles), or plain ``tf32``
    where PyTorch's own matmuls would use it (``torch.backends.cuda.matmul.allow_tf32``)."""
    fp64 = q.dtype == torch.float64
    tf32 = q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return dict(HAS_MASK=query_mask is not None, KEY_ORDER=_ld(idx, q.shape[1]) > q.shape[1],
                USE_DOT=not fp64,
                PREC="tf32" if tf32 else ("tf32x3" if q.dtype == torch.float32 else "ieee"))


def _dense(q, k, v, key_bias):
    return tuple(t.contiguous() for t in (q, k, v, key_bias))


@traced_op("regharm_triton::masked_attention")
def masked_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         key_bias: torch.Tensor, query_mask: Optional[torch.Tensor],
                         scale: float
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (Tensor[B, L, E], q's dtype), lse (Tensor[B, L], float32 or float64) and the query
    and key orders (idx (Tensor[B, L + N]), cnt (Tensor[B, 2]), int32; empty where neither
    applies: :func:`_orders`), which the backward reuses instead of building them again (the
    op's fwd+bwd is host-bound on a GPU)."""
    if q.dtype == torch.bfloat16 and BF16_DOT_PROBLEM is not None:
        from ..backends import BackendUnavailable
        raise BackendUnavailable(f"backend 'triton': {BF16_DOT_PROBLEM}")
    _refuse_too_wide(q, v, backward=False)
    B, L, D = q.shape
    N, E = v.shape[1], v.shape[2]
    q, k, v, key_bias = _dense(q, k, v, key_bias)
    BD, BE = _pow2(int(D)), _pow2(int(E))
    blocks = _blocks(BD, BE, q.dtype)
    # where every kernel's key tile holds all the keys the order gains nothing
    keys = bool(L) and _key_order(int(N), min(b[1] for b in blocks.values()))
    idx, cnt = _orders(query_mask, key_bias, keys, L)  # outputs may not alias each other
    acc = acc_dtype(q.dtype)
    if not (B and L and N):  # nothing attended
        return (torch.zeros(B, L, E, device=q.device, dtype=q.dtype),
                torch.full((B, L), float("-inf"), device=q.device, dtype=acc), idx, cnt)
    out = torch.empty(B, L, E, device=q.device, dtype=q.dtype)  # the kernel writes every row
    lse = torch.empty(B, L, device=q.device, dtype=acc)
    BM, BN, warps = blocks["fwd"]
    launcher(_attn_fwd)[(cdiv(L, BM), B)](
        q, k, v, key_bias, idx, cnt, out, lse, L, N, _ld(idx, L), D, E, *split_f32(scale),
        **_flags(q, query_mask, idx),
        BM=BM, BN=BN, BD=BD, BE=BE, num_warps=warps, num_stages=2)
    return out, lse, idx, cnt


@traced_op("regharm_triton::masked_attention_backward")
def masked_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, key_bias: torch.Tensor,
                         query_mask: Optional[torch.Tensor], out: torch.Tensor,
                         lse: torch.Tensor, idx: torch.Tensor, cnt: torch.Tensor, scale: float
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv in q's dtype; idx, cnt: the forward's query and key orders."""
    B, L, D = q.shape
    N, E = v.shape[1], v.shape[2]
    q, k, v, key_bias = _dense(q, k, v, key_bias)
    do = grad_out.to(q.dtype).contiguous()
    out = out.contiguous()
    acc = acc_dtype(q.dtype)
    if not (B and L and N):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq = torch.empty_like(q)             # every row is written (inactive ones with 0)
    dk, dv = torch.empty_like(k), torch.empty_like(v)   # every key row is written
    delta = torch.empty(B, L, device=q.device, dtype=acc)
    BD, BE = _pow2(int(D)), _pow2(int(E))
    blocks = _blocks(BD, BE, q.dtype)
    bm = blocks["dq"][0]
    launcher(_attn_bwd_delta)[(cdiv(L, bm), B)](out, do, delta, L, E, BM=bm, BE=BE,
                                                num_warps=4)
    # float32 values wider than 128 are streamed in chunks of 128 for dP = dO·Vᵀ (see _abt):
    # at E = 512 that cuts sm_90 spills from ~7 KB to <= 1.3 KB per thread; 16-bit values
    # spill less kept in registers
    ec = min(BE, 128) if q.dtype == torch.float32 else BE
    flags = dict(_flags(q, query_mask, idx), BD=BD, BE=BE, EC=ec, num_stages=2)
    BM, BN, warps = blocks["dkdv"]
    launcher(_attn_bwd_dkdv)[(cdiv(N, BN), B)](
        q, k, v, key_bias, idx, cnt, do, lse, delta, dk, dv, L, N, _ld(idx, L), D, E,
        *split_f32(scale), BM=BM, BN=BN, num_warps=warps,
        **dict(flags, num_stages=_dkdv_stages(BD, BE, q.dtype)))
    BM, BN, warps = blocks["dq"]
    launcher(_attn_bwd_dq)[(cdiv(L, BM), B)](
        q, k, v, key_bias, idx, cnt, do, lse, delta, dq, L, N, _ld(idx, L), D, E,
        *split_f32(scale),
        BM=BM, BN=BN, num_warps=warps, **flags)
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, key_bias, query_mask, scale = inputs
    _refuse_too_wide(q, v, backward=True)   # at the forward, not at loss.backward()
    out, lse, idx, cnt = output
    ctx.save_for_backward(q, k, v, key_bias, query_mask, out, lse, idx, cnt)
    ctx.scale = scale


_masked_attention_backward = Direct(torch.ops.regharm_triton.masked_attention_backward,
                                    masked_attention_bwd.eager_body)


def _backward(ctx, grad_out, grad_lse, grad_idx, grad_cnt):
    q, k, v, key_bias, query_mask, out, lse, idx, cnt = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _masked_attention_backward(grad_out, q, k, v, key_bias, query_mask, out, lse,
                                            idx, cnt, ctx.scale)
    return dq, dk, dv, None, None, None


_MaskedAttention = register_autograd("regharm_triton::masked_attention", _backward, _setup_context,
                                     masked_attention_fwd.eager_body)


# Widest tiles (BD + BE, D and E rounded up to powers of two, at least 16) whose kernels fit an
# sm_90 block's 232,448 B of shared memory, from Triton 3.6's compiler: (forward, backward).
# float32 backward: 1024 takes 167,936 B (one stage), 1536 takes 262,144 B; forward: 3072 takes
# 196,608 B, 4096 takes 262,144 B. 16-bit backward: 4096 takes 198,784 B, 6144 takes 329,856 B;
# forward: 6144 takes 197,120 B, 8192 takes 262,656 B.
_WIDEST = {torch.float32: (3072, 1024), torch.float16: (6144, 4096), torch.bfloat16: (6144, 4096)}


def too_wide(D: int, E: int, dtype: torch.dtype, backward: bool) -> Optional[str]:
    """Why the compiled kernels cannot take these widths, or None (float64 and the interpreter
    are not limited)."""
    widest = _WIDEST.get(dtype)
    if widest is None or interpreting():
        return None
    width = _pow2(int(D)) + _pow2(int(E))
    limit = widest[1] if backward else widest[0]
    if width <= limit:
        return None
    f32, b16 = _WIDEST[torch.float32], _WIDEST[torch.bfloat16]
    return (f"backend 'triton': masked_attention {'with its backward ' if backward else ''}at "
            f"D={D}, E={E} in {str(dtype).replace('torch.', '')} needs more shared memory than an "
            f"H100/H200 block has (D and E rounded up to powers of two may sum to {f32[1]} in "
            f"float32, {b16[1]} in 16-bit; without a backward {f32[0]} and {b16[0]}); use "
            f"backend='native' or 'torch', or bfloat16 (train --amp bf16)")


def _refuse_too_wide(q, v, backward: bool) -> None:
    """:func:`too_wide`'s reason as BackendUnavailable: in the forward's body and where autograd
    sets up a backward, so that every path (this op, PTL's one node, torch.compile) meets it."""
    problem = too_wide(q.shape[-1], v.shape[-1], q.dtype, backward)
    if problem is not None:
        from ..backends import BackendUnavailable
        raise BackendUnavailable(problem)


def masked_attention(q, k, v, key_bias, query_mask, scale: float) -> torch.Tensor:
    """out (Tensor[B, L, E]) of SPEC §3; see :func:`regharm_ext.ops.masked_attention`."""
    check_batch(q.shape[0], "masked_attention")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        _refuse_too_wide(q, v, backward=True)   # before the forward's work
    args = (q, k, v, key_bias, query_mask, scale)
    if eager_grad(q, k, v):
        return _MaskedAttention.apply(*args)[0]
    return torch.ops.regharm_triton.masked_attention(*args)[0]
