"""Building a dataset folder from generic tables (``transrec shards build``) and from item records.

Inputs:

- an **interactions** table (``.csv``, ``.tsv`` or ``.jsonl``) with a user column, an item column
  and optionally a timestamp column (numbers, or ISO / ``MM/DD/YYYY hh:mm:ss AM`` dates); without
  a timestamp the file order is the time order;
- an **items** table (same formats) with an item column, a title column and/or an image column
  (a file path, relative to ``--images`` or to the table's folder);
- optionally an **image folder**: when the items table has no image column, ``<images>/<item>.jpg``
  (or ``.jpeg`` / ``.png``) is used when present.

Column names are matched case-insensitively against common spellings (``user``, ``user_id``,
``userId``, ``reviewerID`` ...). An item with both a title and an image becomes an image item,
unless ``image_frac`` is given: then a stable hash of its id picks image with that probability
(the mixture-of-modality setting). Bad rows are skipped and counted (see the returned report):
a missing or undecodable image file (the item falls back to its title when it has one), an empty
title, an interaction naming an unknown item, a duplicate item id.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from transrec.errors import DataError, UserError
from transrec.shards.format import DatasetWriter
from transrec.shards.stats import SkipStats

log = logging.getLogger("transrec.shards")

USER_COLS = ("user", "user_id", "userid", "uid", "reviewerid", "user_id:token")
ITEM_COLS = ("item", "item_id", "itemid", "iid", "asin", "parent_asin", "news_id", "item_id:token")
TIME_COLS = ("timestamp", "time", "ts", "unixreviewtime", "date", "timestamp:float")
TITLE_COLS = ("title", "name", "text", "item_name", "product_title")
IMAGE_COLS = ("image", "image_path", "cover", "image_file", "img", "path")


@dataclass
class ItemRecord:
    id: str
    title: str | None = None
    image: Path | None = None  # a local file


def _pick(cols: list[str], names: Iterable[str], what: str, path: Path, required: bool = True) -> str | None:
    lower = {c.lower().strip(): c for c in cols}
    for n in names:
        if n in lower:
            return lower[n]
    if required:
        raise UserError(f"{path}: no {what} column (looked for {', '.join(names)}; found {', '.join(cols)})")
    return None


def read_table(path: str | Path) -> tuple[list[str], Iterator[dict]]:
    """Column names and a row iterator of a CSV / TSV / JSONL table."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            first = next((ln for ln in f if ln.strip()), None)
        if first is None:
            raise DataError(f"{path}: empty table")
        try:
            cols = list(json.loads(first))
        except json.JSONDecodeError:
            raise DataError(f"{path}: first line is not a JSON object") from None

        def rows_jsonl():
            with open(path, encoding="utf-8") as f:
                for ln in f:
                    if ln.strip():
                        try:
                            yield json.loads(ln)
                        except json.JSONDecodeError:
                            yield None

        return cols, rows_jsonl()
    delim = "\t" if suffix in (".tsv", ".inter", ".item", ".txt") else ","
    f = open(path, encoding="utf-8", newline="")  # noqa: SIM115 - closed by the generator
    reader = csv.DictReader(f, delimiter=delim)
    if not reader.fieldnames:
        f.close()
        raise DataError(f"{path}: empty table (no header)")

    def rows_csv():
        with f:
            yield from reader

    return list(reader.fieldnames), rows_csv()


