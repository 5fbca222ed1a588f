"""Run a function on several gloo ranks in spawned processes, with a timeout so that a hung rank
fails the test instead of stalling the suite."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import torch.multiprocessing as mp

from transrec.engine.distributed import free_port


def run_ranks(target, *args, world: int = 2, timeout: float = 120.0) -> None:
    """``target(rank, port, *args)`` on ``world`` spawned processes; asserts all exit cleanly."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
        p.join(5)
    assert not hung, f"a rank hung (killed after {timeout:.0f} s)"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}"


def start_ranks(argv: list[str], world: int, log_dir, tag: str = "", env: dict | None = None) -> list[tuple]:
    """Start the command ``argv`` once per rank with the launcher variables a ``torchrun`` would set
    (one thread each), output to ``log_dir/rank{r}-{tag}.log``; ``[(process, log path)]``. Each rank
    runs with Python's fault handler on, so that :func:`wait_ranks` can make a hung rank print every
    thread's stack into its log."""
    port = free_port()
    tag = tag or str(port)
    procs = []
    for r in range(world):
        rank_env = dict(os.environ, **(env or {}), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
                        PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        log = Path(log_dir) / f"rank{r}-{tag}.log"
        with open(log, "w") as f:
            procs.append((subprocess.Popen(argv, env=rank_env, stdout=f, stderr=subprocess.STDOUT), log))
    return procs


def wait_ranks(procs: list[tuple], timeout: float) -> list[tuple]:
    """``[(exit code, log text)]`` per rank; after ``timeout`` seconds every rank still running is
    killed and reported with exit code None, its log ending with the Python stack of each of its
    threads at that moment (SIGABRT to the fault handler :func:`start_ranks` turns on)."""
    out = []
    for p, log in procs:
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _dump_and_kill([q for q, _ in procs])
            code = None
        out.append((code, log.read_text()))
    return out


def _dump_and_kill(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """Ask every running process for its stacks (SIGABRT), give it ``grace`` seconds to write them,
    then kill it."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGABRT)
    for p in live:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch_ranks(argv: list[str], world: int, log_dir, timeout: float,
                 env: dict | None = None) -> list[tuple]:
    """:func:`start_ranks`, then :func:`wait_ranks`."""
    return wait_ranks(start_ranks(argv, world, log_dir, env=env), timeout)
