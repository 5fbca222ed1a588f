"""Load test of ``transrec serve``: latency and throughput of POST /recommend over loopback.

Run: .venv/bin/python benchmarks/serve_load.py [--items 100000,1000000 --index exact,hnsw --clients 8]

For each pool size (``--items``) and index (``--index``) a server runs in a fresh process (this script
in its worker mode, which calls :func:`transrec.inference.server.serve`, the function ``transrec
serve`` runs) on a free loopback port. Its pool is ``--items`` items added by vector
(:func:`build_pool`: ``Recommender.add_vectors``, no encoder run) to a random-init export of the
``tiny`` preset (TransRec, dim 64, cosine scores, user encoder over the last 10 items), so the figures
are those of serving: parsing, the user encoder over each history, top-k over the pool (exact: a
chunked pass over every item; hnsw/ivf: a FAISS search), JSON back. The vectors are model-like:
clustered around ``--clusters`` centres, as trained item tables are, rather than uniform noise, on
which graph indexes fare unrealistically badly.

``--clients`` threads, each with one keep-alive connection, send ``--requests`` requests in all (or
for ``--seconds``), each of ``--per-request`` histories of ``--history`` pool items drawn at random;
a few requests first warm the server up, untimed. Concurrent requests with the same options are
scored in one pass by the server (``--coalesce`` users at most; 1: one request per pass). Reported:
latency p50/p99/mean per request (send to last byte), requests/s and users/s over the timed
requests, errors, the server's start-up (pool + index built, first pass) and resident memory after
the load, and for an approximate index its recall@k against the exact server's answers to the same
64 probe histories (when ``exact`` runs first in ``--index``). A markdown table is printed and rows
are appended to benchmarks/results/serve_load.csv with the machine stamp (``--no-csv``: not).

The clients run on the same machine as the server and take CPU from it: on a small machine the
figures are a lower bound for the server. ``--quick``: 20,000 items, exact, 4 clients, 200 requests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_common import append_rows, stamp  # noqa: E402  (benchmarks/ is the script folder)

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "serve_load.csv"
PROBES = 64  # histories asked of every server, for recall against exact


def item_id(j: int) -> str:
    return f"i{j:08d}"


def make_export(work: Path, seed: int) -> Path:
    """A random-init export of the tiny preset (TransRec, dim 64) under ``work`` (reused if there)."""
    import torch  # lazy: fast --help

    from transrec.config import build_config  # lazy: fast --help
    from transrec.models import build_model  # lazy: fast --help

    export = work / "export"
    if (export / "export.json").is_file():
        return export
    cfg = build_config("tiny", None, [])
    torch.manual_seed(seed)
    return build_model(cfg.model).save_export(export, cfg, {"kind": "full", "step": 0}, overwrite=True)


def build_pool(rec, n_items: int, *, seed: int, clusters: int, chunk: int = 200_000) -> None:
    """Put ``n_items`` items (ids :func:`item_id`) in ``rec``'s pool by vector: model-like embeddings
    of the model's dimension, ``clusters`` Gaussian clusters of unequal size and spread, at the scale
    of the model's own item embeddings. The one place the pool is made: adapt it here."""
    import torch  # lazy: fast --help

    dim = int(rec.cfg.model.dim)
    rng = np.random.default_rng(seed)
    # the scale of the model's real item embeddings: one encoded title
    scale = float(torch.as_tensor(rec.add_items(titles=["a plain red striped shirt"])).norm()) / np.sqrt(dim)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    spread = rng.uniform(0.3, 0.8, size=clusters).astype(np.float32)
    weight = rng.zipf(1.5, size=clusters).astype(np.float64)
    weight /= weight.sum()
    for lo in range(0, n_items, chunk):
        n = min(chunk, n_items - lo)
        c = rng.choice(clusters, size=n, p=weight)
        emb = centres[c] + spread[c, None] * rng.standard_normal((n, dim), dtype=np.float32)
        rec.add_vectors([item_id(j) for j in range(lo, lo + n)], emb * scale)


def worker(args) -> int:
    """The server process: export, pool, first pass, then serve until SIGTERM."""
    import torch  # lazy: fast --help

    from transrec.inference.recommender import Recommender  # lazy: fast --help
    from transrec.inference.server import serve  # lazy: fast --help

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rec = Recommender.from_export(args.export, device=args.device, index=args.worker_index)
    build_pool(rec, args.worker_items, seed=args.seed, clusters=args.clusters)
    pool_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    rec.recommend_many([[item_id(0)]], args.k, exclude_history=False)  # the index built, first-call costs
    first_s = time.perf_counter() - t1

    def ready(host: str, port: int) -> None:
        print(json.dumps({"port": port, "pool_s": round(pool_s, 2), "first_pass_s": round(first_s, 2),
                          "items": len(rec), "device": rec.device.type,
                          "threads": torch.get_num_threads()}), flush=True)

    serve(rec, host="127.0.0.1", port=0, log_level="warning", on_listen=ready,
          max_batch=max(args.per_request, 1),
          max_k=max(args.k, 1), coalesce=args.coalesce)
    return 0


