"""The frozen-prefix cache beside the encoders: whether an encoder may be cached, and the build.

With ``model.text.trainable = k`` (or ``model.image.trainable = k``) only the top ``k`` blocks of an
item encoder train; the stem and the blocks below form the *frozen prefix*
(:class:`~transrec.models.encoder_base.ItemEncoderBase`). Run in eval mode, the prefix output of an
item is a pure function of its content and the frozen weights, so it is computed once, stored
(:mod:`transrec.shards.prefix_cache`: the store, which knows nothing of models), and each step runs
only the trainable tail on it.

Who owns what:

- the encoder says whether its prefix may be cached, and why not
  (:meth:`~transrec.models.encoder_base.ItemEncoderBase.prefix_not_cacheable_reason`) and what
  identifies its frozen weights (:meth:`~transrec.models.encoder_base.ItemEncoderBase.frozen_hash`);
- this module runs an encoder's prefix over the catalogue into a store
  (:func:`build_or_load_prefix_store`) and wires the cache into a run (:func:`maybe_wrap`);
- the store (key, layout, writers, reader, :class:`~transrec.shards.prefix_cache.PrefixCachedContent`)
  lives in shards.

:func:`maybe_wrap` is what the engine calls once the model is built (before DeepSpeed wraps it, so
the weights are whole): it wraps the content source, or logs ONE line saying why it does not (prefix
cache switched off, full fine-tuning, LoRA in every block, a frozen block whose dropout stays active
in training) and returns the plain source. Training and evaluation then gather through the same
wrapped source, so evaluation uses the same cache.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from transrec.config.schema import DataConfig
from transrec.errors import ConfigError, DataError
from transrec.locking import locked_build
from transrec.models.encoder_base import ItemEncoderBase
from transrec.models.sequential import TransRec
from transrec.shards.batch import IMAGE, MODALITY_NAMES, TEXT
from transrec.shards.prefix_cache import (
    DTYPES,
    ImageStoreWriter,
    PrefixCachedContent,
    PrefixStore,
    TextStoreWriter,
    build_line,
    check_dtype,
    content_identity,
    default_store_dir,
    finish_store,
    human_bytes,
    is_complete,
    prefix_key,
    store_path,
)

log = logging.getLogger("transrec.prefix_cache")

LogFn = Callable[[str], None]


def _emit(msg: str, fn: LogFn | None, level: int = logging.INFO) -> None:
    """One line to ``fn`` when given, else to this module's logger."""
    if fn is not None:
        fn(msg)
    else:
        log.log(level, msg)


# ----------------------------------------------------------------------------- the build

@contextlib.contextmanager
def _build_copy(encoder: ItemEncoderBase, device: torch.device):
    """The encoder in eval mode on ``device`` (a copy when it lives elsewhere); training mode restored."""
    if next(encoder.parameters()).device == device:
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
    return tqdm(total=total, desc=desc, unit="item", mininterval=1.0) if enabled else None


def write_text_prefix(content, encoder: ItemEncoderBase, out: Path, items: np.ndarray, *, dtype: str,
                      device: torch.device, batch_size: int, progress: bool) -> dict:
    """Run ``encoder``'s prefix over the text ``items`` of ``content`` into a text store in ``out``;
    returns the writer's figures."""
    n = len(items)
    # lengths first (cheap: token ids only), so the ragged layout is known before any encoder pass
    lengths = np.zeros(n, dtype=np.int64)
    for s in range(0, n, 4096):
        text, _ = content.gather(items[s:s + 4096])
        lengths[s:s + 4096] = text.attention_mask.sum(1).numpy()
    writer = TextStoreWriter(out, lengths, int(encoder.hidden_size), dtype)
    order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding per pass
    bar = _bar(n, "prefix cache text", progress)
    with _build_copy(encoder, device) as enc, torch.inference_mode(), _autocast(device, dtype):
        for s in range(0, n, batch_size):
            sel = order[s:s + batch_size]
            text, _ = content.gather(items[sel])
            h = enc.forward_prefix(text.input_ids.to(device), text.attention_mask.to(device))
            writer.write(sel, h, text.attention_mask)
            if bar is not None:
                bar.update(len(sel))
    if bar is not None:
        bar.close()
    return writer.close()


def write_image_prefix(content, encoder: ItemEncoderBase, out: Path, items: np.ndarray, *, dtype: str,
                       device: torch.device, batch_size: int, progress: bool) -> dict:
    """Run ``encoder``'s prefix over the image ``items`` of ``content`` into an image store in
    ``out``; returns the writer's figures."""
    n = len(items)
    shape = tuple(int(s) for s in encoder.prefix_item_shape)
    writer = ImageStoreWriter(out, n, shape, dtype)
    bar = _bar(n, "prefix cache image", progress)
    with _build_copy(encoder, device) as enc, torch.inference_mode(), _autocast(device, dtype):
        for s in range(0, n, batch_size):
            _, image = content.gather(items[s:s + batch_size])
            h = enc.forward_prefix(image.pixels.to(device))
            if tuple(h.shape[1:]) != shape:
                raise DataError(f"image prefix of shape {tuple(h.shape[1:])}, expected {shape}: the item "
                                f"cache's image size differs from model.image.image_size")
            writer.write(s, h)
            if bar is not None:
                bar.update(len(h))
    if bar is not None:
        bar.close()
    return writer.close()


