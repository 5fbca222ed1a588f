"""Pure-torch reference of the in-batch softmax: slow, obviously right, what the tests trust.

loss_i = LSE_j(q_i . k_j / tau + b_j) - (q_i . k_{t_i} / tau + b_{t_i})
"""

from __future__ import annotations

import torch


def inbatch_softmax_reference(q: torch.Tensor, k: torch.Tensor, target: torch.Tensor, *,
                              bias: torch.Tensor | None = None, temperature: float = 1.0,
                              row_mask: torch.Tensor | None = None,
                              reduction: str = "mean") -> torch.Tensor:
    """Materialises the full [N, M] logits in float32 (or float64 for float64 inputs)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = (q.to(dtype) @ k.to(dtype).T) / temperature
    if bias is not None:
        logits = logits + bias.to(dtype)[None, :]
    lse = torch.logsumexp(logits, dim=1)
    t = target.long().clamp(0, k.shape[0] - 1)  # rows masked out may carry any target
    pos = logits.gather(1, t[:, None]).squeeze(1)
    loss = lse - pos
    if row_mask is not None:
        loss = torch.where(row_mask, loss, torch.zeros((), dtype=dtype, device=loss.device))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    count = row_mask.sum() if row_mask is not None else torch.tensor(loss.shape[0], device=loss.device)
    return loss.sum() / count.clamp_min(1).to(dtype)
