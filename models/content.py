"""The item content a model reads: a dataset's item cache, or item indices only for the ID baseline.

Serving (:class:`~transrec.inference.recommender.Recommender`) and the training engine
(``transrec.engine.data``) both open a dataset's content here, below either room, so both encode the
same items the same way.
"""

from __future__ import annotations

import numpy as np

from transrec.config import Config
from transrec.errors import ConfigError
from transrec.models.sequential import content_spec
from transrec.shards.cache import build_or_load_item_cache
from transrec.shards.dataset import Dataset
from transrec.shards.remote import use_shard_cache


class NoContent:
    """The content source of the ID baseline: item indices only, no titles or pictures."""

    def __init__(self, ds: Dataset):
        self.n_items = int(ds.n_items)
        self.modality = np.asarray(ds.modality, dtype=np.int8)

    def gather(self, items):
        return None, None


def open_data(cfg: Config, path: str | None = None, *, show: bool = False):
    """(Dataset, its item content as the model config needs it) for ``path`` (default ``data.path``):
    the item cache for TransRec, :class:`NoContent` for the ID baseline. ``path`` may be a dataset in
    an object store (``s3://``, ``https://``): its shards then stream, through ``data.shard_cache``
    when set, and its item cache is built in a local folder (``data.cache_dir``, else the one line
    printed names it)."""
    path = path or cfg.data.path
    if not path:
        raise ConfigError("no dataset: pass --data DIR (or data.path=DIR)")
    ds = Dataset.open(path)
    if ds.remote:
        use_shard_cache(cfg.data.shard_cache or None, int(cfg.data.shard_cache_gb * 2**30))
    if cfg.model.kind == "id":
        return ds, NoContent(ds)
    content = build_or_load_item_cache(ds, cache_dir=cfg.data.cache_dir or None, **content_spec(cfg.model),
                                       progress=show)
    return ds, content
