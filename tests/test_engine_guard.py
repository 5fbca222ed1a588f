"""The non-finite guard: a step whose loss or gradient is NaN changes nothing, on every rank, at every
ZeRO stage; too many in a row stop the run (exit 3) keeping the last good checkpoint; evaluation and
export refuse non-finite numbers."""

from __future__ import annotations

import os

import deepspeed
import pytest
import torch
import torch.distributed as dist
from spawn_ranks import run_ranks
from train_parts import train_steps

from transrec.cli import main as cli_main
from transrec.config import build_config
from transrec.engine.data import open_data
from transrec.engine.guard import DIVERGED_EXIT, Diverged
from transrec.engine.optim import learning_rates
from transrec.engine.trainer import Trainer
from transrec.errors import UserError
from transrec.models.export import write_export
from transrec.shards.synth import synthesize

COMMON = ["model.user.layers=1", "model.user.max_len=8", "data.max_len=8", "model.text.max_len=12",
          "data.batch_size=8", "optim.warmup_steps=0", "run.progress=false", "run.tensorboard=false",
          "eval.max_users=0"]
NAN = float("nan")


pytestmark = pytest.mark.usefixtures("inprocess_group")  # see conftest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = synthesize(tmp_path_factory.mktemp("guard") / "d", domain="source", n_users=80, n_items=40,
                      seed=7, min_len=3, max_len=10)
    open_data(build_config("tiny", overrides=[f"data.path={path}", *COMMON]))  # the item cache, once
    return path


def make(data, out, *extra) -> Trainer:
    cfg = build_config("tiny", overrides=[f"data.path={data}", f"run.out={out}", *COMMON, *extra])
    return Trainer(cfg, show=False)


def poison(tr: Trainer, calls: set[int], where: str, ranks: set[int] | None = None) -> None:
    """Make the n-th micro-batch (counted from 1) NaN on ``ranks``: its gradient (the loss the
    backward starts from) or only its reported loss sum (finite gradient)."""
    real = tr.engine.forward
    n = [0]

    def forward(batch):
        n[0] += 1
        bad = n[0] in calls and (ranks is None or tr.rank in ranks)
        loss, metrics = real(batch)
        if bad and where == "grad":
            loss = loss * NAN
        if bad and where == "loss":
            metrics = {**metrics, "loss_sum": metrics["loss_sum"] * NAN}
        return loss, metrics

    tr.engine.forward = forward


def snapshot(tr: Trainer) -> dict:
    """Every weight and buffer (whole, at any ZeRO stage), the learning rates, DeepSpeed's counters."""
    net = tr.engine.module
    with deepspeed.zero.GatheredParameters(list(net.parameters()), enabled=tr.zero_stage == 3):
        weights = {k: v.detach().float().clone() for k, v in net.state_dict().items()}
    return {"weights": weights, "lr": learning_rates(tr.optimizer), "step": tr.state.step,
            "skipped": tr.engine.skipped_steps, "global": tr.engine.global_steps}


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


def check_skip_then_step(tr: Trainer, where: str) -> None:
    """Step 1 applies; call 2 is poisoned and skipped (nothing changes); call 3 applies finitely."""
    poison(tr, {2}, where)
    batches = tr.micro_batches()
    assert tr.train_step([next(batches)]) is not None
    before = snapshot(tr)
    assert tr.train_step([next(batches)]) is None
    after = snapshot(tr)
    assert same_weights(before, after), "a skipped step changed weights or buffers"
    assert after["lr"] == before["lr"] and after["step"] == before["step"] == 1
    assert after["skipped"] == before["skipped"] + 1
    assert tr.train_step([next(batches)]) is not None
    final = snapshot(tr)
    assert not same_weights(after, final) and final["step"] == 2
    assert all(torch.isfinite(v).all() for v in final["weights"].values())


