"""Training windows: which slices of a user's training part become training samples, and how many.

``data.windows`` (the loader's ``windows``) picks one of three modes. ``part`` is the user's
training part (:func:`~transrec.shards.format.train_part`) after unusable items are dropped, ``n``
its length, ``m`` the loader's ``max_len``; a window holds at most ``m + 1`` items, and a user with
``n < 2`` gives no sample in any mode.

``"last"``
    One window: ``part[-(m + 1):]``. Items before it are never trained on. (The default.)

``"sliding"``
    The whole part in windows of ``m + 1`` items, laid from the end backwards, consecutive windows
    sharing one item: the windows end at ``n, n - m, n - 2m, ...`` (every end ``e >= 2``) and the
    window ending at ``e`` is ``part[max(0, e - m - 1):e]``. Its causal targets, positions
    ``max(1, e - m) .. e - 1`` of the part, do not overlap the next window's, so every item of the
    part after the first is a target exactly once, in ``ceil((n - 1) / m)`` windows. Only the
    earliest window can be short: it is ``part[0:r + 1]`` with ``r = (n - 1) - (k - 1) m`` targets
    (``1 <= r <= m``, ``k`` the window count), right-aligned and padded on the left like any short
    history; it is not widened to ``m + 1`` items, which would train some targets twice.

``"prefixes"``
    One window per target position ``t = 1 .. n - 1``: ``part[max(0, t - m):t + 1]``, every prefix
    of the part ending at ``t`` (cut to ``m + 1`` items), ``n - 1`` samples. The augmentation
    RecBole-style sequential trainers use; a user encoder that trains the last position only
    (bidirectional) then trains every position as a last-position target.

Counts. The loader fixes its batches per epoch up front from the number of samples in each
sequence shard. ``"last"`` needs nothing new: one sample per training user, the manifest's
``n_train``. The other modes need the shard's sequence lengths: the manifest's per-shard length
histogram (``lengths``: {item count: users}, written by :class:`~transrec.shards.format.DatasetWriter`
since it was added) or, for a dataset built before, one scan of the sequence shards at loader
construction, cached as ``seq-lengths-KEY.json`` in the item cache folder (``data.cache_dir``, by
default ``DATASET/.cache``), written atomically; ``KEY`` hashes the shards' names and checksums, so
the one file serves every mode and ``max_len``. Counts come from the item lists as stored, as
``n_train`` does: items the loader drops as bad input can make a slot's real sample count smaller,
which the policy absorbs (``repeat`` starts another pass sooner).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np

from transrec.shards.format import train_part
from transrec.shards.remote import is_remote, open_shard

log = logging.getLogger("transrec.shards")
WINDOWS = ("last", "sliding", "prefixes")
LENGTHS_FORMAT = 1


def check_mode(mode: str) -> str:
    if mode not in WINDOWS:
        raise ValueError(f"windows must be one of {WINDOWS}, got {mode!r}")
    return mode


def train_windows(part: np.ndarray, max_len: int, mode: str) -> list[np.ndarray]:
    """The training windows of one training part (views of ``part``), earliest first."""
    n, m = len(part), int(max_len)
    if n < 2:
        return []
    if mode == "last":
        return [part[-(m + 1):]]
    if mode == "sliding":
        ends = range(n, 1, -m)[::-1]
        return [part[max(0, e - m - 1):e] for e in ends]
    if mode == "prefixes":
        return [part[max(0, t - m):t + 1] for t in range(1, n)]
    raise ValueError(f"windows must be one of {WINDOWS}, got {mode!r}")


def window_count(part_len, max_len: int, mode: str):
    """Samples a training part of ``part_len`` items gives (vectorised over an array of lengths)."""
    n = np.asarray(part_len, dtype=np.int64)
    m = int(max_len)
    if mode == "last":
        out = (n >= 2).astype(np.int64)
    elif mode == "sliding":
        out = np.where(n >= 2, (n - 1 + m - 1) // m, 0)
    elif mode == "prefixes":
        out = np.maximum(n - 1, 0)
    else:
        raise ValueError(f"windows must be one of {WINDOWS}, got {mode!r}")
    return out


def samples_per_shard(dataset, max_len: int, mode: str, cache_dir: str | Path | None = None) -> list[int]:
    """Training samples in each sequence shard of ``dataset`` under ``mode`` (see the module docstring)."""
    check_mode(mode)
    if mode == "last":
        return [int(s.n_train) for s in dataset.seq_shards]
    out = []
    for hist in length_histograms(dataset, cache_dir):
        lens = np.fromiter(hist.keys(), dtype=np.int64, count=len(hist))
        users = np.fromiter(hist.values(), dtype=np.int64, count=len(hist))
        part = np.array([len(train_part(range(k))) for k in lens.tolist()], dtype=np.int64)
        out.append(int((window_count(part, max_len, mode) * users).sum()))
    return out


def length_histograms(dataset, cache_dir: str | Path | None = None) -> list[dict[int, int]]:
    """Per sequence shard, {sequence length: users}: from the manifest when it records them, else
    from the cached scan (made and cached on first use)."""
    shards = dataset.seq_shards
    if all(s.lengths is not None for s in shards):
        return [dict(s.lengths) for s in shards]
    h = hashlib.sha256(json.dumps([LENGTHS_FORMAT] + [[s.path.name, s.sha256] for s in shards]).encode())
    path = _cache_root(dataset, cache_dir) / f"seq-lengths-{h.hexdigest()[:24]}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("shards") == [s.path.name for s in shards]:
            return [{int(k): int(v) for k, v in d.items()} for d in cached["lengths"]]
        log.warning("%s: does not match the dataset's shards; scanning again", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s: unreadable (%s); scanning again", path, type(exc).__name__)
    log.info("%s: counting training windows (the manifest records no sequence lengths; once, "
             "cached in %s)", dataset.path, path)
    hists = [scan_lengths(s.path) for s in shards]
    data = {"format": LENGTHS_FORMAT, "dataset": str(dataset.path), "shards": [s.path.name for s in shards],
            "lengths": [{str(k): v for k, v in sorted(d.items())} for d in hists]}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, path)  # ranks scanning at once write the same bytes; the last rename wins
    except OSError as exc:
        log.warning("%s: cannot cache the sequence lengths (%s); they are counted again next time",
                    path, exc)
        tmp.unlink(missing_ok=True)
    return hists


def scan_lengths(shard: Path) -> dict[int, int]:
    """{item-list length: users} of one sequence shard, read with tarfile (unreadable samples, and
    the rest of an unreadable tar, count as nothing, as the loader skips them)."""
    hist: dict[int, int] = {}
    try:
        with (tarfile.open(fileobj=open_shard(shard), mode="r|") if is_remote(shard)
              else tarfile.open(shard)) as tf:
            for mem in tf:
                if not mem.isfile() or not mem.name.endswith(".json"):
                    continue
                try:
                    items = json.loads(tf.extractfile(mem).read())["items"]
                except (TypeError, KeyError, ValueError):
                    continue
                if not isinstance(items, list):
                    continue
                n = len(items)
                hist[n] = hist.get(n, 0) + 1
    except (OSError, tarfile.TarError) as exc:
        log.warning("%s: unreadable while counting sequence lengths (%s)", shard, exc)
    return hist


def _cache_root(dataset, cache_dir: str | Path | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    from transrec.shards.cache import _default_cache_root  # lazy: the item cache imports transformers
    return _default_cache_root(dataset)
