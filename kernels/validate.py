"""Input checks shared by every implementation of the in-batch softmax.

Every problem raises one :class:`~transrec.kernels.interface.KernelInputError` (a ``ValueError``)
whose one-line message names the argument and what is wrong with it.

Target range on CUDA: checking ``0 <= target < M`` on the host needs a device-to-host copy, which
would stall the training step. On CUDA the check is therefore queued on the device with
``torch._assert_async`` (no sync; a bad target aborts the next synchronising call with a device
assert naming the check). Set ``TRANSREC_KERNEL_CHECKS=sync`` to run the exact host-side check with
a ``ValueError`` on CUDA too (for debugging). On the CPU the exact check always runs (it is cheap).
Targets of rows masked out by ``row_mask`` are ignored (padding may carry any value).
"""

from __future__ import annotations

import math
import os

import torch

from transrec.kernels.interface import IMPLS, REDUCTIONS, KernelInputError


def check_inputs(q, k, target, bias, temperature, row_mask, reduction, impl) -> float:
    """Validate the arguments of ``inbatch_softmax``; returns the temperature as a float."""
    if reduction not in REDUCTIONS:
        raise KernelInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise KernelInputError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, t in (("q", q), ("k", k), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise KernelInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 2 or k.dim() != 2:
        raise KernelInputError(f"q and k must be 2-D [N, D] and [M, D], got {tuple(q.shape)} and "
                               f"{tuple(k.shape)}")
    n, d = q.shape
    m = k.shape[0]
    if k.shape[1] != d:
        raise KernelInputError(f"q and k disagree on the embedding size: q {tuple(q.shape)}, "
                               f"k {tuple(k.shape)}")
    if n == 0:
        raise KernelInputError("empty batch: q has no rows")
    if m == 0:
        raise KernelInputError("empty candidate set: k has no rows")
    if d == 0:
        raise KernelInputError("q and k have embedding size 0")
    if not q.is_floating_point() or not k.is_floating_point():
        raise KernelInputError(f"q and k must be floating tensors, got {q.dtype} and {k.dtype}")
    if q.device != k.device or target.device != q.device:
        raise KernelInputError(f"q, k and target must be on one device, got {q.device}, {k.device}, "
                               f"{target.device}")
    if target.shape != (n,):
        raise KernelInputError(f"target must have shape [{n}] (one item index per row of q), got "
                               f"{tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise KernelInputError(f"target must be an integer tensor, got {target.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (m,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise KernelInputError(f"bias must be a tensor of shape [{m}] (one value per row of k), "
                                   f"got {shape}")
        if not bias.is_floating_point() or bias.device != q.device:
            raise KernelInputError(f"bias must be a floating tensor on {q.device}, got {bias.dtype} "
                                   f"on {bias.device}")
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or row_mask.shape != (n,) or row_mask.dtype != torch.bool:
            desc = (f"{tuple(row_mask.shape)} {row_mask.dtype}" if isinstance(row_mask, torch.Tensor)
                    else type(row_mask).__name__)
            raise KernelInputError(f"row_mask must be a bool tensor of shape [{n}], got {desc}")
        if row_mask.device != q.device:
            raise KernelInputError(f"row_mask must be on {q.device}, got {row_mask.device}")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise KernelInputError("temperature must be a number (or a one-element tensor)")
        temperature = temperature.item()
    try:
        tau = float(temperature)
    except (TypeError, ValueError):
        raise KernelInputError(f"temperature must be a number, got {temperature!r}") from None
    if not math.isfinite(tau) or tau <= 0:
        raise KernelInputError(f"temperature must be finite and > 0, got {temperature!r}")
    _check_target_range(target, m, row_mask)
    return tau


def compute_dtype(q: torch.Tensor, k: torch.Tensor) -> torch.dtype:
    """The one dtype q and k are brought to when they differ.

    Under autocast that is autocast's dtype for the device, as autocast's own matmul would use (a
    model under ``torch.autocast(bf16)`` ends its user encoder in an fp32 LayerNorm while the item
    projection gives bf16); otherwise the promoted type, so no precision is lost.
    """
    if q.dtype == k.dtype:
        return q.dtype
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(q.dtype, k.dtype)


def _check_target_range(target, m, row_mask):
    valid = (target >= 0) & (target < m)
    if row_mask is not None:
        valid = valid | ~row_mask
    if target.device.type == "cuda" and os.environ.get("TRANSREC_KERNEL_CHECKS", "") != "sync":
        torch._assert_async(valid.all(), f"inbatch_softmax: a target is outside [0, {m})")
        return
    if not bool(valid.all()):
        bad = target[~valid]
        raise KernelInputError(f"target out of range: {bad.numel()} row(s) point outside [0, {m}) "
                               f"(e.g. {int(bad[0])})")
