"""Datasets in object storage, against a real S3 server (SeaweedFS on loopback, see s3_server.py):
opening ``s3://`` and ``http://`` locations, streaming the same batches as the local folder, the
local caches of remote content, and the one-line errors of permanent failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from s3_server import BUCKET

from transrec.cli import main
from transrec.config import build_config, validate
from transrec.errors import ConfigError, DataError
from transrec.shards.batch import IMAGE, TEXT, ArrayContent
from transrec.shards.cache import build_or_load_item_cache
from transrec.shards.dataset import Dataset
from transrec.shards.loader import SequenceLoader
from transrec.shards.remote import RemotePath, StoreError, is_remote


def content_of(ds):
    """Random content for ``ds`` (the loader's batches do not depend on what it holds)."""
    rng = np.random.default_rng(0)
    mod = ds.modality
    n_t, n_i = int((mod == TEXT).sum()), int((mod == IMAGE).sum())
    row = np.zeros(ds.n_items, np.int64)
    row[mod == TEXT] = np.arange(n_t)
    row[mod == IMAGE] = np.arange(n_i)
    return ArrayContent(mod, row, rng.integers(1, 1000, (n_t, 9)).astype(np.int32),
                        rng.integers(1, 10, n_t).astype(np.int32),
                        rng.integers(0, 256, (n_i, 3, 4, 4)).astype(np.uint8))


def batches_key(batches):
    return [(b.seq.numpy().tobytes(), b.users.numpy().tobytes(), b.cursor,
             None if b.row_valid is None else b.row_valid.numpy().tobytes()) for b in batches]


def eval_users(batches) -> list[int]:
    """The evaluated users of an evaluation split's batches (filler rows left out)."""
    return [int(b.users[r]) for b in batches for r in range(b.batch_size) if b.row_valid[r]]


def test_is_remote_and_remote_paths():
    assert is_remote("s3://bucket/p") and is_remote("https://h/x") and is_remote("HTTP://h/x")
    assert not is_remote("data/source") and not is_remote("/abs/s3://x")
    p = RemotePath("s3://bucket/world/")
    assert str(p / "manifest.json") == "s3://bucket/world/manifest.json"
    assert (p / "a.tar").name == "a.tar" and p.name == "world"
    with pytest.raises(DataError, match="at least 3 characters"):
        RemotePath("s3://ab/x")


def test_open_from_s3_equals_the_local_folder(store_env):
    local = Dataset.open(store_env.local)
    remote = Dataset.open(store_env.url)
    assert remote.remote and not local.remote
    assert str(remote.path) == store_env.url
    assert remote.manifest == local.manifest
    assert remote.item_ids == local.item_ids
    assert np.array_equal(remote.modality, local.modality)
    assert np.array_equal(remote.log_q, local.log_q)
    assert [s.path.name for s in remote.seq_shards] == [s.path.name for s in local.seq_shards]
    assert remote.verify() == []


@pytest.mark.parametrize("split,workers,world", [("train", 0, 1), ("train", 2, 1), ("test", 0, 2),
                                                 ("valid", 2, 2)])
def test_the_loader_streams_the_same_batches_as_from_disk(store_env, split, workers, world):
    local, remote = Dataset.open(store_env.local), Dataset.open(store_env.url)
    content = content_of(local)
    for epoch in (0, 1) if split == "train" else (0,):
        got, want = [], []
        for rank in range(world):
            kw = dict(split=split, batch_size=8, max_len=6, seed=4, rank=rank, world_size=world,
                      num_workers=workers)
            a, b = SequenceLoader(local, content, **kw), SequenceLoader(remote, content, **kw)
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            want.append(list(a))
            got.append(list(b))
            assert batches_key(got[-1]) == batches_key(want[-1])
            assert b.stats.total == 0
        if split != "train":  # every evaluated user exactly once over the ranks
            users = [u for batches in got for u in eval_users(batches)]
            assert len(users) == len(set(users)) == sum(s.n_eval for s in remote.seq_shards)


def test_a_resumed_epoch_from_the_store_yields_the_remaining_batches(store_env):
    local, remote = Dataset.open(store_env.local), Dataset.open(store_env.url)
    content = content_of(local)
    kw = dict(batch_size=4, max_len=6, seed=1, num_workers=2)
    full = SequenceLoader(local, content, **kw)
    full.set_epoch(2)
    ref = list(full)
    for k in (1, len(ref) // 2):
        resumed = SequenceLoader(remote, content, start_cursor=ref[k - 1].cursor, **kw)
        resumed.set_epoch(2)
        assert batches_key(list(resumed)) == batches_key(ref[k:])


def test_sliding_windows_count_from_remote_shards_into_a_local_cache(store_env, tmp_path):
    local, remote = Dataset.open(store_env.local), Dataset.open(store_env.url)
    m = dict(local.manifest)
    content = content_of(local)
    kw = dict(batch_size=8, max_len=4, windows="sliding")
    a = SequenceLoader(local, content, cache_dir=str(tmp_path / "a"), **kw)
    b = SequenceLoader(remote, content, cache_dir=str(tmp_path / "b"), **kw)
    assert a.shard_samples == b.shard_samples and m == remote.manifest
    assert batches_key(list(a)) == batches_key(list(b))


def test_item_cache_of_remote_content_is_local_and_said(store_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRANSREC_CACHE", str(tmp_path / "cache"))
    remote = Dataset.open(store_env.url)
    cache = build_or_load_item_cache(remote, progress=False)
    err = capsys.readouterr().err
    assert str(cache.path).startswith(str(tmp_path / "cache" / "stores"))
    assert f"data: {store_env.url} streams from the store" in err and str(cache.path.parent) in err
    ref = build_or_load_item_cache(Dataset.open(store_env.local), cache_dir=tmp_path / "ref", progress=False)
    assert cache.key == ref.key
    for name in ("tokens", "lengths", "images", "valid", "row"):
        assert np.array_equal(getattr(cache, name), getattr(ref, name)), name


def test_shards_info_reads_a_store(store_env, capsys):
    assert main(["shards", "info", store_env.url, "--json", "--verify"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert main(["shards", "info", str(store_env.local), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert remote["path"] == store_env.url and remote["shards"]["verified"] is True
    for key in ("users", "items", "interactions", "sequence_length", "popularity", "modality", "splits"):
        assert remote[key] == local[key], key


def test_plain_http_reads_a_public_store(s3_store):
    url = f"{s3_store.server.endpoint}/{BUCKET}/world"
    ds = Dataset.open(url)
    assert isinstance(ds.path, RemotePath) and ds.n_users == Dataset.open(s3_store.local).n_users
    content = content_of(ds)
    ld = SequenceLoader(ds, content, split="test", batch_size=16, max_len=6)
    assert len(set(eval_users(list(ld)))) == sum(s.n_eval for s in ds.seq_shards)


# ----------------------------------------------------------------------------- permanent errors

def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("transrec: error:")]
    assert len(err) == 1, err
    return err[0]


def test_a_missing_dataset_is_one_line(store_env, capsys):
    assert main(["shards", "info", f"s3://{BUCKET}/nothing-here"]) == 2
    line = one_error_line(capsys)
    assert f"s3://{BUCKET}/nothing-here/manifest.json: missing (no such object" in line
    assert main(["shards", "info", "s3://no-such-bucket-x/world"]) == 2
    assert one_error_line(capsys) == ("transrec: error: s3://no-such-bucket-x/world/manifest.json: no such "
                                      "bucket (HTTP 404)")


def test_a_manifest_naming_a_missing_shard_stops_before_reading(store_env, capsys):
    client = store_env.server.client()
    name = Dataset.open(store_env.local).seq_shards[3].path.name
    for f in store_env.local.iterdir():
        if f.name != name:
            client.put_object(Bucket=BUCKET, Key=f"holey/{f.name}", Body=f.read_bytes())
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/holey/{name}: listed in the manifest "
                                                    "but missing"):
        Dataset.open(f"s3://{BUCKET}/holey")
    assert main(["shards", "info", f"s3://{BUCKET}/holey"]) == 2
    assert f"holey/{name}: listed in the manifest but missing" in one_error_line(capsys)


def test_wrong_credentials_are_one_line_before_any_step(s3_locked, monkeypatch, tmp_path):
    for k, v in s3_locked.env(secret="not-the-secret").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StoreError, match=rf"{s3_locked.url}/manifest.json: the secret key does not match "
                                         r"the access key \(bad credentials\) \(HTTP 403\)"):
        Dataset.open(s3_locked.url)
    # train, in a process of its own (a trainer starts a process group)
    env = dict(os.environ, **s3_locked.env(access="nobody"))
    proc = subprocess.run([sys.executable, "-m", "transrec.cli", "train", "--data", s3_locked.url, "--out",
                           str(tmp_path / "run"), "optim.steps=2", "run.progress=off"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"transrec: error: {s3_locked.url}/manifest.json: the access key is not known to the store (bad "
        "credentials) (HTTP 403)"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # the right ones read it
    for k, v in s3_locked.env().items():
        monkeypatch.setenv(k, v)
    assert Dataset.open(s3_locked.url).n_users == Dataset.open(s3_locked.local).n_users


def test_an_object_that_vanishes_mid_run_stops_the_loader_with_one_line(store_env):
    client = store_env.server.client()
    for f in store_env.local.iterdir():
        client.put_object(Bucket=BUCKET, Key=f"vanish/{f.name}", Body=f.read_bytes())
    ds = Dataset.open(f"s3://{BUCKET}/vanish")
    client.delete_object(Bucket=BUCKET, Key=f"vanish/{ds.seq_shards[0].path.name}")
    ld = SequenceLoader(ds, content_of(ds), split="test", batch_size=8, max_len=6, num_workers=2)
    with pytest.raises(StoreError) as info:
        list(ld)
    msg = str(info.value)
    assert msg == f"s3://{BUCKET}/vanish/{ds.seq_shards[0].path.name}: no such object (HTTP 404)", msg


def test_shards_synth_and_build_write_to_a_store(store_env, tmp_path, capsys):
    args = ["--domain", "target", "--users", "40", "--items", "30", "--seed", "5", "--quiet"]
    assert main(["shards", "synth", *args, "--out", f"s3://{BUCKET}/made/synth"]) == 0
    assert main(["shards", "synth", *args, "--out", str(tmp_path / "synth")]) == 0
    remote, local = Dataset.open(f"s3://{BUCKET}/made/synth"), Dataset.open(tmp_path / "synth")
    assert remote.manifest == local.manifest and remote.verify() == []
    (tmp_path / "inter.csv").write_text("user,item,timestamp\n" + "".join(
        f"u{u},i{(u * 3 + k) % 7},{k}\n" for u in range(6) for k in range(4)))
    (tmp_path / "items.csv").write_text("item,title\n" + "".join(f"i{i},title {i}\n" for i in range(7)))
    capsys.readouterr()
    assert main(["shards", "build", "--interactions", str(tmp_path / "inter.csv"), "--items",
                 str(tmp_path / "items.csv"), "--out", f"s3://{BUCKET}/made/built", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote s3://{BUCKET}/made/built: 6 users, 7 items")
    assert Dataset.open(f"s3://{BUCKET}/made/built").verify() == []
    assert main(["shards", "synth", *args, "--out", "https://example.invalid/x"]) == 2
    assert "http(s):// is read-only" in one_error_line(capsys)


def test_the_shard_cache_settings_are_checked():
    cfg = build_config("tiny", overrides=["data.shard_cache=/tmp/shards", "data.shard_cache_gb=2.5"])
    validate(cfg)
    assert (cfg.data.shard_cache, cfg.data.shard_cache_gb) == ("/tmp/shards", 2.5)
    with pytest.raises(ConfigError, match="data.shard_cache_gb must be positive, got 0"):
        validate(build_config("tiny", overrides=["data.shard_cache_gb=0"]))
