"""The TransRec model (content item encoders + user encoder + loss) and the ID-based SASRec baseline.

Training step on a :class:`~transrec.shards.batch.Batch` (``seq [B, L]`` right-aligned, L = inputs + 1):

1. ``encode_items``: one encoder pass per modality over the batch's unique items; the outputs are
   scattered into one table ``[U, d]`` by ``text.index`` / ``image.index`` (plus an optional
   learned modality embedding);
2. position embeddings are gathered from the table with ``inverse`` (no loop over positions);
3. the user encoder reads the inputs ``seq[:, :-1]``; the loss scores user states against the
   table: ``bidirectional`` at the last position only (predicting ``seq[:, -1]``), ``causal`` at
   every valid position (predicting ``seq[:, 1:]``).

Mixed modality under ZeRO-3: every rank must run every encoder the same number of times per step
(ZeRO-3 gathers each module's partitioned weights with collectives in its forward hooks; a rank
that skipped an encoder would leave the others waiting). A batch with no item of a modality
therefore runs that encoder on a tiny dummy input (two items) and adds ``0 * output.sum()`` to the
table: values unchanged, every encoder parameter gets a (zero) gradient, the collectives line up.
The dummy's BatchNorm statistics are not recorded. The dummy runs the encoder's tail only when
that encoder's content is served from the frozen-prefix cache (``encoder.serves_cached_prefix``,
set by the cache wiring; when unset, when the batch's other modality came with a prefix), so that
it runs exactly the modules real content of that modality would.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transrec.config import Config
from transrec.config.model import ModelConfig, user_kind, validate_model_config
from transrec.errors import ConfigError
from transrec.models.export import export_config, load_export_into, read_export, write_export
from transrec.models.image import ImageItemEncoder
from transrec.models.losses import Criterion, GatherFn
from transrec.models.negatives import STATE_PREFIX, CatalogueTable
from transrec.models.text import TextItemEncoder, tokenizer_path
from transrec.models.user import UserEncoder
from transrec.shards.batch import Batch, ImageContent, TextContent


@contextlib.contextmanager
def _bn_stats_frozen(module: nn.Module):
    """BatchNorm layers keep normalising with batch statistics but do not update running ones."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in saved:
            m.momentum = mom


CATALOGUE_KEYS = ("item_residual.", "item_seen")  # state of one catalogue's items (the hybrid's)


