"""Loader throughput from an object store against local disk, same settings, 1/2/4 workers.

Run: .venv/bin/python benchmarks/store_loader.py [--users 260000 --shard-users 65000 --epochs 1]

A text-only world (users of 25 items drawn from 5,000 titled items, windows of 20 + 1; the writer
of ``store_stream_rss.py``) is written to a temporary folder and uploaded to a SeaweedFS S3 server
started on loopback (the dev extra's ``weed``, as the tests start it). The same ``SequenceLoader``
then reads it from the folder and from ``s3://`` with 1, 2 and 4 workers (``--workers``) and
reports sequences/s, MB/s of shard bytes, and the store's rate as a share of the disk's; first, one
64 MiB object is streamed through the shard reader alone (MiB/s against the same file from the page
cache). The page cache holds the local shards (they were just written), so "local" is the best case
a disk gives. Rows are appended to benchmarks/results/store_loader.csv with the machine stamp.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_common import append_rows, stamp  # noqa: E402  (benchmarks/ is the script folder)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from s3_server import BUCKET, WeedServer, make_bucket, upload_folder  # noqa: E402
from store_stream_rss import write_world  # noqa: E402

from transrec.shards.cache import build_or_load_item_cache  # noqa: E402
from transrec.shards.dataset import Dataset  # noqa: E402
from transrec.shards.loader import SequenceLoader  # noqa: E402


def rate(ds, cache, workers: int, epochs: int, batch_size: int) -> dict:
    loader = SequenceLoader(ds, cache, batch_size=batch_size, max_len=20, num_workers=workers, seed=0)
    seqs = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for b in loader:
            seqs += b.batch_size
    wall = time.perf_counter() - t0
    shard_bytes = sum(s.bytes for s in ds.seq_shards) * epochs
    return {"seq_per_s": seqs / wall, "mb_per_s": shard_bytes / wall / 2**20, "wall_s": wall}


def raw_stream(server, tmp: Path, mib: int = 64) -> dict:
    """MiB/s of one object of ``mib`` MiB streamed through the shard reader, and of the same file
    read from the page cache, in the tar reader's 10 KiB reads (second pass of each: warm)."""
    from transrec.shards.remote import open_shard  # lazy: after the AWS environment is set

    blob = tmp / "raw.bin"
    blob.write_bytes(os.urandom(mib << 20))
    server.client().upload_file(str(blob), BUCKET, "raw.bin")
    out = {}
    for where, opener in (("store", lambda: open_shard(f"s3://{BUCKET}/raw.bin")),
                          ("local", lambda: open(blob, "rb"))):
        for _ in range(2):
            t = time.perf_counter()
            with opener() as f:
                while f.read(10240):
                    pass
            out[where] = mib / (time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=260000)
    ap.add_argument("--shard-users", type=int, default=65000,
                    help="users per sequence shard (65,000: about 64 MiB)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "store_loader.csv"))
    args = ap.parse_args()
    run = stamp()
    print(f"# store vs local loader  {run['date']}  {run['machine']}  commit {run['commit']}")
    print(f"# load average before start: {os.getloadavg()[0]:.2f} (other processes share these cores)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        path = write_world(tmp / "world", args.users * 25, shard_users=args.shard_users)
        local = Dataset.open(path)
        mb = sum(s.bytes for s in local.seq_shards) / len(local.seq_shards) / 2**20
        print(f"world: {args.users} users in {len(local.seq_shards)} sequence shards of {mb:.1f} MiB, "
              f"written in {time.perf_counter() - t:.0f}s")
        server = WeedServer(tmp / "weed")
        server.start()
        try:
            make_bucket(server.client())
            upload_folder(server.client(), path, BUCKET, "world")
            os.environ.update(server.env())
            remote = Dataset.open(f"s3://{BUCKET}/world")
            cache = build_or_load_item_cache(local, cache_dir=tmp / "cache", max_text_len=16, progress=False)
            common = dict(**run, users=args.users, shards=len(local.seq_shards), shard_mib=round(mb, 1),
                          batch=args.batch, epochs=args.epochs)
            raw = raw_stream(server, tmp)
            print(f"one 64 MiB object streamed: {raw['store']:.0f} MiB/s from the store, {raw['local']:.0f} "
                  "MiB/s from the page cache")
            rows += [{**common, "workers": 0, "source": f"raw_{k}", "mb_per_s": round(v, 1)}
                     for k, v in raw.items()]
            print(f"  {'workers':>7} {'local seq/s':>12} {'store seq/s':>12} {'local MB/s':>11} "
                  f"{'store MB/s':>11} {'store/local':>11}")
            for w in (int(x) for x in args.workers.split(",")):
                a = rate(local, cache, w, args.epochs, args.batch)
                b = rate(remote, cache, w, args.epochs, args.batch)
                ratio = b["seq_per_s"] / a["seq_per_s"]
                print(f"  {w:7d} {a['seq_per_s']:12.0f} {b['seq_per_s']:12.0f} {a['mb_per_s']:11.1f} "
                      f"{b['mb_per_s']:11.1f} {ratio:11.2f}")
                for where, r in (("local", a), ("store", b)):
                    rows.append({**common, "workers": w, "source": where,
                                 "seq_per_s": round(r["seq_per_s"], 1), "mb_per_s": round(r["mb_per_s"], 2),
                                 "wall_s": round(r["wall_s"], 2), "store_over_local": round(ratio, 3)})
        finally:
            server.kill()
    fields = list(dict.fromkeys(k for r in rows for k in r))  # the raw rows have fewer columns
    append_rows(Path(args.out), rows, fields)
    print(f"\nwrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
