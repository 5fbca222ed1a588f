"""Resuming on another number of ranks: the model and optimizer states re-partitioned equal the
states the writing ranks held (gathered with DeepSpeed's own API before they stopped), the schedule
and the step continue, and the rest of the interrupted epoch is read exactly once by the new ranks.

The loader part runs in this process (loaders of every rank side by side); the trainer part on real
gloo ranks in spawned processes: 2 -> 1, 1 -> 2 and 2 -> 4 at ZeRO 0, 2 and 3; and bare DeepSpeed
engines over a model of odd-sized tensors with a frozen layer, 2 -> 3 and 2 -> 1 at ZeRO 1, 2 and 3."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from spawn_ranks import run_ranks

from transrec.config import build_config
from transrec.engine.data import open_data
from transrec.shards.loader import SequenceLoader
from transrec.shards.synth import synthesize

STAGES = (0, 2, 3)
OVER = ["model.user.layers=1", "model.user.max_len=8", "data.max_len=8", "data.batch_size=16",
        "model.text.max_len=12", "optim.warmup_steps=2", "optim.steps=40", "run.progress=false",
        "run.tensorboard=false", "eval.every=0", "run.monitor=", "run.log_every=1", "run.ckpt_every=0",
        "model.user.dropout=0.2"]
STOP_AT = 3  # steps trained before the checkpoint; an epoch is 10 steps of 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    path = synthesize(root / "w", domain="source", n_users=160, n_items=64, seed=4, max_len=12)
    ds, content = open_data(build_config("tiny", overrides=[f"data.path={path}", "model.text.max_len=12"]))
    return path, ds, content


# ----------------------------------------------------------------------------- the loader alone

def rows(batches) -> list[tuple]:
    out = []
    for b in batches:
        for u, seq in zip(b.users.tolist(), b.seq.tolist()):
            out.append((u, tuple(seq)))
    return out


def loader(ds, content, rank, world, batch, workers=0, **kw) -> SequenceLoader:
    return SequenceLoader(ds, content, split="train", batch_size=batch, max_len=8, seed=3, rank=rank,
                          world_size=world, num_workers=workers, **kw)


@pytest.mark.parametrize("old,new,taken", [
    ((2, 8, 0), (1, 16, 0), 3), ((1, 16, 0), (2, 8, 0), 4), ((2, 8, 0), (4, 4, 0), 3),
    ((2, 8, 2), (3, 4, 1), 5),  # workers change too; 12 rows a new global micro-batch: 8 rows left out
    ((2, 8, 0), (4, 8, 0), 1),  # a larger global micro-batch: the last rows split into smaller batches
], ids=["2to1", "1to2", "2to4", "2to3-workers", "2to4-larger"])
def test_the_rest_of_an_epoch_is_read_exactly_once_by_another_layout(world, old, new, taken):
    _, ds, content = world
    (n, b, w), (m, b2, w2) = old, new
    olds = [loader(ds, content, r, n, b, w) for r in range(n)]
    epoch = [list(ld) for ld in olds]  # every old rank's batches of epoch 0
    full = Counter(rows(x for per in epoch for x in per))
    done = Counter(rows(x for per in epoch for x in per[:taken]))
    cursor = int(epoch[0][taken - 1].cursor)
    assert cursor == taken * b * n
    layout = {"world": n, "batch": b, "workers": w}
    news = [loader(ds, content, r, m, b2, w2, start_cursor=cursor, layout=layout) for r in range(m)]
    got = [list(ld) for ld in news]
    assert len({len(x) for x in got}) == 1, "every new rank yields the same number of batches"
    assert len({tuple(len(bt.users) for bt in x) for x in got}) == 1, "the same batch sizes on every rank"
    rest = Counter(rows(x for per in got for x in per))
    left_out = news[0].replay_left_out
    assert sum((done + rest).values()) + left_out == sum(full.values())
    assert done + rest == full or (left_out and not (done + rest) - full)
    if (b * n) % (b2 * m) == 0:  # the new global micro-batch divides the old: nothing is left out
        assert left_out == 0 and done + rest == full
    cursors = [[int(bt.cursor) for bt in x] for x in got]
    assert all(c == cursors[0] for c in cursors) and cursors[0] == sorted(cursors[0])
    assert cursors[0][-1] == sum(full.values()) - left_out
    # a later epoch is the new layout's own, from its start
    for ld in news:
        ld.set_epoch(1)
    fresh = [loader(ds, content, r, m, b2, w2) for r in range(m)]
    for ld in fresh:
        ld.set_epoch(1)
    assert [rows(list(a)) for a in news] == [rows(list(f)) for f in fresh]


def test_an_epoch_finished_in_another_layout_can_move_again_part_way(world):
    """2 ranks begin the epoch, 4 ranks of batches of 2 read part of the rest (the cursor then lies
    within a batch of the old layout), and 2 ranks of the old shape finish it: every row once."""
    _, ds, content = world
    layout = {"world": 2, "batch": 8, "workers": 0}
    epoch = [list(loader(ds, content, r, 2, 8)) for r in range(2)]
    full = Counter(rows(x for per in epoch for x in per))
    done = Counter(rows(x for per in epoch for x in per[:2]))
    middle = [list(loader(ds, content, r, 4, 2, start_cursor=32, layout=layout))[:3] for r in range(4)]
    cursor = int(middle[0][-1].cursor)
    assert cursor == 32 + 3 * 8 and cursor % 16
    done += Counter(rows(x for per in middle for x in per))
    last = [loader(ds, content, r, 2, 8, start_cursor=cursor, layout=layout) for r in range(2)]
    assert last[0].layout == layout  # its own shape, but the cursor lies within one of its batches
    rest = Counter(rows(x for ld in last for x in ld))
    assert done + rest == full and sum(rest.values()) == sum(full.values()) - cursor


# ----------------------------------------------------------------------------- trainers on gloo ranks

def _env(rank: int, port: int, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def _trainer(data: str, out: Path, stage: int):
    from transrec.engine.trainer import Trainer  # lazy: built in the spawned rank, after its environment

    return Trainer(build_config("tiny", overrides=[f"data.path={data}", f"run.out={out}",
                                                   f"deepspeed.zero_stage={stage}", *OVER]), show=False)


def _rows_of(batches) -> list[list]:
    return [[u, list(seq)] for b in batches for u, seq in zip(b.users.tolist(), b.seq.tolist())]


def _epoch_rest(trainer) -> list[list]:
    """The rows of the rest of the epoch in progress, as this rank's loader hands them out."""
    epoch, got = trainer.position[0], []
    batches = trainer.micro_batches()
    for _ in range(1000):
        batch = next(batches)
        if trainer.position[0] != epoch:
            return got
        got += _rows_of([batch])
    raise AssertionError("an epoch of more than 1000 batches")


