"""Engine on DeepSpeed, in real processes: ZeRO 2/3 on 2 gloo ranks, ZeRO-0 vs ZeRO-2 gradients,
exact resume, a killed save, export from ZeRO-3, refusal messages.

Every multi-process case runs this file as a script (``python tests/test_engine_dist.py SPEC``) in
one process per rank with the launcher variables set, under a timeout, so a hang fails the test
instead of stalling the suite. The dataset and its item cache are built once per session, in the
pytest process, before any rank starts.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import deepspeed
import numpy as np
import pytest
import torch
import torch.distributed as dist
from spawn_ranks import start_ranks, wait_ranks
from train_parts import train_steps

from transrec.config import build_config
from transrec.engine.checkpoint import TMP_PREFIX, CheckpointError, CheckpointManager, tag_for
from transrec.shards.batch import collate_windows
from transrec.shards.dataset import Dataset
from transrec.shards.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240

BASE = ["model.user.layers=1", "model.user.max_len=8", "data.max_len=8", "data.batch_size=16",
        "model.text.max_len=12", "optim.warmup_steps=2", "optim.lr=0.003", "optim.encoder_lr=0.003",
        "run.progress=false", "run.tensorboard=false", "eval.max_users=0"]


# ----------------------------------------------------------------------------- driver (in a rank)

def _driver(spec: dict) -> None:
    from transrec.engine.trainer import Trainer  # lazy: see __main__

    cfg = build_config("tiny", overrides=BASE + spec.get("overrides", []))
    out = Path(spec["result"])
    trainer = Trainer(cfg, show=False)
    rank = trainer.rank
    what = spec["what"]
    res: dict = {"rank": rank, "world": trainer.world}
    if what == "train":
        if spec.get("eval"):
            r = trainer.fit()
        else:  # without the final evaluation; with stop_after, killed after that step (no end save)
            r = train_steps(trainer, until=spec.get("stop_after"), save="stop_after" not in spec)
        res.update(losses=r.losses, step=r.step, metrics=r.metrics)
        if spec.get("then_die_in_save"):
            out.write_text(json.dumps(res))
            _die_in_save(trainer)
        if spec.get("catalogue"):  # the trained weights and item embeddings (all ranks take part)
            from transrec.engine.ranking import encode_catalogue  # lazy: see __main__

            net = trainer.engine.module
            net.eval()
            emb = encode_catalogue(trainer.engine, trainer.content, chunk=16, device="cpu", show=False)
            # last: leaving the gathered context partitions even the parameters ZeRO-3 kept whole
            with deepspeed.zero.GatheredParameters(list(net.parameters()), enabled=trainer.zero_stage == 3):
                from transrec.models.negatives import STATE_PREFIX  # lazy: see __main__

                weights = {k: v.detach().clone() for k, v in net.state_dict().items()
                           if not k.startswith(STATE_PREFIX)}  # training state, not in exports
            if rank == 0:
                torch.save(emb, out.with_suffix(".emb.pt"))
                torch.save(weights, out.with_suffix(".weights.pt"))
    elif what == "grads":
        res.update(_first_step_grads(trainer, spec["global_rows"], out))
    trainer.close()
    if rank == 0:
        out.write_text(json.dumps(res))


def _die_in_save(trainer) -> None:
    """Save once more, killing the process after DeepSpeed wrote its files and before the commit."""
    engine = trainer.engine
    orig = engine.save_checkpoint

    def dying_save(*a, **kw):
        orig(*a, **kw)
        os.kill(os.getpid(), signal.SIGKILL)

    engine.save_checkpoint = dying_save
    trainer.state.step += 1
    trainer.save()


def _first_step_grads(trainer, global_rows: int, out: Path) -> dict:
    """Loss and full gradients of one step on a fixed global batch split evenly over the ranks.

    The model is in eval mode (no dropout, BatchNorm on running statistics) so that a row's
    computation does not depend on which other rows share its rank; what differs between the runs is
    only how DeepSpeed shards, reduces and averages, and how negatives are gathered across ranks.
    """
    from transrec.engine.data import make_loader  # lazy: see __main__

    loader = make_loader(trainer.cfg, trainer.ds, trainer.content, "train", batch_size=global_rows,
                         rank=0, world=1)
    loader.set_epoch(0)
    full = next(iter(loader))
    per = global_rows // trainer.world
    rows = range(trainer.rank * per, (trainer.rank + 1) * per)
    windows = [full.seq[i][full.mask[i]].numpy() for i in rows]
    batch = collate_windows(windows, full.users[list(rows)].numpy(), full.seq.shape[1], trainer.content,
                            trainer.ds.log_q)
    trainer.engine.module.eval()
    count, scale = trainer.step_scale([batch])
    loss, metrics = trainer.engine(batch)  # the trainer's forward and backward of one micro-batch
    trainer.engine.backward(loss * metrics["count"] * scale)
    loss_sum = metrics["loss_sum"]
    loss_t = loss_sum.detach().clone()
    if trainer.world > 1:
        dist.all_reduce(loss_t)
    loss_t /= count
    grads = {}
    for name, p in trainer.engine.module.named_parameters():
        if p.requires_grad:
            g = deepspeed.utils.safe_get_full_grad(p)
            if g is not None:
                grads[name] = g.detach().float().cpu().clone()
    if trainer.rank == 0:
        torch.save(grads, out.with_suffix(".grads.pt"))
    return {"loss": float(loss_t)}


# ----------------------------------------------------------------------------- spawning (in pytest)


def spawn(world: int, spec: dict, tmp: Path, timeout: int = TIMEOUT, expect_kill: bool = False) -> dict:
    """Run ``spec`` on ``world`` ranks; its result (rank 0's JSON)."""
    return spawn_many([(world, spec, expect_kill)], tmp, timeout)[0]


def spawn_many(jobs: list[tuple[int, dict, bool]], tmp: Path, timeout: int = TIMEOUT) -> list[dict]:
    """Run independent jobs ``(world, spec, expect_kill)`` at the same time; their results."""
    running = []
    for world, spec, expect_kill in jobs:
        spec_path = tmp / f"spec-{os.urandom(4).hex()}.json"
        spec_path.write_text(json.dumps(spec))
        procs = start_ranks([sys.executable, __file__, str(spec_path)], world, tmp, tag=spec_path.stem)
        running.append((spec, spec_path, procs, expect_kill))
    results = []
    for spec, spec_path, procs, expect_kill in running:
        codes = [code for code, _ in wait_ranks(procs, timeout)]
        if None in codes:
            pytest.fail(f"ranks did not finish within {timeout}s: {_tail(tmp, spec_path)}")
        if expect_kill:
            assert any(c == -signal.SIGKILL for c in codes), f"{codes}: {_tail(tmp, spec_path)}"
        elif any(codes):
            pytest.fail(f"ranks exited with {codes}: {_tail(tmp, spec_path)}")
        results.append(json.loads(Path(spec["result"]).read_text()))
    return results


def _tail(tmp: Path, spec_path: Path) -> str:
    logs = sorted(tmp.glob(f"rank*-{spec_path.stem}.log"))
    return " || ".join(f"{p.name}: {p.read_text()[-1500:]}" for p in logs)


@pytest.fixture(scope="session")
def world_data(tmp_path_factory):
    """A small source world with 8 sequence shards and its item cache, built once."""
    from transrec.engine.data import open_data  # lazy: see __main__

    root = tmp_path_factory.mktemp("engine_world")
    path = synthesize(root / "source", domain="source", n_users=160, n_items=64, seed=3, max_len=12)
    cfg = build_config("tiny", overrides=BASE + [f"data.path={path}"])
    open_data(cfg)  # builds the item cache now, in one process
    return str(path)


def _spec(tmp: Path, data: str, name: str, what: str, overrides: list[str], **kw) -> dict:
    return {"what": what, "result": str(tmp / f"{name}.json"),
            "overrides": [f"data.path={data}", f"run.out={tmp / name}"] + overrides, **kw}


# ----------------------------------------------------------------------------- tests

# Each stage trains with other candidates: the negative memory (the same on both ranks: every rank
# pushes both ranks' items) under ZeRO-2, and the catalogue table re-encoded every 5 steps (both
# ranks encode their share in lockstep, gathered) under ZeRO-3, the hardest stage for encoders.
NEGATIVES = {2: ["model.loss.negatives=memory", "model.loss.memory_size=96"],
             3: ["model.loss.negatives=catalogue", "model.loss.catalogue_refresh=5",
                 # and the hybrid items: a per-item vector table partitioned like any weight
                 "model.item.id_residual=true", "model.item.id_dropout=0.1", "optim.id_lr=0.01"]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_zero_training_loss_falls(stage, world_data, tmp_path):
    res = spawn(2, _spec(tmp_path, world_data, f"z{stage}", "train",
                         [f"deepspeed.zero_stage={stage}", "optim.steps=16", "run.log_every=4",
                          *NEGATIVES[stage]], catalogue=stage == 3, eval=stage == 3), tmp_path)
    losses = res["losses"]
    assert res["world"] == 2 and len(losses) == 16
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2, losses
    if stage != 3:
        return
    # Each evaluated user counted once over the two ranks.
    n_eval = sum(s.n_eval for s in Dataset.open(world_data).seq_shards)
    assert res["metrics"]["test"]["users"] == n_eval
    # Export from ZeRO-3: a fresh model loaded from it holds the trained weights, bit for bit, and
    # reproduces the trained model's item embeddings.
    from transrec.engine.consolidate import export_run  # lazy: see __main__
    from transrec.engine.data import open_data  # lazy: see __main__
    from transrec.engine.ranking import encode_catalogue  # lazy: see __main__
    from transrec.models import SequentialRecommender  # lazy: see __main__
    from transrec.models.export import export_config  # lazy: see __main__
    from transrec.models.negatives import STATE_PREFIX  # lazy: see __main__

    run = tmp_path / "z3"
    exp = export_run(run, tmp_path / "z3-export")
    cfg = export_config(exp)
    fresh = SequentialRecommender.from_export(exp)
    trained = torch.load(tmp_path / "z3.weights.pt", weights_only=True)
    loaded = {k: v for k, v in fresh.state_dict().items() if not k.startswith(STATE_PREFIX)}
    assert loaded.keys() == trained.keys()
    for name in trained:
        assert torch.equal(loaded[name], trained[name]), name
    seen = fresh.item_seen.numpy()  # the hybrid's vectors: trained for the items training read
    moved = torch.linalg.vector_norm(fresh.item_residual.weight.detach(), dim=1).numpy() > 0
    assert moved.any() and not moved[~seen].any()
    assert len(json.loads((exp / "export.json").read_text())["item_ids"]) == seen.shape[0]
    fresh.eval()
    _, content = open_data(cfg, world_data)
    got = encode_catalogue(fresh, content, chunk=16, device="cpu", show=False)
    want = torch.load(tmp_path / "z3.emb.pt", weights_only=True)
    # Same weights, but encoded in one process here and on two ranks (other thread counts, other
    # chunking) in training: fp32 sums in another order through a few layers of D-long dot
    # products, on unit-norm embeddings.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Resuming this checkpoint at another ZeRO stage is refused with the supported path; on another
    # world size at its stage it is taken (re-partitioned, tests/test_engine_reshard.py).
    ck = CheckpointManager(run)
    tag = ck.latest()
    assert ck.check_compatible(tag, world_size=1, zero_stage=3, run_dir=run)["world_size"] == 2
    for world, stage_ in ((1, 2), (2, 2)):
        with pytest.raises(CheckpointError) as e:
            ck.check_compatible(tag, world_size=world, zero_stage=stage_, run_dir=run)
        msg = str(e.value)
        assert "was written at ZeRO stage 3, this run has ZeRO stage 2" in msg
        assert f"transrec export --run {run}" in msg and "run.init_from=EXPORT" in msg


@pytest.mark.slow
def test_zero0_one_rank_equals_zero2_two_ranks_first_step(world_data, tmp_path):
    common = ["model.loss.negatives=global", "optim.steps=1", "data.batch_size=8"]
    one = spawn(1, _spec(tmp_path, world_data, "z0", "grads", common + ["deepspeed.zero_stage=0"],
                         global_rows=8), tmp_path)
    two = spawn(2, _spec(tmp_path, world_data, "z2", "grads", common + ["deepspeed.zero_stage=2"],
                         global_rows=8), tmp_path)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    g1 = torch.load(tmp_path / "z0.grads.pt", weights_only=True)
    g2 = torch.load(tmp_path / "z2.grads.pt", weights_only=True)
    assert g1.keys() == g2.keys() and len(g1) > 10
    nonzero = 0
    for k in g1:
        # fp32 sums in another order (two ranks' shares, then the all-reduce): an error that grows
        # with the gradient's own scale, over a floor for gradients that are zero in exact
        # arithmetic (a key bias under softmax) and hold only rounding noise
        scale = float(g1[k].abs().max())
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6 + 1e-5 * scale, msg=k)
        nonzero += bool(g1[k].abs().sum() > 0)
    assert nonzero > len(g1) // 2  # the comparison is not between zeros


@pytest.mark.slow
@pytest.mark.parametrize("negatives", ["memory", "catalogue"])
def test_resume_is_exact_and_a_killed_save_leaves_the_previous_checkpoint(negatives, world_data, tmp_path):
    from transrec.engine.consolidate import consolidated_state_dict  # lazy: see __main__

    k = 4
    # dropout on, so the RNG state must be restored too; ZeRO-1 so optimizer partitions are saved;
    # the loss's state too: the negative memory's entries, or a catalogue table encoded at step 3
    # that the resumed run (at step 4) must keep rather than re-encode
    common = ["deepspeed.zero_stage=1", f"optim.steps={2 * k}", "model.user.dropout=0.2", "run.log_every=1",
              f"model.loss.negatives={negatives}", "model.loss.memory_size=48",
              "model.loss.catalogue_refresh=3"]
    # 2k steps uninterrupted, and at the same time: k steps, a checkpoint, then a save killed after
    # DeepSpeed wrote its files and before the commit.
    full, first = spawn_many([
        (1, _spec(tmp_path, world_data, "full", "train", common), False),
        (1, _spec(tmp_path, world_data, "part", "train", common + [f"run.ckpt_every={k}"], stop_after=k,
                  then_die_in_save=True), True)], tmp_path)
    ck = CheckpointManager(tmp_path / "part")
    assert ck.latest() == tag_for(k)  # the killed save left the previous checkpoint as the latest
    assert (ck.dir / f"{TMP_PREFIX}{tag_for(k + 1)}").is_dir()
    second = spawn(1, _spec(tmp_path, world_data, "part", "train", common + ["run.resume=true"]), tmp_path)
    assert len(full["losses"]) == 2 * k and len(first["losses"]) == k and len(second["losses"]) == k
    assert first["losses"] + second["losses"] == pytest.approx(full["losses"], rel=1e-6, abs=1e-7)
    a, _ = consolidated_state_dict(tmp_path / "full")
    b, _ = consolidated_state_dict(tmp_path / "part")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    assert not any(p.name.startswith(TMP_PREFIX) for p in ck.dir.iterdir())  # pruned on the next save


if __name__ == "__main__":
    # A rank sets its environment before transformers loads (it reads HF_HUB_OFFLINE on import): the
    # modules that load it are imported inside the functions above, marked "lazy: see __main__".
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _driver(json.loads(Path(sys.argv[1]).read_text()))
