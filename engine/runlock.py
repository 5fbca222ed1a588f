"""One writer per run folder: ``RUN/train.lock``, held by the process that trains into it.

The lock is an ``fcntl.flock`` on the file, so it ends with its process whatever the way it ends;
the file holds the holder's host and pid (JSON) so a refusal can name it. Taking the lock:

- the flock is held by another open file (another process, or another trainer of this one): refused;
- the flock is free but the file names a live process on this host (other than this one), or a
  process on another host (whose life cannot be checked from here): refused, naming it;
- the flock is free and the file names a dead process on this host: taken over, with one line;
- otherwise taken; the file then names this process.

Released (the file removed) by :meth:`RunLock.release`; a killed process leaves the file and no flock,
which the next run on the same host takes over. Over several ranks, :func:`lock_run_folder` has rank 0
take it and every rank stop when it could not.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

from transrec.engine import distributed as D
from transrec.errors import UserError
from transrec.locking import pid_alive

LOCK_FILE = "train.lock"


class RunFolderBusy(UserError):
    """Another process writes the run folder."""


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        rec = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _busy(run_dir: Path, path: Path, holder: dict) -> RunFolderBusy:
    who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    return RunFolderBusy(f"{run_dir}: another process writes this run folder ({who}; lock {path}); "
                         "wait for it to end or pick another --out (remove the lock file only if that "
                         "process is gone)")


class RunLock:
    """The lock of one run folder; :meth:`acquire` takes it or raises :class:`RunFolderBusy`."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, log: Callable[[str], None] = print) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        host, pid = socket.gethostname(), os.getpid()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise _busy(self.run_dir, self.path, _holder(fd)) from None
                try:  # the file may have been released (removed) between open and flock: retry
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                old = _holder(fd)
                old_pid = old.get("pid")
                if old.get("host") is not None and old_pid is not None and old_pid != pid:
                    if old["host"] != host or pid_alive(int(old_pid)):
                        raise _busy(self.run_dir, self.path, old)
                    log(f"{self.run_dir}: taking over the stale lock of pid {old_pid} on {host} "
                        "(no longer running)")
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, json.dumps({"host": host, "pid": pid}).encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return self

    def release(self) -> None:
        """Remove the file, then drop the flock (in that order, see the inode check in acquire)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def lock_run_folder(run_dir: str | Path, *, rank: int, world: int, device=None,
                    log: Callable[[str], None] = print) -> RunLock:
    """Rank 0 takes the run folder's lock; every rank raises :class:`RunFolderBusy` when it could
    not (over ``world`` > 1 ranks a collective: one all-reduce of the outcome)."""
    lock = RunLock(run_dir)
    busy = None
    if rank == 0:
        try:
            lock.acquire(log=log)
        except RunFolderBusy as exc:
            busy = exc
    if D.any_rank(busy is not None, device, world) and busy is None:  # a rank that never held it
        busy = RunFolderBusy(f"{lock.run_dir}: another process writes this run folder (named on rank 0)")
    if busy is not None:
        raise busy
    return lock


def check_run_dir(run_dir: Path) -> None:
    """One line instead of a traceback later: the run folder must be (or become) a writable folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder; pass a folder to --out")
    probe = run_dir if run_dir.exists() else next((p for p in run_dir.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{run_dir}: cannot write there ({probe} is not writable)")
