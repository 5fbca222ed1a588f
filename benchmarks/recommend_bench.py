"""Serving throughput and memory: ``Recommender.recommend_many`` for many users over a large catalogue.

Run: .venv/bin/python benchmarks/recommend_bench.py [--users 10000 --items 100000 --chunks 4096,full]

The catalogue is an ID-model export of the ``tiny`` preset (``model.kind=id``, dim 64, random
weights) over a dataset of ``--items`` items, so encoding the catalogue is a table lookup and the
figures are those of serving: the user encoder over each history (``--history`` items, drawn at
random from the catalogue), scoring every item for every user, masking the history and the top
``--k``. ``eval.batch_size`` users go through at a time (``--batch``), ``score_chunk`` candidates
per product (``--chunks``; ``full``: the whole catalogue in one product).

Each chunk size runs in a fresh process, so one run's memory cannot hide another's
(``--in-process``: all in this one, faster). The peak
resident memory during ``recommend_many`` (Linux: the high-water mark reset just before it, read
just after) minus the resident memory before it is the memory scoring takes: a batch's
``[batch, chunk]`` float32 scores and the temporaries of masking and top-k, which the chunk bounds.
The table reports it with users/s, the time to encode the catalogue, and whether every chunk size
gave the same top-k ids. Rows are appended to benchmarks/results/recommend.csv with the thread
count and the machine stamp (date, machine, versions, commit; ``--no-csv``: not). ``--quick``: 300
users, 3,000 items, chunks 256 and full, in one process: a few seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import append_rows, stamp  # noqa: E402  (benchmarks/ is the script folder)

from transrec.config import build_config

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "recommend.csv"


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    """Reset the resident high-water mark (VmHWM) to the current resident size (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _config(data: Path, batch: int):
    return build_config("tiny", None, ["model.kind=id", "model.loss.l2_normalize=true", f"data.path={data}",
                                       f"eval.batch_size={batch}"])


def make_catalogue(work: Path, n_items: int, batch: int, seed: int) -> tuple[Path, Path]:
    """(dataset, ID-model export) of ``n_items`` items under ``work`` (reused when already there)."""
    import torch  # lazy: fast --help

    from transrec.models import build_model  # lazy: fast --help
    from transrec.shards.dataset import Dataset  # lazy: fast --help
    from transrec.shards.format import DatasetWriter  # lazy: fast --help

    data, export = work / "data", work / "export"
    try:
        if Dataset.open(data).n_items == n_items and (export / "export.json").is_file():
            return data, export
    except Exception:  # noqa: BLE001 - anything amiss: write both again
        pass
    w = DatasetWriter(data, shard_size=20000, name="recommend-bench")
    for i in range(n_items):
        w.add_item(f"i{i:07d}", title=f"item {i}")
    for u in range(50):  # a dataset needs users; the benchmark's users are drawn separately
        w.add_sequence(f"u{u}", [f"i{(u * 7 + j) % n_items:07d}" for j in range(5)])
    w.close()
    cfg = _config(data, batch)
    torch.manual_seed(seed)
    model = build_model(cfg.model, n_items=n_items)
    model.save_export(export, cfg, {"kind": "full", "step": 0, "n_items": n_items}, overwrite=True)
    return data, export


def worker(args, chunk_name: str) -> dict:
    """One chunk size: encode the catalogue, then time ``recommend_many``."""
    import torch  # lazy: fast --help

    from transrec.inference.recommender import Recommender  # lazy: fast --help

    if args.threads:
        torch.set_num_threads(args.threads)
    chunk = args.items if chunk_name == "full" else int(chunk_name)
    rec = Recommender.from_export(args.export, device="cpu", score_chunk=chunk)
    rec.batch_size = args.batch
    t0 = time.perf_counter()
    rec.add_items(data=args.data, progress=False)
    encode_s = time.perf_counter() - t0
    ids = rec.item_ids
    rng = np.random.default_rng(args.seed)
    picks = rng.integers(0, len(ids), size=(args.users, args.history))
    histories = [[ids[j] for j in row] for row in picks]
    rec.recommend_many(histories[: args.batch], args.k)  # first-call costs out of the timing
    before = _status_kib("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    recs = rec.recommend_many(histories, args.k)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") if exact else None
    digest = hashlib.sha256("\n".join(",".join(r.ids) for r in recs).encode()).hexdigest()[:16]
    mib = 1 / 1024
    return {"chunk": chunk_name, "encode_s": round(encode_s, 2), "seconds": round(seconds, 2),
            "users_per_s": round(args.users / seconds, 1),
            "rss_before_mib": round(before * mib, 1) if before else "",
            "peak_mib": round(peak * mib, 1) if peak else "",
            "scoring_mib": round((peak - before) * mib, 1) if peak and before else "",
            "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * mib, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "top_digest": digest}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10000)
    ap.add_argument("--items", type=int, default=100000)
    ap.add_argument("--history", type=int, default=20, help="items per user history (default: %(default)s)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128, help="users per pass (eval.batch_size)")
    ap.add_argument("--chunks", default="4096,full",
                    help="score_chunk values, comma-separated; full = the whole catalogue "
                         "(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None,
                    help="folder for the dataset and export (default: a temporary one)")
    ap.add_argument("--quick", action="store_true",
                    help="300 users, 3,000 items, chunks 256,full, in one process (implies --in-process)")
    ap.add_argument("--in-process", action="store_true",
                    help="every chunk size in this process (faster; a later run may reuse memory an "
                         "earlier one freed, so its memory figure can read low)")
    ap.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--export", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.users, args.items, args.chunks, args.in_process = 300, 3000, "256,full", True
    chunks = [c.strip() for c in args.chunks.split(",") if c.strip()]
    for name, v in (("--users", args.users), ("--items", args.items), ("--history", args.history),
                    ("--k", args.k), ("--batch", args.batch)):
        if v < 1:
            ap.error(f"{name} must be at least 1, got {v}")
    if not chunks or any(c != "full" and not (c.isdigit() and int(c) >= 1) for c in chunks):
        ap.error(f"--chunks: positive integers or 'full', got {args.chunks!r}")

    if args.worker is not None:
        print(json.dumps(worker(args, args.worker)))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="recommend_bench_"))
    t0 = time.perf_counter()
    data, export = make_catalogue(work, args.items, args.batch, args.seed)
    setup_s = time.perf_counter() - t0
    if args.in_process:
        args.data, args.export = str(data), str(export)
        rows = [worker(args, chunk) for chunk in chunks]
    else:
        rows = []
        for chunk in chunks:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", chunk, "--data", str(data),
                   "--export", str(export), "--users", str(args.users), "--items", str(args.items),
                   "--history", str(args.history), "--k", str(args.k), "--batch", str(args.batch),
                   "--threads", str(args.threads), "--seed", str(args.seed)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                print(f"recommend_bench: the run at chunk {chunk} failed (exit {proc.returncode})",
                      file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    same = len({r["top_digest"] for r in rows}) == 1

    command = "benchmarks/recommend_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"recommend_many: {args.users} users (histories of {args.history}) over {args.items} items, "
          f"top {args.k}, {args.batch} users per pass; ID-model export of the tiny preset (dim 64, cosine)")
    print(f"{stamp()['machine']}; torch {rows[0]['torch']}, {rows[0]['threads']} threads; load average "
          f"{os.getloadavg()[0]:.1f}; commit {stamp()['commit']}; command: {command}")
    print("| score_chunk | users/s | seconds | scoring memory (MiB) | peak RSS (MiB) "
          "| encode catalogue (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['chunk']} | {r['users_per_s']} | {r['seconds']} | {r['scoring_mib']} | {r['peak_mib']} "
              f"| {r['encode_s']} |")
    where = "one process" if args.in_process else "a fresh process per chunk size"
    print(f"same top-{args.k} ids at every chunk size: {'yes' if same else 'no'}; {where}; dataset and "
          f"export {setup_s:.0f} s; work folder {work}")
    if not args.no_csv:
        run = {**stamp(), "threads": rows[0]["threads"],
               "load": round(os.getloadavg()[0], 1), "users": args.users, "items": args.items,
               "history": args.history, "k": args.k, "batch": args.batch, "same_top": same,
               "in_process": args.in_process}
        append_rows(CSV, [{**run, **{k: v for k, v in r.items() if k not in ("torch", "threads")}}
                          for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
