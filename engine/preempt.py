"""Stopping when told to, and checkpoints by the clock.

Schedulers warn a job before they kill it: SLURM (``--signal``, preemption), Kubernetes
(``terminationGracePeriodSeconds``), spot and preemptible VMs all send SIGTERM (or a chosen signal)
and wait a grace period. A run turns the signals of ``run.stop_signals`` into a clean stop:

1. the handler only records the signal (it never interrupts a step, a save or a collective);
2. after each optimizer step every rank polls: one all-reduce of ``[signal, clock]`` (MAX), so a
   signal delivered to any one rank stops all of them after the same step;
3. the trainer writes a checkpoint of that step (atomic as always: a second signal during the save
   changes nothing), prints ``stopped by SIGTERM at step N; checkpoint written to ...; run the same
   command to resume`` and ``transrec`` exits with :data:`EXIT_STOPPED`.

An evaluation in progress when the signal comes is abandoned at its next batch (every rank at the
same one) and nothing of it is written; the resumed run evaluates that step again.

A peer that dies without warning (``kill -9``, a crash, a lost node) closes its connections: the
collective waiting on it fails on every surviving rank, and ``transrec`` turns that failure into
one line naming the lost rank (:func:`~transrec.engine.distributed.lost_peer`) and that the last
checkpoint is intact, with :data:`EXIT_PEER_LOST` (:class:`PeerLost`).

``run.ckpt_every_minutes`` rides on the same all-reduce: when any rank's clock says that many minutes
have passed since the last checkpoint (or since the run started or resumed), every rank saves after
the same step. ``run.ckpt_every`` (steps) still applies: whichever comes first saves.
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

from transrec.config.schema import stop_signal_numbers
from transrec.errors import UserError

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped on request, run the same command again to resume
EXIT_PEER_LOST = 69  # sysexits' EX_UNAVAILABLE: a peer rank is gone; the last checkpoint is intact


class EvaluationAbandoned(Exception):
    """An evaluation stopped part-way because the run was told to stop (nothing of it is kept)."""


class RunStopped(UserError):
    """The run stopped on a signal after writing a checkpoint; ``str()`` is the one line to print,
    ``result`` the :class:`~transrec.engine.trainer.TrainResult` so far."""

    exit_code = EXIT_STOPPED

    def __init__(self, line: str, signal_name: str, step: int, result=None):
        super().__init__(line)
        self.signal_name, self.step, self.result = signal_name, step, result


class PeerLost(UserError):
    """A collective failed because a peer rank is gone (its process died or its node was lost);
    ``str()`` is the one line to print."""

    exit_code = EXIT_PEER_LOST


def peer_lost_line(who: str, run_dir=None) -> str:
    """The one line a rank prints when ``who`` (``rank 1``, ``a peer rank ...``) is gone, naming the
    latest complete checkpoint of ``run_dir`` (None: a command of several runs)."""
    from transrec.engine.checkpoint import CheckpointManager  # lazy: checkpoint imports DeepSpeed

    if run_dir is None:
        kept = "every complete checkpoint is intact: run the same command to resume"
    else:
        ck = CheckpointManager(run_dir)
        tag = ck.latest()
        kept = (f"the last checkpoint, {ck.dir / tag}, is intact: run the same command to resume" if tag
                else "no checkpoint was written yet: the same command starts again")
    return f"lost {who} (its process ended or its node was lost); {kept}"


class StopControl:
    """The signal handlers of ``run.stop_signals`` and the checkpoint clock of one training run.

    Use as a context manager around the training loop (handlers installed in the main thread only,
    the previous ones restored on exit); :meth:`poll` after each step on every rank."""

    def __init__(self, stop_signals: str, ckpt_every_minutes: float = 0.0, *, device="cpu", world: int = 1):
        self.signals = stop_signal_numbers(stop_signals)
        self.seconds = float(ckpt_every_minutes) * 60.0
        self.device, self.world = device, int(world)
        self.received: list[int] = []
        self.stop_name: str | None = None  # the agreed signal, once a poll found one
        self._old: dict[int, object] = {}
        self.last_save = time.monotonic()

    # -- handlers -------------------------------------------------------------------------
    def _handle(self, signum, frame) -> None:
        self.received.append(int(signum))  # nothing else: a handler runs between bytecodes

    def __enter__(self) -> StopControl:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._handle)
        self.last_save = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        # After a stop the signals are ignored from here on: a process on its way out after saving
        # must not be killed by a repeated signal (the interpreter's shutdown resets Python handlers
        # to the default action, but keeps an ignored signal ignored), which would turn exit code 75
        # into a death by signal.
        for sig, old in self._old.items():
            signal.signal(sig, signal.SIG_IGN if self.received else old)
        self._old.clear()

    # -- polls ------------------------------------------------------------------------------
    def _agree(self, local: list[float]) -> list[float]:
        """The maximum of ``local`` over the ranks (one rank: ``local`` itself, no device round trip)."""
        if self.world <= 1:
            return local
        t = torch.tensor(local, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def _local_signal(self) -> float:
        """The first stop signal this rank received (its number), or 0."""
        return float(self.received[0]) if self.received else 0.0

    def _agreed_signal(self, sig: float) -> str | None:
        if sig:
            self.stop_name = signal.Signals(int(sig)).name
        return self.stop_name

    def poll(self) -> tuple[str | None, bool]:
        """(the signal every rank agrees to stop on, or None; whether a checkpoint is due by the
        clock). Collective when there are several ranks: every rank calls it after every step."""
        if not self.signals and self.seconds <= 0:  # nothing to watch (the same on every rank)
            return None, False
        due = 1.0 if self.seconds > 0 and time.monotonic() - self.last_save >= self.seconds else 0.0
        agreed_sig, agreed_due = self._agree([self._local_signal(), due])
        return self._agreed_signal(agreed_sig), bool(agreed_due)

    def stop_requested(self) -> bool:
        """Collective: True on every rank once any rank has received a stop signal (for loops such
        as an evaluation's, polled once per batch on every rank)."""
        if not self.signals:
            return False
        (agreed,) = self._agree([self._local_signal()])
        return self._agreed_signal(agreed) is not None

    def saved(self) -> None:
        """A checkpoint was just written: the clock starts again."""
        self.last_save = time.monotonic()


def stopped_line(name: str, step: int, where, *, abandoned: str = "") -> str:
    """The one line a stopped run prints."""
    extra = f" ({abandoned} abandoned)" if abandoned else ""
    return (f"stopped by {name} at step {step}{extra}; checkpoint written to {where}; run the same command "
            "to resume")
