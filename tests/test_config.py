"""Run configuration: presets, YAML + key=value overrides, type checks, unknown keys, DeepSpeed JSON."""

import json
import subprocess
import sys

import pytest

from transrec.config import (
    PRESETS,
    Config,
    ModelConfig,
    build_config,
    from_dict,
    save_yaml,
    set_key,
    to_deepspeed,
    to_dict,
    validate,
    validate_model_config,
)
from transrec.config.model import user_kind
from transrec.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips_through_yaml(name, tmp_path):
    cfg = build_config(name)
    validate(cfg, world_size=1)
    save_yaml(cfg, tmp_path / "c.yaml")
    again = build_config(name, file=tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


def test_overrides_are_typed_and_applied_in_order(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.5\n  steps: 7\nmodel:\n  user:\n    layers: 3\n")
    cfg = build_config("tiny", file=tmp_path / "c.yaml",
                       overrides=["optim.lr=1e-3", "model.text.trainable=2", "eval.ks=[1,5]",
                                  "deepspeed.precision=bf16", "run.resume=false", "model.image.lora.r=4"])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.steps == 7 and cfg.model.user.layers == 3
    assert cfg.model.text.trainable == 2 and cfg.eval.ks == [1, 5]
    assert cfg.deepspeed.precision == "bf16" and cfg.run.resume is False
    assert cfg.model.image.lora is not None and cfg.model.image.lora.r == 4
    assert cfg.model.text.lora is None


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("model.txt.name=x", "unknown config key 'model.txt.name' (did you mean 'model.text.name'?)"),
    ("optim.steps=abc", "config key 'optim.steps': 'abc' is not int"),
    ("deepspeed.precision=fp16", "config key 'deepspeed.precision': 'fp16' is not one of 'fp32', 'bf16'"),
    ("run.resume=2", "config key 'run.resume': 2 is not bool"),
    ("optim.lr", "override 'optim.lr' must look like key=value"),
])
def test_bad_overrides_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        build_config("tiny", overrides=[override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_yaml_and_unknown_preset(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  warmup: 3\n")
    msg = r"unknown config key 'optim.warmup' \(did you mean 'optim.warmup_steps'\?\)"
    with pytest.raises(ConfigError, match=msg):
        build_config("tiny", file=tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="did you mean 'demo-cpu'"):
        build_config("demo_cpu")


def test_deepspeed_json_is_derived_and_batch_layout_checked(tmp_path):
    cfg = build_config("tiny", overrides=["data.batch_size=32", "data.micro_batch_size=4",
                                          "deepspeed.zero_stage=3", "optim.grad_clip=0.5"])
    ds = to_deepspeed(cfg, world_size=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is False
    with pytest.raises(ConfigError, match="data.batch_size=32 must be a multiple"):
        to_deepspeed(build_config("tiny", overrides=["data.micro_batch_size=5"]), world_size=2)
    # A whole DeepSpeed JSON: kept, batch sizes filled from the config, conflicts refused.
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}}))
    cfg.deepspeed.config_file = str(f)
    ds = to_deepspeed(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert ds["gradient_accumulation_steps"] == 4
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 disagrees"):
        to_deepspeed(cfg, world_size=2)


def test_validate_rejects_cross_field_errors():
    cfg = Config()
    cfg.deepspeed.zero_stage = 4
    with pytest.raises(ConfigError, match="zero_stage must be 0, 1, 2 or 3"):
        validate(cfg)
    cfg = build_config("tiny", overrides=["optim.steps=0"])
    with pytest.raises(ConfigError, match="optim.steps must be positive"):
        validate(cfg)


def test_importing_the_config_imports_no_torch():
    """The config is a leaf: the CLI, tools and tests read it without loading torch or the models."""
    code = ("import sys, transrec.config as c; c.build_config('base-gpu'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'numpy', 'transformers', 'peft', 'deepspeed', 'triton', 'webdataset'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("key, value, words", [
    ("run.log_every", 0, "run.log_every must be positive"),
    ("run.keep_last", 0, "run.keep_last must be positive"),
    ("data.num_workers", -1, "data.num_workers must be >= 0"),
    ("optim.lr", float("nan"), "optim.lr must be a finite number"),
    ("optim.encoder_lr", float("inf"), "optim.encoder_lr must be a finite number"),
    ("model.loss.temperature", float("inf"), "temperature must be finite"),
])
def test_validation_names_the_key(key, value, words):
    cfg = build_config("tiny")
    set_key(cfg, key, value)
    with pytest.raises(ConfigError, match=words) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_choices_are_checked_in_python_built_configs_too():
    cfg = build_config("tiny")
    cfg.model.loss.impl = "cuda"  # set in Python, not through an override
    with pytest.raises(ConfigError, match=r"model.loss.impl must be one of 'auto', 'triton'"):
        validate(cfg)
    with pytest.raises(ConfigError, match="model.user.kind must be one of"):
        validate_model_config(ModelConfig(user=type(cfg.model.user)(kind="sideways")))
    cfg = build_config("tiny")
    with pytest.raises(ConfigError, match="data.policy"):
        set_key(cfg, "data.policy", "shuffle")


def test_sequence_lengths_are_checked_together():
    cfg = build_config("tiny", overrides=["data.max_len=30"])  # the user encoder has 20 positions
    with pytest.raises(ConfigError, match="data.max_len=30 is longer than model.user.max_len=20"):
        validate(cfg)


def test_sasrec_preset_is_the_standard_id_recipe():
    cfg = build_config("sasrec")
    validate(cfg)
    m = cfg.model
    assert m.kind == "id" and user_kind(m) == "causal" and m.loss.negatives == "catalogue"
    assert (m.user.layers, m.user.heads, m.user.dropout, m.user.max_len, m.dim) == (2, 2, 0.5, 50, 64)
    o = cfg.optim
    assert (o.lr, o.warmup_steps, o.min_lr_ratio, o.weight_decay) == (1e-3, 0, 1.0, 0.0)


def test_run_progress_takes_auto_on_off_and_reads_old_booleans(tmp_path):
    assert build_config("tiny").run.progress == "auto"
    assert build_config("tiny", overrides=["run.progress=off"]).run.progress == "off"
    assert build_config("tiny", overrides=["run.progress=on"]).run.progress == "on"
    assert build_config("tiny", overrides=["run.progress=false"]).run.progress == "off"
    assert build_config("tiny", overrides=["run.progress=true"]).run.progress == "on"
    # an older run folder's config.yaml holds a boolean
    old = to_dict(build_config("tiny"))
    old["run"]["progress"] = False
    assert from_dict(old).run.progress == "off"
    (tmp_path / "c.yaml").write_text("run:\n  progress: true\n")
    assert build_config("tiny", file=tmp_path / "c.yaml").run.progress == "on"
    with pytest.raises(ConfigError, match="run.progress"):
        build_config("tiny", overrides=["run.progress=sometimes"])
