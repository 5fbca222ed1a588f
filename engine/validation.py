"""Evaluation inside a training run: validation every ``eval.every`` steps and at the last step, the
final evaluation after training, and the catalogue encoding both rank users against (and a content
model's catalogue softmax trains against).

:class:`Validator` owns the three for one trainer's engine. It decides when a step validates, runs
the validation, reports it (:class:`~transrec.engine.report.EvalReport`) and judges it against
``run.monitor`` (:class:`~transrec.engine.best.BestWatch`); saving the best step's checkpoint is
the caller's, which holds the checkpoints. Every evaluation polls the run's stop control before
each chunk and each batch, so a stop signal abandons it
(:class:`~transrec.engine.preempt.EvaluationAbandoned`) instead of waiting for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from transrec.config import Config
from transrec.engine.best import BestWatch, Verdict
from transrec.engine.checkpoint import CheckpointManager, ClientState
from transrec.engine.data import make_loader
from transrec.engine.ranking import encode_catalogue, split_metrics
from transrec.engine.report import EvalReport
from transrec.engine.skips import SkipReport
from transrec.engine.tracking import say


class Validator:
    """Validation, the final evaluation and the catalogue encoding of one engine's weights."""

    def __init__(self, cfg: Config, engine, ds, content, *, skips: SkipReport, report: EvalReport,
                 best: BestWatch, rank: int, world: int, device, show: bool,
                 should_stop: Callable[[], bool] | None = None):
        self.cfg = cfg
        self.engine = engine
        self.ds = ds
        self.content = content
        self.skips = skips
        self.report = report
        self.best = best
        self.rank = rank
        self.world = world
        self.device = device
        self.show = show
        self.should_stop = should_stop  # the run's collective stop poll

    def due(self, step: int, total: int, *, at_end: bool = True) -> bool:
        """Whether ``step`` validates: every ``eval.every`` steps before the last and, with a
        monitored metric and ``at_end``, at the last one (the final evaluation reuses it)."""
        every = self.cfg.eval.every
        return (bool(every) and step % every == 0 and step < total) or (
            self.best.enabled and at_end and step >= total)

    def encode_catalogue(self) -> torch.Tensor:
        """Every item's embedding under the weights the engine holds (eval mode, sharded over ranks)."""
        return encode_catalogue(self.engine, self.content, chunk=self.cfg.eval.item_chunk,
                                device=self.device, show=self.show, should_stop=self.should_stop)

    def refresh_catalogue(self, step: int) -> None:
        """Re-encode every item (eval mode, no gradient, sharded over ranks) for a content model's
        catalogue softmax when its table is due at ``step`` (``model.loss.catalogue_refresh``)."""
        net = self.engine.module
        if net.catalogue_due(step):
            net.refresh_catalogue(encode_catalogue(self.engine, self.content, chunk=self.cfg.eval.item_chunk,
                                                   device=self.device, show=False), step)

    def split_metrics(self, split: str = "valid", item_emb=None, keep: dict | None = None) -> dict:
        """Full-ranking metrics of ``split`` under the weights the engine holds (the split's loader
        counts its skips apart from training's); ``keep`` receives each user's ranks (see
        :func:`~transrec.engine.ranking.split_metrics`)."""
        cfg = self.cfg
        loader = self.skips.loader(split).follow(
            make_loader(cfg, self.ds, self.content, split, batch_size=cfg.eval.batch_size, rank=self.rank,
                        world=self.world, seed=0))
        loader.set_epoch(0)
        return split_metrics(self.engine, loader, self.content, ks=tuple(cfg.eval.ks),
                             item_chunk=cfg.eval.item_chunk, device=self.device, max_users=cfg.eval.max_users,
                             show=self.show, item_emb=item_emb, exclude_history=cfg.eval.exclude_history,
                             should_stop=self.should_stop, keep=keep)

    def validate(self, state: ClientState) -> Verdict:
        """Validate the step of ``state``, report it and judge it (``state``'s best step and
        bad-evaluation count move with the verdict)."""
        metrics = self.split_metrics("valid")
        self.report.validation(state.step, metrics)
        return self.best.judge(state, metrics)

    def early_stop(self, state: ClientState) -> None:
        """The record and the console line of an early stop."""
        self.report.tracker.log("early_stop", state.step, best_step=state.best_step,
                                best_value=state.best_value, bad_evals=state.bad_evals)
        if self.rank == 0:
            say(self.best.stop_line(state))

    def final(self, state: ClientState, ckpt: CheckpointManager, load: Callable[[str], object]) -> dict:
        """valid and test at the last step and, with ``run.monitor``, at the best one, in ``eval.json``
        (:meth:`~transrec.engine.report.EvalReport.final`). When the best is an earlier step,
        ``load(tag)`` puts its checkpoint into the engine (the engine then holds the best weights)."""
        return self.report.final(state, self.best, ckpt, encode=self.encode_catalogue,
                                 split_metrics=self.split_metrics, load=load, data=self.skips.write)
