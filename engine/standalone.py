"""Evaluation without DeepSpeed or a process group: a run's consolidated weights in plain torch.

``transrec eval --run RUN`` uses this, so evaluating never needs the training set-up (the run's
config rebuilds the model; any ZeRO stage's checkpoint is consolidated on the CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch

from transrec.engine.consolidate import load_run
from transrec.engine.data import make_loader, open_data
from transrec.engine.ranking import encode_catalogue, split_metrics
from transrec.engine.tracking import bars_enabled, say
from transrec.errors import UserError
from transrec.shards.dataset import Dataset


def load_run_model(run: str | Path):
    """(config, model in eval mode with the latest checkpoint's weights, checkpoint manifest)."""
    cfg, model, man = load_run(run)
    return cfg, model.eval(), man


def _other_catalogue(model, cfg, ds) -> bool:
    """True when ``model`` has per-item vectors (the hybrid) and ``ds`` holds other items than the
    dataset they were trained on (or that dataset cannot be read to tell)."""
    if getattr(model, "item_residual", None) is None:
        return False
    try:
        trained = Dataset.open(cfg.data.path)
    except (OSError, UserError):
        return True
    return list(trained.item_ids) != list(ds.item_ids)


def evaluate_run(run: str | Path, *, data: str | None = None, splits: str = "valid,test",
                 item_chunk: int | None = None, show: bool | None = None,
                 progress: str | None = None) -> dict:
    """``show``: tqdm bars or not; None follows ``progress`` (``auto``|``on``|``off``), by default the
    run's ``run.progress``."""
    cfg, model, man = load_run_model(run)
    if show is None:
        show = bars_enabled(progress or cfg.run.progress)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    ds, content = open_data(cfg, data, show=show)
    if cfg.model.kind == "id" and ds.n_items != man.get("n_items"):
        raise UserError(f"{data}: the ID model of {run} knows {man.get('n_items')} items, this dataset "
                        f"has {ds.n_items}; ID models evaluate on their own catalogue only")
    chunk = item_chunk or cfg.eval.item_chunk
    content_only = _other_catalogue(model, cfg, ds)
    if content_only:
        say(f"{data}: not the catalogue the model's per-item vectors were trained on; its items are "
            "scored by their content alone")
    emb = encode_catalogue(model, content, chunk=chunk, device=device, show=show, content_only=content_only)
    out = {"run": str(run), "step": man["client"]["step"], "data": str(data or cfg.data.path),
           "protocol": {"exclude_history": cfg.eval.exclude_history}}
    for split in [s.strip() for s in splits.split(",") if s.strip()]:
        if split not in ("valid", "test"):
            raise UserError(f"--split: {split!r} is not valid or test")
        loader = make_loader(cfg, ds, content, split, batch_size=cfg.eval.batch_size, rank=0, world=1, seed=0)
        out[split] = split_metrics(model, loader, content, ks=tuple(cfg.eval.ks), item_chunk=chunk,
                                   device=device, max_users=cfg.eval.max_users, show=show, item_emb=emb,
                                   exclude_history=cfg.eval.exclude_history)
    return out
