"""Full-ranking evaluation: every item encoded once, every user scored against the whole catalogue.

1. The catalogue is encoded once per evaluation, in eval mode, in chunks of ``eval.item_chunk``
   items (one encoder pass per modality per chunk; :func:`transrec.inference.scoring.encode_chunks`).
   With several ranks the chunks are dealt out round-robin, padded so that every rank runs the same
   number of passes (ZeRO-3 gathers parameters collectively), and the embeddings are all-gathered:
   ``[n_items, d]`` on every rank.
2. Each evaluation batch holds a user's history and the held-out target in the last column; the
   user encoder reads the history and :func:`transrec.inference.scoring.score_catalogue` (the pass
   the Recommender scores with) scores the catalogue ``score_chunk`` items at a time on the device,
   masks the history and counts the target's rank interval ``[1 + #strictly higher, that + #tied]``
   chunk by chunk; the metrics are their exact expectations under a uniformly random order of tied
   items (:mod:`transrec.inference.metrics`), so ties never favour the target. A non-finite score
   (NaN compares false, so it would rank first) stops the evaluation with one line on every rank.
3. Ranks are gathered with their user ids and each user is counted once (a loader that repeats
   samples to give every rank the same number of batches would otherwise count some twice).
4. ``distinct_scores``: the median, over the first ``DISTINCT_SAMPLE`` users, of the fraction of
   catalogue scores that are distinct values. A healthy model scores nearly every item differently
   (duplicated content lowers it a little); a collapsed item tower (every embedding the same, a dead
   projection, an enormous temperature) scores them all alike. Below ``COLLAPSE_BELOW`` (or at two
   distinct values or fewer, for catalogues under a few hundred items) the evaluation logs one
   warning line: its metrics are then those of chance.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from transrec.engine import distributed as D
from transrec.engine.preempt import EvaluationAbandoned
from transrec.engine.tracking import progress, say
from transrec.errors import UserError
from transrec.inference import scoring
from transrec.inference.metrics import DEFAULT_KS, distinct_fraction, finalize, metric_sums
from transrec.inference.scoring import (
    SCORE_CHUNK,
    cosine_scores,
    encode_chunks,
    item_keys,
    score_catalogue,
    user_states,
)
from transrec.models.global_negatives import gather_ragged

DISTINCT_SAMPLE = 256  # users whose score rows are checked for ties (sorting every row costs more)
COLLAPSE_BELOW = 0.01  # distinct_scores under this: the item tower has collapsed


def collapse_warning(distinct: float, n_items: int) -> str | None:
    """The one warning line for a ``distinct_scores`` figure, or None when it is healthy."""
    if not distinct < max(COLLAPSE_BELOW, 2.5 / max(n_items, 1)):
        return None
    return (f"warning: the item tower has collapsed: only {distinct:.2%} of the {n_items} catalogue "
            f"scores per user are distinct (median), so the ranking is a coin toss among tied items "
            f"and the metrics are those of chance")


@torch.no_grad()
def encode_catalogue(model, content, *, chunk: int, device, show: bool = True,
                     should_stop=None, content_only: bool = False) -> torch.Tensor:
    """``[n_items, d]`` float32 embeddings of every item (eval mode, chunked, sharded over ranks):
    :func:`transrec.inference.scoring.encode_catalogue` in one process. ``should_stop()``, a
    collective poll (:class:`~transrec.engine.preempt.StopControl`), runs before every chunk on every
    rank; True abandons the encoding (:class:`~transrec.engine.preempt.EvaluationAbandoned`).
    ``content_only``: without the hybrid's per-item vectors (another catalogue's items)."""
    rank, world = D.rank(), D.world_size()
    check = _abandon_when(should_stop)
    if world == 1:
        return scoring.encode_catalogue(model, content, chunk=chunk, device=device, show=show,
                                        before_chunk=check, content_only=content_only)
    n = int(content.n_items)
    starts = list(range(0, n, chunk))
    per_rank = -(-len(starts) // world)
    mine = [starts[i] if i < len(starts) else starts[-1] for i in range(rank, per_rank * world, world)]
    outs = encode_chunks(model, content, mine, chunk=chunk, device=device, show=show and rank == 0,
                         before_chunk=check, content_only=content_only)
    # Gather every rank's chunks, then put them back in catalogue order.
    d = outs[0].shape[1]
    local = torch.zeros(per_rank, chunk, d, device=device)
    for i, e in enumerate(outs):
        local[i, : e.shape[0]] = e
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    full = torch.empty(n, d, device=device)
    for r in range(world):
        for i in range(per_rank):
            j = r + i * world
            if j < len(starts):
                s = starts[j]
                e = min(s + chunk, n)
                full[s:e] = gathered[r][i, : e - s]
    return full


def _abandon_when(should_stop):
    """A ``before_chunk``/per-batch check raising EvaluationAbandoned once ``should_stop()``."""
    if should_stop is None:
        return None

    def check() -> None:
        if should_stop():
            raise EvaluationAbandoned("the run was told to stop")

    return check


def protocol_prefix(exclude_history: bool) -> str:
    """The key prefix of a protocol's metrics when it is not the run's own (see :func:`split_metrics`)."""
    return "masked_" if exclude_history else "unmasked_"


@torch.no_grad()
def score_users(model, batch, item_emb: torch.Tensor) -> torch.Tensor:
    """``[B, n_items]`` scores from the history columns ``seq[:, :-1]`` of an evaluation batch, in
    one product (cosine when the loss normalises; :func:`split_metrics` scores in chunks instead)."""
    user = user_states(model, item_emb, batch.seq[:, :-1], batch.mask[:, :-1])
    return scoring.score_matrix(user, item_emb, l2=cosine_scores(model))


@torch.no_grad()
def split_metrics(model, loader, content, *, ks=DEFAULT_KS, item_chunk: int = 1024, device="cpu",
             max_users: int = 0, show: bool = True, item_emb: torch.Tensor | None = None,
             exclude_history: bool = True, score_chunk: int = SCORE_CHUNK, should_stop=None,
             keep: dict | None = None) -> dict:
    """HR@K, NDCG@K, MRR over the users ``loader`` yields (an evaluation-split SequenceLoader).

    ``exclude_history``: items the user already interacted with are removed from the ranking (this
    project's default), or ranked like any other item (the protocol RecBole uses for sequential
    models); the two give different numbers, so every result records which. The plain keys are
    the chosen protocol's; the same metrics under the other protocol come along with the prefix
    :func:`protocol_prefix` (``"unmasked_"`` or ``"masked_"``), from the same scores.
    ``score_chunk``: catalogue items scored per product (``[B, score_chunk]`` scores at a time).
    ``should_stop``: as in :func:`encode_catalogue`, polled before every chunk and every batch; an
    abandoned evaluation returns nothing and writes nothing. ``keep``: a dict that receives each
    evaluated user once, ``"users"`` ``[U]`` (dataset user indices, ascending) and ``"ranks"``
    ``[U, 2, 2]`` (the chosen protocol's then the other's target rank interval), on the CPU on
    every rank, for intervals over users."""
    with scoring.eval_mode(scoring.unwrap(model)):
        check = _abandon_when(should_stop)
        if item_emb is None:
            item_emb = encode_catalogue(model, content, chunk=item_chunk, device=device, show=show,
                                        should_stop=should_stop)
        rank, world = D.rank(), D.world_size()
        l2 = cosine_scores(model)
        keys = item_keys(item_emb, l2)  # what users are scored against, prepared once
        users, ranks, distinct = [], [], []
        seen = sampled = 0
        nonfinite = torch.zeros((), device=device)  # scores that are NaN/inf, checked once at the end
        for batch in progress(loader, enabled=show and rank == 0, desc="rank users", unit="batch"):
            if check is not None:
                check()
            valid = getattr(batch, "row_valid", None)  # filler rows that pad the last batches
            batch = batch.to(device)
            sample = None
            if sampled < DISTINCT_SAMPLE:  # full score rows of the first users, for distinct_scores
                sample = torch.arange(batch.seq.shape[0], device=device)
                if valid is not None:
                    sample = sample[valid.to(device)]
                sample = sample[: DISTINCT_SAMPLE - sampled]
            user = user_states(model, item_emb, batch.seq[:, :-1], batch.mask[:, :-1])
            history = (batch.hist_rows, batch.hist_items) if batch.hist_rows is not None else None
            res = score_catalogue(user, keys, l2=l2, normalized=True, chunk=score_chunk,
                                  targets=batch.seq[:, -1], masked=history, unmasked_ranks=True,
                                  keep_rows=sample)
            nonfinite += res.nonfinite
            if sample is not None:
                distinct.append(distinct_fraction(res.rows))
                sampled += res.rows.shape[0]
            pair = [res.ranks, res.unmasked_ranks]
            r = torch.stack(pair if exclude_history else pair[::-1], dim=1)
            if valid is not None:
                valid = valid.to(device)
                r, u = r[valid], batch.users[valid]
            else:
                u = batch.users
            users.append(u)
            ranks.append(r)
            seen += batch.batch_size
            if max_users and seen * world >= max_users:
                break
        users_t = torch.cat(users) if users else torch.zeros(0, dtype=torch.long, device=device)
        ranks_t = torch.cat(ranks) if ranks else torch.zeros(0, 2, 2, dtype=torch.long, device=device)
        distinct_t = torch.cat(distinct) if distinct else torch.zeros(0, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(nonfinite)
        if nonfinite.item():
            raise UserError(f"evaluation refused: {int(nonfinite.item())} scores are not finite "
                            "(NaN or inf): the model's weights have diverged; evaluate an earlier checkpoint "
                            "or retrain with a lower optim.lr")
        if world > 1:
            users_t, ranks_t = gather_ragged(users_t), gather_ragged(ranks_t)
            distinct_t = gather_ragged(distinct_t)
        # Each user once (the first occurrence), whatever padding the loader used.
        order = torch.argsort(users_t, stable=True)
        users_s, ranks_s = users_t[order], ranks_t[order]
        first = torch.ones_like(users_s, dtype=torch.bool)
        first[1:] = users_s[1:] != users_s[:-1]
        ranks_u = ranks_s[first]
        if max_users:
            ranks_u = ranks_u[:max_users]
        if keep is not None:
            keep["users"] = users_s[first][: ranks_u.shape[0]].cpu()
            keep["ranks"] = ranks_u.cpu()
        out = finalize(metric_sums(ranks_u[:, 0], ks))
        other = finalize(metric_sums(ranks_u[:, 1], ks))
        prefix = protocol_prefix(not exclude_history)
        out.update({prefix + k: v for k, v in other.items() if k != "users"})
        out["distinct_scores"] = float(distinct_t.median()) if distinct_t.numel() else float("nan")
        line = collapse_warning(out["distinct_scores"], int(item_emb.shape[0]))
        if line and rank == 0:
            say(line)
        return out

