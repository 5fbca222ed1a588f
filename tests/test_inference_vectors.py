"""Item vectors out of a Recommender and back in, and approximate top-k through a FAISS index.

- the vectors written are the Recommender's scoring vectors bit for bit (items from a dataset, items
  added from content afterwards, a hybrid model's trained items with their own vector), in the
  safetensors file and the Parquet file alike, and a Recommender loading them ranks as the original;
- a folder is refused when made with another export, when a file is damaged, and never replaces a
  folder that is not a vectors folder;
- HNSW and IVF reach recall@10 of at least 0.95 against exact scoring at 20,000 items, for a cosine
  and a dot-product model; the history stays masked and ``candidates=`` holds; items added after
  the index was built are found; a saved index loads back and answers as before.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import load_file

from transrec.cli import main
from transrec.config import build_config
from transrec.errors import UserError
from transrec.inference.ann import ItemIndex
from transrec.inference.recommender import Recommender
from transrec.models import build_model
from transrec.shards.dataset import Dataset
from transrec.shards.format import unsanitize_key
from transrec.shards.synth import synthesize

FAST_HNSW = {"m": 16, "ef_construction": 80, "ef_search": 256}  # a quicker build at test sizes


def _export(root, data, name, *extra, n_items=None, seen=None):
    cfg = build_config("tiny", None, [f"data.path={data}", "eval.batch_size=32", *extra])
    torch.manual_seed(0)
    model = build_model(cfg.model, n_items=n_items)
    meta = {"kind": "full", "step": 0}
    if seen is not None:  # a hybrid: per-item vectors for the items training "saw"
        with torch.no_grad():
            model.item_residual.weight.normal_(0, 0.5)
        model.set_seen_items(seen)
        meta["item_ids"] = [unsanitize_key(k) for k in Dataset.open(data).item_ids]
        meta["n_items"] = n_items
    return model.save_export(root / name, cfg, meta)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors")
    data = synthesize(root / "data", domain="target", n_users=40, n_items=60, seed=5, min_len=4, max_len=12)
    return root, data


def _histories(ids, n, seed=0, length=5):
    rng = np.random.default_rng(seed)
    return [[ids[j] for j in rng.choice(len(ids), length, replace=False)] for _ in range(n)]


def test_vectors_round_trip_bit_for_bit_with_new_and_hybrid_items(world, tmp_path):
    root, data = world
    n = Dataset.open(data).n_items
    seen = np.arange(n) % 3 != 0  # two thirds of the catalogue have a vector of their own
    exp = _export(root, data, "hybrid", "model.item.id_residual=true", n_items=n, seen=seen)
    rec = Recommender.from_export(exp, device="cpu")
    rec.add_items(data=data)
    rec.add_items(titles=["blue round soft", "green tall bright"], ids=["new-1", "new-2"])
    ids, vectors = rec.vectors()
    assert ids[-2:] == ["new-1", "new-2"] and len(ids) == n + 2
    meta = rec.save_vectors(tmp_path / "v", parquet=True)
    assert meta["count"] == n + 2 and meta["metric"] == "cosine"
    assert meta["items_with_own_vector"] == int(seen.sum())

    stored = load_file(str(tmp_path / "v" / "vectors.safetensors"))
    assert np.array_equal(stored["vectors"], vectors)  # bit for bit
    assert np.array_equal(stored["embeddings"], rec.embeddings()[1])
    assert json.loads((tmp_path / "v" / "ids.json").read_text()) == ids
    # the scoring vectors are what recommend ranks by: a user's scores are user · vector
    hist = _histories(ids, 1)[0]
    top = rec.recommend(hist, k=5, exclude_history=False)
    want = rec.score(hist, top.ids)
    np.testing.assert_allclose(top.scores, want, rtol=0, atol=1e-6)

    table = pq.read_table(str(tmp_path / "v" / "vectors.parquet"))
    assert table.column("id").to_pylist() == ids
    assert np.array_equal(np.asarray(table.column("vector").to_pylist(), dtype=np.float32), vectors)

    # a fresh Recommender of the same export loads them (no encoder run) and ranks as the original
    other = Recommender.from_export(exp, device="cpu")
    assert other.load_vectors(tmp_path / "v") == n + 2
    assert other.vectors()[0] == ids and np.array_equal(other.vectors()[1], vectors)
    for h in _histories(ids, 6, seed=1):
        a, b = rec.recommend(h, k=10), other.recommend(h, k=10)
        assert a.ids == b.ids and a.scores == b.scores


def test_vectors_refused_from_another_export_or_damaged(world, tmp_path):
    root, data = world
    exp = _export(root, data, "plain")
    rec = Recommender.from_export(exp, device="cpu")
    rec.add_items(data=data)
    rec.save_vectors(tmp_path / "v")
    other_exp = _export(root, data, "other", "model.user.layers=1")
    with pytest.raises(UserError, match="made with another export"):
        Recommender.from_export(other_exp, device="cpu").load_vectors(tmp_path / "v")
    raw = bytearray((tmp_path / "v" / "vectors.safetensors").read_bytes())
    raw[-3] ^= 0x55
    (tmp_path / "v" / "vectors.safetensors").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="damaged"):
        Recommender.from_export(exp, device="cpu").load_vectors(tmp_path / "v")
    with pytest.raises(UserError, match="not a vectors folder"):
        Recommender.from_export(exp, device="cpu").load_vectors(tmp_path)
    # a folder with other files is never replaced; an earlier vectors folder is
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a vectors folder"):
        rec.save_vectors(tmp_path / "keep")
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"
    rec.save_vectors(tmp_path / "v")
    assert Recommender.from_export(exp, device="cpu").load_vectors(tmp_path / "v") == len(rec)


def recall(exact, users, got, want) -> float:
    """Recall@k of ``got`` against exact top-k ``want``: a found item counts when its exact score
    reaches the exact k-th score (an item tied with the k-th belongs to a top k as much as it)."""
    hits = []
    for h, g, w in zip(users, got, want):
        scores = exact.score(h, g.ids)
        hits.append(float(np.sum(scores >= w.scores[-1] - 1e-6)) / len(w.ids))
    return float(np.mean(hits))


def _big_pool(rec, n, seed=0):
    """``n`` extra items whose embeddings follow the mean and covariance of the model's own item
    table (a trained table's shape, not isotropic noise), added by vector."""
    base = rec.embeddings()[1].astype(np.float64)
    rng = np.random.default_rng(seed)
    cov = np.cov(base.T) + 1e-3 * np.eye(base.shape[1])
    emb = rng.multivariate_normal(base.mean(0), cov, size=n).astype(np.float32)
    ids = [f"x{i:06d}" for i in range(n)]
    rec.add_vectors(ids, emb)
    return ids, emb


@pytest.mark.parametrize("cosine", [True, False], ids=["cosine", "dot"])
def test_ann_recall_masking_candidates_and_added_items(world, tmp_path, cosine):
    root, data = world
    extra = [] if cosine else ["model.loss.l2_normalize=false"]
    exp = _export(root, data, f"ann-{cosine}", *extra)
    exact = Recommender.from_export(exp, device="cpu")
    exact.add_items(data=data)
    assert exact.metric == ("cosine" if cosine else "dot")
    big_ids, emb = _big_pool(exact, 20000)
    users = _histories(exact.item_ids, 120, seed=2, length=6)
    want = exact.recommend_many(users, k=10)
    for kind, options in (("hnsw", FAST_HNSW), ("ivf", {"nprobe": 64})):
        ann = Recommender.from_export(exp, device="cpu", index=kind, index_options=options)
        ann.add_items(data=data)
        ann.add_vectors(big_ids, emb)
        got = ann.recommend_many(users, k=10)
        assert recall(exact, users, got, want) >= 0.95, kind
        for h, g in zip(users, got):
            assert len(g.ids) == 10 and not set(h) & set(g.ids)  # history masked
            assert g.scores == sorted(g.scores, reverse=True)
        # candidates: a large subset goes through the index (over-fetch, then filter)
        subset = big_ids[::2]
        ann.score_chunk = 1000  # so that the 10,000 candidates are searched, not scored exactly
        sub = ann.recommend_many(users[:30], k=10, candidates=subset)
        keep = set(subset)
        assert all(len(s.ids) == 10 and set(s.ids) <= keep for s in sub)
        exact_sub = exact.recommend_many(users[:30], k=10, candidates=subset)
        assert recall(exact, users[:30], sub, exact_sub) >= 0.95, kind
        # an item added after the index was built is found: the exact copy of a user's query
        ids, vectors = ann.vectors()
        query = exact.score(users[0], ids)  # scores of every pool item for user 0
        best = ids[int(np.argmax(query))]
        planted = ann.embeddings([best])[1] * (1.0 if cosine else 1.5)
        ann.add_vectors(["planted"], planted)
        assert ann.recommend(users[0], k=3).ids[0] in {"planted", best}
        assert "planted" in ann.recommend(users[0], k=3).ids


def test_saved_index_loads_and_answers_the_same(world, tmp_path):
    root, data = world
    exp = _export(root, data, "saved")
    rec = Recommender.from_export(exp, device="cpu", index="hnsw", index_options=FAST_HNSW)
    rec.add_items(data=data)
    _big_pool(rec, 3000, seed=4)
    meta = rec.save_vectors(tmp_path / "v")
    assert meta["index"]["kind"] == "hnsw" and meta["index"]["count"] == len(rec)
    users = _histories(rec.item_ids, 20, seed=5)
    again = Recommender.from_export(exp, device="cpu", index="hnsw")
    again.load_vectors(tmp_path / "v")
    assert len(again._ann) == len(rec)  # loaded, not rebuilt
    for a, b in zip(rec.recommend_many(users, k=10), again.recommend_many(users, k=10)):
        assert a.ids == b.ids
    # a damaged index file is named in one line
    p = tmp_path / "v" / "index-hnsw.faiss"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(UserError, match="index-hnsw.faiss: damaged"):
        Recommender.from_export(exp, device="cpu", index="hnsw").load_vectors(tmp_path / "v")
    with pytest.raises(UserError, match="no saved ivf index"):
        ItemIndex.load(tmp_path / "v", "ivf")
    with pytest.raises(UserError, match="choose one of exact, hnsw, ivf"):
        Recommender.from_export(exp, device="cpu", index="annoy")


def test_vectors_command_writes_what_serve_and_recommend_load(world, tmp_path, capsys):
    root, data = world
    exp = _export(root, data, "cli")
    out = tmp_path / "vec"
    assert main(["vectors", "--export", str(exp), "--data", str(data), "--out", str(out), "--parquet",
                 "--index", "ivf"]) == 0
    assert "item vectors (64 dimensions, cosine scoring, an ivf index)" in capsys.readouterr().err
    meta = json.loads((out / "vectors.json").read_text())
    assert meta["index"]["kind"] == "ivf" and set(meta["sha256"]) >= {"vectors.safetensors", "ids.json",
                                                                      "vectors.parquet", "index-ivf.faiss"}
    rec = Recommender.from_export(exp, device="cpu")
    rec.add_items(data=data)
    loaded = Recommender.from_export(exp, device="cpu", index="ivf")
    loaded.load_vectors(out)
    assert len(loaded._ann) == len(rec)  # the saved index, not a new one
    assert np.array_equal(loaded.vectors()[1], rec.vectors()[1])
    assert main(["vectors", "--export", str(exp), "--out", str(out)]) == 2
    assert "give the items with --data" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_on_a_small_pool_answers_as_exact_ids_sharing_content_included(world, kind):
    """On a pool the search covers whole, the index gives the exact top k, order and all; two ids of
    one title (one row of the table) both come back, in pool order, as the exact pass gives them."""
    root, data = world
    exp = _export(root, data, "small")
    recs = [Recommender.from_export(exp, device="cpu", index=k, index_options={"nprobe": 1000})
            for k in ("exact", kind)]
    for rec in recs:
        rec.add_items(data=data)
        rec.add_items(titles=["quantum harbour lantern"] * 2, ids=["twin-a", "twin-b"])
    exact, ann = recs
    assert ann.vectors(["twin-a"])[1].tobytes() == ann.vectors(["twin-b"])[1].tobytes()
    users = _histories(exact.item_ids, 12, seed=7, length=4) + [["twin-a"]]
    k = len(exact) - 6
    for h in users:
        for excl in (True, False):
            a = exact.recommend(h, k=k, exclude_history=excl)
            b = ann.recommend(h, k=k, exclude_history=excl)
            # the same scores rank by rank; the same items, but for those tied (to rounding: FAISS
            # and torch sum in another order) with the k-th, which either may cut
            np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)
            cut = a.scores[-1] + 1e-5
            assert {i for i, x in zip(a.ids, a.scores) if x > cut} == {i for i, x in zip(b.ids, b.scores)
                                                                      if x > cut}
            if "twin-a" in b.ids and "twin-b" in b.ids:  # one row: side by side, in pool order
                assert b.ids.index("twin-b") == b.ids.index("twin-a") + 1
            assert not excl or not set(h) & set(b.ids)
