"""The budget curve's pieces: the schedule fitted to a budget, the table, the leaders, the plot, and
the command line's --steps list."""

from __future__ import annotations

import pytest

from transrec.cli import main
from transrec.config import build_config
from transrec.engine.transfer import (
    TARGET_RECIPE,
    _fitted_schedule,
    budget_table,
    transfer_config,
    write_budget_curve,
)

ROWS = [{"mode": m, "budget": b, "eval_step": b // 2, "test_ndcg@10": v, "test_hr@10": 2 * v}
        for m, vals in (("scratch", (0.05, 0.09, 0.10)), ("full", (0.10, 0.12, 0.13)),
                        ("id-sasrec", (0.04, 0.13, 0.12)))
        for b, v in zip((30, 100, 300), vals)]


def test_each_budget_gets_its_own_schedule_unless_the_user_set_one():
    assert _fitted_schedule([], 300) == ["optim.steps=300", "optim.warmup_steps=30", "eval.every=30"]
    assert _fitted_schedule(["eval.every=7", "optim.warmup_steps=0"], 5) == ["optim.steps=5"]
    assert _fitted_schedule([], 3) == ["optim.steps=3", "optim.warmup_steps=1", "eval.every=1"]


def test_the_budget_table_csv_and_plot(tmp_path):
    """(The leaders, which need each user's ranks: tests/test_engine_intervals.py.)"""
    table = budget_table(ROWS).splitlines()
    assert table[0] == ("| mode | test NDCG@10 at 30 steps (best step) | test NDCG@10 at 100 steps "
                        "(best step) | test NDCG@10 at 300 steps (best step) |")
    assert table[3] == "| full | 0.1000 (15) | 0.1200 (50) | 0.1300 (150) |"
    tie = {f"{p}_ndcg@10_tied": True for p in ("masked", "ranked")}
    with_ties = [{**r, **tie, "masked_ndcg@10": r["test_ndcg@10"], "ranked_ndcg@10": r["test_ndcg@10"]}
                 for r in ROWS]
    write_budget_curve(with_ties, tmp_path, title="t")
    assert (tmp_path / "budget.csv").read_text().count("\n") == len(ROWS) + 1
    assert (tmp_path / "budget.png").stat().st_size > 5000
    assert "30 steps: tie within noise: full, scratch, id-sasrec" in (tmp_path / "budget.md").read_text()


def test_every_mode_takes_the_target_recipe_and_overrides_win(tmp_path):
    exp = tmp_path / "exp"
    model = __import__("transrec.models", fromlist=["build_model"]).build_model(build_config("tiny").model)
    model.save_export(exp, build_config("tiny"), {"kind": "full", "step": 0})
    assert build_config("tiny").model.user.dropout != TARGET_RECIPE["model.user.dropout"] == 0.5
    for mode in ("scratch", "full", "topk", "lora", "id"):
        cfg = transfer_config(exp, tmp_path, mode, tmp_path / mode)
        assert cfg.model.user.kind == TARGET_RECIPE["model.user.kind"] == "causal"
        assert cfg.model.user.dropout == 0.5, mode
    back = transfer_config(exp, tmp_path, "full", tmp_path / "b",
                           overrides=["model.user.kind=bidirectional", "model.user.dropout=0.1"])
    assert (back.model.user.kind, back.model.user.dropout) == ("bidirectional", 0.1)
    assert transfer_config(exp, tmp_path, "id", tmp_path / "i").model.kind == "id"


@pytest.mark.parametrize("steps,msg", [("30,x", "one number or several"), ("0,10", "must be positive")])
def test_bad_budgets_are_one_line(steps, msg, capsys, tmp_path):
    assert main(["compare", "--pretrained", str(tmp_path), "--data", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--steps", steps]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
