"""benchmarks/content_vs_id.py's helpers: per-model overrides and the warm users' paired interval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark

from transrec.engine.intervals import save_ranks


@pytest.fixture
def script(monkeypatch):
    return load_benchmark(monkeypatch, "content_vs_id.py")


def test_set_overrides_one_model_and_refuses_what_it_cannot_place(script):
    got = script.model_sets(["id-sasrec:model.user.dropout=0.5", "transrec-minilm-hybrid:optim.id_lr=1e-2",
                             "id-sasrec:optim.lr=2e-3"])
    assert got == {"id-sasrec": ["model.user.dropout=0.5", "optim.lr=2e-3"],
                   "transrec-minilm-hybrid": ["optim.id_lr=1e-2"]}
    for bad in ("sasrec:model.user.dropout=0.5", "id-sasrec:model.user.dropout", "id-sasrec:=1",
                "model.user.dropout=0.5"):
        with pytest.raises(ValueError, match="--set"):
            script.model_sets([bad])


def _run(tmp_path: Path, name: str, ranks: list[int]) -> tuple[Path, int]:
    """A run folder whose final evaluation ranked user i's target at ranks[i] (both protocols)."""
    run = tmp_path / name
    r = torch.tensor(ranks, dtype=torch.int64)
    both = torch.stack([torch.stack([r, r], 1), torch.stack([r, r], 1)], 1)  # [U, protocols, best/worst]
    save_ranks(run, 7, torch.arange(len(ranks)), both, exclude_history=True)
    return run, 7


def test_warm_difference_is_over_the_warm_users_only(tmp_path, script):
    # users 0-3 warm, 4-5 cold: content ranks the cold targets first, the ID model far down;
    # on the warm users the ID model is ahead by a constant
    runs = {"id-sasrec": _run(tmp_path, "id", [1, 1, 1, 1, 500, 500]),
            "transrec-minilm": _run(tmp_path, "content", [2, 2, 2, 2, 1, 1])}
    warm = np.array([True, True, True, True, False, False])
    rows = [{"model": m, "protocol": p} for m in runs for p in ("masked", "unmasked")]
    script.intervals(rows, runs, warm)
    ndcg2 = 1 / np.log2(3)
    for r in rows[2:]:
        # a constant difference over the warm users: its interval is that point
        assert r["vs_id_warm_ndcg@10"] == r["vs_id_warm_ndcg@10_lo"] == r["vs_id_warm_ndcg@10_hi"] \
            == round(ndcg2 - 1, 4)
        assert r["vs_id_ndcg@10"] == round((4 * (ndcg2 - 1) + 2 * 1.0) / 6, 4)
        assert r["vs_id_ndcg@10_lo"] < r["vs_id_ndcg@10"] < r["vs_id_ndcg@10_hi"]
    assert "vs_id_ndcg@10" not in rows[0] and "vs_id_warm_ndcg@10" not in rows[0]  # the reference itself
    assert rows[0]["all_ndcg@10_lo"] < 4 / 6 < rows[0]["all_ndcg@10_hi"]
