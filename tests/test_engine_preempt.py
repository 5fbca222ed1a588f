"""Stopping on a signal: the step in flight finishes, every rank agrees on it, a checkpoint of it is
written, one line says so, ``transrec`` exits 75, and the same command resumes bit-exactly.

Runs go through the command line in real processes, one per rank with the launcher variables set
(as ``torchrun`` starts them), so the signal reaches a real process running a real step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from spawn_ranks import start_ranks, wait_ranks

from transrec.config import build_config, validate
from transrec.engine.checkpoint import TMP_PREFIX, CheckpointManager, tag_for
from transrec.engine.consolidate import consolidated_state_dict
from transrec.engine.data import open_data
from transrec.engine.preempt import EXIT_STOPPED, RunStopped
from transrec.engine.trainer import Trainer
from transrec.errors import ConfigError
from transrec.shards.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
ARGS = ["--preset", "tiny", f"optim.steps={STEPS}", "model.user.layers=1", "model.user.max_len=8",
        "data.max_len=8", "data.batch_size=16", "model.text.max_len=12", "optim.warmup_steps=2",
        "model.user.dropout=0.2", "run.log_every=1", "run.progress=off", "run.tensorboard=false",
        "eval.every=0", "run.monitor=", "run.ckpt_every=0"]
STOPPED = re.compile(r"stopped by (SIG\w+) at step (\d+); checkpoint written to (\S+); run the same "
                     r"command to resume")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    path = synthesize(root / "w", domain="source", n_users=160, n_items=64, seed=4, max_len=12)
    open_data(build_config("tiny", overrides=[f"data.path={path}", "model.text.max_len=12"]))  # item cache
    return path


def command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "transrec.cli", "train", "--data", str(data), "--out", str(out), *ARGS,
            *extra]


def wait_for_step(log: Path, step: int, procs, timeout: float = 180.0) -> None:
    """Until rank 0's log shows ``step N/`` for some N >= ``step``."""
    end = time.time() + timeout
    pat = re.compile(r"^step (\d+)/", re.M)
    while time.time() < end:
        done = [int(m) for m in pat.findall(log.read_text())]
        if done and max(done) >= step:
            return
        if any(p.poll() is not None for p, _ in procs):
            pytest.fail(f"a rank ended before step {step}:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"no step {step} within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def same_weights(a: Path, b: Path) -> None:
    x, _ = consolidated_state_dict(a)
    y, _ = consolidated_state_dict(b)
    assert x.keys() == y.keys()
    for name in x:
        torch.testing.assert_close(y[name], x[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage,target", [(2, 1), (0, 0)],
                         ids=["zero2-signal-to-rank1", "zero0-signal-to-rank0"])
def test_a_signal_to_one_rank_stops_both_at_one_step_and_the_rerun_resumes_exactly(world, tmp_path, stage,
                                                                                   target):
    extra = [f"deepspeed.zero_stage={stage}"]
    full = start_ranks(command(world, tmp_path / "full", *extra), 2, tmp_path, tag="full")
    part = start_ranks(command(world, tmp_path / "part", *extra), 2, tmp_path, tag="part")
    wait_for_step(part[0][1], 4, part)
    part[target][0].send_signal(signal.SIGTERM)  # one rank only: the other learns it by the all-reduce
    results = wait_ranks(part, timeout=180)
    assert [code for code, _ in results] == [EXIT_STOPPED, EXIT_STOPPED], results[0][1][-3000:]
    lines = [m for _, text in results for m in STOPPED.findall(text)]
    assert len(lines) == 1, "one line, from rank 0"
    name, step, where = lines[0][0], int(lines[0][1]), Path(lines[0][2])
    assert name == "SIGTERM" and 4 <= step < STEPS and "Traceback" not in results[0][1] + results[1][1]
    ck = CheckpointManager(tmp_path / "part")
    assert where == ck.dir / tag_for(step) and ck.latest() == tag_for(step)
    assert not any(p.name.startswith(TMP_PREFIX) for p in ck.dir.iterdir())
    assert ck.manifest(tag_for(step))["client"]["step"] == step

    again = wait_ranks(start_ranks(command(world, tmp_path / "part", *extra), 2, tmp_path, tag="again"), 240)
    assert [code for code, _ in again] == [0, 0], again[0][1][-3000:]
    assert f"resuming from step {step}" in again[0][1]
    assert [code for code, _ in wait_ranks(full, 240)] == [0, 0]
    same_weights(tmp_path / "full", tmp_path / "part")


@pytest.mark.slow
def test_a_second_signal_during_the_save_changes_nothing(world, tmp_path):
    """SIGTERM, then SIGUSR1 and SIGTERM again while the checkpoint is being written: one stop, one
    complete checkpoint, and the rerun resumes from it."""
    cmd = command(world, tmp_path / "run", "deepspeed.zero_stage=0")
    procs = start_ranks(cmd, 1, tmp_path, tag="one")
    proc, log = procs[0]
    wait_for_step(log, 3, procs)
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:  # keep signalling until it is gone
        proc.send_signal(signal.SIGUSR1)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    (code, text), = wait_ranks(procs, 60)
    assert code == EXIT_STOPPED and len(STOPPED.findall(text)) == 1, text[-3000:]
    assert STOPPED.findall(text)[0][0] in ("SIGTERM", "SIGUSR1")  # pending signals arrive in number order
    step = int(STOPPED.findall(text)[0][1])
    ck = CheckpointManager(tmp_path / "run")
    assert ck.latest() == tag_for(step)
    ck.check_compatible(tag_for(step), world_size=1, zero_stage=0, run_dir=tmp_path / "run")
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0 and f"resuming from step {step}" in rerun.stderr, rerun.stderr[-3000:]


def test_stop_signals_are_checked():
    for bad in ("SIGKILL", "SIGSTOP", "NOPE"):
        with pytest.raises(ConfigError, match=f"run.stop_signals: '{bad}' is not a signal a process can"):
            validate(build_config("tiny", overrides=[f"run.stop_signals={bad}"]))
    validate(build_config("tiny", overrides=["run.stop_signals=term, usr2,SIGINT"]))
    validate(build_config("tiny", overrides=["run.stop_signals="]))


@pytest.fixture
def own_handlers():
    """The stop signals' handlers as they were before the test, restored after it (a stopped run
    leaves them ignored in its process)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.usefixtures("inprocess_group", "own_handlers")
def test_a_signal_during_a_validation_abandons_it_and_the_resumed_run_redoes_it(world, tmp_path, monkeypatch):
    """SIGTERM arrives while step 4's validation runs: the validation is abandoned (no eval record of
    step 4), the checkpoint of step 4 says so, and the resumed run validates step 4 first; weights,
    losses and the validation records equal an uninterrupted run's."""
    over = [f"data.path={world}", "model.user.layers=1", "model.user.max_len=8", "data.max_len=8",
            "data.batch_size=16", "model.text.max_len=12", "optim.steps=8", "eval.every=4",
            "run.progress=false", "run.tensorboard=false", "model.user.dropout=0.2"]

    def fit(out, *, kill_at=None):
        trainer = Trainer(build_config("tiny", overrides=over + [f"run.out={out}"]), show=False)
        if kill_at is not None:
            real = trainer.validator.split_metrics

            def split_metrics(split="valid", item_emb=None, keep=None):
                if trainer.state.step == kill_at and split == "valid":
                    os.kill(os.getpid(), signal.SIGTERM)
                return real(split, item_emb, keep)

            trainer.validator.split_metrics = split_metrics
        try:
            return trainer.fit()
        finally:
            trainer.close()

    full = fit(tmp_path / "full")
    with pytest.raises(RunStopped) as info:
        fit(tmp_path / "part", kill_at=4)
    assert str(info.value).startswith("stopped by SIGTERM at step 4 (validation abandoned); checkpoint "
                                      "written")
    ck = CheckpointManager(tmp_path / "part")
    assert ck.latest() == tag_for(4) and ck.manifest(tag_for(4))["client"]["eval_pending"] is True

    def evals(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return [(r["step"], r["split"], r["ndcg@10"]) for r in recs if r["kind"] == "eval"]

    assert not [e for e in evals(tmp_path / "part") if e[0] == 4]  # nothing half-written
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a stopped process ignores repeats
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    second = fit(tmp_path / "part")
    assert evals(tmp_path / "part") == evals(tmp_path / "full")
    assert second.metrics["test"] == full.metrics["test"]
    same_weights(tmp_path / "full", tmp_path / "part")
