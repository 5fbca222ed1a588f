"""Small Triton helpers shared by the forward and backward kernels (imported only by them)."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def load_rows(ptr, rows, row_ok, d0, D, stride_r, stride_d, BLOCK_DC: tl.constexpr,
              EVEN_D: tl.constexpr):
    """Tile [len(rows), BLOCK_DC] of a row-major matrix, columns d0 .. d0 + BLOCK_DC; 0 outside."""
    offs_d = d0 + tl.arange(0, BLOCK_DC)
    ptrs = ptr + rows[:, None] * stride_r + offs_d[None, :] * stride_d
    if EVEN_D:
        tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return tile


@triton.jit
def store_rows(ptr, val, rows, row_ok, d0, D, stride_r, stride_d, BLOCK_DC: tl.constexpr,
               EVEN_D: tl.constexpr):
    offs_d = d0 + tl.arange(0, BLOCK_DC)
    ptrs = ptr + rows[:, None] * stride_r + offs_d[None, :] * stride_d
    if EVEN_D:
        tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def store_rows_t(ptr, val_t, rows, row_ok, d0, D, stride_r, stride_d, BLOCK_DC: tl.constexpr,
                 EVEN_D: tl.constexpr):
    """store_rows of a tile given transposed: ``val_t`` is [BLOCK_DC, len(rows)]."""
    offs_d = d0 + tl.arange(0, BLOCK_DC)
    ptrs = ptr + rows[None, :] * stride_r + offs_d[:, None] * stride_d
    if EVEN_D:
        tl.store(ptrs, val_t.to(ptr.dtype.element_ty), mask=row_ok[None, :])
    else:
        tl.store(ptrs, val_t.to(ptr.dtype.element_ty), mask=row_ok[None, :] & (offs_d[:, None] < D))


@triton.jit
def mma(a, b, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. DOT_FP32: upcast the operands first (the interpreter
    returns garbage for a bf16 dot). IEEE: full fp32 precision for fp32 inputs (no tf32)."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def logits(own, other, s, ACC_T: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """s + own other^T, or its transpose s^T + other own^T (ACC_T). ``own``: the rows a program owns
    (q in the forward and the dQ pass, k in the dK pass); ``other``: the rows streaming past."""
    if ACC_T:
        s = mma(other, tl.trans(own), s, DOT_FP32, IEEE)
    else:
        s = mma(own, tl.trans(other), s, DOT_FP32, IEEE)
    return s


@triton.jit
def chunk_logits(s, OWN, own_rows, own_ok, stride_own_r, stride_own_d,
                 OTHER, other_rows, other_ok, stride_other_r, stride_other_d,
                 d0, D, BLOCK_DC: tl.constexpr, EVEN_D: tl.constexpr, ACC_T: tl.constexpr,
                 DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """One D chunk (columns d0 .. d0 + BLOCK_DC) of an unrolled logits tile: the owned rows' and the
    streamed rows' tiles of that chunk, and ``s`` plus their product (:func:`logits`). The kernels
    keep the two tiles for their accumulators."""
    own = load_rows(OWN, own_rows, own_ok, d0, D, stride_own_r, stride_own_d, BLOCK_DC, EVEN_D)
    other = load_rows(OTHER, other_rows, other_ok, d0, D, stride_other_r, stride_other_d, BLOCK_DC, EVEN_D)
    return own, other, logits(own, other, s, ACC_T, DOT_FP32, IEEE)


@triton.jit
def split_range(M, NUM_SPLITS, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr):
    """[lo, hi) of the streamed dimension (size M) this program covers: all of it, or with PARTIAL
    (a split launch, triton_config.num_splits) chunk program_id(1) of NUM_SPLITS, whole BLOCK_N tiles
    each (so only the last tile of the last chunk is ragged, as unsplit; a chunk may be empty)."""
    if PARTIAL:
        chunk = tl.cdiv(tl.cdiv(M, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = tl.program_id(1) * chunk
        hi = tl.minimum(lo + chunk, M)
    else:
        lo = 0
        hi = M
    return lo, hi


@triton.jit
def store_stats(LOSS, LSE2, LSUM, m_i, l_i, pos2, rows, row_ok, N, PARTIAL: tl.constexpr):
    """The forward's row results: LSE (log2 domain) and loss, or with PARTIAL the chunk's running max
    (into LSE2), sum (LSUM) and target logit (LOSS), at row program_id(1) of [S, N] buffers."""
    if PARTIAL:
        at = tl.program_id(1).to(tl.int64) * N + rows
        tl.store(LSE2 + at, m_i, mask=row_ok)
        tl.store(LSUM + at, l_i, mask=row_ok)
        tl.store(LOSS + at, pos2, mask=row_ok)
    else:
        lse2 = m_i + tl.log2(l_i)
        tl.store(LSE2 + rows, lse2, mask=row_ok)
        tl.store(LOSS + rows, (lse2 - pos2) * LN2, mask=row_ok)