@pytest.mark.parametrize("extra", [
    ["deepspeed.zero_stage=0"],  # fp32: the client optimizer, single-process fast path
    ["deepspeed.zero_stage=0", "deepspeed.precision=bf16"],  # DeepSpeed's BF16_Optimizer
    ["deepspeed.zero_stage=1"],
    ["deepspeed.zero_stage=3"],
], ids=["zero0", "zero0-bf16", "zero1", "zero3"])
def test_a_nan_gradient_or_loss_skips_the_step(data, tmp_path, extra):
    for where in ("grad", "loss"):
        tr = make(data, tmp_path / where, *extra)
        check_skip_then_step(tr, where)
        tr.close()


def test_too_many_bad_steps_in_a_row_stop_keeping_the_last_good_checkpoint(data, tmp_path):
    tr = make(data, tmp_path / "r", "run.max_bad_steps=3", "run.ckpt_every=2", "optim.steps=10")
    poison(tr, {3, 5, 6, 7, 8, 9}, "grad")  # one isolated bad step, then four in a row
    with pytest.raises(Diverged, match="3 steps in a row .* after step 3; the latest checkpoint is "
                                       ".*step-00000002"):
        train_steps(tr, save=True)
    assert tr.guard.skipped_steps == 4 and tr.state.step == 3
    assert tr.ckpt.latest() == "step-00000002"
    assert Diverged.exit_code == DIVERGED_EXIT == 3
    # the model in memory is the last good one: evaluation still works
    assert tr.validator.split_metrics("valid")["users"] > 0
    tr.close()


def test_evaluation_refuses_nonfinite_scores(data, tmp_path):
    tr = make(data, tmp_path / "r")
    with torch.no_grad():
        next(p for n, p in tr.engine.module.named_parameters() if "user" in n).fill_(NAN)
    with pytest.raises(UserError, match="evaluation refused: .* not finite"):
        tr.validator.split_metrics("valid")
    tr.close()


def test_export_refuses_nonfinite_weights(data, tmp_path):
    cfg = build_config("tiny", overrides=[f"data.path={data}"])
    out = tmp_path / "e"
    with pytest.raises(UserError, match="export refused: 1 weight tensors hold NaN or inf .first b"):
        write_export(out, {"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, cfg, {"kind": "full"})
    assert not out.exists()


def test_cli_diverged_run_exits_3_with_one_line(data, tmp_path, capsys):
    code = cli_main(["train", "--data", str(data), "--out", str(tmp_path / "r"), *COMMON,
                     "optim.lr=1e6", "optim.encoder_lr=1e6", "optim.steps=20", "run.max_bad_steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3, err
    assert err[-1].startswith("transrec: error: training diverged: 2 steps in a row")
    assert not any("Traceback" in line for line in err)


# ----------------------------------------------------------------------------- two gloo ranks

def _two_ranks(rank: int, port: int, data: str, out: str, stage: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    tr = make(data, out, f"deepspeed.zero_stage={stage}")
    assert tr.world == 2
    # only rank 1 sees NaN: its gradient at call 2, its loss alone (finite gradient) at call 3
    poison(tr, {2}, "grad", ranks={1})
    poison(tr, {3}, "loss", ranks={1})
    batches = tr.micro_batches()
    assert tr.train_step([next(batches)]) is not None
    before = snapshot(tr)
    assert tr.train_step([next(batches)]) is None  # every rank skips, not only rank 1
    assert tr.train_step([next(batches)]) is None
    after = snapshot(tr)
    assert same_weights(before, after) and after["skipped"] == before["skipped"] + 2
    assert tr.train_step([next(batches)]) is not None
    w = torch.cat([v.flatten() for v in snapshot(tr)["weights"].values()])
    gathered = [torch.empty_like(w) for _ in range(2)]
    dist.all_gather(gathered, w)
    assert torch.isfinite(w).all() and torch.equal(gathered[0], gathered[1])
    tr.close()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2])
def test_two_ranks_agree_to_skip_when_one_rank_sees_nan(data, tmp_path, stage):
    run_ranks(_two_ranks, str(data), str(tmp_path / "r"), stage, world=2, timeout=180)
