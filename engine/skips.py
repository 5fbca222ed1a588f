"""Skipped bad input of a run, counted per loader: the training skip rate and ``data.json``.

Every :class:`~transrec.shards.loader.SequenceLoader` counts the rows it drops in its own ``stats``.
A :class:`LoaderSkips` adds up the loaders of one split, read one after another (training: one
loader an epoch; evaluation: one a read). Only the training loaders' counts, over the sequences they
read, make the sequence skip rate that ``data.max_skip_rate`` limits: an evaluation re-reads the same
shards at every evaluation, and what it drops is reported beside the training figures, never counted
against them. :class:`SkipReport` is the run's ``data.json``: the item cache's skips, the training
loaders' and the evaluation loaders'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transrec.engine import distributed as D
from transrec.engine.data import epoch_line
from transrec.errors import DataError
from transrec.shards.stats import SEQUENCE_KINDS, SkipStats, item_summary, sequence_summary, skip_violation

EVAL_SPLITS = ("valid", "test")


class LoaderSkips:
    """Rows the loaders of one split dropped as bad input, by kind, and the sequences they read.

    ``rows_per_sequence``: training samples a sequence gives (``data.windows``); the rate's base
    counts sequences, so a row read adds ``1 / rows_per_sequence`` of one.
    """

    def __init__(self, split: str, rows_per_sequence: float = 1.0):
        self.split = split
        self.rows_per_sequence = float(rows_per_sequence)
        self.reads = 0  # loaders followed
        self.sequences_read = 0.0
        self._done: dict[str, int] = {}  # counts of the loaders read before the current one
        self._live: SkipStats | None = None  # the current loader's counter

    def follow(self, loader):
        """Count ``loader``'s skips from now on, after those of the loaders before it; returns it."""
        if self._live is not None:
            self._done = self.counts
        self._live = loader.stats
        self.reads += 1
        return loader

    def rows(self, n: int) -> None:
        """``n`` rows of the split were read (the rate's base)."""
        self.sequences_read += n / self.rows_per_sequence

    @property
    def counts(self) -> dict[str, int]:
        """Rows dropped, by kind, over every loader followed."""
        out = dict(self._done)
        for k, v in (self._live.counts if self._live is not None else {}).items():
            out[k] = out.get(k, 0) + int(v)
        return out

    @property
    def total(self) -> int:
        """Rows dropped, all kinds."""
        return sum(self.counts.values())

    @property
    def dropped(self) -> int:
        """Whole sequences dropped (:data:`~transrec.shards.stats.SEQUENCE_KINDS`)."""
        return sum(v for k, v in self.counts.items() if k in SEQUENCE_KINDS)

    def summary(self) -> dict:
        """Sequences read and dropped, the rate, every kind's count and rate
        (:func:`~transrec.shards.stats.sequence_summary`)."""
        return sequence_summary(sequences_read=round(self.sequences_read), loader_skips=self.counts)

    @property
    def rate(self) -> float:
        """Share of the sequences seen that were dropped whole."""
        return self.summary()["rate"]

    def violation(self, max_rate: float) -> str | None:
        """One line when the rate is above ``max_rate``; else None."""
        return skip_violation({"sequences": self.summary()}, max_rate)

    def reported(self) -> dict:
        """What an evaluation split's reads dropped, summed over its reads (no rate: the sequences an
        evaluation reads are not counted)."""
        return {"reads": self.reads, "skipped": self.dropped,
                "by_kind": {k: {"count": int(v)} for k, v in sorted(self.counts.items()) if v}}


class SkipReport:
    """The run's skipped input: the item cache's (from the content source's ``valid`` and
    ``skipped``), the training loaders' (checked against ``max_rate``) and the evaluation
    loaders' (reported). :meth:`write` puts the summary in ``data.json`` when ``path`` is given."""

    def __init__(self, ds, content, *, max_rate: float, path: Path | None = None):
        self.dataset = ds.path
        self.n_items = int(ds.n_items)
        self.n_train = sum(int(sh.n_train) for sh in ds.seq_shards)  # training sequences
        self.max_rate = float(max_rate)
        self.path = path
        valid = getattr(content, "valid", None)
        self.item_skips = {k: int(v) for k, v in dict(getattr(content, "skipped", {}) or {}).items()}
        self.items_invalid = 0 if valid is None else int((~np.asarray(valid, dtype=bool)).sum())
        self.epoch: dict = {}  # what an epoch is (set when training starts)
        self.train = LoaderSkips("train")
        self.evaluation = {split: LoaderSkips(split) for split in EVAL_SPLITS}

    def loader(self, split: str) -> LoaderSkips:
        """The counts of ``split``'s loaders ("train", "valid" or "test")."""
        return self.train if split == "train" else self.evaluation[split]

    def items(self) -> dict:
        """The item cache's skips with their rate (:func:`~transrec.shards.stats.item_summary`)."""
        return item_summary(n_items=self.n_items, items_invalid=self.items_invalid,
                            item_skips=self.item_skips)

    def summary(self) -> dict:
        """``items`` and ``sequences`` (training) with their rates, ``evaluation`` per split read."""
        return {"dataset": str(self.dataset), "max_skip_rate": self.max_rate,
                **({"epoch": self.epoch} if self.epoch else {}), "items": self.items(),
                "sequences": self.train.summary(),
                "evaluation": {s: ls.reported() for s, ls in self.evaluation.items() if ls.reads}}

    def write(self) -> dict:
        """The summary, written to ``data.json`` when the report has a path."""
        summary = self.summary()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def items_line(self) -> str | None:
        """The console line naming the items the item cache dropped (None when it dropped none)."""
        if not self.items_invalid:
            return None
        items = self.items()
        kinds = ", ".join(f"{k} {v['count']}" for k, v in items["by_kind"].items())
        return (f"data: {self.items_invalid} of {self.n_items} items skipped as bad input "
                f"({items['rate']:.1%}: {kinds})")

    def check_items(self, log=None) -> None:
        """At start-up: ``data.json`` written, the items line through ``log`` (rank 0's ``say``, or
        None), and a DataError (exit 2) when the items' skip rate is above ``max_rate``."""
        self.write()
        line = self.items_line()
        if line and log is not None:
            log(line)
        self.check()

    def start_epochs(self, facts: dict, log=None) -> None:
        """What an epoch is (:func:`~transrec.engine.data.epoch_facts`): ``data.json``'s ``"epoch"``,
        the training samples a sequence gives (the skip rate counts sequences), and the start line
        through ``log`` (rank 0's ``say``, or None)."""
        self.epoch = facts
        self.train.rows_per_sequence = max(facts["samples"], 1) / max(self.n_train, 1)
        if log is not None:
            log(epoch_line(facts))
            self.write()

    def check(self, *, world: int = 1, device=None) -> None:
        """DataError when the items' or the training sequences' skip rate is above ``max_rate``;
        over ``world`` > 1 ranks every rank stops when one does (a collective)."""
        line = skip_violation({"items": self.items()}, self.max_rate) or self.train.violation(self.max_rate)
        if D.any_rank(line is not None, device, world) and line is None:
            line = "another rank's sequences were skipped above data.max_skip_rate (see its line)"
        if line is not None:
            raise DataError(f"{self.dataset}: {line}")