def _states(trainer) -> dict:
    """The engine's whole states, gathered with DeepSpeed's own API (collective at ZeRO 1-3)."""
    import deepspeed  # lazy: DeepSpeed's gather API, in the spawned rank
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # lazy: as above

    engine = trainer.engine
    named = dict(engine.module.named_parameters())
    out = {"master": {}, "exp_avg": {}, "exp_avg_sq": {}}
    # partitioned: ZeRO 1-3, and DeepSpeed's bf16 optimizer at ZeRO-0
    split = any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in named.values())
    base = engine.optimizer.optimizer if split else engine.optimizer
    if trainer.zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(named.values())):
            out["module"] = {n: p.detach().float().clone() for n, p in named.items()}
    else:
        out["module"] = {n: p.detach().float().clone() for n, p in named.items()}
    if not split:
        for n, p in named.items():
            if p.requires_grad:
                st = base.state[p]
                out["master"][n] = p.detach().float().clone()
                out["exp_avg"][n], out["exp_avg_sq"][n] = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    else:
        link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2: point the fragments at the optimizer state, as its step does
            engine.optimizer._hp_optimizer_states_linked = False
            link()
        for n, p in named.items():
            if p.requires_grad:
                out["master"][n] = safe_get_full_fp32_param(p).float().clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    out[key][n] = safe_get_full_optimizer_state(p, key).float().clone()
    out["buffers"] = {n: b.detach().clone() for n, b in engine.module.named_buffers()}
    out["step"] = sorted({float(s["step"]) for s in base.state.values() if "step" in s})
    out["lr"] = [float(g["lr"]) for g in base.param_groups]
    out["scheduler"] = int(engine.lr_scheduler.last_epoch)
    out["counters"] = [int(engine.global_steps), int(engine.global_samples)]
    return out