class SequentialRecommender(nn.Module):
    """What TransRec and the ID baseline share: user encoder, loss, training forward, and the export
    folder they are saved to and loaded from (:mod:`transrec.models.export`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = int(cfg.dim)
        self.user = UserEncoder(dataclasses.replace(cfg.user, kind=user_kind(cfg)), self.dim)
        self.criterion = Criterion(cfg.loss, self.dim)
        self.catalogue_content = None  # every item's content (set_catalogue_content)

    # -- the export folder ----------------------------------------------------------------------
    @staticmethod
    def from_export(path: str | Path) -> SequentialRecommender:
        """The model an export describes (TransRec or the ID baseline), its weights loaded, in eval mode."""
        meta = read_export(path)
        model = build_model(export_config(path).model, n_items=meta.get("n_items"))
        load_export_into(model, path, strict=True)
        return model.eval()

    def load_export(self, path: str | Path, *, strict: bool = True, catalogue: bool = True) -> None:
        """Load an export's weights into this model (built with adapters or another trainable set:
        ``strict=False`` leaves what the export lacks at its initialisation). ``catalogue=False``:
        the export's per-item vectors (the hybrid's, which belong to its own catalogue) are not
        loaded, this model's stay as they are (zero when new): a transfer to other items."""
        load_export_into(self, path, strict=strict, skip=() if catalogue else CATALOGUE_KEYS)

    def save_export(self, path: str | Path, cfg: Config, meta: dict,
                    tensors: dict[str, torch.Tensor] | None = None, **write_options) -> Path:
        """Write this model as an export folder (``tensors``: a subset, for an adapter export;
        ``write_options``: :func:`~transrec.models.export.write_export`'s ``overwrite``/``protect``)."""
        if tensors is None:  # the weights; the loss's training state (negatives) stays out
            tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous()
                       for k, v in self.state_dict().items() if not k.startswith(STATE_PREFIX)}
        return write_export(path, tensors, cfg, {"model_kind": self.cfg.kind, **meta}, **write_options)

    # -- interface ------------------------------------------------------------------------------
    def encode_items(self, unique_items: torch.Tensor, text: TextContent | None,
                     image: ImageContent | None) -> torch.Tensor:
        raise NotImplementedError

    def encode_users(self, item_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """User state at the last position [B, d] (the newest item is the last column)."""
        return self.user.last(item_emb, mask)

    def content_spec(self) -> dict | None:
        return None

    def set_negative_gather(self, fn: GatherFn | None) -> None:
        """Global negatives: ``fn(keys, items, log_q) -> (keys_all, items_all, log_q_all, offset)``
        gathering keys across ranks with gradient. Used when ``loss.negatives == "global"``;
        without it, torch.distributed's autograd all-gather is used when a process group of more
        than one rank is initialised."""
        self.criterion.gather_fn = fn

    def encoder_modules(self) -> list[nn.Module]:
        return []

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split for separate learning rates: item-encoder backbones vs rest."""
        enc = {id(p) for m in self.encoder_modules() for p in m.parameters()}
        groups = {"encoders": [], "rest": []}
        for p in self.parameters():
            if p.requires_grad:
                groups["encoders" if id(p) in enc else "rest"].append(p)
        return groups

    # -- training -------------------------------------------------------------------------------
    def catalogue_keys(self, table: torch.Tensor, unique_items: torch.Tensor):
        """The keys of a full softmax (``negatives=catalogue``), given the batch's unique-item table
        [U, d] and those items' ids: (every item's embedding [n_items, d] with gradient, None), or
        (None, (the other items' embeddings [n_items - U, d] without gradient, None)) beside the
        batch's own (the criterion's ``extra``)."""
        raise ConfigError(f"{type(self).__name__} has no item table for catalogue negatives")

    def catalogue_due(self, step: int) -> bool:
        """Whether a trainer must re-encode the catalogue table (:meth:`refresh_catalogue`) before
        optimizer step ``step``; only a content model with ``negatives=catalogue`` has one."""
        return False

    def set_catalogue_content(self, content) -> None:
        """The :class:`~transrec.shards.batch.ContentSource` of every item, which a content model's
        exact catalogue softmax (``catalogue_refresh`` 0) encodes at every step; the ID model needs
        none."""
        self.catalogue_content = content

    def targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(target row of ``unique_items``, valid) for each trained user state: every position with a
        next item (causal), or the last position only (bidirectional)."""
        mask, inverse = batch.mask, batch.inverse
        if self.user.causal:
            return inverse[:, 1:].reshape(-1), (mask[:, :-1] & mask[:, 1:]).reshape(-1)
        return inverse[:, -1], mask[:, -2] & mask[:, -1]

    def count_targets(self, batch: Batch) -> int:
        """How many targets ``batch`` trains (the loss's normaliser), read from the batch alone, so a
        trainer can total a whole optimizer step before running any of it."""
        return int(self.targets(batch)[1].sum())

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        table = self.encode_items(batch.unique_items, batch.text, batch.image)
        return self.loss_from_table(batch, table)

    def loss_from_table(self, batch: Batch, table: torch.Tensor,
                        inputs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Loss given the unique-item table [U, d] (and optionally the input embeddings [B, L-1, d])."""
        if batch.seq.shape[1] < 2:
            raise ConfigError("a training batch needs windows of at least 2 positions (inputs + target)")
        in_mask = batch.mask[:, :-1]
        if inputs is None:
            inputs = table[batch.inverse[:, :-1]]
        out = self.user(inputs, in_mask)
        q = out.reshape(-1, out.shape[-1]) if self.user.causal else out[:, -1]
        target, row_mask = self.targets(batch)
        keys, items, log_q = table, batch.unique_items, batch.unique_log_q.to(table.device)
        extra = None
        if self.cfg.loss.negatives == "catalogue":  # a full softmax: every item, no sampling correction
            full, extra = self.catalogue_keys(table, batch.unique_items.to(table.device))
            if extra is None:  # every item's key carries gradient: one softmax over them
                keys = full
                items = torch.arange(keys.shape[0], device=keys.device)
                target = batch.unique_items.to(keys.device)[target]
                log_q = torch.zeros(keys.shape[0], device=keys.device)
        loss, metrics = self.criterion(q, keys, target, row_mask, log_q, items, extra=extra)
        metrics["num_unique"] = torch.tensor(float(table.shape[0]), device=table.device)
        return loss, metrics


class TransRec(SequentialRecommender):
    """Content-based sequential recommender over mixture-of-modality items (see module docstring)."""

    def __init__(self, cfg: ModelConfig, n_items: int | None = None):
        super().__init__(cfg)
        if cfg.loss.negatives == "catalogue":  # every item's embedding, refreshed (see LossConfig)
            self.criterion.catalogue = CatalogueTable(n_items or 0, self.dim, cfg.loss.catalogue_refresh)
        self.text_encoder = TextItemEncoder(cfg.text, self.dim)
        self.image_encoder = ImageItemEncoder(cfg.image, self.dim)
        self.modality = nn.Embedding(2, self.dim) if cfg.modality_embedding else None
        if self.modality is not None:
            nn.init.normal_(self.modality.weight, std=0.02)
        # Run an absent modality's encoder on a dummy input (see the module docstring).
        self.run_absent_encoders = True
        # The hybrid (model.item.id_residual): a learned vector per item of the training catalogue,
        # zero at the start, added to the content embedding of the items seen in training.
        self.item_residual: nn.Embedding | None = None
        if cfg.item.id_residual:
            if not n_items:
                raise ConfigError("model.item.id_residual needs the number of items of the training "
                                  "catalogue (build_model's n_items)")
            self.item_residual = nn.Embedding(int(n_items), self.dim)
            nn.init.zeros_(self.item_residual.weight)
            self.register_buffer("item_seen", torch.zeros(int(n_items), dtype=torch.bool))

    def set_seen_items(self, seen) -> None:
        """Which items of the training catalogue have a vector of their own (``[n_items]`` bool:
        the items training reads); the others are their content alone. No-op without the hybrid."""
        if self.item_residual is None:
            return
        seen = torch.as_tensor(np.asarray(seen, dtype=bool))
        if seen.shape != self.item_seen.shape:
            raise ConfigError(f"model.item.id_residual: the table has {self.item_seen.shape[0]} items, the "
                              f"dataset {seen.shape[0]}; the vectors belong to one catalogue")
        self.item_seen.copy_(seen.to(self.item_seen.device))

    def residual(self, unique_items: torch.Tensor, dtype) -> torch.Tensor | None:
        """The per-item vectors of ``unique_items`` (zero for an item not seen in training; during
        training each dropped with probability ``model.item.id_dropout``), or None without the hybrid."""
        if self.item_residual is None:
            return None
        idx = unique_items.to(self.item_seen.device)
        keep = self.item_seen[idx]
        p = float(self.cfg.item.id_dropout)
        if self.training and p > 0:
            keep = keep & (torch.rand(idx.shape, device=idx.device) >= p)
        vec = self.item_residual(idx)  # through the module: ZeRO-3 gathers the table in its hooks
        return vec.to(dtype) * keep[:, None].to(dtype)

    def item_encoders(self) -> dict[str, nn.Module]:
        return {"text": self.text_encoder, "image": self.image_encoder}

    def encoder_modules(self) -> list[nn.Module]:
        return [self.text_encoder.backbone, self.image_encoder.backbone]

    def content_spec(self) -> dict:
        return content_spec(self.cfg)

    def _device(self) -> torch.device:
        return self.text_encoder.proj.weight.device

    def encode_items(self, unique_items: torch.Tensor, text: TextContent | None,
                     image: ImageContent | None, *, residual: bool = True) -> torch.Tensor:
        """[U, d]: one pass per modality over the unique items, scattered back by ``index``; with the
        hybrid, plus each training-catalogue item's own vector (``residual=False``: content alone,
        for items whose ids are not rows of the training catalogue)."""
        n = int(unique_items.shape[0])
        parts, zero_terms = [], []
        cached = any(c is not None and c.prefix is not None for c in (text, image))
        for mid, (content, enc) in enumerate(((text, self.text_encoder), (image, self.image_encoder))):
            if content is not None and content.index.numel():
                emb = enc(content)
                if self.modality is not None:
                    # through the module's forward (not .weight): ZeRO-3 gathers a partitioned weight
                    # in its hooks, which an encoding before any training forward relies on
                    mod = self.modality(torch.full((1,), mid, dtype=torch.long, device=emb.device))
                    emb = emb + mod.to(emb.dtype)
                parts.append((content.index.to(emb.device), emb))
            elif self.run_absent_encoders:
                tail_only = cached if enc.serves_cached_prefix is None else bool(enc.serves_cached_prefix)
                with _bn_stats_frozen(enc):
                    zero_terms.append(enc(enc.dummy_content(self._device(), like_prefix=tail_only)).sum())
        if not parts:
            raise ConfigError("encode_items got no text and no image content")
        emb0 = parts[0][1]
        table = torch.zeros(n, emb0.shape[1], dtype=emb0.dtype, device=emb0.device)
        for idx, emb in parts:
            table = table.index_copy(0, idx, emb.to(table.dtype))
        for z in zero_terms:
            table = table + 0.0 * z.to(table.dtype)
        if residual and self.item_residual is not None:
            table = table + self.residual(unique_items, table.dtype).to(table.device)
        return table

    # -- catalogue negatives (see LossConfig) -----------------------------------------------------
    def catalogue_due(self, step: int) -> bool:
        table = getattr(self.criterion, "catalogue", None)
        return table is not None and table.due(step)

    def refresh_catalogue(self, emb: torch.Tensor, step: int) -> None:
        """Store every item's embedding [n_items, d] as encoded before optimizer step ``step``."""
        self.criterion.catalogue.fill(emb, step)

    def catalogue_keys(self, table: torch.Tensor, unique_items: torch.Tensor):
        cat = self.criterion.catalogue
        if cat.refresh == 0:  # exact: every item encoded now, with gradient
            content = self.catalogue_content
            if content is None:
                raise ConfigError("negatives=catalogue with catalogue_refresh=0 needs every item's content "
                                  "(model.set_catalogue_content); the trainer sets it")
            items = np.arange(int(content.n_items), dtype=np.int64)
            text, image = content.gather(items)
            dev = table.device
            return self.encode_items(torch.from_numpy(items).to(dev),
                                     text.to(dev) if text is not None else None,
                                     image.to(dev) if image is not None else None), None
        if int(cat.encoded_at) < 0:
            raise ConfigError("the catalogue table of negatives=catalogue was never encoded: call "
                              "model.refresh_catalogue(every item's embedding, step) when "
                              "model.catalogue_due(step) (the trainer does)")
        others = torch.ones(cat.table.shape[0], dtype=torch.bool, device=cat.table.device)
        others[unique_items.to(others.device)] = False  # the batch's own items come fresh, with gradient
        return None, (cat.table[others].to(table.dtype), None)

    # encode each of a batch's unique items once (False: every position's item on its own, the
    # naive path that ``transrec bench --ablate dedup`` measures; the same loss values)
    dedup = True

    def forward(self, batch: Batch, dedup: bool | None = None):
        """Training loss. ``dedup=False`` (default: the model's :attr:`dedup`) encodes every
        position's item separately: same values, U -> number of valid positions of work."""
        if self.dedup if dedup is None else dedup:
            return super().forward(batch)
        return self._forward_per_position(batch)

    def _forward_per_position(self, batch: Batch):
        mask = batch.mask
        rows = batch.inverse[mask]  # unique-item row of every valid position, [P]
        p, u = int(rows.shape[0]), batch.num_unique
        dev = rows.device
        text = image = None
        positions = torch.arange(p, device=dev)
        def content_rows(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Content row of every position whose item has this modality, and that selection."""
            row_of = torch.full((u,), -1, dtype=torch.long, device=dev)
            row_of[index] = torch.arange(index.shape[0], device=dev)
            r = row_of[rows]
            sel = r >= 0
            return r[sel], sel

        if batch.text is not None:
            r, sel = content_rows(batch.text.index)
            pre = batch.text.prefix[r] if batch.text.prefix is not None else None
            text = TextContent(batch.text.input_ids[r], batch.text.attention_mask[r], positions[sel], pre)
        if batch.image is not None:
            r, sel = content_rows(batch.image.index)
            pre = batch.image.prefix[r] if batch.image.prefix is not None else None
            image = ImageContent(batch.image.pixels[r], positions[sel], pre)
        per_pos = self.encode_items(batch.unique_items.to(dev)[rows], text, image)  # [P, d]
        full = torch.zeros(*mask.shape, per_pos.shape[1], dtype=per_pos.dtype, device=dev)
        full = full.index_put((mask.nonzero(as_tuple=True)), per_pos)
        first = torch.full((u,), p, dtype=torch.long, device=dev).scatter_reduce(0, rows, positions, "amin")
        return self.loss_from_table(batch, per_pos[first], inputs=full[:, :-1])


class IDSASRec(SequentialRecommender):
    """ID-based SASRec baseline: an item embedding table in place of the content encoders."""

    def __init__(self, cfg: ModelConfig, n_items: int):
        super().__init__(cfg)
        if n_items <= 0:
            raise ConfigError("the ID model needs the number of items "
                              "(model.n_items or build_model's n_items)")
        self.n_items = int(n_items)
        self.item_emb = nn.Embedding(self.n_items, self.dim)
        nn.init.normal_(self.item_emb.weight, std=0.02)

    def encode_items(self, unique_items: torch.Tensor, text=None, image=None) -> torch.Tensor:
        return self.item_emb(unique_items.to(self.item_emb.weight.device))

    def catalogue_keys(self, table: torch.Tensor, unique_items: torch.Tensor):
        return self.item_emb.weight, None


def content_spec(cfg: ModelConfig) -> dict:
    """What the item cache must hold for this model: tokenizer folder, title length, image size."""
    return {"tokenizer": tokenizer_path(cfg.text.name), "max_text_len": int(cfg.text.max_len),
            "image_size": int(cfg.image.image_size)}


def build_model(cfg: ModelConfig, n_items: int | None = None) -> SequentialRecommender:
    """TransRec (``cfg.kind == "transrec"``) or the ID baseline (``"id"``) from one config."""
    validate_model_config(cfg)
    if cfg.kind == "id":
        return IDSASRec(cfg, int(n_items if n_items is not None else cfg.n_items))
    return TransRec(cfg, n_items=n_items)
