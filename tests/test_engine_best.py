"""Validation-driven training: the best checkpoint by ``run.monitor``, early stopping after
``run.patience`` evaluations without improvement, pruning that keeps the best, export of the best
step, and a resumed run that goes on with the same best and patience count. The validation metric is
scripted per step; the test metric is a fingerprint of the weights the engine holds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_parts import train_steps

from transrec.cli import main as cli_main
from transrec.config import build_config
from transrec.engine.checkpoint import CheckpointManager, tag_for
from transrec.engine.consolidate import consolidated_state_dict, export_run
from transrec.engine.tracking import read_metrics
from transrec.engine.trainer import Trainer
from transrec.errors import ConfigError
from transrec.shards.synth import synthesize

pytestmark = pytest.mark.usefixtures("inprocess_group")  # see conftest

COMMON = ["model.user.layers=1", "model.user.max_len=8", "data.max_len=8", "model.text.max_len=12",
          "data.batch_size=8", "optim.warmup_steps=0", "run.progress=false", "run.tensorboard=false",
          "model.text.trainable=1", "optim.steps=40", "eval.every=5", "run.ckpt_every=5",
          "run.keep_last=1", "run.patience=2", "run.monitor=valid/ndcg@10"]
# valid ndcg@10 at each evaluation: best at step 10, then two evaluations without improvement
SCRIPT = {5: 0.10, 10: 0.20, 15: 0.15, 20: 0.18, 25: 0.5, 30: 0.6, 35: 0.7, 40: 0.8}


def fingerprint(trainer) -> float:
    return float(sum(v.detach().double().sum() for v in trainer.engine.module.state_dict().values()
                     if v.is_floating_point()))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("best")
    return synthesize(root / "d", domain="source", n_users=60, n_items=30, seed=9, min_len=3, max_len=10)


@pytest.fixture
def scripted(monkeypatch):
    """Every trainer's split metrics: valid from SCRIPT by step, test = the weights' fingerprint."""
    calls = []
    real_init = Trainer.__init__

    def init(self, *args, **kw):
        real_init(self, *args, **kw)

        def split_metrics(split="valid", item_emb=None, keep=None):  # keep: no per-user ranks here
            calls.append((split, self.state.step))
            value = SCRIPT[self.state.step] if split == "valid" else fingerprint(self)
            return {"ndcg@10": value, "hr@10": value, "users": 60}

        self.validator.split_metrics = split_metrics

    monkeypatch.setattr(Trainer, "__init__", init)
    return calls


def make(data, run, extra=()):
    return Trainer(build_config("tiny", overrides=[f"data.path={data}", f"run.out={run}", *COMMON, *extra]),
                   show=False)


def test_early_stop_keeps_the_best_through_pruning_and_reports_it(data, tmp_path, scripted, capsys):
    run = tmp_path / "r"
    tr = make(data, run)
    try:
        res = tr.fit()
    finally:
        tr.close()
    out, err = capsys.readouterr()
    assert res.step == 20  # 10 best, 15 and 20 without improvement, patience 2
    # valid at 5..20 in the loop (20 reused by the final evaluation), then test at the last step,
    # then valid and test with the best step's weights loaded
    assert scripted == [("valid", 5), ("valid", 10), ("valid", 15), ("valid", 20), ("test", 20),
                        ("valid", 20), ("test", 20)]
    assert out == ""  # progress lines go to stderr
    assert [ln for ln in err.splitlines() if ln.startswith("early stop")] == [
        "early stop at step 20: valid/ndcg@10 did not improve for 2 evaluations (run.patience=2; "
        "best 0.2000 at step 10)"]
    # each evaluation line names the step whose weights it reports: the best step's weights,
    # evaluated again after training, as "best step 10"
    evals = [ln for ln in err.splitlines() if ln.startswith("eval ")]
    assert [ln.split("  ")[0] for ln in evals] == [
        "eval valid step 5", "eval valid step 10", "eval valid step 15", "eval valid step 20",
        "eval test step 20", "eval valid best step 10", "eval test best step 10"]
    records = [(r["kind"], r["step"], r["split"]) for r in read_metrics(run) if r["kind"].startswith("eval")]
    assert records == [
        ("eval", 5, "valid"), ("eval", 10, "valid"), ("eval", 15, "valid"), ("eval", 20, "valid"),
        ("eval", 20, "test"), ("eval_best", 10, "valid"), ("eval_best", 10, "test")]
    ck = CheckpointManager(run)
    assert ck.complete() == [tag_for(10), tag_for(20)]  # keep_last=1 plus the best
    assert ck.best() == tag_for(10) and ck.latest() == tag_for(20)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["step"] == 20 and ev["best"]["step"] == 10 and ev["best"]["value"] == pytest.approx(0.2)
    best_sd, _ = consolidated_state_dict(run, tag_for(10))
    last_sd, _ = consolidated_state_dict(run, tag_for(20))
    assert ev["best"]["test"]["ndcg@10"] == pytest.approx(float(sum(v.double().sum() for v in best_sd.values()
                                                                   if v.is_floating_point())), rel=1e-6)
    assert ev["best"]["test"]["ndcg@10"] != pytest.approx(ev["test"]["ndcg@10"], rel=1e-6)
    assert evals[4].endswith(f"ndcg@10 {ev['test']['ndcg@10']:.4f}  hr@10 {ev['test']['hr@10']:.4f}")
    assert evals[6].endswith(f"ndcg@10 {ev['best']['test']['ndcg@10']:.4f}  "
                             f"hr@10 {ev['best']['test']['hr@10']:.4f}")
    assert evals[4].split("  ")[1] != evals[6].split("  ")[1]  # the two weights' figures differ

    # export: best by default and with --step best, the last with --step last, a step by number
    exp = export_run(run, tmp_path / "e-default")
    weights = load_file(str(exp / "model.safetensors"))
    moved = [k for k in weights if not torch.equal(best_sd[k], last_sd[k])]
    assert moved and all(torch.equal(weights[k], best_sd[k]) for k in weights)
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "e-best"), "--step", "best"]) == 0
    assert all(torch.equal(load_file(str(tmp_path / "e-best" / "model.safetensors"))[k], best_sd[k])
               for k in weights)
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "e-last"), "--step", "last"]) == 0
    last = load_file(str(tmp_path / "e-last" / "model.safetensors"))
    assert all(torch.equal(last[k], last_sd[k]) for k in weights)
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "e-20"), "--step", "20"]) == 0
    assert cli_main(["export", "--run", str(run), "--out", str(tmp_path / "e-7"), "--step", "7"]) == 2
    assert "steps with a checkpoint: 10, 20" in capsys.readouterr().err


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_and_the_patience_count(data, tmp_path, scripted, capsys):
    run = tmp_path / "r"
    tr = make(data, run)
    try:
        train_steps(tr, until=15)  # killed after the checkpoint of step 15 (one evaluation without gain)
    finally:
        tr.close()
    tr = make(data, run)
    try:
        res = tr.fit()
        assert tr.state.best_step == 10 and tr.state.bad_evals == 2
    finally:
        tr.close()
    assert res.step == 20  # a fresh count would have gone on to step 25
    assert [s for split, s in scripted if split == "valid"][:4] == [5, 10, 15, 20]
    assert CheckpointManager(run).best() == tag_for(10)
    assert json.loads((run / "eval.json").read_text())["best"]["step"] == 10


def test_monitor_must_name_a_reported_validation_metric(data, tmp_path):
    for bad in ("valid/ndcg@7", "test/ndcg@10", "loss"):
        with pytest.raises(ConfigError, match="run.monitor"):
            make(data, tmp_path / "r", [f"run.monitor={bad}"])
    with pytest.raises(ConfigError, match="run.patience needs run.monitor"):
        make(data, tmp_path / "r", ["run.monitor="])