def _first(rank: int, port: int, data: str, root: str, world: int) -> None:
    """Train STOP_AT steps on ``world`` ranks at each stage, checkpoint, and record the states and the
    rows read so far and those the rest of the epoch would give."""
    _env(rank, port, world)
    for stage in STAGES:
        out = Path(root) / f"z{stage}-from{world}"
        trainer = _trainer(data, out, stage)
        seen: list = []
        step = trainer.train_step

        def recording(micro, step=step, seen=seen):
            seen.extend(_rows_of(micro))
            return step(micro)

        trainer.train_step = recording
        try:
            trainer.begin()
            steps = trainer.steps()
            for _ in range(STOP_AT):
                next(steps)
            steps.close()
            trainer.save()
            states = _states(trainer)
            rest = _epoch_rest(trainer)
        finally:
            trainer.close()
        if rank == 0:
            torch.save(states, out / "reference-states.pt")
        (out / f"rows-rank{rank}.json").write_text(json.dumps({"seen": seen, "rest": rest}))


def _second(rank: int, port: int, data: str, root: str, source: int, world: int) -> None:
    """Resume each stage's checkpoint of ``source`` ranks on ``world`` ranks; record the states, the
    rest of the epoch's rows and what was said."""
    _env(rank, port, world)
    for stage in STAGES:
        out = Path(root) / f"z{stage}-from{source}-on{world}"
        trainer = _trainer(data, out, stage)
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                trainer.begin()
            states = _states(trainer)
            rest = _epoch_rest(trainer)
        finally:
            trainer.close()
        if rank == 0:
            torch.save(states, out / "resumed-states.pt")
            (out / "said.txt").write_text(said.getvalue())
        (out / f"rest-rank{rank}.json").write_text(json.dumps(rest))


@pytest.fixture(scope="module")
def sources(world, tmp_path_factory):
    """Checkpoints of step STOP_AT at ZeRO 0, 2 and 3, written by 2 ranks and by 1."""
    data = world[0]
    root = tmp_path_factory.mktemp("sources")
    for n in (2, 1):
        run_ranks(_first, str(data), str(root), n, world=n, timeout=600)
    return str(data), root


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what} {k}"


def _rows(out: Path, pattern: str, key: str | None = None) -> Counter:
    got = Counter()
    for f in sorted(out.glob(pattern)):
        rows = json.loads(f.read_text())
        for u, seq in (rows[key] if key else rows):
            got[(u, tuple(seq))] += 1
    return got


@pytest.mark.slow
@pytest.mark.parametrize("source,target", [(2, 1), (1, 2), (2, 4)], ids=["2to1", "1to2", "2to4"])
def test_a_checkpoint_resumes_on_another_number_of_ranks_at_zero_0_2_3(sources, tmp_path, source, target):
    data, root = sources
    for stage in STAGES:
        shutil.copytree(root / f"z{stage}-from{source}", tmp_path / f"z{stage}-from{source}-on{target}")
    run_ranks(_second, data, str(tmp_path), source, target, world=target, timeout=900)
    for stage in STAGES:
        src, out = root / f"z{stage}-from{source}", tmp_path / f"z{stage}-from{source}-on{target}"
        ref, got = _load(src / "reference-states.pt"), _load(out / "resumed-states.pt")
        for part in ("module", "master", "exp_avg", "exp_avg_sq", "buffers"):
            _same(ref[part], got[part], f"ZeRO-{stage} {source}->{target} {part}")
        assert ref["master"] and ref["exp_avg"]
        assert got["step"] == ref["step"] == [float(STOP_AT)]
        assert got["lr"] == ref["lr"] and got["scheduler"] == ref["scheduler"] == STOP_AT
        assert got["counters"] == ref["counters"] == [STOP_AT, STOP_AT * 16]
        said = (out / "said.txt").read_text()
        assert f"resumed on {target} rank{'s' if target > 1 else ''} from a checkpoint of {source}: " in said
        assert "global batch 16 kept" in said and "each sample once" in said and "left out" not in said
        # every row of the epoch: read before the checkpoint, or by the new ranks after it, once
        seen, rest = _rows(src, "rows-rank*.json", "seen"), _rows(src, "rows-rank*.json", "rest")
        after = _rows(out, "rest-rank*.json")
        assert sum(seen.values()) == STOP_AT * 16 and after == rest
        assert {u for u, _ in seen + after} == set(range(160))  # every training user of the epoch


