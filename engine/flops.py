"""Model FLOPs of a training step: counted by torch, and by formula where the model is transformers.

**Counted** (:func:`counting`): ``torch.utils.flop_counter.FlopCounterMode`` around a real training
step (forward, backward, optimizer) on every rank, which adds up the matrix products, convolutions
and attention that torch dispatches: ``2 m n k`` per product, forward and backward. Two things
would make a counted step differ from the model's own FLOPs, and both are switched off for the
counted step: a fused Triton loss kernel is opaque to the counter (the loss runs through the
``torch`` reference for that step: ``2 N M D`` forward, ``4 N M D`` backward, exactly the model's
FLOPs of a linear cross-entropy), and gradient checkpointing recomputes blocks (off for that step).
Elementwise work (activations, norms, the optimizer's update) is not counted, by the usual
convention of model FLOPs utilisation, and neither are the attention scores a flash kernel
recomputes in its backward (the counter's attention formulas are replaced to that end).

**By formula** (:func:`analytic_flops`): a BERT-family text encoder, the user encoder and the
in-batch softmax, from the batch's shapes and which weights train. Its use is the check of the
counter (tests compare the two within 2 %) and a reading of where the FLOPs go; an image encoder,
LoRA adapters and negatives beyond the batch (but the ID model's whole table) have no formula
here (None).

    transformer block, R rows of S tokens, width H, feed-forward I:
        forward   8 R S H^2 (Q, K, V, output) + 4 R S H I (feed-forward) + 4 R S^2 H (attention)
        backward  twice the forward; a block whose input carries no gradient skips the Q, K, V
                  input gradient (6 R S H^2)
    user encoder (width d, 4d feed-forward, B rows of n positions):  3 (24 B n d^2 + 4 B n^2 d)
    softmax over M keys (the batch's unique items, or the ID table), N query rows:  6 N M d
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def _attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                        **kwargs) -> int:
    """torch's count of an attention backward less the scores a flash kernel recomputes (``Q K^T``):
    the model's backward, twice its forward."""
    b, h, s_q, d_q = query_shape
    s_k = key_shape[2]
    full = flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
    return full - 2 * b * h * s_q * s_k * d_q


def _model_formulas() -> dict:
    """Overrides of torch's counter for model FLOPs: attention backwards without recomputation, and
    the CPU flash kernel (which ``scaled_dot_product_attention`` picks for a CPU batch without
    padding, and torch's counter does not know) like the GPU ones."""
    aten, out = torch.ops.aten, {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        if hasattr(aten, name):
            out[getattr(aten, name)] = _attention
    for name in ("_scaled_dot_product_flash_attention_backward",
                 "_scaled_dot_product_efficient_attention_backward",
                 "_scaled_dot_product_cudnn_attention_backward",
                 "_scaled_dot_product_flash_attention_for_cpu_backward"):
        if hasattr(aten, name):
            out[getattr(aten, name)] = _attention_backward
    return out


@dataclass
class FlopCount:
    """What :func:`counting` found: FLOPs of the counted step on this rank."""

    total: int = 0
    by_op: dict[str, int] = field(default_factory=dict)


def model_flop_counter() -> FlopCounterMode:
    """torch's FLOP counter with the model-FLOPs formulas of :func:`_model_formulas`."""
    return FlopCounterMode(display=False, custom_mapping=_model_formulas())


@contextlib.contextmanager
def counting(model: torch.nn.Module) -> Iterator[FlopCount]:
    """Count the FLOPs of what runs inside (forward and backward), with ``model``'s loss through the
    torch reference and its gradient checkpointing off; both are restored after."""
    out = FlopCount()
    loss_cfg = getattr(getattr(model, "criterion", None), "cfg", None)
    impl = getattr(loss_cfg, "impl", None)
    ckpt = [(m, m.grad_ckpt) for m in model.modules() if isinstance(getattr(m, "grad_ckpt", None), bool)]
    try:
        if loss_cfg is not None:
            loss_cfg.impl = "torch"
        for m, _ in ckpt:
            m.grad_ckpt = False
        counter = model_flop_counter()
        with counter:
            yield out
        out.total = int(counter.get_total_flops())
        out.by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    finally:
        if loss_cfg is not None:
            loss_cfg.impl = impl
        for m, flag in ckpt:
            m.grad_ckpt = flag


# ----------------------------------------------------------------------------- formulas

def block_flops(rows: int, seq: int, width: int, ff: int, *, trains: bool, input_grad: bool) -> int:
    """One transformer block (see the module docstring); ``trains``: its weights have gradients."""
    lin = 8 * rows * seq * width ** 2 + 4 * rows * seq * width * ff
    att = 4 * rows * seq ** 2 * width
    fwd = lin + att
    if not trains:
        return fwd
    bwd = 2 * fwd
    if not input_grad:
        bwd -= 6 * rows * seq * width ** 2
    return fwd + bwd


def user_encoder_flops(user: torch.nn.Module, batch_rows: int, positions: int, dim: int) -> int:
    """Every block of the user encoder, trained, over ``batch_rows`` x ``positions``."""
    layers = len(user.blocks)
    return layers * block_flops(batch_rows, positions, dim, 4 * dim, trains=True, input_grad=True)


def text_encoder_flops(enc, text) -> int | None:
    """A BERT-family text encoder over the batch's text items (None: no formula for it)."""
    if not getattr(enc, "walkable", False) or getattr(enc, "lora_layers", 0):
        return None
    if enc.pool.kind not in ("mean", "cls"):
        return None
    c = enc.backbone.config
    rows, seq = int(text.input_ids.shape[0]), int(text.input_ids.shape[1])
    h, ff, dim = int(c.hidden_size), int(c.intermediate_size), int(enc.proj.out_features)
    total = 0
    if text.prefix is None:  # the frozen prefix runs, forward only
        total += enc.n_frozen_blocks * block_flops(rows, seq, h, ff, trains=False, input_grad=False)
    input_grad = bool(enc.train_stem)
    for _ in range(enc.n_trainable_blocks):
        total += block_flops(rows, seq, h, ff, trains=True, input_grad=input_grad)
        input_grad = True
    proj = 2 * rows * h * dim
    total += proj + proj * (2 if input_grad else 1)  # forward; weight gradient (+ input gradient)
    return total


def analytic_flops(model: torch.nn.Module, batch) -> dict | None:
    """``{"item_encoding", "user_encoder", "loss", "total"}`` FLOPs of one training micro-batch by
    formula, or None where a part has none (an image item in the batch, LoRA, negatives beyond the
    in-batch ones, a user encoder that is not the project's transformer)."""
    loss_cfg = model.criterion.cfg
    content = hasattr(model, "text_encoder")
    if loss_cfg.kind != "softmax" or not hasattr(model.user, "blocks"):
        return None
    if loss_cfg.negatives == "inbatch":
        keys = int(batch.num_unique)
    elif loss_cfg.negatives == "catalogue" and not content:  # the ID table: every item, with gradient
        keys = int(model.n_items)
    else:
        return None
    dim = int(model.dim)
    item = 0
    if content:
        if batch.image is not None and batch.image.index.numel():
            return None
        if batch.text is not None and batch.text.index.numel():
            text = text_encoder_flops(model.text_encoder, batch.text)
            if text is None:
                return None
            item += text
    b, length = int(batch.seq.shape[0]), int(batch.seq.shape[1])
    n = length - 1
    user = user_encoder_flops(model.user, b, n, dim)
    rows = b * n if model.user.causal else b
    loss = 6 * rows * keys * dim
    return {"item_encoding": item, "user_encoder": user, "loss": loss, "total": item + user + loss}
