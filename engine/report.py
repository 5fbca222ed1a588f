"""What a run reports: its :class:`TrainResult`, and its evaluations: each one's line on stderr and
record in ``metrics.jsonl``, and after training valid and test at the last step and at the best one,
in ``RUN/eval.json``; each test user's target ranks go to ``RUN/ranks/`` (intervals over users,
:mod:`~transrec.engine.intervals`).

The final evaluation reuses a validation already done at the last step. With ``run.monitor`` it adds
``"best"`` (step, metric, value, valid, test): the last step's figures when it is the best, else those
of the best checkpoint's weights loaded into the engine (the engine then holds the best weights).
Those are recorded as ``eval_best`` at the best step and written as ``eval valid best step N``, so a
line always names the step whose weights it reports.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transrec.engine.best import BestWatch
from transrec.engine.checkpoint import CheckpointManager, ClientState, tag_for
from transrec.engine.intervals import save_ranks
from transrec.engine.tracking import Tracker, eval_line, say

SPLITS = ("valid", "test")


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


class EvalReport:
    """Evaluation lines and records (written on rank 0), the last validation, ``eval.json``."""

    def __init__(self, run_dir: str | Path, tracker: Tracker, *, rank: int, protocol: dict):
        self.path = Path(run_dir) / "eval.json"
        self.tracker = tracker
        self.rank = rank
        self.protocol = protocol  # how the figures were counted (eval.json "protocol")
        self.valid_at: tuple[int, dict] | None = None  # (step, metrics) of the last validation

    def record(self, split: str, step: int, metrics: dict, *, best: bool = False) -> None:
        """One evaluation of the weights of ``step``: a record (kind ``eval``, or ``eval_best`` for the
        best step's weights evaluated after training) and one line on stderr."""
        self.tracker.log("eval_best" if best else "eval", step, split=split, **metrics)
        if self.rank == 0:
            say(eval_line(split, step, metrics, best=best))

    def validation(self, step: int, metrics: dict) -> None:
        """A validation during training (the final evaluation reuses one at the last step)."""
        self.record("valid", step, metrics)
        self.valid_at = (step, metrics)

    def splits(self, step: int, *, encode: Callable[[], object], split_metrics: Callable[..., dict],
               best: bool = False) -> dict:
        """valid and test of the weights the engine holds, those of ``step``: the catalogue encoded
        once (``encode()``), each split ranked by ``split_metrics(split, item_emb=...)``."""
        emb = encode()
        out = {}
        for split in SPLITS:
            if split == "valid" and not best and self.valid_at and self.valid_at[0] == step:
                out[split] = self.valid_at[1]
                continue
            keep = {} if split == "test" else None
            out[split] = split_metrics(split, item_emb=emb, keep=keep)
            if keep and self.rank == 0:  # each test user's ranks, for intervals over users
                save_ranks(self.path.parent, step, keep["users"], keep["ranks"],
                           bool(self.protocol.get("exclude_history", True)))
            self.record(split, step, out[split], best=best)
        return out

    def final(self, state: ClientState, watch: BestWatch, ckpt: CheckpointManager, *,
              encode: Callable[[], object], split_metrics: Callable[..., dict],
              load: Callable[[str], object],
              data: Callable[[], dict]) -> dict:
        """valid and test at the last step and, with ``watch`` enabled, at the best one (``"best"``);
        ``load(tag)`` puts a checkpoint's weights into the engine, ``data()`` is the skipped-input
        summary copied into ``eval.json``."""
        step = state.step
        out = self.splits(step, encode=encode, split_metrics=split_metrics)
        if watch.enabled:
            settled = watch.settle(state, out["valid"])  # no validation yet: the last step is the best
            if settled and self.rank == 0 and ckpt.latest() == tag_for(step):
                ckpt.mark_best(tag_for(step))
            best = watch.record(state)
            if state.best_step == step:
                best.update(valid=out["valid"], test=out["test"])
            elif ckpt.best() == tag_for(state.best_step):
                load(tag_for(state.best_step))
                best.update(self.splits(state.best_step, encode=encode, split_metrics=split_metrics,
                                        best=True))
            else:
                best["missing"] = f"no checkpoint of step {state.best_step} in {ckpt.dir}"
            out["best"] = best
        if self.rank == 0:
            self.path.write_text(json.dumps({"step": step, "protocol": self.protocol, **out, "data": data()},
                                            indent=1))
        return out
