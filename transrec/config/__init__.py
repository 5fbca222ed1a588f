"""The run configuration, importing no torch (the CLI, tools and the config tests load it alone).

- :mod:`~transrec.config.model` and :mod:`~transrec.config.schema`: the sections as dataclasses,
  every choice a ``Literal`` in one place, and :func:`validate`;
- :mod:`~transrec.config.overrides`: YAML files and dotted ``key=value`` overrides, type-checked;
- :mod:`~transrec.config.presets`: named presets and :func:`build_config`;
- :mod:`~transrec.config.deepspeed`: the DeepSpeed JSON a config implies.
"""

from transrec.config.deepspeed import to_deepspeed
from transrec.config.model import (
    ImageEncoderConfig,
    LoRAConfig,
    LossConfig,
    ModelConfig,
    TextEncoderConfig,
    UserEncoderConfig,
    validate_model_config,
)
from transrec.config.overrides import (
    apply_dict,
    coerce,
    from_dict,
    load_yaml,
    parse_override,
    save_yaml,
    set_key,
    to_dict,
    valid_keys,
)
from transrec.config.presets import (
    PRESETS,
    build_config,
    model_pretrained,
    model_tiny,
    preset,
    preset_base_gpu,
    preset_demo_cpu,
    preset_small_gpu,
    preset_tiny,
)
from transrec.config.schema import (
    Config,
    DataConfig,
    DeepSpeedSection,
    EvalConfig,
    OptimConfig,
    RunConfig,
    batch_layout,
    monitor_metric,
    validate,
)

__all__ = [
    "Config", "DataConfig", "DeepSpeedSection", "EvalConfig", "ImageEncoderConfig", "LoRAConfig",
    "LossConfig", "ModelConfig", "OptimConfig", "PRESETS", "RunConfig", "TextEncoderConfig",
    "UserEncoderConfig", "apply_dict", "batch_layout", "build_config", "coerce", "from_dict",
    "load_yaml", "model_pretrained", "model_tiny", "monitor_metric", "parse_override", "preset",
    "preset_base_gpu", "preset_demo_cpu", "preset_small_gpu", "preset_tiny", "save_yaml", "set_key",
    "to_deepspeed", "to_dict", "valid_keys", "validate", "validate_model_config",
]
