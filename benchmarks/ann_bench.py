"""Approximate top-k against exact at 100,000 and 1,000,000 items: recall@10, users/s, build time, memory.

Run: .venv/bin/python benchmarks/ann_bench.py --export demo_out/pretrained --data demo_out/data/source
     .venv/bin/python benchmarks/ann_bench.py ... --items 100000 --index hnsw --quick   # a smoke

The pool is the dataset's own items (encoded by the export) plus synthetic items up to ``--items``,
drawn from a Gaussian with the mean and covariance of the dataset's item embeddings: a table with
the shape of the trained one, whose inner products spread as the model's do (isotropic noise would
be the hardest case for any index and nothing like a trained table). The queries are real users:
the histories of the dataset's users (all but the last item), ranked against the whole pool with
the history masked, through the public ``Recommender.recommend_many``.

For each pool size: the exact path (``index="exact"``, every item scored) on ``--exact-users`` users
gives users/s and the reference top-k; each index (``--index hnsw,ivf``) is built (time, and the
resident memory it adds) and then answers ``--users`` users (users/s), and its recall@k is measured
on the reference users: a returned item counts when its exact score reaches the exact k-th score.
Rows go to benchmarks/results/ann.csv with the machine stamp and the thread count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from bench_common import append_rows, stamp  # noqa: E402  (benchmarks/ is the script folder)

from transrec.inference.histories import dataset_sequences
from transrec.inference.recommender import Recommender

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "ann.csv"


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def pool(export: str, data: str, n: int, index: str, seed: int, options: dict) -> Recommender:
    """The dataset's items plus Gaussian items with their mean and covariance, up to ``n``."""
    rec = Recommender.from_export(export, device="cpu", index=index, index_options=options)
    rec.add_items(data=data)
    base = rec.embeddings()[1].astype(np.float64)
    extra = n - base.shape[0]
    if extra > 0:
        rng = np.random.default_rng(seed)
        cov = np.cov(base.T) + 1e-6 * np.eye(base.shape[1])
        chol = np.linalg.cholesky(cov)
        for lo in range(0, extra, 200_000):  # in blocks: a million rows in float64 at once is large
            m = min(200_000, extra - lo)
            emb = (base.mean(0) + rng.standard_normal((m, base.shape[1])) @ chol.T).astype(np.float32)
            rec.add_vectors([f"synthetic-{lo + i:07d}" for i in range(m)], emb)
    return rec


def recall(rec: Recommender, hists, got, want) -> float:
    hits = []
    for h, g, w in zip(hists, got, want):
        s = rec.score(h, g.ids)
        hits.append(float(np.sum(s >= w.scores[-1] - 1e-6)) / len(w.ids))
    return float(np.mean(hits))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", default="demo_out/pretrained", help="export folder (transrec export)")
    ap.add_argument("--data", default="demo_out/data/source", help="dataset: its items and users")
    ap.add_argument("--items", default="100000,1000000", help="pool sizes, comma-separated")
    ap.add_argument("--index", default="hnsw,ivf", help="index kinds, comma-separated (hnsw, ivf)")
    ap.add_argument("--users", type=int, default=2000, help="users answered by each index")
    ap.add_argument("--exact-users", type=int, default=300, help="users answered exactly (the reference)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch and FAISS threads (0: all cores)")
    ap.add_argument("--ef-search", default="", metavar="N[,N...]",
                    help="HNSW efSearch values, each measured on one build (default: the index's)")
    ap.add_argument("--nprobe", default="", metavar="N[,N...]",
                    help="IVF lists searched, each measured on one build (default: the index's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="300 users, 100 exact, the first pool size only")
    ap.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results/ann.csv")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        import faiss  # optional: faiss (the index's threads)

        faiss.omp_set_num_threads(args.threads)
    sizes = [int(x) for x in args.items.split(",") if x.strip()]
    kinds = [x.strip() for x in args.index.split(",") if x.strip()]
    if args.quick:
        args.users, args.exact_users, sizes = 300, 100, sizes[:1]
    for p in (args.export, args.data):
        if not Path(p).exists():
            sys.exit(f"{p}: not found (make it with `transrec demo`, or pass --export and --data)")
    options = {}
    sweep = {"hnsw": [int(x) for x in args.ef_search.split(",") if x.strip()] or [None],
             "ivf": [int(x) for x in args.nprobe.split(",") if x.strip()] or [None]}
    users = [items[:-1] for _, items in dataset_sequences(args.data) if len(items) >= 2]
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(users))
    queries = [users[i] for i in order[:args.users]]
    while len(queries) < args.users:  # more queries than users: reuse them
        queries += queries[:args.users - len(queries)]
    ref = queries[:args.exact_users]
    threads = torch.get_num_threads()
    rows = []
    for n in sizes:
        exact = pool(args.export, args.data, n, "exact", args.seed, {})
        exact.recommend_many(ref[:8], args.k)  # first-call costs (the key table) out of the timing
        t = time.perf_counter()
        want = exact.recommend_many(ref, args.k)
        exact_ups = len(ref) / (time.perf_counter() - t)
        print(f"{len(exact)} items ({exact.metric}, dim {exact.vectors()[1].shape[1]}): exact "
              f"{exact_ups:.1f} users/s", flush=True)
        rows.append({"items": len(exact), "index": "exact", "params": "", "build_s": 0.0, "index_mib": 0.0,
                     "users": len(ref), "users_per_s": round(exact_ups, 1), "speedup": 1.0,
                     f"recall@{args.k}": 1.0})
        for kind in kinds:
            rec = pool(args.export, args.data, n, kind, args.seed, options)
            before = rss_mib()
            t = time.perf_counter()
            rec.recommend_many(ref[:1], args.k)  # builds the index over the whole pool
            build = time.perf_counter() - t
            grown = rss_mib() - before
            for value in sweep[kind]:  # how far a search looks, on the same build
                if value is not None:
                    rec._ann.set_search(**{"ef_search" if kind == "hnsw" else "nprobe": value})
                rec.recommend_many(queries[:8], args.k)
                t = time.perf_counter()
                got = rec.recommend_many(queries, args.k)
                ups = len(queries) / (time.perf_counter() - t)
                r = recall(exact, ref, got[:len(ref)], want)
                params = " ".join(f"{key}={v}" for key, v in rec._ann.params.items()
                                  if v is not None and (kind == "hnsw") == (key in ("m", "ef_construction",
                                                                                     "ef_search")))
                print(f"  {kind} ({params}): build {build:.1f} s, +{grown:.0f} MiB, {ups:.1f} users/s "
                      f"({ups / exact_ups:.1f}x exact), recall@{args.k} {r:.4f}", flush=True)
                rows.append({"items": len(rec), "index": kind, "params": params, "build_s": round(build, 1),
                             "index_mib": round(grown, 1), "users": len(queries),
                             "users_per_s": round(ups, 1), "speedup": round(ups / exact_ups, 2),
                             f"recall@{args.k}": round(r, 4)})
            del rec
    s = stamp()
    print(f"\n{s['machine']}, {threads} threads; export {args.export}; commit {s['commit']}")
    print(f"| items | index | parameters | build s | index MiB | users/s | vs exact | recall@{args.k} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['items']:,} | {r['index']} | {r['params']} | {r['build_s']} | {r['index_mib']} "
              f"| {r['users_per_s']} | {r['speedup']}x | {r[f'recall@{args.k}']} |")
    if not args.no_csv:
        append_rows(CSV, [{**s, "threads": threads, "export": args.export, "quick": args.quick, **r}
                          for r in rows])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
