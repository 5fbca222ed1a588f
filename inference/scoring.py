"""Item embeddings, user states, and scoring users against a catalogue in bounded memory.

- :func:`encode_catalogue`: ``[n_items, d]`` float32 embeddings of every item of a content source
  (a dataset's item cache, in-memory :class:`~transrec.shards.batch.ArrayContent`, or item indices
  for the ID model), in eval mode, ``chunk`` items per encoder pass (one pass per modality per
  chunk). :func:`encode_chunks` encodes chosen chunks only; the evaluation of a multi-process run
  deals the chunks out over its ranks with it and gathers the embeddings.
- :func:`user_states`: ``[B, d]`` user states from histories given as rows of an embedding table.
- :func:`score_catalogue`: the one scoring pass that full-ranking evaluation (``transrec eval``),
  ``Recommender.recommend_many`` and ``Recommender.evaluate`` all use. Scores are ``user · item``,
  both L2-normalised first when the model's loss normalises them (cosine, as the loss scores),
  computed ``chunk`` candidates at a time, so at most ``[B, chunk]`` scores exist at once whatever
  the catalogue's size. Chunk by chunk it keeps

  - the top ``k`` with the history masked (``-inf``), merged across chunks; equal scores are ordered
    by candidate column, the lower first, so the result does not depend on the chunk;
  - the target's rank interval ``[1 + #strictly higher, that + #tied]`` with the history masked
    except the target (and, on request, with nothing masked): both counts are sums over chunks
    (:mod:`transrec.inference.metrics` turns intervals into metrics);
  - the number of non-finite scores, and the full unmasked score rows of chosen users (evaluation's
    ``distinct_scores`` sample).

  The target never competes with itself: its own column is left out of both counts. When the
  candidates fit in one chunk the target's score is read from the score matrix itself; over several
  chunks it is the same product taken over the targets' embeddings. A matrix product may round an
  element differently with the shape of its operands, so two items of equal content tie exactly in
  one chunk, and across chunks when the scores are exact (integer-valued embeddings, for instance).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

SCORE_CHUNK = 65536  # candidates scored per product: [B, 65536] float32 is 256 KiB per user


def unwrap(model):
    """The network inside a training wrapper (``.module``), or the model itself."""
    return getattr(model, "module", model)


def cosine_scores(model) -> bool:
    """Whether ``model`` scores with L2-normalised users and items (``model.loss.l2_normalize``)."""
    loss_cfg = getattr(getattr(unwrap(model), "cfg", None), "loss", None)
    return bool(loss_cfg is not None and loss_cfg.l2_normalize)


@contextlib.contextmanager
def eval_mode(net: torch.nn.Module) -> Iterator[None]:
    """``net`` in eval mode inside the block; every submodule gets its own mode back after it."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


# ----------------------------------------------------------------------------- items and users

@torch.no_grad()
def encode_chunks(model, content, starts: Sequence[int], *, chunk: int, device,
                  show: bool = False, before_chunk=None, content_only: bool = False) -> list[torch.Tensor]:
    """float32 embeddings of the items ``[s, s + chunk)`` (clipped to the catalogue) for each start
    ``s``, in eval mode; ``show``: a progress bar on stderr; ``before_chunk()``, when given, runs
    before each chunk (a caller's chance to stop: whatever it raises goes up). ``content_only``:
    without the hybrid's per-item vectors (``content``'s indices are not rows of the model's
    training catalogue)."""
    net = unwrap(model)
    n = int(content.n_items)
    outs = []
    extra = {"residual": False} if content_only and getattr(net, "item_residual", None) is not None else {}
    with eval_mode(net):
        for s in tqdm(starts, disable=not show, file=sys.stderr, dynamic_ncols=True, leave=False,
                      desc="encode items", unit="chunk"):
            if before_chunk is not None:
                before_chunk()
            items = np.arange(s, min(s + chunk, n), dtype=np.int64)
            text, image = content.gather(items)
            emb = net.encode_items(torch.from_numpy(items).to(device),
                                   text.to(device) if text is not None else None,
                                   image.to(device) if image is not None else None, **extra)
            outs.append(emb.float())
    return outs


@torch.no_grad()
def encode_catalogue(model, content, *, chunk: int, device, show: bool = True,
                     before_chunk=None, content_only: bool = False) -> torch.Tensor:
    """``[n_items, d]`` float32 embeddings of every item of ``content`` (eval mode, ``chunk`` items
    per encoder pass, in one process; ``before_chunk``, ``content_only`` as in :func:`encode_chunks`)."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    starts = list(range(0, int(content.n_items), chunk))
    return torch.cat(encode_chunks(model, content, starts, chunk=chunk, device=device, show=show,
                                   before_chunk=before_chunk, content_only=content_only))


@torch.no_grad()
def user_states(model, item_emb: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, d]`` float32 user states: the user encoder over ``item_emb[hist]`` (``hist`` ``[B, L]``
    rows of ``item_emb``, right-aligned; ``mask`` False at padding, whose rows are ignored)."""
    net = unwrap(model)
    emb = item_emb[hist.clamp(min=0)]
    param = next(net.parameters())
    return net.encode_users(emb.to(param.dtype), mask).float()


