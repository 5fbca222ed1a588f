"""Faults on the way in from a real S3 server (SeaweedFS on loopback, see s3_server.py): connections
dropped mid-shard by a proxy, the store killed and restarted mid-epoch, a corrupted object. In each
case the loader yields exactly the batches the local folder gives (so every sample is read as often
as from disk), and every evaluated user exactly once.

Training from the store on 2 ranks matches the local run's loss curve step for step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import threading
import time

import pytest
from s3_server import BUCKET, DroppingProxy, WeedServer, serving_world, upload_folder
from spawn_ranks import start_ranks, wait_ranks
from test_shards_s3 import batches_key, content_of, eval_users

from transrec.shards.dataset import Dataset
from transrec.shards.loader import SequenceLoader
from transrec.shards.remote import RETRIES, use_shard_cache


@pytest.fixture(scope="module")
def own_store(tmp_path_factory):
    """A server of this module's own (the restart test kills it), with the world uploaded."""
    root, world = tmp_path_factory.mktemp("weed-faults"), tmp_path_factory.mktemp("faults-world")
    with serving_world(root, world) as pair:
        yield pair


def point_at(monkeypatch, server: WeedServer, endpoint: str | None = None) -> None:
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint or server.endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


def read_all(ds, content, split: str, workers: int = 0, world: int = 1, epoch: int = 0):
    out = []
    for rank in range(world):
        ld = SequenceLoader(ds, content, split=split, batch_size=8, max_len=6, seed=2, rank=rank,
                            world_size=world, num_workers=workers)
        ld.set_epoch(epoch)
        out.append((list(ld), dict(ld.stats.counts)))
    return out


def same_as_local(remote, local, content, split, lost: int = 0, **kw) -> None:
    """The store's batches and skip counts are the local folder's; evaluated users once each
    (all but ``lost`` of them)."""
    got, want = read_all(remote, content, split, **kw), read_all(local, content, split, **kw)
    for (g, g_stats), (w, w_stats) in zip(got, want):
        assert batches_key(g) == batches_key(w)
        assert g_stats == w_stats
    if split != "train":
        users = [u for batches, _ in got for u in eval_users(batches)]
        assert len(users) == len(set(users)) == sum(s.n_eval for s in remote.seq_shards) - lost


@pytest.mark.parametrize("workers", [0, 2])
def test_connections_dropped_mid_shard_are_resumed_where_they_broke(own_store, monkeypatch, workers):
    server, local_path = own_store
    proxy = DroppingProxy(server.ports["s3"], after=12_000)  # a 30 KiB shard breaks twice or more
    try:
        point_at(monkeypatch, server, proxy.endpoint)
        remote, local = Dataset.open(f"s3://{BUCKET}/world"), Dataset.open(local_path)
        content = content_of(local)
        before = RETRIES.count
        same_as_local(remote, local, content, "test", workers=workers, world=2)
        same_as_local(remote, local, content, "train", workers=workers, epoch=1)
        assert proxy.cut >= 2 * len(remote.seq_shards)  # the faults really happened, mid-shard
        if workers == 0:  # retried in this process: each pass over a shard broke at least once
            assert RETRIES.count - before >= 2 * len(remote.seq_shards)
    finally:
        proxy.close()


def test_the_store_killed_and_restarted_mid_epoch(own_store, monkeypatch):
    server, local_path = own_store
    point_at(monkeypatch, server)
    remote, local = Dataset.open(f"s3://{BUCKET}/world"), Dataset.open(local_path)
    content = content_of(local)
    want = read_all(local, content, "test")[0][0]
    ld = SequenceLoader(remote, content, split="test", batch_size=8, max_len=6, seed=2)
    it = iter(ld)
    got = [next(it)]
    before = RETRIES.count
    server.kill()  # mid-epoch: the next shards meet a dead store

    failed = []

    def restart():
        time.sleep(1.0)
        try:
            server.start(probe=f"{BUCKET}/world/manifest.json")
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failed.append(exc)

    t = threading.Thread(target=restart)
    t.start()
    try:
        got += list(it)
    finally:
        t.join(timeout=120)
    assert not failed, failed
    assert RETRIES.count > before  # it did meet the dead store
    assert batches_key(got) == batches_key(want)
    users = eval_users(got)
    assert len(users) == len(set(users)) == sum(s.n_eval for s in remote.seq_shards)
    assert ld.stats.total == 0


