"""The frozen-prefix cache: an item encoder's frozen lower blocks run once per item, not once per step.

With ``model.text.trainable = k`` (or ``model.image.trainable = k``) only the top ``k`` blocks of an
item encoder train; the stem and the blocks below form the *frozen prefix*
(:class:`~transrec.models.encoder_base.ItemEncoderBase`). Run in eval mode, the prefix output of an
item is a pure function of its content and the frozen weights, so it is computed once, stored, and
each step runs only the trainable tail on it::

    encoder(content) = forward_tail(forward_prefix(content))      # plain loop, every step
    encoder(content) = forward_tail(store[item])                  # with this cache

What is stored, per modality, in a folder beside the item cache (``prefix-<modality>-<key>``)::

    meta.json     key and its inputs, shapes, dtype, disk figures, build time
    item_row.npy  [n_items] int64  row of every item in this store (-1: item of the other modality)
    text:  lengths.npy [n_text] int32, offsets.npy [n_text + 1] int64,
           hidden.npy  [sum(lengths), H]  hidden states after the last frozen block, real tokens only
    image: maps.npy    [n_image, C, h, w] feature maps after the last frozen stage ([N, H] for a ViT)

Values are bf16 by default (fp16 / fp32 by choice). numpy has no bf16, so bf16 values are stored as
their raw 16-bit words (uint16) and viewed back as ``torch.bfloat16``. Text is stored ragged (only
real tokens): titles are usually much shorter than ``max_text_len``.

The key is a hash of (item content key, modality, the encoder's :meth:`frozen_hash` -- architecture,
frozen depth, every prefix weight and buffer --, the frozen depth, dtype, format), so a store is
reused until one of those changes and then rebuilt. Two processes asking for the same store at once
are safe: one takes an exclusive lock and builds into a temporary folder renamed into place when
complete; the other waits on the lock, then loads.

:class:`PrefixCachedContent` wraps any :class:`~transrec.shards.batch.ContentSource`: its ``gather``
returns the same Text/ImageContent with ``.prefix`` filled (text keeps its attention mask; image
items carry an empty pixel tensor, their pixels are never read). Every tensor it returns is on the
host, so ``Batch.to(device)`` moves the batch, prefix included, in one transfer. The encoders run only
their tail when ``.prefix`` is set (:meth:`TextItemEncoder.forward`, :meth:`ImageItemEncoder.forward`).

:func:`maybe_wrap` is what the engine calls once the model is built (before DeepSpeed wraps it, so
the weights are whole): it wraps the content source, or logs ONE line saying why it does not (prefix
cache switched off, full fine-tuning, LoRA in every block, augmentation on the frozen path, a frozen
block whose dropout stays active in training) and returns the plain source. Training and
evaluation then gather through the same wrapped source, so evaluation uses the same cache.

Costs (the trade-off): disk and page cache hold ``bytes/item`` per item -- text ``tokens x H x 2``
(bf16), image ``C x h x w x 2`` -- against ``4 x max_len`` bytes of token ids or ``3 x S x S`` bytes of
pixels in the item cache; the figures are printed when a store is built. In exchange each step skips
the frozen blocks' forward for every unique item of the batch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transrec.shards.batch import IMAGE, MODALITY_NAMES, TEXT, ImageContent, TextContent
from transrec.shards.locking import locked_build

from transrec.errors import ConfigError, DataError

PREFIX_FORMAT = 1
# name -> (torch dtype of the values, numpy dtype of the stored words)
DTYPES: dict[str, tuple[torch.dtype, type]] = {
    "bf16": (torch.bfloat16, np.uint16),
    "fp16": (torch.float16, np.float16),
    "fp32": (torch.float32, np.float32),
}
log = logging.getLogger("transrec.prefix_cache")

LogFn = Callable[[str], None]


# ----------------------------------------------------------------------------- helpers

def _emit(msg: str, fn: LogFn | None, level: int = logging.INFO) -> None:
    """One line to ``fn`` when given, else to this module's logger."""
    if fn is not None:
        fn(msg)
    else:
        log.log(level, msg)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _check_dtype(dtype: str) -> str:
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


