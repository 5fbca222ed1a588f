"""In-batch softmax over the batch's unique items (a linear cross-entropy) behind one dispatcher.

    loss_i = LSE_j(q_i.k_j / tau + b_j) - (q_i.k_{t_i} / tau + b_{t_i})

q [N, D] user states, k [M, D] unique item embeddings, t_i the positive item of row i, b [M] an
optional logit bias (b = -log popularity for the logQ correction), rows with ``row_mask`` False
dropped (padding). Model code calls :func:`inbatch_softmax` only and never imports triton.

Implementations (``impl``):
  "triton"  fused Triton kernels (kernels/triton_*.py): never writes the N x M logits; CUDA, or
            the CPU under TRITON_INTERPRET=1 (slow, for tests)
  "chunked" torch, ``chunk`` rows at a time, peak memory O(chunk x M) (kernels/chunked.py)
  "torch"   the plain reference materialising all logits in float32 (kernels/reference.py)
  "auto"    triton on CUDA (fp16/bf16/fp32, D <= MAX_D), chunked elsewhere

The Triton kernels come in two designs (kernels/triton_config.py, ``DESIGN`` per D class,
$TRANSREC_TRITON_DESIGN to force one): "fused" forms dQ in the forward (8 N M D flops, an fp32
[N, D] buffer saved), "split" recomputes the logits in a dQ pass (10 N M D flops, no buffer, one
accumulator per kernel). ``benchmarks/kernel_bench.py --sweep`` times both on a card.

Split-M (flash-decoding style; opt-in: ``split`` of inbatch_softmax_triton_rows, $TRANSREC_TRITON_SPLIT
= off | auto | S, triton_config.SPLIT_DEFAULT "off" until a card has timed it): a kernel launches one
program per BLOCK rows it owns, so 8192 rows in 64-row tiles are 128 programs on 132 SMs. Where the
programs would not fill two waves, the streamed side is cut into S chunks of whole tiles (S from the
SM count, triton_config.split_count) and each program writes partial results: the LSE forward its
chunk's (max, sum, target logit) into [S, N] fp32, merged by a one-launch combine kernel; the dQ
and dK passes fp32 partial dQ [N, S, D] / dK [M, S, D] (no rescaling: the LSE is known), summed over
S by torch, deterministic and without atomics; the buffers are capped (SPLIT_BUFFER_BYTES), never
N x M. The fused forward does not split: its A accumulator would need a per-chunk rescaled
[S, N, D] partial in the forward; in that design only the dK pass splits.
"""

from __future__ import annotations

import torch

from transrec.kernels.chunked import inbatch_softmax_chunked_reduced, inbatch_softmax_chunked_rows
from transrec.kernels.interface import IMPLS, REDUCTIONS, KernelInputError
from transrec.kernels.reference import inbatch_softmax_reference
from transrec.kernels.triton_config import LAUNCH_DTYPES, MAX_D
from transrec.kernels.validate import check_inputs, compute_dtype


def reduce_rows(loss: torch.Tensor, row_mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Mask and reduce per-row losses; the mean's normaliser stays on the device (no host sync)."""
    if row_mask is not None:
        loss = torch.where(row_mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if row_mask is None:
        return loss.sum() / loss.shape[0]
    return loss.sum() / row_mask.sum().clamp_min(1).to(loss.dtype)


def auto_impl(device_type: str, dtype: torch.dtype, d: int) -> str:
    """What ``impl="auto"`` runs: Triton on CUDA where a launch exists for the dtype and width
    (``LAUNCH_DTYPES``, D <= ``MAX_D``), the chunked torch path everywhere else."""
    return "triton" if device_type == "cuda" and dtype in LAUNCH_DTYPES and d <= MAX_D else "chunked"


def inbatch_softmax(q, k, target, *, bias=None, temperature=1.0, row_mask=None, reduction="mean",
                    impl="auto", chunk_size=None):
    """loss_i = LSE_j(q_i.k_j/tau + b_j) - (q_i.k_{t_i}/tau + b_{t_i}); rows with row_mask False drop out.

    q and k may differ in floating dtype (as under autocast): both are cast to
    :func:`~transrec.kernels.validate.compute_dtype` first. Returns a float32 loss (float64 for
    float64 inputs): a scalar for reduction "mean" (over the
    unmasked rows) or "sum", a [N] vector (masked rows 0) for "none". Gradients flow to q, k and
    bias. ``chunk_size`` (rows per chunk) applies to impl "chunked" only. Bad input raises one
    :class:`KernelInputError` (a ``ValueError``).
    """
    tau = check_inputs(q, k, target, bias, temperature, row_mask, reduction, impl)
    dtype = compute_dtype(q, k)  # mixed dtypes (autocast) meet in one; the casts carry gradients
    q, k = q.to(dtype), k.to(dtype)
    if impl == "auto":
        impl = auto_impl(q.device.type, q.dtype, q.shape[1])
    # Each implementation sets its own precision (fp32 accumulation, fp32 LSE): autocast stays out.
    with torch.autocast(q.device.type, enabled=False):
        return _dispatch(impl, q, k, target, bias, tau, row_mask, reduction, chunk_size)


def _dispatch(impl, q, k, target, bias, tau, row_mask, reduction, chunk_size):
    if impl == "torch":
        return inbatch_softmax_reference(q, k, target, bias=bias, temperature=tau, row_mask=row_mask,
                                         reduction=reduction)
    if impl == "chunked":
        if reduction != "none":  # gradients formed in the forward: 6 N M D flops instead of 8
            return inbatch_softmax_chunked_reduced(q, k, target, bias=bias, temperature=tau,
                                                   row_mask=row_mask, reduction=reduction,
                                                   chunk_size=chunk_size)
        rows = inbatch_softmax_chunked_rows(q, k, target, bias=bias, temperature=tau,
                                            chunk_size=chunk_size)
    else:
        from transrec.kernels.triton_op import inbatch_softmax_triton_rows  # optional: triton

        rows = inbatch_softmax_triton_rows(q, k, target, bias=bias, temperature=tau)
    return reduce_rows(rows, row_mask, reduction)


__all__ = ["IMPLS", "REDUCTIONS", "KernelInputError", "auto_impl", "inbatch_softmax",
           "inbatch_softmax_reference", "reduce_rows"]
