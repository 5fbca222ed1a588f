"""Run observability: one JSON line per logged step or evaluation, TensorBoard events, tqdm bars or
plain log lines.

Only rank 0 writes. ``RUN/metrics.jsonl`` holds records such as::

    {"kind": "train", "step": 20, "epoch": 0, "loss": 3.91, "lr": 0.003, "lr_encoder": 0.001,
     "seq_per_s": 410.2, "items_per_s": 5100.0, "time": 12.4}
    {"kind": "eval", "step": 100, "split": "valid", "ndcg@10": 0.071, "hr@10": 0.14, ...}

``transrec plot RUN`` reads it back (:mod:`transrec.engine.plot`).

On the console, ``run.progress`` (``auto`` | ``on`` | ``off``) picks between tqdm bars and plain lines,
both on stderr (stdout holds a command's results alone). ``auto`` shows bars when stderr is a
terminal; without bars, rank 0 writes one line every ``run.log_every`` steps and one per
evaluation, which read well in a file (nohup, a scheduler, CI)::

    step 20/100  loss 3.9120  lr 3.00e-03  seq/s 410.2  eta 0:00:04
    eval valid step 50  ndcg@10 0.0712  hr@10 0.1400  mrr 0.0513
    eval test best step 40  ndcg@10 0.0734  hr@10 0.1450  mrr 0.0520

(the last: the best checkpoint's weights, evaluated after a run whose best step was not its last).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class Tracker:
    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.dir = Path(run_dir)
        self.start = time.time()
        self._tb = None
        self._file = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.dir / METRICS_FILE, "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard

                    self._tb = SummaryWriter(log_dir=str(self.dir / "tb"))
                except ImportError:  # tensorboard is a dependency; keep running without it if absent
                    self._tb = None

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": int(step), **values, "time": round(time.time() - self.start, 3)}
        self._file.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            prefix = kind if kind != "eval" else f"eval/{values.get('split', '')}"
            for k, v in values.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def keep_until(self, step: int) -> None:
        """Drop the records after ``step`` (a resumed run logs those steps again), so every step
        is in the file once. The file is rewritten under a temporary name and renamed into place;
        a line cut by a killed run goes too."""
        if not self.enabled:
            return
        path = self.dir / METRICS_FILE
        self._file.close()
        kept = [json.dumps(r) + "\n" for r in read_metrics(self.dir) if int(r.get("step", 0)) <= step]
        tmp = path.with_name(f".{METRICS_FILE}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._file = open(path, "a", buffering=1)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed run
    return out


def progress(iterable=None, *, enabled: bool = True, **kw):
    """tqdm on stderr when enabled (rank 0 and run.progress), a plain iterator otherwise."""
    return tqdm(iterable, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False, **kw)


def bars_enabled(mode: str | bool, stream=None) -> bool:
    """Whether ``run.progress`` shows tqdm bars: ``on``; ``auto`` when ``stream`` (stderr) is a terminal."""
    if isinstance(mode, bool):  # True/False set from Python: on/off
        mode = "on" if mode else "off"
    if mode == "on":
        return True
    if mode == "off":
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def say(msg: str) -> None:
    """One line on stderr (below any open tqdm bar), flushed: console output that is not a result."""
    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


def step_line(step: int, total: int, *, loss: float, lr: float, seq_per_s: float, eta_s: float,
              skipped_rows: int = 0, skipped_steps: int = 0) -> str:
    """The plain console line of a logged training step."""
    parts = [f"step {step}/{total}", f"loss {loss:.4f}", f"lr {lr:.2e}", f"seq/s {seq_per_s:.1f}",
             f"eta {_eta(eta_s)}"]
    if skipped_rows:
        parts.append(f"skipped rows {skipped_rows}")
    if skipped_steps:
        parts.append(f"skipped steps {skipped_steps}")
    return "  ".join(parts)


def eval_line(split: str, step: int, metrics: dict, *, best: bool = False) -> str:
    """The plain console line of one evaluation of the weights of ``step``: ndcg@10, hr@10 and mrr
    (those present); ``best``: the best step's weights, evaluated again after training."""
    parts = [f"eval {split} {'best ' if best else ''}step {step}"]
    for k in ("ndcg@10", "hr@10", "mrr"):
        if k in metrics:
            parts.append(f"{k} {float(metrics[k]):.4f}")
    return "  ".join(parts)


class StepLog:
    """The training steps between two log lines: their losses (kept on the device until a line is
    due, then one host sync and, on several ranks, one all-reduce for all of them) and the
    throughput since the last line. A record goes to ``metrics.jsonl`` every ``run.log_every``
    steps and at the last step; on the console the bar's postfix, or without bars one plain line
    (:func:`step_line`)."""

    def __init__(self, tracker: Tracker, *, every: int, batch_size: int, world: int, lines: bool):
        self.tracker = tracker
        self.every = every
        self.batch_size = batch_size  # sequences per optimizer step, all ranks
        self.world = world
        self.lines = lines  # plain lines instead of bars
        self.losses: list[float] = []  # every flushed step's global mean loss
        self.items_encoded = 0  # unique items through the encoders in this process's life
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (loss sum, count) of unlogged steps
        self.restart()

    def restart(self) -> None:
        """Measure throughput from now on."""
        self.window = {"seq": 0, "items": 0, "t": time.time()}

    def batches(self, sequences: int, items: int) -> None:
        """Micro-batches through forward and backward (a skipped step's too)."""
        self.window["seq"] += sequences
        self.window["items"] += items
        self.items_encoded += items

    def step(self, loss_sum: torch.Tensor, count: torch.Tensor) -> None:
        """A committed step: this rank's loss sum and the global target count, on the device."""
        self.pending.append((loss_sum, count))

    def flush(self) -> None:
        """Move the pending steps' losses to :attr:`losses` as global means."""
        if not self.pending:
            return
        sums = torch.stack([s for s, _ in self.pending])
        counts = torch.stack([c for _, c in self.pending])
        if self.world > 1:
            dist.all_reduce(sums)
        self.losses.extend((sums / counts.clamp_min(1.0)).tolist())
        self.pending.clear()

    def log(self, step: int, total: int, bar, *, epoch: int, lrs: Callable[[], tuple[float, float]],
            skipped_rows: int, skipped_steps: int) -> bool:
        """The record and line of ``step`` when one is due (``lrs()``: the user side's and the
        encoders' learning rates, read only then); True when it was."""
        if step % self.every and step != total:
            return False
        self.flush()
        loss = self.losses[-1]
        w = self.window
        dt = max(time.time() - w["t"], 1e-9)
        lr, enc = lrs()
        rec = dict(epoch=epoch, loss=loss, lr=lr, seq_per_s=w["seq"] * self.world / dt,
                   items_per_s=w["items"] * self.world / dt)
        if not math.isnan(enc):
            rec["lr_encoder"] = enc
        self.tracker.log("train", step, **rec)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        if self.lines:
            seq_s = rec["seq_per_s"]
            eta = (total - step) * self.batch_size / seq_s if seq_s > 0 else math.inf
            say(step_line(step, total, loss=loss, lr=lr, seq_per_s=seq_s, eta_s=eta,
                          skipped_rows=skipped_rows, skipped_steps=skipped_steps))
        self.restart()
        return True
