"""Serving subcommands: recommend, vectors, serve.

:func:`register` adds them to the ``transrec`` command line (:mod:`transrec.cli`, which imports this
module; nothing here imports it back). Like the rest of this room, nothing here imports DeepSpeed or
:mod:`transrec.engine`."""

from __future__ import annotations

import argparse
import sys

from transrec.errors import UserError
from transrec.inference import server

_RAW = argparse.RawDescriptionHelpFormatter


def cmd_recommend(args) -> int:
    from transrec.inference.histories import read_histories, write_recommendations  # lazy: fast --help
    from transrec.inference.recommender import Recommender  # lazy: fast --help

    if not args.data and not args.catalogue:
        raise UserError("recommend: give the candidate items with --data DIR and/or --catalogue DIR")
    if (args.history is None) == (args.users is None):
        raise UserError("recommend: give one of --history \"id1,id2,...\" or --users FILE")
    if args.history is not None:
        hist = [h.strip() for h in args.history.split(",") if h.strip()]
        if not hist:
            raise UserError("--history: empty (a user needs at least one item id)")
        users = [("history", hist)]
    else:
        users = read_histories(args.users)
        if not users:
            raise UserError(f"{args.users}: no users")
    rec = Recommender.from_export(args.export, device=args.device)
    if args.data:
        rec.add_items(data=args.data)
    if args.catalogue:
        rec.add_items(catalogue=args.catalogue)
    fmt = args.format or ("jsonl" if str(args.out or "").endswith((".jsonl", ".json")) else "csv")
    recs = rec.recommend_many([h for _, h in users], args.k, exclude_history=not args.include_history)
    write_recommendations(args.out, [u for u, _ in users], recs, fmt)
    if args.out and args.out != "-":
        print(f"top-{args.k} of {len(rec)} items for {len(users)} user(s) written to {args.out}",
              file=sys.stderr)
    return 0


def cmd_vectors(args) -> int:
    from transrec.inference.recommender import Recommender  # lazy: fast --help

    if not args.data and not args.catalogue:
        raise UserError("vectors: give the items with --data DIR and/or --catalogue DIR")
    rec = Recommender.from_export(args.export, device=args.device, index=args.index)
    if args.data:
        rec.add_items(data=args.data)
    if args.catalogue:
        rec.add_items(catalogue=args.catalogue)
    meta = rec.save_vectors(args.out, parquet=args.parquet)
    extra = f", an {args.index} index" if args.index == "ivf" else f", a {args.index} index"
    extra = extra if args.index != "exact" else ""
    print(f"{meta['count']} item vectors ({meta['dim']} dimensions, {meta['metric']} scoring{extra}) of "
          f"{args.export} written to {args.out}", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "recommend", help="top-k items for histories from an export (new catalogue items included)",
        formatter_class=_RAW,
        description="Score candidate items for user histories with an export (full or adapter). The "
                    "candidates are a dataset's items (--data) and/or a catalogue folder's (--catalogue: "
                    "items.csv with item and title and/or image columns, plus images/; new items need no "
                    "retraining). Items a user already has are left out unless --include-history.",
        epilog="examples:\n"
               "  transrec recommend --export exports/pre --data data/source --history s-i000001,s-i000002\n"
               "  transrec recommend --export exports/pre --data data/source --catalogue new_items/ \\\n"
               "      --users histories.csv --k 20 --out top.jsonl\n"
               "--users FILE: an interactions table (user, item[, timestamp]; CSV/TSV/JSONL) or JSONL lines\n"
               "  {\"user\": \"u1\", \"history\": [\"id1\", \"id2\"]}. Output: CSV user,rank,item,score or "
               "JSONL\n  (from --out's suffix or --format); standard output without --out.")
    p.add_argument("--export", required=True, help="export folder (transrec export)")
    p.add_argument("--data", help="dataset folder whose items are candidates")
    p.add_argument("--catalogue", help="catalogue folder (items.csv + images/) whose items are candidates")
    p.add_argument("--history", help="one user's item ids, oldest first, comma-separated")
    p.add_argument("--users", metavar="FILE", help="histories of many users (see below)")
    p.add_argument("--k", type=int, default=10, help="items per user (default: %(default)s)")
    p.add_argument("--out", help="output file (.csv or .jsonl; default: standard output)")
    p.add_argument("--format", choices=["csv", "jsonl"], default=None, help="output format")
    p.add_argument("--include-history", action="store_true", help="allow items already in the history")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser(
        "vectors", help="every item's scoring vector out of an export (safetensors, Parquet, ANN index)",
        formatter_class=_RAW,
        description="Encode the items of a dataset (--data) and/or a catalogue folder (--catalogue) with "
                    "an export and write OUT/vectors.safetensors (the scoring vectors, and for a cosine "
                    "model the user encoder's input embeddings), OUT/ids.json and OUT/vectors.json (metric, "
                    "export fingerprint, hashes). Hybrid items carry their own vector. The vectors equal "
                    "the Recommender's bit for bit; `transrec serve --vectors OUT` and "
                    "Recommender.load_vectors(OUT) load them without running an encoder.",
        epilog="examples:\n"
               "  transrec vectors --export exports/pre --data data/source --out vectors/pre\n"
               "  transrec vectors --export exports/pre --data data/source --catalogue new_items/ \\\n"
               "      --out vectors/pre --parquet --index hnsw")
    p.add_argument("--export", required=True, help="export folder (transrec export)")
    p.add_argument("--data", help="dataset folder whose items are written")
    p.add_argument("--catalogue", help="catalogue folder (items.csv + images/) whose items are written")
    p.add_argument("--out", required=True, help="vectors folder: new, empty or an earlier vectors folder")
    p.add_argument("--parquet", action="store_true", help="also OUT/vectors.parquet (id, vector)")
    p.add_argument("--index", choices=["exact", "hnsw", "ivf"], default="exact",
                   help="also build and save a FAISS index of this kind (default: none)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.set_defaults(func=cmd_vectors)

    server.add_parser(sub)
