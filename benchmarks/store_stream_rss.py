"""Streaming a large world from an object store: one epoch, and the memory it takes.

Run: .venv/bin/python benchmarks/store_stream_rss.py [--interactions 1000000,10000000]

For each size, a text-only world of that many interactions (users of 25 items drawn from 5,000
titled items, sequence shards of 20,000 users) is written with the project's DatasetWriter,
uploaded to a SeaweedFS S3 server started on loopback (the dev extra's ``weed``), and streamed for
one epoch (training split, windows ``last``, batch 256, 2 workers) from ``s3://`` in a fresh
process. It reports the wall time, sequences/s and the peak resident memory of that process and of
its loader workers, so memory can be compared across sizes: it should not grow with the dataset.
Rows are appended to benchmarks/results/store_stream_rss.csv with the machine stamp.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import append_rows, stamp  # noqa: E402  (benchmarks/ is the script folder)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from s3_server import BUCKET, WeedServer, make_bucket, upload_folder  # noqa: E402

from transrec.shards.cache import build_or_load_item_cache  # noqa: E402
from transrec.shards.dataset import Dataset  # noqa: E402
from transrec.shards.format import DatasetWriter  # noqa: E402
from transrec.shards.loader import SequenceLoader  # noqa: E402

ITEMS, PER_USER, SHARD_USERS = 5000, 25, 20000


def write_world(out: Path, interactions: int, shard_users: int = SHARD_USERS) -> Path:
    """A text-only world of ``interactions`` (users of 25 items, 5,000 items, a popularity skew)."""
    rng = np.random.default_rng(0)
    w = DatasetWriter(out, shard_size=5000, seq_shard_size=shard_users)
    words = ["red", "blue", "linen", "wool", "striped", "plain", "coat", "shirt", "lamp", "mug"]
    for i in range(ITEMS):
        w.add_item(f"i{i}", title=" ".join(words[j] for j in rng.integers(0, len(words), 4)))
    pop = rng.zipf(1.3, size=ITEMS * 4) % ITEMS  # a popularity skew
    for u in range(interactions // PER_USER):
        w.add_sequence(f"u{u}", [f"i{k}" for k in rng.choice(pop, PER_USER)])
    return w.close()


def stream(url: str, cache_dir: str) -> dict:
    """One epoch from ``url`` in this process (the child of :func:`main`)."""
    ds = Dataset.open(url)
    content = build_or_load_item_cache(ds, cache_dir=cache_dir, max_text_len=16, progress=False)
    loader = SequenceLoader(ds, content, batch_size=256, max_len=20, num_workers=2, seed=0)
    seqs = 0
    t = time.perf_counter()
    for b in loader:
        seqs += b.batch_size
    wall = time.perf_counter() - t
    kib = 1024
    return {"seqs": seqs, "wall_s": wall, "seq_per_s": seqs / wall,
            "rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
            "rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interactions", default="1000000,10000000")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "store_stream_rss.csv"))
    ap.add_argument("--stream", help=argparse.SUPPRESS)  # child: URL to stream
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stream:
        print(json.dumps(stream(args.stream, args.cache)))
        return 0
    run = stamp()
    print(f"# streaming from the store  {run['date']}  {run['machine']}  commit {run['commit']}")
    print(f"# load average before start: {os.getloadavg()[0]:.2f} (other processes share these cores)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = WeedServer(tmp / "weed")
        server.start()
        try:
            make_bucket(server.client())
            env = dict(os.environ, **server.env())
            print(f"  {'interactions':>12} {'users':>9} {'shards':>6} {'MiB':>7} {'seq/s':>8} {'wall s':>7} "
                  f"{'peak RSS MiB':>12} {'worker RSS MiB':>14}")
            for n in (int(x) for x in args.interactions.split(",")):
                t = time.perf_counter()
                path = write_world(tmp / f"w{n}", n)
                local = Dataset.open(path)
                written = time.perf_counter() - t
                upload_folder(server.client(), path, BUCKET, f"w{n}")
                build_or_load_item_cache(local, cache_dir=tmp / "cache", max_text_len=16, progress=False)
                proc = subprocess.run([sys.executable, __file__, "--stream", f"s3://{BUCKET}/w{n}",
                                       "--cache", str(tmp / "cache")], env=env, capture_output=True,
                                      text=True, timeout=3600)
                if proc.returncode:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                mib = sum(s.bytes for s in local.seq_shards) / 2**20
                print(f"  {n:12,d} {local.n_users:9,d} {len(local.seq_shards):6d} {mib:7.0f} "
                      f"{r['seq_per_s']:8.0f} {r['wall_s']:7.1f} {r['rss_main_mib']:12.0f} "
                      f"{r['rss_worker_mib']:14.0f}   (written in {written:.0f} s)")
                rows.append({**run, "interactions": n, "users": local.n_users,
                             "shards": len(local.seq_shards), "shard_mib": round(mib, 1),
                             **{k: round(v, 2) for k, v in r.items()}})
                for f in path.iterdir():  # the disk holds one world at a time
                    f.unlink()
        finally:
            server.kill()
    append_rows(Path(args.out), rows)
    print(f"\nwrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
