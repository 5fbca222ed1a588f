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
