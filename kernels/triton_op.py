"""autograd.Function tying the Triton forward and backward of the in-batch softmax together.

Forward saves q, k, bias, target, the row LSE (fp32, [N]) and, when q needs a gradient, A (fp32,
[N, D], see triton_forward.py). Backward: dq = (g / tau) * A (one elementwise op), dK and d(bias)
from the dK pass (triton_backward.py). Extra memory beyond inputs and gradients: 4 N (D + 2) bytes.
"""

from __future__ import annotations

import torch
from transrec.kernels.triton_backward import triton_backward_dk
from transrec.kernels.triton_forward import triton_forward


class _TritonLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, bias, target, tau, tiles):
        loss, lse2, a = triton_forward(q, k, bias, target, tau, compute_dq=bool(ctx.needs_input_grad[0]),
                                       **tiles)
        ctx.save_for_backward(q, k, bias, target, lse2, a)
        ctx.tau, ctx.tiles = tau, tiles
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        q, k, bias, target, lse2, a = ctx.saved_tensors
        tau = ctx.tau
        need_q, need_k, need_b = ctx.needs_input_grad[:3]
        g = grad_loss.to(torch.float32).contiguous()
        dq = dk = db = None
        if need_q:
            dq = torch.mul(a, (g * (1.0 / tau))[:, None]).to(q.dtype)
        if need_k or need_b:
            dk, db = triton_backward_dk(q, k, bias, target, lse2, g, tau, bool(need_k), bool(need_b),
                                        **ctx.tiles)
        return dq, dk, db, None, None, None


def inbatch_softmax_triton_rows(q, k, target, *, bias=None, temperature=1.0, block_m=None, block_n=None,
                                block_dc=None, resident=True):
    """Per-row loss [N] float32 by the fused Triton kernels (CUDA, or TRITON_INTERPRET=1).

    ``block_m``/``block_n``/``block_dc`` pin the tiles (tests), ``resident`` whether the
    loop-invariant tile stays in registers on that pinned path; by default they are autotuned on a
    GPU and fixed small under the interpreter."""
    if not q.is_cuda:
        from transrec.kernels.triton_config import interpreting

        if not interpreting():
            from transrec.kernels.validate import KernelInputError

            raise KernelInputError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    target = target.contiguous()
    bias = bias.contiguous() if bias is not None else None
    tiles = dict(block_m=block_m, block_n=block_n, block_dc=block_dc, resident=resident)
    return _TritonLinearCE.apply(q, k, bias, target, float(temperature), tiles)
