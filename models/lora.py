"""LoRA through peft on item encoders: injection, trainable-parameter report, adapter-only
save/load (safetensors), merge for export, and loading plain weights into a LoRA model.

Adapters are injected with ``peft.inject_adapter_in_model`` straight into the encoder's blocks, so
the encoder's own forward (which walks its blocks one by one for the prefix/tail split) is
unchanged. A wrapped layer's base weight is renamed ``<name>.base_layer.weight``;
:func:`load_base_weights` maps plain (non-LoRA) state dicts onto that naming, and
:func:`merge_lora` folds the adapters back so an export has the plain names again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from transrec.errors import ConfigError
from transrec.models.negatives import STATE_PREFIX

# Default LoRA targets per architecture (module-name suffixes inside a block).
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "vit": ["query", "key", "value", "dense", "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
    "resnet": ["convolution"],
    "convnext": ["pwconv1", "pwconv2"],
    "efficientnet": ["_expand_conv", "_project_conv"],
}


def _plain_pointwise_convs(block: nn.Module, targets: list[str]) -> None:
    """Swap targeted 1x1 / stride-1 convolutions of an ``nn.Conv2d`` subclass (EfficientNet's
    TF-style "same"-padding convs, whose padding is then zero) for a plain ``nn.Conv2d`` holding the
    same parameters: peft builds the adapter's convolutions with the base layer's class and
    positional arguments, which such subclasses do not accept."""
    for name, mod in list(block.named_modules()):
        if (type(mod) is not nn.Conv2d and isinstance(mod, nn.Conv2d) and name
                and name.rsplit(".", 1)[-1] in targets and tuple(mod.kernel_size) == (1, 1)
                and tuple(mod.stride) in ((1, 1), (1,)) and mod.groups == 1):
            plain = nn.Conv2d(mod.in_channels, mod.out_channels, 1, bias=mod.bias is not None,
                              device=mod.weight.device, dtype=mod.weight.dtype)
            plain.weight = mod.weight
            if mod.bias is not None:
                plain.bias = mod.bias
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, plain)


def inject_lora(blocks: list[nn.Module], arch: str, cfg) -> int:
    """Add LoRA adapters to ``blocks`` (in place); returns the number of wrapped layers."""
    if cfg.target_modules:
        targets = list(cfg.target_modules)
    else:  # the architecture's defaults that exist here (module names differ across versions)
        present = {n.rsplit(".", 1)[-1] for blk in blocks for n, _ in blk.named_modules() if n}
        targets = [t for t in DEFAULT_TARGETS.get(arch, []) if t in present]
    if not targets:
        raise ConfigError(f"no default LoRA target modules for architecture {arch!r}; "
                          "set lora.target_modules")
    pcfg = PeftLoraConfig(r=int(cfg.r), lora_alpha=int(cfg.alpha), lora_dropout=float(cfg.dropout),
                          target_modules=targets, bias="none")
    wrapped = 0
    for block in blocks:
        _plain_pointwise_convs(block, targets)
        before = sum(isinstance(m, BaseTunerLayer) for m in block.modules())
        try:
            inject_adapter_in_model(pcfg, block)
        except ValueError as e:  # peft: "Target modules ... not found in the base model"
            raise ConfigError(f"LoRA target modules {targets} match nothing in a {arch} block: "
                              f"{str(e).splitlines()[0]}") from None
        wrapped += sum(isinstance(m, BaseTunerLayer) for m in block.modules()) - before
    return wrapped


def is_lora_param(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only (names as in ``model.state_dict()``)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if is_lora_param(k)}


def save_adapters(model: nn.Module, path: str | Path) -> int:
    """Write the adapter weights to a safetensors file; returns the number of tensors."""
    sd = lora_state_dict(model)
    if not sd:
        raise ConfigError("the model has no LoRA adapters to save")
    save_file(sd, str(path))
    return len(sd)


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Load adapter weights written by :func:`save_adapters`; every adapter key must match."""
    sd = load_file(str(path))
    own = {k for k in model.state_dict() if is_lora_param(k)}
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or unexpected:
        raise ConfigError(f"adapter file {path} does not fit the model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    model.load_state_dict(sd, strict=False)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and drop the wrapper (in place).

    Afterwards parameter names are the plain ones again (no ``base_layer``), ready for export.
    Returns the number of merged layers.
    """
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged


def load_base_weights(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True,
                      skip: tuple[str, ...] = ()):
    """Load a plain state dict (e.g. a full-weights export) into a model that may carry LoRA.

    Keys of wrapped layers (``x.base_layer.weight``) are filled from ``x.weight``; adapter weights
    keep their initialisation; the loss's training state (``STATE_PREFIX``) is not a weight and
    keeps its own, and so do the keys starting with one of ``skip`` (on either side). With
    ``strict`` every other non-adapter key must be present.
    """
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(skip)} if skip else state
    out, missing = {}, []
    for k in own:
        if is_lora_param(k) or k.startswith(STATE_PREFIX) or (skip and k.startswith(skip)):
            continue
        src = k if k in state else k.replace(".base_layer", "")
        if src in state:
            out[k] = state[src]
        else:
            missing.append(k)
    used = {k.replace(".base_layer", "") for k in out} | set(out)
    unexpected = [k for k in state if k not in used]
    if strict and (missing or unexpected):
        raise ConfigError(f"weights do not fit the model: missing {missing[:3]} ({len(missing)}), "
                          f"unexpected {unexpected[:3]} ({len(unexpected)})")
    model.load_state_dict(out, strict=False)
    return missing, unexpected


def trainable_report(model: nn.Module) -> str:
    """One line per top-level child: trainable / total parameters, then the total."""
    lines = []
    tot_t = tot = 0
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        t = sum(p.numel() for p in child.parameters() if p.requires_grad)
        lo = sum(p.numel() for k, p in child.named_parameters() if is_lora_param(k))
        extra = f" (LoRA {lo:,})" if lo else ""
        lines.append(f"{name:<16} trainable {t:>12,} / {n:>12,}{extra}")
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        tot += p.numel()
        tot_t += p.numel() if p.requires_grad else 0
    pct = 100.0 * tot_t / max(tot, 1)
    lines.append(f"{'total':<16} trainable {tot_t:>12,} / {tot:>12,} ({pct:.2f}%)")
    return "\n".join(lines)