# ----------------------------------------------------------------------------- the store

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
                f"{self.dtype}, {_human(self.nbytes)})")


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextlib.contextmanager
def _build_copy(encoder, device: torch.device):
    """The encoder in eval mode on ``device`` (a copy when it lives elsewhere); training mode restored."""
    if _device_of(encoder) == device:
        was = encoder.training
        encoder.eval()
        try:
            yield encoder
        finally:
            encoder.train(was)
    else:
        enc = copy.deepcopy(encoder).to(device).eval()
        try:
            yield enc
        finally:
            del enc


def _autocast(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=DTYPES[dtype][0])
    return contextlib.nullcontext()


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="item", mininterval=1.0)


def _build_text(content, encoder, out: Path, items: np.ndarray, *, dtype: str, device: torch.device,
                batch_size: int, progress: bool) -> dict:
    n = len(items)
    # lengths first (cheap: token ids only), so the ragged layout is known before any encoder pass
    lengths = np.zeros(n, dtype=np.int64)
    for s in range(0, n, 4096):
        text, _ = content.gather(items[s:s + 4096])
        lengths[s:s + 4096] = text.attention_mask.sum(1).numpy()
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    hidden = int(encoder.hidden_size)
    data = np.lib.format.open_memmap(out / "hidden.npy", mode="w+", dtype=DTYPES[dtype][1],
                                     shape=(int(offsets[-1]), hidden))
    order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding per pass
    bar = _bar(n, "prefix cache text", progress)
    with _build_copy(encoder, device) as enc, torch.inference_mode(), _autocast(device, dtype):
        for s in range(0, n, batch_size):
            sel = order[s:s + batch_size]
            text, _ = content.gather(items[sel])
            h = enc.forward_prefix(text.input_ids.to(device), text.attention_mask.to(device))
            mask = text.attention_mask.bool()
            words = to_words(h[mask.to(h.device)], dtype)  # real tokens, row-major
            dest = offsets[sel][:, None] + np.arange(mask.shape[1])[None, :]
            data[dest[mask.numpy()]] = words
            if bar is not None:
                bar.update(len(sel))
    if bar is not None:
        bar.close()
    data.flush()
    del data
    np.save(out / "lengths.npy", lengths.astype(np.int32))
    np.save(out / "offsets.npy", offsets)
    per_value = np.dtype(DTYPES[dtype][1]).itemsize
    return {"hidden": hidden, "tokens": int(offsets[-1]),
            "mean_tokens": float(lengths.mean()) if n else 0.0,
            "bytes": int(offsets[-1]) * hidden * per_value + lengths.nbytes + offsets.nbytes}


def _build_image(content, encoder, out: Path, items: np.ndarray, *, dtype: str, device: torch.device,
                 batch_size: int, progress: bool) -> dict:
    n = len(items)
    shape = tuple(int(s) for s in encoder.prefix_item_shape)
    data = np.lib.format.open_memmap(out / "maps.npy", mode="w+", dtype=DTYPES[dtype][1], shape=(n, *shape))
    bar = _bar(n, "prefix cache image", progress)
    with _build_copy(encoder, device) as enc, torch.inference_mode(), _autocast(device, dtype):
        for s in range(0, n, batch_size):
            _, image = content.gather(items[s:s + batch_size])
            h = enc.forward_prefix(image.pixels.to(device))
            if tuple(h.shape[1:]) != shape:
                raise DataError(f"image prefix of shape {tuple(h.shape[1:])}, expected {shape}: the item "
                                f"cache's image size differs from model.image.image_size")
            data[s:s + len(h)] = to_words(h, dtype)
            if bar is not None:
                bar.update(len(h))
    if bar is not None:
        bar.close()
    data.flush()
    del data
    per_value = np.dtype(DTYPES[dtype][1]).itemsize
    return {"shape": list(shape), "bytes": int(n * int(np.prod(shape)) * per_value)}


def _raw_bytes_per_item(content, modality: int) -> float | None:
    """Bytes per item of the raw content in the item cache (token ids / pixels), for comparison."""
    arr = getattr(content, "tokens" if modality == TEXT else "images", None)
    if arr is None or not len(arr):
        return None
    return float(arr.nbytes / len(arr))


