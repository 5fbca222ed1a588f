"""Where a training step's time goes: nested, synchronised timers with exclusive time per part.

The trainer opens sections around the parts of a step (``data`` for the wait on the loader, ``other``
around the whole optimizer step, inside it ``forward``, ``backward`` and ``optimizer``); by default
its clock is :data:`NO_CLOCK`, which does nothing. :class:`StepClock` records each section's
*exclusive* time (a child's time is not its parent's), so the parts add up to the time spent inside
the sections, with nothing counted twice. :meth:`StepClock.attach` splits the forward further with
module hooks: the item encoders (``item_encoding``), the user encoder (``user_encoder``) and the
criterion (``loss``); what the forward does outside them (gathering the item table, the batch's
copy to the device) stays ``forward``. :meth:`StepClock.communication` times every collective of
``torch.distributed`` and ``deepspeed.comm`` as ``communication``, wherever it happens (gradient
reduction in the backward, ZeRO-3's gathers in the forward, the trainer's own all-reduces).

On a GPU every boundary synchronises the device first, so a part's time is the work it launched,
not the launch alone. That also serialises what would otherwise overlap (communication with the
backward), so a timed step is slower than a plain one: a benchmark measures throughput on plain
steps and the breakdown on separate steps (see :mod:`~transrec.engine.bench`).

Recomputation under gradient checkpointing runs module forwards inside the backward; those count
as ``backward`` (the hooks split only a forward section).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import deepspeed.comm as ds_comm
import torch

# the parts of a step, in the order reports list them
PARTS = ("data", "item_encoding", "user_encoder", "loss", "forward", "backward", "optimizer",
         "communication", "other")

# module attribute of a model -> the part its forward counts as
MODULE_PARTS = {"text_encoder": "item_encoding", "image_encoder": "item_encoding",
                "item_emb": "item_encoding",
                "item_residual": "item_encoding", "modality": "item_encoding", "user": "user_encoder",
                "criterion": "loss"}

# collectives timed as communication (the ones that exist in the installed versions are wrapped)
TORCH_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                     "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all_single", "barrier")
DEEPSPEED_COLLECTIVES = (*TORCH_COLLECTIVES, "allgather_fn", "reduce_scatter_fn", "all_reduce_coalesced")

_NULL = contextlib.nullcontext()


class NoClock:
    """The trainer's clock when nothing measures it: every section is a no-op."""

    def __call__(self, name: str) -> contextlib.AbstractContextManager:
        return _NULL


NO_CLOCK = NoClock()


class StepClock:
    """Exclusive seconds per part (:attr:`totals`), synchronising ``device`` at every boundary when
    it is a GPU (``sync``)."""

    def __init__(self, device: torch.device | str = "cpu", *, sync: bool = True):
        self.device = torch.device(device)
        self.sync = bool(sync) and self.device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [name, time the section last resumed]

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def enter(self, name: str) -> None:
        now = self._now()
        if self._stack:
            top = self._stack[-1]
            self.totals[top[0]] += now - top[1]
        self._stack.append([name, now])

    def exit(self, name: str) -> None:
        now = self._now()
        top = self._stack.pop()
        if top[0] != name:
            raise RuntimeError(f"step clock: section {name!r} closed while {top[0]!r} was open")
        self.totals[name] += now - top[1]
        if self._stack:
            self._stack[-1][1] = now

    def __call__(self, name: str) -> contextlib.AbstractContextManager:
        return self._section(name)

    @contextlib.contextmanager
    def _section(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.exit(name)

    def reset(self) -> None:
        if self._stack:
            raise RuntimeError(f"step clock: reset with {self._stack[-1][0]!r} open")
        self.totals = defaultdict(float)

    def in_forward(self) -> bool:
        return any(name == "forward" for name, _ in self._stack)

    # -- splitting the forward --------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> list:
        """Forward hooks on ``model``'s item encoders, user encoder and criterion (those it has);
        returns the handles (``handle.remove()`` detaches them)."""
        handles = []
        for attr, part in MODULE_PARTS.items():
            module = getattr(model, attr, None)
            if not isinstance(module, torch.nn.Module):
                continue
            opened: list[bool] = []

            def pre(_m, _args, part=part, opened=opened):
                ok = self.in_forward()
                opened.append(ok)
                if ok:
                    self.enter(part)

            def post(_m, _args, _out, part=part, opened=opened):
                if opened and opened.pop():
                    self.exit(part)

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        return handles

    # -- communication ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def communication(self) -> Iterator[None]:
        """Time every collective called while inside as ``communication`` (restored on exit)."""
        patched = []

        def wrap(owner, name):
            fn = getattr(owner, name, None)
            if fn is None:
                return

            def timed(*args, **kwargs):
                with self("communication"):
                    return fn(*args, **kwargs)

            setattr(owner, name, timed)
            patched.append((owner, name, fn))

        for name in TORCH_COLLECTIVES:
            wrap(torch.distributed, name)
        for name in DEEPSPEED_COLLECTIVES:
            wrap(ds_comm, name)
        try:
            yield
        finally:
            for owner, name, fn in reversed(patched):
                setattr(owner, name, fn)
