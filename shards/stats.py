"""Counters of skipped bad input and a rate-limited warning.

Bad input inside shards (a corrupt image, an empty title, an unknown item id in a sequence, a
truncated tar, a duplicate key, ...) is skipped, never a crash mid-epoch, and never silent: every
skip increments a named counter and emits a warning through the ``transrec.shards`` logger, at most
one per ``interval`` seconds per reason (with the number suppressed since the last one).

Each loader and cache build owns a :class:`SkipStats`; ``GLOBAL`` adds up everything in this
process, so an engine can read ``transrec.shards.stats.GLOBAL.counts`` at any time.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("transrec.shards")


class SkipStats:
    def __init__(self, interval: float = 10.0, parent: SkipStats | None = None, where: str = ""):
        self.counts: dict[str, int] = {}
        self.interval = float(interval)
        self.parent = parent
        self.where = where
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def skip(self, reason: str, detail: str = "", n: int = 1) -> None:
        """Count ``n`` skipped inputs of kind ``reason`` and warn (rate-limited)."""
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + n
            now = time.monotonic()
            last = self._last.get(reason)
            if last is None or now - last >= self.interval:
                more = self._suppressed.pop(reason, 0)
                self._last[reason] = now
                tail = f" (+{more} more since the last warning)" if more else ""
                where = f"{self.where}: " if self.where else ""
                log.warning("%sskipped bad input [%s] %s%s", where, reason, detail, tail)
            else:
                self._suppressed[reason] = self._suppressed.get(reason, 0) + n
        if self.parent is not None:
            self.parent.add({reason: n})

    def add(self, counts: dict[str, int]) -> None:
        """Merge counts (e.g. reported by a DataLoader worker) without warning again."""
        if not counts:
            return
        with self._lock:
            for k, v in counts.items():
                self.counts[k] = self.counts.get(k, 0) + int(v)
        if self.parent is not None:
            self.parent.add(counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"SkipStats({self.counts})"


GLOBAL = SkipStats()
