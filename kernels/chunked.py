"""Chunked torch in-batch softmax: peak memory O(chunk x M) in forward and backward.

Rows of q are processed ``chunk`` at a time. Forward keeps only the row LSE (float32, or float64
for float64 inputs); backward recomputes each chunk's logits. With s_ij = q_i.k_j/tau + b_j,
p_ij = exp(s_ij - LSE_i), g_i the incoming gradient of loss_i and dS_ij = g_i (p_ij - [j = t_i]):

    dq_i = (1/tau) sum_j dS_ij k_j      dk_j = (1/tau) sum_i dS_ij q_i      db_j = sum_i dS_ij

dk and db are accumulated in float32 (float64 for float64 inputs) over the chunks.
"""

from __future__ import annotations

import torch

# Elements of one chunk's [chunk, M] logits (float32: 16 MiB).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(n: int, m: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(n, int(chunk_size)))
    return max(1, min(n, DEFAULT_CHUNK_ELEMENTS // max(m, 1)))


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
            logits = q[s:e].to(acc) @ kf.T
            logits.mul_(1.0 / tau)
            if bf is not None:
                logits.add_(bf)
            lse[s:e] = torch.logsumexp(logits, dim=1)
            loss[s:e] = lse[s:e] - logits.gather(1, t[s:e, None]).squeeze(1)
        ctx.save_for_backward(q, k, bias, t, lse)
        ctx.tau, ctx.chunk = tau, chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
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
            ds = qc @ kf.T
            ds.mul_(1.0 / tau)
            if bf is not None:
                ds.add_(bf)
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
