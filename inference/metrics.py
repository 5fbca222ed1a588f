"""Full-ranking metrics: where each held-out target ranks among all items, then HR, NDCG and MRR.

The protocol (the field's full-ranking one, no sampled negatives):

- every item of the catalogue is scored for every user;
- the items the user interacted with before the target are masked (score ``-inf``), except the
  target itself when the user consumed it before (a repeat is still a correct prediction);
- ties are ordered uniformly at random, and the metrics are their exact expectations under that
  order, not a sample of it. A target with ``h`` items scoring strictly higher and ``t`` other items
  scoring exactly the same takes each rank ``h + 1 … h + t + 1`` with probability ``1 / (t + 1)``.
  :func:`target_ranks` returns that interval, ``[best, worst] = [h + 1, h + t + 1]``;
- for one rank ``r``: ``HR@K = [r <= K]``, ``NDCG@K = [r <= K] / log2(r + 1)`` (one relevant item,
  so the ideal DCG is 1), ``MRR = 1 / r`` (not truncated); each user contributes the mean of these
  over the ranks of their interval, computed in closed form:

  - ``HR@K = clamp(K - h, 0, t + 1) / (t + 1)``;
  - ``NDCG@K = (G(min(K, h + t + 1)) - G(min(K, h))) / (t + 1)`` with ``G(m) = Σ_{r<=m} 1/log2(r+1)``;
  - ``MRR = (H(h + t + 1) - H(h)) / (t + 1)`` with the harmonic number ``H(m) = ψ(m + 1) + γ``.

So a model that gives every item the same score gets ``HR@K = K / N`` over ``N`` candidates (chance),
and an item whose content is identical to the target's (a duplicated title, a shared cover) shares
the target's rank instead of losing to it. ``torch.topk`` and sorting break ties by position, which
favours whichever item comes first in the catalogue; with distinct scores all rules agree.

Everything stays on the scores' device; one comparison pass over ``[B, N]`` counts both ``h`` and
``t``, and only the final sums travel to the host.
"""

from __future__ import annotations

import math

import torch

DEFAULT_KS = (5, 10, 20)
EULER_GAMMA = 0.57721566490153286061


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, hist_rows: torch.Tensor | None = None,
                 hist_items: torch.Tensor | None = None) -> torch.Tensor:
    """Rank interval of ``targets[b]`` in ``scores[b]`` after masking the history: ``[B, 2]`` int64,
    column 0 the best rank ``1 + #strictly higher``, column 1 the worst ``best + #other items tied``
    (1 = first). Under a random order of ties each rank of the interval is equally likely.

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
    ts = target_score[:, None]
    best = (scores > ts).sum(dim=1) + 1
    worst = (scores >= ts).sum(dim=1)  # the target itself counts here: best + #other items tied
    return torch.stack([best, worst], dim=1)


def _as_interval(ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(best, worst)`` float64 from a ``[B, 2]`` interval or ``[B]`` exact ranks."""
    ranks = ranks.double()
    if ranks.dim() == 1:
        return ranks, ranks
    if ranks.dim() != 2 or ranks.shape[1] != 2:
        raise ValueError(f"ranks must be [B] or [B, 2], got shape {tuple(ranks.shape)}")
    return ranks[:, 0], ranks[:, 1]


def _harmonic(m: torch.Tensor) -> torch.Tensor:
    """``H(m) = 1 + 1/2 + … + 1/m`` (``H(0) = 0``) for float64 ``m >= 0``."""
    return torch.special.digamma(m + 1.0) + EULER_GAMMA


def per_user_metrics(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[str, torch.Tensor]:
    """HR@K, NDCG@K and MRR of each user, ``[B]`` float64 each (expected values under a random order
    of ties); ``ranks`` as in :func:`metric_sums`. Intervals over users resample these."""
    best, worst = _as_interval(ranks)
    n = worst - best + 1.0  # how many ranks are equally likely
    above = best - 1.0
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        out[f"hr@{k}"] = (k - above).clamp(min=0.0).minimum(n) / n
        gains = torch.zeros(k + 1, dtype=torch.float64, device=best.device)  # G(0..k)
        gains[1:] = torch.cumsum(1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64,
                                                               device=best.device)), 0)
        gain = gains[worst.clamp(max=k).long()] - gains[above.clamp(max=k).long()]
        out[f"ndcg@{k}"] = gain / n
    # One rank: 1/r exactly; an interval: a difference of harmonic numbers, whose rounding error
    # (about 1e-15 per user) is far below what the metrics report.
    out["mrr"] = torch.where(n == 1.0, 1.0 / best, (_harmonic(worst) - _harmonic(above)) / n)
    return out


def metric_sums(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[str, torch.Tensor]:
    """Per-metric sums over users (on device) plus ``count``; divide with :func:`finalize`.

    ``ranks``: the ``[B, 2]`` intervals of :func:`target_ranks` (expected metrics under a random
    order of ties), or ``[B]`` exact ranks."""
    count = torch.tensor(float(ranks.shape[0]), dtype=torch.float64, device=ranks.device)
    return {"count": count, **{k: v.sum() for k, v in per_user_metrics(ranks, ks).items()}}


def finalize(sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Means from :func:`metric_sums` output (after any cross-rank reduction)."""
    count = float(sums["count"])
    res = {k: (float(v) / count if count else math.nan) for k, v in sums.items() if k != "count"}
    res["users"] = int(count)
    return res


def ranking_metrics(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[str, float]:
    """HR@K, NDCG@K for each K and MRR, averaged over ``ranks`` (intervals or exact ranks)."""
    return finalize(metric_sums(ranks, ks))


def distinct_fraction(scores: torch.Tensor) -> torch.Tensor:
    """``[B]`` float64: the fraction of each row's scores that are distinct values (1 = no two
    items tie; ``1 / N`` = every item scores the same). Sorts each row: call it on a sample."""
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be [B, N] with N >= 1, got shape {tuple(scores.shape)}")
    s = scores.float().sort(dim=1).values
    distinct = (s[:, 1:] != s[:, :-1]).sum(dim=1) + 1
    return distinct.double() / scores.shape[1]
