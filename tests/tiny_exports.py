"""A small synthetic world and a random-init ``tiny`` export of it: what the serving tests score."""

from __future__ import annotations

from pathlib import Path

import torch

from transrec.config import build_config
from transrec.models import build_model
from transrec.shards.synth import synthesize


def tiny_world(root: Path, *, seed: int, n_users: int = 30, n_items: int = 40, overrides=()):
    """``(data, cfg, export)``: a target world of ``n_users`` users and ``n_items`` items, and a
    random-init (seed 0) tiny content export of it (item chunk 16, evaluation batch 8, so a
    catalogue is encoded in several chunks and users come in several batches)."""
    data = synthesize(root / "data", domain="target", n_users=n_users, n_items=n_items, seed=seed,
                      min_len=4, max_len=10)
    cfg = build_config("tiny", None, [f"data.path={data}", "eval.item_chunk=16", "eval.batch_size=8",
                                      *overrides])
    torch.manual_seed(0)
    exp = build_model(cfg.model).save_export(root / "export", cfg, {"kind": "full", "step": 0})
    return data, cfg, exp
