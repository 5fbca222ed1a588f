"""The non-finite guard: an optimizer step whose loss or gradient norm is not finite changes nothing.

Every rank takes the same decision. The loss flag is all-reduced (MAX) before the step; the
gradient check is the global one of whichever optimizer DeepSpeed built:

- ZeRO 1/2 (``DeepSpeedZeroOptimizer``): its own overflow check (NaN/inf in any partition,
  all-reduced), switched on for every precision; the loss flag is or-ed into it. Its overflow path
  clears the partitioned gradients and the step returns without an update.
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): an invalid global norm is already an overflow there;
  the loss flag is or-ed into the overflow check.
- ZeRO-0 bf16 (``FP16_UnfusedOptimizer``/``FP16_Optimizer``, or ``BF16_Optimizer``): NaN/inf
  gradients are already an overflow there; a non-finite loss takes the same overflow path
  (gradients cleared, no update).
- ZeRO-0 fp32 (the client torch optimizer): the step checks the gradients' global 2-norm (all
  ranks hold the reduced gradients, the flag is all-reduced anyway) and, if it or the loss is not
  finite, returns without an update and sets ``overflow``.

In each case DeepSpeed sees ``optimizer.overflow`` after its step: it counts a skipped step, does
not step the learning-rate schedule, zeroes the gradients and keeps its micro-step counters as for
any other step. The trainer restores the buffers (BatchNorm statistics and counters) a skipped
forward may have changed, so a skipped step leaves weights, moments, schedule and buffers as they
were.

This module decides; the patches that make each optimizer take its skip are in
:mod:`~transrec.engine.deepspeed_patches` (:func:`~transrec.engine.deepspeed_patches.install_skip`),
with the check of the DeepSpeed internals they use.
"""

from __future__ import annotations

import torch

from transrec.engine import distributed as D
from transrec.engine.deepspeed_patches import install_skip
from transrec.engine.tracking import say
from transrec.errors import UserError
from transrec.models.negatives import step_buffers

DIVERGED_EXIT = 3  # `transrec train`/`transfer`: the run stopped after run.max_bad_steps bad steps in a row


class Diverged(UserError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""

    exit_code = DIVERGED_EXIT


def running_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers a training step updates: BatchNorm running statistics of modules in training mode
    and the loss's negative memory (the other buffers are constants)."""
    bn = [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
          for b in m.buffers(recurse=False)]
    return bn + step_buffers(module)


class FiniteGuard:
    """Installs the skip on ``engine.optimizer``. Per step: :meth:`hold` before the forward passes,
    :meth:`loss_check` before the boundary step, :meth:`applied` after it, then :meth:`skipped`
    (which puts the held buffers back) or :meth:`passed`."""

    def __init__(self, engine, *, world: int, device, max_bad_steps: int = 5, rank: int = 0):
        self.engine = engine
        self.world = world
        self.device = device
        self.max_bad_steps = max_bad_steps  # run.max_bad_steps
        self.rank = rank
        self.loss_bad = False  # this step's global loss is not finite (set before the boundary step)
        self.in_row = 0  # skipped steps since the last applied one
        self.skipped_steps = 0  # skipped steps in this process's life
        self._held: list[tuple[torch.Tensor, torch.Tensor]] = []
        install_skip(engine.optimizer, lambda: self.loss_bad,
                     lambda flag: D.any_rank(flag, self.device, self.world))

    # -- the trainer's side ---------------------------------------------------------------------
    def loss_check(self, loss_sum: torch.Tensor) -> None:
        """Before the boundary ``engine.step()``: whether any rank's loss of this step is not finite."""
        self.loss_bad = D.any_rank(not bool(torch.isfinite(loss_sum)), self.device, self.world)

    def applied(self) -> bool:
        """After the boundary ``engine.step()``: whether it updated the weights (the same on every rank)."""
        return bool(self.engine.was_step_applied()) and not self.loss_bad

    def hold(self) -> None:
        """Before a step's forward passes: keep a copy of the buffers it may change."""
        self._held = [(b, b.detach().clone()) for b in running_stats(self.engine.module)]

    def passed(self) -> None:
        """The step was applied."""
        self.in_row = 0
        self._held = []

    def skipped(self, step: int, loss_sum: torch.Tensor, tracker, latest: str) -> None:
        """The step after ``step`` was skipped: its buffers put back, its record and line; the run
        stops with :class:`Diverged` after ``run.max_bad_steps`` in a row (``latest``: where the
        latest checkpoint is, or that none was written)."""
        for b, v in self._held:
            b.data.copy_(v)
        self._held = []
        self.in_row += 1
        self.skipped_steps += 1
        what = "loss" if self.loss_bad else "gradient norm"
        tracker.log("skip", step + 1, reason=f"non-finite {what}", in_row=self.in_row, loss=float(loss_sum))
        if self.rank == 0:
            say(f"step {step + 1} skipped: non-finite {what} ({self.in_row} in a row, {self.skipped_steps} "
                f"in all; the run stops at {self.max_bad_steps} in a row)")
        if self.in_row >= self.max_bad_steps:
            raise Diverged(f"training diverged: {self.in_row} steps in a row had a non-finite loss or "
                           f"gradient norm after step {step}; {latest}; lower optim.lr / "
                           f"optim.encoder_lr (or raise run.max_bad_steps)")
