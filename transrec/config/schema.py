"""The run configuration's schema: sections as dataclasses, and the checks a type cannot express.

A run is described by one :class:`Config` with six sections::

    model      ModelConfig (transrec.config.model): text/image/user encoders, loss, LoRA
    data       dataset folder, global batch, micro-batch, sequence length, loader workers
    optim      steps, learning rates (item encoders vs the rest), warmup + cosine, clipping
    deepspeed  ZeRO stage, precision, in-batch negative pool, or a whole DeepSpeed JSON
    eval       full-ranking evaluation: when, batch size, item chunk, cut-offs
    run        output folder, seed, logging, checkpoints, initial weights

It is built from a preset (a function returning a whole ``Config``), then a YAML file, then
``key=value`` overrides with dotted keys (``optim.lr=3e-4``, ``model.user.layers=4``). Every value is
checked against the field's type; an unknown key stops with one line naming it and the closest
valid key. ``to_deepspeed`` derives the DeepSpeed JSON from the config unless
``deepspeed.config_file`` gives it whole.

Gradient accumulation and the negative pool: in-batch softmax scores each position against the
unique items of *its own micro-batch* (and, with ``model.loss.negatives=global``, of the same
micro-batch on every rank). Accumulating ``g`` micro-batches therefore gives the gradient of a
``g``-times larger batch of *rows* but keeps the negative pool of one micro-batch: it is not the
same objective as one large batch. Use it to fit memory; raise ``world size x micro-batch`` with
global negatives to grow the pool.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from typing import Literal

from transrec.config.check import check_choices
from transrec.config.model import ModelConfig, validate_model_config
from transrec.errors import ConfigError


@dataclass
class DataConfig:
    path: str = ""  # dataset folder (transrec shards synth|build|convert output)
    batch_size: int = 64  # global batch: sequences per optimizer step over all ranks and micro-batches
    micro_batch_size: int = 0  # sequences per rank per forward; 0 = batch_size / world size
    max_len: int = 20  # history positions per training window
    num_workers: int = 0  # loader worker processes per rank
    policy: Literal["repeat", "drop"] = "repeat"  # equal batches on every rank: repeat or drop
    # training samples per user: its last max_len+1 items, windows covering its whole training part
    # (each item after the first a target once), or one window per target position (every prefix)
    windows: Literal["last", "sliding", "prefixes"] = "last"
    cache_dir: str = ""  # item cache folder; "" = inside the dataset folder (a store's: see docs/data.md)
    # Shards streamed from an object store (s3://, https://) are also kept in this local folder, so
    # a second epoch or a restart reads them from disk ("" = off); least recently used go first
    # once it holds more than shard_cache_gb.
    shard_cache: str = ""
    shard_cache_gb: float = 50.0
    # The run stops (exit 2) when more than this share of the items (bad content in the item cache)
    # or of the sequences read (unreadable or malformed rows) was skipped as bad input.
    max_skip_rate: float = 0.05
    # Frozen-prefix cache: run an item encoder's frozen bottom blocks once per item and train
    # only the tail on the stored activations (falls back, with one log line, where it cannot apply).
    prefix_cache: bool = True
    prefix_cache_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


@dataclass
class OptimConfig:
    steps: int = 1000  # optimizer steps in total
    lr: float = 1e-3  # user encoder, projections, ID tables
    encoder_lr: float = 1e-4  # text and image item encoders
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 50  # linear warmup from 0, then cosine to min_lr_ratio x lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global L2 norm; 0 disables (it is always written to the DeepSpeed JSON)
    id_lr: float = 0.0  # the per-item vectors of model.item.id_residual (0 = optim.lr)
    id_weight_decay: float = 0.0  # their weight decay (pulls an item's vector back to its content)


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0  # 0, 1, 2 or 3
    precision: Literal["fp32", "bf16"] = "fp32"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto = nccl on CUDA, gloo on the CPU
    config_file: str = ""  # a whole DeepSpeed JSON; replaces the derived one (batch sizes checked)


@dataclass
class EvalConfig:
    every: int = 0  # evaluate on validation every N steps (0 = at the end only)
    batch_size: int = 256  # users per evaluation batch
    item_chunk: int = 1024  # items per encoder pass when encoding the catalogue
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    max_users: int = 0  # evaluate on the first N users of the split (0 = all)
    # remove the user's earlier items from the ranking (True), or rank them too (RecBole's protocol)
    exclude_history: bool = True


@dataclass
class RunConfig:
    out: str = ""  # run folder (checkpoints, metrics.jsonl, TensorBoard events, config.yaml)
    seed: int = 0
    log_every: int = 10  # steps between metric lines
    ckpt_every: int = 0  # steps between checkpoints (0 = at the end only)
    # minutes between checkpoints (0 = off), beside ckpt_every: whichever comes first saves
    ckpt_every_minutes: float = 0.0
    # signals that stop the run gracefully: every rank finishes the step in flight, they agree on
    # the step, a checkpoint of it is written, and the process exits with code 75; "" = none
    stop_signals: str = "SIGTERM,SIGUSR1"
    keep_last: int = 2  # checkpoints kept
    resume: bool = True  # continue from the run folder's latest checkpoint when there is one
    max_bad_steps: int = 5  # optimizer steps in a row with a non-finite loss/gradient before the run stops
    # validation metric that picks the best checkpoint (higher is better), "valid/NAME" with NAME one of
    # hr@K / ndcg@K (K in eval.ks) or mrr; "" = no best checkpoint, no early stop
    monitor: str = "valid/ndcg@10"
    patience: int = 0  # validation evaluations without improvement before the run stops (0 = never)
    init_from: str = ""  # an export folder whose weights start this run (transfer)
    # tqdm bars (on), plain log lines on stderr (off), or bars when stderr is a terminal (auto);
    # true/false (older run folders' config.yaml) read as on/off
    progress: Literal["auto", "on", "off"] = "auto"
    tensorboard: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = ""  # the preset this config started from (informational)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Every check of a whole config that needs no torch: choices, ranges and the cross-field ones a
    type cannot express; ConfigError naming the key."""
    for name in ("data", "optim", "deepspeed", "eval", "run"):
        check_choices(getattr(cfg, name), name)
    validate_model_config(cfg.model)
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    def value(key):
        sec, name = key.split(".")
        return getattr(getattr(cfg, sec), name)

    for key in ("data.batch_size", "data.max_len", "optim.steps", "eval.batch_size", "eval.item_chunk",
                "run.log_every", "run.keep_last", "run.max_bad_steps"):
        if value(key) <= 0:
            raise ConfigError(f"{key} must be positive, got {value(key)}")
    for key in ("data.num_workers", "data.micro_batch_size", "run.ckpt_every", "eval.every",
                "eval.max_users", "run.patience"):
        if value(key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {value(key)}")
    if not math.isfinite(cfg.run.ckpt_every_minutes) or cfg.run.ckpt_every_minutes < 0:
        raise ConfigError(f"run.ckpt_every_minutes must be >= 0, got {cfg.run.ckpt_every_minutes}")
    stop_signal_numbers(cfg.run.stop_signals)
    batch_layout(cfg, world_size)
    if cfg.data.max_len > cfg.model.user.max_len:
        raise ConfigError(f"data.max_len={cfg.data.max_len} is longer than model.user.max_len="
                          f"{cfg.model.user.max_len}, the positions the user encoder has; raise "
                          "model.user.max_len or lower data.max_len")
    if not 0 <= cfg.data.max_skip_rate <= 1:
        raise ConfigError(f"data.max_skip_rate must be in [0, 1], got {cfg.data.max_skip_rate}")
    if not cfg.data.shard_cache_gb > 0:
        raise ConfigError(f"data.shard_cache_gb must be positive, got {cfg.data.shard_cache_gb}")
    o = cfg.optim
    for key in ("lr", "encoder_lr", "weight_decay", "beta1", "beta2", "eps", "min_lr_ratio", "grad_clip",
                "id_lr", "id_weight_decay"):
        if not math.isfinite(getattr(o, key)):
            raise ConfigError(f"optim.{key} must be a finite number, got {getattr(o, key)}")
    if o.lr <= 0 or o.encoder_lr < 0 or o.id_lr < 0 or o.id_weight_decay < 0:
        raise ConfigError("optim.lr must be positive and optim.encoder_lr, optim.id_lr, "
                          "optim.id_weight_decay non-negative")
    if o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
    if o.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip must be >= 0, got {o.grad_clip}")
    if not cfg.eval.ks or any(k <= 0 for k in cfg.eval.ks):
        raise ConfigError(f"eval.ks must be positive cut-offs, got {cfg.eval.ks}")
    monitor_metric(cfg)


def stop_signal_numbers(names: str) -> list[int]:
    """``run.stop_signals`` ("SIGTERM,SIGUSR1"; names with or without "SIG", any case) as signal
    numbers; ConfigError naming one that is unknown or cannot be caught (SIGKILL, SIGSTOP)."""
    out = []
    for raw in str(names or "").replace(" ", "").split(","):
        if not raw:
            continue
        name = raw.upper() if raw.upper().startswith("SIG") else "SIG" + raw.upper()
        sig = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"run.stop_signals: {raw!r} is not a signal a process can catch "
                              "(e.g. SIGTERM,SIGUSR1)")
        out.append(int(sig))
    return out


def monitor_metric(cfg: Config) -> str:
    """The metric name ``run.monitor`` watches on the validation split ("" when it is off); ConfigError
    for a name the evaluation does not report."""
    mon = cfg.run.monitor.strip()
    if not mon:
        if cfg.run.patience:
            raise ConfigError("run.patience needs run.monitor (e.g. run.monitor=valid/ndcg@10)")
        return ""
    names = [f"{m}@{k}" for k in cfg.eval.ks for m in ("hr", "ndcg")] + ["mrr"]
    split, _, name = mon.partition("/")
    if split != "valid" or name not in names:
        raise ConfigError(f"run.monitor must be valid/NAME with NAME one of {', '.join(names)} "
                          f"(or empty), got {mon!r}")
    return name


def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, gradient accumulation steps) with micro x accum x world = batch_size."""
    gb = cfg.data.batch_size
    micro = cfg.data.micro_batch_size or gb // world_size
    if micro <= 0 or gb % (micro * world_size):
        raise ConfigError(
            f"data.batch_size={gb} must be a multiple of data.micro_batch_size x world size "
            f"({cfg.data.micro_batch_size or 'auto'} x {world_size})")
    return micro, gb // (micro * world_size)
