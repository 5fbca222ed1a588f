"""Full-ranking metrics against a brute-force numpy reference (ties, masking, repeats)."""

import math

import numpy as np
import pytest
import torch
from transrec.engine.metrics import ranking_metrics, target_ranks


def reference_rank(scores, target, history):
    """Count, item by item, the non-history items scoring strictly above the target."""
    t = scores[target]
    rank = 1
    for j, s in enumerate(scores):
        if j == target or j in history:
            continue
        if s > t:
            rank += 1
    return rank


def reference_metrics(ranks, ks):
    out = {}
    for k in ks:
        out[f"hr@{k}"] = float(np.mean([r <= k for r in ranks]))
        out[f"ndcg@{k}"] = float(np.mean([1 / math.log2(r + 1) if r <= k else 0.0 for r in ranks]))
    out["mrr"] = float(np.mean([1 / r for r in ranks]))
    return out


def test_ranks_and_metrics_equal_brute_force_with_ties_and_masking():
    rng = np.random.default_rng(0)
    b, n = 23, 41
    # Few distinct values so ties are frequent; the target sometimes repeats a history item.
    scores = rng.integers(0, 6, size=(b, n)).astype(np.float32)
    targets = rng.integers(0, n, size=b)
    history = [set(rng.choice(n, size=rng.integers(0, 8), replace=False).tolist()) for _ in range(b)]
    history[0].add(int(targets[0]))  # a repeat: the target is never masked
    rows = [i for i, h in enumerate(history) for _ in h]
    items = [j for h in history for j in h]
    ranks = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets), torch.tensor(rows),
                         torch.tensor(items))
    expect = [reference_rank(scores[i], targets[i], history[i] - {int(targets[i])}) for i in range(b)]
    assert ranks.tolist() == expect
    got = ranking_metrics(ranks, ks=(1, 5, 10))
    ref = reference_metrics(expect, ks=(1, 5, 10))
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert got["users"] == b


def test_constant_score_model_ranks_every_target_first():
    scores = torch.zeros(5, 100)
    ranks = target_ranks(scores, torch.tensor([0, 10, 50, 99, 3]))
    m = ranking_metrics(ranks, ks=(5, 10, 20))
    assert ranks.tolist() == [1] * 5
    assert m["hr@5"] == 1.0 and m["ndcg@10"] == 1.0 and m["mrr"] == 1.0


def test_masking_history_improves_rank_by_exactly_the_masked_higher_items():
    scores = torch.arange(10, dtype=torch.float32)[None].repeat(2, 1)  # item 9 best
    targets = torch.tensor([5, 5])
    ranks = target_ranks(scores, targets, torch.tensor([1, 1, 1]), torch.tensor([9, 8, 0]))
    assert ranks.tolist() == [5, 3]  # row 0 unmasked: 6..9 above; row 1: 8, 9 masked
    m = ranking_metrics(ranks, ks=(3,))
    assert m["hr@3"] == 0.5 and abs(m["ndcg@3"] - 0.5 * (1 / math.log2(4))) < 1e-12
