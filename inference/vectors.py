"""Item vectors out of a Recommender, and back in: the files a vector database or a server loads.

A vectors folder (``transrec vectors``, :meth:`Recommender.save_vectors`):

    vectors.safetensors   ``vectors`` [n, d] float32: each item's scoring vector, what a user
                          vector is scored against (unit rows for a cosine model); ``embeddings``
                          [n, d]: the item embeddings the user encoder reads (only for a cosine
                          model: for a dot-product one they are the vectors)
    ids.json              the n item ids, in the rows' order
    vectors.json          format, count, dim, metric ("cosine": scores are user · vector with the user
                          vector L2-normalised; "dot": as it is), the export it was made from and that
                          export's fingerprint, per-file SHA-256
    vectors.parquet       optional (``parquet=True``): columns ``id`` (string) and ``vector``
                          (fixed-size list of float32), for loading into a vector database
    index-KIND.*          optional: a saved ANN index over the vectors (:mod:`.ann`)

The vectors are the Recommender's own scoring rows, bit for bit: items added from content after
training, and a hybrid model's trained items with their per-item vector added. A folder is written
beside its destination and renamed into place once whole, so an earlier one is never half replaced.
:func:`read_vectors` checks every file's hash and the export's fingerprint before anything is used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from transrec.errors import UserError
from transrec.models.export import WEIGHTS, read_export
from transrec.storage import guarded_write, replace_folder, temporary_beside

FORMAT = 1
VECTORS = "vectors.safetensors"
IDS = "ids.json"
META = "vectors.json"
PARQUET = "vectors.parquet"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_fingerprint(export: str | Path) -> str:
    """SHA-256 over an export's weights and config (and, for an adapter export, its base's
    fingerprint): vectors made with one export are refused by a Recommender of another."""
    export = Path(export)
    meta = read_export(export)
    h = hashlib.sha256()
    h.update(_sha256(export / WEIGHTS).encode())
    h.update(_sha256(export / "config.yaml").encode())
    if meta.get("kind") == "adapter" and meta.get("base"):
        h.update(export_fingerprint(meta["base"]).encode())
    return h.hexdigest()


def check_target(out: Path) -> None:
    """A vectors folder may go to a new or empty folder, or replace an earlier vectors folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; pass a folder to --out")
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file():
        raise UserError(f"{out}: exists, is not empty and is not a vectors folder; pick another --out")


def write_vectors(out: str | Path, ids: list[str], vectors: np.ndarray, embeddings: np.ndarray | None, *,
                  metric: str, export: str | Path, fingerprint: str, model_kind: str, own_vectors: int,
                  parquet: bool = False, index=None) -> dict:
    """Write a vectors folder (module docstring) and return its ``vectors.json``; ``index``: an
    :class:`~transrec.inference.ann.ItemIndex` whose rows are positions in ``ids`` to save with it."""
    out = Path(out)
    check_target(out)
    if len(ids) != vectors.shape[0]:
        raise UserError(f"{len(ids)} ids for {vectors.shape[0]} vectors")
    tensors = {"vectors": np.ascontiguousarray(vectors, dtype=np.float32)}
    if embeddings is not None:
        tensors["embeddings"] = np.ascontiguousarray(embeddings, dtype=np.float32)
    what = "writing the item vectors"
    tmp = temporary_beside(what, out, noun="the vectors")
    with guarded_write(what, out, tmp):
        save_file(tensors, str(tmp / VECTORS))
        (tmp / IDS).write_text(json.dumps([str(i) for i in ids]))
        files = [VECTORS, IDS]
        if parquet:
            _write_parquet(tmp / PARQUET, ids, tensors["vectors"])
            files.append(PARQUET)
        meta = {"format": FORMAT, "count": len(ids), "dim": int(vectors.shape[1]), "metric": metric,
                "model_kind": model_kind, "items_with_own_vector": int(own_vectors),
                "export": str(export), "export_fingerprint": fingerprint}
        if index is not None and len(index):
            meta["index"] = index.save(tmp)
            files += [f"index-{index.kind}.faiss", f"index-{index.kind}.rows.safetensors",
                      f"index-{index.kind}.json"]
        meta["sha256"] = {f: _sha256(tmp / f) for f in files}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    replace_folder(tmp, out)
    return meta


def _write_parquet(path: Path, ids: list[str], vectors: np.ndarray) -> None:
    try:
        import pyarrow as pa  # optional: pyarrow (Parquet files)
        import pyarrow.parquet as pq  # optional: pyarrow (Parquet files)
    except ImportError:
        raise UserError("Parquet output needs pyarrow (pip install 'transrec[serve]')") from None
    n, d = vectors.shape
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, d)
    pq.write_table(pa.table({"id": pa.array([str(i) for i in ids], type=pa.string()), "vector": column}),
                   str(path))


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: not a vectors folder (no {META}; make one with "
                        "transrec vectors)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder / META}: unreadable ({exc})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{folder / META}: vectors format {meta.get('format')!r}, this transrec "
                        f"reads {FORMAT}")
    return meta


def read_vectors(folder: str | Path, *, fingerprint: str | None = None
                 ) -> tuple[list[str], np.ndarray, np.ndarray | None, dict]:
    """``(ids, vectors, embeddings or None, meta)`` of a vectors folder, every file's hash checked,
    and (given ``fingerprint``) the export it was made from checked: one line naming what is wrong."""
    folder = Path(folder)
    meta = read_meta(folder)
    if fingerprint is not None and meta.get("export_fingerprint") != fingerprint:
        raise UserError(f"{folder}: these vectors were made with another export ({meta.get('export')}); "
                        "make them again with transrec vectors for this one")
    for name, want in meta.get("sha256", {}).items():
        p = folder / name
        if not p.is_file():
            raise UserError(f"{p}: missing (listed in {META})")
        if _sha256(p) != want:
            raise UserError(f"{p}: damaged (its SHA-256 differs from {META}'s)")
    try:
        tensors = load_file(str(folder / VECTORS))
        ids = json.loads((folder / IDS).read_text())
    except Exception as exc:  # noqa: BLE001 - safetensors and json raise several types
        raise UserError(f"{folder}: unreadable vectors ({type(exc).__name__})") from None
    vectors = tensors.get("vectors")
    if vectors is None or vectors.ndim != 2 or vectors.shape != (int(meta["count"]), int(meta["dim"])):
        raise UserError(f"{folder / VECTORS}: expected vectors [{meta['count']}, {meta['dim']}]")
    if len(ids) != vectors.shape[0] or len(set(map(str, ids))) != len(ids):
        raise UserError(f"{folder / IDS}: {len(ids)} ids ({len(set(map(str, ids)))} distinct) for "
                        f"{vectors.shape[0]} vectors")
    emb = tensors.get("embeddings")
    if emb is not None and emb.shape != vectors.shape:
        raise UserError(f"{folder / VECTORS}: embeddings {list(emb.shape)} differ from vectors "
                        f"{list(vectors.shape)}")
    return [str(i) for i in ids], vectors, emb, meta
