"""Optimizer and schedule: torch AdamW over two parameter groups, linear warmup then cosine.

The item encoders (text and image backbones, their LoRA adapters) get ``optim.encoder_lr``; the rest
(projections, pooling heads, modality embedding, user encoder, ID tables) get ``optim.lr``. Biases
and norm weights carry no weight decay. A torch AdamW needs no compiled DeepSpeed op, so the same
code runs on the CPU and on GPUs; DeepSpeed wraps it for ZeRO 1-3.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, encoder_lr: float, weight_decay: float) -> list[dict]:
    """Trainable parameters in up to four groups: (encoder | rest) x (decay | no decay).

    The model names its item-encoder backbone parameters (``model.param_groups()["encoders"]``);
    matrices decay, biases, norms and embedding tables do not.
    """
    split = model.param_groups() if hasattr(model, "param_groups") else {"rest": list(model.parameters())}
    enc_ids = {id(p) for p in split.get("encoders", [])}
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        enc = id(p) in enc_ids
        decay = p.dim() >= 2 and not any(k in n.lower() for k in ("norm", "embed", "bias", "modality"))
        groups.setdefault((enc, decay), []).append(p)
    out = []
    for (enc, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": encoder_lr if enc else lr,
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": ("encoder" if enc else "rest") + ("" if decay else "_no_decay")})
    return out


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.lr, cfg.encoder_lr, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    # The fused AdamW kernel exists for CPU and CUDA tensors in torch >= 2.4 (one pass per tensor
    # instead of a dozen elementwise ops); the plain one is the fallback.
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


class WarmupCosine:
    """lr factor at optimizer step s: s/warmup during warmup, then cosine from 1 to min_ratio.

    A class (not a lambda) so that its state is plain numbers in DeepSpeed's checkpoint.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(self.total - self.warmup, 1)
        t = min(max(step - self.warmup, 0) / span, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, cfg.steps,
                                                                     cfg.min_lr_ratio))
