"""Run a function on several gloo ranks in spawned processes, with a timeout so that a hung rank
fails the test instead of stalling the suite."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def launch_ranks(argv: list[str], world: int, log_dir, timeout: float,
                 env: dict | None = None) -> list[tuple]:
    """Run the command ``argv`` once per rank with the launcher variables a ``torchrun`` would set
    (one thread each); ``[(exit code, log text)]`` per rank. A rank still running after ``timeout``
    seconds is killed and reported with exit code None."""
    import os
    import subprocess
    from pathlib import Path

    port = free_port()
    procs = []
    for r in range(world):
        rank_env = dict(os.environ, **(env or {}), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
                        PYTHONUNBUFFERED="1")
        log = Path(log_dir) / f"rank{r}-{port}.log"
        with open(log, "w") as f:
            procs.append((subprocess.Popen(argv, env=rank_env, stdout=f, stderr=subprocess.STDOUT), log))
    out = []
    for p, log in procs:
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            code = None
        out.append((code, log.read_text()))
    return out
