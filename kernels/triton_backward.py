"""Triton backward of the in-batch softmax, recomputing logit tiles from the saved row LSE: the dK
pass (dK and d(bias)) and, in the "split" design, the dQ pass (in the "fused" design dQ comes from
the forward's A instead, see triton_forward.py and triton_config.DESIGNS).

One program owns BLOCK_N rows of k (their fp32 dK accumulator and d(bias) stay in registers; no
atomics) and streams every BLOCK_M-row tile of q past them. With s_ij = q_i.k_j / tau + b_j,
p_ij = exp(s_ij - LSE_i), g_i = dL/dloss_i and t_i the target of row i:

    dS_ij = g_i (p_ij - [j = t_i])
    dk_j  = (1/tau) sum_i dS_ij q_i          db_j = sum_i dS_ij

Rows beyond N read LSE = +inf and g = 0, so they contribute exactly 0. A program owning fewer than
64 rows of k runs transposed (ACC_T): logits [BLOCK_M, BLOCK_N] and dK^T chunks [BLOCK_DC, BLOCK_N]
accumulated as q^T dS, so both products keep an M side of >= 64 (BLOCK_M, BLOCK_DC) for wgmma while
the accumulator is BLOCK_N x D; at D = 768, 32 x 32 tiles with 8 warps then use wgmma without
spilling (the plain 64 x 32 rows spilled without wgmma; see triton_config._BWD).

The dQ pass is the mirror image (flash-attention-2 style): one program owns BLOCK_M rows of q and
their fp32 dQ accumulator and streams every BLOCK_N-row tile of k past them,

    dq_i = (g_i / tau) sum_j (p_ij - [j = t_i]) k_j

With the LSE known there is no running max, so the accumulator is never rescaled (the fused
forward multiplies its [BLOCK_M, D] tile by alpha every step) and g_i / tau is applied once at the
end. Columns beyond M load k rows of zeros, so they add nothing and need no mask. dQ is written in
q's dtype: no fp32 [N, D] buffer is kept between forward and backward. Cost: the logits are
recomputed once more (10 N M D flops for forward+backward instead of 8), the price of a forward
that only reduces (LSE and the target logit) with a footprint of one logits tile.

Split-M (triton_config.num_splits): both passes may cut the rows they stream into S chunks (grid
(tiles, S), PARTIAL): program (i, s) writes its chunk's dQ (g / tau applied) into an fp32 [N, S, D]
buffer, or its dK and d(bias) into [M, S, D] and [S, M]; torch sums over S afterwards
(``Launch.after``). With the LSE known the partials need no rescaling, the sum is deterministic
(no atomics), and the buffers stay under SPLIT_BUFFER_BYTES.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from transrec.kernels.triton_common import (
    LOG2E,
    chunk_logits,
    load_rows,
    logits,
    mma,
    split_range,
    store_rows,
    store_rows_t,
)
from transrec.kernels.triton_config import (
    INTERPRET_BLOCK,
    Launch,
    config_kwargs,
    d_class,
    d_layout,
    interpreting,
    next_pow2,
    num_splits,
    pinned,
    sm_count,
    split_mode,
    table,
    tuned,
)


@triton.jit
def _acc(acc, ds, other, ACC_T: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """acc + dS other, or its transpose acc^T + other^T dS^T (ACC_T: ``ds`` and ``acc`` transposed)."""
    if ACC_T:
        acc = mma(tl.trans(other), ds, acc, DOT_FP32, IEEE)
    else:
        acc = mma(ds, other, acc, DOT_FP32, IEEE)
    return acc


@triton.jit
def _acc_store(PTR, acc, scale, rows, row_ok, d0, D, stride_r, stride_d, BLOCK_DC: tl.constexpr,
               EVEN_D: tl.constexpr, ACC_T: tl.constexpr):
    """Rows ``rows`` of the accumulator (transposed under ACC_T) times ``scale`` (one per row)."""
    if ACC_T:
        store_rows_t(PTR, acc * scale[None, :], rows, row_ok, d0, D, stride_r, stride_d, BLOCK_DC, EVEN_D)
    else:
        store_rows(PTR, acc * scale[:, None], rows, row_ok, d0, D, stride_r, stride_d, BLOCK_DC, EVEN_D)


@triton.jit(do_not_specialize=["N", "M", "N_KEY", "M_KEY", "NUM_SPLITS"])  # sizes: see triton_forward.py
def _bwd_dk_kernel(Q, K, BIAS, TGT, LSE2, G, DK, DB,
                   N, M, D,
                   stride_qn, stride_qd, stride_kn, stride_kd, stride_dkn, stride_dkd,
                   scale2, inv_tau,
                   N_KEY, M_KEY, NUM_SPLITS,
                   COMPUTE_DK: tl.constexpr, COMPUTE_DB: tl.constexpr, PARTIAL: tl.constexpr,
                   EVEN_D: tl.constexpr, NUM_DC: tl.constexpr, BLOCK_DC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RESIDENT: tl.constexpr,
                   ACC_T: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    cdt = Q.dtype.element_ty
    if PARTIAL:  # chunk program_id(1) of the q rows: partial sums into [M, S, D] and [S, M] fp32
        DK += tl.program_id(1).to(tl.int64) * D
        DB += tl.program_id(1).to(tl.int64) * M

    if NUM_DC == 1 and RESIDENT:  # the k tile kept across the q loop (a tuning choice, as in the forward)
        k0 = load_rows(K, cols, col_ok, 0, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
    b2 = tl.load(BIAS + cols, mask=col_ok, other=0.0) * LOG2E  # fp32; zeros when the caller has no bias
    # ACC_T (fewer than 64 rows of k owned): the logits as [BLOCK_M, BLOCK_N] and the dK chunks as
    # dK^T [BLOCK_DC, BLOCK_N], so that the M side of the dK product (BLOCK_DC) is >= 64 for wgmma
    # while the accumulator stays BLOCK_N x D fp32 (the dQ pass's trick, mirrored).
    if COMPUTE_DK:
        if ACC_T:
            dk0 = tl.zeros([BLOCK_DC, BLOCK_N], tl.float32)
        else:
            dk0 = tl.zeros([BLOCK_N, BLOCK_DC], tl.float32)
        if NUM_DC > 1:
            dk1 = tl.zeros_like(dk0)
        if NUM_DC > 2:
            dk2 = tl.zeros_like(dk0)
        if NUM_DC > 3:
            dk3 = tl.zeros_like(dk0)
    if COMPUTE_DB:
        db = tl.zeros([BLOCK_N], tl.float32)

    lo, hi = split_range(N, NUM_SPLITS, BLOCK_M, PARTIAL)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < N
        if ACC_T:
            st = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:
            st = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        if NUM_DC > 1 or not RESIDENT:
            k0 = load_rows(K, cols, col_ok, 0, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
        q0 = load_rows(Q, rows, row_ok, 0, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)
        st = logits(k0, q0, st, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 1:
            k1, q1, st = chunk_logits(st, K, cols, col_ok, stride_kn, stride_kd, Q, rows, row_ok, stride_qn,
                                      stride_qd, BLOCK_DC, D, BLOCK_DC, EVEN_D, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 2:
            k2, q2, st = chunk_logits(st, K, cols, col_ok, stride_kn, stride_kd, Q, rows, row_ok, stride_qn,
                                      stride_qd, 2 * BLOCK_DC, D, BLOCK_DC, EVEN_D, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 3:
            k3, q3, st = chunk_logits(st, K, cols, col_ok, stride_kn, stride_kd, Q, rows, row_ok, stride_qn,
                                      stride_qd, 3 * BLOCK_DC, D, BLOCK_DC, EVEN_D, ACC_T, DOT_FP32, IEEE)

        st = st * scale2
        lse2 = tl.load(LSE2 + rows, mask=row_ok, other=float("inf"))
        g = tl.load(G + rows, mask=row_ok, other=0.0)
        t = tl.load(TGT + rows, mask=row_ok, other=-1).to(tl.int64)
        if ACC_T:
            ds = tl.exp2(st + b2[None, :] - lse2[:, None]) * g[:, None]
            ds = ds - tl.where(cols[None, :] == t[:, None], g[:, None], 0.0)  # [BLOCK_M, BLOCK_N] = dS
        else:
            ds = tl.exp2(st + b2[:, None] - lse2[None, :]) * g[None, :]
            ds = ds - tl.where(cols[:, None] == t[None, :], g[None, :], 0.0)  # [BLOCK_N, BLOCK_M] = dS^T
        if COMPUTE_DK:
            dsc = ds.to(cdt)
            dk0 = _acc(dk0, dsc, q0, ACC_T, DOT_FP32, IEEE)
            if NUM_DC > 1:
                dk1 = _acc(dk1, dsc, q1, ACC_T, DOT_FP32, IEEE)
            if NUM_DC > 2:
                dk2 = _acc(dk2, dsc, q2, ACC_T, DOT_FP32, IEEE)
            if NUM_DC > 3:
                dk3 = _acc(dk3, dsc, q3, ACC_T, DOT_FP32, IEEE)
        if COMPUTE_DB:
            if ACC_T:
                db += tl.sum(ds, 0)
            else:
                db += tl.sum(ds, 1)

    if COMPUTE_DK:
        sc = tl.full([BLOCK_N], inv_tau, tl.float32)
        _acc_store(DK, dk0, sc, cols, col_ok, 0, D, stride_dkn, stride_dkd, BLOCK_DC, EVEN_D, ACC_T)
        if NUM_DC > 1:
            _acc_store(DK, dk1, sc, cols, col_ok, BLOCK_DC, D, stride_dkn, stride_dkd, BLOCK_DC, EVEN_D,
                       ACC_T)
        if NUM_DC > 2:
            _acc_store(DK, dk2, sc, cols, col_ok, 2 * BLOCK_DC, D, stride_dkn, stride_dkd, BLOCK_DC, EVEN_D,
                       ACC_T)
        if NUM_DC > 3:
            _acc_store(DK, dk3, sc, cols, col_ok, 3 * BLOCK_DC, D, stride_dkn, stride_dkd, BLOCK_DC, EVEN_D,
                       ACC_T)
    if COMPUTE_DB:
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=col_ok)


# The transposed orientation wherever the rows of k owned are too few for wgmma in the plain one.
_bwd_dk = triton.heuristics({"ACC_T": lambda a: a["BLOCK_N"] < 64,
                             "PARTIAL": lambda a: a["NUM_SPLITS"] > 1})(_bwd_dk_kernel)


@triton.jit(do_not_specialize=["N", "M", "N_KEY", "M_KEY", "NUM_SPLITS"])  # sizes: see triton_forward.py
def _bwd_dq_kernel(Q, K, BIAS, TGT, LSE2, G, DQ,
                   N, M, D,
                   stride_qn, stride_qd, stride_kn, stride_kd, stride_dqn, stride_dqd,
                   scale2, inv_tau,
                   N_KEY, M_KEY, NUM_SPLITS,
                   PARTIAL: tl.constexpr, EVEN_D: tl.constexpr, NUM_DC: tl.constexpr, BLOCK_DC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RESIDENT: tl.constexpr,
                   ACC_T: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cdt = K.dtype.element_ty
    if PARTIAL:  # chunk program_id(1) of the k rows: partial dQ (g / tau applied) into [N, S, D] fp32
        DQ += tl.program_id(1).to(tl.int64) * D

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

    lo, hi = split_range(M, NUM_SPLITS, BLOCK_N, PARTIAL)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        if ACC_T:
            s = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        else:
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if NUM_DC > 1 or not RESIDENT:
            q0 = load_rows(Q, rows, row_ok, 0, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)
        k0 = load_rows(K, cols, col_ok, 0, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
        s = logits(q0, k0, s, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 1:
            q1, k1, s = chunk_logits(s, Q, rows, row_ok, stride_qn, stride_qd, K, cols, col_ok, stride_kn,
                                     stride_kd, BLOCK_DC, D, BLOCK_DC, EVEN_D, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 2:
            q2, k2, s = chunk_logits(s, Q, rows, row_ok, stride_qn, stride_qd, K, cols, col_ok, stride_kn,
                                     stride_kd, 2 * BLOCK_DC, D, BLOCK_DC, EVEN_D, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 3:
            q3, k3, s = chunk_logits(s, Q, rows, row_ok, stride_qn, stride_qd, K, cols, col_ok, stride_kn,
                                     stride_kd, 3 * BLOCK_DC, D, BLOCK_DC, EVEN_D, ACC_T, DOT_FP32, IEEE)

        s = s * scale2
        b2 = tl.load(BIAS + cols, mask=col_ok, other=0.0) * LOG2E  # fp32; zeros without a bias
        if ACC_T:
            ds = tl.exp2(s + b2[:, None] - lse2[None, :])
            ds = ds - tl.where(cols[:, None] == t[None, :], 1.0, 0.0)  # dS^T [BLOCK_N, BLOCK_M], g left out
        else:
            ds = tl.exp2(s + b2[None, :] - lse2[:, None])
            ds = ds - tl.where(cols[None, :] == t[:, None], 1.0, 0.0)  # dS [BLOCK_M, BLOCK_N], g left out
        dsc = ds.to(cdt)
        acc0 = _acc(acc0, dsc, k0, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 1:
            acc1 = _acc(acc1, dsc, k1, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 2:
            acc2 = _acc(acc2, dsc, k2, ACC_T, DOT_FP32, IEEE)
        if NUM_DC > 3:
            acc3 = _acc(acc3, dsc, k3, ACC_T, DOT_FP32, IEEE)

    gs = tl.load(G + rows, mask=row_ok, other=0.0) * inv_tau
    _acc_store(DQ, acc0, gs, rows, row_ok, 0, D, stride_dqn, stride_dqd, BLOCK_DC, EVEN_D, ACC_T)
    if NUM_DC > 1:
        _acc_store(DQ, acc1, gs, rows, row_ok, BLOCK_DC, D, stride_dqn, stride_dqd, BLOCK_DC, EVEN_D, ACC_T)
    if NUM_DC > 2:
        _acc_store(DQ, acc2, gs, rows, row_ok, 2 * BLOCK_DC, D, stride_dqn, stride_dqd, BLOCK_DC, EVEN_D,
                  ACC_T)
    if NUM_DC > 3:
        _acc_store(DQ, acc3, gs, rows, row_ok, 3 * BLOCK_DC, D, stride_dqn, stride_dqd, BLOCK_DC, EVEN_D,
                  ACC_T)


# The transposed orientation wherever the rows owned are too few for wgmma in the plain one.
_bwd_dq = triton.heuristics({"ACC_T": lambda a: a["BLOCK_M"] < 64,
                             "PARTIAL": lambda a: a["NUM_SPLITS"] > 1})(_bwd_dq_kernel)


def _tiles(stage, dclass, size, block_m, block_n, resident):
    """Launch keywords: the interpreter's fixed tiles, pinned tiles (a table row on a GPU), or None
    (autotuned)."""
    if interpreting():
        return dict(BLOCK_M=block_m or INTERPRET_BLOCK, BLOCK_N=block_n or INTERPRET_BLOCK, RESIDENT=resident)
    if block_m is not None or block_n is not None:
        return pinned(stage, dclass, size, block_m, block_n, resident)
    return None


def backward_dk_launch(q, k, bias, target, lse2, g, tau: float, compute_dk: bool, compute_db: bool, *,
                       block_m: int | None = None, block_n: int | None = None, block_dc: int | None = None,
                       resident: bool = True, split=None):
    """(Launch, (dk [M, D] in k's dtype or None, db [M] in bias's dtype or None)) for inputs made
    canonical by ``triton_op.canonical_inputs``; tiles and ``split`` as in ``forward_launch`` (here
    the q rows are cut into S chunks: partial dK [M, S, D] and d(bias) [S, M] fp32, summed by torch in
    ``Launch.after``)."""
    n, d = q.shape
    m = k.shape[0]
    bdc, ndc, even_d = d_layout(d, block_dc)
    dclass, size = d_class(bdc, ndc), q.element_size()
    kw = _tiles("bwd", dclass, size, block_m, block_n, resident)
    ref = kw or config_kwargs(table("bwd", dclass, size)[0])  # autotuned: S for the first row
    splits = num_splits(split_mode(split), m, n, ref["BLOCK_N"], ref["BLOCK_M"],
                        4 * d * compute_dk + 4 * compute_db, sm_count(q.device))
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if compute_dk else None
    db = torch.empty(m, dtype=bias.dtype, device=k.device) if compute_db else None
    dkp, dbp, after = dk, db, None
    if splits > 1:
        dkp = torch.empty((m, splits, d), dtype=torch.float32, device=k.device) if compute_dk else None
        dbp = torch.empty((splits, m), dtype=torch.float32, device=k.device) if compute_db else None

        def after():
            if dk is not None:
                dk.copy_(dkp.sum(1))
            if db is not None:
                db.copy_(dbp.sum(0))
    interp = interpreting()
    args = (q, k, bias, target, lse2, g,
            dkp if dkp is not None else lse2, dbp if dbp is not None else lse2, n, m, d,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            dkp.stride(0) if dkp is not None else 0, dkp.stride(-1) if dkp is not None else 0,
            1.4426950408889634 / tau, 1.0 / tau, next_pow2(n), next_pow2(m), splits)
    consts = dict(COMPUTE_DK=compute_dk, COMPUTE_DB=compute_db, EVEN_D=even_d,
                  NUM_DC=ndc, BLOCK_DC=bdc, DOT_FP32=interp, IEEE=q.dtype == torch.float32)
    if kw is not None:
        launch = Launch(_bwd_dk, (triton.cdiv(m, kw["BLOCK_N"]), splits), args, dict(consts, **kw), after)
        return launch, (dk, db)
    kern = tuned(_bwd_dk, "bwd", dclass, size)
    return Launch(kern, lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), splits), args, consts, after), (dk, db)


def triton_backward_dk(q, k, bias, target, lse2, g, tau: float, compute_dk: bool, compute_db: bool, **tiles):
    """Returns (dk [M, D] in k's dtype or None, db [M] in bias's dtype or None)."""
    launch, outs = backward_dk_launch(q, k, bias, target, lse2, g, tau, compute_dk, compute_db, **tiles)
    launch()
    return outs


def backward_dq_launch(q, k, bias, target, lse2, g, tau: float, *, block_m: int | None = None,
                       block_n: int | None = None, block_dc: int | None = None, resident: bool = True,
                       split=None):
    """(Launch, dq [N, D] in q's dtype) of the dQ pass for inputs made canonical by
    ``triton_op.canonical_inputs``; tiles and ``split`` as in ``forward_launch`` (the k rows cut
    into S chunks: partial dQ [N, S, D] fp32, summed by torch in ``Launch.after``)."""
    n, d = q.shape
    m = k.shape[0]
    bdc, ndc, even_d = d_layout(d, block_dc)
    dclass, size = d_class(bdc, ndc), q.element_size()
    kw = _tiles("dq", dclass, size, block_m, block_n, resident)
    ref = kw or config_kwargs(table("dq", dclass, size)[0])
    splits = num_splits(split_mode(split), n, m, ref["BLOCK_M"], ref["BLOCK_N"], 4 * d, sm_count(q.device))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dqp, after = dq, None
    if splits > 1:
        dqp = torch.empty((n, splits, d), dtype=torch.float32, device=q.device)
        after = lambda: dq.copy_(dqp.sum(1))  # noqa: E731
    interp = interpreting()
    args = (q, k, bias, target, lse2, g, dqp, n, m, d,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), dqp.stride(0), dqp.stride(-1),
            1.4426950408889634 / tau, 1.0 / tau, next_pow2(n), next_pow2(m), splits)
    consts = dict(EVEN_D=even_d, NUM_DC=ndc, BLOCK_DC=bdc, DOT_FP32=interp, IEEE=q.dtype == torch.float32)
    if kw is not None:
        return Launch(_bwd_dq, (triton.cdiv(n, kw["BLOCK_M"]), splits), args, dict(consts, **kw), after), dq
    kern = tuned(_bwd_dq, "dq", dclass, size)
    return Launch(kern, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits), args, consts, after), dq


def triton_backward_dq(q, k, bias, target, lse2, g, tau: float, **tiles):
    """Returns dq [N, D] in q's dtype (the dQ pass of the "split" design)."""
    launch, dq = backward_dq_launch(q, k, bias, target, lse2, g, tau, **tiles)
    launch()
    return dq
