"""``transrec shards synth|build|convert``: make dataset folders."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transrec.errors import UserError


@contextmanager
def _output(out: str) -> Iterator[str]:
    """The folder a command writes its dataset into: ``out`` itself, or for ``s3://bucket/prefix`` a
    temporary folder copied there once complete (the manifest last)."""
    from transrec.shards.remote import is_remote, upload_dataset  # lazy: fast --help

    if not is_remote(out):
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="transrec-dataset-") as tmp:
        local = str(Path(tmp) / Path(out.rstrip("/")).name)
        yield local
        upload_dataset(local, out)


def _synth(args) -> int:
    from transrec.shards.dataset import Dataset  # lazy: fast --help
    from transrec.shards.synth import synthesize  # lazy: fast --help

    t = time.perf_counter()
    with _output(args.out) as out:
        try:
            synthesize(out, domain=args.domain, n_users=args.users, n_items=args.items,
                       image_frac=args.image_frac, seed=args.seed, image_size=args.image_size,
                       min_len=args.min_len, max_len=args.max_len, shard_size=args.shard_size,
                       content_signal=args.content_signal, progress=not args.quiet)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    print(f"{Dataset.open(args.out)} written in {time.perf_counter() - t:.1f}s")
    return 0


def _build(args) -> int:
    from transrec.shards.build import build_from_tables  # lazy: fast --help
    from transrec.shards.convert import report_line  # lazy: fast --help

    if not args.items and not args.images:
        raise UserError("shards build: --items FILE is missing (an items table with an item column and a "
                        "title and/or image column; or --images DIR holding <item>.jpg/.png)")
    with _output(args.out) as out:
        report = build_from_tables(out, interactions=args.interactions, items=args.items,
                                   images=args.images, shard_size=args.shard_size,
                                   image_frac=args.image_frac, progress=not args.quiet)
    print(report_line({**report, "path": args.out}))
    return 0


def _convert(args) -> int:
    from transrec.shards.convert import convert, report_line  # lazy: fast --help

    kw = {"shard_size": args.shard_size}
    if args.image_frac is not None:
        kw["image_frac"] = args.image_frac
    with _output(args.out) as out:
        report = convert(args.format, args.input, out, progress=not args.quiet, **kw)
    print(report_line({**report, "path": args.out}))
    return 0


def _info(args) -> int:
    from transrec.shards.dataset import Dataset  # lazy: fast --help
    from transrec.shards.info import (  # lazy: fast --help
        dataset_stats,
        format_skips,
        format_stats,
        recorded_skips,
    )

    ds = Dataset.open(args.data)
    if args.verify:
        problems = ds.verify()
        if problems:
            for line in problems:
                print(f"transrec: error: {line}", file=sys.stderr)
            print(f"transrec: error: {ds.path}: {len(problems)} mismatches between the manifest and the "
                  "shards (rebuild the dataset)", file=sys.stderr)
            return 2
    st = dataset_stats(ds)
    skipped = recorded_skips(ds)
    shards = f"{len(ds.item_shards)} item shards, {len(ds.seq_shards)} sequence shards" + (
        ", checksums and counts verified" if args.verify else "")
    if args.json:
        print(json.dumps({**st, "skipped": skipped,
                          "shards": {"items": len(ds.item_shards), "sequences": len(ds.seq_shards),
                                     "verified": bool(args.verify)}}, indent=1))
        return 0
    print(format_stats(st))
    print(format_skips(skipped, ds.n_items))
    if args.manifest:
        m = {k: v for k, v in ds.manifest.items() if k not in ("item_shards", "seq_shards", "item_index")}
        print(json.dumps(m, indent=1))
    print(shards)
    return 0


def _columns_help() -> str:
    from transrec.shards.build import (  # lazy: fast --help
        IMAGE_COLS,
        ITEM_COLS,
        TIME_COLS,
        TITLE_COLS,
        USER_COLS,
    )

    rows = (("interactions: user", USER_COLS), ("interactions: item", ITEM_COLS),
            ("interactions: time (optional)", TIME_COLS), ("items: item", ITEM_COLS),
            ("items: title", TITLE_COLS), ("items: image path", IMAGE_COLS))
    return "".join(f"  {name:<30} {', '.join(cols)}\n" for name, cols in rows)


def register(subparsers) -> None:
    from transrec.shards.convert import FORMATS  # lazy: fast --help

    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("shards", help="make and inspect dataset folders (WebDataset shards)",
                              description="Make and inspect dataset folders: a manifest, an item index, "
                                          "item shards and sequence shards.")
    sub = p.add_subparsers(dest="shards_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    s = sub.add_parser("synth", formatter_class=fmt, help="write the synthetic mixture-of-modality world",
                       description="Write a synthetic dataset: items with latent attributes shown as "
                                   "titles (text items) or pictures (image items), users whose sequences "
                                   "follow their tastes. Source and target domains share the semantics, "
                                   "not the ids.",
                       epilog="Example:\n  transrec shards synth --domain source --out data/source\n"
                              "  transrec shards synth --domain target --out data/target --users 400")
    s.add_argument("--domain", choices=("source", "target"), default="source")
    s.add_argument("--out", required=True, help="output dataset folder (or s3://bucket/prefix)")
    s.add_argument("--users", type=int, default=None, help="number of users (domain default)")
    s.add_argument("--items", type=int, default=None, help="number of items (domain default)")
    s.add_argument("--image-frac", type=float, default=0.5, help="share of image items (default 0.5)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=32, help="picture side in pixels (>= 32)")
    s.add_argument("--min-len", type=int, default=None, help="shortest sequence (domain default)")
    s.add_argument("--max-len", type=int, default=None, help="longest sequence (domain default)")
    s.add_argument("--shard-size", type=int, default=None, help="items per item shard")
    s.add_argument("--content-signal", type=float, default=1.0, metavar="F",
                   help="how much of what drives tastes titles and pictures show, 0 to 1 (default 1: all "
                        "of it; 0: content is noise for the task, only item identity carries it)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_synth)

    b = sub.add_parser("build", formatter_class=fmt, help="build a dataset from interaction and item tables",
                       description="Build a dataset from an interactions table (CSV/TSV/JSONL: user, item, "
                                   "timestamp) and an items table (item, title and/or image path), plus an "
                                   "optional image folder (<item>.jpg). Bad rows are skipped and counted.",
                       epilog="Accepted column names (any case):\n" + _columns_help() +
                              "\nExample:\n  transrec shards build --interactions inter.csv "
                              "--items items.csv --images covers/ --out data/mine")
    b.add_argument("--interactions", required=True, help="CSV/TSV/JSONL with user, item, timestamp")
    b.add_argument("--items", default=None, help="CSV/TSV/JSONL with item and title and/or image")
    b.add_argument("--images", default=None, help="image folder (paths in the items table are relative "
                                                   "to it; else <item>.jpg/.png)")
    b.add_argument("--out", required=True, help="output dataset folder (or s3://bucket/prefix)")
    b.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    b.add_argument("--image-frac", type=float, default=None,
                   help="for items with both a title and an image: share made image items (default: all)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_build)

    c = sub.add_parser("convert", formatter_class=fmt, help="convert RecBole / MIND / Amazon / CSV+images",
                       description="Convert a dataset in a known layout (see transrec.shards.convert).",
                       epilog="Examples:\n  transrec shards convert --format recbole --input ml-100k/ --out "
                              "data/ml\n  transrec shards convert --format mind --input MINDsmall_train/ "
                              "--out data/mind\n  transrec shards convert --format csv-images --input "
                              "pixelrec/ --out data/pixel")
    c.add_argument("--format", required=True, choices=FORMATS)
    c.add_argument("--input", required=True, help="input folder (or file inside it)")
    c.add_argument("--out", required=True, help="output dataset folder (or s3://bucket/prefix)")
    c.add_argument("--shard-size", type=int, default=1000)
    c.add_argument("--image-frac", type=float, default=None,
                   help="for items with both a title and an image: share made image items")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_convert)

    i = sub.add_parser("info", formatter_class=fmt, help="print a dataset's statistics",
                       description="Users, items, interactions, density, sequence-length quantiles, "
                                   "popularity skew (top-1%% share, Gini), modality mix, split counts.",
                       epilog="Examples:\n  transrec shards info data/source --verify\n"
                              "  transrec shards info data/source --json")
    i.add_argument("data", help="dataset folder, s3://bucket/prefix or https://...")
    i.add_argument("--verify", action="store_true", help="check every shard's sha256 and every count "
                   "of the manifest against the shards (one line per mismatch, exit 2)")
    i.add_argument("--json", action="store_true", help="the statistics as one JSON object")
    i.add_argument("--manifest", action="store_true", help="also print the manifest's fields")
    i.set_defaults(func=_info)
