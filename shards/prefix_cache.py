"""The frozen-prefix store: an item encoder's frozen-prefix outputs for every item, memory-mapped.

The frozen-prefix cache (:mod:`transrec.models.prefix`) runs an item encoder's frozen lower blocks
once per item and stores the result here; each step then runs only the trainable tail on it::

    encoder(content) = forward_tail(forward_prefix(content))      # plain loop, every step
    encoder(content) = forward_tail(store[item])                  # with the cache

This module is the storage alone: the layout on disk, the key, the writers a builder fills, the
reader, and :class:`PrefixCachedContent`. It imports no model code; what runs the encoder, and
whether an encoder may be cached at all, lives beside the encoders (:mod:`transrec.models.prefix`).

What is stored, per modality, in a folder beside the item cache (``prefix-<modality>-<key>``)::

    meta.json     key and its inputs, shapes, dtype, disk figures, build time
    item_row.npy  [n_items] int64  row of every item in this store (-1: item of the other modality)
    text:  lengths.npy [n_text] int32, offsets.npy [n_text + 1] int64,
           hidden.npy  [sum(lengths), H]  hidden states after the last frozen block, real tokens only
    image: maps.npy    [n_image, C, h, w] feature maps after the last frozen stage ([N, H] for a ViT)

Values are bf16 by default (fp16 / fp32 by choice). numpy has no bf16, so bf16 values are stored as
their raw 16-bit words (uint16) and viewed back as ``torch.bfloat16``. Text is stored ragged (only
real tokens): titles are usually much shorter than ``max_text_len``.

The key (:func:`prefix_key`) is a hash of (item content key, modality, the encoder's frozen hash --
architecture, frozen depth, every prefix weight and buffer --, the frozen depth, dtype, format), so
a store is reused until one of those changes and then rebuilt. A builder fills a temporary folder
(:class:`TextStoreWriter` / :class:`ImageStoreWriter`, then :func:`finish_store`) under the
exclusive lock of :func:`transrec.locking.locked_build`, which renames it into place when
complete; a second process asking for the same store waits on the lock, then loads. A writer checks
the free space against the store's size and reserves its blocks before any encoder pass, so a full
disk stops the build with :class:`~transrec.storage.WriteFailed` (one line, exit 74), the temporary
folder removed and every other store untouched.

:class:`PrefixCachedContent` wraps any :class:`~transrec.shards.batch.ContentSource`: its ``gather``
returns the same Text/ImageContent with ``.prefix`` filled (text keeps its attention mask; image
items carry an empty pixel tensor, their pixels are never read). Every tensor it returns is on the
host, so ``Batch.to(device)`` moves the batch, prefix included, in one transfer. The encoders run only
their tail when ``.prefix`` is set.

Costs (the trade-off): disk and page cache hold ``bytes/item`` per item -- text ``tokens x H x 2``
(bf16), image ``C x h x w x 2`` -- against ``4 x max_len`` bytes of token ids or ``3 x S x S`` bytes of
pixels in the item cache; the figures are printed when a store is built. In exchange each step skips
the frozen blocks' forward for every unique item of the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from transrec.errors import ConfigError, DataError
from transrec.shards.batch import IMAGE, MODALITY_NAMES, TEXT, ImageContent, TextContent
from transrec.storage import allocate, check_space
from transrec.storage import human as human_bytes

PREFIX_FORMAT = 1
# name -> (torch dtype of the values, numpy dtype of the stored words)
DTYPES: dict[str, tuple[torch.dtype, type]] = {
    "bf16": (torch.bfloat16, np.uint16),
    "fp16": (torch.float16, np.float16),
    "fp32": (torch.float32, np.float32),
}


# ----------------------------------------------------------------------------- values and keys

def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ConfigError(f"prefix cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype


def to_words(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array the store holds (bf16 -> raw uint16 words)."""
    tdt, ndt = DTYPES[dtype]
    t = t.detach().to("cpu", tdt).contiguous()
    if dtype == "bf16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_words(a: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of :func:`to_words` (no copy for bf16: a reinterpreting view)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "bf16":
        return t.view(torch.bfloat16)
    return t


