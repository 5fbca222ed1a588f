"""Training state of the loss's candidate sets beyond the batch (``model.loss.negatives``).

- :class:`NegativeMemory` (``memory``): a FIFO of the item embeddings of recent steps, with their
  item ids and log-popularity (cross-batch negatives). Each step scores the batch's own items (with
  gradient) and the memory's (detached); memory entries of an item that is in the batch are left
  out, so a positive is never also a (stale) negative. The memory may hold one item several times
  (it was in several recent batches); with the logQ correction b = -log q that matches how the
  candidates were drawn (in proportion to popularity). After the loss, the batch's items (every
  rank's, when there are several: the memory is the same on every rank) are pushed in, the oldest
  leave.
- :class:`CatalogueTable` (``catalogue`` on a content model): every item's embedding, re-encoded by
  the trainer every ``catalogue_refresh`` steps (:meth:`CatalogueTable.due`).

Both hold their state in persistent buffers: a checkpoint saves it and a resumed run continues
exactly; a skipped (non-finite) step restores it (:func:`step_buffers`); the buffers are resized
to whatever a checkpoint holds when loaded. They are training state, not model weights: exports
leave them out (:data:`STATE_PREFIX`).
"""

from __future__ import annotations

import torch
from torch import nn

STATE_PREFIX = "criterion."  # state-dict keys of the loss's training state (no weights live there)


class _Resizable(nn.Module):
    """Buffers take the shape of the state dict they are loaded from (a table sized at run time)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buf in list(self._buffers.items()):
            src = state_dict.get(prefix + name)
            if buf is not None and src is not None and src.shape != buf.shape:
                self._buffers[name] = torch.empty(src.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class NegativeMemory(_Resizable):
    """FIFO of ``size`` item embeddings [size, dim] (float32), their item ids (-1: empty) and log q."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = int(size)
        self.register_buffer("keys", torch.zeros(self.size, dim))
        self.register_buffer("items", torch.full((self.size,), -1, dtype=torch.long))
        self.register_buffer("log_q", torch.zeros(self.size))
        self.register_buffer("head", torch.zeros((), dtype=torch.long))  # next slot to write

    def candidates(self, batch_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys [S, d], log_q [S]) of the filled entries whose item is not in ``batch_items``."""
        keep = (self.items >= 0) & ~torch.isin(self.items, batch_items.to(self.items.device))
        return self.keys[keep], self.log_q[keep]

    @torch.no_grad()
    def push(self, keys: torch.Tensor, items: torch.Tensor, log_q: torch.Tensor) -> None:
        """Write the newest ``keys`` [n, d] (the last ``size`` of them if more) over the oldest."""
        n = keys.shape[0]
        if n == 0:
            return
        if n > self.size:
            keys, items, log_q, n = keys[-self.size:], items[-self.size:], log_q[-self.size:], self.size
        slots = (self.head + torch.arange(n, device=self.head.device)) % self.size
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.items[slots] = items.to(self.items.dtype)
        self.log_q[slots] = log_q.detach().to(self.log_q.dtype)
        self.head.copy_((self.head + n) % self.size)

    def filled(self) -> int:
        return int((self.items >= 0).sum())


class CatalogueTable(_Resizable):
    """Every item's embedding [n_items, dim] (float32) and the step it was last encoded at (-1: never)."""

    def __init__(self, n_items: int, dim: int, refresh: int):
        super().__init__()
        self.refresh = int(refresh)
        self.register_buffer("table", torch.zeros(int(n_items), dim))
        self.register_buffer("encoded_at", torch.full((), -1, dtype=torch.long))

    def due(self, step: int) -> bool:
        """Whether the trainer must re-encode the table before optimizer step ``step`` (0-based)."""
        if self.refresh == 0:
            return False  # exact: the model encodes every item with gradient at every step
        at = int(self.encoded_at)
        return at < 0 or step - at >= self.refresh

    @torch.no_grad()
    def fill(self, emb: torch.Tensor, step: int) -> None:
        if emb.shape[0] != self.table.shape[0] or emb.shape[1] != self.table.shape[1]:
            self.table = torch.empty(emb.shape, dtype=self.table.dtype, device=self.table.device)
        self.table.copy_(emb.detach().to(self.table.dtype))
        self.encoded_at.fill_(int(step))


def step_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The loss's training-state buffers of ``module`` (a training step changes them)."""
    return [b for m in module.modules() if isinstance(m, (NegativeMemory, CatalogueTable))
            for b in m.buffers(recurse=False)]
