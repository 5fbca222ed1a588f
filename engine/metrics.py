"""Full-ranking metrics: the rank of each held-out target among all items, then HR, NDCG and MRR.

The protocol (the field's full-ranking one, no sampled negatives):

- every item of the catalogue is scored for every user;
- the items the user interacted with before the target are masked (score ``-inf``), except the
  target itself when the user consumed it before (a repeat is still a correct prediction);
- ``rank = 1 + number of items with a strictly higher score`` than the target. Ties are resolved in
  the target's favour, so a model that gives every item the same score ranks every target first;
  this is the documented convention, and a reason to report several metrics;
- ``HR@K = [rank <= K]``, ``NDCG@K = [rank <= K] / log2(rank + 1)`` (one relevant item, so the ideal
  DCG is 1), ``MRR = 1 / rank`` (not truncated).

Everything stays on the scores' device; only the final sums travel to the host.
"""

from __future__ import annotations

import math

import torch

DEFAULT_KS = (5, 10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, hist_rows: torch.Tensor | None = None,
                 hist_items: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of ``targets[b]`` in ``scores[b]`` after masking the history; ``[B]`` int64, 1 = best.

    ``scores`` is ``[B, N]`` (any float dtype; compared in fp32), ``targets`` ``[B]`` item indices,
    ``hist_rows``/``hist_items`` the (row, item) pairs to mask. ``scores`` is not modified.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    scores = scores.float()
    rows = torch.arange(scores.shape[0], device=scores.device)
    targets = targets.to(scores.device)
    target_score = scores[rows, targets]
    if hist_rows is not None and hist_items is not None and hist_rows.numel():
        scores = scores.clone()
        scores[hist_rows.to(scores.device), hist_items.to(scores.device)] = float("-inf")
        scores[rows, targets] = target_score
    higher = (scores > target_score[:, None]).sum(dim=1)
    return higher + 1


def metric_sums(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[str, torch.Tensor]:
    """Per-metric sums over users (on device) plus ``count``; divide with :func:`finalize`."""
    ranks = ranks.double()
    out: dict[str, torch.Tensor] = {"count": torch.tensor(float(ranks.numel()), dtype=torch.float64,
                                                          device=ranks.device)}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = hit.double().sum()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks)).sum()
    out["mrr"] = (1.0 / ranks).sum()
    return out


def finalize(sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Means from :func:`metric_sums` output (after any cross-rank reduction)."""
    count = float(sums["count"])
    res = {k: (float(v) / count if count else math.nan) for k, v in sums.items() if k != "count"}
    res["users"] = int(count)
    return res


def ranking_metrics(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[str, float]:
    """HR@K, NDCG@K for each K and MRR, averaged over ``ranks``."""
    return finalize(metric_sums(ranks, ks))
