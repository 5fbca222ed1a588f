"""transrec.engine: data, training on DeepSpeed, checkpoints, evaluation, export, transfer, CLI.

Without CUDA, DeepSpeed is told it runs on the CPU before any engine module imports it; left to
detect that itself, it announces it on stdout, mixed into the results commands print there.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
