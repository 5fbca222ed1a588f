"""Chunked torch in-batch softmax: peak memory O(chunk x M) in forward and backward.

Rows of q are processed ``chunk`` at a time. With s_ij = q_i.k_j/tau + b_j, p_ij = exp(s_ij - LSE_i),
g_i the gradient reaching loss_i and dS_ij = g_i (p_ij - [j = t_i]):

    dq_i = (1/tau) sum_j dS_ij k_j      dk_j = (1/tau) sum_i dS_ij q_i      db_j = sum_i dS_ij

Two schedules, both accumulating dk and db in float32 (float64 for float64 inputs):

* per-row losses (reduction "none"): forward keeps only the row LSE, backward recomputes each
  chunk's logits once g is known: 8 N M D flops for forward+backward.
* a reduced loss (reduction "mean"/"sum", what training uses): g_i = G * w_i with w_i known in the
  forward (1 or the row mask, over the row count for "mean") and G the one scalar reaching the
  loss. The forward computes each chunk's logits once and turns them into dS/G on the spot, so
  the gradients of w-weighted rows are ready when the forward ends (backward scales them by G):
  6 N M D flops, the same as materialising all logits, with the O(chunk x M) peak kept. Done only
  when autograd will need them (grad mode on, an input requiring grad); it keeps dq [N, D],
  dk [M, D] and db [M] (the size of the gradients) instead of the LSE.
"""

from __future__ import annotations

import torch

