"""``transrec launch``: torchrun's agent in the launcher process, with the product's ending. A SIGTERM
to the launcher (what a scheduler sends) stops both ranks at one step with a checkpoint, and the
launcher exits 75 with no traceback (the same command on one rank resumes from that step); a rank
killed outright ends the launch with one line naming it and exit 69, the surviving rank saying which
peer it lost and that the last checkpoint is intact.

The launches run through the command line in real processes (the launcher, and the ranks it starts)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from spawn_ranks import start_ranks, wait_ranks

from transrec.config import build_config
from transrec.engine.checkpoint import CheckpointManager, tag_for
from transrec.engine.data import open_data
from transrec.engine.distributed import lost_peer
from transrec.engine.launch import Failure, outcome, split_argv, torchrun_args
from transrec.engine.preempt import EXIT_PEER_LOST, EXIT_STOPPED
from transrec.errors import UserError
from transrec.shards.synth import synthesize

STEPS = 40
ARGS = ["--preset", "tiny", f"optim.steps={STEPS}", "model.user.layers=1", "model.user.max_len=8",
        "data.max_len=8", "data.batch_size=16", "model.text.max_len=12", "optim.warmup_steps=2",
        "run.log_every=1", "run.progress=off", "run.tensorboard=false", "eval.every=0", "run.monitor="]
STOPPED = re.compile(r"^transrec: stopped by SIGTERM at step (\d+); checkpoint written to (\S+); run the "
                     r"same command to resume$", re.M)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    path = synthesize(root / "w", domain="source", n_users=160, n_items=64, seed=4, max_len=12)
    open_data(build_config("tiny", overrides=[f"data.path={path}", "model.text.max_len=12"]))  # item cache
    return path


def start(data: Path, out: Path, log: Path, *extra: str, ranks: int = 2) -> subprocess.Popen:
    """``transrec launch --nproc-per-node RANKS -- train ...`` in its own session (a signal to it
    reaches nothing else), output to ``log``."""
    cmd = [sys.executable, "-m", "transrec.cli", "launch", "--nproc-per-node", str(ranks), "--", "train",
           "--data", str(data), "--out", str(out), *ARGS, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LOGLEVEL", None)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int | None:
    """The launcher's exit code; None when it ran past ``timeout`` (it and its ranks are then killed)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [*psutil.Process(proc.pid).children(recursive=True), proc]:
            try:
                p.kill()
            except (psutil.Error, ProcessLookupError):
                pass
        proc.wait()
        return None


