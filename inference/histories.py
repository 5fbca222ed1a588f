"""Users' histories in, recommendations out: the files ``transrec recommend`` reads and writes.

- :func:`dataset_sequences`: every user's time-ordered item ids from a shards dataset;
- :func:`read_histories`: (user, history) pairs from JSONL histories or an interactions table;
- :func:`write_recommendations`: ``user, rank, item, score`` CSV rows or one JSON object per user.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds

from transrec.errors import UserError
from transrec.inference.recommender import Recommendations
from transrec.shards.build import read_interactions, read_table
from transrec.shards.dataset import Dataset
from transrec.shards.format import unsanitize_key
from transrec.shards.stats import SkipStats


def dataset_sequences(data: str | Path | Dataset) -> Iterator[tuple[str, list[str]]]:
    """(user id, time-ordered item ids) of every user of a dataset (ids unescaped)."""
    ds = data if isinstance(data, Dataset) else Dataset.open(data)
    for s in wds.WebDataset([str(x.path) for x in ds.seq_shards], shardshuffle=False, nodesplitter=None,
                            workersplitter=None, empty_check=False):
        obj = json.loads(s["json"])
        yield str(obj.get("user", unsanitize_key(s["__key__"]))), [unsanitize_key(k) for k in obj["items"]]


def read_histories(path: str | Path) -> list[tuple[str, list[str]]]:
    """(user, history) pairs from a file: JSONL lines ``{"user": ..., "history": [ids]}``, or an
    interactions table (user, item, optional timestamp; CSV/TSV/JSONL) as ``shards build`` reads."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    cols, rows = read_table(path)
    if "history" in cols:
        out = []
        for n, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get("history"), list):
                raise UserError(f"{path}: line {n + 1} has no history list")
            out.append((str(row.get("user", n)), [str(i) for i in row["history"]]))
        return out
    by_user: dict[str, list[tuple[float, int, str]]] = {}
    for user, item, t, order in read_interactions(path, SkipStats(where=f"histories {path}")):
        by_user.setdefault(user, []).append((t, order, item))
    return [(u, [r[2] for r in sorted(v)]) for u, v in by_user.items()]


def write_recommendations(path: str | Path | None, users: Iterable[str], recs: Iterable[Recommendations],
                          fmt: str = "csv") -> None:
    """Write ``user, rank, item, score`` rows (CSV) or one JSON object per user (JSONL); ``path``
    None or "-": standard output."""
    lines = ["user,rank,item,score"] if fmt == "csv" else []
    for u, r in zip(users, recs):
        if fmt == "csv":
            lines += [f"{_csv(u)},{j + 1},{_csv(i)},{s:.6f}" for j, (i, s) in enumerate(zip(r.ids, r.scores))]
        else:
            lines.append(json.dumps({"user": u, "items": r.ids, "scores": [round(s, 6) for s in r.scores]}))
    text = "\n".join(lines) + "\n"
    if path is None or str(path) == "-":
        sys.stdout.write(text)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def _csv(v: str) -> str:
    v = str(v)
    return '"' + v.replace('"', '""') + '"' if any(c in v for c in ',"\n') else v
