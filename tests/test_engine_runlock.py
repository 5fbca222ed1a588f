"""One writer per run folder, resuming logs each step once, temporaries of killed builds and
exports are cleaned, a batch larger than the training split is warned about."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_parts import train_steps

from transrec.cli import main as cli_main
from transrec.config import build_config
from transrec.engine.runlock import LOCK_FILE, RunFolderBusy, RunLock
from transrec.engine.tracking import read_metrics
from transrec.engine.trainer import Trainer
from transrec.locking import locked_build
from transrec.models.export import write_export
from transrec.shards.dataset import Dataset
from transrec.shards.synth import synthesize

COMMON = ["model.user.layers=1", "model.user.max_len=8", "data.max_len=8", "model.text.max_len=12",
          "optim.warmup_steps=0", "run.progress=off", "run.tensorboard=false", "eval.max_users=0",
          "eval.every=0", "run.monitor=", "run.patience=0"]

HOLD = ("import sys, time; from transrec.engine.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(120)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("lock") / "d", domain="source", n_users=40, n_items=30,
                      seed=3, min_len=3, max_len=10)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_train_into_a_held_run_folder_stops_naming_the_holder(data, tmp_path, capsys):
    run = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = cli_main(["train", "--data", str(data), "--out", str(run), "--preset", "tiny", *COMMON])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and f"host {socket.gethostname()}, pid {holder.pid}" in err[0], err
        assert not (run / "config.yaml").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock file stays, and the next run takes it over
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid
    lines = []
    lock = RunLock(run).acquire(log=lines.append)
    assert len(lines) == 1 and f"stale lock of pid {holder.pid}" in lines[0]
    assert json.loads((run / LOCK_FILE).read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
    lock.release()
    assert not (run / LOCK_FILE).exists()


def test_a_lock_file_of_a_dead_pid_is_taken_over_and_others_are_not(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    pid = dead_pid()
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    lines = []
    lock = RunLock(run).acquire(log=lines.append)
    assert lines == [f"{run}: taking over the stale lock of pid {pid} on {socket.gethostname()} "
                     "(no longer running)"]
    with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):  # another open file in this process
        RunLock(run).acquire(log=lines.append)
    lock.release()
    # a live pid on this host, or any pid on another host, is not taken over even without the flock
    for holder in ({"host": socket.gethostname(), "pid": os.getppid()}, {"host": "elsewhere", "pid": pid}):
        (run / LOCK_FILE).write_text(json.dumps(holder))
        with pytest.raises(RunFolderBusy, match=f"host {holder['host']}, pid {holder['pid']}"):
            RunLock(run).acquire(log=lines.append)
    assert len(lines) == 1


@pytest.mark.usefixtures("inprocess_group")
def test_resume_says_its_step_and_logs_each_step_once(data, tmp_path, capsys):
    run = tmp_path / "r"
    extra = ["run.log_every=1", "run.ckpt_every=2", "optim.steps=6", "data.batch_size=8"]

    def make():
        return Trainer(build_config("tiny", overrides=[f"data.path={data}", f"run.out={run}", *COMMON,
                                                       *extra]), show=False)

    tr = make()
    try:
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
            make()
        train_steps(tr, until=3)  # killed after step 3, the checkpoint is step 2's
    finally:
        tr.close()
    assert not (run / LOCK_FILE).exists()
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2, 3]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # a line cut by the kill
    capsys.readouterr()
    tr = make()
    try:
        res = train_steps(tr, save=True)
    finally:
        tr.close()
    assert res.step == 6
    err = capsys.readouterr().err.splitlines()
    assert sum(ln.startswith("resuming from step 2 ") for ln in err) == 1, err
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines())


@pytest.mark.usefixtures("inprocess_group")
def test_a_batch_larger_than_the_training_split_is_warned_about(data, tmp_path, capsys):
    cfg = build_config("tiny", overrides=[f"data.path={data}", f"run.out={tmp_path / 'r'}", *COMMON,
                                          "data.batch_size=64"])
    tr = Trainer(cfg, show=False)
    tr.close()
    n_train = sum(s.n_train for s in Dataset.open(data).seq_shards)
    assert 0 < n_train < 64
    err = [ln for ln in capsys.readouterr().err.splitlines() if "exceeds" in ln]
    assert err == [f"warning: data.batch_size=64 exceeds the {n_train} training sequences of {data}; "
                   "policy repeat repeats rows within a step"]


def test_a_killed_cache_build_leaves_no_temporary_behind(tmp_path):
    final = tmp_path / "cache" / "abc123"
    final.parent.mkdir()
    (final.parent / "abc123.tmpk1ll3d").mkdir()  # what a killed builder left
    (final.parent / "abc123.tmpk1ll3d" / "part.npy").write_bytes(b"x")
    (final.parent / "other.tmpxyz").mkdir()  # another cache's: not this lock's business
    with locked_build(final, 5.0, "item cache") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert sorted(p.name for p in final.parent.iterdir()) == ["abc123", "abc123.lock", "other.tmpxyz"]


def test_a_killed_export_temporary_is_removed_by_the_next_export(tmp_path):
    out = tmp_path / "e"
    dead, live = tmp_path / f".e.tmp-{dead_pid()}", tmp_path / f".e.tmp-{os.getppid()}"
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    write_export(out, {"w": torch.zeros(2)}, build_config("tiny"), {"step": 1})
    assert (out / "model.safetensors").is_file()
    assert not dead.exists() and live.is_dir()
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == [live.name, "e"]