def wait_for_step(log: Path, step: int, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    end = time.time() + timeout
    pat = re.compile(r"^step (\d+)/", re.M)
    while time.time() < end:
        done = [int(m) for m in pat.findall(log.read_text())]
        if done and max(done) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"the launch ended before step {step}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    finish(proc, 0.1)
    pytest.fail(f"no step {step} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for child in psutil.Process(launcher.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child.pid
    raise AssertionError(f"no rank {rank} among the launcher's children")


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_the_ranks_then_it_exits_75_and_one_rank_resumes(world, tmp_path):
    out = tmp_path / "run"
    proc = start(world, out, tmp_path / "first.log", "deepspeed.zero_stage=2")
    wait_for_step(tmp_path / "first.log", 4, proc)
    proc.send_signal(signal.SIGTERM)
    code = finish(proc, 240)
    text = (tmp_path / "first.log").read_text()
    assert code == EXIT_STOPPED, text[-3000:]
    assert "Traceback" not in text and "SignalException" not in text, text[-3000:]
    lines = STOPPED.findall(text)
    assert len(lines) == 1, text[-3000:]
    step = int(lines[0][0])
    assert 4 <= step < STEPS
    assert text.strip().splitlines()[-1].startswith("transrec: stopped by SIGTERM"), text[-1000:]  # last
    ck = CheckpointManager(out)
    assert ck.latest() == tag_for(step) and Path(lines[0][1]) == ck.dir / tag_for(step)
    assert ck.manifest(tag_for(step))["world_size"] == 2

    # the job comes back on one rank: the same command with --nproc-per-node 1
    again = start(world, out, tmp_path / "again.log", "deepspeed.zero_stage=2", ranks=1)
    code = finish(again, 300)
    text = (tmp_path / "again.log").read_text()
    assert code == 0, text[-3000:]
    assert f"resuming from step {step}" in text and "Traceback" not in text
    assert "resumed on 1 rank from a checkpoint of 2: model and optimizer states re-partitioned" in text
    ck = CheckpointManager(out)
    assert ck.latest() == tag_for(STEPS) and ck.manifest(tag_for(STEPS))["world_size"] == 1


@pytest.mark.slow
def test_a_rank_killed_outright_ends_the_launch_with_one_line_naming_it(world, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "kill.log"
    proc = start(world, out, log, "deepspeed.zero_stage=0", "run.ckpt_every=2")
    wait_for_step(log, 5, proc)
    victim = rank_pid(proc, 1)
    os.kill(victim, signal.SIGKILL)
    code = finish(proc, 180)
    text = log.read_text()
    assert code == EXIT_PEER_LOST, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert f"transrec: error: rank 1 (pid {victim}) was killed by SIGKILL" in text
    survivor = re.findall(r"^transrec: error: rank 0: lost rank 1 \(its process ended or its node was "
                          r"lost\); the last checkpoint, (\S+), is intact: run the same command to resume$",
                          text, re.M)
    assert len(survivor) == 1, text[-3000:]
    ck = CheckpointManager(out)
    assert Path(survivor[0]) == ck.dir / ck.latest()
    ck.check_compatible(ck.latest(), world_size=2, zero_stage=0, run_dir=out)  # whole: manifest and sizes


@pytest.mark.slow
def test_without_a_launcher_the_rank_whose_peer_was_killed_says_so_in_one_line(world, tmp_path):
    """Rank 0 (which also hosts the rendezvous store) killed: rank 1 names it and exits 69."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "transrec.cli", "train", "--data", str(world), "--out", str(out), *ARGS,
           "deepspeed.zero_stage=2", "run.ckpt_every=2"]
    procs = start_ranks(cmd, 2, tmp_path, tag="direct")
    log = procs[0][1]
    end = time.time() + 240
    while time.time() < end and not re.search(r"^step [5-9]/", log.read_text(), re.M):
        assert all(p.poll() is None for p, _ in procs), log.read_text()[-3000:]
        time.sleep(0.05)
    procs[0][0].kill()
    (_, _), (code, text) = wait_ranks(procs, 120)
    assert code == EXIT_PEER_LOST, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    ck = CheckpointManager(out)
    assert text.strip().splitlines()[-1] == (
        f"transrec: error: rank 1: lost rank 0 (its process ended or its node was lost); the last "
        f"checkpoint, {ck.dir / ck.latest()}, is intact: run the same command to resume")


def test_the_command_line_is_split_at_the_double_dash_and_checked():
    assert split_argv(["--nproc-per-node", "2", "--", "train", "--out", "r"]) == (
        ["--nproc-per-node", "2"], ["train", "--out", "r"])
    assert split_argv(["train", "--out", "r"]) == ([], ["train", "--out", "r"])
    for bad, says in ((["--nproc-per-node", "2", "train"], "put `--` between"),
                      (["--nproc-per-node", "2", "--"], "no command after"),
                      (["--", "export", "--run", "r"], "'export' is not a command")):
        with pytest.raises(UserError, match=says):
            split_argv(bad)
    with pytest.raises(UserError, match="does not restart ranks"):
        torchrun_args(["--max-restarts", "3"], ["train"])
    args = torchrun_args(["--nproc-per-node", "2", "--signals-to-handle", "SIGTERM,SIGHUP,SIGUSR1"],
                         ["train", "--out", "r", "optim.steps=3"])
    assert args.module and args.training_script == "transrec.cli"
    assert args.training_script_args == ["train", "--out", "r", "optim.steps=3"]
    assert args.signals_to_handle == "SIGHUP"  # the launcher forwards SIGTERM and SIGUSR1 itself


def test_the_launchers_exit_code_follows_the_ranks():
    term, kill = int(signal.SIGTERM), -int(signal.SIGKILL)
    assert outcome([], []) == (0, None)
    assert outcome([], [term]) == (0, None)  # the run ended before the signal reached a step
    assert outcome([Failure(0, 75), Failure(1, 75)], [term]) == (EXIT_STOPPED, None)  # rank 0 said it
    assert outcome([Failure(1, 75)], [term]) == (EXIT_STOPPED, None)
    code, line = outcome([Failure(0, -term, 11), Failure(1, 75)], [term])  # rank 0 still starting up
    assert code == EXIT_STOPPED and line.startswith("stopped by SIGTERM before rank 0 could stop")
    code, line = outcome([Failure(1, kill, 22, 1.0), Failure(0, EXIT_PEER_LOST, 21, 2.0)], [])
    assert code == EXIT_PEER_LOST and line.startswith("rank 1 (pid 22) was killed by SIGKILL")
    assert outcome([Failure(1, 3, time=1.0), Failure(0, EXIT_PEER_LOST, time=2.0)], []) == (3, None)
    assert outcome([Failure(0, 130), Failure(1, 130)], [int(signal.SIGINT)]) == (130, None)
    assert outcome([Failure(0, 1, time=2.0), Failure(1, 2, time=1.0)], [term]) == (2, None)


def test_a_closed_connection_in_a_collective_names_the_lost_peer():
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
                        "peer [127.0.0.1]:57235. This is typically caused by a remote worker crashing.")
    assert lost_peer(gloo, 0, 2) == "rank 1" and lost_peer(gloo, 1, 2) == "rank 0"
    assert lost_peer(gloo, 2, 4) == "a peer rank (at 127.0.0.1:57235)"
    try:
        try:
            raise gloo
        except RuntimeError as exc:
            raise RuntimeError("barrier failed") from exc
    except RuntimeError as later:
        assert lost_peer(later, 0, 2) == "rank 1"  # the cause counts
    assert lost_peer(RuntimeError("CUDA out of memory"), 0, 2) is None
    assert lost_peer(ValueError("Connection closed by peer"), 0, 2) is None
