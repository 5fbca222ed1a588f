"""Triton forward of the in-batch softmax: row LSE (fp32) and, when q needs a gradient, the
softmax-weighted item sum for dQ, without ever writing the N x M logits.

One program owns BLOCK_M rows of q and streams every BLOCK_N-row tile of k past them, keeping an
online max m_i and sum l_i in the log2 domain (s2 = log2(e) * (q_i.k_j / tau + b_j)):

    LSE_i  = ln 2 * (m_i + log2 l_i)
    loss_i = LSE_i - (q_i.k_{t_i} / tau + b_{t_i})   (the target logit picked from the same tiles)

With COMPUTE_DQ the same tiles also accumulate (flash-attention style, V = K)

    A_i = sum_j p_ij k_j - k_{t_i},      p_ij = exp(s_ij - LSE_i)

so that dq_i = (g_i / tau) * A_i in the backward (g_i = dL/dloss_i) with no second pass over k
for dQ: forward+backward costs 8 N M D flops (2 here for the logits, 2 for A; 4 in the dK pass).
A is stored in fp32, [N, D]. This is the "fused" design (triton_config.DESIGNS).

Without COMPUTE_DQ (the "split" design, whose dQ pass is in triton_backward.py, or q without
gradient) the forward only reduces. With D in one chunk that is the same kernel minus its
accumulator; with several chunks it is _lse_kernel, a matmul-shaped loop over D in BLOCK_K columns
inside the loop over k tiles: its shared memory is (BLOCK_M + BLOCK_N) x BLOCK_K per stage whatever
D is, so D = 768 gets 128 x 128 tiles pipelined 3-4 deep without spilling, where the unrolled
chunks need every chunk of q and k in shared memory at once (64 x 32 tiles, or 64 x 64 unpipelined).

Split-M (without COMPUTE_DQ only; triton_config.num_splits): a grid of (row tiles, S); program
(i, s) streams the k tiles of chunk s (split_range) and writes its running max, sum and target
logit into [S, N] buffers (PARTIAL); _lse_combine_kernel then rescales the sums to the common max,
adds them and the target logits, and writes the LSE and loss over chunk 0's rows. One extra launch
of O(S N) work; the forward's result is the same up to the order of the additions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from transrec.kernels.triton_common import (
    LN2,
    LOG2E,
    chunk_logits,
    load_rows,
    mma,
    split_range,
    store_rows,
    store_stats,
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


# N, M and the autotune keys are sizes: not specialised on (divisible by 16 or not, or 1), so a launch's
# compiled code depends on D, the dtype, the switches and the tiles alone.
@triton.jit(do_not_specialize=["N", "M", "N_KEY", "M_KEY", "NUM_SPLITS"])
def _fwd_kernel(Q, K, BIAS, TGT, LOSS, LSE2, A, LSUM,
                N, M, D,
                stride_qn, stride_qd, stride_kn, stride_kd, stride_an, stride_ad,
                scale2, inv_tau,
                N_KEY, M_KEY, NUM_SPLITS,
                COMPUTE_DQ: tl.constexpr, PARTIAL: tl.constexpr, EVEN_D: tl.constexpr,
                EVEN_M: tl.constexpr, NUM_DC: tl.constexpr, BLOCK_DC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RESIDENT: tl.constexpr,
                DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cdt = K.dtype.element_ty

    # With one D chunk the q tile may stay resident (RESIDENT, a tuning choice); otherwise it is
    # reloaded per k tile (L2 hits) so the registers go to the fp32 accumulators.
    if NUM_DC == 1 and RESIDENT:
        q0 = load_rows(Q, rows, row_ok, 0, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)

    t = tl.load(TGT + rows, mask=row_ok, other=-1).to(tl.int64)  # masked rows may carry any target
    pos2 = tl.zeros([BLOCK_M], tl.float32)  # the target's logit, picked from the same tiles as the LSE
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite floor: a tile of -inf gives no inf - inf
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if COMPUTE_DQ:
        acc0 = tl.zeros([BLOCK_M, BLOCK_DC], tl.float32)
        if NUM_DC > 1:
            acc1 = tl.zeros([BLOCK_M, BLOCK_DC], tl.float32)
        if NUM_DC > 2:
            acc2 = tl.zeros([BLOCK_M, BLOCK_DC], tl.float32)
        if NUM_DC > 3:
            acc3 = tl.zeros([BLOCK_M, BLOCK_DC], tl.float32)

    lo, hi = split_range(M, NUM_SPLITS, BLOCK_N, PARTIAL)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if NUM_DC > 1 or not RESIDENT:
            q0 = load_rows(Q, rows, row_ok, 0, D, stride_qn, stride_qd, BLOCK_DC, EVEN_D)
        k0 = load_rows(K, cols, col_ok, 0, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
        s = mma(q0, tl.trans(k0), s, DOT_FP32, IEEE)
        if NUM_DC > 1:
            q1, k1, s = chunk_logits(s, Q, rows, row_ok, stride_qn, stride_qd, K, cols, col_ok, stride_kn,
                                     stride_kd, BLOCK_DC, D, BLOCK_DC, EVEN_D, False, DOT_FP32, IEEE)
        if NUM_DC > 2:
            q2, k2, s = chunk_logits(s, Q, rows, row_ok, stride_qn, stride_qd, K, cols, col_ok, stride_kn,
                                     stride_kd, 2 * BLOCK_DC, D, BLOCK_DC, EVEN_D, False, DOT_FP32, IEEE)
        if NUM_DC > 3:
            q3, k3, s = chunk_logits(s, Q, rows, row_ok, stride_qn, stride_qd, K, cols, col_ok, stride_kn,
                                     stride_kd, 3 * BLOCK_DC, D, BLOCK_DC, EVEN_D, False, DOT_FP32, IEEE)

        s = s * scale2
        b = tl.load(BIAS + cols, mask=col_ok, other=0.0)  # fp32; zeros when the caller has no bias
        s = s + b[None, :] * LOG2E
        pos2 += tl.sum(tl.where(cols[None, :] == t[:, None], s, 0.0), 1)
        if not EVEN_M:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if COMPUTE_DQ:
            pc = p.to(cdt)
            acc0 = mma(pc, k0, acc0 * alpha[:, None], DOT_FP32, IEEE)
            if NUM_DC > 1:
                acc1 = mma(pc, k1, acc1 * alpha[:, None], DOT_FP32, IEEE)
            if NUM_DC > 2:
                acc2 = mma(pc, k2, acc2 * alpha[:, None], DOT_FP32, IEEE)
            if NUM_DC > 3:
                acc3 = mma(pc, k3, acc3 * alpha[:, None], DOT_FP32, IEEE)
        m_i = m_new

    if COMPUTE_DQ:
        # A_i = acc_i / l_i - k_{t_i}: the target rows of k gathered once per program.
        t_ok = row_ok & (t >= 0) & (t < M)
        inv_l = 1.0 / l_i
        kt = load_rows(K, t, t_ok, 0, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
        store_rows(A, acc0 * inv_l[:, None] - kt.to(tl.float32), rows, row_ok, 0, D, stride_an, stride_ad,
                   BLOCK_DC, EVEN_D)
        if NUM_DC > 1:
            kt = load_rows(K, t, t_ok, BLOCK_DC, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
            store_rows(A, acc1 * inv_l[:, None] - kt.to(tl.float32), rows, row_ok, BLOCK_DC, D, stride_an,
                       stride_ad, BLOCK_DC, EVEN_D)
        if NUM_DC > 2:
            kt = load_rows(K, t, t_ok, 2 * BLOCK_DC, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
            store_rows(A, acc2 * inv_l[:, None] - kt.to(tl.float32), rows, row_ok, 2 * BLOCK_DC, D,
                       stride_an, stride_ad, BLOCK_DC, EVEN_D)
        if NUM_DC > 3:
            kt = load_rows(K, t, t_ok, 3 * BLOCK_DC, D, stride_kn, stride_kd, BLOCK_DC, EVEN_D)
            store_rows(A, acc3 * inv_l[:, None] - kt.to(tl.float32), rows, row_ok, 3 * BLOCK_DC, D,
                       stride_an, stride_ad, BLOCK_DC, EVEN_D)
    store_stats(LOSS, LSE2, LSUM, m_i, l_i, pos2, rows, row_ok, N, PARTIAL)


_fwd = triton.heuristics({"EVEN_M": lambda a: a["M"] % a["BLOCK_N"] == 0,
                          "PARTIAL": lambda a: a["NUM_SPLITS"] > 1})(_fwd_kernel)


@triton.jit(do_not_specialize=["N", "M", "N_KEY", "M_KEY", "NUM_SPLITS"])  # sizes: see _fwd_kernel
def _lse_kernel(Q, K, BIAS, TGT, LOSS, LSE2, LSUM,
                N, M, D,
                stride_qn, stride_qd, stride_kn, stride_kd,
                scale2,
                N_KEY, M_KEY, NUM_SPLITS,
                PARTIAL: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RESIDENT: tl.constexpr,
                DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """The forward without dQ for D of several chunks: a matmul's inner loop over D in BLOCK_K
    columns (pipelined: only BLOCK_K-wide q and k tiles in shared memory, whatever D is) feeding
    the online LSE of _fwd_kernel. RESIDENT is unused (both tiles stream; kept so that every stage
    takes the rows of the one table format)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    t = tl.load(TGT + rows, mask=row_ok, other=-1).to(tl.int64)
    pos2 = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    lo, hi = split_range(M, NUM_SPLITS, BLOCK_N, PARTIAL)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_K):
            qc = load_rows(Q, rows, row_ok, d0, D, stride_qn, stride_qd, BLOCK_K, EVEN_K)
            kc = load_rows(K, cols, col_ok, d0, D, stride_kn, stride_kd, BLOCK_K, EVEN_K)
            s = mma(qc, tl.trans(kc), s, DOT_FP32, IEEE)
        s = s * scale2
        b = tl.load(BIAS + cols, mask=col_ok, other=0.0)
        s = s + b[None, :] * LOG2E
        pos2 += tl.sum(tl.where(cols[None, :] == t[:, None], s, 0.0), 1)
        if not EVEN_M:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    store_stats(LOSS, LSE2, LSUM, m_i, l_i, pos2, rows, row_ok, N, PARTIAL)


