"""Using a trained model: item embeddings from raw content, top-k recommendations for histories.

:class:`Recommender` wraps an export (full or adapter, from any ZeRO stage: the export folder hides
that) and keeps a *pool* of candidate items, each an id with its embedding. Items join the pool from

- a shards dataset (``add_items(data=DIR)``): its item cache, encoded by
  :func:`~transrec.inference.scoring.encode_catalogue` in ``eval.item_chunk`` chunks, so the
  embeddings are those ``transrec eval`` ranks against;
- a catalogue folder (``add_items(catalogue=DIR)``): ``items.csv`` (or ``.tsv`` / ``.jsonl``) with
  an item column and a title and/or image column, plus an optional ``images/`` folder, read by the
  same code as ``transrec shards build`` (an item with a readable image is an image item, else a
  text item);
- raw content with ids (``add_items(titles=[...], images=[...], ids=[...])``).

Raw content goes through the item cache's own preprocessing (:func:`~transrec.shards.cache.tokenize_titles`
with the export's tokenizer and ``model.text.max_len``; :func:`~transrec.shards.cache.prepare_image` at
``model.image.image_size``) into an in-memory :class:`~transrec.shards.batch.ArrayContent`, then through
``encode_catalogue`` like a dataset: one code path for every item. Embeddings are cached per content
(a hash of the title or of the prepared pixels), so an item is encoded once however often it is added
or named in a history.

A user is the last ``data.max_len`` items of their history (the evaluation window), right-aligned as
the evaluation batches are; scores are ``user · item`` after L2 normalisation when
``model.loss.l2_normalize`` is set. :meth:`Recommender.recommend_many` and :meth:`Recommender.evaluate`
score ``eval.batch_size`` users at a time through :func:`~transrec.inference.scoring.score_catalogue`,
the pass ``transrec eval`` ranks with: ``score_chunk`` candidates per product, so memory stays bounded
however large the pool, and the same masking and tie rule (:mod:`transrec.inference.metrics`).
Histories may mix pool ids and raw content (``{"title": ...}`` / ``{"image": path | PIL image |
uint8 array}``).

Reading histories and writing recommendations to files: :mod:`transrec.inference.histories`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transrec.errors import UserError
from transrec.inference.ann import ItemIndex, check_kind, fetch_size
from transrec.inference.metrics import DEFAULT_KS, ranking_metrics
from transrec.inference.scoring import (
    SCORE_CHUNK,
    Ranking,
    cosine_scores,
    encode_catalogue,
    item_keys,
    score_catalogue,
    score_matrix,
    user_states,
)
from transrec.inference.vectors import export_fingerprint, read_vectors, write_vectors
from transrec.models.content import open_data
from transrec.models.export import export_config, read_export
from transrec.models.sequential import SequentialRecommender, content_spec
from transrec.shards.batch import IMAGE, TEXT, ArrayContent
from transrec.shards.build import read_items
from transrec.shards.cache import load_tokenizer, prepare_image, tokenize_titles
from transrec.shards.format import unsanitize_key
from transrec.shards.stats import SkipStats

CATALOGUE_TABLES = ("items.csv", "items.tsv", "items.jsonl")


@dataclass
class Recommendations:
    """Top-k of one user: ``ids[i]`` scored ``scores[i]``, best first."""

    ids: list[str]
    scores: list[float]

    def __repr__(self) -> str:
        shown = ", ".join(f"{i}:{s:.3f}" for i, s in zip(self.ids[:5], self.scores[:5]))
        more = f", ... {len(self.ids)} in all" if len(self.ids) > 5 else ""
        return f"Recommendations([{shown}{more}])"

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Raw:
    """One item given by its content: modality, the prepared content and its cache key."""

    modality: int
    title: str | None = None
    pixels: np.ndarray | None = None
    key: str = field(default="")


def _device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Recommender:
    """Top-k recommendation from a trained model (see the module docstring).

    >>> rec = Recommender.from_export("exports/pre")              # doctest: +SKIP
    >>> rec.add_items(data="data/source")                      # doctest: +SKIP
    >>> rec.recommend(["s-i000001", {"title": "red striped bold"}], k=5)  # doctest: +SKIP
    """

    def __init__(self, model: SequentialRecommender, cfg, *, device="cpu", source: str = "",
                 score_chunk: int = SCORE_CHUNK, item_ids: Sequence[str] | None = None,
                 index: str = "exact", index_options: dict | None = None):
        if int(score_chunk) < 1:
            raise UserError(f"score_chunk must be at least 1, got {score_chunk}")
        # top-k retrieval: "exact" scores every candidate; "hnsw" / "ivf" search a FAISS index over
        # the scoring vectors (built on first use, kept up to date as items join)
        self.index = check_kind(index)
        self._index_options = dict(index_options or {})
        self._ann: ItemIndex | None = None
        self._in_index = np.zeros(0, dtype=bool)  # table row -> in the ANN index
        self._fingerprint: str | None = None
        self.device = _device(device)
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.source = source
        self.kind = cfg.model.kind
        self.history_len = int(cfg.data.max_len)
        self.chunk = int(cfg.eval.item_chunk)
        self.batch_size = int(cfg.eval.batch_size)
        self.score_chunk = int(score_chunk)  # candidates per scoring product
        self.l2 = cosine_scores(self.model)
        self._spec = content_spec(cfg.model) if self.kind != "id" else None
        self._tok = None
        self._rows: list[torch.Tensor] = []  # embedding blocks, [n_i, d] float32 on the device
        self._n = 0
        self._table: torch.Tensor | None = None  # cat of _rows, rebuilt when rows are added
        self._keys: torch.Tensor | None = None  # item_keys of the table (normalised once for cosine)
        self._by_key: dict[str, int] = {}  # content key -> row
        self._pool: dict[str, int] = {}  # item id -> row (insertion order = pool order)
        self._pool_cache: tuple[list[str], torch.Tensor] | None = None
        self._ann_cache: tuple | None = None  # (index synced with the pool, _pool_columns(None))
        # The hybrid (model.item.id_residual): item id -> row of the model's per-item vectors, for
        # the items of its training catalogue that training saw; every other item is its content.
        self._own: dict[str, int] = {}
        table = getattr(self.model, "item_residual", None)
        if table is not None:
            ids = list(item_ids or [])
            if len(ids) != int(table.weight.shape[0]):
                raise UserError(f"{source or 'the model'}: the per-item vectors need the ids of the "
                                f"{int(table.weight.shape[0])} items they were trained on (the export's "
                                f"export.json item_ids has {len(ids)}); export the run again")
            seen = self.model.item_seen.cpu().numpy()
            self._own = {str(i): r for r, i in enumerate(ids) if seen[r]}

    @classmethod
    def from_export(cls, path: str | Path, device=None, *, score_chunk: int = SCORE_CHUNK,
                    index: str = "exact", index_options: dict | None = None) -> Recommender:
        """The export's model (full or adapter export) on ``device`` (default: CUDA when present);
        ``score_chunk``: candidates scored per product (memory: ``eval.batch_size × score_chunk``
        float32 scores at a time); ``index``: ``exact``, ``hnsw`` or ``ivf`` top-k retrieval
        (:mod:`transrec.inference.ann`; ``index_options``: its parameters, e.g. ``ef_search``)."""
        check_kind(index)
        meta = read_export(path)
        cfg = export_config(path)
        model = SequentialRecommender.from_export(path)
        return cls(model, cfg, device=device, source=str(path), score_chunk=score_chunk,
                   item_ids=meta.get("item_ids"), index=index, index_options=index_options)

    def __repr__(self) -> str:
        return (f"Recommender({self.source!r}, kind={self.kind}, items={len(self._pool)}, "
                f"index={self.index}, device={self.device.type})")

    # -- the pool -------------------------------------------------------------------------------
    @property
    def item_ids(self) -> list[str]:
        """Ids of the candidate pool, in the order they joined."""
        return list(self._pool)

    def __len__(self) -> int:
        return len(self._pool)

    def __contains__(self, item_id) -> bool:
        return str(item_id) in self._pool

    def _add_rows(self, emb: torch.Tensor) -> np.ndarray:
        rows = np.arange(self._n, self._n + emb.shape[0])
        self._rows.append(emb.float().to(self.device))
        self._n += int(emb.shape[0])
        self._table = self._keys = None
        return rows

    def _all(self) -> torch.Tensor:
        if self._table is None:
            if not self._rows:
                raise UserError("no items yet: add_items(data=DIR | catalogue=DIR | titles/images + ids)")
            self._table = torch.cat(self._rows) if len(self._rows) > 1 else self._rows[0]
            self._rows = [self._table]
        return self._table

    def _join(self, ids: Sequence[str], rows: np.ndarray) -> np.ndarray:
        """Put ``ids`` in the pool at the content rows ``rows``; with the hybrid, an id the model
        trained a vector for gets a row of its own, content + vector. Returns the rows used."""
        ids = [str(i) for i in ids]
        rows = np.asarray(rows, dtype=np.int64).copy()
        own = [(j, self._own[i]) for j, i in enumerate(ids) if i in self._own]
        if own:
            at = np.asarray([j for j, _ in own], dtype=np.int64)
            weight = self.model.item_residual.weight
            with torch.no_grad():
                vec = weight[torch.as_tensor([r for _, r in own], dtype=torch.long, device=weight.device)]
                content = self._all()[torch.as_tensor(rows[at], device=self.device)]
                rows[at] = self._add_rows(content + vec.float().to(self.device))
        for i, r in zip(ids, rows.tolist()):
            self._pool[i] = int(r)
        self._pool_cache = self._ann_cache = None
        return rows

    def _candidates(self, ids: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor]:
        """(ids, rows of the table) of the pool or of ``ids`` (each must be in the pool)."""
        if ids is None:
            if self._pool_cache is None:
                self._pool_cache = (list(self._pool), torch.tensor(list(self._pool.values()),
                                                                   dtype=torch.long, device=self.device))
            return self._pool_cache
        ids = [str(i) for i in ids]
        return ids, torch.tensor([self._row_of(i) for i in ids], dtype=torch.long, device=self.device)

    def _row_of(self, item_id: str) -> int:
        r = self._pool.get(str(item_id))
        if r is None:
            raise UserError(f"unknown item id {item_id!r} (not in the {len(self._pool)} encoded items; "
                            "add it with add_items)")
        return r

    # -- vectors --------------------------------------------------------------------------------
    @property
    def metric(self) -> str:
        """``cosine`` (users and items L2-normalised before the product) or ``dot``."""
        return "cosine" if self.l2 else "dot"

    def _item_keys(self) -> torch.Tensor:
        table = self._all()
        if self._keys is None:
            self._keys = item_keys(table, self.l2)
        return self._keys

    def vectors(self, ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
        """``(ids, [n, d] float32)``: the scoring vectors of the pool (or of ``ids``), the rows a user
        vector is scored against (unit rows for a cosine model), bit for bit."""
        cand_ids, rows = self._candidates(ids)
        return list(cand_ids), self._item_keys()[rows].cpu().numpy()

    def embeddings(self, ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
        """``(ids, [n, d] float32)``: the item embeddings the user encoder reads for the pool (or
        ``ids``): content embedding, plus the per-item vector of a hybrid model's trained items."""
        cand_ids, rows = self._candidates(ids)
        return list(cand_ids), self._all()[rows].cpu().numpy()

    def add_vectors(self, ids: Sequence[str], embeddings) -> None:
        """Add items to the pool by their embeddings ``[n, d]`` (what :meth:`embeddings` returns: the
        user encoder's input rows, a hybrid item's per-item vector already in), no encoder run."""
        ids = [str(i) for i in ids]
        emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        dim = int(self.cfg.model.dim)
        if emb.ndim != 2 or emb.shape[0] != len(ids) or emb.shape[1] != dim:
            raise UserError(f"add_vectors: {list(emb.shape)} embeddings for {len(ids)} ids; the model's "
                            f"items have dimension {dim}")
        if len(set(ids)) != len(ids):
            raise UserError("add_vectors: an id is given twice")
        if not bool(torch.isfinite(emb).all()):
            raise UserError("add_vectors: embeddings hold NaN or inf")
        rows = self._add_rows(emb)
        for i, r in zip(ids, rows.tolist()):
            self._pool[i] = int(r)
        self._pool_cache = self._ann_cache = None

    def _export_fingerprint(self) -> str:
        if self._fingerprint is None:
            if not self.source or not Path(self.source, "export.json").is_file():
                raise UserError("item vectors are tied to an export: make the Recommender with "
                                "Recommender.from_export")
            self._fingerprint = export_fingerprint(self.source)
        return self._fingerprint

    def save_vectors(self, out: str | Path, *, parquet: bool = False) -> dict:
        """Write the pool's vectors to the folder ``out`` (:mod:`transrec.inference.vectors`), with
        this Recommender's ANN index when it has one (built now if not yet); returns vectors.json."""
        ids, vectors = self.vectors()
        emb = self.embeddings()[1] if self.l2 else None
        index = None
        if self.index != "exact":  # an index over the file's rows (positions in ids)
            index = ItemIndex(self.index, vectors.shape[1], metric=self.metric, **self._index_options)
            index.add(vectors, np.arange(len(ids)))
        return write_vectors(out, ids, vectors, emb, metric=self.metric, export=self.source,
                             fingerprint=self._export_fingerprint(), model_kind=self.kind,
                             own_vectors=sum(i in self._own for i in ids), parquet=parquet, index=index)

    def load_vectors(self, folder: str | Path) -> int:
        """Add the items of a vectors folder made with this export (every file's hash and the
        export's fingerprint checked); a saved index of this Recommender's kind is loaded with them,
        else the index is built on first use. Returns the number of items added."""
        ids, vectors, emb, meta = read_vectors(folder, fingerprint=self._export_fingerprint())
        if meta.get("metric") != self.metric:
            raise UserError(f"{folder}: vectors for {meta.get('metric')} scoring, this model scores by "
                            f"{self.metric}")
        start = self._n
        self.add_vectors(ids, emb if emb is not None else vectors)
        if not torch.equal(self._item_keys()[start:start + len(ids)].cpu(), torch.from_numpy(vectors)):
            raise UserError(f"{folder}: the stored scoring vectors differ from the embeddings' own; "
                            "make the folder again with transrec vectors")
        if self.index != "exact" and meta.get("index", {}).get("kind") == self.index and self._ann is None:
            ann = ItemIndex.load(folder, self.index)
            ann.set_search(**{k: v for k, v in self._index_options.items() if k in ("ef_search", "nprobe")})
            ann.rows = ann.rows + start
            self._ann = ann
            self._in_index = np.zeros(self._n, dtype=bool)
            self._in_index[ann.rows] = True
        return len(ids)

    # -- encoding -------------------------------------------------------------------------------
    def add_items(self, titles: Sequence[str] | None = None, images: Sequence | None = None, *,
                     ids: Sequence[str] | None = None, catalogue: str | Path | None = None,
                     data: str | Path | None = None, progress: bool | None = None) -> torch.Tensor:
        """Add items to the candidate pool from their content; returns their embeddings ``[n, d]``
        (float32, as the model outputs them), in order.

        - ``data=DIR``: every item of a shards dataset (items whose content was bad are left out);
        - ``catalogue=DIR``: ``items.csv|tsv|jsonl`` + optional ``images/`` (the ``shards build`` layout);
        - ``titles`` then ``images`` (paths, PIL images or uint8 arrays ``[H, W, 3]`` / ``[3, H, W]``).

        Items with ids (a dataset's, a catalogue's, or ``ids`` for raw content: one per title, then
        one per image) join the candidate pool; an id given again with other content is replaced.
        Raw content without ids is encoded (and cached) but does not join the pool.
        ``progress``: a bar while encoding (default: for jobs over 4 chunks).
        """
        given = [x is not None for x in (data, catalogue)]
        if sum(given) + bool(titles or images) > 1:
            raise UserError("add_items takes one of: data=DIR, catalogue=DIR, or titles/images")
        if data is not None:
            return self._encode_dataset(data, progress)
        if catalogue is not None:
            item_ids, raws = self._read_catalogue(catalogue)
        else:
            raws = [self._raw_title(t) for t in (titles or [])] + [self._raw_image(x) for x in (images or [])]
            if not raws:
                raise UserError("add_items got no items (titles, images, catalogue= or data=)")
            item_ids = None
            if ids is not None:
                item_ids = [str(i) for i in ids]
                if len(item_ids) != len(raws):
                    raise UserError(f"ids: {len(item_ids)} ids for {len(raws)} items (titles, then images)")
        rows = self._encode_raw(raws, progress)
        if item_ids is not None:
            rows = self._join(item_ids, rows)
        return self._all()[torch.as_tensor(rows, device=self.device)]

    def _encode_dataset(self, data, progress) -> torch.Tensor:
        ds, content = open_data(self.cfg, str(data), show=bool(progress))
        if self.kind == "id":
            n_known = int(self.model.n_items)
            if ds.n_items != n_known:
                raise UserError(f"{data}: the ID model knows {n_known} items, this dataset has {ds.n_items}; "
                                "an ID model recommends from its own catalogue only")
        show = progress if progress is not None else ds.n_items > 4 * self.chunk
        emb = encode_catalogue(self.model, content, chunk=self.chunk, device=self.device, show=show,
                               content_only=True)
        rows = self._add_rows(emb)
        valid = np.asarray(getattr(content, "valid", np.ones(ds.n_items, dtype=bool)), dtype=bool)
        ids = [unsanitize_key(k) for k in ds.item_ids]
        keep = np.flatnonzero(valid)
        rows[keep] = self._join([ids[i] for i in keep], rows[keep])
        return self._all()[torch.as_tensor(rows, device=self.device)]

    def _need_content(self, what: str) -> None:
        if self.kind == "id":
            raise UserError(f"{what}: an ID model has no content encoder; it scores its own dataset's "
                            "items only (add_items(data=DIR))")

    def _tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self._spec["tokenizer"])
        return self._tok

    def _raw_title(self, title) -> _Raw:
        self._need_content("a title")
        t = str(title).strip()
        if not t:
            raise UserError("an empty title cannot be encoded")
        return _Raw(TEXT, title=t, key="t:" + hashlib.sha1(t.encode()).hexdigest())

    def _raw_image(self, image) -> _Raw:
        self._need_content("an image")
        size = int(self._spec["image_size"])
        if isinstance(image, str | Path):
            p = Path(image)
            try:
                with Image.open(p) as im:
                    pix = prepare_image(im, size)
            except FileNotFoundError:
                raise UserError(f"{p}: image not found") from None
            except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt data
                raise UserError(f"{p}: unreadable image ({type(exc).__name__})") from None
        elif isinstance(image, Image.Image):
            pix = prepare_image(image, size)
        else:
            a = np.asarray(image)
            if a.dtype != np.uint8 or a.ndim not in (2, 3):
                raise UserError(f"an image array must be uint8 [H, W], [H, W, 3] or [3, H, W], got "
                                f"{a.dtype} {list(a.shape)}")
            if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
                a = a.transpose(1, 2, 0)
            pix = prepare_image(Image.fromarray(np.ascontiguousarray(a.squeeze(-1) if a.ndim == 3
                                                                     and a.shape[-1] == 1 else a)), size)
        return _Raw(IMAGE, pixels=pix, key="i:" + hashlib.sha1(pix.tobytes()).hexdigest())

    def _raw_of(self, entry: dict) -> _Raw:
        if "title" in entry and entry["title"] is not None:
            return self._raw_title(entry["title"])
        if "image" in entry and entry["image"] is not None:
            return self._raw_image(entry["image"])
        raise UserError(f"an item must be an id, {{'title': ...}} or {{'image': ...}}; got {entry!r}")

    def _encode_raw(self, raws: list[_Raw], progress) -> np.ndarray:
        """Rows of the table for ``raws``, encoding the ones not seen before (in first-seen order)."""
        todo: dict[str, _Raw] = {}
        for r in raws:
            if r.key not in self._by_key and r.key not in todo:
                todo[r.key] = r
        if todo:
            new = list(todo.values())
            mod = np.asarray([r.modality for r in new], dtype=np.int8)
            is_text = mod == TEXT
            row = np.zeros(len(new), dtype=np.int64)
            row[is_text] = np.arange(int(is_text.sum()))
            row[~is_text] = np.arange(int((~is_text).sum()))
            tokens = lengths = images = None
            if is_text.any():
                titles = [r.title for r in new if r.modality == TEXT]
                tokens, lengths = tokenize_titles(self._tokenizer(), titles, int(self._spec["max_text_len"]))
            if (~is_text).any():
                images = np.stack([r.pixels for r in new if r.modality == IMAGE])
            content = ArrayContent(mod, row, tokens, lengths, images)
            show = progress if progress is not None else len(new) > 4 * self.chunk
            emb = encode_catalogue(self.model, content, chunk=self.chunk, device=self.device, show=show,
                                   content_only=True)
            for r, i in zip(new, self._add_rows(emb).tolist()):
                self._by_key[r.key] = i
        return np.asarray([self._by_key[r.key] for r in raws], dtype=np.int64)

    def _read_catalogue(self, folder) -> tuple[list[str], list[_Raw]]:
        self._need_content("a catalogue")
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{folder}: catalogue folder not found")
        table = next((folder / n for n in CATALOGUE_TABLES if (folder / n).is_file()), None)
        img_dir = folder / "images" if (folder / "images").is_dir() else None
        if table is None and img_dir is None:
            raise UserError(f"{folder}: no {' / '.join(CATALOGUE_TABLES)} and no images/ folder")
        stats = SkipStats(where=f"catalogue {folder}")
        ids, raws = [], []
        for rec in read_items(table, img_dir, stats):
            raw = None
            if rec.image is not None:
                try:
                    raw = self._raw_image(rec.image)
                except UserError as exc:
                    stats.skip("missing_image" if "not found" in str(exc) else "corrupt_image", str(exc))
            if raw is None and (rec.title or "").strip():
                raw = self._raw_title(rec.title)
            if raw is None:
                if rec.image is None:
                    stats.skip("empty_title", f"item {rec.id}")
                continue
            ids.append(rec.id)
            raws.append(raw)
        if not raws:
            raise UserError(f"{folder}: no item with usable content")
        return ids, raws

    # -- scoring --------------------------------------------------------------------------------
    def _history_rows(self, histories: Sequence[Sequence]) -> list[list[int]]:
        """Rows of the table for every history entry (raw content encoded in one pass)."""
        raws: list[_Raw] = []
        where: list[tuple[int, int]] = []
        out: list[list[int]] = []
        for u, hist in enumerate(histories):
            if isinstance(hist, str | dict):
                raise UserError("a history is a list of items (ids or {'title'|'image': ...})")
            rows = []
            for j, e in enumerate(hist):
                if isinstance(e, dict) and "id" not in e:
                    raws.append(self._raw_of(e))
                    where.append((u, j))
                    rows.append(-1)
                else:
                    rows.append(self._row_of(e["id"] if isinstance(e, dict) else e))
            if not rows:
                raise UserError(f"history {u}: empty (a user needs at least one item)")
            out.append(rows)
        if raws:
            for (u, j), r in zip(where, self._encode_raw(raws, False).tolist()):
                out[u][j] = r
        return out

    def _users(self, rows: list[list[int]], table: torch.Tensor) -> torch.Tensor:
        """User states ``[B, d]`` (float32): the last ``data.max_len`` items, right-aligned."""
        length = self.history_len
        idx = torch.full((len(rows), length), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            r = r[-length:]
            idx[i, length - len(r):] = torch.as_tensor(r, dtype=torch.long)
        idx = idx.to(self.device)
        return user_states(self.model, table, idx, idx >= 0)

    def _history_pairs(self, rows: list[list[int]], cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(user row, candidate column) of every candidate a history item's table row backs, on the
        device: every id of that content (two ids given one title share a row), as the index does."""
        cand_rows = cand.cpu().numpy()
        order = np.argsort(cand_rows, kind="stable")
        ordered = cand_rows[order]
        flat = np.asarray([x for r in rows for x in r], dtype=np.int64)
        lo, hi = np.searchsorted(ordered, flat, "left"), np.searchsorted(ordered, flat, "right")
        counts = hi - lo
        users = np.repeat(np.asarray([u for u, r in enumerate(rows) for _ in r], dtype=np.int64), counts)
        ends = np.cumsum(counts)
        cols = order[np.repeat(lo, counts) + np.arange(int(ends[-1]) if len(ends) else 0)
                     - np.repeat(ends - counts, counts)]
        cols = np.ascontiguousarray(cols)
        return torch.from_numpy(users).to(self.device), torch.from_numpy(cols).to(self.device)

    def _score_batch(self, rows: list[list[int]], cand: torch.Tensor, *, exclude_history: bool,
                     **kw) -> Ranking:
        """:func:`~transrec.inference.scoring.score_catalogue` of the users ``rows`` against ``cand``."""
        table = self._all()
        if self._keys is None:
            self._keys = item_keys(table, self.l2)
        whole = cand.shape[0] == table.shape[0] and bool(
            torch.equal(cand, torch.arange(cand.shape[0], device=cand.device)))
        return score_catalogue(self._users(rows, table), self._keys, l2=self.l2, normalized=True,
                               chunk=self.score_chunk, columns=None if whole else cand,
                               masked=self._history_pairs(rows, cand) if exclude_history else None, **kw)

    def recommend(self, history: Sequence, k: int = 10, *, exclude_history: bool = True,
                  candidates: Sequence[str] | None = None) -> Recommendations:
        """Top ``k`` of the pool (or of ``candidates``, ids in the pool) for one history."""
        return self.recommend_many([history], k, exclude_history=exclude_history, candidates=candidates)[0]

    @torch.no_grad()
    def recommend_many(self, histories: Sequence[Sequence], k: int = 10, *, exclude_history: bool = True,
                       candidates: Sequence[str] | None = None) -> list[Recommendations]:
        """:meth:`recommend` for many histories, ``eval.batch_size`` users per pass and ``score_chunk``
        candidates per product; equal scores in pool order."""
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        cand_ids, cand = self._candidates(candidates)
        if not cand_ids:
            raise UserError("no candidate items")
        if self.index != "exact" and (candidates is None or len(cand_ids) > self.score_chunk):
            return self._recommend_ann(histories, k, exclude_history=exclude_history,
                                       candidates=None if candidates is None else cand_ids)
        return self._recommend_exact(histories, k, exclude_history=exclude_history, cand_ids=cand_ids,
                                     cand=cand)

    def _recommend_exact(self, histories, k: int, *, exclude_history: bool, cand_ids: list[str],
                         cand: torch.Tensor) -> list[Recommendations]:
        out: list[Recommendations] = []
        for lo in range(0, len(histories), self.batch_size):
            rows = self._history_rows(histories[lo:lo + self.batch_size])
            res = self._score_batch(rows, cand, exclude_history=exclude_history, k=k)
            top, at = res.top_scores.cpu(), res.top_columns.cpu()
            for i in range(top.shape[0]):
                keep = torch.isfinite(top[i])
                out.append(Recommendations([cand_ids[j] for j in at[i][keep].tolist()],
                                           top[i][keep].tolist()))
        return out

    # -- approximate top-k ------------------------------------------------------------------------
    def _ann_index(self) -> ItemIndex:
        """The ANN index with every pool row in it (rows that joined since the last call added)."""
        keys = self._item_keys()
        if self._ann is None:
            self._ann = ItemIndex(self.index, int(keys.shape[1]), metric=self.metric, **self._index_options)
        if self._in_index.shape[0] < self._n:
            grow = np.zeros(self._n - self._in_index.shape[0], dtype=bool)
            self._in_index = np.concatenate([self._in_index, grow])
        rows = np.unique(np.fromiter(self._pool.values(), dtype=np.int64, count=len(self._pool)))
        todo = rows[~self._in_index[rows]]
        if todo.size:
            self._ann.add(keys[torch.as_tensor(todo, device=keys.device)].cpu().numpy(), todo)
            self._in_index[todo] = True
        return self._ann

    def _pool_columns(self, cand_ids: list[str] | None) -> tuple[list[str], np.ndarray, dict[int, list[int]]]:
        """(ids, first, more) of the candidates: ``first[row]`` is the first candidate column a table
        row backs (-1: none), ``more[row]`` every column of a row that backs several ids (two ids
        given the same content), in pool order."""
        ids, rows = self._candidates(cand_ids)
        rows = rows.cpu().numpy()
        first = np.full(self._n, -1, dtype=np.int64)
        first[rows[::-1]] = np.arange(len(rows) - 1, -1, -1)  # the lowest column wins
        more: dict[int, list[int]] = {}
        if len(np.unique(rows)) < len(rows):
            for c, r in enumerate(rows.tolist()):
                more.setdefault(r, []).append(c)
            more = {r: cs for r, cs in more.items() if len(cs) > 1}
        return ids, first, more

    def _recommend_ann(self, histories, k: int, *, exclude_history: bool,
                       candidates: list[str] | None) -> list[Recommendations]:
        """Top ``k`` by the ANN index: ask for more neighbours than ``k`` (history and non-candidates
        are filtered after the search), and again with four times as many for a user left short; a
        user still short when the whole index was asked for (a graph search need not reach every
        item) is scored exactly."""
        if self._ann_cache is None:  # the pool changed: new rows into the index, the column map anew
            self._ann_cache = (self._ann_index(), self._pool_columns(None))
        index = self._ann_cache[0]
        ids, first, more = self._pool_columns(candidates) if candidates is not None else self._ann_cache[1]
        n = len(index)
        out: list[Recommendations] = []
        for lo in range(0, len(histories), self.batch_size):
            rows = self._history_rows(histories[lo:lo + self.batch_size])
            with torch.no_grad():
                users = item_keys(self._users(rows, self._all()), self.l2).cpu().numpy()
            width = max(len(r) for r in rows) if exclude_history else 0
            hist = np.full((len(rows), max(width, 1)), -2, dtype=np.int64)  # -2: no row
            if exclude_history:
                for u, r in enumerate(rows):
                    hist[u, :len(r)] = r
            fetch = fetch_size(k, width, n)
            if candidates is not None:  # a subset: its share of the index decides how far to look
                fetch = min(n, int(fetch * max(1.0, n / max(len(ids), 1))))
            result: list[Recommendations | None] = [None] * len(rows)
            todo = np.arange(len(rows))
            while todo.size and fetch <= n:
                scores, found = index.search(users[todo], fetch)
                cols = np.where(found >= 0, first[np.clip(found, 0, None)], -1)
                keep = (cols >= 0) & ~(found[:, :, None] == hist[todo][:, None, :]).any(-1)
                short = []
                for j, u in enumerate(todo.tolist()):
                    at = np.flatnonzero(keep[j])
                    if more and any(int(found[j, a]) in more for a in at[:k]):
                        got = [(c, float(scores[j, a])) for a in at for c in more.get(int(found[j, a]),
                                                                                       [int(cols[j, a])])][:k]
                    else:
                        got = [(int(cols[j, a]), float(scores[j, a])) for a in at[:k]]
                    if len(got) < k:
                        short.append(u)
                    else:
                        result[u] = Recommendations([ids[c] for c, _ in got], [x for _, x in got])
                todo, fetch = np.asarray(short, dtype=np.int64), (min(n, fetch * 4) if fetch < n else n + 1)
            if todo.size:
                batch = histories[lo:lo + self.batch_size]
                cand_ids, cand = self._candidates(candidates)
                exact = self._recommend_exact([batch[u] for u in todo.tolist()], k,
                                              exclude_history=exclude_history, cand_ids=cand_ids, cand=cand)
                for u, r in zip(todo.tolist(), exact):
                    result[u] = r
            out.extend(r for r in result if r is not None)
        return out

    @torch.no_grad()
    def evaluate(self, histories: Sequence[Sequence], targets: Sequence[str], ks=DEFAULT_KS, *,
                 exclude_history: bool = True, candidates: Sequence[str] | None = None) -> dict:
        """Full-ranking HR@K, NDCG@K and MRR of ``targets[u]`` (pool ids) after ``histories[u]``,
        ranked among the pool (or ``candidates``) by the rule ``transrec eval`` uses: the history
        masked except the target itself (with ``exclude_history``), ties in a uniformly random order
        (:mod:`transrec.inference.metrics`). The keys are those of :func:`ranking_metrics`."""
        if len(histories) != len(targets):
            raise UserError(f"{len(histories)} histories but {len(targets)} targets")
        cand_ids, cand = self._candidates(candidates)
        column = {c: j for j, c in enumerate(cand_ids)}
        missing = [t for t in targets if str(t) not in column]
        if missing:
            raise UserError(f"target {missing[0]!r} is not among the {len(cand_ids)} candidates "
                            f"({len(missing)} targets are not)")
        ranks = []
        nonfinite = 0
        for lo in range(0, len(histories), self.batch_size):
            rows = self._history_rows(histories[lo:lo + self.batch_size])
            tgt = torch.tensor([column[str(t)] for t in targets[lo:lo + self.batch_size]], device=self.device)
            res = self._score_batch(rows, cand, exclude_history=exclude_history, targets=tgt)
            nonfinite += int(res.nonfinite)
            ranks.append(res.ranks)
        if nonfinite:
            raise UserError(f"evaluation refused: {nonfinite} scores are not finite (NaN or inf): the "
                            "model's weights have diverged")
        ranks_t = torch.cat(ranks) if ranks else torch.zeros(0, 2, dtype=torch.long)
        return ranking_metrics(ranks_t, ks)

    @torch.no_grad()
    def score(self, history: Sequence, items: Sequence) -> np.ndarray:
        """Scores ``[len(items)]`` of ``items`` (pool ids or raw content) for one history."""
        hist_rows = self._history_rows([history])
        raws = [self._raw_of(e) for e in items if isinstance(e, dict) and "id" not in e]
        raw_rows = iter(self._encode_raw(raws, False).tolist()) if raws else iter(())
        rows = [next(raw_rows) if isinstance(e, dict) and "id" not in e
                else self._row_of(e["id"] if isinstance(e, dict) else e) for e in items]
        table = self._all()
        users = self._users(hist_rows, table)
        return score_matrix(users, table[torch.as_tensor(rows, dtype=torch.long, device=self.device)],
                            l2=self.l2)[0].cpu().numpy()
