"""Global negatives across data-parallel ranks: every rank scores its own rows against the items of
all ranks.

``all_gather_with_grad`` concatenates a tensor's shards from all ranks (sizes may differ) and, in
backward, hands each rank the summed gradient of its own shard (every rank's loss uses every shard).
``global_candidates`` builds the global candidate set from the local unique items: an item present
on several ranks counts once in the softmax (its later copies get bias -inf) and every row's target
points at the first copy. With these, the sum over ranks of the per-rank summed losses equals the
summed loss of one process over the concatenated batch, and the gradient reaching an item's
embedding through all its copies equals that process's gradient (copies are identical functions of
the shared encoder, whose gradients data parallelism sums anyway).

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


def global_candidates(k: torch.Tensor, item_ids: torch.Tensor, target: torch.Tensor,
                      bias: torch.Tensor | None = None, group=None):
    """Global candidate set for the in-batch softmax with negatives from every rank.

    k [M_r, D] local unique item embeddings, item_ids [M_r] their global ids (unique on this rank),
    target [N_r] indices into the local k, bias [M_r] or None. Returns (k_all [M, D], bias_all [M],
    target_all [N_r]) to pass to ``inbatch_softmax`` with the local q: bias_all is -inf at every
    copy of an item after its first (bias 0 where none was given), target_all indexes k_all.
    """
    if item_ids.shape != (k.shape[0],):
        raise ValueError(f"item_ids must have shape [{k.shape[0]}] (one id per row of k), got "
                         f"{tuple(item_ids.shape)}")
    sizes = _sizes(k.shape[0], k.device, group)
    rank = dist.get_rank(group)
    k_all = all_gather_with_grad(k, group, sizes)
    ids_all = _gather_padded(item_ids, sizes, group)
    total = ids_all.shape[0]
    _, inverse = torch.unique(ids_all, return_inverse=True)
    pos = torch.arange(total, device=ids_all.device)
    first = torch.full((int(inverse.max()) + 1,), total, dtype=torch.int64, device=ids_all.device)
    first = first.scatter_reduce(0, inverse, pos, reduce="amin")
    first_of = first[inverse]  # [M]: position of the first copy of each entry's item
    is_first = first_of == pos
    if bias is None:
        b_all = torch.zeros(total, dtype=k.dtype if k.is_floating_point() else torch.float32, device=k.device)
    else:
        b_all = all_gather_with_grad(bias, group, sizes)
    b_all = torch.where(is_first, b_all, torch.full((), float("-inf"), dtype=b_all.dtype, device=k.device))
    offset = sum(sizes[:rank])
    target_all = first_of[offset + target.long().clamp(0, k.shape[0] - 1)]  # masked rows: any value
    return k_all, b_all, target_all
