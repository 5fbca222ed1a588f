"""Convergence: a tiny two-tower model trained 20 steps gives the same loss curve with every
implementation of the in-batch softmax (catches what per-call unit tests miss: state, dtypes,
gradients that are right on average but wrong in a corner)."""

from __future__ import annotations

import torch

from transrec.kernels import inbatch_softmax


def _train(impl, *, users=96, items=60, feat=12, dim=16, batch=24, steps=20, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    user_x = torch.randn(users, feat, generator=g)
    taste = torch.randn(feat, items, generator=g)
    next_item = (user_x @ taste + 0.5 * torch.randn(users, items, generator=g)).argmax(1)
    pop = torch.bincount(next_item, minlength=items).double() + 1
    log_q = torch.log(pop / pop.sum()).float().to(device)
    user_x, next_item = user_x.to(device), next_item.to(device)

    torch.manual_seed(seed)
    tower = torch.nn.Sequential(torch.nn.Linear(feat, 32), torch.nn.GELU(), torch.nn.Linear(32, dim))
    tower = tower.to(device)
    table = torch.nn.Embedding(items, dim).to(device)
    opt = torch.optim.Adam(list(tower.parameters()) + list(table.parameters()), lr=3e-2)
    losses = []
    for step in range(steps):
        rows = torch.randperm(users, generator=torch.Generator().manual_seed(seed + step))[:batch].to(device)
        pos = next_item[rows]
        uniq, target = torch.unique(pos, return_inverse=True)  # in-batch candidates: unique positives
        mask = torch.arange(batch, device=device) % 7 != 3  # some padding rows
        q = tower(user_x[rows])
        k = table(uniq)
        loss = inbatch_softmax(q, k, target, bias=-log_q[uniq], temperature=0.2, row_mask=mask, impl=impl)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_loss_curves_agree_across_implementations():
    ref = _train("torch")
    assert ref[-5:].mean() < 0.8 * ref[:5].mean(), f"the tiny model did not learn: {ref.tolist()}"
    torch.testing.assert_close(_train("chunked"), ref, rtol=1e-4, atol=1e-5)
    # Triton: interpreted on a CPU-only machine; on CUDA (fp32, IEEE dots) where there is a GPU, then
    # against the reference trained on the same device (a CPU curve and a CUDA curve differ by the
    # devices' reductions, which 20 Adam steps amplify, whatever the kernel).
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    same_dev_ref = ref if dev == "cpu" else _train("torch", device=dev).cpu()
    torch.testing.assert_close(_train("triton", device=dev).cpu(), same_dev_ref,
                               rtol=1e-3 if dev == "cuda" else 1e-4, atol=1e-4 if dev == "cuda" else 1e-5)