# Elements of one chunk's [chunk, M] logits (float32: 16 MiB).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(n: int, m: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(n, int(chunk_size)))
    return max(1, min(n, DEFAULT_CHUNK_ELEMENTS // max(m, 1)))


def _logits(qc: torch.Tensor, kf: torch.Tensor, bf: torch.Tensor | None, tau: float) -> torch.Tensor:
    """One chunk's s = qc kf^T / tau + b, in the accumulation dtype (a fresh tensor, safe to modify)."""
    s = qc @ kf.T
    s.mul_(1.0 / tau)
    if bf is not None:
        s.add_(bf)
    return s


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, bias, target, tau, chunk):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        n = q.shape[0]
        kf = k.to(acc)
        bf = bias.to(acc) if bias is not None else None
        t = target.long().clamp(0, k.shape[0] - 1)  # masked rows may carry any target
        loss = torch.empty(n, dtype=acc, device=q.device)
        lse = torch.empty(n, dtype=acc, device=q.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logits = _logits(q[s:e].to(acc), kf, bf, tau)
            lse[s:e] = torch.logsumexp(logits, dim=1)
            loss[s:e] = lse[s:e] - logits.gather(1, t[s:e, None]).squeeze(1)
        ctx.save_for_backward(q, k, bias, t, lse)
        ctx.tau, ctx.chunk = tau, chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        with torch.autocast(grad_loss.device.type, enabled=False):  # a backward called under autocast
            return _ChunkedLinearCE._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        q, k, bias, t, lse = ctx.saved_tensors
        tau, chunk = ctx.tau, ctx.chunk
        need_q, need_k, need_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        n, m = q.shape[0], k.shape[0]
        kf = k.to(acc)
        bf = bias.to(acc) if bias is not None else None
        g = grad_loss.to(acc)
        dq = torch.empty_like(q) if need_q else None
        dk = torch.zeros(k.shape, dtype=acc, device=k.device) if need_k else None
        db = torch.zeros(m, dtype=acc, device=k.device) if need_b else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            qc = q[s:e].to(acc)
            ds = _logits(qc, kf, bf, tau)
            ds.sub_(lse[s:e, None]).exp_()  # p
            ds.scatter_add_(1, t[s:e, None], torch.full((e - s, 1), -1.0, dtype=acc, device=q.device))
            ds.mul_(g[s:e, None])  # dS
            if need_q:
                dq[s:e] = (ds @ kf).mul_(1.0 / tau).to(q.dtype)
            if need_k:
                dk.addmm_(ds.T, qc, alpha=1.0 / tau)
            if need_b:
                db.add_(ds.sum(0))
        return (dq, dk.to(k.dtype) if need_k else None, db.to(bias.dtype) if need_b else None,
                None, None, None)


def inbatch_softmax_chunked_rows(q, k, target, *, bias=None, temperature=1.0, chunk_size=None):
    """Per-row loss [N] (float32; float64 for float64 inputs), computed ``chunk_size`` rows at a time."""
    chunk = _chunk_rows(q.shape[0], k.shape[0], chunk_size)
    return _ChunkedLinearCE.apply(q, k, bias, target, float(temperature), chunk)


class _ChunkedLinearCEReduced(torch.autograd.Function):
    """sum_i w_i loss_i with the gradients computed in the forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, bias, target, weights, tau, chunk, with_grad):
        acc = weights.dtype
        n, m = q.shape[0], k.shape[0]
        need_q, need_k, need_b = (with_grad and x for x in ctx.needs_input_grad[:3])
        kf = k.to(acc)
        bf = bias.to(acc) if bias is not None else None
        t = target.long().clamp(0, m - 1)  # rows of weight 0 may carry any target
        total = torch.zeros((), dtype=acc, device=q.device)
        dq = torch.empty(q.shape, dtype=acc, device=q.device) if need_q else None
        dk = torch.zeros(k.shape, dtype=acc, device=k.device) if need_k else None
        db = torch.zeros(m, dtype=acc, device=k.device) if need_b else None
        zero = torch.zeros((), dtype=acc, device=q.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            qc = q[s:e].to(acc)
            w = weights[s:e]
            logits = _logits(qc, kf, bf, tau)
            lse = torch.logsumexp(logits, dim=1)
            rows = lse - logits.gather(1, t[s:e, None]).squeeze(1)
            total += torch.where(w != 0, rows * w, zero).sum()  # a weight-0 row never leaks a nan/inf
            if not (need_q or need_k or need_b):
                continue
            ds = logits.sub_(lse[:, None]).exp_()  # p, in place of the logits
            ds.scatter_add_(1, t[s:e, None], torch.full((e - s, 1), -1.0, dtype=acc, device=q.device))
            ds.mul_(w[:, None])  # dS / G
            if need_q:
                torch.mm(ds, kf, out=dq[s:e]).mul_(1.0 / tau)
            if need_k:
                dk.addmm_(ds.T, qc, alpha=1.0 / tau)
            if need_b:
                db.add_(ds.sum(0))
        ctx.save_for_backward(dq, dk, db)
        ctx.dtypes = (q.dtype, k.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dq, dk, db = ctx.saved_tensors
        dtq, dtk, dtb = ctx.dtypes
        scale = lambda x, dt: None if x is None else (x * grad_total.to(x.dtype)).to(dt)
        return scale(dq, dtq), scale(dk, dtk), scale(db, dtb), None, None, None, None, None


def inbatch_softmax_chunked_reduced(q, k, target, *, bias=None, temperature=1.0, row_mask=None,
                                    reduction="mean", chunk_size=None):
    """The "mean" or "sum" loss over the rows with ``row_mask`` True, computed ``chunk_size`` rows at
    a time with the gradients formed during the forward (float32; float64 for float64 inputs)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n = q.shape[0]
    if row_mask is None:
        weights = torch.full((n,), 1.0 / n if reduction == "mean" else 1.0, dtype=acc, device=q.device)
    else:
        weights = row_mask.to(acc)
        if reduction == "mean":
            weights = weights / weights.sum().clamp_min(1)
    with_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, bias))
    chunk = _chunk_rows(n, k.shape[0], chunk_size)
    return _ChunkedLinearCEReduced.apply(q, k, bias, target, weights, float(temperature), chunk, with_grad)
