"""Opening a dataset folder (see :mod:`transrec.shards.format`): manifest checks and the item index."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from transrec.errors import DataError
from transrec.shards.batch import IMAGE, MODALITY_NAMES, TEXT
from transrec.shards.format import MANIFEST, SCHEMA_VERSION, sha256_file, split_counts
from transrec.shards.remote import (
    ObjectReader,
    RemotePath,
    StoreError,
    first_contact_retry,
    is_remote,
    object_sizes,
    open_shard,
    read_bytes,
    remember,
)


@dataclass(frozen=True)
class ShardInfo:
    path: Path | RemotePath  # a file of the dataset folder, or an object of a dataset in a store
    bytes: int
    sha256: str
    samples: int
    n_train: int = 0
    n_eval: int = 0
    lengths: tuple[tuple[int, int], ...] | None = None  # sequence shards: (item count, users), if recorded


class Dataset:
    """A dataset folder, or a dataset in an object store, opened and checked.

    ``item_ids[i]`` is the (sanitised) id of global item ``i``; ``modality[i]`` is TEXT or IMAGE;
    ``log_q[i]`` is the log of the item's smoothed frequency in the training split (add-one
    smoothing), for the logQ correction of in-batch softmax.

    Structural problems (missing or unreadable manifest, wrong schema version, a listed file missing
    or of the wrong size, an empty dataset, an item index that disagrees with the manifest) raise
    :class:`~transrec.errors.DataError` with one line naming the file.
    """

    def __init__(self, path: Path | RemotePath, manifest: dict, item_ids: list[str], modality: np.ndarray,
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
    def open(cls, path: str | Path | RemotePath) -> Dataset:
        """A dataset folder, or a dataset in an object store (``s3://bucket/prefix``,
        ``https://...``: see :mod:`transrec.shards.remote`), checked as the class docstring says.
        In a store the manifest and the item index are read first and every listed object's size
        is checked (one listing, or a request per object), so a missing shard or refused
        credentials stop here, before any training step."""
        if is_remote(path):
            return cls._open_remote(RemotePath(path) if not isinstance(path, RemotePath) else path)
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise DataError(f"{path}: not a dataset folder (no such directory)")
        if not mpath.is_file():
            raise DataError(f"{mpath}: missing (not a dataset folder; build one with `transrec shards`)")
        try:
            text = mpath.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{mpath}: unreadable manifest ({exc})") from None
        manifest = _check_manifest(text, mpath)

        def size_of(info: ShardInfo) -> int | None:
            return info.path.stat().st_size if info.path.is_file() else None

        index, item_shards, seq_shards = _shards(manifest, path, mpath, size_of)
        if sha256_file(index.path) != index.sha256:
            raise DataError(f"{index.path}: checksum differs from the manifest")
        with open(index.path) as f:
            ids, modality, counts = _read_index(f, index.path, manifest)
        return cls(path, manifest, ids, modality, counts, item_shards, seq_shards)

    @classmethod
    def _open_remote(cls, path: RemotePath) -> Dataset:
        mpath = path / MANIFEST
        try:  # the first contact: a store that is not there at all is told within half a minute
            raw = read_bytes(str(mpath), retry=first_contact_retry())
        except StoreError as exc:
            if "no such object" in str(exc):
                raise StoreError(f"{mpath}: missing (no such object; not a dataset location? build one "
                                 "with `transrec shards` and copy the folder there)") from None
            raise
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{mpath}: unreadable manifest ({exc})") from None
        manifest = _check_manifest(text, mpath)
        names = [e.get("name") if isinstance(e, dict) else None
                 for e in [manifest["item_index"], *manifest["item_shards"], *manifest["seq_shards"]]]
        sizes = object_sizes(path, [n for n in names if isinstance(n, str)])

        def size_of(info: ShardInfo) -> int | None:
            return sizes.get(info.path.name)

        index, item_shards, seq_shards = _shards(manifest, path, mpath, size_of)
        blob = read_bytes(str(index.path))
        if hashlib.sha256(blob).hexdigest() != index.sha256:
            raise DataError(f"{index.path}: checksum differs from the manifest")
        try:
            lines = io.StringIO(blob.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{index.path}: not UTF-8 text") from None
        ids, modality, counts = _read_index(lines, index.path, manifest)
        for s in item_shards + seq_shards:
            remember(str(s.path), s.bytes, s.sha256)
        return cls(path, manifest, ids, modality, counts, item_shards, seq_shards)

    @property
    def remote(self) -> bool:
        """Whether the dataset lives in an object store."""
        return isinstance(self.path, RemotePath)

    def verify(self) -> list[str]:
        """Every shard's sha256 and every count of the manifest checked against the shards (reads
        every byte): per-shard sample counts (and a sequence shard's training and evaluation users and, when
        recorded, its sequence-length histogram),
        ``n_interactions``, ``n_train_users`` / ``n_eval_users`` and the modality counts. Returns one
        line per mismatch (empty when all agree)."""
        problems = []
        for s in self.item_shards + self.seq_shards:
            if _sha256(s.path) != s.sha256:
                problems.append(f"{s.path}: checksum differs from the manifest (corrupt or replaced)")
        m, mpath = self.manifest, self.path / MANIFEST

        def differs(what: str, said, found) -> None:
            if said is not None and int(said) != int(found):
                problems.append(f"{what}: the manifest says {said}, the shards hold {found}")

        mods = {"text": 0, "image": 0}
        for s in self.item_shards:
            samples = _tar_samples(s.path, problems)
            differs(f"{s.path.name} samples", s.samples, len(samples))
            for exts in samples.values():
                if "txt" in exts:
                    mods["text"] += 1
                elif exts & {"jpg", "jpeg", "png"}:
                    mods["image"] += 1
        n_inter = n_train = n_eval = 0
        for s in self.seq_shards:
            samples = _tar_samples(s.path, problems, read="json")
            tr = ev = 0
            hist: dict[int, int] = {}
            for key, blob in samples.items():
                try:
                    n = len(json.loads(blob)["items"])
                except (TypeError, KeyError, ValueError):
                    problems.append(f"{s.path.name}: sequence {key} has no readable item list")
                    continue
                hist[n] = hist.get(n, 0) + 1
                t, e = split_counts(n)
                tr, ev, n_inter = tr + t, ev + e, n_inter + n
            n_train, n_eval = n_train + tr, n_eval + ev
            differs(f"{s.path.name} samples", s.samples, len(samples))
            differs(f"{s.path.name} n_train", s.n_train, tr)
            differs(f"{s.path.name} n_eval", s.n_eval, ev)
            if s.lengths is not None and dict(s.lengths) != hist:
                problems.append(f"{s.path.name} lengths: the manifest's sequence-length histogram differs "
                                "from the shard's")
        differs(f"{mpath.name} n_interactions", m.get("n_interactions"), n_inter)
        differs(f"{mpath.name} n_train_users", m.get("n_train_users"), n_train)
        differs(f"{mpath.name} n_eval_users", m.get("n_eval_users"), n_eval)
        index = {MODALITY_NAMES[TEXT]: int((self.modality == TEXT).sum()),
                 MODALITY_NAMES[IMAGE]: int((self.modality == IMAGE).sum())}
        for name in ("text", "image"):
            differs(f"{mpath.name} modality.{name}", m["modality"].get(name), mods[name])
            if index.get(name, 0) != mods[name]:
                problems.append(f"{self.path.name}/item index: {index.get(name, 0)} {name} items, "
                                f"the shards hold {mods[name]}")
        return problems



def _check_manifest(text: str, mpath) -> dict:
    """The manifest's JSON, checked for the fields every reader needs."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
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
    return manifest


