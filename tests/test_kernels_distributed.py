"""Global negatives across 2 gloo ranks equal one process over the concatenated batch: same
summed loss, same gradients for rows, items (summed over an item's copies) and biases."""

from __future__ import annotations

import os

import pytest
import torch
from spawn_ranks import run_ranks

N_ITEMS, D, ROWS, TAU = 30, 8, 11, 0.2


def _world(seed=0):
    """Per rank: global item ids of its unique items (overlapping across ranks), rows, targets."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(N_ITEMS, D, generator=g, dtype=torch.float64)
    bias = torch.rand(N_ITEMS, generator=g, dtype=torch.float64) * 3
    ranks = []
    for r in range(2):
        ids = torch.randperm(N_ITEMS, generator=g)[: 14 + 3 * r]  # rank sizes differ
        target = torch.randint(0, ids.numel(), (ROWS,), generator=g)
        q = torch.randn(ROWS, D, generator=g, dtype=torch.float64)
        mask = torch.rand(ROWS, generator=g) > 0.2
        ranks.append((ids, target, q, mask))
    return emb, bias, ranks


def _worker(rank, port, out_dir, impl):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from transrec.kernels import inbatch_softmax
    from transrec.kernels.distributed import global_candidates

    dist.init_process_group("gloo", rank=rank, world_size=2)
    emb, bias, ranks = _world()
    ids, target, q, mask = ranks[rank]
    k = emb[ids].clone().requires_grad_(True)  # this rank's copies of its items
    b = bias[ids].clone().requires_grad_(True)
    q = q.clone().requires_grad_(True)
    k_all, b_all, t_all = global_candidates(k, ids, target, b)
    loss = inbatch_softmax(q, k_all, t_all, bias=b_all, temperature=TAU, row_mask=mask, reduction="sum",
                           impl=impl)
    loss.backward()
    torch.save({"loss": loss.detach(), "dq": q.grad, "dk": k.grad, "db": b.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["chunked"])
def test_two_ranks_match_one_process(tmp_path, impl):
    run_ranks(_worker, str(tmp_path), impl, timeout=90)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # One process over the concatenated batch: candidates = union of the ranks' items, once each.
    from transrec.kernels import inbatch_softmax

    emb, bias, ranks = _world()
    union = torch.unique(torch.cat([r[0] for r in ranks]))
    where = {int(i): j for j, i in enumerate(union)}
    q = torch.cat([r[2] for r in ranks]).requires_grad_(True)
    target = torch.tensor([where[int(r[0][t])] for r in ranks for t in r[1]])
    mask = torch.cat([r[3] for r in ranks])
    k = emb[union].clone().requires_grad_(True)
    b = bias[union].clone().requires_grad_(True)
    loss = inbatch_softmax(q, k, target, bias=b, temperature=TAU, row_mask=mask, reduction="sum",
                           impl="torch")
    loss.backward()

    torch.testing.assert_close(res[0]["loss"] + res[1]["loss"], loss.detach())
    torch.testing.assert_close(torch.cat([res[0]["dq"], res[1]["dq"]]), q.grad)
    dk = torch.zeros_like(k.grad)
    db = torch.zeros_like(b.grad)
    for (ids, *_), out in zip(ranks, res):  # an item's gradient = sum over its copies
        idx = torch.tensor([where[int(i)] for i in ids])
        dk.index_add_(0, idx, out["dk"])
        db.index_add_(0, idx, out["db"])
    torch.testing.assert_close(dk, k.grad)
    torch.testing.assert_close(db, b.grad)
    assert len(set(ranks[0][0].tolist()) & set(ranks[1][0].tolist())) > 0  # duplicates were exercised
