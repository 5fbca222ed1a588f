"""User encoders: a pre-norm transformer over a user's item embeddings.

- ``bidirectional`` (the TransRec paper): every position attends to every valid position; the user
  state is the output at the last position (the newest item, right-aligned layout).
- ``causal`` (SASRec): position l attends to positions <= l only; trained at every position.

Positions are learned and right-aligned: the last column always gets position ``max_len - 1``, so
a history keeps its position ids whatever the amount of left padding. Padding never changes the
output at a valid position: padded keys are masked out, and a padded query attends to itself only
(so no softmax row is empty).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from transrec.config.model import UserEncoderConfig
from transrec.errors import ConfigError


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)
        self.p_attn = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.p_attn if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class UserEncoder(nn.Module):
    def __init__(self, cfg: UserEncoderConfig, dim: int):
        super().__init__()
        if cfg.kind not in ("bidirectional", "causal"):
            raise ConfigError(f"the user encoder needs a resolved kind (bidirectional or causal), got "
                              f"{cfg.kind!r}; see transrec.config.model.user_kind")
        self.cfg = cfg
        self.causal = cfg.kind == "causal"
        self.max_len = int(cfg.max_len)
        self.pos = nn.Embedding(self.max_len, dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(dim, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(dim)
        self.in_ln = nn.LayerNorm(dim) if cfg.input_norm else None  # model.user.input_norm
        self.grad_ckpt = bool(cfg.grad_ckpt)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, item_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """item_emb [B, L, d], mask [B, L] bool (right-aligned) -> outputs [B, L, d] at every position."""
        b, n, _ = item_emb.shape
        if n > self.max_len:
            raise ConfigError(f"sequence of {n} positions is longer than model.user.max_len={self.max_len}")
        mask = mask.bool()
        pos = self.pos.weight[self.max_len - n:]
        x = item_emb + pos[None].to(item_emb.dtype)
        if self.in_ln is not None:  # per position: a padded position still changes nothing
            x = self.in_ln(x)
        x = self.drop(x) * mask[..., None].to(item_emb.dtype)
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        allowed = mask[:, None, :].expand(b, n, n)
        if self.causal:
            allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        allowed = (allowed | eye)[:, None]  # [B, 1, L, L]
        for blk in self.blocks:
            if self.grad_ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, allowed, use_reentrant=False)
            else:
                x = blk(x, allowed)
        return self.ln(x)

    def last(self, item_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The user state at the last position: [B, d]."""
        return self.forward(item_emb, mask)[:, -1]
