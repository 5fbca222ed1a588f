"""Process-group set-up for one process, the ``deepspeed`` launcher and ``torchrun``.

- ``transrec train`` alone: no launcher variables are set, so this fills ``MASTER_ADDR``,
  ``MASTER_PORT`` (a free port), ``RANK=0``, ``LOCAL_RANK=0``, ``WORLD_SIZE=1`` (otherwise DeepSpeed
  goes looking for MPI).
- ``deepspeed --num_gpus N --no_local_rank --module transrec.cli train ...`` and ``torchrun
  --nproc_per_node N -m transrec.cli train ...``: the launcher sets them; ``LOCAL_RANK`` is read from
  the environment (``--no_local_rank`` keeps DeepSpeed's launcher from putting ``--local_rank`` in
  front of the subcommand, which the top-level parser would refuse).
- Backend: NCCL with CUDA, gloo on the CPU (``deepspeed.backend`` overrides).

On the CPU DeepSpeed would JIT-compile its shared-memory collective op (``deepspeed_shm_comm``, slow
on a fresh cache and racy when two ranks compile at once). Training uses torch.distributed's gloo
collectives and never that op (it serves DeepSpeed inference's all-reduce), so it is switched off
unless ``TRANSREC_DS_SHM=1``.

A peer that dies (``kill -9``, a crash, a lost node) closes its connections; the next collective on
every other rank fails with the backend's error, which :func:`lost_peer` recognises and names.
"""

from __future__ import annotations

import os
import re
import socket

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_backend(choice: str = "auto") -> str:
    if choice != "auto":
        return choice
    return "nccl" if torch.cuda.is_available() else "gloo"


def _disable_shm_op() -> None:
    if os.environ.get("TRANSREC_DS_SHM") == "1" or torch.cuda.is_available():
        return
    # The probe that fills this dict runs compiler subprocesses; the engine needs one entry only.
    ops = deepspeed.ops.__dict__.get("__compatible_ops__")
    if ops is None:
        deepspeed.ops.__dict__["__compatible_ops__"] = {"deepspeed_shm_comm": False}
    else:
        ops["deepspeed_shm_comm"] = False


def init(backend: str = "auto") -> tuple[int, int, int]:
    """Initialise the process group once; returns ``(rank, local_rank, world_size)``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    _disable_shm_op()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=default_backend(backend), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank() -> int:
    """This process's rank: the process group's, or the launcher's before it is set up."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def any_rank(flag: bool, on=None, world: int | None = None) -> bool:
    """True on every rank when ``flag`` is True on any rank: one all-reduce (MAX) of a scalar on
    device ``on`` (default: this process's) over ``world`` ranks (default: the process group's); no
    collective with one rank."""
    world = world_size() if world is None else world
    if world <= 1:
        return bool(flag)
    t = torch.tensor(1.0 if flag else 0.0, device=on if on is not None else device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def average_buffers(module: torch.nn.Module, world: int, skip=()) -> None:
    """Average ``module``'s floating-point buffers (BatchNorm running statistics) over ``world``
    ranks in one flat all-reduce, leaving out the buffers in ``skip`` (already equal on every rank).

    Each rank updates running statistics from its own micro-batches; DeepSpeed saves rank 0's and
    leaves the others to drift, so evaluation (items dealt out to ranks) and export would disagree.
    Done at every optimizer step, so a resumed run and an uninterrupted one stay identical."""
    if world == 1:
        return
    own = {id(b) for b in skip}
    bufs = [b for b in module.buffers() if b.is_floating_point() and id(b) not in own]
    if not bufs:
        return
    flat = _flatten_dense_tensors([b.data.float() for b in bufs])
    dist.all_reduce(flat)
    flat /= world
    for b, v in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
        b.data.copy_(v.to(b.dtype))


# What gloo and NCCL say when the other end of a collective is gone (its process died, its node was
# lost): the connection closed or reset, a broken pipe, or the backend's own "remote" wording.
_PEER_GONE = re.compile(r"connection closed by peer|connection reset by peer|broken pipe|socket closed|"
                        r"remote process exited|network error|ncclRemoteError|communicator was aborted",
                        re.IGNORECASE)
_PEER_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)")


def lost_peer(exc: BaseException, rank_: int | None = None, world: int | None = None) -> str | None:
    """Who is gone when ``exc`` (or an exception it was raised from) is a collective failing because
    a peer's connection closed: ``rank K`` with two ranks (the other one), else ``a peer rank``
    with the address the backend names; None for any other exception."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RuntimeError) and _PEER_GONE.search(str(e)):
            break
        e = e.__cause__ or e.__context__
    else:
        return None
    if e is None:
        return None
    world = world_size() if world is None else world
    me = rank() if rank_ is None else rank_
    if world == 2:
        return f"rank {1 - me}"
    where = _PEER_ADDRESS.search(str(e))
    return "a peer rank" + (f" (at {where.group(1)}:{where.group(2)})" if where else "")


def is_main() -> bool:
    return rank() == 0
