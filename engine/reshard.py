"""Resuming on another number of ranks: a checkpoint's states consolidated, then partitioned anew.

At ZeRO 1-3 a checkpoint written by N ranks holds each rank's partition of the fp32 master weights
and of the Adam moments. :func:`consolidate` reads every partition (weights-only, on the CPU, in
each process) and rebuilds, per parameter, the whole fp32 weight, ``exp_avg`` and ``exp_avg_sq``:

- ZeRO-1/2: each parameter group is one flat buffer cut into N equal partitions; the partitions laid
  end to end give the buffer, in which the parameters follow one another in the order the model
  states file records (``param_shapes``, with any alignment padding after a parameter);
- ZeRO-3: every parameter is cut on its own into N slices of ``ceil(numel / N)`` (the last one
  padded); a rank's flat buffer is its slices in that same order.

Frozen weights come from the model states (ZeRO-3: each rank's fragment of them), buffers
(BatchNorm statistics) from rank 0's. The Adam moments follow exactly the fp32 buffers' layout.

:func:`apply` then hands them to the engine built on M ranks. A freshly built engine has no
optimizer state until its first step, so the base optimizer's state is first created for this
rank's flat partitions (the step, moments of zero; at ZeRO-1/2 each parameter's fragment is then
linked to it as DeepSpeed's own step does), and filled through DeepSpeed's fragment API
(``safe_set_full_fp32_param`` and ``safe_set_full_optimizer_state`` at ZeRO-1/2, where each rank
keeps the fragment its new partition owns; the ``safe_set_local_*`` calls at ZeRO-3 with this rank's
slice of the new partitioning), the module's weights and buffers, the Adam step, the learning-rate
schedule and the engine's step and sample counters. Nothing is partitioned at ZeRO-0 in fp32:
DeepSpeed loads its states on any number of ranks as they are (:func:`partitioned` says which).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deepspeed.utils import (
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)

from transrec.errors import UserError

MOMENTS = ("exp_avg", "exp_avg_sq")
_RANK = re.compile(r"zero_pp_rank_(\d+)_")


class ReshardError(UserError):
    """A checkpoint whose partitions do not add up (named, with what is wrong)."""


@dataclass
class FullState:
    """Every parameter's whole fp32 weight and Adam moments, and what else a resume restores."""

    world: int  # ranks that wrote the checkpoint
    stage: int  # its ZeRO stage
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable and frozen, fp32
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # key -> name -> tensor
    step: torch.Tensor | None = None  # Adam's step count
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    scheduler: dict | None = None
    counters: dict = field(default_factory=dict)  # the engine's global_steps, global_samples, ...


def optimizer_files(folder: Path) -> list[Path]:
    """The ``*optim_states.pt`` files of the checkpoint, ordered by the rank that wrote them."""
    files = [p for p in Path(folder).glob("*optim_states.pt") if _RANK.search(p.name)]
    return sorted(files, key=lambda p: int(_RANK.search(p.name).group(1)))


def partitioned(folder: Path) -> bool:
    """True when the checkpoint's optimizer states are partitioned over its ranks (ZeRO 1-3, and
    DeepSpeed's bf16 optimizer)."""
    return bool(optimizer_files(folder))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _base_state(osd: dict) -> list[dict]:
    """The base optimizer's state of each flat group, in group order."""
    base = osd.get("base_optimizer_state", osd.get("optimizer_state_dict"))
    if isinstance(base, dict) and "state" in base:
        base = base["state"]
        return [base[k] for k in sorted(base)]
    return list(base)


def _moment(state: dict, key: str, like: torch.Tensor) -> torch.Tensor:
    v = state.get(key)
    return torch.zeros_like(like) if v is None else v.float()


