"""The DeepSpeed patches: the check of the internals they use passes on the installed DeepSpeed and
refuses, in one line naming the version and the internal, one that lacks or changed one; the
guard's skip on a torch optimizer. No engine is built (the training tests are in
test_engine_guard.py and test_engine_trainer_steps.py)."""

from __future__ import annotations

import deepspeed
import pytest
import torch
from deepspeed.runtime import bf16_optimizer
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils.nvtx import instrument_w_nvtx

from transrec.engine import deepspeed_patches as P
from transrec.errors import UserError


@pytest.fixture(autouse=True)
def fresh_check():
    """Each test checks anew, and leaves no cached result behind for the next module."""
    P.check_deepspeed.cache_clear()
    yield
    P.check_deepspeed.cache_clear()


def refusal() -> str:
    with pytest.raises(UserError) as info:
        P.check_deepspeed()
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(f"DeepSpeed {deepspeed.__version__} differs from what transrec's DeepSpeed")
    assert f"checked against DeepSpeed {', '.join(P.CHECKED)}" in line
    return line


def test_the_installed_deepspeed_passes_and_the_result_is_cached():
    assert P.check_deepspeed() is None
    assert P.check_deepspeed() is None
    assert P.check_deepspeed.cache_info().hits == 1
    assert P.CHECKED and all(v.count(".") == 2 for v in P.CHECKED)


def test_every_patched_internal_is_in_the_tables():
    methods = {(p.rpartition(".")[2], n) for p, n, _ in P.METHODS}
    assert {("DeepSpeedEngine", "clip_fp32_gradients"), ("DeepSpeedZeroOptimizer", "check_overflow"),
            ("DeepSpeedZeroOptimizer_Stage3", "_overflow_check_and_loss_scale_update"),
            ("DeepSpeedZeroOptimizer_Stage3", "_loss_scale_update_and_overflow_cleanup"),
            ("BF16_Optimizer", "clear_hp_grads"), ("BF16_Optimizer", "clear_lp_grads"),
            ("FP16_Optimizer", "_skip_invalid_grad_norm"),
            ("FP16_UnfusedOptimizer", "_skip_invalid_grad_norm")} <= methods
    attributes = {(p.rpartition(".")[2], n) for p, n in P.ATTRIBUTES}
    assert {("DeepSpeedEngine", "enable_backward_allreduce"),
            ("DeepSpeedZeroOptimizer", "check_grad_overflow")} <= attributes


@pytest.mark.parametrize(("cls", "name"), [
    (DeepSpeedEngine, "clip_fp32_gradients"),
    (DeepSpeedZeroOptimizer, "check_overflow"),
    (DeepSpeedZeroOptimizer_Stage3, "_loss_scale_update_and_overflow_cleanup"),
    (BF16_Optimizer, "clear_hp_grads"),
    (FP16_UnfusedOptimizer, "_skip_invalid_grad_norm"),
])
def test_a_missing_method_is_refused_by_name(monkeypatch, cls, name):
    monkeypatch.delattr(cls, name)
    assert f"{cls.__name__}.{name} is missing" in refusal()


def test_a_missing_class_is_refused_by_its_path(monkeypatch):
    monkeypatch.delattr(bf16_optimizer, "BF16_Optimizer")
    assert "deepspeed.runtime.bf16_optimizer.BF16_Optimizer is missing" in refusal()


def test_changed_parameters_are_refused_with_both_shapes(monkeypatch):
    monkeypatch.setattr(DeepSpeedZeroOptimizer, "check_overflow", lambda self, partition=True: None)
    line = refusal()
    assert ("DeepSpeedZeroOptimizer.check_overflow takes (self, partition=True) instead of "
            "(self, partition_gradients=True)") in line


def test_parameters_are_read_through_a_decorator_without_wraps(monkeypatch):
    """DeepSpeed's instrument_w_nvtx hides the signature behind (*args, **kwargs)."""
    def _overflow_check_and_loss_scale_update(self, update_scale=False):
        return None

    monkeypatch.setattr(DeepSpeedZeroOptimizer_Stage3, "_overflow_check_and_loss_scale_update",
                        instrument_w_nvtx(_overflow_check_and_loss_scale_update))
    assert ("DeepSpeedZeroOptimizer_Stage3._overflow_check_and_loss_scale_update takes "
            "(self, update_scale=False) instead of (self, update_scale=True)") in refusal()


def test_an_attribute_turned_property_is_refused(monkeypatch):
    monkeypatch.setattr(DeepSpeedEngine, "enable_backward_allreduce", property(lambda self: True),
                        raising=False)
    assert "DeepSpeedEngine.enable_backward_allreduce is a property" in refusal()


def test_a_call_site_gone_from_the_source_is_refused(monkeypatch):
    def _take_model_step(self, lr_kwargs):  # neither clips through the instance nor reads overflow
        self.optimizer.step()

    monkeypatch.setattr(DeepSpeedEngine, "_take_model_step", _take_model_step)
    line = refusal()
    assert "DeepSpeedEngine._take_model_step no longer contains `self.clip_fp32_gradients()`" in line
    assert "`self.optimizer.overflow`" in line


def test_an_attribute_no_longer_set_in_init_is_refused(monkeypatch):
    def __init__(self, *args, **kwargs):
        pass

    monkeypatch.setattr(DeepSpeedZeroOptimizer, "__init__", __init__)
    assert "DeepSpeedZeroOptimizer.__init__ no longer contains `self.check_grad_overflow = `" in refusal()


def test_the_line_names_another_installed_version(monkeypatch):
    monkeypatch.setattr(deepspeed, "__version__", "9.9.9")
    assert P.check_deepspeed() is None  # outside CHECKED with every internal: used as it is
    P.check_deepspeed.cache_clear()
    monkeypatch.delattr(BF16_Optimizer, "clear_lp_grads")
    assert "BF16_Optimizer.clear_lp_grads is missing" in refusal()  # refusal() checks "DeepSpeed 9.9.9"


def test_patches_refuse_before_changing_anything(monkeypatch):
    monkeypatch.delattr(DeepSpeedEngine, "clip_fp32_gradients")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1.0)
    step = opt.step
    with pytest.raises(UserError, match="DeepSpeedEngine.clip_fp32_gradients is missing"):
        P.install_skip(opt, lambda: False, lambda flag: flag)
    assert opt.step == step and not hasattr(opt, "overflow")


# ----------------------------------------------------------------------------- the guard's skip

def test_plain_skip_steps_only_with_a_finite_loss_and_gradient():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)
    bad = [False]
    agreed = []

    def any_rank(flag):
        agreed.append(flag)
        return flag

    assert P.install_skip(opt, lambda: bad[0], any_rank) == "plain"
    w.grad = torch.ones(3)
    opt.step()
    assert torch.equal(w.detach(), torch.full((3,), 0.5)) and opt.overflow is False
    w.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert torch.equal(w.detach(), torch.full((3,), 0.5)) and opt.overflow is True
    w.grad = torch.ones(3)
    bad[0] = True
    opt.step()
    assert torch.equal(w.detach(), torch.full((3,), 0.5)) and opt.overflow is True
    assert agreed == [False, True, True]  # every decision goes through the ranks' agreement


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(UserError, match="does not know DeepSpeed's object"):
        P.install_skip(object(), lambda: False, lambda flag: flag)
