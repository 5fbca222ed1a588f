"""Converters from layouts people already have (``transrec shards convert --format ...``).

- ``recbole``: RecBole atomic files, a folder with ``NAME.inter`` (``user_id:token``,
  ``item_id:token``, ``timestamp:float`` ...) and ``NAME.item`` (``item_id:token`` plus a
  ``token_seq`` title field such as ``movie_title:token_seq``); tab separated, typed headers.
  An ``images/`` folder beside them (``<item_id>.jpg``) is used when present.
- ``mind``: MIND, a folder with ``behaviors.tsv`` (impression id, user, time, space-separated
  click history, impressions ``N123-1 N456-0``) and ``news.tsv`` (news id, category, subcategory,
  title, abstract, ...), no headers. A user's sequence is the history of their earliest impression
  followed by the clicks (label 1) of their impressions in time order. All items are text items.
- ``amazon``: Amazon-reviews style JSON lines, a folder with a reviews file (``reviews.jsonl``, or
  the ``*.jsonl`` whose rows carry ``reviewerID``/``user_id`` and ``asin``) and a metadata file
  (``meta*.jsonl``: ``asin``/``parent_asin``, ``title``, ``image`` = a file in ``images/`` or a
  list of them). Items with an image and a title become image or text items by ``image_frac``.
- ``csv-images``: the layout of PixelRec / NineRec / MicroLens, a folder with an interactions CSV
  (user, item, timestamp columns), an image folder (``images/``, ``covers/`` or ``cover/``, files
  ``<item_id>.jpg``) and optionally an items CSV with titles.
"""

from __future__ import annotations

from pathlib import Path

from transrec.errors import DataError, UserError
from transrec.shards.build import (
    ITEM_COLS,
    TITLE_COLS,
    USER_COLS,
    ItemRecord,
    build_dataset,
    find_image,
    parse_time,
    read_interactions,
    read_items,
    read_table,
)
from transrec.shards.stats import SkipStats

FORMATS = ("recbole", "mind", "amazon", "csv-images")