# -- the client side ----------------------------------------------------------------------------------
class Server:
    """A worker process serving one (items, index); stopped by :meth:`stop` (SIGTERM, then SIGKILL)."""

    def __init__(self, args, export: Path, n_items: int, index: str, log: Path):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--export", str(export),
               "--worker-items", str(n_items), "--worker-index", index, "--seed", str(args.seed),
               "--clusters", str(args.clusters), "--k", str(args.k), "--per-request", str(args.per_request),
               "--coalesce", str(args.coalesce), "--threads", str(args.threads)]
        if args.device:
            cmd += ["--device", args.device]
        self.log = log
        with log.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout] + [lines.put(None)],
                         daemon=True).start()
        t0 = time.perf_counter()
        try:
            line = lines.get(timeout=args.startup_timeout)
        except queue.Empty:
            line = None
        self.startup_s = time.perf_counter() - t0
        if not line:
            self.stop()
            raise RuntimeError(f"the server for {n_items} items / {index} did not start within "
                               f"{args.startup_timeout} s (exit {self.proc.returncode}); its log: {log}\n"
                               + log.read_text()[-2000:])
        self.info = json.loads(line)
        self.port = int(self.info["port"])

    def rss_mib(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(60)
        return self.proc.returncode


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/recommend", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def histories(rng: np.random.Generator, n_items: int, count: int, length: int) -> list[list[str]]:
    return [[item_id(j) for j in rng.integers(0, n_items, size=length)] for _ in range(count)]


def run_load(port: int, args, n_items: int) -> dict:
    """``args.clients`` threads sending requests until ``args.requests`` are done or ``args.seconds``
    have passed; latencies of the timed requests (the warm-up ones are not counted)."""
    lock = threading.Lock()
    state = {"next": 0, "errors": 0, "first_error": "", "limit": args.clients * 2, "deadline": float("inf")}
    lat: list[float] = []

    def client(c: int) -> None:
        rng = np.random.default_rng(args.seed * 1000 + c + 1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.request_timeout)
        try:
            while True:
                with lock:
                    if state["next"] >= state["limit"] or time.perf_counter() >= state["deadline"]:
                        return
                    state["next"] += 1
                body = json.dumps({"histories": histories(rng, n_items, args.per_request, args.history),
                                   "k": args.k}).encode()
                t0 = time.perf_counter()
                try:
                    status, payload = post(conn, body)
                except (OSError, http.client.HTTPException) as exc:
                    status, payload = 0, str(exc).encode()
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.request_timeout)
                dt = time.perf_counter() - t0
                with lock:
                    if status == 200:
                        lat.append(dt)
                    else:
                        state["errors"] += 1
                        state["first_error"] = state["first_error"] or f"{status} {payload[:200]!r}"
        finally:
            conn.close()

    # warm-up, untimed: two requests a client
    warm = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    lat.clear()
    state.update(next=0, errors=0, first_error="", limit=args.requests if args.seconds <= 0 else 1 << 62)
    if args.seconds > 0:
        state["deadline"] = time.perf_counter() + args.seconds
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000 if lat else np.asarray([np.nan])
    done = len(lat)
    return {"requests": done, "errors": state["errors"], "first_error": state["first_error"],
            "seconds": round(wall, 2), "req_per_s": round(done / wall, 1),
            "users_per_s": round(done * args.per_request / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2)}


