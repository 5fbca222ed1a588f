"""transrec: a training engine for transferable recommendation from mixture-of-modality feedback.

The subpackages live in the repo's top-level folders and are installed as
``transrec.shards``, ``transrec.models``, ``transrec.kernels`` and ``transrec.engine``.
"""

__version__ = "0.1.0"