# ----------------------------------------------------------------------------- scores

@torch.no_grad()
def item_keys(items: torch.Tensor, l2: bool) -> torch.Tensor:
    """What users are scored against: ``items`` in float32, L2-normalised rows when ``l2``. A caller
    that scores many batches against one table prepares it once and passes ``normalized=True``."""
    items = items.float()
    return F.normalize(items, dim=-1) if l2 else items


def _products(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return queries @ keys.T


@torch.no_grad()
def score_matrix(users: torch.Tensor, items: torch.Tensor, *, l2: bool) -> torch.Tensor:
    """``[B, N]`` float32 scores of ``users`` ``[B, d]`` against ``items`` ``[N, d]`` in one product
    (``l2``: cosine), as :func:`score_catalogue` scores each of its chunks."""
    return _products(item_keys(users, l2), item_keys(items, l2))


@dataclass
class Ranking:
    """What :func:`score_catalogue` keeps of a batch of ``B`` users (tensors on the scores' device)."""

    top_scores: torch.Tensor | None  # [B, min(k, N)] float32, best first; masked items score -inf
    top_columns: torch.Tensor | None  # [B, min(k, N)] int64 candidate columns of top_scores
    ranks: torch.Tensor | None  # [B, 2] int64 target interval, history masked except the target
    unmasked_ranks: torch.Tensor | None  # [B, 2] int64 target interval, nothing masked
    nonfinite: torch.Tensor  # () int64: scores that are NaN or infinite (before masking)
    rows: torch.Tensor | None  # [len(keep_rows), N] float32 unmasked scores of keep_rows


def _top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row by (score descending, column ascending): values and columns.
    ``scores`` holds no NaN."""
    vals, cols = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1)
    # rows where the k-th score is shared beyond the k slots (the next one equals it): the lowest
    # columns among the tied win
    crowded = vals[:, k] == vals[:, k - 1] if vals.shape[1] > k else None
    vals, cols = vals[:, :k], cols[:, :k]
    thr = vals[:, -1:]
    if crowded is not None and bool(crowded.any()):
        sub = scores[crowded]
        t = thr[crowded]
        at = sub == t
        need = k - (sub > t).sum(dim=1, keepdim=True)
        chosen = (sub > t) | (at & (torch.cumsum(at, dim=1) <= need))
        sub_cols = chosen.nonzero()[:, 1].view(sub.shape[0], k)  # row-major: ascending columns
        cols = cols.clone()
        cols[crowded] = sub_cols
        vals = scores.gather(1, cols)
    # order by column, then (stably) by score: equal scores stay in column order
    by_col = torch.sort(cols, dim=1).indices
    vals, cols = vals.gather(1, by_col), cols.gather(1, by_col)
    by_val = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, by_val), cols.gather(1, by_val)


def _merge(best: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor],
           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of two ordered top lists, ``best`` holding the lower columns."""
    if best is None:
        return new
    vals = torch.cat([best[0], new[0]], dim=1)
    cols = torch.cat([best[1], new[1]], dim=1)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    return vals.gather(1, order), cols.gather(1, order)


def _count(s: torch.Tensor, ts: torch.Tensor, above: torch.Tensor, tied: torch.Tensor,
           own_rows: torch.Tensor, own_cols: torch.Tensor) -> None:
    """Add each row's scores strictly above and equal to its target's ``ts`` (in place); the
    target's own entry, at ``(own_rows, own_cols)`` where it is in this chunk, is not counted."""
    t = ts[:, None]
    above += (s > t).sum(dim=1)
    tied += (s == t).sum(dim=1)
    if own_rows.numel():
        v = s[own_rows, own_cols]
        above[own_rows] -= (v > ts[own_rows]).long()
        tied[own_rows] -= (v == ts[own_rows]).long()


def _target_scores(q: torch.Tensor, t_keys: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``[B]`` scores of each user's own target (``t_keys[b]``), by the product the chunks use."""
    return torch.cat([_products(q[lo:lo + block], t_keys[lo:lo + block]).diagonal()
                      for lo in range(0, q.shape[0], block)])


def _by_chunk(rows: torch.Tensor, cols: torch.Tensor, n: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    list[int]]:
    """``(rows, cols)`` pairs ordered by column, and where each chunk's pairs start (one more bound
    than there are chunks)."""
    order = torch.argsort(cols, stable=True)
    rows, cols = rows[order], cols[order]
    edges = torch.arange(0, n + chunk, chunk, device=cols.device).clamp(max=n)
    return rows, cols, torch.searchsorted(cols, edges).tolist()


@torch.no_grad()
def score_catalogue(users: torch.Tensor, items: torch.Tensor, *, l2: bool, chunk: int = SCORE_CHUNK,
                    normalized: bool = False, columns: torch.Tensor | None = None, k: int = 0,
                    masked: tuple[torch.Tensor, torch.Tensor] | None = None,
                    targets: torch.Tensor | None = None, unmasked_ranks: bool = False,
                    keep_rows: torch.Tensor | None = None) -> Ranking:
    """Score ``users`` ``[B, d]`` against every candidate, ``chunk`` candidates at a time (see the
    module docstring).

    - ``items``: an embedding table ``[M, d]``; the candidates are its rows ``columns`` (``[N]``, in
      that order), or every row (``N = M``). Candidate ``j`` is *column* ``j``.
    - ``l2``: cosine scores (both sides L2-normalised); ``normalized``: ``items`` is already
      :func:`item_keys` of the table, so its rows are not normalised again chunk by chunk.
    - ``k``: keep the top ``k`` of each user (0: none), the ``masked`` pairs scoring ``-inf``.
    - ``masked``: ``(rows, cols)`` pairs, user row and candidate column, of the history to mask.
    - ``targets``: ``[B]`` candidate columns whose rank intervals are counted: ``ranks`` with the
      masked pairs left out except the target itself, and with ``unmasked_ranks`` also
      ``unmasked_ranks``, among every candidate (without ``masked`` both are the latter).
    - ``keep_rows``: user rows whose full unmasked score rows are returned in ``rows``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if users.dim() != 2 or items.dim() != 2:
        raise ValueError(f"users and items must be [B, d] and [M, d], got {tuple(users.shape)} and "
                         f"{tuple(items.shape)}")
    device = users.device
    b = users.shape[0]
    n = int(columns.shape[0]) if columns is not None else int(items.shape[0])
    if n == 0:
        raise ValueError("no candidates to score")
    q = item_keys(users, l2)
    kk = min(int(k), n)

    def keys(sel) -> torch.Tensor:
        rows = items[columns[sel]] if columns is not None else items[sel]
        return rows if normalized else item_keys(rows, l2)

    m_rows = m_cols = r_rows = r_cols = None
    if masked is not None:
        m_rows, m_cols, m_at = _by_chunk(masked[0].to(device).long(), masked[1].to(device).long(), n, chunk)
    ts = None
    if targets is not None:
        targets = targets.to(device).long()
        user_rows = torch.arange(b, device=device)
        if n > chunk:  # several chunks: the targets' own scores first
            ts = _target_scores(q, keys(targets))
        zero = torch.zeros(b, dtype=torch.long, device=device)
        above, tied = zero.clone(), zero.clone()  # the masked pairs left out, the target kept
        above_all, tied_all = zero.clone(), zero.clone()  # nothing masked
        if m_rows is not None:  # a target consumed before stays in its own ranking
            not_target = m_cols != targets[m_rows]
            r_rows, r_cols, r_at = _by_chunk(m_rows[not_target], m_cols[not_target], n, chunk)
    nonfinite = torch.zeros((), dtype=torch.long, device=device)
    kept: list[torch.Tensor] = []
    best = None

    for c, lo in enumerate(range(0, n, chunk)):
        hi = min(lo + chunk, n)
        s = _products(q, keys(slice(lo, hi)))  # [B, hi - lo]
        finite = bool(torch.isfinite(s.sum()))  # a NaN or an infinity anywhere makes the sum one
        if not finite:
            nonfinite += (~torch.isfinite(s)).sum()
        if keep_rows is not None:
            kept.append(s[keep_rows])  # a copy: the masking below does not reach it
        if targets is not None:
            if ts is None:  # one chunk: the target's score as the matrix holds it
                ts = s[user_rows, targets]
            own = (targets >= lo) & (targets < hi)
            own_rows, own_cols = user_rows[own], targets[own] - lo
            if unmasked_ranks or r_rows is None:
                _count(s, ts, above_all, tied_all, own_rows, own_cols)
            if r_rows is not None:
                a, e = r_at[c], r_at[c + 1]
                s[r_rows[a:e], r_cols[a:e] - lo] = float("-inf")
                _count(s, ts, above, tied, own_rows, own_cols)
        if kk:
            if m_rows is not None:
                a, e = m_at[c], m_at[c + 1]
                s[m_rows[a:e], m_cols[a:e] - lo] = float("-inf")
            if not finite:
                s = s.masked_fill(torch.isnan(s), float("-inf"))
            vals, cols = _top(s, min(kk, hi - lo))
            best = _merge(best, (vals, cols + lo), kk)

    ranks = unmasked = None
    if targets is not None:
        if r_rows is None or unmasked_ranks:
            unmasked = torch.stack([above_all + 1, above_all + tied_all + 1], dim=1)
        ranks = torch.stack([above + 1, above + tied + 1], dim=1) if r_rows is not None else unmasked
    rows = torch.cat(kept, dim=1) if keep_rows is not None else None
    return Ranking(best[0] if best is not None else None, best[1] if best is not None else None,
                   ranks, unmasked, nonfinite, rows)
