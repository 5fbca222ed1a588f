"""Triton backward of the in-batch softmax, recomputing logit tiles from the saved row LSE: the dK
pass (dK and d(bias)) and, in the "split" design, the dQ pass (in the "fused" design dQ comes from
the forward's A instead, see triton_forward.py and triton_config.DESIGNS).

One program owns BLOCK_N rows of k (their fp32 dK accumulator and d(bias) stay in registers; no
atomics) and streams every BLOCK_M-row tile of q past them. With s_ij = q_i.k_j / tau + b_j,
p_ij = exp(s_ij - LSE_i), g_i = dL/dloss_i and t_i the target of row i:

    dS_ij = g_i (p_ij - [j = t_i])
    dk_j  = (1/tau) sum_i dS_ij q_i          db_j = sum_i dS_ij

Rows beyond N read LSE = +inf and g = 0, so they contribute exactly 0.

The dQ pass is the mirror image (flash-attention-2 style): one program owns BLOCK_M rows of q and
their fp32 dQ accumulator and streams every BLOCK_N-row tile of k past them,

    dq_i = (g_i / tau) sum_j (p_ij - [j = t_i]) k_j

With the LSE known there is no running max, so the accumulator is never rescaled (the fused
forward multiplies its [BLOCK_M, D] tile by alpha every step) and g_i / tau is applied once at the
end. Columns beyond M load k rows of zeros, so they add nothing and need no mask. dQ is written in
q's dtype: no fp32 [N, D] buffer is kept between forward and backward. Cost: the logits are
recomputed once more (10 N M D flops for forward+backward instead of 8), the price of a forward
that only reduces (LSE and the target logit) with a footprint of one logits tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from transrec.kernels.triton_common import LOG2E, load_rows, mma, store_rows, store_rows_t
from transrec.kernels.triton_config import (
    INTERPRET_BLOCK,
    Launch,
    d_class,
    d_layout,
    interpreting,
    next_pow2,
    pinned,
    tuned,
)


@triton.jit(do_not_specialize=["N", "M", "N_KEY", "M_KEY"])  # sizes: see triton_forward.py
def _bwd_dk_kernel(Q, K, BIAS, TGT, LSE2, G, DK, DB,
                   N, M, D,
                   stride_qn, stride_qd, stride_kn, stride_kd, stride_dkn, stride_dkd,
                   scale2, inv_tau,
                   N_KEY, M_KEY,
                   COMPUTE_DK: tl.constexpr, COMPUTE_DB: tl.constexpr,
                   EVEN_D: tl.constexpr, NUM_DC: tl.constexpr, BLOCK_DC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RESIDENT: tl.constexpr,
                   DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    cdt = Q.dtype.element_ty

    if NUM_DC == 1 and RESIDENT:  # the k tile kept across the q loop (a tuning choice, as in the forward)
        k0 = load_rows(K, cols, col_ok, 0, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
    b2 = tl.load(BIAS + cols, mask=col_ok, other=0.0) * LOG2E  # fp32; zeros when the caller has no bias
    if COMPUTE_DK:
        dk0 = tl.zeros([BLOCK_N, BLOCK_DC], tl.float32)
        if NUM_DC > 1:
            dk1 = tl.zeros([BLOCK_N, BLOCK_DC], tl.float32)
        if NUM_DC > 2:
            dk2 = tl.zeros([BLOCK_N, BLOCK_DC], tl.float32)
        if NUM_DC > 3:
            dk3 = tl.zeros([BLOCK_N, BLOCK_DC], tl.float32)
    if COMPUTE_DB:
        db = tl.zeros([BLOCK_N], tl.float32)

    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < N
        st = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        if NUM_DC > 1 or not RESIDENT:
            k0 = load_rows(K, cols, col_ok, 0, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
        q0 = load_rows(Q, rows, row_ok, 0, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)
        st = mma(k0, tl.trans(q0), st, DOT_FP32, IEEE)
        if NUM_DC > 1:
            k1 = load_rows(K, cols, col_ok, BLOCK_DC, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
            q1 = load_rows(Q, rows, row_ok, BLOCK_DC, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)
            st = mma(k1, tl.trans(q1), st, DOT_FP32, IEEE)
        if NUM_DC > 2:
            k2 = load_rows(K, cols, col_ok, 2 * BLOCK_DC, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
            q2 = load_rows(Q, rows, row_ok, 2 * BLOCK_DC, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)
            st = mma(k2, tl.trans(q2), st, DOT_FP32, IEEE)
        if NUM_DC > 3:
            k3 = load_rows(K, cols, col_ok, 3 * BLOCK_DC, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
            q3 = load_rows(Q, rows, row_ok, 3 * BLOCK_DC, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)
            st = mma(k3, tl.trans(q3), st, DOT_FP32, IEEE)

        st = st * scale2
        st = st + b2[:, None]
        lse2 = tl.load(LSE2 + rows, mask=row_ok, other=float("inf"))
        g = tl.load(G + rows, mask=row_ok, other=0.0)
        t = tl.load(TGT + rows, mask=row_ok, other=-1).to(tl.int64)
        ds = tl.exp2(st - lse2[None, :]) * g[None, :]
        ds = ds - tl.where(cols[:, None] == t[None, :], g[None, :], 0.0)  # [BLOCK_N, BLOCK_M] = dS^T
        if COMPUTE_DK:
            dsc = ds.to(cdt)
            dk0 = mma(dsc, q0, dk0, DOT_FP32, IEEE)
            if NUM_DC > 1:
                dk1 = mma(dsc, q1, dk1, DOT_FP32, IEEE)
            if NUM_DC > 2:
                dk2 = mma(dsc, q2, dk2, DOT_FP32, IEEE)
            if NUM_DC > 3:
                dk3 = mma(dsc, q3, dk3, DOT_FP32, IEEE)
        if COMPUTE_DB:
            db += tl.sum(ds, 1)

    if COMPUTE_DK:
        store_rows(DK, dk0 * inv_tau, cols, col_ok, 0, D, stride_dkn, stride_dkd, BLOCK_DC, EVEN_D)
        if NUM_DC > 1:
            store_rows(DK, dk1 * inv_tau, cols, col_ok, BLOCK_DC, D, stride_dkn, stride_dkd, BLOCK_DC,
                       EVEN_D)
        if NUM_DC > 2:
            store_rows(DK, dk2 * inv_tau, cols, col_ok, 2 * BLOCK_DC, D, stride_dkn, stride_dkd, BLOCK_DC,
                       EVEN_D)
        if NUM_DC > 3:
            store_rows(DK, dk3 * inv_tau, cols, col_ok, 3 * BLOCK_DC, D, stride_dkn, stride_dkd, BLOCK_DC,
                       EVEN_D)
    if COMPUTE_DB:
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_logits(q, k, s, ACC_T: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """s + q k^T, or its transpose s^T + k q^T (ACC_T)."""
    if ACC_T:
        s = mma(k, tl.trans(q), s, DOT_FP32, IEEE)
    else:
        s = mma(q, tl.trans(k), s, DOT_FP32, IEEE)
    return s


@triton.jit
def _dq_acc(acc, ds, k, ACC_T: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """acc + dS k, or its transpose acc^T + k^T dS^T (ACC_T: ``ds`` holds dS^T)."""
    if ACC_T:
        acc = mma(tl.trans(k), ds, acc, DOT_FP32, IEEE)
    else:
        acc = mma(ds, k, acc, DOT_FP32, IEEE)
    return acc


@triton.jit
def _dq_store(DQ, acc, gs, rows, row_ok, d0, D, stride_dqn, stride_dqd, BLOCK_DC: tl.constexpr,
              EVEN_D: tl.constexpr, ACC_T: tl.constexpr):
    if ACC_T:
        store_rows_t(DQ, acc * gs[None, :], rows, row_ok, d0, D, stride_dqn, stride_dqd, BLOCK_DC, EVEN_D)
    else:
        store_rows(DQ, acc * gs[:, None], rows, row_ok, d0, D, stride_dqn, stride_dqd, BLOCK_DC, EVEN_D)


@triton.jit(do_not_specialize=["N", "M", "N_KEY", "M_KEY"])  # sizes: see triton_forward.py
def _bwd_dq_kernel(Q, K, BIAS, TGT, LSE2, G, DQ,
                   N, M, D,
                   stride_qn, stride_qd, stride_kn, stride_kd, stride_dqn, stride_dqd,
                   scale2, inv_tau,
                   N_KEY, M_KEY,
                   EVEN_D: tl.constexpr, NUM_DC: tl.constexpr, BLOCK_DC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RESIDENT: tl.constexpr,
                   ACC_T: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cdt = K.dtype.element_ty

    if NUM_DC == 1 and RESIDENT:  # the q tile kept across the k loop (a tuning choice)
        q0 = load_rows(Q, rows, row_ok, 0, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)
    lse2 = tl.load(LSE2 + rows, mask=row_ok, other=float("inf"))
    t = tl.load(TGT + rows, mask=row_ok, other=-1).to(tl.int64)
    # ACC_T: everything transposed (logits [BLOCK_N, BLOCK_M], dQ^T chunks [BLOCK_DC, BLOCK_M]), so
    # that the M side of both products is BLOCK_N or BLOCK_DC, >= 64 as wgmma wants, while the rows
    # owned (BLOCK_M) stay few: the accumulator of BLOCK_M x D fp32 then fits in registers at D = 768.
    if ACC_T:
        acc0 = tl.zeros([BLOCK_DC, BLOCK_M], tl.float32)
    else:
        acc0 = tl.zeros([BLOCK_M, BLOCK_DC], tl.float32)
    if NUM_DC > 1:
        acc1 = tl.zeros_like(acc0)
    if NUM_DC > 2:
        acc2 = tl.zeros_like(acc0)
    if NUM_DC > 3:
        acc3 = tl.zeros_like(acc0)

    for start_n in range(0, M, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        if ACC_T:
            s = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        else:
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if NUM_DC > 1 or not RESIDENT:
            q0 = load_rows(Q, rows, row_ok, 0, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)
        k0 = load_rows(K, cols, col_ok, 0, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
        s = _dq_logits(q0, k0, s, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 1:
            q1 = load_rows(Q, rows, row_ok, BLOCK_DC, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)
            k1 = load_rows(K, cols, col_ok, BLOCK_DC, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
            s = _dq_logits(q1, k1, s, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 2:
            q2 = load_rows(Q, rows, row_ok, 2 * BLOCK_DC, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)
            k2 = load_rows(K, cols, col_ok, 2 * BLOCK_DC, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
            s = _dq_logits(q2, k2, s, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 3:
            q3 = load_rows(Q, rows, row_ok, 3 * BLOCK_DC, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)
            k3 = load_rows(K, cols, col_ok, 3 * BLOCK_DC, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
            s = _dq_logits(q3, k3, s, ACC_T, DOT_FP32, IEEE)

        s = s * scale2
        b2 = tl.load(BIAS + cols, mask=col_ok, other=0.0) * LOG2E  # fp32; zeros without a bias
        if ACC_T:
            ds = tl.exp2(s + b2[:, None] - lse2[None, :])
            ds = ds - tl.where(cols[:, None] == t[None, :], 1.0, 0.0)  # dS^T [BLOCK_N, BLOCK_M], g left out
        else:
            ds = tl.exp2(s + b2[None, :] - lse2[:, None])
            ds = ds - tl.where(cols[None, :] == t[:, None], 1.0, 0.0)  # dS [BLOCK_M, BLOCK_N], g left out
        dsc = ds.to(cdt)
        acc0 = _dq_acc(acc0, dsc, k0, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 1:
            acc1 = _dq_acc(acc1, dsc, k1, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 2:
            acc2 = _dq_acc(acc2, dsc, k2, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 3:
            acc3 = _dq_acc(acc3, dsc, k3, ACC_T, DOT_FP32, IEEE)

    gs = tl.load(G + rows, mask=row_ok, other=0.0) * inv_tau
    _dq_store(DQ, acc0, gs, rows, row_ok, 0, D, stride_dqn, stride_dqd, BLOCK_DC, EVEN_D, ACC_T)
    if NUM_DC > 1:
        _dq_store(DQ, acc1, gs, rows, row_ok, BLOCK_DC, D, stride_dqn, stride_dqd, BLOCK_DC, EVEN_D, ACC_T)
    if NUM_DC > 2:
        _dq_store(DQ, acc2, gs, rows, row_ok, 2 * BLOCK_DC, D, stride_dqn, stride_dqd, BLOCK_DC, EVEN_D,
                  ACC_T)
    if NUM_DC > 3:
        _dq_store(DQ, acc3, gs, rows, row_ok, 3 * BLOCK_DC, D, stride_dqn, stride_dqd, BLOCK_DC, EVEN_D,
                  ACC_T)


# The transposed orientation wherever the rows owned are too few for wgmma in the plain one.
_bwd_dq = triton.heuristics({"ACC_T": lambda a: a["BLOCK_M"] < 64})(_bwd_dq_kernel)


def backward_dk_launch(q, k, bias, target, lse2, g, tau: float, compute_dk: bool, compute_db: bool, *,
                       block_m: int | None = None, block_n: int | None = None, block_dc: int | None = None,
                       resident: bool = True):
    """(Launch, (dk [M, D] in k's dtype or None, db [M] in bias's dtype or None)) for inputs made
    canonical by ``triton_op.canonical_inputs``; tiles as in ``forward_launch``."""
    n, d = q.shape
    m = k.shape[0]
    bdc, ndc, even_d = d_layout(d, block_dc)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if compute_dk else None
    db = torch.empty(m, dtype=bias.dtype, device=k.device) if compute_db else None
    interp = interpreting()
    args = (q, k, bias, target, lse2, g,
            dk if dk is not None else lse2, db if db is not None else lse2, n, m, d,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            dk.stride(0) if dk is not None else 0, dk.stride(1) if dk is not None else 0,
            1.4426950408889634 / tau, 1.0 / tau, next_pow2(n), next_pow2(m))
    consts = dict(COMPUTE_DK=compute_dk, COMPUTE_DB=compute_db, EVEN_D=even_d,
                  NUM_DC=ndc, BLOCK_DC=bdc, DOT_FP32=interp, IEEE=q.dtype == torch.float32)
    if interp:
        bm, bn = block_m or INTERPRET_BLOCK, block_n or INTERPRET_BLOCK
        return Launch(_bwd_dk_kernel, (triton.cdiv(m, bn),), args,
                      dict(consts, BLOCK_M=bm, BLOCK_N=bn, RESIDENT=resident)), (dk, db)
    dclass, size = d_class(bdc, ndc), q.element_size()
    if block_m is not None or block_n is not None:
        kw = pinned("bwd", dclass, size, block_m, block_n, resident)
        return Launch(_bwd_dk_kernel, (triton.cdiv(m, kw["BLOCK_N"]),), args, dict(consts, **kw)), (dk, db)
    kern = tuned(_bwd_dk_kernel, "bwd", dclass, size)
    return Launch(kern, lambda meta: (triton.cdiv(m, meta["BLOCK_N"]),), args, consts), (dk, db)


def triton_backward_dk(q, k, bias, target, lse2, g, tau: float, compute_dk: bool, compute_db: bool, **tiles):
    """Returns (dk [M, D] in k's dtype or None, db [M] in bias's dtype or None)."""
    launch, outs = backward_dk_launch(q, k, bias, target, lse2, g, tau, compute_dk, compute_db, **tiles)
    launch()
    return outs


def backward_dq_launch(q, k, bias, target, lse2, g, tau: float, *, block_m: int | None = None,
                       block_n: int | None = None, block_dc: int | None = None, resident: bool = True):
    """(Launch, dq [N, D] in q's dtype) of the dQ pass for inputs made canonical by
    ``triton_op.canonical_inputs``; tiles as in ``forward_launch``."""
    n, d = q.shape
    m = k.shape[0]
    bdc, ndc, even_d = d_layout(d, block_dc)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    interp = interpreting()
    args = (q, k, bias, target, lse2, g, dq, n, m, d,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), dq.stride(0), dq.stride(1),
            1.4426950408889634 / tau, 1.0 / tau, next_pow2(n), next_pow2(m))
    consts = dict(EVEN_D=even_d, NUM_DC=ndc, BLOCK_DC=bdc, DOT_FP32=interp, IEEE=q.dtype == torch.float32)
    if interp:
        bm, bn = block_m or INTERPRET_BLOCK, block_n or INTERPRET_BLOCK
        return Launch(_bwd_dq, (triton.cdiv(n, bm),), args,
                      dict(consts, BLOCK_M=bm, BLOCK_N=bn, RESIDENT=resident)), dq
    dclass, size = d_class(bdc, ndc), q.element_size()
    if block_m is not None or block_n is not None:
        kw = pinned("dq", dclass, size, block_m, block_n, resident)
        return Launch(_bwd_dq, (triton.cdiv(n, kw["BLOCK_M"]),), args, dict(consts, **kw)), dq
    kern = tuned(_bwd_dq, "dq", dclass, size)
    return Launch(kern, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),), args, consts), dq


def triton_backward_dq(q, k, bias, target, lse2, g, tau: float, **tiles):
    """Returns dq [N, D] in q's dtype (the dQ pass of the "split" design)."""
    launch, dq = backward_dq_launch(q, k, bias, target, lse2, g, tau, **tiles)
    launch()
    return dq
