"""Training losses over user states and the batch's unique item embeddings.

Both losses share one interface::

    loss, metrics = criterion(user [N, d], keys [U, d], target [N], row_mask [N], log_q [U], items [U])

``target`` is the row of each user state's next item in ``keys`` (``Batch.inverse``); rows with
``row_mask`` False (padding) drop out. The loss is ``sum / count`` with ``count`` (the number of
valid rows, on device) in ``metrics``; nothing syncs to the host.

Data-parallel and accumulated steps: each micro-batch's ``sum / count`` alone would weigh every
micro-batch and rank equally, whatever its number of targets. The trainer instead totals the
targets of a whole optimizer step on every rank first (``model.count_targets``, one all-reduce) and
backpropagates ``loss * count`` (the micro-batch's sum) over that global count
(``Trainer.step_scale``); ``metrics["loss_sum"]`` and ``metrics["count"]`` carry what it logs.

- ``softmax``: loss_i = LSE_j(q_i.k_j/tau + b_j) - (q_i.k_t/tau + b_t) over the candidate keys,
  with b = -log q (logQ popularity correction) when enabled; computed by
  :func:`transrec.kernels.inbatch_softmax` (the logits are never materialised by the fused kernels).
  The candidates are the batch's unique items (``negatives`` "inbatch"; every unique item appears
  once among the keys, so a row's positive is never also a negative), every rank's ("global",
  below), those plus the :class:`~transrec.models.negatives.NegativeMemory` ("memory"), or every
  item ("catalogue", assembled by the model: :meth:`SequentialRecommender.catalogue_keys`).

  Candidates without gradient (the memory's, a refreshed catalogue table's other items) change the
  objective's two sides differently, so they take two terms. The user states learn from the softmax
  over every candidate with all keys detached (what the loss reports); the batch's keys learn from
  the plain in-batch softmax with the user states detached (added to what is backpropagated). One
  softmax over fresh keys with gradient and detached extra keys instead lets the extra candidates
  take the probability mass that pushes the batch's items apart, and the item embeddings collapse
  (``benchmarks/negatives.py``, ID model, 800 items, 150 steps: valid NDCG@10 0.175 in-batch, 0.023
  with one softmax, 0.187 with the two terms, 0.191 when the memory's items carry gradient).
- ``bce``: -log sigma(s_pos) - sum_{j=1..k} log sigma(-s_neg_j) with s = q.k/tau and k negatives
  sampled uniformly from the unique items other than the row's positive (the paper's loss).

Global negatives: ``keys`` are gathered from every rank with gradient (a ``gather_fn``, by default
:func:`transrec.models.global_negatives.gather_keys`); an item
present on several ranks keeps its first copy only (the duplicate columns are dropped), and each
row's target is remapped to that copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from transrec.errors import ConfigError, UserError
from transrec.kernels import KernelInputError, inbatch_softmax
from transrec.models.global_negatives import gather_keys, gather_ragged
from transrec.models.negatives import NegativeMemory

# gather_fn(keys [U, d], items [U], log_q [U]) -> (keys_all [M, d], items_all [M], log_q_all [M], offset)
GatherFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]


def first_copy(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [M] bool: the first copy of each item id, first [M] long: index of each row's first copy)."""
    m = items.shape[0]
    uniq, inv = torch.unique(items, return_inverse=True)
    pos = torch.arange(m, device=items.device)
    first_of = torch.full((uniq.shape[0],), m, dtype=torch.long, device=items.device)
    first_of = first_of.scatter_reduce(0, inv, pos, reduce="amin")
    first = first_of[inv]
    return first == pos, first


