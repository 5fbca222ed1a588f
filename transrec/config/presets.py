"""Named presets: each a function returning a whole :class:`Config`; ``build_config`` applies a
YAML file and ``key=value`` overrides on top."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path

from transrec.config.model import ModelConfig
from transrec.config.overrides import apply_dict, load_yaml, parse_override, set_key
from transrec.config.schema import (
    Config,
    DataConfig,
    DeepSpeedSection,
    EvalConfig,
    OptimConfig,
    RunConfig,
)
from transrec.errors import ConfigError


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
    # validation every 50 steps: the best checkpoint (run.monitor) is picked from these evaluations
    # and the final one
    cfg.eval = EvalConfig(every=50, batch_size=128, item_chunk=512)
    cfg.run = RunConfig(log_every=10, keep_last=2)
    return cfg


def preset_demo_cpu() -> Config:
    """The demo's model: tiny encoders sized so pretraining + four transfers fit minutes on 2 cores."""
    cfg = preset_tiny()
    cfg.preset = "demo-cpu"
    cfg.data = DataConfig(batch_size=64, max_len=10)
    cfg.optim = OptimConfig(steps=200, lr=3e-3, encoder_lr=1e-3, warmup_steps=20)
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


def preset_sasrec() -> Config:
    """The well-known ID-based SASRec recipe: causal user encoder trained at every position (a
    LayerNorm on its input), cross-
    entropy over the whole catalogue, 2 layers x 2 heads, 64 dimensions, dropout 0.5, length 50,
    batch 256, constant lr 1e-3 (no warmup, no decay, no weight decay, no clipping)."""
    m = ModelConfig(kind="id", dim=64)
    m.user.kind, m.user.layers, m.user.heads, m.user.dropout, m.user.max_len = "causal", 2, 2, 0.5, 50
    m.user.input_norm = True  # SASRec's LayerNorm on the input (benchmarks/peers/sasrec_ablation.py)
    m.loss.negatives, m.loss.temperature, m.loss.logq = "catalogue", 1.0, False
    cfg = Config(preset="sasrec", model=m)
    cfg.data = DataConfig(batch_size=256, max_len=50)
    cfg.optim = OptimConfig(steps=2000, lr=1e-3, encoder_lr=0.0, weight_decay=0.0, warmup_steps=0,
                            min_lr_ratio=1.0, grad_clip=0.0)
    cfg.eval = EvalConfig(every=500, batch_size=256, item_chunk=4096)
    return cfg


def preset_transrec_paper() -> Config:
    """The TransRec paper's settings on the offline encoders: pretrained MiniLM titles and
    EfficientNet-Lite0 covers with their top 2 blocks trained, a bidirectional user encoder read at
    the last position, binary cross-entropy with a sampled negative per positive."""
    cfg = Config(preset="transrec-paper", model=model_pretrained())
    m = cfg.model
    m.user.kind = "bidirectional"
    m.loss.kind, m.loss.num_negatives, m.loss.temperature, m.loss.l2_normalize = "bce", 1, 1.0, False
    cfg.data = DataConfig(batch_size=64, max_len=20)
    cfg.optim = OptimConfig(steps=3000, lr=1e-4, encoder_lr=1e-4, warmup_steps=100)
    cfg.eval = EvalConfig(every=500, batch_size=256, item_chunk=1024)
    return cfg


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "tiny": preset_tiny,
    "demo-cpu": preset_demo_cpu,
    "small-gpu": preset_small_gpu,
    "base-gpu": preset_base_gpu,
    "sasrec": preset_sasrec,
    "transrec-paper": preset_transrec_paper,
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
