"""Writing to disk without losing what was there: one-line errors when a disk fills, and no debris.

Checkpoints, exports, the item cache and the prefix cache are all written the same way: into a
temporary folder beside the destination, renamed into place when complete. When a write fails
(``ENOSPC`` no space, ``EDQUOT`` quota, ``EIO``, ``EROFS`` a read-only remount, or torch's own
"file write failed" from its zip writer) :func:`guarded_write` removes the temporary, leaves every
complete folder as it was, and raises :class:`WriteFailed`: one line naming the folder, the bytes the
write needed (or had written when it failed) and the bytes free. The command line exits with
:data:`EXIT_WRITE_FAILED` for it, so a scheduler can tell a full disk from a bad configuration.

:func:`check_space` is the check before a write whose size is known from the last one (a checkpoint
is about as large as the previous checkpoint): too little free space stops cleanly, before anything
is written.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transrec.errors import UserError

EXIT_WRITE_FAILED = 74  # sysexits' EX_IOERR: an input/output error, not a usage error
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
# torch.save reports a failed write through its zip writer as a RuntimeError with these words
_TORCH_WRITE_WORDS = ("PytorchStreamWriter", "inline_container", "file write failed", "unexpected pos")


class WriteFailed(UserError):
    """A write that failed for lack of space (or a disk error): nothing complete was changed."""

    exit_code = EXIT_WRITE_FAILED


def is_write_failure(exc: BaseException) -> bool:
    """True for the errors a full, over-quota, failing or read-only file system raises."""
    if isinstance(exc, OSError):
        return exc.errno in WRITE_ERRNOS
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return any(w in text for w in _TORCH_WRITE_WORDS)
    return False


def free_bytes(path: str | Path) -> int | None:
    """Bytes available to this user on the file system holding ``path`` (its nearest existing
    ancestor); None when unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def folder_bytes(path: str | Path) -> int:
    """Total size of the files under ``path`` (0 when it does not exist)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def human(n: int | None) -> str:
    """``1.5 MB``-style bytes (decimal units); ``unknown`` for None."""
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return "the write failed (no space left on the device?)"


def failure_line(what: str, folder: Path, *, needed: int | None, written: int | None,
                 reason: str) -> str:
    free = free_bytes(folder)
    need = (f"it needs about {human(needed)} (the last one's size)" if needed
            else f"{human(written)} were written before it failed")
    return f"{what} in {folder} failed: {reason}; {need}, {human(free)} free; nothing complete was changed"


@contextmanager
def guarded_write(what: str, folder: str | Path, tmp: str | Path, *,
                  needed: int | None = None) -> Iterator[None]:
    """Run a write into the temporary ``tmp``: a write failure inside removes ``tmp`` and raises
    :class:`WriteFailed` (one line); any other error also removes ``tmp`` and propagates."""
    folder, tmp = Path(folder), Path(tmp)
    try:
        yield
    except BaseException as exc:
        written = folder_bytes(tmp) if tmp.exists() else None
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_write_failure(exc):
            raise WriteFailed(failure_line(what, folder, needed=needed, written=written,
                                           reason=_reason(exc))) from None
        raise


def space_short(folder: str | Path, needed: int | None) -> bool:
    """True when the free space under ``folder`` is known and smaller than ``needed``."""
    free = free_bytes(folder)
    return bool(needed) and free is not None and free < needed


def short_line(what: str, folder: str | Path, needed: int | None, *, elsewhere: bool = False) -> str:
    """The one line of a write stopped before it began for lack of space."""
    free = ("another rank's file system has less than that free" if elsewhere
            else f"{human(free_bytes(folder))} are free")
    return (f"{what} in {folder} stopped before writing: it needs about {human(needed)} (the last "
            f"one's size) and {free}; free some space and run the same command again")


def check_space(what: str, folder: str | Path, needed: int | None) -> None:
    """WriteFailed (one line) when the free space under ``folder`` is known and smaller than
    ``needed`` (a write of about that size is coming); nothing when either is unknown."""
    if space_short(folder, needed):
        raise WriteFailed(short_line(what, folder, needed))
