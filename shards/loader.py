"""Streaming sequence loader: sequence shards -> windows -> :class:`~transrec.shards.batch.Batch`.

Sequence shards are read with ``webdataset.WebDataset`` (no pickle decoders, a handler that skips
and counts unreadable input, ``empty_check=False``), split across ranks by a node splitter and
across DataLoader workers by a worker splitter with webdataset's ``split_by_node`` /
``split_by_worker`` semantics (``urls[rank::world_size]``, then ``[worker::num_workers]``).

**Slots.** A rank with ``W`` workers has ``W`` *slots*; each slot owns a share of the shards and
yields exactly ``P`` batches of exactly ``batch_size`` rows per epoch, so every rank yields
``len(loader) = W * P`` batches whatever the shard layout. Batches come out round-robin over the
slots (rank-level batch ``i`` is slot ``i % W``'s batch ``i // W``).

**Samples** (training split). ``windows`` picks the samples a user's training part gives
(:mod:`~transrec.shards.windows`): ``"last"`` one window of its last ``max_len + 1`` items (the
default), ``"sliding"`` windows covering the whole part with each item after the first a target
once, ``"prefixes"`` one window per target position. The samples per shard (for ``"last"`` the
manifest's ``n_train``; otherwise counted from the sequence lengths, see that module) fix ``P``.
A user's samples enter the shuffle buffer one after another like any rows, so they spread over
batches; a buffer smaller than a user's sample count (``"prefixes"`` on long histories) leaves some
of them close together.

**Policy** (training split). ``"repeat"``: ``P`` is large enough for the slot that could receive
the most samples; a slot that runs out starts another pass over its shards (freshly shuffled), so
every sample is seen at least once per epoch. ``"drop"``: ``P`` fits the slot that could receive
the fewest samples; the rest of each slot's samples are left out of that epoch (different ones
each epoch). Evaluation splits (``"valid"``, ``"test"``) never shuffle and cover every evaluated
user exactly once over all ranks; slots that run out pad their last batches with filler rows
marked ``row_valid = False``.

**Order and resume.** Per epoch, the shard order is a permutation drawn from ``(seed, epoch)``;
each slot shuffles its rows with a buffer whose generator is seeded from ``(seed, epoch, rank,
slot, pass)``. So the batches are a pure function of ``(seed, epoch)`` for a given dataset,
``batch_size``, ``max_len``, ``windows``, ``world_size`` and ``num_workers``. ``Batch.cursor`` is the global
(all-rank) sample cursor within the epoch after that batch, ``(i + 1) * batch_size * world_size``;
a loader constructed with ``start_cursor=c`` yields exactly the batches after ``c`` for its first
epoch (later epochs start at 0). Keep ``max_len`` and ``windows`` when resuming.

**Another layout.** An epoch begun by ``N`` ranks with ``W`` workers and batches of ``b`` (its
*layout*) can be finished by any other number of ranks, workers and batch size: a loader given
``layout={"world": N, "batch": b, "workers": W}`` reads, for its first epoch, the rows that layout
had not yet handed out, exactly once over its ranks. Those rows, in the layout's own order (batch
``i`` of every old rank in rank order, then batch ``i + 1``, each old rank's batches coming from its
slots' streams as above), form one sequence; ``start_cursor`` counts the rows of it already read,
and global micro-batch ``t`` of the new ranks is its next ``batch_size * world_size`` rows, rank
``r`` taking the ``r``-th ``batch_size`` of them. A rank therefore reads only the old ranks' streams
its rows come from. Rows at the end of the epoch too few for one more batch on every rank are
split evenly over the ranks in a last, smaller batch when they divide, and otherwise left out and
counted in ``replay_left_out`` (never with the default batch split, where the new ranks' global
micro-batch is the old one's). Later epochs use the loader's own layout.

**Splits** (leave-one-out, on the sequence after unusable items are dropped): training rows are
windows of at most ``max_len + 1`` items of the training part (all but the last two items; all
items for users with fewer than 3 interactions), as ``windows`` says; validation rows end at the
second-to-last item, test rows at the last, each with up to ``max_len`` items of history before it
and ``hist_rows`` / ``hist_items`` over the whole earlier history.

**Bad input** (skipped, counted in ``loader.stats`` and ``transrec.shards.stats.GLOBAL``, with a
rate-limited warning): an unreadable or truncated shard, a sample without JSON or with malformed
JSON, a duplicate user key, an item id not in the dataset, an item whose content is invalid in the
content source (``content.valid`` False).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds

from transrec.errors import DataError
from transrec.shards.batch import Batch, ContentSource, collate_windows, map_leaves, map_tensors
from transrec.shards.dataset import Dataset
from transrec.shards.format import eval_target, train_part
from transrec.shards.remote import StoreError
from transrec.shards.stats import GLOBAL, SkipStats
from transrec.shards.windows import WINDOWS, samples_per_shard, train_windows

log = logging.getLogger("transrec.shards")
SPLITS = ("train", "valid", "test")
POLICIES = ("repeat", "drop")


class NodeSplit:
    """``split_by_node`` with an explicit rank (webdataset's reads it from torch.distributed)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = int(rank), int(world_size)

    def __call__(self, src):
        yield from (u for i, u in enumerate(src) if i % self.world_size == self.rank)


class WorkerSplit:
    """``split_by_worker`` mapping DataLoader worker ``v`` to slot ``(v + rotation) % W`` (the rotation
    lets a resumed epoch start at the right slot). With no worker info it keeps ``slot``'s share."""

    def __init__(self, n_slots: int, rotation: int = 0, slot: int = 0):
        self.n_slots, self.rotation, self.slot = int(n_slots), int(rotation), int(slot)

    def current_slot(self) -> int:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.slot
        return (info.id + self.rotation) % self.n_slots

    def __call__(self, src):
        slot = self.current_slot()
        yield from (u for i, u in enumerate(src) if i % self.n_slots == slot)


def _done_in_slot(k: int, slot: int, n_slots: int) -> int:
    """How many of the first ``k`` rank-level batches came from ``slot`` (round-robin)."""
    return (k - slot + n_slots - 1) // n_slots if k > slot else 0


def _bound(counts: list[int], k: int, largest: bool) -> int:
    s = sorted(counts, reverse=largest)
    return int(sum(s[:k]))


class _Slot(NamedTuple):
    """Where one tensor of a packed batch lies in its byte buffer."""

    offset: int
    dtype: torch.dtype
    shape: tuple


def pack_batch(batch: Batch) -> tuple[torch.Tensor, Batch]:
    """One uint8 tensor holding every tensor of ``batch`` (8-byte aligned), and the batch's
    skeleton: the same dataclasses with a :class:`_Slot` in place of each tensor.

    A DataLoader worker hands each tensor to the main process through its own shared-memory
    segment; packing makes that one segment per batch instead of a dozen. Every tensor field is
    found by walking the dataclasses (:func:`~transrec.shards.batch.map_tensors`), so none is left
    behind (the frozen-prefix activations included)."""
    parts: list[tuple[int, torch.Tensor]] = []
    size = 0

    def place(t: torch.Tensor) -> _Slot:
        nonlocal size
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        slot = _Slot(size, t.dtype, tuple(t.shape))
        parts.append((size, raw))
        size += (raw.numel() + 7) // 8 * 8
        return slot

    skeleton = map_tensors(batch, place)
    buf = torch.zeros(size, dtype=torch.uint8)
    for off, raw in parts:
        buf[off:off + raw.numel()] = raw
    return buf, skeleton


def unpack_batch(buf: torch.Tensor, skeleton: Batch) -> Batch:
    """Inverse of :func:`pack_batch`: tensors are views of ``buf`` (no copy)."""
    def view(s: _Slot) -> torch.Tensor:
        n = math.prod(s.shape) * s.dtype.itemsize
        return buf[s.offset:s.offset + n].view(s.dtype).reshape(s.shape)

    return map_leaves(skeleton, view, lambda v: isinstance(v, _Slot))


class _SlotStream(torch.utils.data.IterableDataset):
    """One epoch of batches for every slot of one rank; in a DataLoader worker, that worker's slot."""

    def __init__(self, loader: SequenceLoader, epoch: int, start_batches: int):
        super().__init__()
        self.ld = loader
        self.epoch = epoch
        self.start_batches = start_batches
        self.rotation = start_batches % loader.effective_workers
        self.packed = loader.num_workers > 0  # batches cross a process boundary

    # ---- rows -------------------------------------------------------------------------------
    def _urls(self) -> list[str]:
        ld = self.ld
        shards = [str(s.path) for s in ld.dataset.seq_shards]
        if ld.split == "train":
            perm = np.random.default_rng([ld.seed, self.epoch, 7]).permutation(len(shards))
            shards = [shards[i] for i in perm]
        return shards

    def _rows(self, slot: int, n_pass: int, stats: SkipStats, splitter: WorkerSplit) -> Iterator[tuple]:
        ld = self.ld

        def handler(exn: Exception) -> bool:
            if isinstance(exn, StoreError):  # a store that cannot serve a shard stops the run
                raise exn
            stats.skip("unreadable_shard", f"{type(exn).__name__}: {exn}"[:300])
            return True

        ds = wds.WebDataset(self._urls(), shardshuffle=False, nodesplitter=NodeSplit(ld.rank, ld.world_size),
                            workersplitter=splitter, handler=handler, empty_check=False)
        index, valid = ld.item_index, ld.valid
        seen: set[str] = set()
        max_len, split, mode = ld.max_len, ld.split, ld.windows
        for sample in ds:
            key = sample.get("__key__", "")
            raw = sample.get("json")
            if raw is None:
                stats.skip("missing_sequence_json", f"{key}")
                continue
            if key in seen:
                stats.skip("duplicate_user", f"{key}")
                continue
            seen.add(key)
            try:
                obj = json.loads(raw)
                ids = obj["items"]
                user = int(obj.get("index", -1))
                if not isinstance(ids, list):
                    raise TypeError("items is not a list")
            except (ValueError, KeyError, TypeError) as exc:
                stats.skip("corrupt_sequence", f"{key}: {type(exc).__name__}")
                continue
            idx = [index.get(k, -1) if isinstance(k, str) else -1 for k in ids]
            arr = np.fromiter(idx, dtype=np.int64, count=len(idx))
            bad = arr < 0
            if bad.any():
                named = ", ".join(repr(ids[i]) for i in np.flatnonzero(bad)[:3])
                stats.skip("unknown_item", f"user {key}: {int(bad.sum())} unknown item ids ({named}"
                           f"{', ...' if bad.sum() > 3 else ''})", n=int(bad.sum()))
                arr = arr[~bad]
            if valid is not None and arr.size:
                ok = valid[arr]
                if not ok.all():
                    stats.skip("item_without_content", f"user {key}", n=int((~ok).sum()))
                    arr = arr[ok]
            if split == "train":
                part = train_part(arr)
                if part.size < 2:
                    continue
                if mode == "last":
                    yield user, part[-(max_len + 1):], None
                else:
                    for window in train_windows(part, max_len, mode):
                        yield user, window, None
            else:
                held_out = eval_target(arr, split)
                if held_out is None:
                    continue
                hist, target = held_out
                yield user, np.append(hist[-max_len:], target), hist[hist != target]

    def _train_rows(self, slot: int, stats: SkipStats, splitter: WorkerSplit) -> Iterator[tuple]:
        """The slot's endless row stream: shuffled passes over its shards."""
        ld = self.ld
        n_pass = 0
        while True:
            rng = np.random.default_rng([ld.seed, self.epoch, ld.rank, slot, n_pass])
            buf: list[tuple] = []
            size = ld.shuffle_buffer
            got = 0
            draws = rng.integers(0, size, size=4096)
            d = 0
            for row in self._rows(slot, n_pass, stats, splitter):
                got += 1
                if len(buf) < size:
                    buf.append(row)
                    continue
                if d == draws.size:
                    draws = rng.integers(0, size, size=4096)
                    d = 0
                j = draws[d]
                d += 1
                yield buf[j]
                buf[j] = row
            order = rng.permutation(len(buf))
            yield from (buf[j] for j in order)
            if got == 0:
                raise DataError(f"{ld.dataset.path}: no usable training sequence in the shards of rank "
                                f"{ld.rank} slot {slot} (all skipped; see the warnings above)")
            n_pass += 1

    def _eval_rows(self, slot: int, stats: SkipStats, splitter: WorkerSplit) -> Iterator[tuple]:
        """One pass over the slot's shards, then filler rows (``row_valid`` False) forever."""
        last = None
        total = self.ld.batches_per_slot * self.ld.batch_size
        emitted = 0
        for row in self._rows(slot, 0, stats, splitter):
            if emitted == total:
                stats.skip("eval_rows_beyond_manifest", "the manifest undercounts evaluation users")
                continue
            last = row
            emitted += 1
            yield row + (True,)
        if last is None:
            first = int(np.flatnonzero(self.ld.valid)[0]) if self.ld.valid is not None else 0
            last = (0, np.array([first], dtype=np.int64), np.zeros(0, np.int64))
        while True:
            yield last + (False,)

    # ---- batches ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Batch, dict]]:
        ld = self.ld
        n_slots = ld.effective_workers
        splitter = WorkerSplit(n_slots, self.rotation)
        info = torch.utils.data.get_worker_info()
        slots = [splitter.current_slot()] if info is not None else None
        if slots is None:  # in-process: interleave all slots round-robin, like a DataLoader would
            yield from self._interleave(n_slots)
            return
        yield from self._slot_batches(slots[0], splitter)

    def _interleave(self, n_slots: int) -> Iterator[tuple[Batch, dict]]:
        gens = [self._slot_batches(s, WorkerSplit(n_slots, 0, slot=s)) for s in range(n_slots)]
        k = self.start_batches
        remaining = [self.ld.batches_per_slot - _done_in_slot(k, s, n_slots) for s in range(n_slots)]
        s = k % n_slots
        while any(remaining):
            if remaining[s]:
                yield next(gens[s])
                remaining[s] -= 1
            s = (s + 1) % n_slots

    def _slot_batches(self, slot: int, splitter: WorkerSplit) -> Iterator[tuple[Batch, dict]]:
        ld = self.ld
        n_slots, bsz = ld.effective_workers, ld.batch_size
        stats = SkipStats(where=f"sequences {ld.dataset.path} [{ld.split}]")
        rows = (self._train_rows if ld.split == "train" else self._eval_rows)(slot, stats, splitter)
        done = _done_in_slot(self.start_batches, slot, n_slots)
        for _ in range(done * bsz):  # resume: skip the rows of batches already consumed
            next(rows)
        reported: dict[str, int] = {}
        length = ld.max_len + 1
        for j in range(done, ld.batches_per_slot):
            chunk = [next(rows) for _ in range(bsz)]
            users = np.fromiter((r[0] for r in chunk), dtype=np.int64, count=bsz)
            windows = [r[1] for r in chunk]
            cursor = (j * n_slots + slot + 1) * bsz * ld.world_size
            if ld.split == "train":
                batch = collate_windows(windows, users, length, ld.content, ld.log_q, cursor=cursor)
            else:
                batch = collate_windows(windows, users, length, ld.content, ld.log_q, cursor=cursor,
                                        history=[r[2] for r in chunk])
                batch.row_valid = torch.from_numpy(np.fromiter((r[3] for r in chunk), dtype=bool,
                                                               count=bsz))
            delta = {k: v - reported.get(k, 0) for k, v in stats.counts.items() if v != reported.get(k, 0)}
            reported = dict(stats.counts)
            yield (pack_batch(batch) if self.packed else batch), delta


class SequenceLoader:
    """Iterable of :class:`Batch` over one split of a dataset (see the module docstring).

    ``content`` is any :class:`~transrec.shards.batch.ContentSource` (the item cache, or a wrapper);
    if it has a boolean ``valid`` array, items marked False are dropped from sequences.
    ``windows`` is the training samples' mode (:data:`~transrec.shards.windows.WINDOWS`);
    ``cache_dir`` where a dataset without recorded sequence lengths caches them (None: the item
    cache's default folder).
    """

    def __init__(self, dataset: Dataset | str, content: ContentSource, *, split: str = "train",
                 batch_size: int, max_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, policy: str = "repeat", start_cursor: int = 0,
                 shuffle_buffer: int = 1000, pin_memory: bool = False, prefetch_factor: int = 4,
                 windows: str = "last", cache_dir: str | None = None, layout: dict | None = None):
        if not isinstance(dataset, Dataset):
            dataset = Dataset.open(dataset)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if windows not in WINDOWS:
            raise ValueError(f"windows must be one of {WINDOWS}, got {windows!r}")
        if batch_size < 1 or max_len < 1:
            raise ValueError("batch_size and max_len must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if content.n_items != dataset.n_items:
            raise DataError(f"{dataset.path}: the content source has {content.n_items} items, "
                            f"the dataset {dataset.n_items}")
        self.dataset, self.content = dataset, content
        self.split, self.policy, self.windows = split, policy, windows
        self.batch_size, self.max_len, self.seed = int(batch_size), int(max_len), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers = int(num_workers)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.item_index = dataset.item_index
        self.log_q = dataset.log_q
        v = getattr(content, "valid", None)
        self.valid = None if v is None else np.asarray(v, dtype=bool)
        self.stats = SkipStats(parent=GLOBAL, where=f"sequences {dataset.path} [{split}]")
        self.epoch = 0

        n_shards = len(dataset.seq_shards)
        if n_shards < self.world_size:
            raise DataError(f"{dataset.path / 'manifest.json'}: {n_shards} sequence shards for "
                            f"{self.world_size} ranks; rebuild with a smaller shard size")
        self.effective_workers = max(1, min(self.num_workers, n_shards // self.world_size))
        if self.num_workers > self.effective_workers:
            log.info("%s: %d sequence shards allow %d workers per rank, not %d", dataset.path, n_shards,
                     self.effective_workers, self.num_workers)
        if split == "train":
            self.shard_samples = samples_per_shard(dataset, self.max_len, windows, cache_dir)
        else:
            self.shard_samples = [int(s.n_eval) for s in dataset.seq_shards]
        self.batches_per_slot = self._plan()
        self.cache_dir = cache_dir
        self.layout = self._other_layout(layout, int(start_cursor))
        self.replay_left_out = 0  # rows of the first epoch's other layout too few to split over the ranks
        self._replay_pending = self.layout is not None  # the first epoch is the other layout's
        step = self.batch_size * self.world_size
        if self.layout is not None:
            self._replay_plan(int(start_cursor))
            start_cursor = 0  # later epochs start at 0
        elif start_cursor % step or not 0 <= start_cursor <= len(self) * step:
            raise ValueError(f"start_cursor {start_cursor} is not a multiple of batch_size*world_size "
                             f"= {step} within the epoch ({len(self) * step} samples)")
        self._start_batches = start_cursor // step

    # ---- an epoch begun in another layout -----------------------------------------------------
    def _other_layout(self, layout: dict | None, start_cursor: int) -> dict | None:
        """``layout`` when it differs from this loader's own, or is its own but ``start_cursor`` falls
        within a batch of it (an epoch left part-way by other ranks); else None. Training split only."""
        if layout is None or self.split != "train":
            return None
        old = {k: int(layout[k]) for k in ("world", "batch", "workers")}
        mine = {"world": self.world_size, "batch": self.batch_size, "workers": self.num_workers}
        return None if old == mine and start_cursor % (self.batch_size * self.world_size) == 0 else old

    def _old_loader(self, rank: int) -> SequenceLoader:
        lay = self.layout
        return SequenceLoader(self.dataset, self.content, split=self.split, batch_size=lay["batch"],
                              max_len=self.max_len, seed=self.seed, rank=rank, world_size=lay["world"],
                              num_workers=lay["workers"], policy=self.policy,
                              shuffle_buffer=self.shuffle_buffer, windows=self.windows,
                              cache_dir=self.cache_dir)

    def _replay_plan(self, start: int) -> None:
        old = self._old_loader(0)
        self._old_batches, self._old_slots = len(old), old.effective_workers
        total = self._old_batches * self.layout["batch"] * self.layout["world"]
        if not 0 <= start <= total:
            raise ValueError(f"start_cursor {start} is outside the epoch of the layout {self.layout} "
                             f"({total} rows)")
        g = self.batch_size * self.world_size
        rest = total - start
        self._replay_start, self._replay_total = start, total
        self._replay_full, tail = rest // g, rest % g
        self._replay_tail = tail // self.world_size if tail % self.world_size == 0 else 0
        self.replay_left_out = tail if tail % self.world_size else 0
        whole, whole_tail = total // g, total % g
        self._replay_len = whole + (1 if whole_tail and whole_tail % self.world_size == 0 else 0)

    def _replay(self) -> Iterator[Batch]:
        """This rank's batches of the rest of the first epoch, as the other layout laid it out."""
        lay, bsz, world = self.layout, self.batch_size, self.world_size
        b_old, n_old, slots = lay["batch"], lay["world"], self._old_slots
        stats = SkipStats(where=f"sequences {self.dataset.path} [{self.split}]")
        streams: dict[tuple[int, int], list] = {}  # (old rank, slot) -> [row iterator, rows taken]

        def row(gi: int) -> tuple:
            unit, within = divmod(gi, b_old)
            i, r = divmod(unit, n_old)
            slot, q = i % slots, i // slots
            if (r, slot) not in streams:
                src = _SlotStream(self._old_loader(r), self.epoch, 0)
                streams[(r, slot)] = [src._train_rows(slot, stats, WorkerSplit(slots, 0, slot=slot)), 0]
            it = streams[(r, slot)]
            for _ in range(q * b_old + within - it[1]):  # rows of this stream other ranks take
                next(it[0])
            it[1] = q * b_old + within + 1
            return next(it[0])

        plan = [(bsz, t) for t in range(self._replay_full)]
        if self._replay_tail:
            plan.append((self._replay_tail, self._replay_full))
        g = bsz * world
        reported: dict[str, int] = {}
        length = self.max_len + 1
        for n, t in plan:
            first = self._replay_start + t * g + self.rank * n
            chunk = [row(first + k) for k in range(n)]
            cursor = self._replay_start + (t + 1) * g if n == bsz else self._replay_total
            users = np.fromiter((c[0] for c in chunk), dtype=np.int64, count=n)
            batch = collate_windows([c[1] for c in chunk], users, length, self.content, self.log_q,
                                    cursor=cursor)
            delta = {k: v - reported.get(k, 0) for k, v in stats.counts.items() if v != reported.get(k, 0)}
            reported = dict(stats.counts)
            self.stats.add(delta)
            yield batch

    def _plan(self) -> int:
        """Batches per slot (the same on every rank and every epoch)."""
        shards, W, R, B = self.dataset.seq_shards, self.effective_workers, self.world_size, self.batch_size
        if self.split == "train":
            counts = self.shard_samples
            most = math.ceil(math.ceil(len(shards) / R) / W)
            fewest = (len(shards) // R) // W
            if self.policy == "repeat":
                return math.ceil(_bound(counts, most, largest=True) / B)
            p = _bound(counts, fewest, largest=False) // B
            if p == 0:
                raise DataError(f"{self.dataset.path / 'manifest.json'}: policy 'drop' leaves no full batch "
                                f"of {B} per worker slot; use policy 'repeat' or a smaller batch")
            return p
        counts = self.shard_samples
        per_slot = [sum(counts[i] for i in range(len(shards)) if i % R == r and (i // R) % W == w)
                    for r in range(R) for w in range(W)]
        return max(math.ceil(c / B) for c in per_slot)

    def __len__(self) -> int:
        if self._replay_pending:
            return self._replay_len
        return self.batches_per_slot * self.effective_workers

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def samples_in_split(self) -> int:
        """Distinct samples of the split over all ranks: training windows under ``windows``, or
        evaluated users (counted from the manifest, or the sequence lengths; see the module docstring)."""
        return int(sum(self.shard_samples))

    @property
    def samples_per_epoch(self) -> int:
        """Rows per epoch over all ranks (including repeats and filler rows)."""
        return len(self) * self.batch_size * self.world_size

    def __iter__(self) -> Iterator[Batch]:
        if self._replay_pending:
            self._replay_pending = False  # later epochs: this loader's own layout, from the start
            yield from self._replay()
            return
        start, self._start_batches = self._start_batches, 0
        stream = _SlotStream(self, self.epoch, start)
        if self.num_workers == 0:
            it = iter(stream)
        else:
            it = iter(torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.effective_workers, pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor, persistent_workers=False))
        for batch, delta in it:
            self.stats.add(delta)
            yield unpack_batch(*batch) if isinstance(batch, tuple | list) else batch