_lse = triton.heuristics({"EVEN_M": lambda a: a["M"] % a["BLOCK_N"] == 0,
                          "PARTIAL": lambda a: a["NUM_SPLITS"] > 1})(_lse_kernel)


@triton.jit(do_not_specialize=["N", "NUM_SPLITS"])
def _lse_combine_kernel(LOSS, LSE2, LSUM, N, NUM_SPLITS, BLOCK: tl.constexpr):
    """Merges the partial (max m_s, sum l_s, target logit) of the S chunks of a split forward, [S, N]
    each (log2 domain; a chunk without a finite logit has m_s = -1e30, l_s = 0), into the row LSE and
    loss, in place: LSE2[:N] and LOSS[:N] (the first chunk's rows) become the results."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    m = tl.full([BLOCK], -1.0e30, tl.float32)
    for s in range(0, NUM_SPLITS):
        m = tl.maximum(m, tl.load(LSE2 + s * N + rows, mask=ok, other=-1.0e30))
    l_i = tl.zeros([BLOCK], tl.float32)
    pos2 = tl.zeros([BLOCK], tl.float32)
    for s in range(0, NUM_SPLITS):
        l_i += tl.load(LSUM + s * N + rows, mask=ok, other=0.0) * tl.exp2(
            tl.load(LSE2 + s * N + rows, mask=ok, other=-1.0e30) - m)
        pos2 += tl.load(LOSS + s * N + rows, mask=ok, other=0.0)
    lse2 = m + tl.log2(l_i)
    tl.store(LSE2 + rows, lse2, mask=ok)
    tl.store(LOSS + rows, (lse2 - pos2) * LN2, mask=ok)


COMBINE_BLOCK = 1024


def lse_block_k(d: int, block_dc: int, num_dc: int, itemsize: int) -> int:
    """The D step of _lse_kernel: 128-byte rows of q and k per step on a GPU (the width shared memory
    is swizzled by); under the interpreter the D chunk, so that small tests take several steps."""
    return block_dc if interpreting() else min(block_dc, 128 // itemsize)


def forward_launch(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                   tau: float, compute_dq: bool, *, block_m: int | None = None, block_n: int | None = None,
                   block_dc: int | None = None, resident: bool = True, split=None):
    """(Launch, (loss [N] fp32, lse2 [N] fp32 (log2 domain), A [N, D] fp32 or None)) for inputs made
    canonical by ``triton_op.canonical_inputs``. Tiles pinned by ``block_m``/``block_n`` (and
    ``resident``) skip the autotuner; on a GPU they must name a row of the table. ``split`` ("off",
    "auto", an S; None: triton_config.split_mode) cuts the k side into S chunks when the forward has
    no dQ accumulator: an [S, N] launch of partials, then the combine kernel (``Launch.after``)."""
    n, d = q.shape
    m = k.shape[0]
    bdc, ndc, even_d = d_layout(d, block_dc)
    interp = interpreting()
    dclass, size = d_class(bdc, ndc), q.element_size()
    stage = "fwd" if compute_dq else "lse"  # without the dQ accumulator: a table of its own
    pin = block_m is not None or block_n is not None
    if interp:
        kw = dict(BLOCK_M=block_m or INTERPRET_BLOCK, BLOCK_N=block_n or INTERPRET_BLOCK, RESIDENT=resident)
    elif pin:
        kw = pinned(stage, dclass, size, block_m, block_n, resident)
    else:  # autotuned: S is chosen for the table's first row (the grid follows the tuned BLOCK_M)
        kw = config_kwargs(table(stage, dclass, size)[0])
    splits = 1 if compute_dq else num_splits(split_mode(split), n, m, kw["BLOCK_M"], kw["BLOCK_N"],
                                             sms=sm_count(q.device))
    loss = torch.empty(splits * n, dtype=torch.float32, device=q.device)
    lse2 = torch.empty(splits * n, dtype=torch.float32, device=q.device)
    lsum = torch.empty(splits * n, dtype=torch.float32, device=q.device) if splits > 1 else lse2
    a = torch.empty((n, d), dtype=torch.float32, device=q.device) if compute_dq else loss
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    scale2, keys = 1.4426950408889634 / tau, (next_pow2(n), next_pow2(m), splits)
    if compute_dq or ndc == 1:
        args = (q, k, bias, target, loss, lse2, a, lsum, n, m, d, *strides,
                a.stride(0) if compute_dq else 0, a.stride(1) if compute_dq else 0, scale2, 1.0 / tau, *keys)
        consts = dict(COMPUTE_DQ=compute_dq, EVEN_D=even_d, NUM_DC=ndc,
                      BLOCK_DC=bdc, DOT_FP32=interp, IEEE=q.dtype == torch.float32)
        kern = _fwd
    else:  # several D chunks, no dQ accumulator: the D-loop kernel
        bk = lse_block_k(d, bdc, ndc, q.element_size())
        args = (q, k, bias, target, loss, lse2, lsum, n, m, d, *strides, scale2, *keys)
        consts = dict(EVEN_K=d % bk == 0, BLOCK_K=bk, DOT_FP32=interp, IEEE=q.dtype == torch.float32)
        kern = _lse
    outs = (loss[:n], lse2[:n], (a if compute_dq else None))
    after = None
    if splits > 1:
        after = lambda: _lse_combine_kernel[(triton.cdiv(n, COMBINE_BLOCK),)](  # noqa: E731
            loss, lse2, lsum, n, splits, BLOCK=COMBINE_BLOCK)
    if interp or pin:
        return Launch(kern, (triton.cdiv(n, kw["BLOCK_M"]), splits), args, dict(consts, **kw), after), outs
    kern = tuned(kern, stage, dclass, size)
    return Launch(kern, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits), args, consts, after), outs


def triton_forward(q, k, bias, target, tau: float, compute_dq: bool, **tiles):
    """Returns (loss [N] fp32, lse2 [N] fp32 (log2 domain), A [N, D] fp32 or None)."""
    launch, outs = forward_launch(q, k, bias, target, tau, compute_dq, **tiles)
    launch()
    return outs
