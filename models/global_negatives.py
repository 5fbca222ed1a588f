"""Global negatives across data-parallel ranks: every rank scores its own rows against the item
embeddings of all ranks (``model.loss.negatives=global``).

:func:`all_gather_with_grad` concatenates a tensor's shards from all ranks (sizes may differ) and,
in backward, hands each rank the summed gradient of its own shard (every rank's loss uses every
shard). :func:`gather_keys` gathers a batch's keys, item ids and log-popularity with one exchange of
sizes; the loss then keeps the first copy of an item present on several ranks (``first_copy``), so
the sum over ranks of the per-rank summed losses equals the summed loss of one process over the
concatenated batch, and so do the gradients (copies are the same function of the shared encoders,
whose gradients data parallelism sums anyway).

Works with any torch.distributed backend (gloo on the CPU, NCCL on GPUs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _sizes(n: int, device, group) -> list[int]:
    world = dist.get_world_size(group)
    local = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return [int(s) for s in out]


def _gather_padded(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenation over ranks of ``x`` ([n_r, ...], n_r = sizes[r]) through one padded all_gather."""
    top = max(sizes)
    pad = x.new_zeros((top,) + tuple(x.shape[1:]))
    pad[: x.shape[0]] = x
    out = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(out, pad.contiguous(), group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        return _gather_padded(x.detach(), sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]].clone(), None, None


def all_gather_with_grad(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` [n_r, ...] over the ranks of ``group`` (rank order); the gradient flows back
    to each rank's own shard, summed over all ranks' uses."""
    if sizes is None:
        sizes = _sizes(x.shape[0], x.device, group)
    return _AllGatherWithGrad.apply(x, sizes, group)


def gather_ragged(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenation over ranks of ``x`` [n_r, ...] whose first sizes differ (no gradient)."""
    return _gather_padded(x, _sizes(x.shape[0], x.device, group), group)


def gather_keys(keys: torch.Tensor, items: torch.Tensor, log_q: torch.Tensor, group=None):
    """(keys of every rank with gradient, their item ids, their log q, this rank's offset in them):
    the ``GatherFn`` the loss uses for global negatives by default."""
    sizes = _sizes(keys.shape[0], keys.device, group)
    offset = sum(sizes[: dist.get_rank(group)])
    return (all_gather_with_grad(keys, group, sizes), _gather_padded(items, sizes, group),
            _gather_padded(log_q.detach(), sizes, group), offset)