def _folder(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{p}: input folder not found")
    return p


def _image_dir(folder: Path) -> Path | None:
    for name in ("images", "covers", "cover", "image"):
        if (folder / name).is_dir():
            return folder / name
    return None


def convert_recbole(input: str | Path, out: str | Path, **kw) -> dict:
    folder = _folder(input)
    inters = sorted(folder.glob("*.inter"))
    if Path(input).suffix == ".inter":
        inters = [Path(input)]
    if not inters:
        raise UserError(f"{folder}: no RecBole .inter file")
    inter = inters[0]
    item_file = inter.with_suffix(".item")
    stats = SkipStats(where=f"convert recbole {inter}")
    rows = read_interactions(inter, stats)
    recs: list[ItemRecord] = []
    img_dir = _image_dir(folder)
    if item_file.is_file():
        cols, it = read_table(item_file)
        ic = next((c for c in cols if c.split(":")[0].lower() == "item_id"), None)
        seqs = [c for c in cols if c.endswith(":token_seq")]
        named = [c for c in seqs if any(w in c.lower() for w in ("title", "name"))]
        tc = (named or seqs or [None])[0]
        if ic is None:
            raise DataError(f"{item_file}: no item_id:token column")
        for n, row in enumerate(it):
            if not row.get(ic):
                stats.skip("bad_item_row", f"{item_file.name} row {n + 1}")
                continue
            recs.append(ItemRecord(row[ic], row.get(tc) if tc else None,
                                   find_image(img_dir, row[ic]) if img_dir else None))
    elif img_dir is not None:
        recs = read_items(None, img_dir, stats)
    else:
        raise UserError(f"{item_file}: missing (RecBole needs NAME.item with titles, or an images/ folder)")
    return build_dataset(out, recs, rows, name=inter.stem, stats=stats, **kw)


def convert_mind(input: str | Path, out: str | Path, **kw) -> dict:
    folder = _folder(input)
    beh, news = folder / "behaviors.tsv", folder / "news.tsv"
    for p in (beh, news):
        if not p.is_file():
            raise UserError(f"{p}: missing (MIND needs behaviors.tsv and news.tsv)")
    stats = SkipStats(where=f"convert mind {folder}")
    recs = []
    with open(news, encoding="utf-8") as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 4 or not parts[0]:
                stats.skip("bad_item_row", f"news.tsv row {n + 1}")
                continue
            recs.append(ItemRecord(parts[0], parts[3]))
    impressions: dict[str, list[tuple[float, int, list[str], list[str]]]] = {}
    with open(beh, encoding="utf-8") as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            t = parse_time(parts[2]) if len(parts) >= 5 else None
            if t is None or not parts[1]:
                stats.skip("bad_interaction_row", f"behaviors.tsv row {n + 1}")
                continue
            hist = parts[3].split()
            clicks = [x.rsplit("-", 1)[0] for x in parts[4].split() if x.endswith("-1")]
            impressions.setdefault(parts[1], []).append((t, n, hist, clicks))
    rows = []
    order = 0
    for user, imps in impressions.items():
        imps.sort(key=lambda x: (x[0], x[1]))
        seq = list(imps[0][2])
        seen = set(seq)
        for _, _, _, clicks in imps:
            for c in clicks:
                if c not in seen:
                    seq.append(c)
                    seen.add(c)
        for i, item in enumerate(seq):
            rows.append((user, item, float(i), order))
            order += 1
    if not rows:
        raise DataError(f"{beh}: no usable behaviour rows")
    return build_dataset(out, recs, rows, name="mind", stats=stats, **kw)


def convert_amazon(input: str | Path, out: str | Path, **kw) -> dict:
    folder = _folder(input)
    files = sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.json"))
    meta = [p for p in files if p.name.startswith("meta")]
    reviews = [p for p in files if not p.name.startswith("meta")]
    if not meta or not reviews:
        raise UserError(f"{folder}: needs a reviews .jsonl and a meta*.jsonl file")
    stats = SkipStats(where=f"convert amazon {folder}")
    rows = read_interactions(reviews[0], stats)
    img_dir = _image_dir(folder)
    recs = []
    cols, it = read_table(meta[0])
    lower = {c.lower(): c for c in cols}
    ic = next((lower[c] for c in ITEM_COLS if c in lower), None)
    tc = next((lower[c] for c in TITLE_COLS if c in lower), None)
    if ic is None:
        raise DataError(f"{meta[0]}: no asin / parent_asin field")
    for n, row in enumerate(it):
        if not isinstance(row, dict) or not row.get(ic):
            stats.skip("bad_item_row", f"{meta[0].name} row {n + 1}")
            continue
        image = row.get("image") or row.get("images") or row.get("imageURLHighRes")
        if isinstance(image, list):
            image = image[0] if image else None
        if isinstance(image, dict):
            image = image.get("file") or image.get("path")
        path = None
        if image:
            path = Path(image) if Path(image).is_absolute() else (img_dir or folder) / str(image)
        elif img_dir is not None:
            path = find_image(img_dir, str(row[ic]))
        title = row.get(tc) if tc else None
        recs.append(ItemRecord(str(row[ic]), str(title) if title else None, path))
    kw.setdefault("image_frac", 0.5)
    return build_dataset(out, recs, rows, name=folder.name, stats=stats, **kw)


def convert_csv_images(input: str | Path, out: str | Path, **kw) -> dict:
    folder = _folder(input)
    img_dir = _image_dir(folder)
    if img_dir is None:
        raise UserError(f"{folder}: no image folder (images/, covers/ or cover/)")
    stats = SkipStats(where=f"convert csv-images {folder}")
    inter_file = items_file = None
    for p in sorted(folder.glob("*.csv")) + sorted(folder.glob("*.tsv")):
        cols = [c.lower() for c in read_table(p)[0]]
        has_user = any(c in cols for c in USER_COLS)
        has_item = any(c in cols for c in ITEM_COLS)
        if has_user and has_item and inter_file is None:
            inter_file = p
        elif has_item and any(c in cols for c in TITLE_COLS) and items_file is None:
            items_file = p
    if inter_file is None:
        raise UserError(f"{folder}: no interactions CSV with user and item columns")
    rows = read_interactions(inter_file, stats)
    if items_file is not None:
        recs = read_items(items_file, img_dir, stats)
    else:
        wanted = dict.fromkeys(r[1] for r in rows)
        recs = []
        for iid in wanted:
            p = find_image(img_dir, iid)
            if p is None:
                stats.skip("missing_image", f"item {iid}: no {iid}.jpg in {img_dir}")
                continue
            recs.append(ItemRecord(iid, None, p))
    return build_dataset(out, recs, rows, name=folder.name, stats=stats, **kw)


CONVERTERS = {"recbole": convert_recbole, "mind": convert_mind, "amazon": convert_amazon,
              "csv-images": convert_csv_images}


def convert(fmt: str, input: str | Path, out: str | Path, **kw) -> dict:
    if fmt not in CONVERTERS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return CONVERTERS[fmt](input, out, **kw)


def report_line(report: dict) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "nothing"
    return (f"wrote {report['path']}: {report['n_users']} users, {report['n_items']} items, "
            f"{report['n_interactions']} interactions; skipped: {skipped}")


__all__ = ["CONVERTERS", "FORMATS", "convert", "report_line"]