def _shards(manifest: dict, path, mpath, size_of) -> tuple[ShardInfo, list[ShardInfo], list[ShardInfo]]:
    """(item index, item shards, sequence shards) of the manifest, each checked against its file's
    size (``size_of(info)``: the size, or None when the file is missing)."""

    def shard(entry: dict) -> ShardInfo:
        try:
            lengths = entry.get("lengths")
            if lengths is not None:
                lengths = tuple(sorted((int(k), int(v)) for k, v in lengths.items()))
                if sum(v for _, v in lengths) != int(entry["samples"]) or \
                        any(k < 1 or v < 1 for k, v in lengths):
                    raise ValueError("lengths")
            if not isinstance(entry["name"], str):
                raise TypeError("name")
            info = ShardInfo(path / entry["name"], int(entry["bytes"]), str(entry["sha256"]),
                             int(entry["samples"]), int(entry.get("n_train", 0)),
                             int(entry.get("n_eval", 0)), lengths)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise DataError(f"{mpath}: malformed file entry {entry!r}"[:400]) from None
        if "/" in entry["name"] or entry["name"].startswith("."):
            raise DataError(f"{mpath}: file name {entry['name']!r} must be inside the dataset folder")
        size = size_of(info)
        if size is None:
            raise DataError(f"{info.path}: listed in the manifest but missing")
        if size != info.bytes and size >= 0:  # -1: a web server that does not say
            raise DataError(f"{info.path}: {size} bytes, the manifest says {info.bytes} "
                            "(truncated or replaced; rebuild the dataset)")
        return info

    index = shard(manifest["item_index"])
    item_shards = [shard(e) for e in manifest["item_shards"]]
    seq_shards = [shard(e) for e in manifest["seq_shards"]]
    if sum(s.samples for s in item_shards) != manifest["n_items"]:
        raise DataError(f"{mpath}: item shard sample counts do not add up to n_items")
    if sum(s.samples for s in seq_shards) != manifest["n_users"]:
        raise DataError(f"{mpath}: sequence shard sample counts do not add up to n_users")
    return index, item_shards, seq_shards


