"""Checkpoints that are either whole or ignored, and resume that continues exactly.

Layout of ``RUN/checkpoints/``::

    step-00000100/            a complete checkpoint (DeepSpeed's files + ours)
        manifest.json         written last, before the rename: what wrote it, file sizes
        rng-rank00000.pt      each rank's torch / numpy / python RNG state (tensors and numbers)
        ...DeepSpeed files    model states, ZeRO partitions of the optimizer (all ranks)
    .tmp-step-00000200/       a save in progress (or killed): never read
    latest                    the tag of the newest complete checkpoint (replaced atomically)
    best                      the tag of the checkpoint with the best monitored validation metric
                              (``run.monitor``; replaced atomically, kept by pruning)

A save: every rank writes into ``.tmp-<tag>``, a barrier, then rank 0 writes the manifest, renames
the folder to ``<tag>``, replaces ``latest`` (and ``best`` when the save is the new best) and prunes
beyond ``keep_last``, keeping the best. A save killed at any
point leaves the previous checkpoint as the latest. (Several nodes need the run folder on a shared
file system, as DeepSpeed's own checkpoints do.)

Nothing is unpickled: every ``*.pt`` of a checkpoint is first scanned (the pickle is disassembled,
not run) and refused with one line if it names any Python callable or class beyond torch's tensor
types and the few plain DeepSpeed types its states hold (:data:`DEEPSPEED_SAFE`); the load itself
then runs with ``weights_only=True`` forced on every ``torch.load``, DeepSpeed's own included
(:func:`weights_only_loads`).

A checkpoint resumes on any number of ranks. On the world size that wrote it DeepSpeed loads its
own files; on another one the states partitioned over the writing ranks (ZeRO 1-3) are consolidated
and partitioned anew for the resuming ranks (:mod:`~transrec.engine.reshard`), and each rank that
has no RNG state of its own in the checkpoint seeds its generators from (seed, step, rank). A
change of ZeRO stage is refused with the supported path: export consolidated weights (``transrec
export``) and start a new run from them (``run.init_from=EXPORT``).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

from transrec.config import from_dict, load_yaml, to_dict
from transrec.config.model import user_kind
from transrec.engine import distributed as D
from transrec.engine.reshard import apply, consolidate, partitioned
from transrec.errors import ConfigError, UserError
from transrec.storage import WriteFailed, guarded_write, short_line, space_short

SCHEMA = 1
MANIFEST = "manifest.json"
LATEST = "latest"
BEST = "best"
TMP_PREFIX = ".tmp-"


class CheckpointError(UserError):
    """A checkpoint that cannot be used for what was asked (named, with the way forward)."""


# Plain-data types DeepSpeed's ZeRO optimizer states pickle (loss scaler settings, the stage enum,
# fragment addresses): attribute holders without code of their own on load.
DEEPSPEED_SAFE = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def check_no_pickle(folder: str | Path) -> None:
    """CheckpointError naming the first ``*.pt`` under ``folder`` whose pickle names a callable or
    class outside torch's weights-only set and :data:`DEEPSPEED_SAFE` (a static scan: nothing runs)."""
    with safe_globals(DEEPSPEED_SAFE):
        for f in sorted(Path(folder).rglob("*.pt")):
            try:
                unsafe = get_unsafe_globals_in_checkpoint(f)
            except (ValueError, RuntimeError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
                raise CheckpointError(f"{f}: not a readable torch checkpoint file ({exc})") from None
            if unsafe:
                raise CheckpointError(
                    f"{f}: refused to load: it would run Python code ({', '.join(sorted(unsafe)[:3])}); "
                    "a checkpoint holds tensors and DeepSpeed's plain states only (crafted or foreign?)")


@contextmanager
def weights_only_loads(what: str | Path) -> Iterator[None]:
    """Every ``torch.load`` inside runs with ``weights_only=True``, DeepSpeed's explicit
    ``weights_only=False`` included (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), with
    :data:`DEEPSPEED_SAFE` allowed; a refused object is one CheckpointError naming ``what``."""
    old = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with safe_globals(DEEPSPEED_SAFE):
            yield
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what}: refused to load a checkpoint file: {first}") from None
    finally:
        if old is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = old


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """This process's RNG states as tensors and numbers only (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_state[0]),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": py_state[2],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(int(x) for x in state["python_state"].tolist()),
                     state["python_gauss"]))


def seed_rank(seed: int, step: int, rank: int) -> None:
    """Seed torch, numpy and Python for a rank the checkpoint holds no RNG state of (a resume on more
    ranks than wrote it): a function of (seed, step, rank), so the same resume draws the same."""
    seq = np.random.SeedSequence([int(seed), int(step), int(rank)])
    mixed = int(seq.generate_state(1, dtype=np.uint64)[0])
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed % 2**63)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        tmp.write_text(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- manager

@dataclass
class ClientState:
    """What the engine needs besides DeepSpeed's states to continue exactly."""

    step: int  # optimizer steps done
    epoch: int  # epoch of the next batch
    cursor: int  # global sample cursor within that epoch (loader start_cursor)
    seed: int
    samples: int = 0  # sequences trained on in total (all ranks)
    best_step: int = -1  # step of the best monitored validation value so far (-1: none yet)
    best_value: float | None = None  # that value
    bad_evals: int = 0  # validation evaluations since the last improvement (early stopping)
    eval_pending: bool = False  # the validation due at this step was abandoned by a stop: redo it
    # {"world", "batch", "workers", "global"}: the ranks that wrote the checkpoint, their micro-batch
    # per rank, loader workers and global batch (None: a checkpoint from before it was recorded)
    writer: dict | None = None
    # {"epoch", "world", "batch", "workers"}: epoch ``epoch`` was begun in this other layout and is
    # being finished in it (``cursor`` counts its rows); None: every epoch is the writer's own
    layout: dict | None = None


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = max(int(keep_last), 1)

    # -- discovery ------------------------------------------------------------------------
    def complete(self) -> list[str]:
        """Tags of complete checkpoints (manifest present and readable), oldest first."""
        if not self.dir.is_dir():
            return []
        tags = []
        for p in sorted(self.dir.iterdir()):
            if p.is_dir() and not p.name.startswith(TMP_PREFIX) and (p / MANIFEST).is_file():
                try:
                    json.loads((p / MANIFEST).read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                tags.append(p.name)
        return tags

    def _pointed(self, name: str) -> str | None:
        """The tag a pointer file (``latest``, ``best``) names, when that checkpoint verifies."""
        pointer = self.dir / name
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if tag and self._verify(tag, raise_error=False):
                return tag
        return None

    def latest(self) -> str | None:
        """The newest complete checkpoint: ``latest`` when it names one that verifies, else the scan."""
        tag = self._pointed(LATEST)
        if tag is not None:
            return tag
        for tag in reversed(self.complete()):
            if self._verify(tag, raise_error=False):
                return tag
        return None

    def best(self) -> str | None:
        """The checkpoint the ``best`` pointer names, when it is complete; else None."""
        return self._pointed(BEST)

    def resolve(self, which: str | int | None = None) -> str:
        """A checkpoint tag from ``last``, ``best`` or a step number; None: the best when there is
        one, else the last. CheckpointError naming the checkpoints there are."""
        which = None if which is None else str(which).strip()
        if which in (None, "", "best"):
            tag = self.best()
            if tag is not None or which == "best":
                if tag is None:
                    raise CheckpointError(f"{self.dir.parent}: no best checkpoint (the run has no "
                                          "run.monitor evaluation yet); use --step last")
                return tag
        if which in (None, "", "last", "best"):
            tag = self.latest()
        elif which.isdigit():
            tag = tag_for(int(which))
            if tag not in self.complete():
                tag = None
        else:
            raise CheckpointError(f"--step must be last, best or a step number, got {which!r}")
        if tag is None:
            have = ", ".join(str(int(t.removeprefix("step-"))) for t in self.complete()) or "none"
            raise CheckpointError(f"{self.dir.parent}: no complete checkpoint for step {which or 'last'} "
                                  f"(steps with a checkpoint: {have})")
        return tag

    def mark_best(self, tag: str) -> None:
        """Rank 0: point ``best`` at ``tag`` (atomically)."""
        _write_atomic(self.dir / BEST, tag)

    def manifest(self, tag: str) -> dict:
        return json.loads((self.dir / tag / MANIFEST).read_text())

    def _verify(self, tag: str, raise_error: bool = True) -> bool:
        folder = self.dir / tag
        try:
            man = json.loads((folder / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            if raise_error:
                raise CheckpointError(f"checkpoint {folder} has no readable {MANIFEST}: "
                                      "it is incomplete (a killed save?)") from None
            return False
        if man.get("schema") != SCHEMA:
            if raise_error:
                raise CheckpointError(f"{folder / MANIFEST}: schema {man.get('schema')} is not {SCHEMA}")
            return False
        for name, size in man.get("files", {}).items():
            f = folder / name
            if not f.is_file() or f.stat().st_size != size:
                if raise_error:
                    raise CheckpointError(f"checkpoint {folder}: {name} is missing or has the wrong size "
                                          "(the checkpoint is damaged)")
                return False
        return True

    # -- save -----------------------------------------------------------------------------
    def size(self, tag: str | None) -> int | None:
        """Bytes of checkpoint ``tag`` from its manifest (None: no such checkpoint)."""
        if tag is None:
            return None
        try:
            return int(sum(self.manifest(tag).get("files", {}).values())) or None
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            return None

    def save(self, engine, client: ClientState, *, world_size: int, zero_stage: int, precision: str,
             extra: dict | None = None, best: bool = False, _fail_after_write: bool = False) -> str:
        """Collective: every rank calls it. Returns the tag written; ``best``: it becomes the best.

        Before writing, every rank checks that its file system has room for a checkpoint as large as
        the last one; when any has not, every rank stops with :class:`~transrec.storage.WriteFailed`
        (one line) before anything is written. A write that fails all the same (the disk filled
        meanwhile, a quota, an I/O error) removes the temporary folder and raises the same error on
        the rank that saw it; ``latest``, ``best`` and every complete checkpoint stay as they were.
        (With several ranks, the launcher then stops the others, as for any rank that exits.)"""
        rank = D.rank()
        tag = tag_for(client.step)
        tmp_tag = TMP_PREFIX + tag
        tmp = self.dir / tmp_tag
        needed = self.size(self.latest())
        what = f"saving checkpoint {tag}"
        mine = space_short(self.dir, needed)
        if D.any_rank(mine):
            raise WriteFailed(short_line(what, self.dir, needed, elsewhere=not mine))
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        D.barrier()
        with guarded_write(what, self.dir, tmp, needed=needed):
            engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state={"transrec": vars(client)},
                                   save_latest=False)
            torch.save(rng_state(), tmp / f"rng-rank{rank:05d}.pt")
        D.barrier()
        if _fail_after_write:  # test hook: the process dies between writing and committing
            raise KeyboardInterrupt("save interrupted")
        if rank == 0:
            with guarded_write(what, self.dir, tmp, needed=needed):
                files = {p.relative_to(tmp).as_posix(): p.stat().st_size
                         for p in tmp.rglob("*") if p.is_file()}
                man = {
                    "schema": SCHEMA, "tag": tag, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "world_size": world_size, "zero_stage": zero_stage, "precision": precision,
                    "client": vars(client), "files": files, **(extra or {}),
                }
                _write_atomic(tmp / MANIFEST, json.dumps(man, indent=1))
            final = self.dir / tag
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _write_atomic(self.dir / LATEST, tag)
            if best:
                self.mark_best(tag)
            self._prune(keep=tag)
        D.barrier()
        return tag

    def _prune(self, keep: str) -> None:
        """Keep ``keep``, the ``keep_last - 1`` newest others and the best; remove the rest."""
        best = self.best()
        tags = [t for t in self.complete() if t != keep]
        for t in tags[: max(len(tags) - (self.keep_last - 1), 0)]:
            if t != best:
                shutil.rmtree(self.dir / t, ignore_errors=True)
        for p in self.dir.iterdir():  # stale temporaries of killed saves
            if p.is_dir() and p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)

    # -- load -----------------------------------------------------------------------------
    def check_compatible(self, tag: str, *, world_size: int, zero_stage: int, run_dir: str | Path) -> dict:
        """The manifest of ``tag`` when this run can resume from it: any world size, the same ZeRO
        stage (CheckpointError naming both stages and the supported path otherwise)."""
        self._verify(tag)
        man = self.manifest(tag)
        if man["zero_stage"] != zero_stage:
            raise CheckpointError(
                f"checkpoint {self.dir / tag} was written at ZeRO stage {man['zero_stage']}, this run has "
                f"ZeRO stage {zero_stage}; resuming needs the same stage (on any number of ranks). Supported "
                f"path: `transrec export --run {run_dir} --out EXPORT`, then start a new run with "
                f"run.init_from=EXPORT")
        return man

    def load(self, engine, tag: str, *, world_size: int, zero_stage: int, run_dir: str | Path) -> ClientState:
        """Collective: restores DeepSpeed states (model, optimizer, scheduler) and this rank's RNG; on
        another world size than the checkpoint's, re-partitioned (:mod:`~transrec.engine.reshard`)."""
        man = self.check_compatible(tag, world_size=world_size, zero_stage=zero_stage, run_dir=run_dir)
        folder = self.dir / tag
        check_no_pickle(folder)
        rank = D.rank()
        with weights_only_loads(folder):
            if man["world_size"] != world_size and partitioned(folder):
                apply(engine, consolidate(folder, int(man["world_size"])), rank, world_size)
            else:
                path, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
                if path is None:
                    raise CheckpointError(f"DeepSpeed could not load checkpoint {folder}")
            rng = folder / f"rng-rank{rank:05d}.pt"
            if rng.is_file():
                set_rng_state(torch.load(rng, weights_only=True))
            else:
                seed_rank(man["client"]["seed"], man["client"]["step"], rank)
        return ClientState(**man["client"])


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def check_same_model(run_dir: Path, cfg) -> None:
    """A resumed run must build the model its checkpoint holds: ConfigError naming the ``model.*``
    keys that differ from the run folder's config.yaml (other sections may change on resume)."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return
    old_cfg = from_dict(load_yaml(saved))
    old = {**_flat(to_dict(old_cfg)["model"], "model"), "model.user.kind": user_kind(old_cfg.model)}
    new = {**_flat(to_dict(cfg)["model"], "model"), "model.user.kind": user_kind(cfg.model)}
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"{run_dir} holds a checkpoint of another model ({shown}"
                          f"{', ...' if len(diff) > 4 else ''}); resume with the run's own model "
                          "settings, or start a new --out (run.init_from=EXPORT starts from its weights)")
