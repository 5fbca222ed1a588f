"""autograd.Function tying the Triton forward and backward of the in-batch softmax together.

Two designs (``triton_config.DESIGNS``, chosen per D class by ``triton_config.design``):

  fused  forward saves q, k, bias, target, the row LSE (fp32, [N]) and, when q needs a gradient, A
         (fp32, [N, D], see triton_forward.py); backward: dq = (g / tau) * A (one elementwise op),
         dK and d(bias) from the dK pass. Extra memory beyond inputs and gradients: 4 N (D + 2) B.
  split  forward saves the row LSE only; backward: the dQ pass and the dK pass
         (triton_backward.py), each recomputing the logits. Extra memory: 8 N B.

Split-M (``split``, opt-in): the LSE forward, the dQ pass and the dK pass may each cut the streamed
side into S chunks when their programs would not fill the card (triton_config.num_splits); their
partial buffers ([S, N] fp32 in the forward, [N, S, D] / [M, S, D] fp32 in backward) live for one
kernel call each, never N x M.
"""

from __future__ import annotations

import torch

from transrec.kernels.interface import KernelInputError
from transrec.kernels.triton_backward import triton_backward_dk, triton_backward_dq
from transrec.kernels.triton_config import (
    LAUNCH_DTYPES,
    MAX_D,
    d_class,
    d_layout,
    design,
    interpreting,
    split_mode,
)
from transrec.kernels.triton_forward import triton_forward


class _TritonLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, bias, target, tau, tiles, design_):
        fused = design_ == "fused"
        loss, lse2, a = triton_forward(q, k, bias, target, tau,
                                       compute_dq=fused and bool(ctx.needs_input_grad[0]), **tiles)
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
        if need_q and a is not None:  # fused: A from the forward
            dq = torch.mul(a, (g * (1.0 / tau))[:, None]).to(q.dtype)
        elif need_q:  # split: the dQ pass
            dq = triton_backward_dq(q, k, bias, target, lse2, g, tau, **ctx.tiles)
        if need_k or need_b:
            dk, db = triton_backward_dk(q, k, bias, target, lse2, g, tau, bool(need_k), bool(need_b),
                                        **ctx.tiles)
        return dq, dk, db, None, None, None, None


def _aligned(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def canonical_inputs(q, k, target, bias):
    """The one form in which the kernels receive their inputs, so that the set of compiled
    specialisations is small and known (``sm90_check`` builds its inputs with this function too):
    q and k contiguous and 16-byte aligned in one of ``LAUNCH_DTYPES``, target int64, bias float32
    (autograd casts its gradient back; zeros without gradient when there is none), D at most
    ``MAX_D``. Copies happen only for inputs not
    already in that form."""
    if q.dtype not in LAUNCH_DTYPES:
        raise KernelInputError(f"impl='triton' takes {', '.join(str(t)[6:] for t in LAUNCH_DTYPES)} inputs, "
                               f"got {str(q.dtype)[6:]} (impl='chunked' takes any floating dtype)")
    if q.shape[1] > MAX_D:
        raise KernelInputError(f"impl='triton' takes embeddings of at most {MAX_D} columns, got "
                               f"{q.shape[1]} (impl='chunked' takes any size)")
    target = _aligned(target.to(torch.int64))
    # No bias is a bias of zeros: one [BLOCK_N] load per tile, and no switch (half the specialisations).
    if bias is None:
        bias = q.new_zeros(k.shape[0], dtype=torch.float32)
    bias = _aligned(bias.to(torch.float32))
    return _aligned(q), _aligned(k), target, bias


def inbatch_softmax_triton_rows(q, k, target, *, bias=None, temperature=1.0, block_m=None, block_n=None,
                                block_dc=None, resident=True, design=None, split=None):
    """Per-row loss [N] float32 by the fused Triton kernels (CUDA, or TRITON_INTERPRET=1).

    ``block_m``/``block_n``/``block_dc`` pin the tiles (tests), ``resident`` whether the
    loop-invariant tile stays in registers on that pinned path; by default they are autotuned on a
    GPU and fixed small under the interpreter. On a GPU pinned tiles must be a row of the autotune
    table (``triton_config.pinned``) and ``block_dc`` the default layout's. ``design`` ("fused" or
    "split") overrides ``triton_config.design``'s choice for this call, ``split`` ("off", "auto" or a
    number of chunks S) ``triton_config.split_mode``'s (split-M: see triton_config.SPLIT_DEFAULT)."""
    if not q.is_cuda and not interpreting():
        raise KernelInputError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    if block_dc is not None and not interpreting() and block_dc != d_layout(q.shape[1])[0]:
        raise KernelInputError(f"block_dc={block_dc} is not the layout of D={q.shape[1]} "
                               "(other D chunks are for TRITON_INTERPRET=1 tests)")
    split_mode(split)  # a bad value: one clear error before any launch
    q, k, target, bias = canonical_inputs(q, k, target, bias)
    tiles = dict(block_m=block_m, block_n=block_n, block_dc=block_dc, resident=resident, split=split)
    choice = design_of(q.shape[1], design, block_dc)
    return _TritonLinearCE.apply(q, k, bias, target, float(temperature), tiles, choice)


def design_of(d: int, override: str | None = None, block_dc: int | None = None) -> str:
    """The design a launch at embedding size ``d`` runs (``triton_config.design`` of its D class)."""
    return design(d_class(*d_layout(d, block_dc)[:2]), override)
