"""The batch every room agrees on: sequences of item indices plus the content of their unique items.

A batch is built as: sequences of global item indices -> the set of unique items of the batch ->
their content gathered from an item content source (the item cache) -> the models run one encoder
pass per modality over the unique items only and scatter embeddings back to positions with
``inverse`` (no Python loop over positions).

Layout conventions (shared by the loader, the models and the engine):

- ``seq`` is ``[B, L]`` int64, **right-aligned**: padding on the left, the newest item in the last
  column. Padding is ``PAD = -1``. A training window holds ``L = max_len + 1`` items, the inputs
  ``seq[:, :-1]`` and their next items ``seq[:, 1:]``; for evaluation the last column is the held-out
  target (validation or test item) and the columns before it are the history fed to the model.
- ``inverse[b, l]`` indexes ``unique_items`` for every valid position (0 at padding, masked out).
- ``text.index`` / ``image.index`` say which rows of ``unique_items`` each content row belongs to;
  together they cover every unique item exactly once.
- ``unique_log_q`` is ``log q(item)``: the item's smoothed training-set frequency, for the logQ
  correction of in-batch softmax (``b = -log q``).
- ``hist_rows`` / ``hist_items`` (evaluation batches) list the (row, item) pairs of every item the
  user interacted with before the target, over the whole history and not only the window, so that
  full-ranking evaluation can mask them (the target itself is never listed).
- ``row_valid`` (evaluation batches) is False for filler rows that only keep ranks in step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

PAD = -1
TEXT, IMAGE = 0, 1
MODALITY_NAMES = ("text", "image")


def map_leaves(obj: Any, fn: Callable[[Any], Any], is_leaf: Callable[[Any], bool]) -> Any:
    """A copy of ``obj`` with ``fn`` applied to every leaf, walking dataclass fields recursively.

    The one walker over a batch's fields: moving, pinning and packing a batch all go through it, so
    a field added to :class:`Batch` or its content classes is carried everywhere without a list to
    keep in step. Values that are neither leaves nor dataclasses (None, ints) are kept as they are.
    """
    if is_leaf(obj):
        return fn(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: map_leaves(getattr(obj, f.name), fn, is_leaf) for f in fields(obj)})
    return obj


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """:func:`map_leaves` over the tensors of a batch (or of its text/image content)."""
    return map_leaves(obj, fn, lambda v: isinstance(v, torch.Tensor))


def tensor_fields(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(dotted name, tensor)`` for every tensor reachable through dataclass fields of ``obj``."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            yield prefix + f.name, v
        elif is_dataclass(v) and not isinstance(v, type):
            yield from tensor_fields(v, prefix + f.name + ".")


@dataclass
class TextContent:
    input_ids: torch.Tensor  # [Ut, T] int64 token ids
    attention_mask: torch.Tensor  # [Ut, T] int64, 1 for real tokens
    index: torch.Tensor  # [Ut] int64 rows of Batch.unique_items
    # Frozen-prefix activations [Ut, T, H] (hidden states after the last frozen block), filled by
    # the frozen-prefix cache; when present the text encoder runs only its trainable tail.
    prefix: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> TextContent:
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))


@dataclass
class ImageContent:
    pixels: torch.Tensor  # [Ui, 3, H, W] uint8; normalising is the encoder's job
    index: torch.Tensor  # [Ui] int64 rows of Batch.unique_items
    # Frozen-prefix activations [Ui, C, h, w] (feature map after the last frozen stage), filled by
    # the frozen-prefix cache; when present the image encoder runs only its trainable tail.
    prefix: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> ImageContent:
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))


@dataclass
class Batch:
    seq: torch.Tensor  # [B, L] int64 global item indices, right-aligned, PAD = -1
    mask: torch.Tensor  # [B, L] bool, True at valid positions
    inverse: torch.Tensor  # [B, L] int64 rows of unique_items (0 at padding)
    unique_items: torch.Tensor  # [U] int64 global item indices, sorted
    unique_log_q: torch.Tensor  # [U] float32 log popularity
    users: torch.Tensor  # [B] int64 user indices
    text: TextContent | None = None
    image: ImageContent | None = None
    hist_rows: torch.Tensor | None = None  # [H] int64, evaluation only
    hist_items: torch.Tensor | None = None  # [H] int64, evaluation only
    cursor: int = 0  # global sample cursor after this batch (for exact resume)
    # [B] bool, evaluation only: False for filler rows that repeat a user only to keep every rank
    # at the same number of batches (count metrics over rows where it is True). None: all valid.
    row_valid: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.seq.shape[0])

    @property
    def num_unique(self) -> int:
        return int(self.unique_items.shape[0])

    def to(self, device, non_blocking: bool = False) -> Batch:
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Pinned copy for asynchronous host-to-device transfer (used by DataLoader workers)."""
        return map_tensors(self, lambda t: t.pin_memory())


