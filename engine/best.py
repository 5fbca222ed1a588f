"""The best step by ``run.monitor`` and early stopping after ``run.patience`` evaluations without gain.

With a monitored metric (``valid/ndcg@10`` by default) every validation is compared with the best
so far: a finite value above it is an improvement (the trainer then saves the step's checkpoint as
``checkpoints/best``), anything else one more bad evaluation, and ``run.patience`` of them in a row
stop the run. The best step and value and the bad-evaluation count live in the checkpoint's
:class:`~transrec.engine.checkpoint.ClientState`, so a resumed run goes on with them; this part
holds the rule, the state is passed in.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from transrec.config import Config, monitor_metric
from transrec.engine.checkpoint import ClientState


class Verdict(NamedTuple):
    """What one validation means: ``improved`` (save it as the best), ``stop`` (patience spent)."""

    improved: bool
    stop: bool


class BestWatch:
    """The best validation step and early stopping (off without ``run.monitor``)."""

    def __init__(self, cfg: Config):
        self.metric = monitor_metric(cfg)  # metric name watched on valid ("" = off)
        self.name = cfg.run.monitor  # as configured: valid/NAME
        self.patience = int(cfg.run.patience)

    @property
    def enabled(self) -> bool:
        return bool(self.metric)

    def judge(self, state: ClientState, metrics: dict) -> Verdict:
        """Compare the monitored metric of a validation at ``state.step`` with the best so far and
        update ``state``'s best step, best value and bad-evaluation count."""
        if not self.enabled:
            return Verdict(False, False)
        value = float(metrics[self.metric])
        if math.isfinite(value) and (state.best_value is None or value > state.best_value):
            state.best_step, state.best_value, state.bad_evals = state.step, value, 0
            return Verdict(True, False)
        state.bad_evals += 1
        return Verdict(False, self.spent(state))

    def spent(self, state: ClientState) -> bool:
        """``run.patience`` validations in a row brought no improvement."""
        return self.enabled and 0 < self.patience <= state.bad_evals

    def stop_line(self, state: ClientState) -> str:
        """The console line of an early stop."""
        best = f"{state.best_value:.4f} at step {state.best_step}" if state.best_value is not None else "none"
        return (f"early stop at step {state.step}: {self.name} did not improve for {state.bad_evals} "
                f"evaluations (run.patience={self.patience}; best {best})")

    def settle(self, state: ClientState, valid: dict) -> bool:
        """At the final evaluation: with no monitored validation yet, the last step (``state.step``,
        whose validation is ``valid``) becomes the best; True when it did."""
        if not self.enabled or state.best_value is not None:
            return False
        state.best_step, state.best_value = state.step, float(valid[self.metric])
        return True

    def record(self, state: ClientState) -> dict:
        """The head of ``eval.json``'s ``"best"``: step, metric and value."""
        return {"step": state.best_step, "metric": self.name, "value": state.best_value}
