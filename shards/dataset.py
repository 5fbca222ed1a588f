"""Opening a dataset folder (see :mod:`transrec.shards.format`): manifest checks and the item index."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from transrec.shards.batch import IMAGE, MODALITY_NAMES, TEXT
from transrec.shards.format import MANIFEST, SCHEMA_VERSION, sha256_file

from transrec.errors import DataError


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    bytes: int
    sha256: str
    samples: int
    n_train: int = 0
    n_eval: int = 0


class Dataset:
    """A dataset folder, opened and checked.

    ``item_ids[i]`` is the (sanitised) id of global item ``i``; ``modality[i]`` is TEXT or IMAGE;
    ``log_q[i]`` is the log of the item's smoothed frequency in the training split (add-one
    smoothing), for the logQ correction of in-batch softmax.

    Structural problems (missing or unreadable manifest, wrong schema version, a listed file missing
    or of the wrong size, an empty dataset, an item index that disagrees with the manifest) raise
    :class:`~transrec.errors.DataError` with one line naming the file.
    """

    def __init__(self, path: Path, manifest: dict, item_ids: list[str], modality: np.ndarray,
                 train_count: np.ndarray, item_shards: list[ShardInfo], seq_shards: list[ShardInfo]):
        self.path = path
        self.manifest = manifest
        self.item_ids = item_ids
        self.modality = modality
        self.train_count = train_count
        self.item_shards = item_shards
        self.seq_shards = seq_shards
        self.n_items = len(item_ids)
        self.n_users = int(manifest["n_users"])
        total = float(train_count.sum())
        freq = (train_count.astype(np.float64) + 1.0) / (total + self.n_items)
        self.log_q = np.log(freq).astype(np.float32)

    def __repr__(self) -> str:
        m = self.manifest["modality"]
        return (f"Dataset({str(self.path)!r}, users={self.n_users}, items={self.n_items} "
                f"(text {m['text']}, image {m['image']}), interactions={self.manifest['n_interactions']})")

    @cached_property
    def item_index(self) -> dict[str, int]:
        """Sanitised item id -> global item index."""
        return {k: i for i, k in enumerate(self.item_ids)}

    @classmethod
    def open(cls, path: str | Path) -> Dataset:
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise DataError(f"{path}: not a dataset folder (no such directory)")
        if not mpath.is_file():
            raise DataError(f"{mpath}: missing (not a dataset folder; build one with `transrec shards`)")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{mpath}: unreadable manifest ({exc})") from None
        if not isinstance(manifest, dict):
            raise DataError(f"{mpath}: manifest is not a JSON object")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(f"{mpath}: schema version {version!r}, "
                            f"this transrec reads version {SCHEMA_VERSION}")
        for key in ("n_users", "n_items", "n_interactions", "modality", "item_index", "item_shards",
                    "seq_shards"):
            if key not in manifest:
                raise DataError(f"{mpath}: missing field {key!r}")
        if not manifest["n_items"] or not manifest["n_users"] or not manifest["item_shards"] \
                or not manifest["seq_shards"]:
            raise DataError(f"{mpath}: empty dataset (no items or no sequences)")

        def shard(entry: dict) -> ShardInfo:
            try:
                info = ShardInfo(path / entry["name"], int(entry["bytes"]), str(entry["sha256"]),
                                 int(entry["samples"]), int(entry.get("n_train", 0)),
                                 int(entry.get("n_eval", 0)))
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{mpath}: malformed file entry {entry!r}") from None
            if "/" in entry["name"] or entry["name"].startswith("."):
                raise DataError(f"{mpath}: file name {entry['name']!r} must be inside the dataset folder")
            if not info.path.is_file():
                raise DataError(f"{info.path}: listed in the manifest but missing")
            size = info.path.stat().st_size
            if size != info.bytes:
                raise DataError(f"{info.path}: {size} bytes, the manifest says {info.bytes} "
                                "(truncated or replaced; rebuild the dataset)")
            return info

        index = shard(manifest["item_index"])
        if sha256_file(index.path) != index.sha256:
            raise DataError(f"{index.path}: checksum differs from the manifest")
        item_shards = [shard(e) for e in manifest["item_shards"]]
        seq_shards = [shard(e) for e in manifest["seq_shards"]]
        if sum(s.samples for s in item_shards) != manifest["n_items"]:
            raise DataError(f"{mpath}: item shard sample counts do not add up to n_items")
        if sum(s.samples for s in seq_shards) != manifest["n_users"]:
            raise DataError(f"{mpath}: sequence shard sample counts do not add up to n_users")

        ids, mods, counts = [], [], []
        names = {n: i for i, n in enumerate(MODALITY_NAMES)}
        with open(index.path) as f:
            header = f.readline().rstrip("\n").split("\t")
            if header[:3] != ["item_id", "modality", "train_count"]:
                raise DataError(f"{index.path}: bad header {header!r}")
            for lineno, line in enumerate(f, start=2):
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 3 or parts[1] not in names:
                    raise DataError(f"{index.path}:{lineno}: malformed line")
                ids.append(parts[0])
                mods.append(names[parts[1]])
                counts.append(int(parts[2]))
        if len(ids) != manifest["n_items"]:
            raise DataError(f"{index.path}: {len(ids)} items, the manifest says {manifest['n_items']}")
        modality = np.asarray(mods, dtype=np.int8)
        assert set(np.unique(modality).tolist()) <= {TEXT, IMAGE}
        return cls(path, manifest, ids, modality, np.asarray(counts, dtype=np.int64), item_shards,
                   seq_shards)

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads every byte)."""
        for s in self.item_shards + self.seq_shards:
            if sha256_file(s.path) != s.sha256:
                raise DataError(f"{s.path}: checksum differs from the manifest (corrupt or replaced)")