def content_identity(content) -> str:
    """What identifies the item content: the item cache's key, or a hash of an ArrayContent's arrays."""
    key = getattr(content, "key", None)
    if isinstance(key, str) and key:
        return key
    arrays = [getattr(content, n, None) for n in ("modality", "row", "tokens", "lengths", "images")]
    if arrays[0] is None or arrays[1] is None:
        raise ConfigError("the prefix cache needs an item cache (or an ArrayContent), got "
                          f"{type(content).__name__} without a 'key'")
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}|{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return "arr-" + h.hexdigest()[:24]


def prefix_key(content_id: str, modality: int, frozen: str, n_frozen: int, dtype: str) -> str:
    """Hash of (item content, modality, frozen-weights hash, frozen depth, dtype, format)."""
    h = hashlib.sha256()
    h.update(json.dumps({
        "format": PREFIX_FORMAT,
        "content": content_id,
        "modality": MODALITY_NAMES[modality],
        "encoder": frozen,
        "frozen_blocks": int(n_frozen),
        "dtype": dtype,
    }, sort_keys=True).encode())
    return h.hexdigest()[:24]


def default_store_dir(content, cache_dir: str = "") -> Path:
    """Where stores go unless told: beside the item cache, else ``cache_dir``, else
    ``$TRANSREC_CACHE``, else ``~/.cache/transrec``."""
    p = getattr(content, "path", None)
    if p is not None and Path(p).is_dir():
        return Path(p).parent  # beside the item cache
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get("TRANSREC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "transrec"


def store_path(cache_dir: str | Path, modality: int, key: str) -> Path:
    return Path(cache_dir) / f"prefix-{MODALITY_NAMES[modality]}-{key}"


def is_complete(path: Path) -> bool:
    """Whether a finished store is at ``path`` (its meta.json is written last, then the folder renamed)."""
    return (Path(path) / "meta.json").is_file()


# ----------------------------------------------------------------------------- writing a store

def _check_room(modality: str, folder: Path, shape: tuple[int, ...], dtype: str, extra: int) -> None:
    """WriteFailed (one line) before a store's values are written when the disk holding ``folder``
    (the build's temporary folder) has less free space than the store will take."""
    values = int(np.prod(shape)) * np.dtype(DTYPES[dtype][1]).itemsize
    check_space(f"building the {modality} prefix cache", folder.parent, values + extra + 64 * 1024,
                basis="its arrays' size")


class TextStoreWriter:
    """Fills a text store's ragged ``hidden.npy`` in ``folder``: the real tokens of every row.

    ``lengths[r]`` is the number of real tokens of store row ``r``, known before any encoder pass
    (token ids only), so the layout is fixed up front and rows can be written in any order.
    """

    def __init__(self, folder: Path, lengths: np.ndarray, hidden: int, dtype: str):
        self.folder, self.dtype, self.hidden = Path(folder), check_dtype(dtype), int(hidden)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        shape = (int(self.offsets[-1]), self.hidden)
        _check_room("text", self.folder, shape, dtype, self.lengths.nbytes + self.offsets.nbytes)
        self.data = np.lib.format.open_memmap(self.folder / "hidden.npy", mode="w+", dtype=DTYPES[dtype][1],
                                              shape=shape)
        allocate(self.folder / "hidden.npy")  # a full disk fails here, not with SIGBUS mid-build

    def write(self, rows: np.ndarray, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        """``hidden [len(rows), T, H]`` of store rows ``rows``; ``mask [len(rows), T]`` marks their
        real tokens (``mask[i].sum() == lengths[rows[i]]``)."""
        mask = mask.bool().cpu()
        words = to_words(hidden[mask.to(hidden.device)], self.dtype)  # real tokens, row-major
        dest = self.offsets[rows][:, None] + np.arange(mask.shape[1])[None, :]
        self.data[dest[mask.numpy()]] = words

    def close(self) -> dict:
        """Flush the values, write lengths and offsets; returns the figures for meta.json."""
        self.data.flush()
        del self.data
        lengths = self.lengths
        np.save(self.folder / "lengths.npy", lengths.astype(np.int32))
        np.save(self.folder / "offsets.npy", self.offsets)
        per_value = np.dtype(DTYPES[self.dtype][1]).itemsize
        tokens = int(self.offsets[-1])
        return {"hidden": self.hidden, "tokens": tokens,
                "mean_tokens": float(lengths.mean()) if len(lengths) else 0.0,
                "bytes": tokens * self.hidden * per_value + lengths.nbytes + self.offsets.nbytes}


class ImageStoreWriter:
    """Fills an image store's ``maps.npy`` in ``folder``: ``n`` rows of ``shape`` each."""

    def __init__(self, folder: Path, n: int, shape: tuple[int, ...], dtype: str):
        self.folder, self.dtype = Path(folder), check_dtype(dtype)
        self.n, self.shape = int(n), tuple(int(s) for s in shape)
        _check_room("image", self.folder, (self.n, *self.shape), dtype, 0)
        self.data = np.lib.format.open_memmap(self.folder / "maps.npy", mode="w+", dtype=DTYPES[dtype][1],
                                              shape=(self.n, *self.shape))
        allocate(self.folder / "maps.npy")  # a full disk fails here, not with SIGBUS mid-build

    def write(self, start: int, maps: torch.Tensor) -> None:
        """Rows ``start .. start + len(maps)``; every row of shape ``shape``."""
        if tuple(maps.shape[1:]) != self.shape:
            raise ValueError(f"rows of shape {tuple(maps.shape[1:])} for a store of {self.shape}")
        self.data[start:start + len(maps)] = to_words(maps, self.dtype)

    def close(self) -> dict:
        self.data.flush()
        del self.data
        per_value = np.dtype(DTYPES[self.dtype][1]).itemsize
        return {"shape": list(self.shape), "bytes": int(self.n * int(np.prod(self.shape)) * per_value)}


def raw_bytes_per_item(content, modality: int) -> float | None:
    """Bytes per item of the raw content in the item cache (token ids / pixels), for comparison."""
    arr = getattr(content, "tokens" if modality == TEXT else "images", None)
    if arr is None or not len(arr):
        return None
    return float(arr.nbytes / len(arr))


def finish_store(folder: Path, content, modality: int, items: np.ndarray, meta: dict) -> dict:
    """Complete a filled store folder: ``item_row.npy`` (store row of every item of ``content``,
    ``items`` in row order) and ``meta.json``, written last. ``meta`` holds the key and its inputs
    and the writer's and builder's figures (``bytes`` among them); returns the meta written."""
    folder = Path(folder)
    item_row = np.full(int(content.n_items), -1, dtype=np.int64)
    item_row[items] = np.arange(len(items))
    np.save(folder / "item_row.npy", item_row)
    total = int(meta["bytes"]) + item_row.nbytes
    meta = {"format": PREFIX_FORMAT, "modality": MODALITY_NAMES[modality], "n_rows": len(items), **meta,
            "bytes": total, "bytes_per_item": total / len(items),
            "raw_bytes_per_item": raw_bytes_per_item(content, modality),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def build_line(meta: dict, seconds: float, path: Path) -> str:
    """The one line that reports a store just built: what it holds and what it costs."""
    n, bpi = meta["n_rows"], meta["bytes_per_item"]
    if meta["modality"] == "text":
        what = f"{meta['mean_tokens']:.1f} tokens/item x {meta['hidden']} hidden"
    else:
        what = "x".join(str(s) for s in meta["shape"]) + " per item"
    raw = meta.get("raw_bytes_per_item")
    vs = f" (raw content {human_bytes(raw)}/item)" if raw else ""
    return (f"prefix cache {meta['modality']}: built {n:,} items in {seconds:.1f}s "
            f"on {meta['build_device']}, "
            f"{meta['frozen_blocks']}/{meta['blocks']} blocks frozen, {what}, {meta['dtype']}: "
            f"{human_bytes(bpi)}/item{vs}, {human_bytes(meta['bytes'])} on disk, memory-mapped "
            f"(host memory: page cache up to that, per batch {human_bytes(bpi)} x unique items) -> {path}")


# ----------------------------------------------------------------------------- reading a store

class PrefixStore:
    """One modality's frozen-prefix outputs for every item of that modality, memory-mapped.

    ``gather(items, width)`` -> ``[len(items), ...]`` tensor in the stored dtype (text: padded to
    ``width`` tokens with zeros, which the tail never reads: padded keys are masked and pooling
    skips them).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._open()

    def _open(self) -> None:
        p = self.path
        try:
            self.meta = json.loads((p / "meta.json").read_text())
            self.item_row = np.load(p / "item_row.npy", allow_pickle=False)
            if self.meta["modality"] == "text":
                self.lengths = np.load(p / "lengths.npy", allow_pickle=False).astype(np.int64)
                self.offsets = np.load(p / "offsets.npy", allow_pickle=False)
                self.data = np.load(p / "hidden.npy", mmap_mode="r", allow_pickle=False)
            else:
                self.lengths = self.offsets = None
                self.data = np.load(p / "maps.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise DataError(f"{p}: unreadable prefix cache ({exc}); delete it to rebuild") from None
        self.key = self.meta["key"]
        self.modality = TEXT if self.meta["modality"] == "text" else IMAGE
        self.dtype = self.meta["dtype"]
        self.n_rows = int(self.meta["n_rows"])

    # memory maps are reopened, not copied, when a loader worker receives this object
    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._open()

    @property
    def nbytes(self) -> int:
        return int(self.meta["bytes"])

    @property
    def bytes_per_item(self) -> float:
        return self.nbytes / max(self.n_rows, 1)

    def rows(self, items: np.ndarray) -> np.ndarray:
        r = self.item_row[np.asarray(items, dtype=np.int64)]
        if (r < 0).any():
            bad = int(np.asarray(items)[r < 0][0])
            raise DataError(f"{self.path}: item {bad} has no {self.meta['modality']} prefix in this cache")
        return r

    def gather(self, items: np.ndarray, width: int | None = None) -> torch.Tensor:
        rows = self.rows(items)
        if self.modality == IMAGE:
            return from_words(self.data[rows], self.dtype)
        lengths = self.lengths[rows]
        w = int(width) if width is not None else max(int(lengths.max(initial=0)), 1)
        pos = np.arange(w, dtype=np.int64)
        valid = pos[None, :] < lengths[:, None]
        flat = np.where(valid, self.offsets[rows][:, None] + pos[None, :], 0)
        out = np.asarray(self.data[flat.reshape(-1)]).reshape(len(rows), w, -1)
        out[~valid] = 0
        return from_words(out, self.dtype)

    def __repr__(self) -> str:
        return (f"PrefixStore({str(self.path)!r}, {self.meta['modality']}, rows={self.n_rows}, "
                f"{self.dtype}, {human_bytes(self.nbytes)})")


# ----------------------------------------------------------------------------- the content source

class PrefixCachedContent:
    """A :class:`~transrec.shards.batch.ContentSource` whose content carries the frozen prefix.

    ``inner`` is the item content (the item cache); ``text`` / ``image`` are the stores of the
    modalities to serve from the cache (None: that modality passes through unchanged and its encoder
    runs whole). Every other attribute (``valid``, ``key``, ``path`` ...) is the inner source's.
    ``keep_pixels``: also gather the raw pixels of cached image items (default: an empty
    ``[Ui, 3, 0, 0]`` tensor, since the encoder reads only the prefix).
    """

    def __init__(self, inner, text: PrefixStore | None = None, image: PrefixStore | None = None, *,
                 keep_pixels: bool = False):
        if text is None and image is None:
            raise ValueError("PrefixCachedContent needs a text or an image store")
        for store in (text, image):
            if store is not None and len(store.item_row) != int(inner.n_items):
                raise DataError(f"{store.path}: prefix cache for {len(store.item_row)} items, the item "
                                f"content has {inner.n_items}")
        self.inner, self.text_store, self.image_store = inner, text, image
        self.keep_pixels = bool(keep_pixels)
        self.n_items = int(inner.n_items)
        self.modality = np.asarray(inner.modality, dtype=np.int8)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("inner", "text_store", "image_store"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def stores(self) -> dict[str, PrefixStore]:
        return {k: s for k, s in (("text", self.text_store), ("image", self.image_store)) if s is not None}

    def gather(self, items: np.ndarray) -> tuple[TextContent | None, ImageContent | None]:
        items = np.asarray(items, dtype=np.int64)
        mod = self.modality[items]
        if self.image_store is not None and not self.keep_pixels:
            raw_pos = np.flatnonzero(mod != IMAGE)  # image items need no raw content at all
            text, image = self.inner.gather(items[raw_pos]) if raw_pos.size else (None, None)
            if text is not None:
                text = TextContent(text.input_ids, text.attention_mask,
                                   torch.from_numpy(raw_pos[text.index.numpy()]), text.prefix)
            img_pos = np.flatnonzero(mod == IMAGE)
            image = None
            if img_pos.size:
                image = ImageContent(torch.empty((img_pos.size, 3, 0, 0), dtype=torch.uint8),
                                     torch.from_numpy(img_pos))
        else:
            text, image = self.inner.gather(items)
        if text is not None and self.text_store is not None:
            sel = items[text.index.numpy()]
            text.prefix = self.text_store.gather(sel, width=int(text.input_ids.shape[1]))
        if image is not None and self.image_store is not None:
            image.prefix = self.image_store.gather(items[image.index.numpy()])
        return text, image

    def __repr__(self) -> str:
        return f"PrefixCachedContent({self.inner!r}, {list(self.stores.values())!r})"
