"""Optimizer and schedule: torch AdamW over two parameter groups, linear warmup then cosine.

The item encoders (text and image backbones, their LoRA adapters) get ``optim.encoder_lr``; the rest
(projections, pooling heads, modality embedding, user encoder, ID tables) get ``optim.lr``. Biases
and norm weights carry no weight decay. The hybrid's per-item vectors (``model.item.id_residual``)
get ``optim.id_lr`` and ``optim.id_weight_decay``. A torch AdamW needs no compiled DeepSpeed op, so the same
code runs on the CPU and on GPUs; DeepSpeed wraps it for ZeRO 1-3.

ZeRO 1-3 and DeepSpeed's bf16 optimizer hand the AdamW one flat fp32 tensor per group. Without them
(ZeRO-0, fp32) it would see every weight separately -- about a hundred small tensors for the tiny
models -- and on a CPU the fused kernel pays a parallel region per tensor, whose threads wait on
each other when another process holds the cores (``benchmarks/e2e.py`` measures it). :class:`FlatAdamW`
gathers each group into one flat tensor per step instead: the same update (bit for bit, but
for the odd last-bit difference where a tensor's tail falls in the kernel's vector loop).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.adam import adam as _adam_functional


def param_groups(model: nn.Module, lr: float, encoder_lr: float, weight_decay: float,
                 id_lr: float = 0.0, id_weight_decay: float = 0.0) -> list[dict]:
    """Trainable parameters in up to four groups: (encoder | rest) x (decay | no decay), plus the
    hybrid's per-item vectors in a group of their own (``id_lr``, 0 = ``lr``; ``id_weight_decay``).

    The model names its item-encoder backbone parameters (``model.param_groups()["encoders"]``);
    matrices decay, biases, norms and embedding tables do not.
    """
    split = model.param_groups() if hasattr(model, "param_groups") else {"rest": list(model.parameters())}
    enc_ids = {id(p) for p in split.get("encoders", [])}
    residual = getattr(model, "item_residual", None)
    res_ids = {id(p) for p in residual.parameters()} if residual is not None else set()
    groups: dict[tuple[bool, bool], list] = {}
    out = []
    res = [p for p in model.parameters() if p.requires_grad and id(p) in res_ids]
    if res:
        out.append({"params": res, "lr": id_lr or lr, "weight_decay": id_weight_decay, "name": "id_residual"})
    for n, p in model.named_parameters():
        if not p.requires_grad or id(p) in res_ids:
            continue
        enc = id(p) in enc_ids
        decay = p.dim() >= 2 and not any(k in n.lower() for k in ("norm", "embed", "bias", "modality"))
        groups.setdefault((enc, decay), []).append(p)
    for (enc, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": encoder_lr if enc else lr,
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": ("encoder" if enc else "rest") + ("" if decay else "_no_decay")})
    return out


def frozen_by_rate_warning(model: nn.Module, cfg) -> str | None:
    """A line when item-encoder weights train (``requires_grad``) under ``optim.encoder_lr`` 0: their
    gradients are computed at every step and they never move (a preset for the ID model zeroes the
    rate; a content model built on it keeps it unless told otherwise)."""
    if float(cfg.encoder_lr) != 0.0 or not hasattr(model, "encoder_modules"):
        return None
    n = sum(p.numel() for m in model.encoder_modules() for p in m.parameters() if p.requires_grad)
    if not n:
        return None
    return (f"warning: optim.encoder_lr=0 but {n:,} item-encoder weights are trainable: their gradients are "
            f"computed and they never move; set optim.encoder_lr (e.g. 1e-4), or freeze them "
            f"(model.text.trainable=none model.image.trainable=none)")


def make_optimizer(model: nn.Module, cfg, *, flat: bool = False) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; ``flat=True`` gives :class:`FlatAdamW` (for DeepSpeed
    without ZeRO and without bf16, where nothing else flattens the weights)."""
    groups = param_groups(model, cfg.lr, cfg.encoder_lr, cfg.weight_decay, cfg.id_lr, cfg.id_weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if flat:
        return FlatAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    # The fused AdamW kernel exists for CPU and CUDA tensors in torch >= 2.4 (one pass per tensor
    # instead of a dozen elementwise ops); the plain one is the fallback.
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


class FlatAdamW(torch.optim.AdamW):
    """AdamW that updates each parameter group as one flat tensor.

    The weights stay ordinary separate tensors (nothing outside sees a difference: checkpoints,
    exports and ``load_state_dict`` work on them as with torch's AdamW). The moments live in one
    flat buffer per group; the optimizer state holds per-parameter views of it, so ``state_dict``
    has torch's AdamW layout and a checkpoint of either optimizer loads into the other. Each step
    gathers the group's weights and gradients into flat buffers (one copy each), runs one fused
    AdamW update (or the plain one where no fused kernel exists) and copies the weights back.

    A parameter without a gradient is stepped with a zero gradient (decay and moments still apply),
    as after DeepSpeed's stage-0 gradient reduction, which gives every such parameter zeros; so the
    parameters of a group share one step count. Groups must hold dense tensors of one dtype and device.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        for g in self.param_groups:
            ps = g["params"]
            if any(p.is_sparse or p.dtype != ps[0].dtype or p.device != ps[0].device for p in ps):
                raise ValueError("FlatAdamW: a parameter group mixes dtypes/devices or holds sparse tensors")
        self._flat: list[dict | None] = [None] * len(self.param_groups)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_flat"):
            self._flat.append(None)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        # one step counter per parameter, as torch's AdamW has it (here they share one tensor)
        sd["state"] = {k: {**v, "step": v["step"].clone()} if "step" in v else v
                       for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._flat = [None] * len(self.param_groups)  # re-gathered from the loaded state at the next step

    def _buffers(self, i: int, group: dict) -> dict:
        fb = self._flat[i]
        if fb is not None:
            return fb
        params = group["params"]
        n = sum(p.numel() for p in params)
        like = params[0]
        fb = {"param": like.new_empty(n), "grad": like.new_empty(n), "exp_avg": like.new_zeros(n),
              "exp_avg_sq": like.new_zeros(n), "sizes": [p.numel() for p in params],
              "step": torch.zeros((), dtype=torch.float32, device=like.device)}
        off = 0
        for p in params:
            k, st = p.numel(), self.state[p]
            views = {"exp_avg": fb["exp_avg"][off:off + k].view_as(p),
                     "exp_avg_sq": fb["exp_avg_sq"][off:off + k].view_as(p)}
            if "exp_avg" in st:  # state loaded from a checkpoint (or a per-tensor AdamW)
                for key, v in views.items():
                    v.copy_(st[key])
                fb["step"].fill_(float(st["step"]))
            st.update(views, step=fb["step"])
            off += k
        self._flat[i] = fb
        return fb

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            params = group["params"]
            if not params:
                continue
            fb = self._buffers(i, group)
            torch.cat([p.reshape(-1) for p in params], out=fb["param"])
            torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params],
                      out=fb["grad"])
            beta1, beta2 = group["betas"]
            # the fused kernel exists for CPU and CUDA tensors; elsewhere the plain update
            fused = True if fb["param"].device.type in ("cpu", "cuda") else None
            _adam_functional([fb["param"]], [fb["grad"]], [fb["exp_avg"]], [fb["exp_avg_sq"]], [],
                             [fb["step"]], foreach=False, fused=fused, decoupled_weight_decay=True,
                             amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                             weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            views = fb["param"].split(fb["sizes"])
            torch._foreach_copy_(params, [v.view_as(p) for v, p in zip(views, params)])
        return loss


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


def learning_rates(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(the user side's learning rate, the item encoders'): NaN for a side with no group."""
    lr = enc = float("nan")
    for g in optimizer.param_groups:
        if g.get("name", "").startswith("encoder"):
            enc = g["lr"]
        else:
            lr = g["lr"]
    return lr, enc
