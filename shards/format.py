"""The on-disk dataset format: a folder with a manifest, an item index, item shards and sequence shards.

::

    DATASET/
      manifest.json        schema version, counts, modality mix, split rule, one entry per file
                           (name, bytes, sha256, samples; sequence shards also n_train / n_eval
                           and, optional, lengths: {item count: users}, for the loader's
                           training-window counts)
      items.tsv            item index: ``item_id<TAB>modality<TAB>train_count``; the line number
                           (from 0) is the item's global index
      items-000000.tar     one sample per item: ``<key>.txt`` (title, UTF-8) for a text item or
                           ``<key>.jpg`` / ``<key>.png`` for an image item, plus ``<key>.json``
      seqs-000000.tar      one sample per user: ``<key>.json`` = {"user": id, "index": global user
                           index, "items": [item keys, time-ordered]}

Keys are sanitised ids (:func:`sanitize_key`: percent-escaped, no dots and no path separators).
Shards are written with ``webdataset.ShardWriter`` and read with ``webdataset.WebDataset``; nothing
in a shard is ever unpickled.

Split rule (leave-one-out): for a user with n >= 3 interactions the last item is the test target,
the second to last the validation target and the first n - 2 items the training part; a user with
fewer than 3 interactions is training only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import webdataset as wds

from transrec.errors import DataError
from transrec.shards.batch import IMAGE, MODALITY_NAMES, TEXT

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ITEM_INDEX = "items.tsv"
ITEM_PATTERN = "items-%06d.tar"
SEQ_PATTERN = "seqs-%06d.tar"
SPLIT_RULE = ("leave-one-out: last item test, second-to-last validation, "
              "users with fewer than 3 interactions train only")
IMAGE_EXTS = ("jpg", "jpeg", "png")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def sanitize_key(raw: str) -> str:
    """A tar-safe sample key for an id: every character outside ``[A-Za-z0-9_-]`` percent-escaped.

    Reversible (:func:`unsanitize_key`), so distinct ids never collide, and free of dots (which
    WebDataset reads as the start of the extension) and path separators.
    """
    raw = str(raw)
    if not raw:
        raise ValueError("empty id")
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), raw)


def unsanitize_key(key: str) -> str:
    return unquote(key)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


EVAL_MIN = 3  # interactions a user needs to have validation and test targets


def train_part(items: np.ndarray) -> np.ndarray:
    """The training part of a time-ordered history under the leave-one-out rule."""
    return items[:-2] if len(items) >= EVAL_MIN else items


def eval_target(items: np.ndarray, split: str) -> tuple[np.ndarray, object] | None:
    """(history, target) of a time-ordered history for ``split`` "valid" (the second-to-last item)
    or "test" (the last); None for a user with too few interactions to be evaluated."""
    n = len(items)
    if n < EVAL_MIN:
        return None
    end = n - 2 if split == "valid" else n - 1
    return items[:end], items[end]


def split_counts(n: int) -> tuple[int, int]:
    """(training pairs available?, evaluated?) for a user with ``n`` interactions: returns
    (1 if the training part has at least two items else 0, 1 if the user has val/test targets)."""
    return int(len(train_part(range(n))) >= 2), int(n >= EVAL_MIN)


class DatasetWriter:
    """Writes a dataset folder: items first (:meth:`add_item`), then sequences (:meth:`add_sequence`),
    then :meth:`close` writes the item index and the manifest.

    Ids are sanitised here; a duplicate item or user id is skipped and counted in ``self.skipped``.
    Sequences may only name items already added (unknown ids are dropped from the sequence and
    counted), so the index and the shards always agree.
    """

    def __init__(self, out_dir: str | Path, *, shard_size: int = 1000, seq_shard_size: int | None = None,
                 name: str = "", domain: str = "", extra: dict | None = None, overwrite: bool = True,
                 mtime: int = 1_700_000_000):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if not overwrite and (self.out / MANIFEST).exists():
            raise DataError(f"{self.out / MANIFEST}: a dataset already exists here")
        for old in list(self.out.glob("items-*.tar")) + list(self.out.glob("seqs-*.tar")):
            old.unlink()
        for old in (self.out / MANIFEST, self.out / ITEM_INDEX):
            if old.exists():
                old.unlink()
        self.shard_size = int(shard_size)
        self.seq_shard_size = int(seq_shard_size or shard_size)
        if self.shard_size < 1 or self.seq_shard_size < 1:
            raise ValueError("shard size must be at least 1")
        self.name, self.domain, self.extra = name, domain, dict(extra or {})
        self.item_ids: list[str] = []
        self.item_mod: list[int] = []
        self._item_index: dict[str, int] = {}
        self._users: set[str] = set()
        self.train_count: np.ndarray | None = None
        self.n_interactions = 0
        self.n_users = 0
        self.skipped: dict[str, int] = {}
        # fixed integer member times: the same input gives byte-identical shards, and an integer
        # mtime keeps tarfile from adding a PAX header to every member (half the read cost)
        self.mtime = int(mtime)
        self._item_writer = wds.ShardWriter(str(self.out / ITEM_PATTERN), maxcount=self.shard_size,
                                            verbose=0, mtime=mtime)
        self._seq_writer = None
        self._seq_counts: list[list[int]] = []  # per shard: [samples, n_train, n_eval]
        self._seq_lengths: list[dict[int, int]] = []  # per shard: {sequence length: users}

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add_item(self, item_id: str, *, title: str | None = None, image: bytes | None = None,
                 image_ext: str = "jpg", meta: dict | None = None) -> bool:
        """Add one item: a text item (``title``) or an image item (``image`` bytes, encoded)."""
        if self._seq_writer is not None:
            raise RuntimeError("add every item before the first sequence")
        key = sanitize_key(item_id)
        if key in self._item_index:
            self._skip("duplicate_item")
            return False
        sample = {"__key__": key}
        if image is not None:
            ext = image_ext.lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            if ext not in ("jpg", "png") or not image:
                self._skip("bad_image")
                return False
            sample[ext] = image
            mod = IMAGE
        else:
            title = (title or "").strip()
            if not title:
                self._skip("empty_title")
                return False
            sample["txt"] = title
            mod = TEXT
        sample["json"] = json.dumps({"id": str(item_id), "modality": MODALITY_NAMES[mod], **(meta or {})})
        self._item_writer.write(sample)
        self._item_index[key] = len(self.item_ids)
        self.item_ids.append(key)
        self.item_mod.append(mod)
        return True

    def add_sequence(self, user_id: str, items: Iterable[str], meta: dict | None = None) -> bool:
        """Add one user's time-ordered history (raw item ids; unknown ones are dropped and counted)."""
        if self._seq_writer is None:
            self._item_writer.close()
            self._seq_writer = wds.ShardWriter(str(self.out / SEQ_PATTERN), maxcount=self.seq_shard_size,
                                               verbose=0, mtime=self.mtime)
            self.train_count = np.zeros(len(self.item_ids), dtype=np.int64)
        key = sanitize_key(user_id)
        if key in self._users:
            self._skip("duplicate_user")
            return False
        keys, idx = [], []
        for it in items:
            k = sanitize_key(it)
            j = self._item_index.get(k)
            if j is None:
                self._skip("unknown_item")
                continue
            keys.append(k)
            idx.append(j)
        if not keys:
            self._skip("empty_sequence")
            return False
        self._users.add(key)
        shard = self.n_users // self.seq_shard_size
        if shard == len(self._seq_counts):
            self._seq_counts.append([0, 0, 0])
            self._seq_lengths.append({})
        tr, ev = split_counts(len(keys))
        c = self._seq_counts[shard]
        c[0] += 1
        c[1] += tr
        c[2] += ev
        hist = self._seq_lengths[shard]
        hist[len(keys)] = hist.get(len(keys), 0) + 1
        np.add.at(self.train_count, train_part(np.asarray(idx)), 1)
        self._seq_writer.write({"__key__": key,
                                "json": json.dumps({"user": str(user_id), "index": self.n_users,
                                                    "items": keys, **(meta or {})})})
        self.n_users += 1
        self.n_interactions += len(keys)
        return True

    def close(self) -> Path:
        if self._seq_writer is None:
            self._item_writer.close()
            self.train_count = np.zeros(len(self.item_ids), dtype=np.int64)
        else:
            self._seq_writer.close()
        if not self.item_ids:
            raise DataError(f"{self.out}: no usable items were written")
        if not self.n_users:
            raise DataError(f"{self.out}: no usable sequences were written")
        with open(self.out / ITEM_INDEX, "w") as f:
            f.write("item_id\tmodality\ttrain_count\n")
            for key, mod, cnt in zip(self.item_ids, self.item_mod, self.train_count.tolist()):
                f.write(f"{key}\t{MODALITY_NAMES[mod]}\t{cnt}\n")
        mods = np.asarray(self.item_mod)

        def entry(path: Path, extra: dict) -> dict:
            return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), **extra}

        item_shards = sorted(self.out.glob("items-*.tar"))
        per_item_shard = [min(self.shard_size, len(self.item_ids) - i * self.shard_size)
                          for i in range(len(item_shards))]
        seq_shards = sorted(self.out.glob("seqs-*.tar"))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "domain": self.domain,
            "n_users": self.n_users,
            "n_items": len(self.item_ids),
            "n_interactions": self.n_interactions,
            "n_train_users": int(sum(c[1] for c in self._seq_counts)),
            "n_eval_users": int(sum(c[2] for c in self._seq_counts)),
            "modality": {"text": int((mods == TEXT).sum()), "image": int((mods == IMAGE).sum())},
            "split": SPLIT_RULE,
            "skipped_while_writing": dict(sorted(self.skipped.items())),
            "item_index": entry(self.out / ITEM_INDEX, {"samples": len(self.item_ids)}),
            "item_shards": [entry(p, {"samples": n}) for p, n in zip(item_shards, per_item_shard)],
            "seq_shards": [entry(p, {"samples": c[0], "n_train": c[1], "n_eval": c[2],
                                     "lengths": {str(k): v for k, v in sorted(h.items())}})
                           for p, c, h in zip(seq_shards, self._seq_counts, self._seq_lengths)],
            **self.extra,
        }
        tmp = self.out / (MANIFEST + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, self.out / MANIFEST)
        return self.out