def probe(port: int, args, n_items: int) -> list[list[str]]:
    """The server's top-k for ``PROBES`` fixed histories (the same for every server of a size)."""
    rng = np.random.default_rng(args.seed + 7)
    hists = histories(rng, n_items, PROBES, args.history)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.request_timeout)
    try:
        out = []
        for lo in range(0, PROBES, max(args.per_request, 1)):
            status, payload = post(conn, json.dumps({"histories": hists[lo:lo + args.per_request],
                                                     "k": args.k}).encode())
            if status != 200:
                raise RuntimeError(f"probe request refused: {status} {payload[:300]!r}")
            out += [r["items"] for r in json.loads(payload)["recommendations"]]
        return out
    finally:
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="100000,1000000",
                    help="pool sizes, comma-separated (default: %(default)s)")
    ap.add_argument("--index", default="exact,hnsw",
                    help="exact, hnsw, ivf, comma-separated (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent client threads (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=2000,
                    help="timed requests per server (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=0,
                    help="time the load for this long instead of --requests (default: off)")
    ap.add_argument("--per-request", type=int, default=1, help="histories per request (default: %(default)s)")
    ap.add_argument("--history", type=int, default=20, help="items per history (default: %(default)s)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--coalesce", type=int, default=256,
                    help="users per scoring pass across concurrent requests, the server's --coalesce "
                         "(default: %(default)s)")
    ap.add_argument("--clusters", type=int, default=1000,
                    help="clusters of the pool's vectors (default: %(default)s)")
    ap.add_argument("--device", default=None, help="the server's device (default: CUDA when present)")
    ap.add_argument("--threads", type=int, default=0,
                    help="the server's torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=1800,
                    help="seconds a server may take to build its pool and index (default: %(default)s)")
    ap.add_argument("--request-timeout", type=float, default=120,
                    help="seconds per request (default: %(default)s)")
    ap.add_argument("--work", default=None, help="folder for the export and logs (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="20,000 items, exact, 4 clients, 200 requests")
    ap.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--export", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-items", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker-index", default="exact", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        return worker(args)
    if args.quick:
        args.items, args.index, args.clients, args.requests = "20000", "exact", 4, 200
    try:
        sizes = [int(x) for x in args.items.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--items: comma-separated integers, got {args.items!r}")
    indexes = [x.strip() for x in args.index.split(",") if x.strip()]
    if not sizes or min(sizes) < 1:
        ap.error(f"--items: positive integers, got {args.items!r}")
    if not indexes or any(x not in ("exact", "hnsw", "ivf") for x in indexes):
        ap.error(f"--index: exact, hnsw and/or ivf, got {args.index!r}")
    for name in ("clients", "requests", "per_request", "history", "k", "coalesce", "clusters"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="serve_load_"))
    work.mkdir(parents=True, exist_ok=True)
    export = make_export(work, args.seed)
    rows = []
    for n in sizes:
        exact_top = None
        for index in indexes:
            server = Server(args, export, n, index, work / f"server_{n}_{index}.log")
            try:
                top = probe(server.port, args, n)
                load = run_load(server.port, args, n)
                rss = server.rss_mib()
            finally:
                code = server.stop()
            if code != 0:
                print(f"serve_load: the server for {n} items / {index} exited {code}; log {server.log}",
                      file=sys.stderr)
            if index == "exact":
                exact_top = top
            recall = ""
            if exact_top is not None:
                recall = round(float(np.mean([len(set(a) & set(b)) / max(len(b), 1)
                                              for a, b in zip(top, exact_top)])), 4)
            info = server.info
            rows.append({"items": n, "index": index, "clients": args.clients, "per_request": args.per_request,
                         "history": args.history, "k": args.k, "coalesce": args.coalesce, **load,
                         "recall_vs_exact": recall, "startup_s": round(server.startup_s, 1),
                         "pool_s": info["pool_s"], "first_pass_s": info["first_pass_s"], "rss_mib": rss or "",
                         "device": info["device"], "threads": info["threads"], "exit": code})
            r = rows[-1]
            print(f"  {n} items, {index}: {r['req_per_s']} req/s, p50 {r['p50_ms']} ms, "
                  f"p99 {r['p99_ms']} ms, "
                  f"{r['errors']} errors", file=sys.stderr, flush=True)

    command = "benchmarks/serve_load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    st = stamp()
    print(f"POST /recommend on loopback: {args.clients} client threads (keep-alive), {args.per_request} "
          f"histories of {args.history} items per request, top {args.k}, server --coalesce {args.coalesce}; "
          "tiny preset export (TransRec, dim 64, cosine), pool by vector")
    print(f"{st['machine']}; server on {rows[0]['device']} with {rows[0]['threads']} torch threads; load "
          f"average {os.getloadavg()[0]:.1f}; commit {st['commit']}; command: {command}")
    print("| items | index | req/s | users/s | p50 ms | p99 ms | mean ms | errors | recall@k vs exact "
          "| start-up s | RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['items']} | {r['index']} | {r['req_per_s']} | {r['users_per_s']} | {r['p50_ms']} "
              f"| {r['p99_ms']} | {r['mean_ms']} | {r['errors']} | {r['recall_vs_exact']} | {r['startup_s']} "
              f"| {r['rss_mib']} |")
    errors = [r for r in rows if r["errors"] or r["exit"] != 0]
    for r in errors:
        print(f"{r['items']} / {r['index']}: {r['errors']} errors (first: {r['first_error']}), "
              f"exit {r['exit']}",
              file=sys.stderr)
    if not args.no_csv:
        run = {**st, "load": round(os.getloadavg()[0], 1),
               "mode": "seconds" if args.seconds > 0 else "requests"}
        append_rows(CSV, [{**run, **{k: v for k, v in r.items() if k != "first_error"}} for r in rows])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
