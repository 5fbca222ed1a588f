"""Shared input makers and the accuracy rule for the kernel tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transrec.kernels import inbatch_softmax, reduce_rows

# Triton runs on CUDA where there is a GPU, else on the CPU under TRITON_INTERPRET=1 (conftest).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on(device, *xs):
    return [x.to(device) if x is not None else None for x in xs]


def make_inputs(n, m, d, dtype=torch.float32, *, bias=True, mask=False, seed=0):
    """Peaky in-batch softmax inputs: each row of q is a noisy copy of its target item (a planted
    high-similarity pair); bias is -log(popularity) of a Zipf-like popularity (non-uniform, > 0)."""
    g = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    t = torch.randint(0, m, (n,), generator=g)
    q = F.normalize(k[t] + 0.35 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    q = q * (1.0 + torch.rand(n, 1, generator=g, dtype=torch.float64))
    b = None
    if bias:
        pop = 1.0 / torch.arange(1, m + 1, dtype=torch.float64) ** 0.9
        b = -torch.log(pop / pop.sum())[torch.randperm(m, generator=g)]
    row_mask = None
    if mask:
        row_mask = torch.rand(n, generator=g) > 0.25
        row_mask[0] = True
        t = torch.where(row_mask, t, torch.full_like(t, -1))  # padding rows carry an invalid target
    cast = lambda x: None if x is None else x.to(dtype)
    return cast(q), cast(k), t, cast(b), row_mask


def plain_torch(q, k, t, b, tau, row_mask, reduction):
    """What a user would write, all in the inputs' dtype (the yardstick of the accuracy rule)."""
    logits = (q @ k.T) / tau
    if b is not None:
        logits = logits + b
    loss = F.cross_entropy(logits, t.clamp_min(0), reduction="none")
    if row_mask is not None:
        loss = torch.where(row_mask, loss, torch.zeros((), dtype=loss.dtype))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (row_mask.sum() if row_mask is not None else loss.shape[0])


def loss_and_grads(fn, q, k, t, b, tau, row_mask, reduction, upcast=None, weights=None, **kw):
    leaves = [x.detach().to(upcast or x.dtype).requires_grad_(True) if x is not None else None
              for x in (q, k, b)]
    loss = fn(leaves[0], leaves[1], t, leaves[2], tau, row_mask, reduction, **kw)
    scalar = (loss * weights.to(loss.dtype)).sum() if reduction == "none" else loss
    grads = torch.autograd.grad(scalar, [x for x in leaves if x is not None])
    return [loss.detach()] + [g.detach() for g in grads]


def impl_fn(impl):
    def fn(q, k, t, b, tau, row_mask, reduction, **kw):
        if impl == "triton" and kw:  # pinned tiles: bypass the dispatcher (its checks ran elsewhere)
            from transrec.kernels.triton_op import inbatch_softmax_triton_rows  # optional: triton

            rows = inbatch_softmax_triton_rows(q, k, t, bias=b, temperature=tau, **kw)
            return reduce_rows(rows, row_mask, reduction)
        return inbatch_softmax(q, k, t, bias=b, temperature=tau, row_mask=row_mask, reduction=reduction,
                               impl=impl, **kw)
    return fn


def rel_err(x, truth):
    x = x.double()
    return float((x - truth).abs().max() / truth.abs().max().clamp_min(1e-12))


def check_against_truth(impl, n, m, d, dtype, *, bias, mask, reduction, tau, seed=0, tol=None, **kw):
    """The rule: each output's error against a float64 truth is at most plain torch's error in the
    same dtype plus a small tolerance. Returns the per-output errors (impl, torch)."""
    q, k, t, b, row_mask = make_inputs(n, m, d, dtype, bias=bias, mask=mask, seed=seed)
    weights = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    if impl == "triton":
        q, k, t, b, row_mask, weights = on(TRITON_DEVICE, q, k, t, b, row_mask, weights)
    truth = loss_and_grads(impl_fn("torch"), q, k, t, b, tau, row_mask, reduction, upcast=torch.float64,
                           weights=weights)
    base = loss_and_grads(plain_torch, q, k, t, b, tau, row_mask, reduction, weights=weights)
    got = loss_and_grads(impl_fn(impl), q, k, t, b, tau, row_mask, reduction, weights=weights, **kw)
    tol = tol if tol is not None else (2e-5 if dtype == torch.float32 else 2e-3)
    names = ["loss", "dq", "dk", "dbias"]
    out = []
    for name, g, bs, tr in zip(names, got, base, truth):
        assert g.shape == tr.shape, f"{impl} {name}: shape {tuple(g.shape)} != {tuple(tr.shape)}"
        assert torch.isfinite(g).all(), f"{impl} {name}: non-finite values"
        e, e0 = rel_err(g, tr), rel_err(bs, tr)
        assert e <= e0 + tol, f"{impl} {name}: error {e:.3g} > plain torch {e0:.3g} + {tol}"
        out.append((e, e0))
    return out
