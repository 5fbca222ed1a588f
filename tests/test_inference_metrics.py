"""Full-ranking metrics against brute-force references: ties in a uniformly random order (the
expectation over every order, enumerated), masking, repeats, and the collapse figure."""

import itertools
import math

import numpy as np
import pytest
import torch

from transrec.inference.metrics import distinct_fraction, ranking_metrics, target_ranks


def rank_metrics(r, ks):
    out = {}
    for k in ks:
        out[f"hr@{k}"] = float(r <= k)
        out[f"ndcg@{k}"] = 1 / math.log2(r + 1) if r <= k else 0.0
    out["mrr"] = 1 / r
    return out


def reference_expected(scores, target, history, ks):
    """Every order of the items tied with the target, enumerated; the target's rank in each: the
    metrics averaged over all orders (the non-history items only, the target always kept)."""
    t = scores[target]
    above = sum(1 for j, s in enumerate(scores) if j != target and j not in history and s > t)
    tied = [j for j, s in enumerate(scores) if j not in history and s == t]  # the target among them
    total, count = {}, 0
    for order in itertools.permutations(tied):
        m = rank_metrics(above + 1 + order.index(target), ks)
        for key, v in m.items():
            total[key] = total.get(key, 0.0) + v
        count += 1
    return {key: v / count for key, v in total.items()}


def mean_of(dicts):
    return {key: float(np.mean([d[key] for d in dicts])) for key in dicts[0]}


@pytest.mark.parametrize("seed", range(6))
def test_expected_metrics_equal_every_order_of_ties_enumerated(seed):
    rng = np.random.default_rng(seed)
    b, n = 17, 9  # small enough to enumerate every order of a tie (at most 9! orders)
    scores = rng.integers(0, 3, size=(b, n)).astype(np.float32)  # three values: ties everywhere
    targets = rng.integers(0, n, size=b)
    history = [set(rng.choice(n, size=rng.integers(0, 4), replace=False).tolist()) for _ in range(b)]
    history[0].add(int(targets[0]))  # a repeat: the target is never masked
    rows = [i for i, h in enumerate(history) for _ in h]
    items = [j for h in history for j in h]
    ranks = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets), torch.tensor(rows),
                         torch.tensor(items))
    ks = (1, 2, 3, 5)
    want = mean_of([reference_expected(scores[i], int(targets[i]), history[i] - {int(targets[i])}, ks)
                    for i in range(b)])
    got = ranking_metrics(ranks, ks=ks)
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=1e-12), key
    assert got["users"] == b


def test_intervals_on_larger_catalogues_equal_the_mean_over_their_ranks():
    """Integer scores on 300 items (ties of tens of items): the interval's closed forms against the
    plain mean over each rank of the interval."""
    rng = np.random.default_rng(7)
    b, n = 40, 300
    scores = rng.integers(0, 12, size=(b, n)).astype(np.float32)
    targets = rng.integers(0, n, size=b)
    ranks = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets))
    ks = (1, 10, 20, 50)
    per_user = []
    for i in range(b):
        t = scores[i, targets[i]]
        best, worst = int((scores[i] > t).sum()) + 1, int((scores[i] >= t).sum())
        assert ranks[i].tolist() == [best, worst]
        per_user.append(mean_of([rank_metrics(r, ks) for r in range(best, worst + 1)]))
    want = mean_of(per_user)
    got = ranking_metrics(ranks, ks=ks)
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=1e-12), key


def test_exact_ranks_and_distinct_scores_keep_the_plain_metrics():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.4, 0.6, 0.8]])
    ranks = target_ranks(scores, torch.tensor([2, 0]))
    assert ranks.tolist() == [[2, 2], [4, 4]]
    got = ranking_metrics(ranks, ks=(2,))
    assert got == ranking_metrics(torch.tensor([2, 4]), ks=(2,))
    assert got["hr@2"] == 0.5 and got["ndcg@2"] == pytest.approx(0.5 / math.log2(3), abs=1e-15)
    assert got["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2, abs=1e-15)


@pytest.mark.parametrize("n", [100, 1000, 123457])
def test_a_constant_model_scores_exactly_chance(n):
    """Every item scores the same: HR@K = K/N and NDCG@K, MRR the exact means over ranks 1..N,
    whichever item is the target (a tie never goes to the target)."""
    targets = torch.tensor([0, n // 3, n - 1])
    for dtype in (torch.float32, torch.bfloat16):
        ranks = target_ranks(torch.full((3, n), 0.25, dtype=dtype), targets)
        assert ranks.tolist() == [[1, n]] * 3
        m = ranking_metrics(ranks, ks=(5, 10, 20))
        for k in (5, 10, 20):
            assert m[f"hr@{k}"] == pytest.approx(k / n, abs=1e-12)
            gain = math.fsum(1 / math.log2(r + 1) for r in range(1, k + 1))
            assert m[f"ndcg@{k}"] == pytest.approx(gain / n, abs=1e-12)
        assert m["mrr"] == pytest.approx(math.fsum(1 / r for r in range(1, n + 1)) / n, abs=1e-12)


def test_a_constant_model_with_masked_history_is_chance_over_what_is_left():
    n = 50
    scores = torch.zeros(2, n)
    ranks = target_ranks(scores, torch.tensor([3, 7]), torch.tensor([0] * 10 + [1] * 30),
                         torch.tensor(list(range(10, 20)) + list(range(10, 40))))
    assert ranks.tolist() == [[1, 40], [1, 20]]
    m = ranking_metrics(ranks, ks=(10,))
    assert m["hr@10"] == pytest.approx((10 / 40 + 10 / 20) / 2, abs=1e-12)


def test_a_tied_copy_of_the_target_halves_its_hit_at_the_top():
    """One other item scores exactly as the target (a duplicated title), everything else lower: the
    target is first or second with equal odds, not first every time."""
    scores = torch.tensor([[0.7, 0.7, 0.1, 0.2, 0.3]])
    m = ranking_metrics(target_ranks(scores, torch.tensor([1])), ks=(1, 2))
    assert m["hr@1"] == 0.5 and m["hr@2"] == 1.0
    assert m["ndcg@1"] == 0.5 and m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 2, abs=1e-15)
    assert m["mrr"] == pytest.approx(0.75, abs=1e-15)


def test_distinct_fraction_counts_distinct_values_per_row():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert distinct_fraction(scores).tolist() == [1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        distinct_fraction(torch.zeros(3))


def test_bad_rank_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[B\] or \[B, 2\]"):
        ranking_metrics(torch.ones(3, 3, dtype=torch.long))


def test_masking_history_improves_rank_by_exactly_the_masked_higher_items():
    scores = torch.arange(10, dtype=torch.float32)[None].repeat(2, 1)  # item 9 best
    targets = torch.tensor([5, 5])
    ranks = target_ranks(scores, targets, torch.tensor([1, 1, 1]), torch.tensor([9, 8, 0]))
    assert ranks.tolist() == [[5, 5], [3, 3]]  # row 0 unmasked: 6..9 above; row 1: 8, 9 masked
    m = ranking_metrics(ranks, ks=(3,))
    assert m["hr@3"] == 0.5 and abs(m["ndcg@3"] - 0.5 * (1 / math.log2(4))) < 1e-12
