"""What the engine reads: a dataset folder, the item content its model needs, and loaders over it.

Training, evaluation, the standalone evaluator and the benchmarks all open data here, so none of
them imports the trainer.
"""

from __future__ import annotations

import numpy as np

from transrec.config import Config
from transrec.errors import ConfigError
from transrec.models.recommender import content_spec
from transrec.shards.cache import build_or_load_item_cache
from transrec.shards.dataset import Dataset
from transrec.shards.loader import SequenceLoader


class NoContent:
    """The content source of the ID baseline: item indices only, no titles or pictures."""

    def __init__(self, ds: Dataset):
        self.n_items = int(ds.n_items)
        self.modality = np.asarray(ds.modality, dtype=np.int8)

    def gather(self, items):
        return None, None


def open_data(cfg: Config, path: str | None = None, *, show: bool = False):
    """(Dataset, its item content as the model config needs it) for ``path`` (default ``data.path``):
    the item cache for TransRec, :class:`NoContent` for the ID baseline."""
    path = path or cfg.data.path
    if not path:
        raise ConfigError("no dataset: pass --data DIR (or data.path=DIR)")
    ds = Dataset.open(path)
    if cfg.model.kind == "id":
        return ds, NoContent(ds)
    content = build_or_load_item_cache(ds, cache_dir=cfg.data.cache_dir or None, **content_spec(cfg.model),
                                       progress=show)
    return ds, content


def make_loader(cfg: Config, ds, content, split: str, *, batch_size: int, rank: int, world: int,
                start_cursor: int = 0, seed: int | None = None, max_len: int | None = None) -> SequenceLoader:
    """A loader over one split with the config's sequence length, training windows, workers, policy
    and seed."""
    return SequenceLoader(ds, content, split=split, batch_size=batch_size,
                          max_len=max_len or cfg.data.max_len, seed=cfg.run.seed if seed is None else seed,
                          rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                          policy=cfg.data.policy, start_cursor=start_cursor, windows=cfg.data.windows,
                          cache_dir=cfg.data.cache_dir or None)


def epoch_facts(loader: SequenceLoader) -> dict:
    """What one training epoch is under the loader's settings (for the start line and ``data.json``)."""
    return {"windows": loader.windows, "max_len": loader.max_len, "samples": loader.samples_in_split,
            "rows_per_epoch": loader.samples_per_epoch, "batches_per_epoch": len(loader),
            "batch_per_rank": loader.batch_size, "world_size": loader.world_size, "policy": loader.policy}


def epoch_line(facts: dict) -> str:
    """One log line from :func:`epoch_facts`."""
    return (f"data: windows={facts['windows']} (max_len {facts['max_len']}): {facts['samples']} training "
            f"samples; an epoch is {facts['batches_per_epoch']} batches of {facts['batch_per_rank']} per "
            f"rank, {facts['rows_per_epoch']} rows over {facts['world_size']} rank(s) "
            f"(policy {facts['policy']})")
