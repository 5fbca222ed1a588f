"""Data-layer throughput: item-cache build rate, batch assembly rate, dedup ratio.

Run: .venv/bin/python benchmarks/loader.py [--users 4000 --items 2000 --epochs 3]

On the synthetic world (half text, half image items, 32x32 pictures, MiniLM tokenizer, titles up to
32 tokens) it measures
  - item-cache build: items/s for text items (tokenising) and image items (decode + resize),
  - batch assembly from the cache through SequenceLoader (WebDataset read, windows, one np.unique,
    content gather, torch tensors): sequences/s and unique items/s with 0, 1 and 2 workers,
    windows of 20 inputs + 1 target (every user has at least 23 interactions),
  - the dedup ratio (valid positions / unique items per batch) at batch 64 and 256.
Rows are appended to benchmarks/results/loader.csv with the machine stamp (date, machine, versions,
commit).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench_common import append_rows, stamp  # noqa: E402  (benchmarks/ is the script folder)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transrec.shards.cache import build_or_load_item_cache  # noqa: E402
from transrec.shards.dataset import Dataset  # noqa: E402
from transrec.shards.loader import SequenceLoader  # noqa: E402
from transrec.shards.synth import synthesize  # noqa: E402


def run_loader(ds, cache, *, batch_size, workers, epochs, max_len=20):
    loader = SequenceLoader(ds, cache, batch_size=batch_size, max_len=max_len, num_workers=workers, seed=0)
    seqs = uniq = pos = nb = 0
    t_first = None
    t0 = time.perf_counter()
    c0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for b in loader:
            if t_first is None:
                t_first = time.perf_counter()  # steady state starts after the first batch
                continue
            nb += 1
            seqs += b.batch_size
            uniq += b.num_unique
            pos += int(b.mask.sum())
    t1 = time.perf_counter()
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of this process and of the (joined) worker processes: a figure that other load on
    # the machine does not distort the way wall-clock rates are distorted
    cpu = (time.process_time() - c0[0]) + (ch.ru_utime + ch.ru_stime - c0[1].ru_utime - c0[1].ru_stime)
    steady = t1 - t_first
    return {"batches": nb, "seq_per_s": seqs / steady, "unique_items_per_s": uniq / steady,
            "seq_per_cpu_s": (seqs + batch_size) / cpu,
            "dedup_ratio": pos / uniq, "mean_unique": uniq / nb, "positions_per_batch": pos / nb,
            "startup_s": t_first - t0, "wall_s": t1 - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=4000)
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loader.csv"))
    args = ap.parse_args()

    run = stamp()
    date, mach, sha = run["date"], run["machine"], run["commit"]
    rows = []
    print(f"# loader benchmark  {date}  {mach}  commit {sha}  python {sys.version.split()[0]}")
    print(f"# load average before start: {os.getloadavg()[0]:.2f} (other processes share these cores)")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = synthesize(Path(tmp) / "bench", domain="source", n_users=args.users, n_items=args.items,
                          min_len=23, max_len=30, image_size=args.image_size, seed=0)
        print(f"synthetic world: {args.users} users, {args.items} items (half image, "
              f"{args.image_size}x{args.image_size}), written in {time.perf_counter() - t:.1f}s")
        ds = Dataset.open(path)
        t = time.perf_counter()
        cache = build_or_load_item_cache(ds, max_text_len=32, image_size=args.image_size,
                                         cache_dir=Path(tmp) / "cache", progress=False)
        total = time.perf_counter() - t
        b = cache.meta["build_seconds"]
        n_text, n_img = cache.meta["n_text"], cache.meta["n_image"]
        text_rate, img_rate = n_text / max(b["text"], 1e-9), n_img / max(b["image"], 1e-9)
        print(f"\nitem cache build ({total:.2f}s wall incl. tokenizer load and shard reading; "
              f"{b['total']:.2f}s inside the build)")
        print(f"  text : {n_text:6d} items  {text_rate:10.0f} items/s  (tokenise, max 32 tokens, batches "
              "of 1024)")
        print(f"  image: {n_img:6d} items  {img_rate:10.0f} items/s  (PNG decode + resize to "
              f"{args.image_size}x{args.image_size})")
        print(f"  all  : {ds.n_items:6d} items  {ds.n_items / b['total']:10.0f} items/s  (whole build: read "
              "shards + both)")
        common = dict(**run, users=args.users, items=args.items,
                      image_size=args.image_size)
        for name, rate in (("text", text_rate), ("image", img_rate)):
            rows.append({**common, "measure": f"cache_build_{name}", "value": round(rate, 1),
                         "unit": "items/s"})
        rows.append({**common, "measure": "cache_build_all", "value": round(ds.n_items / b["total"], 1),
                     "unit": "items/s"})

        print("\nbatch assembly from the cache (windows 20 + 1, steady state after the first batch)")
        print(f"  {'batch':>5} {'workers':>7} {'seq/s':>9} {'seq/cpu-s':>10} {'uniq items/s':>13} "
              f"{'positions/unique':>17} {'unique/batch':>13} {'startup s':>9}")
        for bs in (64, 256):
            for w in (0, 1, 2):
                r = run_loader(ds, cache, batch_size=bs, workers=w, epochs=args.epochs)
                print(f"  {bs:5d} {w:7d} {r['seq_per_s']:9.0f} {r['seq_per_cpu_s']:10.0f} "
                      f"{r['unique_items_per_s']:13.0f} "
                      f"{r['dedup_ratio']:17.2f} {r['mean_unique']:13.1f} {r['startup_s']:9.2f}")
                for key, unit in (("seq_per_s", "seq/s"), ("seq_per_cpu_s", "seq/cpu-s"),
                                  ("unique_items_per_s", "items/s"),
                                  ("dedup_ratio", "positions/unique")):
                    rows.append({**common, "measure": f"assembly_{key}_b{bs}_w{w}",
                                 "value": round(r[key], 2), "unit": unit})
    out = Path(args.out)
    append_rows(out, rows)
    print(f"\nwrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
