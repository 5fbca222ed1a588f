"""Writing to disk without losing what was there: one-line errors when a disk fills, and no debris.

Checkpoints, exports, the item cache and the prefix cache are all written the same way: into a
temporary folder beside the destination, renamed into place when complete. When a write fails
(``ENOSPC`` no space, ``EDQUOT`` quota, ``EIO``, ``EROFS`` a read-only remount, or torch's own
"file write failed" from its zip writer) :func:`guarded_write` removes the temporary, leaves every
complete folder as it was, and raises :class:`WriteFailed`: one line naming the folder, the bytes the
write needed (or had written when it failed) and the bytes free. The command line exits with
:data:`EXIT_WRITE_FAILED` for it, so a scheduler can tell a full disk from a bad configuration.

:func:`check_space` is the check before a write whose size is known in advance (a checkpoint is
about as large as the previous checkpoint; an export, an item cache and a prefix cache are computed
from their arrays): too little free space stops cleanly, before anything is written.
:func:`allocate` reserves a memory-mapped file's blocks up front, so a disk that fills while the
file is filled is an error, not a crash.
"""

from __future__ import annotations

import errno
import os
import shutil
import traceback
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


def _written(st: os.stat_result) -> int:
    # a sparse file (made at full size by seeking, as a memory map is) holds only its written blocks
    return min(st.st_size, st.st_blocks * 512)


def folder_bytes(path: str | Path) -> int:
    """Bytes written to the files under ``path`` (0 when it does not exist): each file's size, or
    the blocks it holds when that is less (a sparse file)."""
    p = Path(path)
    if p.is_file():
        return _written(p.stat())
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            try:
                total += _written(os.lstat(os.path.join(root, f)))
            except OSError:
                pass
    return total


def human(n: float | None) -> str:
    """``1.5 MiB``-style bytes (binary units); ``unknown`` for None."""
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return "the write failed (no space left on the device?)"


LAST_SIZE = "the last one's size"  # how a checkpoint's size is known before it is written


def failure_line(what: str, folder: Path, *, needed: int | None, written: int | None,
                 reason: str, basis: str = LAST_SIZE) -> str:
    free = free_bytes(folder)
    need = (f"it needs about {human(needed)} ({basis})" if needed
            else f"{human(written)} were written before it failed")
    return f"{what} in {folder} failed: {reason}; {need}, {human(free)} free; nothing complete was changed"


@contextmanager
def guarded_write(what: str, folder: str | Path, tmp: str | Path, *,
                  needed: int | None = None, basis: str = LAST_SIZE) -> Iterator[None]:
    """Run a write into the temporary ``tmp``: a write failure inside removes ``tmp`` and raises
    :class:`WriteFailed` (one line; ``needed`` bytes, known from ``basis``, or else the bytes
    written so far); any other error also removes ``tmp`` and propagates."""
    folder, tmp = Path(folder), Path(tmp)
    try:
        yield
    except BaseException as exc:
        failed = isinstance(exc, Exception) and is_write_failure(exc)
        if failed:
            # the failed writer's objects (an open file of the temporary) live on in the frames of
            # the error's tracebacks (and of the errors it was raised during); released now, the
            # removed temporary's space is free when the line reports it
            seen, err = set(), exc
            while err is not None and id(err) not in seen:
                seen.add(id(err))
                traceback.clear_frames(err.__traceback__)
                err = err.__cause__ or err.__context__
        written = folder_bytes(tmp) if tmp.exists() else None
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink(missing_ok=True)
        if failed:
            raise WriteFailed(failure_line(what, folder, needed=needed, written=written,
                                           reason=_reason(exc), basis=basis)) from None
        raise


def temporary_beside(what: str, out: Path, *, needed: int | None = None, basis: str = LAST_SIZE,
                     noun: str = "it") -> Path:
    """A fresh temporary folder ``.NAME.tmp-PID`` beside the folder ``out`` (parents made), where a
    folder is built before :func:`replace_folder` puts it in place: a failed write is
    :class:`WriteFailed` (one line), any other refusal one line naming ``out``."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        if is_write_failure(exc):
            raise WriteFailed(failure_line(what, out, needed=needed, written=None,
                                           reason=exc.strerror or str(exc), basis=basis)) from None
        raise UserError(f"{out}: cannot write {noun} there ({exc.strerror or exc})") from None
    return tmp


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at ``out``: an earlier ``out`` stays whole until the new one
    is in place, then goes."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def space_short(folder: str | Path, needed: int | None) -> bool:
    """True when the free space under ``folder`` is known and smaller than ``needed``."""
    free = free_bytes(folder)
    return bool(needed) and free is not None and free < needed


def short_line(what: str, folder: str | Path, needed: int | None, *, elsewhere: bool = False,
               basis: str = LAST_SIZE) -> str:
    """The one line of a write stopped before it began for lack of space."""
    free = ("another rank's file system has less than that free" if elsewhere
            else f"{human(free_bytes(folder))} are free")
    return (f"{what} in {folder} stopped before writing: it needs about {human(needed)} ({basis}) "
            f"and {free}; free some space and run the same command again")


def check_space(what: str, folder: str | Path, needed: int | None, *, basis: str = LAST_SIZE) -> None:
    """WriteFailed (one line) when the free space under ``folder`` is known and smaller than
    ``needed`` (a write of about that size is coming, its size known from ``basis``); nothing when
    either is unknown."""
    if space_short(folder, needed):
        raise WriteFailed(short_line(what, folder, needed, basis=basis))


def allocate(path: str | Path) -> None:
    """Reserve the disk blocks of the whole file ``path`` now (``posix_fallocate`` of its size).

    A file made at its full size by seeking (numpy's ``open_memmap``) holds no blocks yet; filling
    it through a memory map on a full disk kills the process with SIGBUS instead of raising. After
    this, a full disk is an ``OSError`` (ENOSPC) here, before any value is written. A file system
    that cannot reserve blocks (``EOPNOTSUPP``, ``EINVAL``) is left as it is."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
