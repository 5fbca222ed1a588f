"""Typed run configuration: sections as dataclasses, named presets as functions, overrides checked.

A run is described by one :class:`Config` with six sections::

    model      ModelConfig (transrec.models.config): text/image/user encoders, loss, LoRA
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

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from transrec.errors import ConfigError
from transrec.models.config import ModelConfig


@dataclass
class DataConfig:
    path: str = ""  # dataset folder (transrec shards synth|build|convert output)
    batch_size: int = 64  # global batch: sequences per optimizer step over all ranks and micro-batches
    micro_batch_size: int = 0  # sequences per rank per forward; 0 = batch_size / world size
    max_len: int = 20  # history positions per training window
    num_workers: int = 0  # loader worker processes per rank
    policy: Literal["repeat", "drop"] = "repeat"  # equal batches on every rank: repeat or drop
    cache_dir: str = ""  # item cache folder; "" = inside the dataset folder
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


@dataclass
class RunConfig:
    out: str = ""  # run folder (checkpoints, metrics.jsonl, TensorBoard events, config.yaml)
    seed: int = 0
    log_every: int = 10  # steps between metric lines
    ckpt_every: int = 0  # steps between checkpoints (0 = at the end only)
    keep_last: int = 2  # checkpoints kept
    resume: bool = True  # continue from the run folder's latest checkpoint when there is one
    init_from: str = ""  # an export folder whose weights start this run (transfer)
    progress: bool = True  # tqdm bars
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


# ----------------------------------------------------------------------------- type checking

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _dataclass_in(tp):
    """The dataclass type of ``tp`` or of ``Optional[tp]``, else None."""
    if _is_dataclass_type(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp, key: str) -> Any:
    """``value`` checked (and, where lossless, converted) against type ``tp``; ConfigError if not."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"config key '{key}': {value!r} is not {_type_name(tp)}")
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:  # an exact type match first (2 stays an int in ``str | int``)
            if isinstance(a, type) and type(value) is a:
                return value
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError:
                continue
        raise bad
    if origin in (list, tuple):
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise bad
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        out = [coerce(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None or isinstance(value, dict | list):
            raise bad
        return str(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if value is True or value == {}:  # "model.text.lora=true": the section with its defaults
            return tp()
        if isinstance(value, dict):
            obj = tp()
            apply_dict(obj, value, prefix=key + ".")
            return obj
        raise bad
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad


def valid_keys(obj, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) dataclass instance or type."""
    cls = obj if isinstance(obj, type) else type(obj)
    keys = []
    for name, tp in _hints(cls).items():
        keys.append(prefix + name)
        sub = getattr(obj, name, None) if not isinstance(obj, type) else None
        if sub is not None and dataclasses.is_dataclass(sub):
            keys.extend(valid_keys(sub, prefix + name + "."))
        elif _dataclass_in(tp) is not None:
            keys.extend(valid_keys(_dataclass_in(tp), prefix + name + "."))
    return keys


def _unknown(key: str, root) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(root), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def set_key(cfg, key: str, value: Any, *, root=None) -> None:
    """Set a dotted ``key`` of ``cfg`` to ``value`` (checked against the field's type)."""
    root = cfg if root is None else root
    obj = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in _hints(type(obj)):
            raise _unknown(key, root)
        tp = _hints(type(obj))[part]
        current = getattr(obj, part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                apply_dict(current, value, prefix=".".join(parts) + ".", root=root)
            else:
                setattr(obj, part, coerce(value, tp, key))
            return
        if current is None and _dataclass_in(tp) is not None:  # an optional section switched on
            current = _dataclass_in(tp)()
            setattr(obj, part, current)
        obj = current


def apply_dict(cfg, values: dict, prefix: str = "", root=None) -> None:
    """Apply a nested mapping (a YAML document) to ``cfg``."""
    root = cfg if root is None else root
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    for k, v in values.items():
        full = prefix + str(k)
        obj = cfg
        if not dataclasses.is_dataclass(obj) or str(k) not in _hints(type(obj)):
            raise _unknown(full, root)
        current = getattr(obj, str(k))
        tp = _hints(type(obj))[str(k)]
        if current is None and isinstance(v, dict) and _dataclass_in(tp) is not None:
            current = _dataclass_in(tp)()
            setattr(obj, str(k), current)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            apply_dict(current, v, prefix=full + ".", root=root)
        else:
            setattr(obj, str(k), coerce(v, _hints(type(obj))[str(k)], full))


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 3e-4)``; the value is read as YAML (so 1e-3, true, [5, 10])."""
    text = text[2:] if text.startswith("--") else text
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-3" as a string; float fields accept it through coerce().
    return key, value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> Config:
    cfg = Config()
    apply_dict(cfg, values)
    return cfg


def save_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config sections")
    return values


# ----------------------------------------------------------------------------- validation

def validate(cfg: Config, world_size: int = 1) -> None:
    """Cross-field checks a type cannot express; ConfigError naming the key."""
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    for key in ("data.batch_size", "data.max_len", "optim.steps", "eval.batch_size", "eval.item_chunk"):
        sec, name = key.split(".")
        if getattr(getattr(cfg, sec), name) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(getattr(cfg, sec), name)}")
    micro, accum = batch_layout(cfg, world_size)
    del micro, accum
    if cfg.optim.lr <= 0 or cfg.optim.encoder_lr < 0:
        raise ConfigError("optim.lr must be positive and optim.encoder_lr non-negative")
    if cfg.optim.warmup_steps < 0 or not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
    if cfg.optim.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip must be >= 0, got {cfg.optim.grad_clip}")
    if not cfg.eval.ks or any(k <= 0 for k in cfg.eval.ks):
        raise ConfigError(f"eval.ks must be positive cut-offs, got {cfg.eval.ks}")


def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, gradient accumulation steps) with micro x accum x world = batch_size."""
    gb = cfg.data.batch_size
    micro = cfg.data.micro_batch_size or gb // world_size
    if micro <= 0 or gb % (micro * world_size):
        raise ConfigError(
            f"data.batch_size={gb} must be a multiple of data.micro_batch_size x world size "
            f"({cfg.data.micro_batch_size or 'auto'} x {world_size})")
    return micro, gb // (micro * world_size)


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


# ----------------------------------------------------------------------------- presets

def model_tiny() -> ModelConfig:
    """Random-init tiny encoders: 2-layer BERT (128 hidden) over titles, a small CNN at 32x32."""
    m = ModelConfig(dim=64)
    # Both blocks train; the random word-embedding table (3.9M of the 4.4M text weights) stays
    # frozen, which makes a step several times cheaper on a CPU and loses little at this size.
    m.text.name, m.text.trainable, m.text.max_len, m.text.pooling = "tiny", 2, 16, "mean"
    m.image.name, m.image.trainable, m.image.image_size = "tiny", "all", 32
    m.user.layers, m.user.heads, m.user.dropout, m.user.max_len = 2, 2, 0.1, 20
    m.loss.temperature = 0.1
    m.loss.l2_normalize = True
    return m


def model_pretrained() -> ModelConfig:
    """Pretrained all-MiniLM-L6-v2 titles + EfficientNet-Lite0 covers, top 2 blocks trained."""
    m = ModelConfig(dim=128)
    m.text.name, m.text.trainable, m.text.max_len = "minilm", 2, 32
    m.image.name, m.image.trainable, m.image.image_size = "efficientnet-lite0", 2, 224
    m.user.layers, m.user.heads, m.user.max_len = 2, 4, 20
    m.loss.temperature = 0.07
    m.loss.l2_normalize = True
    return m


def _tiny_model(cfg: Config) -> None:
    cfg.model = model_tiny()


def preset_tiny() -> Config:
    """Tiny random-init encoders; seconds per hundred steps on a laptop CPU. Tests use it."""
    cfg = Config(preset="tiny")
    _tiny_model(cfg)
    cfg.data = DataConfig(batch_size=32, max_len=10)
    cfg.optim = OptimConfig(steps=100, lr=3e-3, encoder_lr=1e-3, warmup_steps=10)
    cfg.eval = EvalConfig(batch_size=128, item_chunk=512)
    cfg.run = RunConfig(log_every=10, keep_last=2)
    return cfg


def preset_demo_cpu() -> Config:
    """The demo's model: tiny encoders sized so pretraining + four transfers fit minutes on 2 cores."""
    cfg = preset_tiny()
    cfg.preset = "demo-cpu"
    cfg.data = DataConfig(batch_size=64, max_len=10)
    cfg.optim = OptimConfig(steps=200, lr=3e-3, encoder_lr=1e-3, warmup_steps=20)
    cfg.run.progress = True
    return cfg


def preset_small_gpu() -> Config:
    """Pretrained MiniLM-L6 text + EfficientNet-Lite0 image encoders, top-2 blocks trained, bf16."""
    cfg = Config(preset="small-gpu", model=model_pretrained())
    cfg.model.loss.negatives = "global"
    cfg.data = DataConfig(batch_size=256, max_len=20, num_workers=4)
    cfg.optim = OptimConfig(steps=5000, lr=1e-3, encoder_lr=1e-4, warmup_steps=200)
    cfg.deepspeed = DeepSpeedSection(zero_stage=2, precision="bf16")
    cfg.eval = EvalConfig(every=1000, batch_size=1024, item_chunk=4096)
    cfg.run = RunConfig(ckpt_every=1000)
    return cfg


def preset_base_gpu() -> Config:
    """BERT-base-sized text and ResNet-18-sized image encoders (random init unless
    model.text.name / model.image.name name local pretrained folders), ZeRO-2, bf16."""
    cfg = preset_small_gpu()
    cfg.preset = "base-gpu"
    cfg.model.dim = 256
    cfg.model.text.name, cfg.model.image.name = "base", "resnet18"
    cfg.model.user.layers = 4
    cfg.data.batch_size = 512
    cfg.optim.steps = 20000
    return cfg


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "tiny": preset_tiny,
    "demo-cpu": preset_demo_cpu,
    "small-gpu": preset_small_gpu,
    "base-gpu": preset_base_gpu,
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def build_config(preset_name: str = "tiny", file: str | Path | None = None,
                 overrides: typing.Iterable[str] = ()) -> Config:
    """Preset, then YAML file, then ``key=value`` overrides, in that order."""
    cfg = preset(preset_name)
    if file:
        apply_dict(cfg, load_yaml(file))
    for text in overrides:
        key, value = parse_override(text)
        set_key(cfg, key, value)
    return cfg
