"""What text and image item encoders share: the split at the freeze boundary.

An item encoder is a stem (embeddings / stem convolution) followed by ``n`` blocks (transformer
layers / CNN stages), then a tail head (final norm, pooling, projection to the shared dimension d).
With ``trainable = k`` the top ``k`` blocks train and the stem plus the lower ``n - k`` blocks form
the **frozen prefix**:

    forward(x) = forward_tail(forward_prefix(x))
    forward_prefix: stem + blocks[:n-k]       (eval mode, no_grad when frozen)
    forward_tail:   blocks[n-k:] + head       (trainable; gradient checkpointing per block)

``trainable = "all"`` puts only the stem in the prefix (which then trains, so it is not cacheable);
``"none"`` puts every block in the prefix. Frozen modules run in eval mode (no dropout, BatchNorm
running statistics) unless the config's ``frozen_dropout`` is set, so the prefix output of an item
is a pure function of its content and the frozen weights: the frozen-prefix cache
(:mod:`transrec.models.prefix`) keys on :meth:`frozen_hash` and applies when
:meth:`prefix_not_cacheable_reason` finds no reason against it.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from transrec.config.model import parse_trainable
from transrec.errors import ConfigError
from transrec.models.lora import has_lora, inject_lora, is_lora_param


def _has_dropout(modules: list[nn.Module]) -> bool:
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, nn.Dropout | nn.Dropout1d | nn.Dropout2d) and m.p > 0:
                return True
    return False


class ItemEncoderBase(nn.Module):
    """Subclasses set ``self.backbone``, ``self.arch``, implement ``_stem_modules``, ``_blocks``
    (and ``_head_modules`` when the backbone has modules after its last block), ``forward_prefix``
    and ``forward_tail``; then call :meth:`_setup_split`. The trainable set is chosen there, once,
    and so is :meth:`prefix_frozen`, which every forward and every ``train()`` reads; a later change
    of ``requires_grad`` in the prefix is seen only by :meth:`prefix_not_cacheable_reason`."""

    arch: str = ""
    # Set by whoever serves this encoder's content from the frozen-prefix cache (True) or not
    # (False). It decides how the dummy of an absent modality runs (tail only, or whole), so that
    # every rank runs the same modules under ZeRO-3. None: follow the batch (tail only when the
    # other modality's content came with a prefix).
    serves_cached_prefix: bool | None = None

    # -- to implement -----------------------------------------------------------------------
    def _stem_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def _head_modules(self) -> list[nn.Module]:
        """Backbone modules after the last block (final norms); they train unless trainable='none'."""
        return []

    # -- set-up ---------------------------------------------------------------------------------
    def _setup_split(self, trainable, lora_cfg, grad_ckpt: bool, frozen_dropout: bool, where: str):
        blocks = self._blocks()
        n = len(blocks)
        t = parse_trainable(trainable, where)
        if t == "all":
            k = n
        elif t == "none":
            k = 0
        else:
            if t > n:
                raise ConfigError(f"{where}.trainable={t} but the {self.arch} encoder has only {n} blocks")
            k = t
        self.n_blocks, self.n_trainable_blocks = n, k
        self.n_frozen_blocks = n - k
        self.train_stem = t == "all" and lora_cfg is None
        self.grad_ckpt = bool(grad_ckpt)
        self.frozen_dropout = bool(frozen_dropout)
        self.trainable_spec = t
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        tail = blocks[self.n_frozen_blocks:]
        if lora_cfg is not None:
            if k == 0:
                raise ConfigError(f"{where}.lora needs trainable blocks; {where}.trainable is 'none'")
            self.lora_layers = inject_lora(tail, self.arch, lora_cfg)
            for name, p in self.backbone.named_parameters():
                p.requires_grad_(is_lora_param(name))
        else:
            self.lora_layers = 0
            for mod in tail + (self._head_modules() if k > 0 else []):
                for p in mod.parameters():
                    p.requires_grad_(True)
            if self.train_stem:
                for mod in self._stem_modules():
                    for p in mod.parameters():
                        p.requires_grad_(True)
        self._prefix_frozen = not any(p.requires_grad for m in self.prefix_modules() for p in m.parameters())
        self.train(self.training)

    # -- the split ------------------------------------------------------------------------------
    def prefix_modules(self) -> list[nn.Module]:
        return self._stem_modules() + self._blocks()[: self.n_frozen_blocks]

    def tail_blocks(self) -> list[nn.Module]:
        return self._blocks()[self.n_frozen_blocks:]

    def prefix_frozen(self) -> bool:
        """Whether no parameter of the prefix trains (decided by :meth:`_setup_split`)."""
        return self._prefix_frozen

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen prefix modules always run in eval mode (unless frozen_dropout keeps them stochastic);
        # frozen head modules too (BatchNorm statistics of a frozen encoder must not drift).
        if mode and not self.frozen_dropout and self.prefix_frozen():
            for m in self.prefix_modules():
                m.eval()
        if mode and self.n_trainable_blocks == 0:
            for m in self._head_modules():
                m.eval()
        return self

    # -- may the prefix output be cached ---------------------------------------------------------
    def prefix_not_cacheable_reason(self, for_training: bool = False) -> str | None:
        """None when this encoder's prefix output may be cached, else why not (one phrase).

        As the encoder stands (``for_training=False``): no prefix parameter trains, no prefix block
        carries LoRA adapters, and the prefix is deterministic in the current mode.
        ``for_training=True`` is the frozen-prefix cache's question, for a run that will train the
        encoder; it adds: at least one frozen block (full fine-tuning, or LoRA in every block,
        leaves the stem alone, not worth its disk), and no randomness that ``frozen_dropout`` keeps
        in the frozen blocks once training starts, whatever the current mode.
        """
        a = self.arch
        if self.n_frozen_blocks == 0 and self.train_stem:
            return f"{a} encoder is fully fine-tuned (trainable='all'): no frozen prefix"
        # checked on the parameters themselves, not on prefix_frozen(): this is the last word
        # before activations are stored, and costs one pass over the prefix's parameters
        if any(p.requires_grad for m in self.prefix_modules() for p in m.parameters()):
            return f"{a} encoder has trainable parameters in its prefix"
        if any(has_lora(m) for m in self.prefix_modules()):
            return f"{a} encoder has LoRA adapters on frozen blocks"
        stochastic = self.frozen_dropout and self.prefix_is_stochastic()
        if stochastic and self.training:
            return f"{a} encoder keeps dropout active in its frozen blocks (frozen_dropout=True)"
        if not for_training:
            return None
        if self.n_frozen_blocks == 0 and self.n_blocks > 0:  # (a model run whole has no blocks)
            if self.lora_layers:
                return f"{a} encoder has LoRA adapters in every block (trainable='all'): no frozen block"
            return f"{a} encoder has no frozen block (trainable='all'): full fine-tuning"
        if stochastic:
            return f"{a} encoder keeps dropout active in its frozen blocks in training (frozen_dropout=True)"
        return None

    def prefix_is_cacheable(self, for_training: bool = False) -> bool:
        return self.prefix_not_cacheable_reason(for_training) is None

    def prefix_is_stochastic(self) -> bool:
        """Whether the prefix has anything random in training mode (dropout, stochastic depth)."""
        return _has_dropout(self.prefix_modules())

    def frozen_hash(self) -> str:
        """sha256 over the architecture, the freeze depth and every prefix weight and buffer.

        Call it on full (not ZeRO-3-partitioned) weights, e.g. before wrapping in DeepSpeed.
        """
        h = hashlib.sha256()
        h.update(f"{type(self).__name__}|{self.arch}|{self.describe()}|frozen={self.n_frozen_blocks}"
                 .encode())
        for i, mod in enumerate(self.prefix_modules()):
            for name, t in sorted(mod.state_dict().items()):
                if name.endswith("num_batches_tracked"):  # a counter, not a weight
                    continue
                t = t.detach().cpu().contiguous()
                h.update(f"{i}.{name}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def describe(self) -> str:
        return self.arch

    def _prefix_context(self):
        if self.prefix_frozen():
            return torch.no_grad()
        return torch.enable_grad() if torch.is_grad_enabled() else torch.no_grad()

    def _run_block(self, block_fn, i: int, h: torch.Tensor, *args):
        if self.grad_ckpt and self.training and torch.is_grad_enabled():
            return checkpoint(block_fn, i, h, *args, use_reentrant=False)
        return block_fn(i, h, *args)