def consolidate(folder: str | Path, world: int) -> FullState:
    """The whole states of a partitioned checkpoint written by ``world`` ranks (see the module
    docstring); ReshardError when its files do not add up."""
    folder = Path(folder)
    files = optimizer_files(folder)
    if len(files) != world:
        raise ReshardError(f"{folder}: {len(files)} optimizer state files for a checkpoint of {world} ranks")
    optim = [_load(f)["optimizer_state_dict"] for f in files]
    stage = int(optim[0].get("zero_stage", 1))
    if stage == 3:
        models = [_load(folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for r in range(world)]
    else:
        models = [_load(folder / "mp_rank_00_model_states.pt")]
    out = FullState(world=world, stage=stage)
    first = models[0]
    names = set(first.get("buffer_names") or [])
    out.buffers = {k: v for k, v in first["module"].items() if k in names}
    out.scheduler = first.get("lr_scheduler")
    out.counters = {k: first[k] for k in ("global_steps", "global_samples", "skipped_steps") if k in first}
    states = [_base_state(o) for o in optim]
    steps = [s["step"] for rank in states for s in rank if "step" in s]
    out.step = steps[0].clone() if steps and torch.is_tensor(steps[0]) else (steps[0] if steps else None)
    if stage == 3:
        _zero3(out, folder, optim, states, models)
    else:
        _zero12(out, folder, optim, states, first)
    return out


def _zero12(out: FullState, folder: Path, optim: list, states: list, model: dict) -> None:
    shapes = model["param_shapes"]
    paddings = optim[0].get("param_alignment_paddings")
    key = "single_partition_of_fp32_groups"
    for g, group in enumerate(shapes):
        flat = torch.cat([o[key][g].float() for o in optim])
        moments = {m: torch.cat([_moment(s[g], m, o[key][g]) for s, o in zip(states, optim)])
                   for m in MOMENTS}
        offset = 0
        for i, (name, shape) in enumerate(group.items()):
            n = math.prod(shape)
            if offset + n > flat.numel():
                raise ReshardError(f"{folder}: parameter {name} lies beyond its group's partitions")
            out.weights[name] = flat.narrow(0, offset, n).view(tuple(shape)).clone()
            for m in MOMENTS:
                out.moments.setdefault(m, {})[name] = moments[m].narrow(0, offset, n).view(
                    tuple(shape)).clone()
            offset += n + (paddings[g][i] if paddings is not None else 0)
    for name, value in model["module"].items():  # frozen weights: whole in the model states
        if name not in out.weights and name not in out.buffers:
            out.weights[name] = value.float().clone() if value.is_floating_point() else value.clone()


def _gather(pieces: list[torch.Tensor], offset: int, part: int, shape) -> torch.Tensor:
    """A ZeRO-3 parameter from its slice at ``offset`` in every rank's flat buffer, padding cut."""
    n = math.prod(shape)
    return torch.cat([p.narrow(0, offset, part) for p in pieces])[:n].view(tuple(shape)).clone()


def _zero3(out: FullState, folder: Path, optim: list, states: list, models: list) -> None:
    world = out.world
    flats = [torch.cat([g.float() for g in o["fp32_flat_groups"]]) for o in optim]
    moments = {m: [torch.cat([_moment(s, m, g) for s, g in zip(rank, o["fp32_flat_groups"])])
                   for rank, o in zip(states, optim)] for m in MOMENTS}
    order = {k: v for group in models[0]["param_shapes"] for k, v in group.items()}
    offset = 0
    for name, shape in order.items():
        part = math.ceil(math.prod(shape) / world)
        out.weights[name] = _gather(flats, offset, part, shape)
        for m in MOMENTS:
            out.moments.setdefault(m, {})[name] = _gather(moments[m], offset, part, shape)
        offset += part
    if offset != flats[0].numel():
        raise ReshardError(f"{folder}: the parameters take {offset} values of each rank's partition, which "
                           f"holds {flats[0].numel()}")
    frozen = models[0].get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        n = math.prod(shape)
        out.weights[name] = torch.cat([m["frozen_param_fragments"][name].float() for m in models])[:n].view(
            tuple(shape)).clone()


def _slice(value: torch.Tensor, part: int, rank: int) -> torch.Tensor:
    """This rank's slice of ``value`` cut ZeRO-3's way: ``part`` values each, the last one padded."""
    flat = value.reshape(-1)
    flat = torch.nn.functional.pad(flat, (0, max(part * (rank + 1) - flat.numel(), 0)))
    return flat.narrow(0, part * rank, part)


def _create_optimizer_state(engine, full: FullState) -> None:
    """The base optimizer's state for every flat partition of this rank: the step, moments of zero
    (filled per parameter afterwards). A freshly built engine has none until its first step."""
    base = engine.optimizer.optimizer
    step = torch.as_tensor(full.step if full.step is not None else 0.0, dtype=torch.float32)
    zero3 = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if zero3 is not None:  # ZeRO-3 hands its flat partitions to the base optimizer only during a step
        for flat in zero3:
            base.state[flat] = {"step": step.clone().to(flat.device),
                                **{key: torch.zeros_like(flat, dtype=torch.float32) for key in MOMENTS}}
        return
    flats = [p for group in base.param_groups for p in group["params"]]
    sd = base.state_dict()
    sd["state"] = {i: {"step": step.clone(), **{k: torch.zeros_like(p, dtype=torch.float32) for k in MOMENTS}}
                   for i, p in enumerate(flats)}
    base.load_state_dict(sd)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2: point each parameter's fragment at the new state
        engine.optimizer._hp_optimizer_states_linked = False
        link()
    else:
        raise ReshardError("this DeepSpeed's ZeRO optimizer does not link parameter fragments to its state "
                           "as 0.19 does; resume on the world size the checkpoint was written with")


@torch.no_grad()
def apply(engine, full: FullState, rank: int, world: int) -> None:
    """Set ``engine`` (built on ``world`` ranks at any ZeRO stage 1-3) to ``full``: every rank calls it."""
    module = engine.module
    _create_optimizer_state(engine, full)
    named = dict(module.named_parameters())
    missing = [n for n in named if n not in full.weights]
    if missing:
        raise ReshardError(f"the checkpoint holds no weight for {', '.join(missing[:3])}"
                           f"{', ...' if len(missing) > 3 else ''}")
    for name, p in named.items():
        value = full.weights[name]
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's slice of the weight, then of master and moments
            part = p.ds_tensor.numel()
            p.ds_tensor.data.copy_(_slice(value, part, rank).to(p.ds_tensor.dtype))
            if p.requires_grad:
                safe_set_local_fp32_param(p, _slice(value, part, rank))
                for key in MOMENTS:
                    safe_set_local_optimizer_state(p, _slice(full.moments[key][name], part, rank), key)
        else:
            p.data.copy_(value.view_as(p).to(p.dtype))
            if p.requires_grad:
                safe_set_full_fp32_param(p, value.view_as(p))
                for key in MOMENTS:
                    safe_set_full_optimizer_state(p, full.moments[key][name].view_as(p), key)
    for name, b in module.named_buffers():
        if name in full.buffers:
            b.copy_(full.buffers[name].to(b.dtype))
    base = engine.optimizer.optimizer
    if full.scheduler is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(full.scheduler)
        for group, lr in zip(base.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    for name, value in full.counters.items():
        setattr(engine, name, value)
