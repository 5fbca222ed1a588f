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
(:mod:`~transrec.engine.guard`) and DeepSpeed's patches (:mod:`~transrec.engine.deepspeed_patches`),
checkpoints (:mod:`~transrec.engine.checkpoint`), the loss and throughput log
(:class:`~transrec.engine.tracking.StepLog`) and the :class:`~transrec.engine.validation.Validator`
(validation every ``eval.every`` steps and at the last step, judged against ``run.monitor`` by
:mod:`~transrec.engine.best`; the final evaluation with ``eval.json``).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from transrec.config import Config, batch_layout, save_yaml, to_deepspeed, validate
from transrec.engine import distributed as D
from transrec.engine.best import BestWatch
from transrec.engine.checkpoint import CheckpointManager, ClientState, check_same_model, tag_for
from transrec.engine.data import batch_size_warning, epoch_facts, make_loader, open_data
from transrec.engine.deepspeed_patches import check_deepspeed, single_process_fast_path
from transrec.engine.guard import FiniteGuard
from transrec.engine.optim import frozen_by_rate_warning, learning_rates, make_optimizer, make_scheduler
from transrec.engine.preempt import EvaluationAbandoned, RunStopped, StopControl, stopped_line
from transrec.engine.report import EvalReport, TrainResult
from transrec.engine.runlock import check_run_dir, lock_run_folder
from transrec.engine.skips import SkipReport
from transrec.engine.stepclock import NO_CLOCK
from transrec.engine.tracking import StepLog, Tracker, bars_enabled, progress, say
from transrec.engine.validation import Validator
from transrec.errors import ConfigError, UserError
from transrec.models import build_model
from transrec.models.export import start_from_export
from transrec.models.negatives import step_buffers
from transrec.models.prefix import maybe_wrap
from transrec.shards.batch import Batch
from transrec.shards.format import unsanitize_key


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Owns one DeepSpeed engine. ``Trainer(cfg).fit()`` is ``transrec train``.

    :meth:`fit` reads as its recipe: :meth:`begin` (resume, the run's files, a validation a stop
    abandoned), then :meth:`steps` (each optimizer step committed, logged, validated and
    checkpointed as due), then :meth:`finish` (the last checkpoint and the final evaluation). A
    tool that needs only part of that calls the parts: ``begin()`` and ``steps()`` alone are a run
    killed after its last step, with no end save and no final evaluation.

    Step state lives in ``state`` (:class:`~transrec.engine.checkpoint.ClientState`, what a
    checkpoint keeps), changed only when a step commits (:meth:`train_step`). Hooks:
    ``after_step(trainer, step)`` callbacks run after every committed step (``step`` counts
    completed steps; benchmarks time steady-state steps with them).
    """

    def __init__(self, cfg: Config, *, data=None, show: bool | None = None):
        """``show``: tqdm bars (True) or plain lines on stderr (False); None follows ``run.progress``."""
        check_deepspeed()
        self.cfg = cfg
        self.rank, _, self.world = D.init(cfg.deepspeed.backend)
        validate(cfg, self.world)
        self.micro, self.accum = batch_layout(cfg, self.world)
        self.show = (bars_enabled(cfg.run.progress) if show is None else show) and self.rank == 0
        self.device = D.device()
        if not cfg.run.out:
            raise ConfigError("no run folder: pass --out RUN (or run.out=RUN)")
        self.run_dir = Path(cfg.run.out)
        check_run_dir(self.run_dir)
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
        self.skips.check_items(say if self.rank == 0 else None)
        if self.rank == 0 and (line := batch_size_warning(cfg, self.ds, self.content)):
            say(line)
        model = self._build_model()
        if self.rank == 0 and (line := frozen_by_rate_warning(model, cfg.optim)):
            say(line)
        # The frozen-prefix cache is built from the whole fp32 weights, before any cast or
        # partitioning; training and evaluation then gather items through the same wrapper.
        self.content = maybe_wrap(self.content, model, cfg.data, progress=self.show,
                                  log=say if self.rank == 0 else (lambda _msg: None))
        model.set_catalogue_content(self.content)  # negatives=catalogue, exact (catalogue_refresh 0)
        if cfg.deepspeed.precision == "bf16":
            # DeepSpeed casts parameters to bf16 but leaves buffers (BatchNorm running statistics,
            # pixel mean/std) in fp32, which mixed-dtype kernels refuse: cast the whole module first.
            # The optimizer still keeps fp32 master weights (DeepSpeed's bf16 optimizer).
            model.to(torch.bfloat16)
        self.ds_config = to_deepspeed(cfg, self.world)
        # ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizers flatten the weights themselves; without them
        # the AdamW gets one flat tensor per group from FlatAdamW (see engine.optim).
        flat = self.zero_stage == 0 and not any(self.ds_config.get(k, {}).get("enabled")
                                                for k in ("bf16", "fp16"))
        self.optimizer = make_optimizer(model, cfg.optim, flat=flat)
        scheduler = make_scheduler(self.optimizer, cfg.optim)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                    lr_scheduler=scheduler, config=self.ds_config)
        if flat and self.world == 1:
            single_process_fast_path(self.engine)
        self.guard = FiniteGuard(self.engine, world=self.world, device=self.device,
                                 max_bad_steps=cfg.run.max_bad_steps, rank=self.rank)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.run.keep_last)
        self.state = ClientState(step=0, epoch=0, cursor=0, seed=cfg.run.seed)
        self.position = (0, 0)  # (epoch, cursor) after the last micro-batch handed out
        self.saved_step: int | None = None  # step of the checkpoint this process wrote last
        self.after_step: list = []
        self.clock = NO_CLOCK  # the parts of a step, timed when a benchmark sets a StepClock
        self.start_step, self.started = 0, time.time()  # where and when this process's training began
        self.tracker = Tracker(self.run_dir, enabled=self.rank == 0, tensorboard=cfg.run.tensorboard)
        self.steplog = StepLog(self.tracker, every=cfg.run.log_every, batch_size=cfg.data.batch_size,
                               world=self.world, lines=self.rank == 0 and not self.show)
        self.stopper = StopControl(cfg.run.stop_signals, cfg.run.ckpt_every_minutes, device=self.device,
                                   world=self.world)
        report = EvalReport(self.run_dir, self.tracker, rank=self.rank,
                            protocol={"exclude_history": cfg.eval.exclude_history})
        self.validator = Validator(cfg, self.engine, self.ds, self.content, skips=self.skips, report=report,
                                   best=BestWatch(cfg), rank=self.rank, world=self.world, device=self.device,
                                   show=self.show, should_stop=self.stopper.stop_requested)
        self.result = TrainResult(self.run_dir, 0, losses=self.steplog.losses)

    def _build_model(self):
        model = build_model(self.cfg.model, n_items=self.ds.n_items)
        if self.cfg.run.init_from:
            start_from_export(model, self.cfg.run.init_from, [unsanitize_key(k) for k in self.ds.item_ids])
        if hasattr(model, "set_seen_items"):
            model.set_seen_items(np.asarray(self.ds.train_count) > 0)
        return model

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def total(self) -> int:
        return self.cfg.optim.steps

    # -- the recipe -----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Resume, train to ``optim.steps`` (logging, validating and checkpointing on the way), save
        the last step, evaluate. A stop signal ends it with :class:`~transrec.engine.preempt.RunStopped`."""
        with self.stopper:
            if self.begin():
                for _ in self.steps():
                    pass
            self.finish()
        return self.result

    def begin(self) -> bool:
        """Resume, write the run's files, state what an epoch is, and redo a validation a stop
        abandoned; False when there is nothing left to train (done, patience spent, early stop)."""
        if not self.resume():
            self.state.writer = self.data_layout()
        self.start_step = self.result.step = self.state.step
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=1))
        facts = epoch_facts(make_loader(self.cfg, self.ds, self.content, "train", batch_size=self.micro,
                                        rank=self.rank, world=self.world))
        self.skips.start_epochs(facts, say if self.rank == 0 else None)
        self.started = time.time()
        if self.state.eval_pending and self.state.step < self.total:  # abandoned by a stop: redo it
            self.state.eval_pending = False
            if self.validate():
                return False
        return self.state.step < self.total and not self.validator.best.spent(self.state)

    def steps(self) -> Iterator[int]:
        """Train to ``optim.steps``: each committed step is logged, polled for a stop signal,
        validated and checkpointed as due, then yielded. Ends early when validation says so."""
        bar = progress(total=self.total, initial=self.state.step, enabled=self.show, desc="train",
                       unit="step")
        batches = self.micro_batches()
        self.steplog.restart()
        try:
            while self.state.step < self.total:
                done = self.train_step([next(batches) for _ in range(self.accum)])
                if done is None:
                    continue
                self.steplog.step(*done)
                bar.update(1)
                for hook in self.after_step:
                    hook(self, self.state.step)
                if self.steplog.log(self.state.step, self.total, bar, epoch=self.state.epoch,
                                    lrs=lambda: learning_rates(self.optimizer),
                                    skipped_rows=self.skips.train.total,
                                    skipped_steps=self.guard.skipped_steps):
                    self.skips.write()
                    self.skips.check(world=self.world, device=self.device)
                signal_name, clock_due = self.stopper.poll()
                if signal_name:
                    self.state.eval_pending = self.validator.due(self.state.step, self.total)
                    self._stop(signal_name, "")
                if self.validator.due(self.state.step, self.total) and self.validate():
                    break
                every = self.cfg.run.ckpt_every
                if self.state.step < self.total and ((every and self.state.step % every == 0) or clock_due):
                    self.save()
                yield self.state.step
        finally:
            bar.close()
            self.steplog.flush()
            self.result.step = self.state.step

    def finish(self) -> None:
        """After :meth:`steps`: the last step's checkpoint (when this process trained) and the final
        evaluation into ``result``."""
        self.result.seconds = time.time() - self.started
        self.result.sequences = (self.state.step - self.start_step) * self.cfg.data.batch_size
        if self.state.step > self.start_step:
            self.save()
        try:
            self.result.metrics = self.final_evaluation()
        except EvaluationAbandoned:
            self._stop(self.stopper.stop_name or "a signal", "final evaluation")

    # -- resume, checkpoints, stops -------------------------------------------------------------
    def resume(self) -> bool:
        """Continue from the run folder's latest complete checkpoint, if any (and ``run.resume``)."""
        tag = self.ckpt.latest() if self.cfg.run.resume else None
        if tag is None:
            return False
        check_same_model(self.run_dir, self.cfg)
        self.state = self.ckpt.load(self.engine, tag, world_size=self.world, zero_stage=self.zero_stage,
                                    run_dir=self.run_dir)
        self.position = (self.state.epoch, self.state.cursor)
        if self.rank == 0:
            say(f"resuming from step {self.state.step} ({self.ckpt.dir / tag})")
        self._continue_layout(self.ckpt.manifest(tag))
        self.tracker.keep_until(self.state.step)
        return True

    def data_layout(self) -> dict:
        """This run's layout of an epoch: ranks, micro-batch per rank, loader workers, global batch."""
        return {"world": self.world, "batch": self.micro, "workers": self.cfg.data.num_workers,
                "global": self.cfg.data.batch_size}

    def _continue_layout(self, man: dict) -> None:
        """After loading a checkpoint: the epoch in progress is finished in the layout it was begun in
        (``state.layout``, read exactly once over this run's ranks, see :mod:`~transrec.shards.loader`),
        later ones in this run's; one line says so when the world size or the layout changed."""
        writer = self.state.writer or {"world": int(man["world_size"]), "workers": self.cfg.data.num_workers,
                                       "batch": batch_layout(self.cfg, int(man["world_size"]))[0],
                                       "global": self.cfg.data.batch_size}
        keys = ("world", "batch", "workers")
        began = self.state.layout if (self.state.layout or {}).get("epoch") == self.state.epoch else None
        began = began or {"epoch": self.state.epoch, **{k: writer[k] for k in keys}}
        own = self.data_layout()
        other = any(began[k] != own[k] for k in keys) or self.state.cursor % (self.micro * self.world)
        self.state.layout = began if other else None
        self.state.writer = own
        if self.rank != 0 or not (other or writer["world"] != self.world):
            return
        n, m = writer["world"], self.world
        old_accum = writer["global"] // (writer["batch"] * n) if writer["batch"] * n else 0
        batch = (f"global batch {own['global']} kept: {self.micro} per rank x {self.accum} accumulation x "
                 f"{m} (was {writer['batch']} x {old_accum} x {n})" if writer["global"] == own["global"] else
                 f"global batch changed from {writer['global']} to {own['global']} (data.batch_size)")
        data = ""
        if other:
            probe = make_loader(self.cfg, self.ds, self.content, "train", batch_size=self.micro, rank=0,
                                world=self.world, start_cursor=self.state.cursor, layout=began)
            data = (f"; the rest of epoch {began['epoch']} is read as {began['world']} rank(s) laid it out, "
                    "each sample once")
            if probe.replay_left_out:
                data += (f" but its last {probe.replay_left_out}, too few to split over {m} ranks, which "
                         "are left out")
        states = ("model and optimizer states re-partitioned" if self.zero_stage else
                  "model and optimizer states loaded whole (ZeRO-0 does not partition them)")
        ranks = f"{m} rank{'s' if m != 1 else ''}"
        say(f"resumed on {ranks} from a checkpoint of {n}: {states}; {batch}{data}" if n != m else
            f"resumed on {ranks} as the checkpoint was written; {batch}{data}")

    def save(self, best: bool = False, *, again: bool = False) -> str:
        """Checkpoint the current step, once per step: a second call only moves the ``best`` pointer
        when ``best``, unless ``again`` (the state changed since: a stop's pending validation)."""
        tag = tag_for(self.state.step)
        if self.saved_step == self.state.step and not again:
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

    def _stop(self, signal_name: str, abandoned: str) -> NoReturn:
        """Checkpoint this step and raise :class:`~transrec.engine.preempt.RunStopped` (every rank)."""
        self.steplog.flush()
        self.result.step = self.state.step
        tag = self.save(again=self.state.eval_pending)
        line = stopped_line(signal_name, self.state.step, self.ckpt.dir / tag, abandoned=abandoned)
        self.tracker.log("stopped", self.state.step, signal=signal_name, checkpoint=tag)
        raise RunStopped(line, signal_name, self.state.step, self.result)

    # -- evaluation -----------------------------------------------------------------------------
    def validate(self) -> bool:
        """Validate this step; an improvement saves its checkpoint as the best. True when the run
        stops early (an early stop is reported). A stop signal during it stops the run with the
        validation pending in the checkpoint, so the resumed run does it first."""
        try:
            verdict = self.validator.validate(self.state)
        except EvaluationAbandoned:
            self.state.eval_pending = True
            self._stop(self.stopper.stop_name or "a signal", "validation")
        if verdict.improved:
            self.save(best=True)
        if verdict.stop:
            self.validator.early_stop(self.state)
        return verdict.stop

    def final_evaluation(self) -> dict:
        """valid and test at the last step and at the best one (:meth:`Validator.final
        <transrec.engine.validation.Validator.final>`); the engine then holds the best weights."""
        def load(tag: str) -> None:
            self.ckpt.load(self.engine, tag, world_size=self.world, zero_stage=self.zero_stage,
                           run_dir=self.run_dir)

        return self.validator.final(self.state, self.ckpt, load)

    # -- steps ----------------------------------------------------------------------------------
    def micro_batches(self) -> Iterator[Batch]:
        """Endless training micro-batches from the state's position; ``position`` follows them (the
        epoch and the loader's global sample cursor after the last batch handed out), and an
        exhausted epoch rolls over to the next one (cursor 0) when the next batch is asked for."""
        epoch, cursor = self.position
        while True:
            began = self.state.layout if (self.state.layout or {}).get("epoch") == epoch else None
            loader = self.skips.train.follow(make_loader(self.cfg, self.ds, self.content, "train",
                                                         batch_size=self.micro, rank=self.rank,
                                                         world=self.world, start_cursor=cursor, layout=began))
            loader.set_epoch(epoch)
            if len(loader) == 0:
                raise UserError(f"{self.cfg.data.path}: the training split gives no batch of {self.micro} "
                                f"sequences per rank; lower data.batch_size")
            for batch in loader:
                self.position = (epoch, int(batch.cursor))
                rows = batch.row_valid
                self.skips.train.rows(self.micro if rows is None else int(rows.sum()))
                yield batch
            epoch, cursor = epoch + 1, 0
            self.position = (epoch, cursor)

    def train_step(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One optimizer step over its micro-batches; returns (this rank's loss sum, the global
        target count), both on the device, or None when the step was skipped: its loss or gradient
        norm was not finite on some rank (:mod:`~transrec.engine.guard`). A skipped step leaves
        the weights, the optimizer, the schedule and the buffers as they were and does not count;
        its batches are consumed (the state's position moves past them)."""
        count, scale = self.step_scale(micro_batches)
        self.validator.refresh_catalogue(self.state.step)
        self.guard.hold()
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            with self.clock("forward"):
                loss, metrics = self.engine(batch.to(self.device, non_blocking=True))
            with self.clock("backward"):  # loss * count: this micro-batch's sum
                self.engine.backward(loss * metrics["count"] * scale)
            self.steplog.batches(batch.batch_size, batch.num_unique)
            loss_sum += metrics["loss_sum"]
            if i == len(micro_batches) - 1:
                self.guard.loss_check(loss_sum)
            with self.clock("optimizer"):
                self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
        self.state.epoch, self.state.cursor = self.position
        if not self.guard.applied():
            latest = self.ckpt.latest()
            self.guard.skipped(self.state.step, loss_sum, self.tracker, f"the latest checkpoint is "
                               f"{self.ckpt.dir / latest}" if latest else "no checkpoint was written")
            return None
        self.guard.passed()
        D.average_buffers(self.engine.module, self.world, skip=step_buffers(self.engine.module))
        self.state.step += 1
        self.state.samples += self.cfg.data.batch_size
        return loss_sum, count

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

    @property
    def items_encoded(self) -> int:
        """Unique items through the encoders in this process's life (throughput accounting)."""
        return self.steplog.items_encoded

    def close(self) -> None:
        try:
            self.tracker.close()
            D.barrier()
        finally:
            self.lock.release()


def train(cfg: Config) -> TrainResult:
    """``transrec train``: build, resume if possible, train, save, evaluate."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
