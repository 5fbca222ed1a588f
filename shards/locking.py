"""Exclusive, atomic building of a cache folder shared by several processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path

from transrec.errors import DataError


@contextlib.contextmanager
def locked_build(final: Path, lock_timeout: float, what: str):
    """Exclusive build of the folder ``final``: yields a temporary folder to fill, renamed to
    ``final`` on success; yields None when another process finished it while this one waited."""
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
            tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp", dir=final.parent))
            try:
                yield tmp
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
