"""Intervals over test users: a constant difference is a point, identical runs tie, a planted gap
is a lead, and tuning chooses by validation without reading any test figure of the others."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from transrec.cli import main
from transrec.config import build_config
from transrec.engine.intervals import (
    bootstrap_interval,
    leader,
    load_ranks,
    paired_interval,
    save_ranks,
    user_values,
)
from transrec.engine.transfer import (
    _chosen_row,
    add_intervals,
    budget_leaders,
    leaders_line,
    write_budget_curve,
)
from transrec.inference.metrics import ranking_metrics
from transrec.models import build_model
from transrec.shards.synth import synthesize


def exact(ranks) -> torch.Tensor:
    """[U, 2 protocols, 2] rank intervals from exact ranks (the same under both protocols)."""
    r = torch.as_tensor(ranks, dtype=torch.int64)
    return r[:, None, None].expand(-1, 2, 2).contiguous()


def fake_run(path, ranks, users=None, step=7, exclude_history=True) -> dict:
    users = torch.arange(len(ranks)) if users is None else torch.as_tensor(users)
    save_ranks(path, step, users, exact(ranks), exclude_history)
    return {"run": str(path), "eval_step": step}


def test_a_constant_difference_has_a_point_interval():
    rng = np.random.default_rng(0)
    a = rng.random(300)
    d, lo, hi = paired_interval(np.arange(300), a + 0.05, np.arange(300), a)
    assert d == pytest.approx(0.05) and lo == pytest.approx(0.05) and hi == pytest.approx(0.05)
    lo, hi = bootstrap_interval(np.full(50, 0.3))
    assert lo == hi == pytest.approx(0.3)


def test_intervals_are_seeded_and_cover_the_mean():
    v = np.random.default_rng(1).random(300)
    assert bootstrap_interval(v) == bootstrap_interval(v)
    lo, hi = bootstrap_interval(v)
    assert lo < v.mean() < hi and hi - lo < 0.2


def test_identical_runs_tie_and_a_planted_gap_of_005_on_300_users_leads():
    rng = np.random.default_rng(2)
    users = np.arange(300)
    ranks = rng.integers(1, 200, 300)  # a weak model: a few hits in the top 10
    base = user_values(exact(ranks).numpy(), "ndcg@10", "masked")
    lead, tied, _ = leader([("a", users, base), ("b", users, base.copy())])
    assert lead is None and tied == ["a", "b"]
    better = ranks.copy()
    better[rng.permutation(300)[:16]] = 1  # 16 users moved to rank 1: a gap of about 0.05 NDCG@10
    improved = user_values(exact(better).numpy(), "ndcg@10", "masked")
    gap = improved.mean() - base.mean()
    assert 0.04 < gap < 0.06
    lead, tied, diffs = leader([("a", users, base), ("b", users, improved)])
    assert lead == "b" and tied == ["b"] and diffs["a"][2] < 0


def test_per_user_values_average_to_the_reported_metrics(tmp_path):
    ranks = np.random.default_rng(3).integers(1, 60, 80)
    fake_run(tmp_path / "r", ranks, users=np.arange(80) * 3)
    users, stored = load_ranks(tmp_path / "r", 7)
    assert (users == np.arange(80) * 3).all()
    want = ranking_metrics(torch.as_tensor(ranks))
    for metric in ("ndcg@10", "hr@10"):
        assert user_values(stored, metric, "ranked").mean() == pytest.approx(want[metric], abs=1e-12)


def test_leaders_by_budget_and_protocol(tmp_path):
    """At 30 steps the two modes tie within noise; at 100 one leads beyond it; both protocols."""
    rng = np.random.default_rng(4)
    weak = rng.integers(1, 300, 300)
    strong = weak.copy()
    strong[rng.permutation(300)[:40]] = 1
    rows = []
    for budget, (a, b) in ((30, (weak, weak)), (100, (weak, strong))):
        for mode, ranks in (("scratch", a), ("full", b)):
            r = fake_run(tmp_path / f"{mode}-{budget}", ranks)
            rows.append({"mode": mode, "budget": budget, "test_ndcg@10": 0.0, **r})
    add_intervals(rows)
    for protocol in ("masked", "ranked"):
        (b30, lead30, tied30), (b100, lead100, tied100) = budget_leaders(rows, protocol)
        assert (b30, lead30, sorted(tied30)) == (30, None, ["full", "scratch"])
        assert (b100, lead100, tied100) == (100, "full", ["full"])
    line = leaders_line(rows)
    assert line.splitlines() == [
        "test NDCG@10, history masked: 30 steps: tie within noise: scratch, full; 100 steps: full leads",
        "test NDCG@10, history ranked: 30 steps: tie within noise: scratch, full; 100 steps: full leads"]
    one = [dict(r) for r in rows if r["mode"] == "full"]  # one mode per budget: nothing to lead
    assert leaders_line(one).splitlines()[0] == ("test NDCG@10, history masked: 30 steps: full alone; "
                                                 "100 steps: full alone")
    full100 = next(r for r in rows if r["mode"] == "full" and r["budget"] == 100)
    assert full100["masked_ndcg@10_lo"] < full100["masked_ndcg@10"] < full100["masked_ndcg@10_hi"]
    (tmp_path / "out").mkdir()
    write_budget_curve(rows, tmp_path / "out", title="t")
    header = (tmp_path / "out" / "budget.csv").read_text().splitlines()[0]
    assert "masked_ndcg@10_lo" in header and "ranked_hr@10_diff_hi" in header


class Guarded(dict):
    """A run's row that fails the test if anything reads one of its test figures."""

    def __getitem__(self, key):
        assert not str(key).startswith("test_"), f"read {key} of a run that was not chosen"
        return super().__getitem__(key)

    def get(self, key, default=None):
        assert not str(key).startswith("test_"), f"read {key} of a run that was not chosen"
        return super().get(key, default)

    def __iter__(self):
        raise AssertionError("iterated over the keys of a run that was not chosen")


