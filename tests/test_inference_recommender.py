"""The Recommender and ``transrec recommend``: the same scores as full-ranking evaluation, raw content
through the item cache's preprocessing, catalogue folders, adapter exports, and one-line errors."""

import copy
import csv
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from transrec.cli import main
from transrec.config import build_config
from transrec.config.model import LoRAConfig
from transrec.engine.data import make_loader, open_data
from transrec.engine.ranking import encode_catalogue, score_users, split_metrics
from transrec.errors import UserError
from transrec.inference.histories import dataset_sequences, read_histories
from transrec.inference.metrics import ranking_metrics
from transrec.inference.recommender import Recommender
from transrec.models import SequentialRecommender, build_model
from transrec.models.export import load_export_into
from transrec.models.lora import is_lora_param
from transrec.shards.dataset import Dataset
from transrec.shards.format import eval_target, unsanitize_key
from transrec.shards.synth import synthesize


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic dataset and a random-init tiny export of it (item chunk 16, so a catalogue
    is encoded in several chunks; eval batch 16, so users come in several batches)."""
    root = tmp_path_factory.mktemp("rec")
    data = synthesize(root / "data", domain="target", n_users=50, n_items=40, seed=3, min_len=4, max_len=14)
    cfg = build_config("tiny", None, [f"data.path={data}", "eval.item_chunk=16", "eval.batch_size=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    exp = model.save_export(root / "export", cfg, {"kind": "full", "step": 0})
    return root, data, cfg, exp


def _raw_items(data):
    """(id, title or None, image bytes or None, ext) of every item, read from the item shards."""
    ds = Dataset.open(data)
    out = {}
    for s in wds.WebDataset([str(x.path) for x in ds.item_shards], shardshuffle=False, empty_check=False):
        ext = next((e for e in ("jpg", "png") if e in s), None)
        out[s["__key__"]] = (unsanitize_key(s["__key__"]), s["txt"].decode() if "txt" in s else None,
                             s[ext] if ext else None, ext)
    return [out[k] for k in ds.item_ids]


def test_scores_and_ranks_equal_full_ranking_evaluation(world):
    _, data, cfg, exp = world
    rec = Recommender.from_export(exp, device="cpu")
    rec.add_items(data=data)
    model = SequentialRecommender.from_export(exp)
    ds, content = open_data(cfg, str(data))
    emb = encode_catalogue(model, content, chunk=cfg.eval.item_chunk, device="cpu", show=False)
    torch.testing.assert_close(rec.add_items(data=data), emb, rtol=0, atol=0)  # the same code path

    # engine side: metrics from split_metrics(), and each user's top 10 with the whole history masked
    loader = make_loader(cfg, ds, content, "test", batch_size=cfg.eval.batch_size, rank=0, world=1, seed=0)
    want = split_metrics(model, loader, content, item_chunk=cfg.eval.item_chunk, show=False)
    top_engine = {}
    for batch in loader:
        scores = score_users(model, batch, emb)
        scores[batch.hist_rows, batch.hist_items] = float("-inf")
        for i in range(batch.batch_size):
            if batch.row_valid[i]:
                top_engine[int(batch.users[i])] = torch.topk(scores[i], 10).indices.tolist()

    # recommender side: the same users' histories as item ids
    users, hists, targets = [], [], []
    for n, (_, items) in enumerate(dataset_sequences(data)):
        held = eval_target(np.asarray(items), "test")
        if held is not None:
            users.append(n)
            hists.append(list(held[0]))
            targets.append(held[1])
    assert len(users) == want["users"] == len(top_engine)
    recs = rec.recommend_many(hists, 10)
    index = {unsanitize_key(k): i for i, k in enumerate(ds.item_ids)}
    for u, r in zip(users, recs):
        assert [index[i] for i in r.ids] == top_engine[u]
    # target ranks over the whole pool, history masked except the target: split_metrics()'s metrics
    ranks = []
    for h, t in zip(hists, targets):
        s = torch.from_numpy(rec.score(h, rec.item_ids))
        ts = s[index[t]].clone()
        s[[index[i] for i in h]] = float("-inf")
        s[index[t]] = ts
        ranks.append([int((s > ts).sum()) + 1, int((s >= ts).sum())])
    got = ranking_metrics(torch.tensor(ranks))
    direct = rec.evaluate(hists, targets)  # the same rule, through the public method
    for key in ("hr@10", "ndcg@10", "mrr"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
        assert direct[key] == pytest.approx(want[key], rel=1e-6), key
    assert direct["users"] == len(targets)
    with pytest.raises(UserError, match="is not among the 3 candidates"):
        rec.evaluate(hists[:1], [targets[0]], candidates=[i for i in rec.item_ids if i != targets[0]][:3])
    # a user who is a mix of ids and raw content scores exactly as the same items by id
    raw = _raw_items(data)
    by_id = {r[0]: r for r in raw}
    text_id = next(i for i in hists[0] if by_id[i][1] is not None)
    mixed = [{"title": by_id[text_id][1]} if i == text_id else i for i in hists[0]]
    np.testing.assert_allclose(rec.score(mixed, rec.item_ids), rec.score(hists[0], rec.item_ids),
                               rtol=1e-5, atol=1e-6)


def test_raw_content_and_catalogue_match_the_dataset(world, tmp_path):
    _, data, _, exp = world
    rec = Recommender.from_export(exp, device="cpu")
    want = rec.add_items(data=data)
    raw = _raw_items(data)
    cat = tmp_path / "cat"
    (cat / "images").mkdir(parents=True)
    with open(cat / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "image"])
        for iid, title, img, ext in raw:
            if img is not None:
                (cat / "images" / f"{iid}.{ext}").write_bytes(img)
            w.writerow([iid, title or "", f"{iid}.{ext}" if img is not None else ""])
    fresh = Recommender.from_export(exp, device="cpu")
    got = fresh.add_items(catalogue=cat)
    assert fresh.item_ids == [r[0] for r in raw]
    torch.testing.assert_close(got, want)  # same items, same chunks: the dataset's embeddings
    # titles, image paths, PIL images and uint8 arrays one by one (other chunking: fp32 tolerance)
    titles = [(i, t) for i, t, _, _ in raw if t is not None][:3]
    images = [(i, cat / "images" / f"{i}.{e}") for i, _, b, e in raw if b is not None][:3]
    pil = Image.open(images[1][1])
    arr = np.asarray(Image.open(images[2][1]).convert("RGB"))
    one = Recommender.from_export(exp, device="cpu")
    e = one.add_items(titles=[t for _, t in titles], images=[images[0][1], pil, arr.transpose(2, 0, 1)])
    pos = {r[0]: n for n, r in enumerate(raw)}
    rows = [pos[i] for i, _ in titles] + [pos[i] for i, _ in images]
    torch.testing.assert_close(e, want[rows])
    assert len(one) == 0  # raw content without ids is cached, not a candidate
    one.add_items(titles=["a brand new striped title"], ids=["new-1"])
    assert one.item_ids == ["new-1"]


def test_new_catalogue_items_join_the_pool_without_retraining(world, tmp_path, capsys):
    root, data, _, exp = world
    cat = tmp_path / "new"
    (cat / "images").mkdir(parents=True)
    raw = _raw_items(data)
    img = next(r for r in raw if r[2] is not None)
    (cat / "images" / f"cover.{img[3]}").write_bytes(img[2])
    (cat / "items.csv").write_text("item,title,image\nnew-a,blue dotted classic,\nnew-b,,"
                                   f"cover.{img[3]}\nnew-c,red striped bold,\n")
    seqs = list(dataset_sequences(data))
    users = tmp_path / "users.jsonl"
    users.write_text("".join(json.dumps({"user": u, "history": h[:5]}) + "\n" for u, h in seqs[:4]))
    out = tmp_path / "top.jsonl"
    rc = main(["recommend", "--export", str(exp), "--data", str(data), "--catalogue", str(cat),
               "--users", str(users), "--k", "43", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["user"] for r in rows] == [u for u, _ in seqs[:4]]
    for r, (_, h) in zip(rows, seqs[:4]):
        assert len(r["items"]) == 43 - len(set(h[:5]))  # every candidate but the history
        assert {"new-a", "new-b", "new-c"} <= set(r["items"]) and not set(h[:5]) & set(r["items"])
        assert r["scores"] == sorted(r["scores"], reverse=True)
    # one history to standard output as CSV; the interactions-table form of --users
    rc = main(["recommend", "--export", str(exp), "--data", str(data), "--history", ",".join(seqs[0][1][:3]),
               "--k", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and lines[0] == "user,rank,item,score" and len(lines) == 4
    inter = tmp_path / "inter.csv"
    inter.write_text(f"user,item,timestamp\nu1,{seqs[0][1][0]},2\nu1,{seqs[0][1][1]},1\n")
    assert read_histories(inter) == [("u1", [seqs[0][1][1], seqs[0][1][0]])]


@pytest.mark.parametrize("argv, message", [
    (["--history", "t-i000001,no-such-item"], "unknown item id 'no-such-item'"),
    (["--history", " , "], "--history: empty"),
    (["--history", "t-i000001", "--catalogue", "{root}/missing"], "catalogue folder not found"),
    (["--history", "t-i000001", "--data", "{root}/missing"], "not a dataset folder"),
])
def test_recommend_errors_are_one_line(world, capsys, argv, message):
    root, data, _, exp = world
    argv = [a.format(root=root) for a in argv]
    base = ["recommend", "--export", str(exp)] + ([] if "--data" in argv else ["--data", str(data)])
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_adapter_export_loads_base_and_adapters(world, tmp_path):
    _, data, cfg, exp = world
    lcfg = copy.deepcopy(cfg)
    lcfg.model.text.lora, lcfg.model.image.lora = LoRAConfig(r=4), LoRAConfig(r=4)
    lcfg.model.text.trainable = lcfg.model.image.trainable = "all"
    lcfg.run.init_from = str(exp)
    torch.manual_seed(1)
    model = build_model(lcfg.model)
    load_export_into(model, exp, strict=False)
    with torch.no_grad():  # adapters away from their zero start, so they change the scores
        for n, p in model.named_parameters():
            if is_lora_param(n):
                p.normal_(0, 0.2)
    tensors = {n: p.detach().float().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    adapter = model.save_export(tmp_path / "adapter", lcfg, {"kind": "adapter", "step": 1,
                                                             "base": str(exp.resolve())},
                               tensors=tensors)
    rec = Recommender.from_export(adapter, device="cpu")
    base = Recommender.from_export(exp, device="cpu")
    hist = next(dataset_sequences(data))[1][:4]
    for r in (rec, base):
        r.add_items(data=data)
    _, content = open_data(cfg, str(data))
    want = encode_catalogue(model.eval(), content, chunk=cfg.eval.item_chunk, device="cpu", show=False)
    torch.testing.assert_close(rec.add_items(data=data), want)
    assert not torch.allclose(base.add_items(data=data), want)
    assert len(rec.recommend(hist, 5)) == 5 and len(tensors) < len(model.state_dict())
