"""Ties in a real evaluation: a catalogue where every title is sold twice, and a model whose item tower
has collapsed. Tied items share the target's rank instead of losing to it, a collapsed model
scores like chance, and evaluation says so in one line."""

from __future__ import annotations

import math

import pytest
import torch
import webdataset as wds

from transrec.config import build_config
from transrec.engine.data import make_loader, open_data
from transrec.engine.ranking import COLLAPSE_BELOW, encode_catalogue, score_users, split_metrics
from transrec.engine.trainer import Trainer
from transrec.inference.histories import dataset_sequences
from transrec.inference.metrics import ranking_metrics, target_ranks
from transrec.models import build_model
from transrec.shards.dataset import Dataset
from transrec.shards.format import DatasetWriter, unsanitize_key
from transrec.shards.synth import synthesize

pytestmark = pytest.mark.usefixtures("inprocess_group")  # see conftest

SMALL = ["model.user.layers=1", "model.user.max_len=8", "data.max_len=8", "model.text.max_len=12",
         "run.progress=false", "run.tensorboard=false"]


def titles_of(data):
    ds = Dataset.open(data)
    titles = {}
    for s in wds.WebDataset([str(x.path) for x in ds.item_shards], shardshuffle=False, empty_check=False):
        titles[s["__key__"]] = s["txt"].decode()
    return [(unsanitize_key(k), titles[k]) for k in ds.item_ids]


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A text-only world whose catalogue holds every item twice: the originals, then a copy of each
    with the same title in the same order (``twin-<id>``), which no user ever interacted with."""
    root = tmp_path_factory.mktemp("ties")
    base = synthesize(root / "base", domain="target", n_users=60, n_items=60, image_frac=0.0, seed=5,
                      min_len=4, max_len=10)
    items = titles_of(base)
    w = DatasetWriter(root / "twins")
    for item_id, title in items:
        w.add_item(item_id, title=title)
    for item_id, title in items:
        w.add_item(f"twin-{item_id}", title=title)
    for user, seq in dataset_sequences(base):
        w.add_sequence(user, seq)
    return w.close(), len(items)


def test_a_duplicated_title_shares_the_targets_rank(twins, capsys):
    data, n = twins
    # one chunk of originals and one of twins: the same inputs in the same shapes, so a twin's
    # embedding is bit-equal to its original's, as identical content gives
    cfg = build_config("tiny", None, [f"data.path={data}", f"eval.item_chunk={n}", *SMALL])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    ds, content = open_data(cfg, str(data))
    emb = encode_catalogue(model, content, chunk=n, device="cpu", show=False)
    assert torch.equal(emb[:n], emb[n:])
    assert emb[:n].unique(dim=0).shape[0] == n  # no other ties

    loader = make_loader(cfg, ds, content, "test", batch_size=16, rank=0, world=1, seed=0)
    got = split_metrics(model, loader, content, ks=(1, 10), show=False, item_emb=emb)
    intervals = []
    for batch in loader:
        scores = score_users(model, batch, emb)
        r = target_ranks(scores, batch.seq[:, -1], batch.hist_rows, batch.hist_items)
        intervals.append(r[batch.row_valid])
    intervals = torch.cat(intervals)
    # every target has exactly one tied item, its twin, so two ranks with even odds
    assert (intervals[:, 1] - intervals[:, 0] == 1).all()
    want = ranking_metrics(intervals, ks=(1, 10))
    old_rule = ranking_metrics(intervals[:, 0], ks=(1, 10))  # the tie given to the target
    for key in ("hr@1", "hr@10", "ndcg@10", "mrr"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["mrr"] < old_rule["mrr"]
    # at the top, the twin takes exactly half of what giving the tie to the target would credit
    first = intervals[:, 0] == 1
    assert got["hr@1"] == pytest.approx(0.5 * float(first.double().mean()), abs=1e-12)
    assert got["distinct_scores"] == pytest.approx(0.5, abs=1e-12)  # n distinct values over 2n items
    assert "collapsed" not in capsys.readouterr().err


def collapse_item_tower(model):
    """Zero the text projection and freeze it: every item embeds to the same vector for good."""
    proj = model.text_encoder.proj
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.zero_()
    proj.requires_grad_(False)
    return model


def test_a_collapsed_item_tower_trains_scores_like_chance_and_is_reported(twins, tmp_path, monkeypatch,
                                                                          capsys):
    data, n = twins
    built = Trainer._build_model
    monkeypatch.setattr(Trainer, "_build_model", lambda self: collapse_item_tower(built(self)))
    cfg = build_config("tiny", overrides=[f"data.path={data}", f"run.out={tmp_path / 'run'}", *SMALL,
                                          "data.batch_size=8", "optim.steps=6", "eval.every=3",
                                          "optim.warmup_steps=0"])
    trainer = Trainer(cfg, show=False)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    assert result.step == 6 and len(result.losses) == 6 and all(math.isfinite(x) for x in result.losses)
    test = result.metrics["test"]
    items = 2 * n
    # history ranked like any item: every item ties with the target, so exactly chance
    assert test["unmasked_hr@10"] == pytest.approx(10 / items, abs=1e-12)
    assert test["unmasked_ndcg@10"] == pytest.approx(
        math.fsum(1 / math.log2(r + 1) for r in range(1, 11)) / items, abs=1e-12)
    # history masked: chance over what is left, between 10/items and 10/(items - data.max_len)
    assert 10 / items <= test["hr@10"] <= 10 / (items - 8) + 1e-12
    assert test["distinct_scores"] == pytest.approx(1 / items, abs=1e-12) and 1 / items < COLLAPSE_BELOW
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "item tower has collapsed" in ln]
    assert lines and all(ln.startswith("warning: ") for ln in lines)
    # one line per evaluation that found it: two validations, then the final valid and test
    evaluations = [ln for ln in err.splitlines() if ln.startswith("eval ")]
    assert len(lines) == len(evaluations)
