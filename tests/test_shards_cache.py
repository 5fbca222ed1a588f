"""Item cache: content equals a direct decode, reuse, rebuild on change, concurrent builders."""

import io
import multiprocessing as mp
import os
import shutil
import time

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from transrec.shards import cache as cache_mod
from transrec.shards.batch import IMAGE, TEXT
from transrec.shards.cache import build_or_load_item_cache, default_tokenizer_path
from transrec.shards.dataset import Dataset
from transrec.shards.synth import synthesize


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("c") / "t", domain="target", n_users=30, n_items=40, seed=4)


def test_cache_content_matches_shards(data, tmp_path):
    ds = Dataset.open(data)
    c = build_or_load_item_cache(ds, max_text_len=12, image_size=40, cache_dir=tmp_path, progress=False)
    assert c.n_items == ds.n_items and np.array_equal(c.modality, ds.modality) and c.valid.all()
    assert isinstance(c.images, np.memmap) and c.images.shape[1:] == (3, 40, 40)
    tok = AutoTokenizer.from_pretrained(default_tokenizer_path())
    assert c.vocab_size == len(tok)
    for s in wds.WebDataset([str(p.path) for p in ds.item_shards], shardshuffle=False, empty_check=False):
        i = ds.item_index[s["__key__"]]
        r = c.row[i]
        if c.modality[i] == TEXT:
            ids = tok(s["txt"].decode(), max_length=12, truncation=True)["input_ids"]
            assert c.tokens[r, :c.lengths[r]].tolist() == ids
            assert (c.tokens[r, c.lengths[r]:] == tok.pad_token_id).all()
        else:
            assert c.modality[i] == IMAGE
            im = Image.open(io.BytesIO(s["png"])).convert("RGB").resize((40, 40), Image.BILINEAR)
            assert np.array_equal(c.images[r], np.asarray(im).transpose(2, 0, 1))
    text, image = c.gather(np.arange(ds.n_items))
    assert text.input_ids.shape[0] + image.pixels.shape[0] == ds.n_items


def test_reuse_and_rebuild_on_change(data, tmp_path, monkeypatch):
    ds = Dataset.open(data)
    a = build_or_load_item_cache(ds, cache_dir=tmp_path, progress=False)

    def no_build(*args, **kw):
        raise AssertionError("rebuilt although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(cache_mod, "_build", no_build)
        b = build_or_load_item_cache(Dataset.open(data), cache_dir=tmp_path, progress=False)
    assert b.path == a.path and b.key == a.key
    # image size, text length, tokenizer and shards all enter the key
    keys = {a.key,
            build_or_load_item_cache(ds, cache_dir=tmp_path, image_size=48, progress=False).key,
            build_or_load_item_cache(ds, cache_dir=tmp_path, max_text_len=16, progress=False).key}
    tok = tmp_path / "tok"
    shutil.copytree(default_tokenizer_path(), tok, ignore=shutil.ignore_patterns("*.safetensors"))
    with open(tok / "vocab.txt", "a") as f:
        f.write("newtoken\n")
    keys.add(cache_mod.cache_key(ds, cache_mod.tokenizer_identity(tok), 32, 32))
    other = synthesize(tmp_path / "other", domain="target", n_users=30, n_items=40, seed=5)
    keys.add(build_or_load_item_cache(other, cache_dir=tmp_path, progress=False).key)
    assert len(keys) == 5


def _slow_build(*args, **kw):
    marker = args[1].parent / f"built-by-{os.getpid()}"
    marker.write_text("x")
    time.sleep(0.5)
    return _ORIG_BUILD(*args, **kw)


_ORIG_BUILD = cache_mod._build


def _worker(data, cache_dir, q):
    cache_mod._build = _slow_build
    c = build_or_load_item_cache(data, cache_dir=cache_dir, progress=False)
    q.put(str(c.path))


def test_two_processes_build_once(data, tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(data, tmp_path, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    paths = {q.get(timeout=5) for _ in procs}
    assert len(paths) == 1
    assert len(list(tmp_path.glob("built-by-*"))) == 1
    assert not list(tmp_path.glob("*.tmp*"))  # temporary folder renamed into place
    c = build_or_load_item_cache(data, cache_dir=tmp_path, progress=False)
    assert str(c.path) in paths and c.valid.all()
