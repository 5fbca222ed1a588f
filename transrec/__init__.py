"""transrec: a training engine for transferable recommendation from mixture-of-modality feedback.

The subpackages live in the repo's top-level folders and are installed as
``transrec.shards``, ``transrec.models``, ``transrec.kernels``, ``transrec.engine`` and
``transrec.inference``.

The Python API (README, "Python API")::

    import transrec
    cfg = transrec.build_config("tiny", overrides=["data.path=data/source", "run.out=runs/a"])
    result = transrec.train(cfg)                     # TrainResult(run=..., step=..., loss=...)
    print(transrec.evaluate("runs/a"))               # Metrics(valid: hr@10=... ; test: ...)
    transrec.export("runs/a", "exports/a")           # ExportInfo(path=..., kind='full', step=...)
    rec = transrec.Recommender.from_export("exports/a")
"""

import importlib

__version__ = "0.1.0"

__all__ = ["train", "evaluate", "export", "build_config", "Recommender"]

# lazy: where each public name lives; loaded on first use so that `import transrec` (and the CLI's --help)
# does not import torch, DeepSpeed or transformers.
_LAZY = {
    "train": "transrec.engine.api",
    "evaluate": "transrec.engine.api",
    "export": "transrec.engine.api",
    "Recommender": "transrec.inference.recommender",
    "build_config": "transrec.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'transrec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