# ----------------------------------------------------------------------------- odd sizes, frozen weights

TOY_STAGES = (1, 2, 3)


def _toy_engine(stage: int, world: int):
    """A DeepSpeed engine over a model whose every tensor has an odd size (ZeRO-3 pads its slices),
    with a frozen middle layer."""
    import deepspeed  # lazy: built in the spawned rank, after its environment

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))
    model[2].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def _toy_first(rank: int, port: int, root: str) -> None:
    from transrec.engine import distributed as D  # lazy: in the spawned rank, after its environment

    _env(rank, port, 2)
    D.init("gloo")
    for stage in TOY_STAGES:
        engine = _toy_engine(stage, 2)
        gen = torch.Generator().manual_seed(10 + rank)
        for _ in range(3):
            loss = engine(torch.randn(2, 3, generator=gen)).pow(2).mean()
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(f"{root}/z{stage}", tag="t")
        states = _toy_states(engine)
        if rank == 0:
            torch.save(states, f"{root}/z{stage}/reference.pt")
    _leave()


def _toy_states(engine) -> dict:
    import deepspeed  # lazy: DeepSpeed's gather API, in the spawned rank
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # lazy: as above

    named = dict(engine.module.named_parameters())
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()
    zero3 = any(hasattr(p, "ds_id") for p in named.values())
    with deepspeed.zero.GatheredParameters(list(named.values()), enabled=zero3):
        out = {"module": {n: p.detach().clone() for n, p in named.items()}}
    trained = {n: p for n, p in named.items() if p.requires_grad}
    out["fp32"] = {n: safe_get_full_fp32_param(p).clone() for n, p in trained.items()}
    for key in ("exp_avg", "exp_avg_sq"):
        out[key] = {n: safe_get_full_optimizer_state(p, key).clone() for n, p in trained.items()}
    out["step"] = sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values()})
    return out


def _toy_second(rank: int, port: int, root: str, world: int) -> None:
    from transrec.engine import distributed as D  # lazy: in the spawned rank, after its environment
    from transrec.engine.checkpoint import weights_only_loads  # lazy: as above
    from transrec.engine.reshard import apply, consolidate  # lazy: as above

    _env(rank, port, world)
    D.init("gloo")
    for stage in TOY_STAGES:
        engine = _toy_engine(stage, world)
        folder = Path(f"{root}/z{stage}/t")
        with weights_only_loads(folder):
            apply(engine, consolidate(folder, 2), rank, world)
        states = _toy_states(engine)
        if rank == 0:
            torch.save(states, f"{root}/z{stage}/on{world}.pt")
    _leave()


def _leave() -> None:
    """Every rank done, then the process group closed: a rank that exits while gloo's threads still
    serve the group may abort at interpreter exit ("terminate called without an active exception")."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_odd_sized_and_frozen_tensors_are_re_partitioned_exactly(tmp_path):
    """ZeRO-1, 2 and 3 states of 2 ranks, resumed on 3 and on 1: every tensor of odd size (ZeRO-3
    pads the last rank's slice), a frozen layer (ZeRO-3 partitions it too)."""
    run_ranks(_toy_first, str(tmp_path), world=2, timeout=300)
    for m in (3, 1):
        run_ranks(_toy_second, str(tmp_path), m, world=m, timeout=300)
        for stage in TOY_STAGES:
            ref = _load(tmp_path / f"z{stage}" / "reference.pt")
            got = _load(tmp_path / f"z{stage}" / f"on{m}.pt")
            assert any(v.numel() % 2 for v in ref["module"].values()) and len(ref["fp32"]) == 4
            for part in ("module", "fp32", "exp_avg", "exp_avg_sq"):
                _same(ref[part], got[part], f"ZeRO-{stage} 2->{m} {part}")
            assert got["step"] == ref["step"] == [3.0]