class ContentSource(Protocol):
    """Anything that can hand out item content by global item index (the item cache does)."""

    n_items: int
    modality: np.ndarray  # [n_items] int8, TEXT or IMAGE

    def gather(self, items: np.ndarray) -> tuple[TextContent | None, ImageContent | None]:
        """Content of ``items`` (unique global indices); ``index`` fields are positions in ``items``."""


class ArrayContent:
    """Item content held in (possibly memory-mapped) arrays.

    ``tokens [n_text, T] int32`` with ``lengths [n_text]`` for text items, ``images [n_img, 3, H, W]
    uint8`` for image items, and for every global item its modality and its row in that array.
    The item cache is this class over memory-mapped files; tests build it over random arrays.
    """

    def __init__(self, modality: np.ndarray, row: np.ndarray, tokens: np.ndarray | None,
                 lengths: np.ndarray | None, images: np.ndarray | None):
        self.modality = np.asarray(modality, dtype=np.int8)
        self.row = np.asarray(row, dtype=np.int64)
        self.n_items = int(self.modality.shape[0])
        self.tokens, self.lengths, self.images = tokens, lengths, images

    def gather(self, items: np.ndarray) -> tuple[TextContent | None, ImageContent | None]:
        items = np.asarray(items, dtype=np.int64)
        mod = self.modality[items]
        text = image = None
        pos_t = np.flatnonzero(mod == TEXT)
        if pos_t.size:
            rows = self.row[items[pos_t]]
            lengths = self.lengths[rows].astype(np.int64)
            width = max(int(lengths.max()), 1)
            ids = torch.from_numpy(np.ascontiguousarray(self.tokens[rows, :width]).astype(np.int64))
            attn = (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]).long()
            text = TextContent(ids, attn, torch.from_numpy(pos_t))
        pos_i = np.flatnonzero(mod == IMAGE)
        if pos_i.size:
            rows = self.row[items[pos_i]]
            pix = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
            image = ImageContent(pix, torch.from_numpy(pos_i))
        return text, image


def collate_windows(windows: list[np.ndarray], users: np.ndarray, length: int,
                    content: ContentSource, log_q: np.ndarray, cursor: int = 0,
                    history: list[np.ndarray] | None = None) -> Batch:
    """Build a :class:`Batch` from per-user item windows (each already truncated to ``length``).

    Dedup is one ``np.unique`` over the valid positions; content is gathered once per unique item.
    ``history`` (evaluation) gives each row's items to mask in full ranking.
    """
    b = len(windows)
    seq = np.full((b, length), PAD, dtype=np.int64)
    for i, w in enumerate(windows):
        n = len(w)
        if n > length:
            raise ValueError(f"window {i} has {n} items, more than the batch length {length}")
        if n:
            seq[i, length - n:] = w
    mask = seq != PAD
    unique, inv = np.unique(seq[mask], return_inverse=True)
    inverse = np.zeros((b, length), dtype=np.int64)
    inverse[mask] = inv
    text, image = content.gather(unique)
    batch = Batch(
        seq=torch.from_numpy(seq), mask=torch.from_numpy(mask), inverse=torch.from_numpy(inverse),
        unique_items=torch.from_numpy(unique),
        unique_log_q=torch.from_numpy(np.asarray(log_q, dtype=np.float32)[unique]),
        users=torch.as_tensor(np.asarray(users, dtype=np.int64)), text=text, image=image,
        cursor=int(cursor),
    )
    if history is not None:
        rows = np.repeat(np.arange(b, dtype=np.int64), [len(h) for h in history])
        items = np.concatenate([np.asarray(h, dtype=np.int64) for h in history]) if b else \
            np.zeros(0, np.int64)
        batch.hist_rows, batch.hist_items = torch.from_numpy(rows), torch.from_numpy(items)
    return batch
