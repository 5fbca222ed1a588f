"""Counters of skipped bad input and a rate-limited warning.

Bad input inside shards (a corrupt image, an empty title, an unknown item id in a sequence, a
truncated tar, a duplicate key, ...) is skipped, never a crash mid-epoch, and never silent: every
skip increments a named counter and emits a warning through the ``transrec.shards`` logger, at most
one per ``interval`` seconds per reason (with the number suppressed since the last one).

Each loader and cache build owns a :class:`SkipStats`; ``GLOBAL`` adds up everything in this
process (every split's loaders, every cache build). A run's skip rate is counted per loader, from each
loader's own ``stats`` (:mod:`transrec.engine.skips`): evaluation re-reads the sequences a training
run reads, so the process total says nothing about one split.
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


# Loader kinds that drop a whole sequence; the others count item ids within a kept sequence.
SEQUENCE_KINDS = ("unreadable_shard", "missing_sequence_json", "duplicate_user", "corrupt_sequence")


def _by_kind(counts: dict[str, int], denom: int) -> dict[str, dict]:
    return {k: {"count": int(v), "rate": int(v) / max(1, denom)} for k, v in sorted(counts.items()) if v}


def item_summary(*, n_items: int, items_invalid: int, item_skips: dict[str, int]) -> dict:
    """Item content dropped while building the item cache, with rates over the dataset's items."""
    return {"total": int(n_items), "skipped": int(items_invalid),
            "rate": int(items_invalid) / max(1, n_items), "by_kind": _by_kind(item_skips, n_items)}


def sequence_summary(*, sequences_read: int, loader_skips: dict[str, int]) -> dict:
    """Rows a split's loaders dropped: whole sequences (:data:`SEQUENCE_KINDS`) with their rate over
    the sequences seen (read plus dropped), and every kind's count and rate."""
    seq_dropped = sum(int(v) for k, v in loader_skips.items() if k in SEQUENCE_KINDS)
    seen = int(sequences_read) + seq_dropped
    return {"read": int(sequences_read), "skipped": seq_dropped, "rate": seq_dropped / max(1, seen),
            "by_kind": _by_kind(loader_skips, seen)}


def skip_summary(*, n_items: int, items_invalid: int, item_skips: dict[str, int], sequences_read: int,
                 loader_skips: dict[str, int]) -> dict:
    """Skipped input of a run: item content dropped while building the item cache (rates over the
    dataset's items) and rows dropped by the sequence loaders (rates over the sequences read)."""
    return {"items": item_summary(n_items=n_items, items_invalid=items_invalid, item_skips=item_skips),
            "sequences": sequence_summary(sequences_read=sequences_read, loader_skips=loader_skips)}


def skip_violation(summary: dict, max_rate: float) -> str | None:
    """One line when the share of skipped items or of skipped sequences is above ``max_rate``
    (naming the rate, the main kind and the setting that raises the threshold); else None. Either
    part may be left out of ``summary``."""
    for what, kinds in (("items", None), ("sequences", SEQUENCE_KINDS)):
        s = summary.get(what)
        if s is None or s["rate"] <= max_rate or not s["skipped"]:
            continue
        by_kind = {k: v for k, v in s["by_kind"].items() if kinds is None or k in kinds}
        kind = max(by_kind, key=lambda k: by_kind[k]["count"]) if by_kind else "unknown"
        of = s["total"] if what == "items" else s["read"] + s["skipped"]
        return (f"{s['rate']:.1%} of {what} skipped as bad input ({s['skipped']} of {of}; mostly {kind}: "
                f"{by_kind.get(kind, {}).get('count', 0)}), above data.max_skip_rate={max_rate:g}; "
                f"repair the data, or accept it with data.max_skip_rate={min(1.0, s['rate'] + 0.01):.2f}")
    return None