def build_or_load_prefix_store(content, encoder, modality: int, *, cache_dir: str | Path,
                               dtype: str = "bf16", device: str | torch.device | None = None,
                               batch_size: int | None = None, progress: bool = True,
                               log_fn: LogFn | None = None, lock_timeout: float = 3600.0) -> PrefixStore:
    """The store of ``encoder``'s frozen-prefix outputs for ``content``'s items of ``modality``
    (TEXT or IMAGE), built first if it does not exist for the current key.

    ``device``: where the build runs (default: CUDA when available, else the CPU); the encoder is
    copied there when it lives elsewhere and always runs in eval mode. The disk and memory figures
    are logged (``log_fn`` or this module's logger) when the store is built.
    """
    _check_dtype(dtype)
    items = np.flatnonzero(np.asarray(content.modality) == modality).astype(np.int64)
    if not len(items):
        raise ConfigError(f"no {MODALITY_NAMES[modality]} item to cache")
    content_id, fhash = content_identity(content), encoder.frozen_hash()
    key = prefix_key(content_id, modality, fhash, encoder.n_frozen_blocks, dtype)
    name = MODALITY_NAMES[modality]
    final = Path(cache_dir) / f"prefix-{name}-{key}"
    if (final / "meta.json").is_file():
        return PrefixStore(final)
    dev = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if batch_size is None:
        batch_size = (1024 if modality == TEXT else 256) if dev.type == "cuda" else \
            (256 if modality == TEXT else 64)
    with locked_build(final, lock_timeout, f"{name} prefix cache") as tmp:
        if tmp is not None:
            t0 = time.perf_counter()
            build = _build_text if modality == TEXT else _build_image
            facts = build(content, encoder, tmp, items, dtype=dtype, device=dev, batch_size=int(batch_size),
                          progress=progress)
            item_row = np.full(int(content.n_items), -1, dtype=np.int64)
            item_row[items] = np.arange(len(items))
            np.save(tmp / "item_row.npy", item_row)
            facts["bytes"] += item_row.nbytes
            seconds = time.perf_counter() - t0
            meta = {
                "key": key, "format": PREFIX_FORMAT, "modality": name, "dtype": dtype,
                "content": content_id, "encoder": encoder.describe(),
                "frozen_blocks": int(encoder.n_frozen_blocks), "blocks": int(encoder.n_blocks),
                "frozen_hash": fhash, "n_rows": len(items), **facts,
                "bytes_per_item": facts["bytes"] / len(items),
                "raw_bytes_per_item": _raw_bytes_per_item(content, modality),
                "build_seconds": round(seconds, 3), "build_device": str(dev),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            _emit(_build_line(meta, seconds, final), log_fn)
    return PrefixStore(final)


def _build_line(meta: dict, seconds: float, path: Path) -> str:
    n, bpi = meta["n_rows"], meta["bytes_per_item"]
    if meta["modality"] == "text":
        what = f"{meta['mean_tokens']:.1f} tokens/item x {meta['hidden']} hidden"
    else:
        what = "x".join(str(s) for s in meta["shape"]) + " per item"
    raw = meta.get("raw_bytes_per_item")
    vs = f" (raw content {_human(raw)}/item)" if raw else ""
    return (f"prefix cache {meta['modality']}: built {n:,} items in {seconds:.1f}s "
            f"on {meta['build_device']}, "
            f"{meta['frozen_blocks']}/{meta['blocks']} blocks frozen, {what}, {meta['dtype']}: "
            f"{_human(bpi)}/item{vs}, {_human(meta['bytes'])} on disk, memory-mapped "
            f"(host memory: page cache up to that, per batch {_human(bpi)} x unique items) -> {path}")


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


# ----------------------------------------------------------------------------- engine entry point

def not_cacheable_reason(encoder, cfg=None) -> str | None:
    """Why ``encoder``'s frozen prefix cannot be cached (one phrase), or None when it can.

    The encoder's own :meth:`prefix_not_cacheable_reason` for a training run, then augmentation on
    the frozen path (a truthy ``augment`` on the encoder, its config or ``cfg.data``).
    """
    name = encoder.arch
    reason = encoder.prefix_not_cacheable_reason(for_training=True)
    if reason is not None:
        return reason
    for where, obj in (("encoder", encoder), ("encoder config", getattr(encoder, "cfg", None)),
                       ("data config", getattr(cfg, "data", None))):
        aug = getattr(obj, "augment", None) if obj is not None else None
        if aug:
            return f"{name} encoder input is augmented on the frozen path ({where} augment={aug!r})"
    return None


def _switch(cfg, enabled: bool | None, dtype: str | None) -> tuple[bool, str]:
    data = getattr(cfg, "data", None)
    if enabled is None:
        enabled = bool(getattr(data, "prefix_cache", True))
    if dtype is None:
        dtype = str(getattr(data, "prefix_cache_dtype", "bf16"))
    return enabled, _check_dtype(dtype)


def _default_dir(content, cfg) -> Path:
    p = getattr(content, "path", None)
    if p is not None and Path(p).is_dir():
        return Path(p).parent  # beside the item cache
    d = getattr(getattr(cfg, "data", None), "cache_dir", "")
    if d:
        return Path(d)
    env = os.environ.get("TRANSREC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "transrec"


def maybe_wrap(content, model, cfg=None, cache_dir: str | Path | None = None, log: LogFn | None = None, *,
               enabled: bool | None = None, dtype: str | None = None,
               device: str | torch.device | None = None,
               batch_size: int | None = None, progress: bool = True):
    """``content`` wrapped in a :class:`PrefixCachedContent` for ``model``, or ``content`` itself.

    Call it once the model's weights are final (after loading pretrained / transferred weights) and
    before DeepSpeed wraps it. ``cfg`` is the run config: ``data.prefix_cache`` (on/off) and
    ``data.prefix_cache_dtype`` are read from it when present (``enabled`` / ``dtype`` override).
    It sets each item encoder's ``serves_cached_prefix`` (whether its content comes from the cache),
    which decides how an absent modality's dummy runs under ZeRO-3. Logs one line through ``log``
    (or the ``transrec.prefix_cache`` logger): what is cached, or why it falls back. Stores go to
    ``cache_dir`` (default: beside the item cache).
    """
    net = getattr(model, "module", model)
    enabled, dtype = _switch(cfg, enabled, dtype)
    encoders = net.item_encoders() if hasattr(net, "item_encoders") else {}
    if not enabled:
        for enc in encoders.values():
            if hasattr(enc, "serves_cached_prefix"):
                enc.serves_cached_prefix = False
        _emit("frozen-prefix cache off (data.prefix_cache=false): item encoders run whole every step", log)
        return content
    if not encoders:
        _emit(f"frozen-prefix cache off: {type(net).__name__} has no content item encoder", log)
        return content
    mods = np.asarray(content.modality)
    reasons, use = {}, {}
    for mid, name in enumerate(MODALITY_NAMES):
        enc = encoders.get(name)
        if enc is None or not (mods == mid).any():
            continue
        r = not_cacheable_reason(enc, cfg)
        if r is None:
            use[name] = enc
        else:
            reasons[name] = r
    for name, enc in encoders.items():
        # how an absent modality's dummy runs (tail only or whole): like that modality's real
        # content, so that every rank runs the same modules under ZeRO-3 (see models.recommender)
        if hasattr(enc, "serves_cached_prefix"):
            enc.serves_cached_prefix = name in use
    if not use:
        _emit("frozen-prefix cache off, full encoders run every step: " +
              "; ".join(f"{k}: {v}" for k, v in reasons.items()), log, logging.WARNING)
        return content
    root = Path(cache_dir) if cache_dir is not None else _default_dir(content, cfg)
    stores = {name: build_or_load_prefix_store(content, enc, TEXT if name == "text" else IMAGE,
                                               cache_dir=root, dtype=dtype, device=device,
                                               batch_size=batch_size, progress=progress, log_fn=log)
              for name, enc in use.items()}
    wrapped = PrefixCachedContent(content, stores.get("text"), stores.get("image"))
    parts = [f"{n} {use[n].n_frozen_blocks}/{use[n].n_blocks} blocks frozen, "
             f"{_human(s.bytes_per_item)}/item" for n, s in stores.items()]
    total = sum(s.nbytes for s in stores.values())
    line = (f"frozen-prefix cache on ({dtype}, {_human(total)} on disk in {root}): " + "; ".join(parts))
    if reasons:
        line += "; not cached: " + "; ".join(f"{k}: {v}" for k, v in reasons.items())
    _emit(line, log, logging.WARNING if reasons else logging.INFO)
    return wrapped
