"""How sure a comparison is: bootstrap intervals over test users, and leaders named only beyond noise.

A run's final evaluation keeps each test user's target rank (:func:`save_ranks`:
``RUN/ranks/test-step<N>.safetensors``, the user indices and the rank intervals under both
protocols), so a comparison can resample users after the fact:

- :func:`bootstrap_interval`: the 95 % percentile interval of a mean over users, from ``B`` = 1,000
  resamples of the users with replacement (seeded: the same data give the same interval);
- :func:`paired_interval`: the same for the mean *difference* between two runs over the users both
  ranked: each resample draws users, not runs, so what the two runs share (an easy or a hard user)
  cancels, and the interval is that of the difference itself;
- :func:`leader`: the best row of a group names a lead only when the paired interval of its
  difference to the runner-up excludes zero; otherwise the group ties within noise.

Per-user values are the expected HR@K / NDCG@K under a random order of ties
(:func:`transrec.inference.metrics.per_user_metrics`), so the intervals describe the figures the
tables print.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from transrec.errors import UserError
from transrec.inference.metrics import per_user_metrics

RESAMPLES = 1000
LEVEL = 0.95
PROTOCOL_NAMES = ("masked", "ranked")  # history masked (eval.exclude_history=true) / history ranked


def ranks_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "ranks" / f"test-step{int(step):08d}.safetensors"


def save_ranks(run_dir: str | Path, step: int, users: torch.Tensor, ranks: torch.Tensor,
               exclude_history: bool) -> Path:
    """Each test user's rank intervals under both protocols, stored as masked then ranked
    (``ranks`` comes in the run's own protocol first, as split_metrics keeps it)."""
    if not exclude_history:
        ranks = ranks.flip(1)
    path = ranks_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"users": users.to(torch.int64).contiguous(), "ranks": ranks.to(torch.int64).contiguous()},
              str(tmp), metadata={"protocols": ",".join(PROTOCOL_NAMES)})
    os.replace(tmp, path)
    return path


def load_ranks(run_dir: str | Path, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(users [U], ranks [U, 2 protocols (masked, ranked), 2 (best, worst)]) of a run's test users."""
    path = ranks_path(run_dir, step)
    try:
        t = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: no per-user test ranks (the run's final evaluation writes them)") from None
    return t["users"].numpy(), t["ranks"].numpy()


def user_values(ranks: np.ndarray, metric: str, protocol: str) -> np.ndarray:
    """Per-user ``metric`` (e.g. "ndcg@10") under ``protocol`` ("masked" or "ranked")."""
    name, _, k = metric.partition("@")
    r = torch.from_numpy(ranks[:, PROTOCOL_NAMES.index(protocol)])
    return per_user_metrics(r, ks=(int(k),) if k else ())[metric].numpy()


def _resample_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    means = np.empty(resamples)
    for i in range(resamples):  # one resample at a time: memory stays O(users)
        means[i] = values[rng.integers(0, n, n)].mean()
    return means


def bootstrap_interval(values, *, resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile interval of the mean of ``values`` (one per user) under resampling
    the users with replacement."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    means = _resample_means(v, resamples, seed)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def paired(users_a: np.ndarray, a: np.ndarray, users_b: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a - b`` per user over the users both runs ranked."""
    common, ia, ib = np.intersect1d(users_a, users_b, assume_unique=True, return_indices=True)
    if common.size == 0:
        raise UserError("the two runs share no test user: a paired interval needs the same users")
    return a[ia] - b[ib]


def paired_interval(users_a, a, users_b, b, **kw) -> tuple[float, float, float]:
    """(mean difference a - b, interval low, interval high) over the users both runs ranked."""
    d = paired(np.asarray(users_a), np.asarray(a, dtype=np.float64), np.asarray(users_b),
               np.asarray(b, dtype=np.float64))
    lo, hi = bootstrap_interval(d, **kw)
    return float(d.mean()), lo, hi


def leader(entries: list[tuple[str, np.ndarray, np.ndarray]], **kw) -> tuple[str | None, list[str], dict]:
    """``entries``: (name, users, per-user values) of the rows of one group (a budget). Returns
    (the leader's name or None, the names tied with the best, {name: (diff, lo, hi) to the best}).
    The best is the highest mean; it leads when the paired interval of its difference to the
    runner-up excludes zero; every row whose paired interval against the best includes zero ties."""
    if not entries:
        return None, [], {}
    ranked = sorted(entries, key=lambda e: -float(np.mean(e[2])) if len(e[2]) else math.inf)
    best = ranked[0]
    diffs = {best[0]: (0.0, 0.0, 0.0)}
    for name, users, values in ranked[1:]:
        d, lo, hi = paired_interval(users, values, best[1], best[2], **kw)
        diffs[name] = (d, lo, hi)
    if len(ranked) == 1:
        return best[0], [best[0]], diffs
    tied = [best[0]] + [n for n, _, _ in ranked[1:] if diffs[n][2] >= 0.0]
    runner = ranked[1][0]
    leads = diffs[runner][2] < 0.0  # best - runner-up > 0 everywhere in the interval
    return (best[0] if leads else None), tied, diffs
