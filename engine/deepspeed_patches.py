"""Every place where transrec changes DeepSpeed's own objects, in one module.

The patches (each replaces a method or sets an attribute on one engine or optimizer instance,
never on a class):

- :func:`single_process_fast_path` (one process, ZeRO-0, fp32): sets the engine's
  ``enable_backward_allreduce`` to False, which the engine reads in ``_backward_epilogue`` before
  all-reducing every gradient over a group of one rank, and replaces the engine's
  ``clip_fp32_gradients`` (called by ``_take_model_step``) by the same clipping with foreach kernels.
  Both are per-tensor loops with nothing to do for one process.
- The non-finite guard's skip (:mod:`~transrec.engine.guard` decides; :func:`install_skip` picks the
  patch for the optimizer DeepSpeed built). Each makes a step whose loss is not finite on some rank
  take the optimizer's own overflow path, so DeepSpeed, which reads ``optimizer.overflow`` in
  ``_take_model_step``, counts a skipped step and leaves weights, moments and schedule alone:

  - :func:`install_zero12_skip` (``DeepSpeedZeroOptimizer``, ZeRO 1/2): sets
    ``check_grad_overflow`` (read by ``step``) so the NaN/inf check of the partitioned gradients
    runs in every precision, and wraps ``check_overflow(partition_gradients=True)`` to or the loss
    flag into ``overflow``.
  - :func:`install_zero3_skip` (``DeepSpeedZeroOptimizer_Stage3``): replaces
    ``_overflow_check_and_loss_scale_update(update_scale=True)`` (called by ``step``) by the original
    without the scale update, the loss flag or-ed in, then
    ``_loss_scale_update_and_overflow_cleanup()``.
  - :func:`install_half_skip` (``BF16_Optimizer``, ``FP16_Optimizer``, ``FP16_UnfusedOptimizer``):
    wraps ``step(closure=None)``; with a bad loss it takes the optimizer's invalid-norm path instead:
    ``_skip_invalid_grad_norm()`` on the fp16 optimizers; on ``BF16_Optimizer`` what its ``step``
    does for an invalid norm (``overflow`` and ``_global_grad_norm = inf``, ``clear_hp_grads()``,
    ``clear_lp_grads()``).
  - :func:`install_plain_skip` (the client torch optimizer at ZeRO-0 fp32, where DeepSpeed checks
    nothing): wraps ``step`` to check the gradients' global 2-norm, agree over the ranks and set
    ``overflow``.

Checked against DeepSpeed :data:`CHECKED`. :func:`check_deepspeed` verifies, without building an
engine, that each internal above still exists with the shape the patches rely on (classes,
methods and their parameters, instance attributes, and the call sites in DeepSpeed's source through
which a patch takes effect); a release that changes one is refused with one line. A release outside
:data:`CHECKED` that passes the check is used as it is.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

import deepspeed
import torch

from transrec.errors import UserError

CHECKED = ("0.19.8",)  # DeepSpeed releases the patches and check_deepspeed were checked against

_ENGINE = "deepspeed.runtime.engine.DeepSpeedEngine"
_ZERO12 = "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer"
_ZERO3 = "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3"
_BF16 = "deepspeed.runtime.bf16_optimizer.BF16_Optimizer"
_FP16 = "deepspeed.runtime.fp16.fused_optimizer.FP16_Optimizer"
_FP16_UNFUSED = "deepspeed.runtime.fp16.unfused_optimizer.FP16_UnfusedOptimizer"

# Methods the patches call or replace: (class, method, parameters).
METHODS = (
    (_ENGINE, "clip_fp32_gradients", "(self)"),
    (_ENGINE, "gradient_clipping", "(self)"),
    (_ENGINE, "was_step_applied", "(self)"),
    (_ZERO12, "check_overflow", "(self, partition_gradients=True)"),
    (_ZERO3, "_overflow_check_and_loss_scale_update", "(self, update_scale=True)"),
    (_ZERO3, "_loss_scale_update_and_overflow_cleanup", "(self)"),
    (_BF16, "step", "(self, closure=None)"),
    (_BF16, "clear_hp_grads", "(self)"),
    (_BF16, "clear_lp_grads", "(self, set_to_none=False)"),
    (_FP16, "step", "(self, closure=None)"),
    (_FP16, "_skip_invalid_grad_norm", "(self)"),
    (_FP16_UNFUSED, "step", "(self, closure=None)"),
    (_FP16_UNFUSED, "_skip_invalid_grad_norm", "(self)"),
)

# Plain instance attributes the patches set (a property or other data descriptor would intercept it).
ATTRIBUTES = (
    (_ENGINE, "enable_backward_allreduce"),
    (_ZERO12, "check_grad_overflow"),
    (_ZERO12, "overflow"),
    (_ZERO3, "overflow"),
    (_BF16, "overflow"),
    (_BF16, "_global_grad_norm"),
)

# Source the patches rely on: (class, method, text its source contains). These are the places that
# read a patched attribute or call a replaced method through the instance, and the overflow path of
# BF16_Optimizer.step that install_half_skip reproduces.
SOURCES = (
    (_ENGINE, "__init__", "self.enable_backward_allreduce = "),
    (_ENGINE, "_backward_epilogue", "if self.enable_backward_allreduce and"),
    (_ENGINE, "_take_model_step", "self.clip_fp32_gradients()"),
    (_ENGINE, "_take_model_step", "self.optimizer.overflow"),
    (_ZERO12, "__init__", "self.check_grad_overflow = "),
    (_ZERO12, "step", "if self.check_grad_overflow:"),
    (_ZERO12, "step", "self.check_overflow("),
    (_ZERO12, "step", "if self.overflow:"),
    (_ZERO3, "step", "self._overflow_check_and_loss_scale_update("),
    (_ZERO3, "_loss_scale_update_and_overflow_cleanup", "if self.overflow:"),
    (_BF16, "step", "self.overflow = True"),
    (_BF16, "step", 'self._global_grad_norm = float("inf")'),
    (_BF16, "step", "self.clear_hp_grads()"),
    (_BF16, "step", "self.clear_lp_grads()"),
)


def _resolve(path: str):
    """The class at a dotted path, or None."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _innermost(fn, name: str):
    """The function itself behind decorators, those with ``functools.wraps`` and closures that do not
    copy the wrapped function's signature (DeepSpeed's ``instrument_w_nvtx``)."""
    fn = inspect.unwrap(fn)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if inspect.isfunction(inner) and inner.__name__ == name:
            return _innermost(inner, name)
    return fn


