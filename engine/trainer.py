"""The training loop on DeepSpeed: config -> data, model, optimizer -> engine -> steps, evaluations,
checkpoints.

One optimizer step consumes ``data.batch_size`` sequences: ``micro x accumulation x world``. Each
micro-batch goes forward through the model (one encoder pass per modality over its unique items,
in-batch softmax over them), ``engine.backward`` scales by the accumulation and reduces across
ranks (ZeRO 0-3), ``engine.step`` clips (``optim.grad_clip``), steps AdamW and the warmup+cosine
schedule at the accumulation boundary.

What a resumed run needs to continue exactly lives in the checkpoint: DeepSpeed's states (weights,
optimizer moments, schedule) plus ours (:class:`~transrec.engine.checkpoint.ClientState`: step,
epoch, the global sample cursor of the loader, the seed) and every rank's RNG. The loader's order is
a pure function of (seed, epoch, cursor), so the resumed run sees the same batches.

The trainer composes its parts: the run folder's lock (:mod:`~transrec.engine.runlock`), the skipped
input per loader and ``data.json`` (:mod:`~transrec.engine.skips`), the finite-step guard
(:mod:`~transrec.engine.guard`), checkpoints (:mod:`~transrec.engine.checkpoint`), the best step and
early stopping (:mod:`~transrec.engine.best`: every validation, every ``eval.every`` steps and at the
last step, is judged against ``run.monitor``) and the evaluation report with ``eval.json``
(:mod:`~transrec.engine.report`: valid and test at the last step and at the best one).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from transrec.config import (
    Config,
    batch_layout,
    from_dict,
    load_yaml,
    save_yaml,
    to_deepspeed,
    to_dict,
    validate,
)
from transrec.config.model import user_kind
from transrec.engine import distributed as D
from transrec.engine.best import BestWatch
from transrec.engine.checkpoint import CheckpointManager, ClientState, tag_for
from transrec.engine.data import epoch_facts, epoch_line, make_loader, open_data
from transrec.engine.deepspeed_patches import single_process_fast_path
from transrec.engine.guard import Diverged, FiniteGuard
from transrec.engine.optim import make_optimizer, make_scheduler
from transrec.engine.preempt import EvaluationAbandoned, RunStopped, StopControl, stopped_line
from transrec.engine.ranking import encode_catalogue, split_metrics
from transrec.engine.report import EvalReport
from transrec.engine.runlock import lock_run_folder
from transrec.engine.skips import SkipReport
from transrec.engine.tracking import Tracker, bars_enabled, progress, say, step_line
from transrec.errors import ConfigError, UserError
from transrec.models import build_model
from transrec.models.negatives import step_buffers
from transrec.models.prefix import maybe_wrap
from transrec.shards.batch import Batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step: mean over every target
    metrics: dict = field(default_factory=dict)  # final evaluation per split
    seconds: float = 0.0
    sequences: int = 0

    def __repr__(self) -> str:  # short: the per-step losses stay in .losses
        test = self.metrics.get("test", {})
        return (f"TrainResult(run={str(self.run_dir)!r}, step={self.step}, "
                f"loss={self.losses[-1] if self.losses else float('nan'):.4f}, "
                f"test_ndcg@10={test.get('ndcg@10', float('nan')):.4f}, seconds={self.seconds:.1f})")


def _bn_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    """BatchNorm running statistics of modules in training mode."""
    return [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
            for b in m.buffers(recurse=False)]


def _running_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers a training step updates: BatchNorm running statistics and the loss's negative
    memory (a skipped step puts them back; the other buffers are constants)."""
    return _bn_stats(module) + step_buffers(module)


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def _check_run_dir(run_dir: Path) -> None:
    """One line instead of a traceback later: the run folder must be (or become) a writable folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder; pass a folder to --out")
    probe = run_dir if run_dir.exists() else next((p for p in run_dir.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{run_dir}: cannot write there ({probe} is not writable)")


class Trainer:
    """Owns one DeepSpeed engine. ``Trainer(cfg).fit()`` is ``transrec train``.

    The loop (:meth:`fit`) reads as its recipe: :meth:`micro_batches` hands out batches and owns
    the epoch and cursor, :meth:`train_step` runs one optimizer step over ``accum`` of them, then
    :meth:`log`, :meth:`maybe_eval` and :meth:`maybe_save`; after it, :meth:`final_evaluation`.
    Parts: ``skips`` (:class:`~transrec.engine.skips.SkipReport`), ``guard``
    (:class:`~transrec.engine.guard.FiniteGuard`), ``ckpt``, ``best``
    (:class:`~transrec.engine.best.BestWatch`) and ``report``
    (:class:`~transrec.engine.report.EvalReport`).

    Hooks for tests and tools: ``after_step(trainer, step)`` callbacks run after every optimizer
    step (``step`` counts completed steps; benchmarks time steady-state steps with it).
    """

    def __init__(self, cfg: Config, *, data=None, show: bool | None = None):
        """``show``: tqdm bars (True) or plain lines on stderr (False); None follows ``run.progress``."""
        self.cfg = cfg
        self.rank, self.local_rank, self.world = D.init(cfg.deepspeed.backend)
        validate(cfg, self.world)
        self.micro, self.accum = batch_layout(cfg, self.world)
        self.show = (bars_enabled(cfg.run.progress) if show is None else show) and self.rank == 0
        self.lines = self.rank == 0 and not self.show  # plain log lines instead of bars
        self.device = D.device()
        if not cfg.run.out:
            raise ConfigError("no run folder: pass --out RUN (or run.out=RUN)")
        self.run_dir = Path(cfg.run.out)
        _check_run_dir(self.run_dir)
        self.lock = lock_run_folder(self.run_dir, rank=self.rank, world=self.world, device=self.device,
                                    log=say)
        try:
            self._set_up(cfg, data)
        except BaseException:
            self.lock.release()
            raise

    def _set_up(self, cfg: Config, data) -> None:
        seed_everything(cfg.run.seed)
        self.ds, self.content = data if data is not None else open_data(cfg, show=self.show)
        self.skips = SkipReport(self.ds, self.content, max_rate=cfg.data.max_skip_rate,
                                path=self.run_dir / "data.json" if self.rank == 0 else None)
        self.check_data()
        self._warn_batch_size()
        self.model = self._build_model()
        # The frozen-prefix cache is built from the whole fp32 weights, before any cast or
        # partitioning; training and evaluation then gather items through the same wrapper.
        self.content = maybe_wrap(self.content, self.model, cfg.data, progress=self.show,
                                  log=say if self.rank == 0 else (lambda _msg: None))
        self.model.set_catalogue_content(self.content)  # negatives=catalogue, exact (catalogue_refresh 0)
        if cfg.deepspeed.precision == "bf16":
            # DeepSpeed casts parameters to bf16 but leaves buffers (BatchNorm running statistics,
            # pixel mean/std) in fp32, which mixed-dtype kernels refuse: cast the whole module first.
            # The optimizer still keeps fp32 master weights (DeepSpeed's bf16 optimizer).
            self.model.to(torch.bfloat16)
        self.ds_config = to_deepspeed(cfg, self.world)
        # ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizers flatten the weights themselves; without them
        # the AdamW gets one flat tensor per group from FlatAdamW (see engine.optim).
        flat = self.zero_stage == 0 and not any(self.ds_config.get(k, {}).get("enabled")
                                                for k in ("bf16", "fp16"))
        self.optimizer = make_optimizer(self.model, cfg.optim, flat=flat)
        self.scheduler = make_scheduler(self.optimizer, cfg.optim)
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer,
                                                    lr_scheduler=self.scheduler, config=self.ds_config)
        if flat and self.world == 1:
            single_process_fast_path(self.engine)
        self.guard = FiniteGuard(self.engine, world=self.world, device=self.device)
        self.bad_in_row = 0  # skipped steps since the last applied one
        self.skipped = 0  # skipped steps in this process's life
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.run.keep_last)
        self.state = ClientState(step=0, epoch=0, cursor=0, seed=cfg.run.seed)
        self.best = BestWatch(cfg)
        self.saved_step = -1  # step of the checkpoint this process wrote last
        self.after_step: list = []
        self.items_encoded = 0  # unique items through the encoders (throughput accounting)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (loss sum, count) of unlogged steps
        self.window = {"seq": 0, "items": 0, "t": time.time()}  # throughput since the last log line
        self.tracker = Tracker(self.run_dir, enabled=self.rank == 0, tensorboard=cfg.run.tensorboard)
        self.report = EvalReport(self.run_dir, self.tracker, rank=self.rank,
                                 protocol={"exclude_history": cfg.eval.exclude_history})
        self.stopper = StopControl(cfg.run.stop_signals, cfg.run.ckpt_every_minutes, device=self.device,
                                   world=self.world)

    # -- bad input ------------------------------------------------------------------------
    def check_data(self) -> None:
        """The item cache's skipped items: one line on the console, ``data.json`` in the run folder,
        and a DataError (exit 2) above ``data.max_skip_rate``."""
        self.skips.write()
        line = self.skips.items_line()
        if line and self.rank == 0:
            say(line)
        self.skips.check()

    # -- set-up ---------------------------------------------------------------------------
    def _warn_batch_size(self) -> None:
        """One line when a step asks for more sequences than the training split holds."""
        if self.rank != 0:
            return
        n_train = sum(int(s.n_train) for s in self.ds.seq_shards)
        what = "training sequences"
        if self.cfg.data.windows != "last":  # several samples a sequence: count them
            n_train = make_loader(self.cfg, self.ds, self.content, "train", batch_size=1, rank=0,
                                  world=1).samples_in_split
            what = f"training samples (data.windows={self.cfg.data.windows})"
        batch = self.cfg.data.batch_size
        if batch > n_train:
            repeat = ("policy repeat repeats rows within a step" if self.cfg.data.policy == "repeat"
                      else f"policy {self.cfg.data.policy} gives no full batch")
            say(f"warning: data.batch_size={batch} exceeds the {n_train} {what} of "
                f"{self.cfg.data.path or self.ds.path}; {repeat}")

    def _build_model(self):
        model = build_model(self.cfg.model, n_items=self.ds.n_items)
        if self.cfg.run.init_from:  # per-item vectors belong to the export's catalogue: on another
            # catalogue (a transfer) they start at zero, on the same one they carry on
            from transrec.models.export import read_export  # noqa: PLC0415
            from transrec.shards.format import unsanitize_key  # noqa: PLC0415

            ids = read_export(self.cfg.run.init_from).get("item_ids")
            same = ids is not None and ids == [unsanitize_key(k) for k in self.ds.item_ids]
            model.load_export(self.cfg.run.init_from, strict=False, catalogue=same)
        if hasattr(model, "set_seen_items"):
            model.set_seen_items(np.asarray(self.ds.train_count) > 0)
        return model

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    def resume(self) -> bool:
        """Continue from the run folder's latest complete checkpoint, if any (and ``run.resume``)."""
        if not self.cfg.run.resume:
            return False
        tag = self.ckpt.latest()
        if tag is None:
            return False
        self._check_same_model()
        self.state = self.ckpt.load(self.engine, tag, world_size=self.world, zero_stage=self.zero_stage,
                                    run_dir=self.run_dir)
        if self.rank == 0:
            say(f"resuming from step {self.state.step} ({self.ckpt.dir / tag})")
        self.tracker.keep_until(self.state.step)
        return True

    def _check_same_model(self) -> None:
        """A resumed run must build the model its checkpoint holds: ConfigError naming the ``model.*``
        keys that differ from the run folder's config.yaml (other sections may change on resume)."""
        saved = self.run_dir / "config.yaml"
        if not saved.is_file():
            return
        old_cfg = from_dict(load_yaml(saved))
        old = {**_flat(to_dict(old_cfg)["model"], "model"), "model.user.kind": user_kind(old_cfg.model)}
        new = {**_flat(to_dict(self.cfg)["model"], "model"), "model.user.kind": user_kind(self.cfg.model)}
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
            raise ConfigError(f"{self.run_dir} holds a checkpoint of another model ({shown}"
                              f"{', ...' if len(diff) > 4 else ''}); resume with the run's own model "
                              "settings, or start a new --out (run.init_from=EXPORT starts from its weights)")

    def save(self, best: bool = False) -> str:
        """Checkpoint the current step (once per step: a second call only moves the ``best`` pointer
        when ``best``)."""
        tag = tag_for(self.state.step)
        if self.saved_step == self.state.step:
            if best and self.rank == 0:
                self.ckpt.mark_best(tag)
            D.barrier()
            return tag
        tag = self.ckpt.save(self.engine, self.state, world_size=self.world, zero_stage=self.zero_stage,
                             precision=self.cfg.deepspeed.precision, best=best,
                             extra={"model_kind": self.cfg.model.kind, "n_items": self.ds.n_items})
        self.saved_step = self.state.step
        self.stopper.saved()
        return tag

    # -- steps ----------------------------------------------------------------------------
    def micro_batches(self) -> Iterator[Batch]:
        """Endless training micro-batches from the run's cursor. It owns the epoch and the cursor:
        ``state.cursor`` is the loader's global sample cursor after the last batch handed out, and an
        exhausted epoch rolls over to the next one (cursor 0) when the next batch is asked for."""
        cfg = self.cfg
        while True:
            loader = self.skips.train.follow(make_loader(cfg, self.ds, self.content, "train",
                                                         batch_size=self.micro, rank=self.rank,
                                                         world=self.world, start_cursor=self.state.cursor))
            loader.set_epoch(self.state.epoch)
            if len(loader) == 0:
                raise UserError(f"{cfg.data.path}: the training split gives no batch of {self.micro} "
                                f"sequences per rank; lower data.batch_size")
            for batch in loader:
                self.state.cursor = int(batch.cursor)
                rows = batch.row_valid
                self.skips.train.rows(self.micro if rows is None else int(rows.sum()))
                yield batch
            self.state.epoch += 1
            self.state.cursor = 0

    def train_step(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One optimizer step over its micro-batches; returns (this rank's loss sum, the global
        target count), both on the device, or None when the step was skipped: its loss or gradient
        norm was not finite on some rank (:mod:`~transrec.engine.guard`). A skipped step leaves
        the weights, the optimizer, the schedule and the buffers as they were and does not count;
        its batches are consumed."""
        count, scale = self.step_scale(micro_batches)
        self.refresh_catalogue()
        stats = _running_stats(self.engine.module)  # the only buffers a step changes
        saved = [b.detach().clone() for b in stats]
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            loss_sum += self.backward(batch, scale)
            if i == len(micro_batches) - 1:
                self.guard.loss_check(loss_sum)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
        if not self.guard.applied():
            for b, v in zip(stats, saved):
                b.data.copy_(v)
            self._skip(loss_sum)
            return None
        self.bad_in_row = 0
        self.sync_buffers()
        self.state.step += 1
        self.state.samples += self.cfg.data.batch_size
        return loss_sum, count

    def refresh_catalogue(self) -> None:
        """Re-encode every item (eval mode, no gradient, sharded over ranks) for a content model's
        catalogue softmax when its table is due (``model.loss.catalogue_refresh``)."""
        net = self.engine.module
        if not net.catalogue_due(self.state.step):
            return
        emb = encode_catalogue(self.engine, self.content, chunk=self.cfg.eval.item_chunk,
                               device=self.device, show=False)  # in eval mode, modes restored after
        net.refresh_catalogue(emb, self.state.step)

    def _skip(self, loss_sum: torch.Tensor) -> None:
        """Count a skipped step; stop the run after ``run.max_bad_steps`` of them in a row."""
        self.bad_in_row += 1
        self.skipped += 1
        limit = self.cfg.run.max_bad_steps
        what = "loss" if self.guard.loss_bad else "gradient norm"
        self.tracker.log("skip", self.state.step + 1, reason=f"non-finite {what}", in_row=self.bad_in_row,
                         loss=float(loss_sum))
        if self.rank == 0:
            say(f"step {self.state.step + 1} skipped: non-finite {what} ({self.bad_in_row} in a row, "
                f"{self.skipped} in all; the run stops at {limit} in a row)")
        if self.bad_in_row >= limit:
            latest = self.ckpt.latest()
            kept = (f"the latest checkpoint is {self.ckpt.dir / latest}" if latest
                    else "no checkpoint was written")
            raise Diverged(f"training diverged: {self.bad_in_row} steps in a row had a non-finite loss or "
                           f"gradient norm after step {self.state.step}; {kept}; lower optim.lr / "
                           f"optim.encoder_lr (or raise run.max_bad_steps)")

    def step_scale(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """(global target count of the step, the factor each micro-batch's loss sum is scaled by).

        The loss of a step is the sum over every target of every micro-batch on every rank divided
        by their global count, counted from the batches before any forward (one all-reduce a step):
        micro-batches and ranks with more targets weigh more, as in one large batch. DeepSpeed
        divides by the accumulation steps and averages gradients over ranks; the factor undoes both.
        """
        net = self.engine.module
        count = torch.tensor(float(sum(net.count_targets(b) for b in micro_batches)), device=self.device)
        if self.world > 1:
            dist.all_reduce(count)
        return count, (self.world * len(micro_batches)) / count.clamp_min(1.0)

    def backward(self, batch: Batch, scale: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro-batch; its (detached) loss sum."""
        loss, metrics = self.engine(batch.to(self.device, non_blocking=True))
        self.engine.backward(loss * metrics["count"] * scale)  # loss * count: this micro-batch's sum
        self.window["seq"] += batch.batch_size
        self.window["items"] += batch.num_unique
        self.items_encoded += batch.num_unique
        return metrics["loss_sum"]

    def sync_buffers(self) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over ranks.

        Each rank updates running statistics from its own micro-batches; DeepSpeed saves rank 0's
        and leaves the others to drift, so evaluation (items dealt out to ranks) and export would
        disagree. Done at every optimizer step, in one flat all-reduce, so a resumed run and an
        uninterrupted one stay identical.
        """
        if self.world == 1:
            return
        own = {id(b) for b in step_buffers(self.engine.module)}  # the same on every rank already
        bufs = [b for b in self.engine.module.buffers() if b.is_floating_point() and id(b) not in own]
        if not bufs:
            return
        flat = _flatten_dense_tensors([b.data.float() for b in bufs])
        dist.all_reduce(flat)
        flat /= self.world
        for b, v in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
            b.data.copy_(v.to(b.dtype))

    def _lrs(self) -> tuple[float, float]:
        lr = enc = float("nan")
        for g in self.optimizer.param_groups:
            if g.get("name", "").startswith("encoder"):
                enc = g["lr"]
            else:
                lr = g["lr"]
        return lr, enc

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, *, steps: int | None = None, save_at_end: bool = True, final_eval: bool = True,
            stop_after: int | None = None) -> TrainResult:
        """Train to ``optim.steps`` (or ``steps``); ``stop_after`` ends early without an end save
        (a stand-in for a killed run in tests)."""
        total = steps or self.cfg.optim.steps
        with self.stopper:
            return self._fit(total, save_at_end=save_at_end, final_eval=final_eval, stop_after=stop_after)

    def _fit(self, total: int, *, save_at_end: bool, final_eval: bool, stop_after: int | None) -> TrainResult:
        self.resume()
        self._write_run_files()
        self.start_epochs()
        result = TrainResult(self.run_dir, self.state.step)
        start_time = time.time()
        stop_early = False
        if self.state.eval_pending and self.state.step < total:  # abandoned by a stop: redo it
            self.state.eval_pending = False
            stop_early = self._validate(total, final_eval, result)
        if self.state.step < total and not self.best.spent(self.state) and not stop_early:
            bar = progress(total=total, initial=self.state.step, enabled=self.show, desc="train", unit="step")
            batches = self.micro_batches()
            self.window = {"seq": 0, "items": 0, "t": time.time()}
            while self.state.step < total:
                done = self.train_step([next(batches) for _ in range(self.accum)])
                if done is None:
                    continue
                self.pending.append(done)
                bar.update(1)
                for hook in self.after_step:
                    hook(self, self.state.step)
                self.log(total, result, bar)
                signal_name, clock_due = self.stopper.poll()
                if signal_name:
                    self.state.eval_pending = self._eval_due(total, final_eval)
                    self._stop(signal_name, result, bar)
                if self._validate(total, final_eval, result, bar):
                    self.say_early_stop()
                    break
                self.maybe_save(total, clock_due)
                if stop_after is not None and self.state.step >= stop_after:
                    self.flush_losses(result)
                    bar.close()
                    result.step = self.state.step
                    return result
            bar.close()
            self.flush_losses(result)
            result.seconds = time.time() - start_time
            result.sequences = (self.state.step - result.step) * self.cfg.data.batch_size
            result.step = self.state.step
            if save_at_end:
                self.save()
        if final_eval:
            try:
                result.metrics = self.final_evaluation()
            except EvaluationAbandoned:
                self._stop(self.stopper.stop_name or "a signal", result, None, abandoned="final evaluation")
        return result

    def _validate(self, total: int, final_eval: bool, result: TrainResult, bar=None) -> bool:
        """:meth:`maybe_eval`, turning a validation abandoned by a stop signal into the stop."""
        try:
            return self.maybe_eval(total, last=final_eval)
        except EvaluationAbandoned:
            self.state.eval_pending = True
            self._stop(self.stopper.stop_name or "a signal", result, bar, abandoned="validation")
        return False

    def _eval_due(self, total: int, final_eval: bool) -> bool:
        """Whether this step validates: every ``eval.every`` steps before the last, and at the last
        one with a monitored metric and ``final_eval``."""
        step, every = self.state.step, self.cfg.eval.every
        return (bool(every) and step % every == 0 and step < total) or (
            self.best.enabled and final_eval and step >= total)

    def _stop(self, signal_name: str, result: TrainResult, bar, abandoned: str = "") -> None:
        """Checkpoint this step and raise :class:`~transrec.engine.preempt.RunStopped` (every rank)."""
        self.flush_losses(result)
        if bar is not None:
            bar.close()
        self.saved_step = -1 if self.state.eval_pending else self.saved_step  # the flag must be saved
        tag = self.save()
        result.step = self.state.step
        line = stopped_line(signal_name, self.state.step, self.ckpt.dir / tag, abandoned=abandoned)
        self.tracker.log("stopped", self.state.step, signal=signal_name, checkpoint=tag)
        raise RunStopped(line, signal_name, self.state.step, result)

    def start_epochs(self) -> None:
        """What an epoch is (the start line and ``data.json``'s ``"epoch"``), and the training
        samples a sequence gives (the skip rate counts sequences)."""
        facts = epoch_facts(make_loader(self.cfg, self.ds, self.content, "train", batch_size=self.micro,
                                        rank=self.rank, world=self.world))
        n_train = sum(int(s.n_train) for s in self.ds.seq_shards)
        self.skips.epoch = facts
        self.skips.train.rows_per_sequence = max(facts["samples"], 1) / max(n_train, 1)
        if self.rank == 0:
            say(epoch_line(facts))
            self.skips.write()

    def _write_run_files(self) -> None:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=1))

    def flush_losses(self, result: TrainResult) -> None:
        """Move the pending steps' losses to ``result.losses`` as global means: one host sync and, on
        several ranks, one all-reduce for all of them."""
        if not self.pending:
            return
        sums = torch.stack([s for s, _ in self.pending])
        counts = torch.stack([c for _, c in self.pending])
        if self.world > 1:
            dist.all_reduce(sums)
        result.losses.extend((sums / counts.clamp_min(1.0)).tolist())
        self.pending.clear()

    def log(self, total: int, result: TrainResult, bar) -> None:
        """A metrics record every ``run.log_every`` steps and at the last step; on the console the
        bar's postfix, or without bars one plain line on stderr
        (:func:`~transrec.engine.tracking.step_line`)."""
        step = self.state.step
        if step % self.cfg.run.log_every and step != total:
            return
        self.flush_losses(result)
        step_loss = result.losses[-1]
        w = self.window
        dt = max(time.time() - w["t"], 1e-9)
        lr, enc = self._lrs()
        rec = dict(epoch=self.state.epoch, loss=step_loss, lr=lr, seq_per_s=w["seq"] * self.world / dt,
                   items_per_s=w["items"] * self.world / dt)
        if not math.isnan(enc):
            rec["lr_encoder"] = enc
        self.tracker.log("train", step, **rec)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.1e}")
        if self.lines:
            seq_s = rec["seq_per_s"]
            eta = (total - step) * self.cfg.data.batch_size / seq_s if seq_s > 0 else math.inf
            say(step_line(step, total, loss=step_loss, lr=lr, seq_per_s=seq_s, eta_s=eta,
                          skipped_rows=self.skips.train.total, skipped_steps=self.skipped))
        self.window = {"seq": 0, "items": 0, "t": time.time()}
        self.skips.write()
        self.skips.check(world=self.world, device=self.device)

    def maybe_eval(self, total: int, last: bool = True) -> bool:
        """Validation every ``eval.every`` steps and, with a monitored metric and ``last``, at the
        last step (the final evaluation reuses it); an improvement saves the step's checkpoint as the
        best; True when the run should stop early (:meth:`~transrec.engine.best.BestWatch.judge`)."""
        if not self._eval_due(total, last):
            return False
        metrics = self.evaluate("valid")
        self.report.validation(self.state.step, metrics)
        verdict = self.best.judge(self.state, metrics)
        if verdict.improved:
            self.save(best=True)
        return verdict.stop

    def say_early_stop(self) -> None:
        s = self.state
        self.tracker.log("early_stop", s.step, best_step=s.best_step, best_value=s.best_value,
                         bad_evals=s.bad_evals)
        if self.rank == 0:
            say(self.best.stop_line(s))

    def maybe_save(self, total: int, clock_due: bool = False) -> None:
        """A checkpoint every ``run.ckpt_every`` steps, or when ``run.ckpt_every_minutes`` have
        passed since the last one (``clock_due``, agreed by every rank): whichever comes first."""
        step, every = self.state.step, self.cfg.run.ckpt_every
        if step < total and ((every and step % every == 0) or clock_due):
            self.save()

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, split: str = "valid", item_emb=None) -> dict:
        """Full-ranking metrics of ``split`` with the weights the engine holds (the split's loader
        counts its skips apart from training's; the lines and records are the report's)."""
        cfg = self.cfg
        loader = self.skips.loader(split).follow(
            make_loader(cfg, self.ds, self.content, split, batch_size=cfg.eval.batch_size, rank=self.rank,
                        world=self.world, seed=0))
        loader.set_epoch(0)
        return split_metrics(self.engine, loader, self.content, ks=tuple(cfg.eval.ks),
                        item_chunk=cfg.eval.item_chunk, device=self.device, max_users=cfg.eval.max_users,
                        show=self.show, item_emb=item_emb, exclude_history=cfg.eval.exclude_history,
                        should_stop=self.stopper.stop_requested)

    def encode_items(self):
        """Every item's embedding under the weights the engine holds (eval mode, sharded over ranks)."""
        return encode_catalogue(self.engine, self.content, chunk=self.cfg.eval.item_chunk,
                                device=self.device, show=self.show, should_stop=self.stopper.stop_requested)

    def final_evaluation(self) -> dict:
        """valid and test at the last step and, with ``run.monitor``, at the best one, in
        ``eval.json`` (:meth:`~transrec.engine.report.EvalReport.final`). When the best is an earlier
        step its checkpoint is loaded into the engine for that (the engine then holds the best
        weights)."""
        def load(tag: str) -> None:
            self.ckpt.load(self.engine, tag, world_size=self.world, zero_stage=self.zero_stage,
                           run_dir=self.run_dir)

        return self.report.final(self.state, self.best, self.ckpt, encode=self.encode_items,
                                 evaluate=self.evaluate, load=load, data=self.skips.write)

    def close(self) -> None:
        try:
            self.tracker.close()
            D.barrier()
        finally:
            self.lock.release()


def train(cfg: Config, **kw) -> TrainResult:
    """``transrec train``: build, resume if possible, train, save, evaluate."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg)
    try:
        return trainer.fit(**kw)
    finally:
        trainer.close()
