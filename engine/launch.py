"""``transrec launch``: torchrun for the training commands, ending with transrec's line and exit code.

::

    transrec launch [torchrun options] -- train --data D --out R [key=value ...]

runs ``python -m transrec.cli train ...`` on every rank through torchrun's own agent
(``torch.distributed.run`` in this process: the same options, rendezvous and rank environment).
What differs from ``torchrun`` is what a scheduler and a person reading the log see:

- SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 sent to the launcher are passed on to every rank, ranks that
  start later included, and the launcher waits for them. Ranks whose ``run.stop_signals`` hold the
  signal stop after one step, write a checkpoint, print the one line and exit 75; the launcher then
  exits 75 too, with no traceback of its own (``torchrun`` exits 1 after a SignalException).
- A rank killed outright (``kill -9``, the out-of-memory killer) ends the launch with one line naming
  it and exit 69; the surviving ranks say which peer they lost and exit 69 as well.
- Otherwise the launcher exits with the ranks' own code: 0, or that of the first rank that failed
  (which printed its own line, or its traceback for a crash).

The launcher never restarts ranks (``--max-restarts`` stays 0): a stopped or failed run is the
scheduler's to requeue, and the same command resumes from the latest checkpoint, on any number of
ranks. torchrun's own log lines are left out unless ``LOGLEVEL`` is set (``LOGLEVEL=INFO`` shows
them all). SIGHUP and SIGQUIT keep torchrun's handling: the ranks are sent the signal and the
launcher exits 128 + its number.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass

import psutil
import torch.distributed.run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from transrec.engine.preempt import EXIT_PEER_LOST, EXIT_STOPPED
from transrec.errors import UserError

COMMANDS = ("train", "transfer", "compare")  # the commands that run on several ranks
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
USAGE = "transrec launch [torchrun options] -- train|transfer|compare ARGS..."


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the transrec command and its arguments): split at the first ``--``, or
    the command itself when no option comes before it. UserError naming what is missing."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        opts, command = argv[:i], argv[i + 1:]
    elif argv and argv[0] in COMMANDS:
        opts, command = [], argv
    else:
        raise UserError(f"launch: put `--` between torchrun's options and the command: {USAGE}")
    if not command:
        raise UserError(f"launch: no command after `--`: {USAGE}")
    if command[0] not in COMMANDS:
        raise UserError(f"launch: {command[0]!r} is not a command that runs on several ranks "
                        f"(one of {', '.join(COMMANDS)}): {USAGE}")
    return opts, command


def torchrun_args(opts: list[str], command: list[str]):
    """torchrun's parsed arguments for ``python -m transrec.cli COMMAND ...``; UserError for the
    options the launcher does not take."""
    parser = torchrun.get_args_parser()
    parser.prog = "transrec launch"
    args = parser.parse_args([*opts, "--module", "transrec.cli", *command])
    if args.max_restarts:
        raise UserError(f"launch: --max-restarts {args.max_restarts}: transrec launch does not restart "
                        "ranks; a stopped or failed run ends the launch, and the same command resumes it")
    if args.no_python or args.run_path:
        raise UserError("launch: --no-python and --run-path do not apply: the launcher runs "
                        "`python -m transrec.cli` on every rank")
    names = {s.name for s in FORWARDED}
    theirs = [s.strip() for s in args.signals_to_handle.split(",") if s.strip() and s.strip() not in names]
    args.signals_to_handle = ",".join(theirs) or "SIGHUP"  # torchrun registers handlers for these only
    return args


class Forwarder:
    """While open (in the main thread): each signal of :data:`FORWARDED` is recorded and sent to every
    child process (the ranks), now and, for ranks that start later, within half a second."""

    def __init__(self, signals=FORWARDED, every: float = 0.5):
        self.signals, self.every = tuple(signals), every
        self.received: list[int] = []
        self._sent: set[tuple[int, int]] = set()  # (pid, signal) already forwarded
        self._old: dict[int, object] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="transrec-launch-signals", daemon=True)

    def _handle(self, signum, frame) -> None:
        self.received.append(int(signum))
        self.forward()

    def forward(self) -> None:
        with self._lock:
            try:
                children = psutil.Process().children()
            except psutil.Error:
                return
            for sig in list(self.received):
                for child in children:
                    if (child.pid, sig) in self._sent:
                        continue
                    self._sent.add((child.pid, sig))
                    try:
                        child.send_signal(sig)
                    except psutil.Error:
                        pass

    def _watch(self) -> None:
        while not self._done.wait(self.every):
            if self.received:
                self.forward()

    def __enter__(self) -> Forwarder:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._handle)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


@dataclass
class Failure:
    """A rank that exited with a code other than 0 (``code`` < 0: killed by signal ``-code``)."""

    rank: int
    code: int
    pid: int = -1
    time: float = 0.0


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in sorted(ranks))


def outcome(failures: list[Failure], received: list[int]) -> tuple[int, str | None]:
    """(the launcher's exit code, the line it prints or None when the ranks said it themselves) from
    the ranks that failed and the signals the launcher passed on."""
    if not failures:
        return 0, None
    killed = [f for f in failures if f.code < 0]
    by_us = [f for f in killed if -f.code in received]
    if received and all(f.code == EXIT_STOPPED or f in by_us for f in failures):
        if not by_us:
            return EXIT_STOPPED, None  # rank 0 printed the stop line
        name = signal.Signals(received[0]).name
        who = _ranks([f.rank for f in by_us])
        return EXIT_STOPPED, (f"stopped by {name} before {who} could stop at a step (still starting up);"
                              " the latest checkpoint is intact: run the same command to resume")
    lost = [f for f in killed if f not in by_us]
    if lost:
        first = min(lost, key=lambda f: f.time)
        how = _signal_name(first.code)
        return EXIT_PEER_LOST, (f"rank {first.rank} (pid {first.pid}) was killed by {how}; the other "
                                "ranks stopped; the last checkpoint is intact: run the same command to "
                                "resume")
    first = min(failures, key=lambda f: f.time)
    return first.code, None


def launch(argv: list[str]) -> int:
    """``transrec launch``: run the command on every rank with torchrun's agent; the exit code."""
    opts, command = split_argv(argv)
    args = torchrun_args(opts, command)
    quiet = not os.environ.get("LOGLEVEL")
    if quiet:  # torchrun's agent logs each rank's exit; the ranks and the launcher say it in one line
        logging.disable(logging.ERROR)
    failures: list[Failure] = []
    try:
        with Forwarder() as fwd:
            try:
                torchrun.run(args)
            except ChildFailedError as exc:
                failures = [Failure(int(r), int(f.exitcode), int(f.pid), float(f.timestamp))
                            for r, f in exc.failures.items()]
            except SignalException as exc:  # a signal torchrun handles itself (SIGHUP, SIGQUIT)
                print(f"transrec: launch ended by {exc.sigval.name}; the ranks were sent it", file=sys.stderr,
                      flush=True)
                return 128 + int(exc.sigval)
    finally:
        if quiet:
            logging.disable(logging.NOTSET)
    code, line = outcome(failures, fwd.received)
    if line:
        print(f"transrec: {'error: ' if code != EXIT_STOPPED else ''}{line}", file=sys.stderr, flush=True)
    return code
