"""One optimizer step, in process: the loss of an accumulated step is normalised by the global
target count, bf16 trains, the single-process fast path steps as DeepSpeed's own step does, and
FlatAdamW steps as torch's AdamW does (checkpoints interchangeable)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from train_parts import train_steps

from transrec.config import build_config
from transrec.engine import trainer as trainer_mod
from transrec.engine.optim import FlatAdamW
from transrec.engine.trainer import Trainer
from transrec.shards.synth import synthesize

COMMON = ["model.user.layers=1", "model.user.max_len=8", "data.max_len=8", "model.text.max_len=12",
          "optim.warmup_steps=0", "run.progress=false", "run.tensorboard=false", "eval.max_users=0"]


pytestmark = pytest.mark.usefixtures("inprocess_group")  # see conftest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("steps") / "d", domain="source", n_users=120, n_items=60,
                      seed=5, min_len=3, max_len=12)


def make(data, out, *extra) -> Trainer:
    cfg = build_config("tiny", overrides=[f"data.path={data}", f"run.out={out}", *COMMON, *extra])
    return Trainer(cfg, show=False)


def test_accumulated_step_is_the_mean_over_every_target(data, tmp_path):
    """Two micro-batches with different target counts: the step's gradient is that of their summed
    loss over the summed count, not the average of the two micro-batch means."""
    tr = make(data, tmp_path / "r", "data.batch_size=16", "data.micro_batch_size=8",
              "model.user.kind=causal")
    assert tr.accum == 2
    net = tr.engine.module
    net.eval()  # no dropout, so the reference below computes the very same function
    ref = copy.deepcopy(net)
    batches = tr.micro_batches()
    group = [next(batches), next(batches)]
    counts = [net.count_targets(b) for b in group]
    assert counts[0] != counts[1], counts  # else the two normalisations would agree
    grads = {}
    real_step = tr.engine.step

    def capture_then_step():
        if tr.engine.is_gradient_accumulation_boundary():
            grads.update({n: p.grad.detach().clone() for n, p in net.named_parameters()
                          if p.grad is not None})
        real_step()

    tr.engine.step = capture_then_step
    loss_sum, count = tr.train_step(group)
    assert float(count) == sum(counts)
    total = 0
    for b in group:
        loss, metrics = ref(b)
        assert int(metrics["count"]) == net.count_targets(b)
        total = total + loss * metrics["count"]
    (total / sum(counts)).backward()
    assert float(loss_sum) / float(count) == pytest.approx(float(total) / sum(counts), rel=1e-5)
    checked = 0
    for n, p in ref.named_parameters():
        if p.grad is None:
            continue
        scale = float(p.grad.abs().max())
        # fp32, the same operations in another grouping: a few roundings of the gradient's scale
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6 + 1e-5 * scale, msg=n)
        checked += scale > 0
    assert checked > 10
    tr.close()


def test_bf16_trains(data, tmp_path):
    tr = make(data, tmp_path / "r", "deepspeed.precision=bf16", "optim.steps=30", "data.batch_size=16")
    assert next(tr.engine.module.parameters()).dtype == torch.bfloat16
    res = train_steps(tr)
    tr.close()
    assert len(res.losses) == 30 and all(np.isfinite(res.losses))
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5]) - 0.2, res.losses


def test_single_process_fast_path_steps_as_deepspeed_does(data, tmp_path, monkeypatch):
    """The fast path (no all-reduce over one rank, foreach clipping) against DeepSpeed's own step,
    with clipping active at every step."""
    extra = ["optim.steps=4", "optim.grad_clip=0.05", "data.batch_size=16"]

    def weights_after(name):
        tr = make(data, tmp_path / name, *extra)
        train_steps(tr)
        tr.close()
        return {n: p.detach().clone() for n, p in tr.engine.module.named_parameters()}, tr

    fast, tr = weights_after("fast")
    assert not tr.engine.enable_backward_allreduce  # the fast path was taken
    monkeypatch.setattr(trainer_mod, "single_process_fast_path", lambda engine: None)
    plain, tr = weights_after("plain")
    assert tr.engine.enable_backward_allreduce
    moved = 0
    for n, w in plain.items():
        torch.testing.assert_close(fast[n], w, rtol=1e-5, atol=1e-6, msg=n)
    first = make(data, tmp_path / "init", *extra)
    for n, p in first.engine.module.named_parameters():
        moved += not torch.equal(p.detach(), plain[n])
    first.close()
    assert moved > 10  # the comparison is between trained weights


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((7, 5), (5,), (3, 4, 2))]


def _grads(step, params):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _run(opt, params, steps, first=0):
    for s in range(first, first + steps):
        _grads(s, params)
        opt.step()


@pytest.mark.parametrize("direction", ["flat-to-torch", "torch-to-flat"])
def test_flat_adamw_steps_as_torch_adamw_and_checkpoints_interchange(direction):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    a, b = _params(0), _params(0)
    flat = FlatAdamW([{"params": a[:2]}, {"params": a[2:], "weight_decay": 0.0}], **kw)
    ref = torch.optim.AdamW([{"params": b[:2]}, {"params": b[2:], "weight_decay": 0.0}], foreach=False, **kw)
    _run(flat, a, 3)
    _run(ref, b, 3)
    for x, y in zip(a, b):  # one fused update of a flat buffer against per-tensor updates
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    # a checkpoint of one optimizer resumes in the other: the next steps agree
    src, src_params = (flat, a) if direction == "flat-to-torch" else (ref, b)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in src_params]
    groups = [{"params": resumed[:2]}, {"params": resumed[2:], "weight_decay": 0.0}]
    dst = torch.optim.AdamW(groups, foreach=False, **kw) if src is flat else FlatAdamW(groups, **kw)
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    _run(dst, resumed, 2, first=3)
    _run(src, src_params, 2, first=3)
    for x, y in zip(resumed, src_params):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    st = dst.state_dict()["state"]
    assert all(float(v["step"]) == 5 for v in st.values())