def _read_index(f, ipath, manifest: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(item ids, modality, training counts) of the item index, read from the text stream ``f``."""
    ids, mods, counts = [], [], []
    names = {n: i for i, n in enumerate(MODALITY_NAMES)}
    header = f.readline().rstrip("\n").split("\t")
    if header[:3] != ["item_id", "modality", "train_count"]:
        raise DataError(f"{ipath}: bad header {header!r}")
    for lineno, line in enumerate(f, start=2):
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3 or parts[1] not in names:
            raise DataError(f"{ipath}:{lineno}: malformed line")
        ids.append(parts[0])
        mods.append(names[parts[1]])
        counts.append(int(parts[2]))
    if len(ids) != manifest["n_items"]:
        raise DataError(f"{ipath}: {len(ids)} items, the manifest says {manifest['n_items']}")
    modality = np.asarray(mods, dtype=np.int8)
    assert set(np.unique(modality).tolist()) <= {TEXT, IMAGE}
    return ids, modality, np.asarray(counts, dtype=np.int64)


def _sha256(path) -> str:
    """sha256 of a local file or of an object in a store (streamed)."""
    if not isinstance(path, RemotePath):
        return sha256_file(path)
    h = hashlib.sha256()
    with ObjectReader(str(path)) as r:
        while chunk := r.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _tar_samples(path: Path, problems: list[str], read: str = "") -> dict:
    """Samples of a shard, grouped by key as webdataset groups them: key -> set of extensions, or
    key -> the bytes of the ``read`` member. An unreadable tar adds a line to ``problems``."""
    out: dict = {}
    try:
        with (tarfile.open(fileobj=open_shard(path), mode="r|") if isinstance(path, RemotePath)
              else tarfile.open(path)) as tf:
            for mem in tf:
                if not mem.isfile():
                    continue
                base = mem.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                key = mem.name[:len(mem.name) - len(base)] + key
                if read:
                    if ext == read:
                        out[key] = tf.extractfile(mem).read()
                    else:
                        out.setdefault(key, None)
                else:
                    out.setdefault(key, set()).add(ext)
    except (OSError, tarfile.TarError) as exc:
        problems.append(f"{path}: unreadable tar ({exc})")
    return out
