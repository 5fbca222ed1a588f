"""transrec.models: item encoders (text, image), user encoders, losses, TransRec and the ID baseline.

Usage::

    from transrec.models import ModelConfig, build_model
    model = build_model(ModelConfig(...))          # TransRec, or IDSASRec with kind="id"
    loss, metrics = model(batch)                    # batch: transrec.shards.batch.Batch
"""

from transrec._toplevel import bare_import

if not bare_import(__name__, __file__):  # a bare `import models` gets the installed distribution
    from transrec.config.model import (
        ImageEncoderConfig,
        LoRAConfig,
        LossConfig,
        ModelConfig,
        TextEncoderConfig,
        UserEncoderConfig,
        validate_model_config,
    )
    from transrec.models.lora import (
        load_adapters,
        load_base_weights,
        lora_state_dict,
        merge_lora,
        save_adapters,
        trainable_report,
    )
    from transrec.models.sequential import IDSASRec, SequentialRecommender, TransRec, build_model

__all__ = [
    "ImageEncoderConfig", "LoRAConfig", "LossConfig", "ModelConfig", "TextEncoderConfig",
    "UserEncoderConfig", "validate_model_config", "build_model", "TransRec", "IDSASRec",
    "SequentialRecommender", "save_adapters", "load_adapters", "merge_lora", "lora_state_dict",
    "load_base_weights", "trainable_report",
]
