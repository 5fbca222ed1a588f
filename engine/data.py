"""What the engine reads: a dataset folder, the item content its model needs, and loaders over it.

Training, evaluation, the standalone evaluator and the benchmarks all open data here, so none of
them imports the trainer. Opening a dataset's content (:func:`open_data`, :class:`NoContent`) lives
below both rooms, in :mod:`transrec.models.content`, which serving imports too.
"""

from __future__ import annotations

from transrec.config import Config
from transrec.models.content import NoContent, open_data
from transrec.shards.loader import SequenceLoader

__all__ = ["NoContent", "open_data", "make_loader", "epoch_facts", "epoch_line", "batch_size_warning"]


def make_loader(cfg: Config, ds, content, split: str, *, batch_size: int, rank: int, world: int,
                start_cursor: int = 0, seed: int | None = None, max_len: int | None = None,
                layout: dict | None = None) -> SequenceLoader:
    """A loader over one split with the config's sequence length, training windows, workers, policy
    and seed; ``layout``: its first epoch was begun in that other layout (see
    :mod:`~transrec.shards.loader`)."""
    return SequenceLoader(ds, content, split=split, batch_size=batch_size,
                          max_len=max_len or cfg.data.max_len, seed=cfg.run.seed if seed is None else seed,
                          rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                          policy=cfg.data.policy, start_cursor=start_cursor, windows=cfg.data.windows,
                          cache_dir=cfg.data.cache_dir or None, layout=layout)


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


def batch_size_warning(cfg: Config, ds, content) -> str | None:
    """The warning line when a step asks for more sequences than the training split holds."""
    n_train = sum(int(s.n_train) for s in ds.seq_shards)
    what = "training sequences"
    if cfg.data.windows != "last":  # several samples a sequence: count them
        n_train = make_loader(cfg, ds, content, "train", batch_size=1, rank=0, world=1).samples_in_split
        what = f"training samples (data.windows={cfg.data.windows})"
    batch = cfg.data.batch_size
    if batch <= n_train:
        return None
    repeat = ("policy repeat repeats rows within a step" if cfg.data.policy == "repeat"
              else f"policy {cfg.data.policy} gives no full batch")
    return (f"warning: data.batch_size={batch} exceeds the {n_train} {what} of "
            f"{cfg.data.path or ds.path}; {repeat}")
