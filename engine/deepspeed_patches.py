"""Every place where transrec changes DeepSpeed's own objects, in one module.

- :func:`single_process_fast_path`: one process, ZeRO-0, fp32: the engine's per-tensor gradient
  all-reduce and clipping replaced by foreach kernels.
"""

from __future__ import annotations

import torch


def single_process_fast_path(engine) -> None:
    """One process, ZeRO-0, fp32: drop DeepSpeed's per-tensor work that has nothing to do.

    - The gradient all-reduce over a group of one rank (it flattens every gradient into a buffer,
      reduces it and copies it back): switched off. It also gave a parameter without a gradient a zero
      one; :class:`~transrec.engine.optim.FlatAdamW` steps such a parameter with zeros, as before.
    - Gradient clipping: the same computation (global 2-norm of the per-tensor norms, coefficient
      ``min(1, clip / (norm + 1e-6))``) with foreach kernels, without the all-reduce of the norm over
      one rank, instead of a norm and a multiply per tensor.

    Both are per-tensor loops whose cost grows when other processes hold the cores; the test
    ``tests/test_engine_trainer_steps.py`` checks the result against DeepSpeed's own step.
    """
    engine.enable_backward_allreduce = False
    max_norm = torch.tensor(float(engine.gradient_clipping()))

    def clip_fp32_gradients():
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        total = torch.stack(torch._foreach_norm(grads, 2.0)).pow(2.0).sum().float().pow(0.5)
        coef = torch.clamp(max_norm.to(total.device) / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        return total

    engine.clip_fp32_gradients = clip_fp32_gradients
