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
"""

from __future__ import annotations

import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from transrec.engine import distributed as D
from transrec.errors import UserError

DIVERGED_EXIT = 3  # `transrec train`/`transfer`: the run stopped after run.max_bad_steps bad steps in a row


class Diverged(UserError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""

    exit_code = DIVERGED_EXIT


class FiniteGuard:
    """Installs the skip on ``engine.optimizer``; :meth:`loss_check` before the boundary step,
    :meth:`applied` after it."""

    def __init__(self, engine, *, world: int, device):
        self.engine = engine
        self.world = world
        self.device = device
        self.loss_bad = False  # this step's global loss is not finite (set before the boundary step)
        opt = engine.optimizer
        if isinstance(opt, DeepSpeedZeroOptimizer):
            self._wrap_zero12(opt)
        elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            self._wrap_zero3(opt)
        elif isinstance(opt, BF16_Optimizer) or hasattr(opt, "_skip_invalid_grad_norm"):
            self._wrap_half(opt)
        elif isinstance(opt, torch.optim.Optimizer):
            self._wrap_plain(opt)
        else:  # pragma: no cover - a DeepSpeed config the engine does not build (fp16, offload variants)
            raise UserError(f"the non-finite guard does not know DeepSpeed's {type(opt).__name__}")

    # -- per optimizer kind ---------------------------------------------------------------------
    def _wrap_zero12(self, opt) -> None:
        opt.check_grad_overflow = True
        orig = opt.check_overflow

        def check_overflow(partition_gradients=True):
            orig(partition_gradients)
            opt.overflow = bool(opt.overflow or self.loss_bad)

        opt.check_overflow = check_overflow

    def _wrap_zero3(self, opt) -> None:
        orig = opt._overflow_check_and_loss_scale_update

        def overflow_check(update_scale=True):
            orig(update_scale=False)
            opt.overflow = bool(opt.overflow or self.loss_bad)
            if not update_scale:
                return opt.overflow
            return opt._loss_scale_update_and_overflow_cleanup()

        opt._overflow_check_and_loss_scale_update = overflow_check

    def _wrap_half(self, opt) -> None:
        orig = opt.step

        def step(closure=None):
            if self.loss_bad and hasattr(opt, "_skip_invalid_grad_norm"):  # FP16_(Unfused)Optimizer
                return opt._skip_invalid_grad_norm()
            if self.loss_bad:  # BF16_Optimizer's own overflow path
                opt.overflow = True
                opt._global_grad_norm = float("inf")
                opt.clear_hp_grads()
                opt.clear_lp_grads()
                return None
            return orig(closure)

        opt.step = step

    def _wrap_plain(self, opt) -> None:
        orig = opt.step
        opt.overflow = False

        def step(closure=None):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            finite = True
            if grads:
                norm = torch.stack(torch._foreach_norm(grads, 2.0)).pow(2.0).sum()
                finite = bool(torch.isfinite(norm))
            opt.overflow = D.any_rank(self.loss_bad or not finite, self.device, self.world)
            if opt.overflow:
                return None
            return orig(closure)

        if hasattr(orig, "_wrapped_by_lr_sched"):  # torch's scheduler wrapped the step it calls on
            step._wrapped_by_lr_sched = True
        opt.step = step

    # -- the trainer's side ---------------------------------------------------------------------
    def loss_check(self, loss_sum: torch.Tensor) -> None:
        """Before the boundary ``engine.step()``: whether any rank's loss of this step is not finite."""
        self.loss_bad = D.any_rank(not bool(torch.isfinite(loss_sum)), self.device, self.world)

    def applied(self) -> bool:
        """After the boundary ``engine.step()``: whether it updated the weights (the same on every rank)."""
        return bool(self.engine.was_step_applied()) and not self.loss_bad
