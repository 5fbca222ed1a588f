"""Pooling of token / patch / pixel features into one vector per item.

- ``cls``: the first token (text, ViT).
- ``mean``: the mean over valid tokens (or over spatial positions of a feature map).
- ``attn``: attention pooling as in the TransRec paper: a_t = softmax_t(w . tanh(W h_t + b)) over
  valid tokens, pooled = sum_t a_t h_t.
"""

from __future__ import annotations

import torch
from torch import nn


class Pooling(nn.Module):
    def __init__(self, kind: str, hidden: int):
        super().__init__()
        self.kind = kind
        if kind == "attn":
            self.proj = nn.Linear(hidden, hidden)
            self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """h [N, T, H], mask [N, T] (1/True for valid tokens, None = all valid) -> [N, H]."""
        if self.kind == "cls":
            return h[:, 0]
        if mask is None:
            mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        mask = mask.bool()
        if self.kind == "mean":
            w = mask.to(h.dtype)
            return (h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        s = self.score(torch.tanh(self.proj(h))).squeeze(-1).float()
        s = s.masked_fill(~mask, float("-inf"))
        a = torch.softmax(s, dim=1).nan_to_num(0.0).to(h.dtype)  # a row with no token pools to 0
        return torch.einsum("nt,nth->nh", a, h)


def flatten_feature_map(x: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, h*w, C] so feature maps pool like token sequences."""
    return x.flatten(2).transpose(1, 2)
