"""The hybrid item representation (``model.item.id_residual``): content plus a learned vector for
each item training saw, content alone for any other item.

- with every vector at zero (as built) the model is the content model, bit for bit;
- training moves the vectors of the items it reads and no other;
- an export carries the vectors and the ids of their items: the Recommender scores a training item
  as content + vector, and a new item (raw content, another id) by its content alone;
- a transfer starts the target's vectors at zero; a resumed run continues exactly;
- the export's evaluation and the Recommender's agree.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds
from train_parts import train_steps

from transrec.config import build_config, validate
from transrec.engine.consolidate import consolidated_state_dict, export_run
from transrec.engine.data import open_data
from transrec.engine.ranking import encode_catalogue
from transrec.engine.trainer import Trainer
from transrec.errors import ConfigError
from transrec.inference.histories import dataset_sequences
from transrec.inference.recommender import Recommender
from transrec.models import build_model
from transrec.shards.dataset import Dataset
from transrec.shards.format import unsanitize_key
from transrec.shards.synth import synthesize

pytestmark = pytest.mark.usefixtures("inprocess_group")  # see conftest

SMALL = ["model.user.layers=1", "model.user.max_len=8", "data.max_len=8", "model.text.max_len=12",
         "data.batch_size=16", "optim.warmup_steps=0", "run.progress=false", "run.tensorboard=false",
         "eval.every=0", "run.monitor="]
HYBRID = ["model.item.id_residual=true", "optim.id_lr=0.01"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    return synthesize(root / "d", domain="source", n_users=80, n_items=50, seed=11, min_len=3, max_len=10)


def cfg_for(data, *extra):
    return build_config("tiny", overrides=[f"data.path={data}", *SMALL, *extra])


def test_with_zero_vectors_the_hybrid_is_the_content_model(data):
    cfg_c, cfg_h = cfg_for(data), cfg_for(data, *HYBRID)
    ds, content = open_data(cfg_c, str(data))
    torch.manual_seed(0)
    plain = build_model(cfg_c.model, n_items=ds.n_items).eval()
    hybrid = build_model(cfg_h.model, n_items=ds.n_items).eval()
    missing, unexpected = hybrid.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["item_residual.weight", "item_seen"] and not unexpected
    assert torch.count_nonzero(hybrid.item_residual.weight) == 0
    hybrid.set_seen_items(np.ones(ds.n_items, dtype=bool))
    a = encode_catalogue(plain, content, chunk=16, device="cpu", show=False)
    b = encode_catalogue(hybrid, content, chunk=16, device="cpu", show=False)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    with torch.no_grad():
        hybrid.item_residual.weight[3] = 1.0
    c = encode_catalogue(hybrid, content, chunk=16, device="cpu", show=False)
    torch.testing.assert_close(c[3], a[3] + 1.0)
    torch.testing.assert_close(torch.cat([c[:3], c[4:]]), torch.cat([a[:3], a[4:]]), rtol=0, atol=0)
    only = encode_catalogue(hybrid, content, chunk=16, device="cpu", show=False, content_only=True)
    torch.testing.assert_close(only, a, rtol=0, atol=0)


def test_the_config_is_checked():
    with pytest.raises(ConfigError, match="model.item.id_residual is for content models"):
        validate(build_config("tiny", overrides=["model.kind=id", "model.item.id_residual=true"]))
    with pytest.raises(ConfigError, match=r"model.item.id_dropout must be in \[0, 1\)"):
        validate(build_config("tiny", overrides=["model.item.id_dropout=1.5"]))
    with pytest.raises(ConfigError, match="optim.id_lr"):
        validate(build_config("tiny", overrides=["optim.id_lr=-1"]))
    with pytest.raises(ConfigError, match="needs the number of items"):
        build_model(build_config("tiny", overrides=HYBRID).model)


def train(data, out, *extra, steps=8, until=None):
    trainer = Trainer(cfg_for(data, *HYBRID, f"run.out={out}", f"optim.steps={steps}", *extra), show=False)
    try:
        return trainer, trainer.fit() if until is None else train_steps(trainer, until=until)
    finally:
        trainer.close()


def test_training_moves_only_the_vectors_of_items_it_reads_and_the_export_serves_them(data, tmp_path):
    # hold one item out of every training sequence: it is in the catalogue, never read in training
    ds = Dataset.open(data)
    counts = np.asarray(ds.train_count)
    trainer, _ = train(data, tmp_path / "run", "model.item.id_dropout=0.2")
    net = trainer.engine.module
    seen = net.item_seen.cpu().numpy()
    assert np.array_equal(seen, counts > 0)
    moved = torch.linalg.vector_norm(net.item_residual.weight.detach(), dim=1).numpy() > 0
    assert moved.any() and not moved[~seen].any()  # an item training never read keeps a zero vector
    # each group has its own learning rate
    names = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert names["id_residual"]["lr"] > 0 and names["id_residual"]["weight_decay"] == 0.0

    exp = export_run(tmp_path / "run", tmp_path / "export")
    meta = json.loads((exp / "export.json").read_text())
    ids = [unsanitize_key(k) for k in ds.item_ids]
    assert meta["item_ids"] == ids
    rec = Recommender.from_export(exp, device="cpu")
    pool = rec.add_items(data=data)  # the training catalogue: content + vector
    cfg = cfg_for(data, *HYBRID)
    _, content = open_data(cfg, str(data))
    want = encode_catalogue(net, content, chunk=cfg.eval.item_chunk, device="cpu", show=False)
    torch.testing.assert_close(pool, want, rtol=1e-6, atol=1e-6)
    # a brand-new item with a trained item's title: its content alone, not the trained vector
    first = next(i for i in range(ds.n_items) if moved[i])
    title = _title_of(data, ds.item_ids[first])
    new = rec.add_items(titles=[title], ids=["brand-new"])[0]
    only = encode_catalogue(net, content, chunk=cfg.eval.item_chunk, device="cpu", show=False,
                            content_only=True)
    torch.testing.assert_close(new, only[first], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(new, pool[first])
    # Recommender.evaluate and the run's own test evaluation agree
    users = [(items[:-1], items[-1]) for _, items in dataset_sequences(data) if len(items) >= 3]
    got = rec.evaluate([h for h, _ in users], [t for _, t in users], ks=(10,))
    run_eval = json.loads((tmp_path / "run" / "eval.json").read_text())["test"]
    assert got["users"] == run_eval["users"]
    assert got["ndcg@10"] == pytest.approx(run_eval["ndcg@10"], abs=1e-5)


def _title_of(data, key):
    ds = Dataset.open(data)
    for s in wds.WebDataset([str(x.path) for x in ds.item_shards], shardshuffle=False, empty_check=False):
        if s["__key__"] == key:
            return s["txt"].decode()
    pytest.skip("the first trained item is an image item")  # pragma: no cover


def test_a_transfer_starts_the_targets_vectors_at_zero_and_resume_is_exact(data, tmp_path):
    train(data, tmp_path / "src")
    exp = export_run(tmp_path / "src", tmp_path / "src_export")
    target = synthesize(tmp_path / "target", domain="target", n_users=60, n_items=40, seed=2, min_len=3,
                        max_len=10)
    over = [f"run.init_from={exp}", "model.item.id_dropout=0.3", "model.user.dropout=0.2"]
    t = Trainer(build_config("tiny", overrides=[f"data.path={target}", *SMALL, *HYBRID, *over,
                                                f"run.out={tmp_path / 'x'}", "optim.steps=1"]), show=False)
    try:
        net = t.engine.module
        assert net.item_residual.weight.shape[0] == 40 and torch.count_nonzero(net.item_residual.weight) == 0
    finally:
        t.close()
    # the same catalogue: an export of it carries its vectors on
    t = Trainer(cfg_for(data, *HYBRID, f"run.init_from={exp}", f"run.out={tmp_path / 'y'}", "optim.steps=1"),
                show=False)
    try:
        src = Recommender.from_export(exp).model.item_residual.weight
        torch.testing.assert_close(t.engine.module.item_residual.weight, src, rtol=0, atol=0)
    finally:
        t.close()
    # resume: 4 steps, stop, 4 more = 8 uninterrupted (dropout on the vectors draws random numbers)
    tf = [f"data.path={target}", *over]
    _, full = train(data, tmp_path / "full", *tf)
    _, first = train(data, tmp_path / "part", *tf, "run.ckpt_every=4", until=4)
    _, second = train(data, tmp_path / "part", *tf)
    assert first.losses + second.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)

    a, _ = consolidated_state_dict(tmp_path / "full")
    b, _ = consolidated_state_dict(tmp_path / "part")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
