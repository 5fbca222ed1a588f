"""transrec.engine: data, training on DeepSpeed, checkpoints, evaluation, export, transfer, CLI.

Without CUDA, DeepSpeed is told it runs on the CPU before any engine module imports it; left to
detect that itself, it announces it on stdout, mixed into the results commands print there.
"""

from transrec._toplevel import bare_import

if not bare_import(__name__, __file__):  # a bare `import engine` gets the installed distribution
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