def parse_time(v) -> float | None:
    if v is None or v == "":
        return None
    if isinstance(v, int | float):
        return float(v)
    s = str(v).strip()
    try:
        return float(s)
    except ValueError:
        pass
    for fmt in ("%m/%d/%Y %I:%M:%S %p", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d", "%m %d, %Y"):
        try:
            return datetime.strptime(s, fmt).timestamp()
        except ValueError:
            continue
    try:
        return datetime.fromisoformat(s).timestamp()
    except ValueError:
        return None


def read_interactions(path: str | Path, stats: SkipStats) -> list[tuple[str, str, float, int]]:
    """(user, item, time, file order) rows of an interactions table."""
    path = Path(path)
    cols, rows = read_table(path)
    uc = _pick(cols, USER_COLS, "user", path)
    ic = _pick(cols, ITEM_COLS, "item", path)
    tc = _pick(cols, TIME_COLS, "timestamp", path, required=False)
    out = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get(uc) or not row.get(ic):
            stats.skip("bad_interaction_row", f"{path.name} row {n + 1}")
            continue
        t = parse_time(row.get(tc)) if tc else None
        if tc and t is None:
            stats.skip("bad_timestamp", f"{path.name} row {n + 1}")
            continue
        out.append((str(row[uc]), str(row[ic]), t if t is not None else float(n), n))
    if not out:
        raise DataError(f"{path}: no usable interactions")
    return out


def read_items(path: str | Path | None, images: str | Path | None, stats: SkipStats) -> list[ItemRecord]:
    """Item records from an items table and/or an image folder."""
    recs: list[ItemRecord] = []
    img_dir = Path(images) if images else None
    if img_dir is not None and not img_dir.is_dir():
        raise UserError(f"{img_dir}: image folder not found")
    if path is not None:
        path = Path(path)
        cols, rows = read_table(path)
        ic = _pick(cols, ITEM_COLS, "item", path)
        tc = _pick(cols, TITLE_COLS, "title", path, required=False)
        gc = _pick(cols, IMAGE_COLS, "image", path, required=False)
        if tc is None and gc is None and img_dir is None:
            raise UserError(f"{path}: needs a title or an image column (or --images)")
        base = img_dir or path.parent
        for n, row in enumerate(rows):
            if not isinstance(row, dict) or not row.get(ic):
                stats.skip("bad_item_row", f"{path.name} row {n + 1}")
                continue
            iid = str(row[ic])
            title = row.get(tc) if tc else None
            image = None
            if gc and row.get(gc):
                g = row[gc]
                g = g[0] if isinstance(g, list) and g else g
                image = Path(g) if Path(str(g)).is_absolute() else base / str(g)
            elif img_dir is not None:
                image = find_image(img_dir, iid)
            recs.append(ItemRecord(iid, str(title) if title is not None else None, image))
    elif img_dir is not None:
        for p in sorted(img_dir.iterdir()):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                recs.append(ItemRecord(p.stem, None, p))
    return recs


def find_image(folder: Path, item_id: str) -> Path | None:
    for ext in (".jpg", ".jpeg", ".png", ".JPG", ".PNG"):
        p = folder / f"{item_id}{ext}"
        if p.is_file():
            return p
    return None


def _image_bytes(path: Path, stats: SkipStats, item_id: str) -> tuple[bytes, str] | None:
    try:
        data = path.read_bytes()
    except OSError:
        stats.skip("missing_image", f"item {item_id}: {path}")
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").upper()
            im.load()  # full decode: truncated or corrupt files fail here
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt data
        stats.skip("corrupt_image", f"item {item_id}: {path.name} ({type(exc).__name__})")
        return None
    if fmt == "PNG":
        return data, "png"
    if fmt == "JPEG":
        return data, "jpg"
    with Image.open(io.BytesIO(data)) as im:  # other formats are re-encoded as PNG
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), "png"


def _prefers_image(item_id: str, image_frac: float | None) -> bool:
    if image_frac is None:
        return True
    h = int(hashlib.sha1(item_id.encode()).hexdigest()[:8], 16) / 2**32
    return h < image_frac


def build_dataset(out: str | Path, items: list[ItemRecord], interactions: list[tuple[str, str, float, int]],
                  *, shard_size: int = 1000, seq_shard_size: int | None = None,
                  image_frac: float | None = None, name: str = "", stats: SkipStats | None = None,
                  progress: bool = False) -> dict:
    """Write a dataset folder from item records and (user, item, time, order) interactions.

    Returns a report: counts written and the bad input skipped (by reason)."""
    stats = stats or SkipStats(where=f"build {out}")
    writer = DatasetWriter(out, shard_size=shard_size, seq_shard_size=seq_shard_size, name=name)
    it = items
    if progress:
        it = tqdm(items, desc="items", unit="item", mininterval=1.0)
    for rec in it:
        title = (rec.title or "").strip()
        img = None
        if rec.image is not None and (not title or _prefers_image(rec.id, image_frac)):
            img = _image_bytes(rec.image, stats, rec.id)
        if img is not None:
            writer.add_item(rec.id, image=img[0], image_ext=img[1])
        elif title:
            writer.add_item(rec.id, title=title)
        elif rec.image is None:
            stats.skip("empty_title", f"item {rec.id}")
    by_user: dict[str, list[tuple[float, int, str]]] = {}
    for user, item, t, order in interactions:
        by_user.setdefault(user, []).append((t, order, item))
    for user, rows in by_user.items():
        rows.sort()
        writer.add_sequence(user, [r[2] for r in rows])
    for reason, n in writer.skipped.items():
        stats.skip(reason, "while writing shards", n=n)
    writer.extra["skipped_while_building"] = dict(sorted(stats.counts.items()))
    path = writer.close()
    return {"path": str(path), "n_users": writer.n_users, "n_items": len(writer.item_ids),
            "n_interactions": writer.n_interactions, "skipped": dict(sorted(stats.counts.items()))}


def build_from_tables(out: str | Path, *, interactions: str | Path, items: str | Path | None = None,
                      images: str | Path | None = None, shard_size: int = 1000,
                      seq_shard_size: int | None = None, image_frac: float | None = None,
                      progress: bool = False) -> dict:
    """``transrec shards build``: interactions table + items table (+ image folder) -> dataset."""
    stats = SkipStats(where=f"build {out}")
    inter = read_interactions(interactions, stats)
    recs = read_items(items, images, stats)
    if not recs:
        raise DataError(f"{items or images}: no items")
    return build_dataset(out, recs, inter, shard_size=shard_size, seq_shard_size=seq_shard_size,
                         image_frac=image_frac, name=Path(out).name, stats=stats, progress=progress)
