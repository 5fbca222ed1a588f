"""Approximate nearest-neighbour retrieval over item scoring vectors, with FAISS.

:class:`ItemIndex` holds the scoring vectors of the items a :class:`~transrec.inference.recommender.
Recommender` ranks (``item_keys`` of its table: unit rows for a cosine model, raw rows for a
dot-product one) in an inner-product FAISS index, so a query's inner products are the Recommender's
scores and one index kind serves both kinds of model:

- ``hnsw``: ``IndexHNSWFlat`` (graph search; ``M`` links per node, ``ef_construction`` at build,
  ``ef_search`` at query). No training; items are added one batch after another.
- ``ivf``: ``IndexIVFFlat`` over an inner-product coarse quantiser (``nlist`` lists, default about
  4·√n; ``nprobe`` searched, default 2·√nlist). Trained by k-means on the first vectors it
  is given (every vector when building from a pool); items added later go to the nearest list.

A dot-product model's items differ in norm, and a graph or list search by inner product over such
vectors misses many of the true top items (the dot-product case of the tests: recall@10 0.76). Its vectors
are therefore indexed with one more coordinate, ``√(R² − ‖x‖²)`` for a bound ``R`` above every item's
norm, and queries with a zero there: every indexed vector has norm ``R``, so the largest inner product
is the nearest neighbour, and the inner product itself is unchanged. An item above the bound rebuilds
the index with a new one.

FAISS numbers the vectors of an index 0, 1, 2, ... in the order they are added; ``rows`` maps that
number to whatever the caller numbers items by (the Recommender's table rows). Both FAISS index
kinds hold the vectors themselves (``Flat``), so scores are exact inner products and only the
candidate set is approximate. An index is written with ``faiss.write_index`` (FAISS's own binary
format) and its row map as safetensors; nothing is unpickled on reading.

Filtering (the user's history masked, ``candidates=``) happens after the search: the caller asks for
more neighbours than it needs (:func:`fetch_size`) and asks again with more when filtering left too
few, as FAISS users do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from transrec.errors import UserError

KINDS = ("exact", "hnsw", "ivf")  # "exact": no index, the Recommender's exact scoring pass

# Defaults: recall@10 about 0.99 at a million items of 64 dimensions (benchmarks/ann_bench.py; a
# smaller ef_search or nprobe is faster and finds less, docs/serving.md has the trade).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
IVF_MIN_TRAIN_PER_LIST = 39  # FAISS warns below 39 training points per centroid

FORMAT = 1


def _faiss():
    try:
        import faiss  # lazy: the serving extra
    except ImportError:
        raise UserError("an ANN index needs faiss (pip install 'transrec[serve]', or faiss-gpu where "
                        "CUDA is present)") from None
    return faiss


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UserError(f"index {kind!r}: choose one of {', '.join(KINDS)}")
    return kind


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: about 4·√n (FAISS's guideline), at least 1 and never more than
    ``n / 39`` so every list has training points."""
    return max(1, min(int(4 * math.sqrt(max(n, 1))), n // IVF_MIN_TRAIN_PER_LIST))


def fetch_size(k: int, masked: int, n: int) -> int:
    """Neighbours to ask for so that ``k`` remain after filtering ``masked`` of them: ``k`` plus the
    masked ones, doubled for what stale or excluded entries take, never more than ``n``."""
    return int(min(n, 2 * (k + masked) + 16))


class ItemIndex:
    """An inner-product FAISS index over item scoring vectors (see the module docstring); ``metric``:
    the model's, ``cosine`` (unit vectors) or ``dot``."""

    def __init__(self, kind: str, dim: int, *, metric: str = "cosine", m: int = HNSW_M,
                 ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH,
                 nlist: int | None = None, nprobe: int | None = None, max_norm: float | None = None):
        if check_kind(kind) == "exact":
            raise UserError("an ItemIndex is hnsw or ivf; exact scoring needs no index")
        if dim < 1:
            raise UserError(f"index dimension must be at least 1, got {dim}")
        if metric not in ("cosine", "dot"):
            raise UserError(f"index metric {metric!r}: cosine or dot")
        self.kind, self.dim, self.metric = kind, int(dim), metric
        self.max_norm = max_norm  # dot: the bound R of the extra coordinate (module docstring)
        self.params = {"m": int(m), "ef_construction": int(ef_construction), "ef_search": int(ef_search),
                       "nlist": None if nlist is None else int(nlist),
                       "nprobe": None if nprobe is None else int(nprobe)}
        self.rows = np.zeros(0, dtype=np.int64)  # FAISS number -> caller's row
        self._index = None

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __repr__(self) -> str:
        return f"ItemIndex({self.kind}, dim={self.dim}, items={len(self)})"

    @property
    def _width(self) -> int:
        return self.dim + (self.metric == "dot")

    def _lift(self, vectors: np.ndarray) -> np.ndarray:
        """Items as indexed: a dot-product model's with the coordinate that equalises their norms."""
        if self.metric != "dot":
            return vectors
        sq = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
        extra = np.sqrt(np.maximum(float(self.max_norm) ** 2 - sq, 0.0)).astype(np.float32)
        return np.ascontiguousarray(np.concatenate([vectors, extra[:, None]], axis=1))

    def _make(self, first: np.ndarray):
        faiss = _faiss()
        ip = faiss.METRIC_INNER_PRODUCT
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self._width, self.params["m"], ip)
            index.hnsw.efConstruction = self.params["ef_construction"]
            index.hnsw.efSearch = self.params["ef_search"]
            return index
        nlist = self.params["nlist"] or default_nlist(first.shape[0])
        nlist = max(1, min(nlist, first.shape[0]))
        self.params["nlist"] = nlist
        quantizer = faiss.IndexFlatIP(self._width)
        index = faiss.IndexIVFFlat(quantizer, self._width, nlist, ip)
        index.cp.seed = 1234  # k-means start: the same index for the same vectors
        index.train(first)
        self.params["nprobe"] = min(self.params["nprobe"] or max(16, round(2 * math.sqrt(nlist))), nlist)
        index.nprobe = self.params["nprobe"]
        # the quantiser object must outlive the Python wrapper of this call
        self._quantizer = quantizer
        return index

    def add(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        """Add scoring vectors ``[n, dim]`` (float32) for the caller's ``rows``."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or vectors.shape[0] != rows.shape[0]:
            raise UserError(f"index add: {list(vectors.shape)} vectors for {rows.shape[0]} rows, "
                            f"dimension {self.dim} expected")
        if not vectors.shape[0]:
            return
        if self.metric == "dot":
            top = float(np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64).max()))
            if self._index is not None and top > float(self.max_norm):  # above the bound: rebuild
                old, old_rows = self._stored(), self.rows
                self._index, self.rows, self.max_norm = None, np.zeros(0, dtype=np.int64), None
                vectors, rows = np.concatenate([old, vectors]), np.concatenate([old_rows, rows])
                top = max(top, float(np.sqrt(np.einsum("ij,ij->i", old, old, dtype=np.float64).max())))
            if self.max_norm is None:
                self.max_norm = 1.25 * top + 1e-6  # headroom for items that join later
        lifted = self._lift(vectors)
        if self._index is None:
            self._index = self._make(lifted)
        self._index.add(lifted)
        self.rows = np.concatenate([self.rows, rows])

    def _stored(self) -> np.ndarray:
        """The vectors in the index, as given to :meth:`add` (FAISS order)."""
        if self.kind == "ivf":
            self._index.make_direct_map()
        return self._index.reconstruct_n(0, self._index.ntotal)[:, :self.dim]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [B, k], rows [B, k])`` of the ``k`` nearest by inner product, best first; a slot
        FAISS could not fill has row -1 and score -inf."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise UserError(f"index search: queries {list(queries.shape)}, dimension {self.dim} expected")
        if self._index is None or not len(self):
            return (np.full((queries.shape[0], k), -np.inf, dtype=np.float32),
                    np.full((queries.shape[0], k), -1, dtype=np.int64))
        k_eff = min(int(k), len(self))
        if self.metric == "dot":
            queries = np.ascontiguousarray(np.pad(queries, ((0, 0), (0, 1))))
        scores, labels = self._index.search(queries, k_eff)
        rows = np.where(labels >= 0, self.rows[np.clip(labels, 0, None)], -1)
        scores = np.where(labels >= 0, scores, -np.inf).astype(np.float32)
        if k_eff < k:
            pad = k - k_eff
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return scores, rows

    def set_search(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change how far a search looks (HNSW ``ef_search``, IVF ``nprobe``) without a rebuild."""
        if ef_search is not None:
            self.params["ef_search"] = int(ef_search)
            if self._index is not None and self.kind == "hnsw":
                self._index.hnsw.efSearch = int(ef_search)
        if nprobe is not None:
            self.params["nprobe"] = int(nprobe)
            if self._index is not None and self.kind == "ivf":
                self._index.nprobe = min(int(nprobe), self._index.nlist)

    # -- files ----------------------------------------------------------------------------------
    def save(self, folder: str | Path, stem: str | None = None) -> dict:
        """Write ``STEM.faiss`` (FAISS's format), ``STEM.rows.safetensors`` and ``STEM.json`` into
        ``folder``; returns the JSON's content."""
        faiss = _faiss()
        folder = Path(folder)
        stem = stem or f"index-{self.kind}"
        if self._index is None:
            raise UserError("an empty index is not saved")
        faiss.write_index(self._index, str(folder / f"{stem}.faiss"))
        save_file({"rows": self.rows}, str(folder / f"{stem}.rows.safetensors"))
        meta = {"format": FORMAT, "kind": self.kind, "dim": self.dim, "metric": self.metric,
                "max_norm": self.max_norm, "count": len(self), **self.params}
        (folder / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")
        return meta

    @classmethod
    def load(cls, folder: str | Path, kind: str) -> ItemIndex:
        """The index ``index-KIND`` saved in ``folder`` (one line naming what is wrong otherwise)."""
        faiss = _faiss()
        folder = Path(folder)
        stem = f"index-{check_kind(kind)}"
        meta_path = folder / f"{stem}.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise UserError(f"{meta_path}: no saved {kind} index") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{meta_path}: unreadable ({exc})") from None
        if meta.get("format") != FORMAT or meta.get("kind") != kind:
            raise UserError(f"{meta_path}: not a format-{FORMAT} {kind} index")
        params = {k: meta[k] for k in ("m", "ef_construction", "ef_search", "nlist", "nprobe") if k in meta}
        out = cls(kind, int(meta["dim"]), metric=meta.get("metric", "cosine"), max_norm=meta.get("max_norm"),
                  **params)
        try:
            out._index = faiss.read_index(str(folder / f"{stem}.faiss"))
            out.rows = load_file(str(folder / f"{stem}.rows.safetensors"))["rows"].astype(np.int64)
        except Exception as exc:  # noqa: BLE001 - FAISS raises RuntimeError on a damaged file
            raise UserError(f"{folder / stem}: unreadable index ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if (out._index.ntotal != len(out) or len(out) != int(meta.get("count", -1))
                or out._index.d != out._width):
            raise UserError(f"{folder / stem}: the index holds {out._index.ntotal} vectors of width "
                            f"{out._index.d}, its files say {meta.get('count')} of {out._width}")
        if kind == "hnsw":
            out._index.hnsw.efSearch = out.params["ef_search"]
        else:
            out._index.nprobe = min(out.params["nprobe"] or out._index.nlist, out._index.nlist)
        return out