def sample_negatives(target: torch.Tensor, candidates: torch.Tensor, k: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """k indices per row drawn uniformly from ``candidates`` (sorted key indices) minus the row's
    target (which must be one of the candidates). Returns [N, k]; [N, 0] if only one candidate."""
    c = candidates.shape[0]
    n = target.shape[0]
    if c <= 1 or k <= 0:
        return torch.zeros(n, 0, dtype=torch.long, device=target.device)
    tpos = torch.searchsorted(candidates, target.contiguous())  # position of the target among the candidates
    r = torch.randint(0, c - 1, (n, k), device=target.device, generator=generator)
    r = r + (r >= tpos[:, None]).long()  # skip the positive
    return candidates[r]


def bce_sampled(user: torch.Tensor, keys: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor,
                row_mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Per-row BCE with given negatives [N, k]: softplus(-s_pos) + sum_j softplus(s_neg_j).

    Returns [N] (0 at masked rows).
    """
    dt = torch.float64 if user.dtype == torch.float64 else torch.float32
    q = user.to(dt)
    k = keys.to(dt)
    pos = (q * k[target]).sum(-1) / temperature
    neg = torch.einsum("nd,nkd->nk", q, k[negatives]) / temperature
    loss = F.softplus(-pos) + F.softplus(neg).sum(-1)
    if row_mask is not None:
        loss = torch.where(row_mask, loss, torch.zeros((), dtype=dt, device=loss.device))
    return loss


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Criterion(torch.nn.Module):
    """The configured loss; see the module docstring. ``dim`` (the embedding size) sizes the
    negative memory of ``negatives=memory``."""

    def __init__(self, cfg, dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.gather_fn: GatherFn | None = None
        self.memory: NegativeMemory | None = None
        if cfg.negatives == "memory":
            if dim is None:
                raise ConfigError("model.loss.negatives=memory needs the embedding size "
                                  "(Criterion(cfg, dim))")
            self.memory = NegativeMemory(cfg.memory_size, dim)

    def _global(self) -> GatherFn | None:
        if self.cfg.negatives != "global":
            return None
        if self.gather_fn is not None:
            return self.gather_fn
        if _distributed():
            return gather_keys
        return None

    def _memory_candidates(self, keys, log_q, items):
        """(keys, log q) of the memory's entries whose item is not in the batch; then (training
        only) the batch's items, every rank's, go into the memory."""
        mem_keys, mem_log_q = self.memory.candidates(items)
        if self.training:
            new_keys, new_items, new_log_q = keys.detach(), items, log_q.detach()
            if _distributed():
                new_keys, new_items, new_log_q = (gather_ragged(new_keys), gather_ragged(new_items),
                                                  gather_ragged(new_log_q))
            self.memory.push(new_keys, new_items, new_log_q)
        return mem_keys, mem_log_q

    def _softmax(self, user, keys, target, row_mask, bias):
        cfg = self.cfg
        try:
            return inbatch_softmax(user, keys, target, bias=bias, temperature=cfg.temperature,
                                   row_mask=row_mask, reduction="sum", impl=cfg.impl)
        except KernelInputError as exc:  # the kernels' plain ValueError: one line for the user
            raise UserError(str(exc)) from exc

    def forward(self, user, keys, target, row_mask, log_q, items, extra=None):
        """``extra``: (keys [E, d], log q [E] or None) of candidates beyond the batch that carry no
        gradient (a refreshed catalogue table's other items, log q None: a full softmax, no
        correction); the negative memory supplies its own. See the module docstring."""
        cfg = self.cfg
        if cfg.l2_normalize:
            user, keys = F.normalize(user, dim=-1), F.normalize(keys, dim=-1)
        target = target.long()
        gather = self._global()
        if gather is not None:
            keys, items_all, log_q, offset = gather(keys, items, log_q)
            keep, first = first_copy(items_all)
            new_index = torch.cumsum(keep.long(), 0) - 1  # column of each first copy once deduplicated
            target = new_index[first[target + offset]]
            keys, log_q = keys[keep], log_q[keep]
        if self.memory is not None:
            extra = self._memory_candidates(keys, log_q, items)
        count = row_mask.sum().to(torch.float32)
        norm = count.clamp_min(1.0)
        num_keys = keys.shape[0]
        batch_bias = -log_q if cfg.logq else None
        key_side = 0.0  # the batch keys' own term when extra candidates carry no gradient
        if cfg.kind == "bce":
            cand = torch.arange(keys.shape[0], device=keys.device)
            neg = sample_negatives(target, cand, cfg.num_negatives)
            total = bce_sampled(user, keys, target, neg, row_mask, cfg.temperature).sum()
        elif extra is None:
            total = self._softmax(user, keys, target, row_mask, batch_bias)
        else:
            extra_keys, extra_log_q = extra
            if cfg.l2_normalize:
                extra_keys = F.normalize(extra_keys, dim=-1)
            all_keys = torch.cat([keys.detach(), extra_keys.detach().to(keys.dtype)])
            num_keys = all_keys.shape[0]
            if extra_log_q is None or not cfg.logq:  # None: every item, a full softmax
                bias_all = None
            else:
                bias_all = -torch.cat([log_q, extra_log_q.to(log_q.dtype)])
            total = self._softmax(user, all_keys, target, row_mask, bias_all)  # the user side's gradient
            key_side = self._softmax(user.detach(), keys, target, row_mask, batch_bias)
        loss = (total + key_side) / norm
        metrics = {"loss": (total / norm).detach(), "loss_sum": total.detach(),
                   "count": count, "num_keys": torch.tensor(float(num_keys), device=user.device)}
        return loss, metrics