def test_a_corrupted_object_is_skipped_and_counted_like_a_corrupted_local_shard(own_store, monkeypatch,
                                                                               tmp_path):
    server, local_path = own_store
    point_at(monkeypatch, server)
    bad = tmp_path / "world"
    bad.mkdir()
    for f in local_path.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    name = Dataset.open(local_path).seq_shards[2].path.name
    with tarfile.open(bad / name) as tf:
        at = [m.offset_data for m in tf][5]  # the sixth sample's JSON
    blob = bytearray((bad / name).read_bytes())
    blob[at:at + 64] = b"\xff" * 64  # same size: only reading finds it
    (bad / name).write_bytes(bytes(blob))
    upload_folder(server.client(), bad, BUCKET, "corrupt")
    remote, local = Dataset.open(f"s3://{BUCKET}/corrupt"), Dataset.open(bad)
    content = content_of(local)
    got = read_all(remote, content, "test")
    assert got[0][1] == {"corrupt_sequence": 1}
    same_as_local(remote, local, content, "test", lost=1)
    same_as_local(remote, local, content, "train")
    problems = remote.verify()
    assert any(p.startswith(f"s3://{BUCKET}/corrupt/{name}: checksum differs") for p in problems), problems


def test_the_shard_cache_serves_the_next_epoch_when_the_store_is_gone(own_store, monkeypatch, tmp_path):
    server, local_path = own_store
    point_at(monkeypatch, server)
    remote, local = Dataset.open(f"s3://{BUCKET}/world"), Dataset.open(local_path)
    content = content_of(local)
    cache = use_shard_cache(tmp_path / "shards", 10 * 2**20)
    try:
        same_as_local(remote, local, content, "train", epoch=0)
        kept = sorted(p.name for p in cache.folder.iterdir())
        assert kept == sorted(f"{s.sha256}.tar" for s in remote.seq_shards)  # complete copies only
        server.kill()
        try:
            same_as_local(remote, local, content, "train", epoch=1)  # from the disk alone
            same_as_local(remote, local, content, "test", workers=2)
        finally:
            server.start(probe=f"{BUCKET}/world/manifest.json")
        # a cap of three shards keeps the three used last
        small = use_shard_cache(tmp_path / "small", 3 * remote.seq_shards[0].bytes + 100)
        same_as_local(remote, local, content, "test")
        assert len(list(small.folder.glob("*.tar"))) == 3
        assert not list(small.folder.glob(".*"))  # no partial copies left behind
    finally:
        use_shard_cache(None)


# ----------------------------------------------------------------------------- training on 2 ranks

TRAIN = ["--preset", "tiny", "optim.steps=6", "model.user.layers=1", "model.user.max_len=8", "data.max_len=8",
         "data.batch_size=16", "model.text.max_len=12", "optim.warmup_steps=2", "run.log_every=1",
         "run.progress=off", "run.tensorboard=false", "eval.every=0", "eval.max_users=16", "run.monitor="]


def train_losses(data: str, out, tmp_path, env: dict) -> list[float]:
    argv = [sys.executable, "-m", "transrec.cli", "train", "--data", data, "--out", str(out), *TRAIN]
    results = wait_ranks(start_ranks(argv, 2, tmp_path, tag=out.name, env=env), 300)
    for code, log in results:
        assert code == 0, log[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if r.get("kind") == "train"]


@pytest.mark.slow
def test_two_ranks_train_from_s3_like_from_the_local_folder(s3_store, tmp_path):
    env = dict(s3_store.env(), TRANSREC_CACHE=str(tmp_path / "cache"))
    from_store = train_losses(s3_store.url, tmp_path / "s3", tmp_path, env)
    from_disk = train_losses(str(s3_store.local), tmp_path / "disk", tmp_path, env)
    assert len(from_store) == 6
    assert from_store == from_disk
    log = (tmp_path / "rank0-s3.log").read_text()
    assert f"data: {s3_store.url} streams from the store" in log
    assert str(tmp_path / "cache" / "stores") in log

    # eval, export and recommend take the store's URL too, with the local folder's results
    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "transrec.cli", *args], env=dict(os.environ, **env),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    run = str(tmp_path / "s3")
    evals = [json.loads(cli("eval", "--run", run, "--data", d, "--split", "test", "--progress", "off"))
             for d in (s3_store.url, str(s3_store.local))]
    assert evals[0]["test"] == evals[1]["test"]
    cli("export", "--run", run, "--out", str(tmp_path / "export"))
    item_ids = Dataset.open(s3_store.local).item_ids
    recs = [cli("recommend", "--export", str(tmp_path / "export"), "--data", d, "--history",
                ",".join(item_ids[:3]), "--k", "5") for d in (s3_store.url, str(s3_store.local))]
    assert recs[0] == recs[1] and len(recs[0].strip().splitlines()) == 6  # header and 5 items