def build_or_load_prefix_store(content, encoder: ItemEncoderBase, modality: int, *, cache_dir: str | Path,
                               dtype: str = "bf16", device: str | torch.device | None = None,
                               batch_size: int | None = None, progress: bool = True,
                               log_fn: LogFn | None = None, lock_timeout: float = 3600.0) -> PrefixStore:
    """The store of ``encoder``'s frozen-prefix outputs for ``content``'s items of ``modality``
    (TEXT or IMAGE), built first if it does not exist for the current key.

    ``device``: where the build runs (default: CUDA when available, else the CPU); the encoder is
    copied there when it lives elsewhere and always runs in eval mode. The disk and memory figures
    are logged (``log_fn`` or the ``transrec.prefix_cache`` logger) when the store is built.
    """
    check_dtype(dtype)
    items = np.flatnonzero(np.asarray(content.modality) == modality).astype(np.int64)
    if not len(items):
        raise ConfigError(f"no {MODALITY_NAMES[modality]} item to cache")
    content_id, fhash = content_identity(content), encoder.frozen_hash()
    key = prefix_key(content_id, modality, fhash, encoder.n_frozen_blocks, dtype)
    final = store_path(cache_dir, modality, key)
    if is_complete(final):
        return PrefixStore(final)
    dev = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if batch_size is None:
        batch_size = (1024 if modality == TEXT else 256) if dev.type == "cuda" else \
            (256 if modality == TEXT else 64)
    with locked_build(final, lock_timeout, f"{MODALITY_NAMES[modality]} prefix cache") as tmp:
        if tmp is not None:
            t0 = time.perf_counter()
            write = write_text_prefix if modality == TEXT else write_image_prefix
            facts = write(content, encoder, tmp, items, dtype=dtype, device=dev, batch_size=int(batch_size),
                          progress=progress)
            seconds = time.perf_counter() - t0
            meta = finish_store(tmp, content, modality, items, {
                "key": key, "dtype": dtype, "content": content_id, "encoder": encoder.describe(),
                "frozen_blocks": int(encoder.n_frozen_blocks), "blocks": int(encoder.n_blocks),
                "frozen_hash": fhash, **facts,
                "build_seconds": round(seconds, 3), "build_device": str(dev),
            })
            _emit(build_line(meta, seconds, final), log_fn)
    return PrefixStore(final)


# ----------------------------------------------------------------------------- engine entry point

def maybe_wrap(content, model, data: DataConfig | None = None, cache_dir: str | Path | None = None,
               log: LogFn | None = None, *, enabled: bool | None = None, dtype: str | None = None,
               device: str | torch.device | None = None,
               batch_size: int | None = None, progress: bool = True):
    """``content`` wrapped in a :class:`PrefixCachedContent` for ``model``, or ``content`` itself.

    Call it once the model's weights are final (after loading pretrained / transferred weights) and
    before DeepSpeed wraps it. ``data`` is the run's data section: ``prefix_cache`` (on/off),
    ``prefix_cache_dtype`` and ``cache_dir`` are read from it (``enabled`` / ``dtype`` override;
    None: the defaults). It sets each item encoder's ``serves_cached_prefix`` (whether its content
    comes from the cache), which decides how an absent modality's dummy runs under ZeRO-3. Logs one
    line through ``log`` (or the ``transrec.prefix_cache`` logger): what is cached, or why it falls
    back. Stores go to ``cache_dir`` (default: beside the item cache).
    """
    data = data if data is not None else DataConfig()
    enabled = data.prefix_cache if enabled is None else enabled
    dtype = check_dtype(data.prefix_cache_dtype if dtype is None else dtype)
    net = getattr(model, "module", model)  # a DeepSpeed engine or DDP wrapper: the model inside
    encoders: dict[str, ItemEncoderBase] = net.item_encoders() if isinstance(net, TransRec) else {}
    if not enabled:
        for enc in encoders.values():
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
        r = enc.prefix_not_cacheable_reason(for_training=True)
        if r is None:
            use[name] = enc
        else:
            reasons[name] = r
    for name, enc in encoders.items():
        # how an absent modality's dummy runs (tail only or whole): like that modality's real
        # content, so that every rank runs the same modules under ZeRO-3 (see models.sequential)
        enc.serves_cached_prefix = name in use
    if not use:
        _emit("frozen-prefix cache off, full encoders run every step: " +
              "; ".join(f"{k}: {v}" for k, v in reasons.items()), log, logging.WARNING)
        return content
    root = Path(cache_dir) if cache_dir is not None else default_store_dir(content, data.cache_dir)
    stores = {name: build_or_load_prefix_store(content, enc, TEXT if name == "text" else IMAGE,
                                               cache_dir=root, dtype=dtype, device=device,
                                               batch_size=batch_size, progress=progress, log_fn=log)
              for name, enc in use.items()}
    wrapped = PrefixCachedContent(content, stores.get("text"), stores.get("image"))
    parts = [f"{n} {use[n].n_frozen_blocks}/{use[n].n_blocks} blocks frozen, "
             f"{human_bytes(s.bytes_per_item)}/item" for n, s in stores.items()]
    total = sum(s.nbytes for s in stores.values())
    line = (f"frozen-prefix cache on ({dtype}, {human_bytes(total)} on disk in {root}): " + "; ".join(parts))
    if reasons:
        line += "; not cached: " + "; ".join(f"{k}: {v}" for k, v in reasons.items())
    _emit(line, log, logging.WARNING if reasons else logging.INFO)
    return wrapped