def _parameters(fn) -> str:
    """``fn``'s parameters as written, without annotations: ``(self, update_scale=True)``."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _short(path: str) -> str:
    return path.rpartition(".")[2]


def _problems() -> list[str]:
    """What differs between the installed DeepSpeed and the internals the patches use (empty: none).
    A method whose source cannot be read (an installation without ``.py`` files) is checked by name
    and parameters only."""
    problems: list[str] = []
    classes = {}
    for path in dict.fromkeys(p for table in (METHODS, ATTRIBUTES, SOURCES) for p, *_ in table):
        classes[path] = _resolve(path)
        if not inspect.isclass(classes[path]):
            problems.append(f"{path} is missing")
    for path, name, expected in METHODS:
        cls = classes[path]
        if not inspect.isclass(cls):
            continue
        fn = getattr(cls, name, None)
        if fn is None:
            problems.append(f"{_short(path)}.{name} is missing")
            continue
        fn = _innermost(fn, name)
        if not inspect.isfunction(fn):
            problems.append(f"{_short(path)}.{name} is no longer a method")
            continue
        found = _parameters(fn)
        if found != expected:
            problems.append(f"{_short(path)}.{name} takes {found} instead of {expected}")
    for path, name in ATTRIBUTES:
        cls = classes[path]
        if inspect.isclass(cls) and hasattr(inspect.getattr_static(cls, name, None), "__set__"):
            problems.append(f"{_short(path)}.{name} is a property, not an instance attribute")
    for path, method, text in SOURCES:
        cls = classes[path]
        fn = getattr(cls, method, None) if inspect.isclass(cls) else None
        if fn is None:
            if inspect.isclass(cls) and (path, method) not in {(p, n) for p, n, _ in METHODS}:
                problems.append(f"{_short(path)}.{method} is missing")
            continue
        try:
            source = inspect.getsource(_innermost(fn, method))
        except (OSError, TypeError):
            continue
        if text not in source:
            problems.append(f"{_short(path)}.{method} no longer contains `{text}`")
    return list(dict.fromkeys(problems))


@functools.cache
def check_deepspeed() -> None:
    """Raise :class:`~transrec.errors.UserError` (one line) when the installed DeepSpeed lacks an
    internal the patches of this module use or has changed its shape. The result is cached: later
    calls cost nothing (``check_deepspeed.cache_clear()`` checks again)."""
    problems = _problems()
    if problems:
        raise UserError(f"DeepSpeed {deepspeed.__version__} differs from what transrec's DeepSpeed patches "
                        f"use: {'; '.join(problems)} (transrec was checked against DeepSpeed "
                        f"{', '.join(CHECKED)}; install one of those)")


# -- the single-process fast path -------------------------------------------------------------------
def single_process_fast_path(engine) -> None:
    """One process, ZeRO-0, fp32: drop DeepSpeed's per-tensor work that has nothing to do.

    - The gradient all-reduce over a group of one rank (it flattens every gradient into a buffer,
      reduces it and copies it back): switched off. It also gives a parameter without a gradient a
      zero one; :class:`~transrec.engine.optim.FlatAdamW` steps such a parameter with zeros.
    - Gradient clipping: the same computation (global 2-norm of the per-tensor norms, coefficient
      ``min(1, clip / (norm + 1e-6))``) with foreach kernels, without the all-reduce of the norm over
      one rank, instead of a norm and a multiply per tensor.

    Both are per-tensor loops whose cost grows when other processes hold the cores; the test
    ``tests/test_engine_trainer_steps.py`` checks the result against DeepSpeed's own step.
    """
    check_deepspeed()
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


# -- the non-finite guard's skip --------------------------------------------------------------------
# ``loss_bad()``: whether this step's loss is not finite on some rank (the same answer on every
# rank, asked during the boundary step). ``any_rank(flag)``: True on every rank when ``flag`` is
# True on any rank.

def install_zero12_skip(opt, loss_bad: Callable[[], bool]) -> None:
    """ZeRO 1/2: the gradient overflow check on in every precision, the loss flag or-ed into it.
    Its overflow path clears the partitioned gradients and the step returns without an update."""
    check_deepspeed()
    opt.check_grad_overflow = True
    orig = opt.check_overflow

    def check_overflow(partition_gradients=True):
        orig(partition_gradients)
        opt.overflow = bool(opt.overflow or loss_bad())

    opt.check_overflow = check_overflow


def install_zero3_skip(opt, loss_bad: Callable[[], bool]) -> None:
    """ZeRO-3: the loss flag or-ed into the overflow check, before the loss-scale update and the
    overflow clean-up (an invalid global norm is already an overflow there)."""
    check_deepspeed()
    orig = opt._overflow_check_and_loss_scale_update

    def overflow_check(update_scale=True):
        orig(update_scale=False)
        opt.overflow = bool(opt.overflow or loss_bad())
        if not update_scale:
            return opt.overflow
        return opt._loss_scale_update_and_overflow_cleanup()

    opt._overflow_check_and_loss_scale_update = overflow_check


def install_half_skip(opt, loss_bad: Callable[[], bool]) -> None:
    """ZeRO-0 bf16/fp16 (``BF16_Optimizer``, ``FP16_Optimizer``, ``FP16_UnfusedOptimizer``): NaN/inf
    gradients are already an overflow there; a bad loss takes the same path (gradients cleared, no
    update)."""
    check_deepspeed()
    orig = opt.step

    def step(closure=None):
        if loss_bad() and hasattr(opt, "_skip_invalid_grad_norm"):  # FP16_(Unfused)Optimizer
            return opt._skip_invalid_grad_norm()
        if loss_bad():  # BF16_Optimizer's own overflow path
            opt.overflow = True
            opt._global_grad_norm = float("inf")
            opt.clear_hp_grads()
            opt.clear_lp_grads()
            return None
        return orig(closure)

    opt.step = step


def install_plain_skip(opt: torch.optim.Optimizer, loss_bad: Callable[[], bool],
                       any_rank: Callable[[bool], bool]) -> None:
    """ZeRO-0 fp32 (the client torch optimizer): the step checks the gradients' global 2-norm (all
    ranks hold the reduced gradients; the flag is agreed over the ranks anyway) and, if it or the loss
    is not finite, returns without an update and sets ``overflow``, which DeepSpeed reads."""
    check_deepspeed()
    orig = opt.step
    opt.overflow = False

    def step(closure=None):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        finite = True
        if grads:
            norm = torch.stack(torch._foreach_norm(grads, 2.0)).pow(2.0).sum()
            finite = bool(torch.isfinite(norm))
        opt.overflow = any_rank(loss_bad() or not finite)
        if opt.overflow:
            return None
        return orig(closure)

    if hasattr(orig, "_wrapped_by_lr_sched"):  # torch's scheduler wrapped the step it calls on
        step._wrapped_by_lr_sched = True
    opt.step = step


def install_skip(opt, loss_bad: Callable[[], bool], any_rank: Callable[[bool], bool]) -> str:
    """The skip for whichever optimizer DeepSpeed built (``engine.optimizer``); returns which one:
    ``"zero12"``, ``"zero3"``, ``"half"`` or ``"plain"``."""
    check_deepspeed()
    if isinstance(opt, _resolve(_ZERO12)):
        install_zero12_skip(opt, loss_bad)
        return "zero12"
    if isinstance(opt, _resolve(_ZERO3)):
        install_zero3_skip(opt, loss_bad)
        return "zero3"
    if isinstance(opt, _resolve(_BF16)) or hasattr(opt, "_skip_invalid_grad_norm"):
        install_half_skip(opt, loss_bad)
        return "half"
    if isinstance(opt, torch.optim.Optimizer):
        install_plain_skip(opt, loss_bad, any_rank)
        return "plain"
    raise UserError(f"the non-finite guard does not know DeepSpeed's {type(opt).__name__}")