def test_tuning_picks_by_validation_and_never_reads_the_others_test_figures():
    """dropout 0.1 wins on test but loses on validation: the row is dropout 0.5's."""
    loses_valid = Guarded({"mode": "full", "valid_ndcg@10": 0.20, "test_ndcg@10": 0.50, "run": "a",
                           "eval_step": 3, "seconds": 1.0})
    wins_valid = {"mode": "full", "valid_ndcg@10": 0.30, "test_ndcg@10": 0.10, "run": "b", "eval_step": 4,
                  "seconds": 1.0}
    row = _chosen_row([({"model.user.dropout": "0.1"}, [loses_valid]),
                       ({"model.user.dropout": "0.5"}, [wins_valid])], "valid_ndcg@10", tuned=True)
    assert row["tuned"] == "model.user.dropout=0.5" and row["test_ndcg@10"] == 0.10 and row["runs"] == ["b"]
    assert [t["valid_ndcg@10"] for t in row["tuning"]] == [0.20, 0.30]


def test_seeds_give_the_mean_and_the_spread():
    runs = [{"mode": "id-sasrec", "valid_ndcg@10": v, "test_ndcg@10": t, "run": f"r{i}", "eval_step": 5,
             "seconds": 2.0} for i, (v, t) in enumerate(((0.1, 0.2), (0.2, 0.3), (0.3, 0.4)))]
    row = _chosen_row([({}, runs)], "valid_ndcg@10", tuned=False)
    assert row["test_ndcg@10"] == pytest.approx(0.3) and row["test_ndcg@10_sd"] == pytest.approx(0.1)
    assert row["seeds"] == 3 and row["seconds"] == 6.0 and row["runs"] == ["r0", "r1", "r2"]
    assert "tuned" not in row


@pytest.mark.slow
@pytest.mark.usefixtures("inprocess_group")
def test_compare_tunes_every_mode_over_seeds_end_to_end(tmp_path, capsys):
    """compare --tune --seeds on real runs: every mode (the ID baseline too) runs each value with
    each seed; the table names the chosen value, the intervals and both protocols' leaders."""
    data = synthesize(tmp_path / "t", domain="target", n_users=120, n_items=60, seed=1, min_len=3, max_len=10)
    exp = tmp_path / "exp"
    cfg = build_config("tiny")
    build_model(cfg.model).save_export(exp, cfg, {"kind": "full", "step": 0})
    out = tmp_path / "cmp"
    code = main(["compare", "--pretrained", str(exp), "--data", str(data), "--out", str(out),
                 "--modes", "scratch",
                 "--steps", "4", "--tune", "model.user.dropout=0.1,0.5", "--seeds", "0,1", "eval.every=2",
                 "run.progress=off", "model.user.layers=1", "data.max_len=8", "model.user.max_len=8"])
    assert code == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["mode"] for r in rows] == ["scratch", "id-sasrec"]
    for r in rows:
        assert r["tuned"] in ("model.user.dropout=0.1", "model.user.dropout=0.5") and r["seeds"] == 2
        assert len(r["runs"]) == 2 and len(r["tuning"]) == 2
        best = max(r["tuning"], key=lambda t: t["valid_ndcg@10"])
        assert r["tuned"] == best["setting"]
        for p in ("masked", "ranked"):
            assert r[f"{p}_ndcg@10_lo"] <= r[f"{p}_ndcg@10"] <= r[f"{p}_ndcg@10_hi"]
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == sorted(f"{m}-dropout={d}-seed={s}" for m in ("scratch", "id-sasrec")
                          for d in ("0.1", "0.5") for s in (0, 1))
    text = capsys.readouterr().out
    assert "test NDCG@10, history masked: " in text and "test NDCG@10, history ranked: " in text
    assert "| mode | tuned | trainable |" in text and "[95% CI]" in text
