"""The DeepSpeed JSON a config implies (or the user's own, its batch sizes checked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transrec.config.schema import Config, batch_layout
from transrec.errors import ConfigError


def to_deepspeed(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for ``cfg`` (or the file ``deepspeed.config_file``, batch sizes checked)."""
    micro, accum = batch_layout(cfg, world_size)
    if cfg.deepspeed.config_file:
        p = Path(cfg.deepspeed.config_file)
        if not p.is_file():
            raise ConfigError(f"deepspeed.config_file not found: {p}")
        try:
            ds = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        for k, want in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum),
                        ("train_batch_size", cfg.data.batch_size)):
            if k in ds and ds[k] != want:
                raise ConfigError(f"{p}: {k}={ds[k]} disagrees with the config ({want}); "
                                  "set data.batch_size / data.micro_batch_size instead")
        if "optimizer" in ds or "scheduler" in ds:
            raise ConfigError(f"{p}: 'optimizer'/'scheduler' are set by the engine (optim.*); remove them")
        ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
                  train_batch_size=cfg.data.batch_size)
        ds.setdefault("gradient_clipping", cfg.optim.grad_clip)
        ds.setdefault("zero_allow_untested_optimizer", True)
        return ds
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if cfg.deepspeed.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "fp16": {"enabled": False},
        # The engine passes a torch AdamW (no compiled optimizer ops needed on the CPU).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
