"""The synthetic world: determinism, disjoint domains, and content that predicts the next item."""

import io
import json
import re

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from transrec.shards.dataset import Dataset
from transrec.shards.synth import COLOURS, synthesize


def shard_hashes(path):
    ds = Dataset.open(path)
    return [s.sha256 for s in ds.item_shards + ds.seq_shards], ds.manifest["item_index"]["sha256"]


def read_items(ds):
    out = {}
    for s in wds.WebDataset([str(p.path) for p in ds.item_shards], shardshuffle=False, empty_check=False):
        out[s["__key__"]] = s
    return out


def read_seqs(ds):
    return {json.loads(s["json"])["user"]: json.loads(s["json"])["items"]
            for s in wds.WebDataset([str(p.path) for p in ds.seq_shards], shardshuffle=False,
                                    empty_check=False)}


def test_deterministic_per_seed(tmp_path):
    kw = dict(domain="target", n_users=40, n_items=30, seed=11)
    a = synthesize(tmp_path / "a", **kw)
    b = synthesize(tmp_path / "b", **kw)
    c = synthesize(tmp_path / "c", **{**kw, "seed": 12})
    assert shard_hashes(a) == shard_hashes(b)
    assert shard_hashes(a) != shard_hashes(c)


def test_domains_disjoint_ids_shared_vocabulary(tmp_path):
    s = Dataset.open(synthesize(tmp_path / "s", domain="source", n_users=50, n_items=40, seed=0))
    t = Dataset.open(synthesize(tmp_path / "t", domain="target", n_users=50, n_items=40, seed=0))
    assert not set(s.item_ids) & set(t.item_ids)
    assert not set(read_seqs(s)) & set(read_seqs(t))
    words = [set(re.findall(r"[a-z]+", b"".join(x["txt"] for x in read_items(d).values() if "txt" in x)
                            .decode())) for d in (s, t)]
    colours = set(COLOURS)
    assert colours & words[0] and colours & words[1]
    # images really are images of the configured size
    img = next(x for x in read_items(t).values() if "png" in x)
    assert Image.open(io.BytesIO(img["png"])).size == (32, 32)
    m = s.manifest
    assert m["modality"]["text"] + m["modality"]["image"] == 40 and m["modality"]["image"] > 0


def _features(ds):
    """Raw-content features: a bag of title words for text items, pixels for image items."""
    items = read_items(ds)
    vocab, rows = {}, []
    for key in ds.item_ids:
        x = items[key]
        if "txt" in x:
            f = {}
            for w in re.findall(r"[a-z]+", x["txt"].decode().lower()):
                f[vocab.setdefault(w, len(vocab))] = 1.0
            rows.append(("t", f))
        else:
            px = np.asarray(Image.open(io.BytesIO(x["png"])).convert("RGB").resize((8, 8)), np.float32)
            rows.append(("i", px.reshape(-1) / 255.0))
    text = np.zeros((ds.n_items, len(vocab)), np.float32)
    image = np.zeros((ds.n_items, 192), np.float32)
    is_text = np.array([k == "t" for k, _ in rows])
    for i, (k, f) in enumerate(rows):
        if k == "t":
            text[i, list(f)] = 1.0
        else:
            image[i] = f
    image[~is_text] -= image[~is_text].mean(0)

    def unit(m):
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-6)

    return unit(text), unit(image)


@pytest.mark.parametrize("domain", ["source", "target"])
def test_content_similarity_beats_popularity(tmp_path, domain):
    ds = Dataset.open(synthesize(tmp_path / domain, domain=domain, n_users=300, n_items=150, seed=2))
    text, image = _features(ds)
    sim = text @ text.T + image @ image.T  # within-modality cosine similarity
    pop = np.log1p(ds.train_count)
    hits = {"content": 0, "popularity": 0}
    n = 0
    for items in read_seqs(ds).values():
        if len(items) < 3:
            continue
        idx = np.array([ds.item_index[k] for k in items])
        hist, target = idx[:-1], idx[-1]
        n += 1
        recent = hist[-3:][::-1]
        score_c = (np.array([1.0, 0.6, 0.36])[:len(recent), None] * sim[recent]).sum(0) + 0.05 * pop
        for name, score in (("content", score_c), ("popularity", pop.astype(np.float64))):
            score = score.copy()
            score[hist] = -np.inf
            hits[name] += int(target in np.argsort(-score, kind="stable")[:10])
    hr = {k: v / n for k, v in hits.items()}
    assert hr["content"] > 1.3 * hr["popularity"], hr


def _content_hit_rate(ds) -> tuple[float, float]:
    """(HR@10 of ranking by content similarity to the last three items, the same for a random order
    in expectation), over users with at least 3 items; history items are never ranked."""
    text, image = _features(ds)
    sim = text @ text.T + image @ image.T
    hits = chance = n = 0.0
    for items in read_seqs(ds).values():
        if len(items) < 3:
            continue
        idx = np.array([ds.item_index[k] for k in items])
        hist, target = idx[:-1], idx[-1]
        recent = hist[-3:][::-1]
        score = (np.array([1.0, 0.6, 0.36])[:len(recent), None] * sim[recent]).sum(0)
        score[hist] = -np.inf
        hits += int(target in np.argsort(-score, kind="stable")[:10])
        chance += 10 / (ds.n_items - len(set(hist.tolist())))
        n += 1
    return hits / n, chance / n


def test_content_signal_one_is_the_world_without_the_knob(tmp_path):
    a = synthesize(tmp_path / "a", n_users=40, n_items=30, seed=3)
    b = synthesize(tmp_path / "b", n_users=40, n_items=30, seed=3, content_signal=1.0)
    assert shard_hashes(a) == shard_hashes(b)
    c = synthesize(tmp_path / "c", n_users=40, n_items=30, seed=3, content_signal=0.5)
    d = synthesize(tmp_path / "d", n_users=40, n_items=30, seed=3, content_signal=0.5)
    assert shard_hashes(c) == shard_hashes(d) != shard_hashes(a)  # deterministic, and a different world
    assert Dataset.open(c).manifest["synthetic"]["content_signal"] == 0.5


def test_content_predicts_at_chance_level_when_it_shows_nothing(tmp_path):
    """At content signal 0 the next item is as likely anywhere in a ranking by content as in a
    random order (within 3 standard errors over 400 users); at 1 content finds it several times as
    often. The same world generator, the same users: only what the content shows differs."""
    rates = {}
    for f in (0.0, 1.0):
        ds = Dataset.open(synthesize(tmp_path / f"f{f}", n_users=400, n_items=200, seed=5,
                                     content_signal=f))
        rates[f] = _content_hit_rate(ds)
    hr0, chance0 = rates[0.0]
    se = (chance0 * (1 - chance0) / 400) ** 0.5
    assert abs(hr0 - chance0) < 3 * se, (hr0, chance0, se)
    hr1, chance1 = rates[1.0]
    assert hr1 > 3 * chance1, (hr1, chance1)


def test_content_signal_outside_zero_one_is_refused(tmp_path, capsys):
    from transrec.cli import main  # lazy: the command line, for its one-line error

    assert main(["shards", "synth", "--out", str(tmp_path / "x"), "--content-signal", "1.5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "content_signal must be in [0, 1], got 1.5" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
