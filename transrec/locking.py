"""Exclusive, atomic building of a cache folder shared by several processes; whether a pid runs.

Used by the dataset's token and image caches, the frozen-prefix stores and the run folder's lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path

from transrec.errors import DataError
from transrec.storage import WriteFailed, check_space, failure_line, guarded_write, is_write_failure


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


@contextlib.contextmanager
def locked_build(final: Path, lock_timeout: float, what: str, *, needed: int | None = None,
                 basis: str = "its arrays' size"):
    """Exclusive build of the folder ``final``: yields a temporary folder to fill, renamed to
    ``final`` on success; yields None when another process finished it while this one waited.
    Temporary folders of ``final`` left by a killed builder are removed before a new build.

    ``needed``: the bytes the build will write, when known: less free space stops it before anything
    is written. A write that fails inside (a full disk, a quota) removes the temporary folder and
    raises :class:`~transrec.storage.WriteFailed` (one line, exit 74); any other error removes it
    too and propagates."""
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f"{final.name}.lock"
    with open(lock_path, "a+") as lock:
        deadline = time.monotonic() + lock_timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DataError(f"{lock_path}: waited {lock_timeout:.0f}s for another process "
                                    f"building this {what}") from None
                time.sleep(0.2)
        try:
            if (final / "meta.json").is_file():
                yield None
                return
            # This process holds the lock, so no other builder of ``final`` is running: a temporary
            # folder of it that is still here was left by a builder that died.
            for stale in final.parent.glob(f"{final.name}.tmp*"):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            doing = f"building the {what}"
            check_space(doing, final, needed, basis=basis)
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp", dir=final.parent))
            except OSError as exc:
                if not is_write_failure(exc):
                    raise
                raise WriteFailed(failure_line(doing, final, needed=needed, written=0, basis=basis,
                                               reason=os.strerror(exc.errno))) from None
            with guarded_write(doing, final, tmp, needed=needed, basis=basis):
                yield tmp
                os.replace(tmp, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
