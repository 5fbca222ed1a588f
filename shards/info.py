"""Dataset statistics for ``transrec shards info``: sizes, sequence lengths, sparsity, popularity
skew, modality mix and split counts, read from the manifest, the item index and one pass over the
sequence shards."""

from __future__ import annotations

import json

import numpy as np
import webdataset as wds

from transrec.shards.batch import IMAGE, TEXT
from transrec.shards.cache import cache_key
from transrec.shards.dataset import Dataset
from transrec.shards.format import EVAL_MIN, train_part
from transrec.shards.remote import local_cache_root


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0: every item equally popular; near 1: one item)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * total))


def dataset_stats(ds: Dataset) -> dict:
    """Statistics of a dataset (every interaction counted once; unknown item ids are left out)."""
    index = ds.item_index
    counts = np.zeros(ds.n_items, dtype=np.int64)
    lengths = []
    n_train = n_eval = 0
    for s in wds.WebDataset([str(x.path) for x in ds.seq_shards], shardshuffle=False, nodesplitter=None,
                            workersplitter=None, empty_check=False):
        items = np.asarray([index.get(k, -1) for k in json.loads(s["json"])["items"]], dtype=np.int64)
        items = items[items >= 0]
        np.add.at(counts, items, 1)
        lengths.append(items.size)
        n_train += len(train_part(items))
        n_eval += int(items.size >= EVAL_MIN)
    lengths = np.asarray(lengths, dtype=np.int64)
    n_inter = int(counts.sum())
    top = max(1, int(np.ceil(0.01 * ds.n_items)))
    mod = ds.modality
    q = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
    return {
        "path": str(ds.path),
        "users": int(lengths.size),
        "items": int(ds.n_items),
        "interactions": n_inter,
        "density": n_inter / max(1, lengths.size * ds.n_items),
        "sequence_length": {"mean": float(lengths.mean()) if lengths.size else 0.0,
                            **{f"p{int(p * 100)}": float(np.quantile(lengths, p)) if lengths.size else 0.0
                               for p in q}},
        "popularity": {"top1pct_items": top,
                       "top1pct_share": float(np.sort(counts)[::-1][:top].sum() / max(1, n_inter)),
                       "gini": gini(counts), "items_never_seen": int((counts == 0).sum())},
        "modality": {"text_items": int((mod == TEXT).sum()), "image_items": int((mod == IMAGE).sum()),
                     "text_interactions": int(counts[mod == TEXT].sum()),
                     "image_interactions": int(counts[mod == IMAGE].sum())},
        "splits": {"train_interactions": n_train, "valid": n_eval, "test": n_eval,
                   "train_only_users": int(lengths.size - n_eval)},
    }


def format_stats(st: dict) -> str:
    """The statistics as a few readable lines."""
    sl, pop, m, sp = st["sequence_length"], st["popularity"], st["modality"], st["splits"]
    n_items = max(1, st["items"])
    return "\n".join([
        f"{st['path']}: {st['users']:,} users, {st['items']:,} items, {st['interactions']:,} interactions "
        f"(density {st['density']:.4%})",
        "sequence length: mean {:.1f}; min {:g}, p25 {:g}, median {:g}, p75 {:g}, p90 {:g}, max {:g}".format(
            sl["mean"], sl["p0"], sl["p25"], sl["p50"], sl["p75"], sl["p90"], sl["p100"]),
        f"popularity: top 1% of items ({pop['top1pct_items']}) take {pop['top1pct_share']:.1%} of "
        f"interactions; Gini {pop['gini']:.3f}; {pop['items_never_seen']} items never interacted with",
        f"modality: {m['text_items']:,} text items ({m['text_items'] / n_items:.0%}), {m['image_items']:,} "
        f"image items; interactions {m['text_interactions']:,} text, {m['image_interactions']:,} image",
        f"splits (leave-one-out): {sp['train_interactions']:,} training interactions, {sp['valid']:,} valid "
        f"and {sp['test']:,} test users, {sp['train_only_users']:,} users train only",
    ])


def recorded_skips(ds: Dataset) -> dict:
    """Bad input recorded for this dataset: skipped while writing it (the manifest) and while
    building each of its current item caches (their meta.json, in the dataset's ``.cache``, or for a
    dataset in an object store in its local cache folder)."""
    out = {"while_writing": dict(ds.manifest.get("skipped_while_writing") or {}), "item_caches": {}}
    root = local_cache_root(str(ds.path)) if ds.remote else ds.path / ".cache"
    for meta_path in sorted(root.glob("items-*/meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
            key = cache_key(ds, meta["tokenizer"]["sha256"], meta["max_text_len"], meta["image_size"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if key == meta.get("key"):  # a cache of older shards would describe other data
            out["item_caches"][meta_path.parent.name] = {"skipped": dict(meta.get("skipped") or {}),
                                                         "n_valid": meta.get("n_valid")}
    return out


def format_skips(skipped: dict, n_items: int) -> str:
    """The recorded skipped input as lines (one when there is none)."""
    def kinds(counts: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))

    lines = []
    if skipped["while_writing"]:
        lines.append(f"skipped while writing: {kinds(skipped['while_writing'])}")
    for name, c in skipped["item_caches"].items():
        if c["skipped"]:
            bad = n_items - int(c["n_valid"]) if c.get("n_valid") is not None else sum(c["skipped"].values())
            rate = bad / max(1, n_items)
            lines.append(f"skipped in item cache {name}: {bad} of {n_items} items ({rate:.1%}; "
                         f"{kinds(c['skipped'])})")
    return "\n".join(lines) or "skipped input: none recorded"
