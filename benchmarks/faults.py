"""Fault injection: does a run survive what a hostile user or a bad day does to it?

    .venv/bin/python benchmarks/faults.py                 # the whole matrix (about 25 minutes on 2 cores)
    .venv/bin/python benchmarks/faults.py --kills 3 --only kill,nan   # a smaller one
    .venv/bin/python benchmarks/faults.py --only sigterm,kill-rank --sigterms 2 --kill-ranks 2

Every case runs ``transrec train`` (tiny preset, one thread, on a small synthetic world) as a user
would, through the command line, and judges the outcome:

- ``kill``: ``kill -9`` at a random moment of a run that checkpoints every 3 steps (during steps,
  saves and the item-cache build alike), then the same command again. Survived: the rerun finishes;
  data lost: no checkpoint or an unreadable one; wrong result: the final weights differ from an
  uninterrupted run's (resume is meant to be exact).
- ``corrupt``: one kind of damage to a copy of the dataset. Survived: a clean exit 0 (damage within
  ``data.max_skip_rate``, skipped and counted) or a one-line error with exit 2 (no traceback); wrong
  result: exit 0 with non-finite or perfect metrics.
- ``nan``: ``optim.lr=1e6``. Survived: exit 3 with the last good checkpoint kept as ``latest``;
  wrong result: exit 0 (a diverged run reported as fine).
- ``writers``: two ``train`` processes into one run folder at once. Survived: the run folder ends
  with one run's config and a checkpoint that loads under it.
- ``crafted``: a pickle payload planted in a checkpoint file; ``train`` (resume), ``eval`` and
  ``export`` run on it. Survived: each refuses and the payload never runs.
- ``sigterm``: SIGTERM after a random step (seeded) to one random rank, ``--sigterms`` times for each
  of one rank, two ranks at ZeRO-0 and two ranks at ZeRO-2 (one process per rank with the launcher
  variables, as ``torchrun`` starts them). Survived: every rank exits 75, exactly one ``stopped by
  SIGTERM at step N; checkpoint written to ...`` line, the checkpoint of step N is the latest, and the
  same command again finishes; data lost: no loadable checkpoint; wrong result: the final weights
  differ (bit for bit) from an uninterrupted run's of the same configuration.
- ``diskfull``: the run folder on a small tmpfs (mounted in a private mount namespace, where that is
  permitted; else a writer that fails as a full disk does, said in the row): the first checkpoint
  does not fit; a later one does not fit (stopped by the check before writing); the disk fills while
  a later one is written. Survived: exit 74 with one line and no traceback, no temporary left, the
  previous checkpoint (if any) the latest and loadable, and with space freed the same command
  finishes (resuming from that checkpoint); wrong result: final weights other than an uninterrupted
  run's.
- ``sigterm-in-save``: SIGTERM after a random step, then SIGUSR1 and SIGTERM every 10 ms until the
  process is gone (so during the checkpoint's write). Survived: exit 75, one stop line, that
  checkpoint complete and the latest, and the same command resumes from it; wrong result: final
  weights other than an uninterrupted run's.
- ``kill-rank``: ``kill -9`` of one random rank of a 2-rank run (ZeRO-0 and ZeRO-2 in turn) after a
  random step. Survived: every other rank exits within 30 s (the seconds are printed); data lost:
  the checkpoint written before the kill does not load; wrong result: a surviving rank exits 0.

It prints a table (tried / survived / data lost / wrong result per case kind) and appends the rows
to ``benchmarks/results/faults.csv``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from bench_common import append_rows, stamp

from transrec.engine.checkpoint import TMP_PREFIX, CheckpointManager, tag_for, weights_only_loads
from transrec.engine.consolidate import consolidated_state_dict
from transrec.engine.distributed import free_port
from transrec.shards.synth import synthesize

RESULTS = Path(__file__).resolve().parent / "results" / "faults.csv"
ARGS = ["--preset", "tiny", "optim.steps=12", "run.ckpt_every=3", "run.log_every=3", "run.progress=off",
        "run.tensorboard=false", "eval.every=0", "data.batch_size=16"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


CLI = [sys.executable, "-m", "transrec.cli"]
INTERRUPTED: list[bool] = []
NOTES: list[str] = []
STEPS = 12  # optim.steps of ARGS
EXIT_WRITE_FAILED, EXIT_STOPPED = 74, 75
STOP_LINE = re.compile(r"stopped by (SIG\w+) at step (\d+); checkpoint written to (\S+); run the same "
                       r"command to resume")
WRITE_LINE = re.compile(r"^transrec: error: saving checkpoint step-\d+ in \S+ (failed: .+; .+ free; nothing "
                        r"complete was changed|stopped before writing: it needs about .+; free some space "
                        r"and run the same command again)$")
KINDS = ("kill", "corrupt", "nan", "writers", "crafted", "sigterm", "diskfull", "sigterm-in-save",
         "kill-rank")
SIGNAL_CONFIGS = {"one rank": (1, 0), "two ranks ZeRO-0": (2, 0), "two ranks ZeRO-2": (2, 2)}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [*CLI, "train", "--data", str(data), "--out", str(out), *ARGS, *extra]


def train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli(*train_cmd(data, out, *extra)[len(CLI):])


def one_line_error(p: subprocess.CompletedProcess) -> bool:
    return p.returncode in (2, 3) and "Traceback" not in p.stderr


def weights(run: Path) -> dict:
    return consolidated_state_dict(run)[0]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- cases

def case_kill(world: Path, tmp: Path, reference: dict, seed: int, duration: float) -> tuple[bool, bool, bool]:
    data = tmp / f"kill-data-{seed}"
    shutil.copytree(world, data, ignore=shutil.ignore_patterns(".cache") if seed % 3 == 0 else None)
    run = tmp / f"kill-{seed}"
    proc = subprocess.Popen(train_cmd(data, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV)
    time.sleep(random.Random(seed).uniform(0.1, 0.95) * duration)  # within the run's own span
    INTERRUPTED.append(proc.poll() is None)  # still running when killed (not already finished)
    proc.kill()
    proc.wait()
    again = train(data, run)
    if again.returncode != 0:
        return False, not (run / "checkpoints").exists(), False
    try:
        final = weights(run)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is the outcome being measured
        return False, True, False
    return True, False, not same_weights(final, reference)


def _edit_tar(path: Path, edit) -> None:
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read() if m.isfile() else None) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:
        for m, raw in edit(members):
            if raw is not None:
                m.size = len(raw)
                tf.addfile(m, fileobj=io.BytesIO(raw))


def _corrupt(data: Path, kind: str) -> None:
    items = sorted(data.glob("items-*.tar"))
    seqs = sorted(data.glob("seqs-*.tar"))
    if kind == "few-images":  # one image unreadable: within the threshold
        image = (".png", ".jpg")
        _edit_tar(items[0], lambda ms: [(m, b"not a png" if m.name.endswith(image) and i < 2 else r)
                                        for i, (m, r) in enumerate(ms)])
    elif kind == "many-images":  # every image of the first shards unreadable: above the threshold
        for p in items[: max(1, len(items) // 2)]:
            _edit_tar(p, lambda ms: [(m, b"\x89PNG broken" if m.name.endswith((".png", ".jpg")) else r)
                                     for m, r in ms])
    elif kind == "truncated-seqs":
        raw = seqs[0].read_bytes()
        seqs[0].write_bytes(raw[: len(raw) // 2])
    elif kind == "bad-json":
        _edit_tar(seqs[0], lambda ms: [(m, b"{not json" if m.name.endswith(".json") and i == 0 else r)
                                       for i, (m, r) in enumerate(ms)])
    elif kind == "missing-shard":
        items[-1].unlink()
    elif kind == "manifest-count":
        man = json.loads((data / "manifest.json").read_text())
        man["n_items"] = int(man["n_items"]) + 7
        (data / "manifest.json").write_text(json.dumps(man))
    elif kind == "empty-manifest":
        (data / "manifest.json").write_text("")
    elif kind == "garbage-items-tsv":
        (data / "items.tsv").write_text("garbage\n")
    elif kind == "zero-length-seqs":
        seqs[-1].write_bytes(b"")
    elif kind == "duplicate-users":
        _edit_tar(seqs[0], lambda ms: ms + ms[:2])
    else:
        raise ValueError(kind)


CORRUPTIONS = ("few-images", "many-images", "truncated-seqs", "bad-json", "missing-shard", "manifest-count",
               "empty-manifest", "garbage-items-tsv", "zero-length-seqs", "duplicate-users")


def case_corrupt(world: Path, tmp: Path, kind: str) -> tuple[bool, bool, bool]:
    data = tmp / f"corrupt-{kind}"
    shutil.copytree(world, data, ignore=shutil.ignore_patterns(".cache"))
    _corrupt(data, kind)
    run = tmp / f"corrupt-run-{kind}"
    p = train(data, run)
    if p.returncode == 0:
        ev = json.loads((run / "eval.json").read_text())
        values = [v for s in ("valid", "test") for k, v in ev[s].items() if k != "users"]
        perfect = all(v == 1.0 for v in values)
        finite = all(v == v and abs(v) != float("inf") for v in values)
        return True, False, perfect or not finite
    return one_line_error(p), False, False


def case_nan(world: Path, tmp: Path) -> tuple[bool, bool, bool]:
    run = tmp / "nan"
    p = train(world, run, "optim.lr=1e6", "optim.encoder_lr=1e6", "run.max_bad_steps=3")
    if p.returncode == 0:
        return False, False, True
    lost = CheckpointManager(run).latest() is None and (run / "checkpoints").exists()
    return p.returncode == 3 and "Traceback" not in p.stderr, lost, False


def case_writers(world: Path, tmp: Path) -> tuple[bool, bool, bool]:
    run = tmp / "writers"
    procs = [subprocess.Popen(train_cmd(world, run, *extra), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=ENV)
             for extra in (["model.dim=32"], ["model.dim=48", "model.user.heads=2"])]
    codes = sorted(p.wait(300) for p in procs)
    ok = cli("eval", "--run", str(run), "--progress", "off").returncode == 0
    survived = codes[0] == 0 and codes[1] in (0, 2) and ok
    return survived, False, not ok


def _plant(run: Path, name: str, marker: Path) -> bool:
    folder = CheckpointManager(run).dir / CheckpointManager(run).latest()
    f = folder / name
    if not f.is_file():
        return False
    with weights_only_loads(f):
        obj = torch.load(f, map_location="cpu", weights_only=True)

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    obj["extra"] = Payload()
    torch.save(obj, f)
    man = json.loads((folder / "manifest.json").read_text())
    man["files"][name] = f.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(man))
    return True


def case_crafted(world: Path, tmp: Path, name: str, stage: int) -> tuple[bool, bool, bool]:
    run = tmp / f"crafted-{stage}-{name.split('.')[0]}"
    first = train(world, run, f"deepspeed.zero_stage={stage}", "optim.steps=3")
    if first.returncode != 0:
        return False, False, False
    marker = tmp / f"marker-{run.name}"
    if not _plant(run, name, marker):
        return False, False, False
    outcomes = [train(world, run, f"deepspeed.zero_stage={stage}", "optim.steps=6"),
                cli("eval", "--run", str(run), "--progress", "off"),
                cli("export", "--run", str(run), "--out", str(tmp / f"exp-{run.name}"))]
    refused = all(p.returncode == 2 and "Traceback" not in p.stderr for p in outcomes)
    return refused and not marker.exists(), False, marker.exists()


# ----------------------------------------------------------------------------- signals and ranks

def start_ranks(cmd: list[str], world: int, log_dir: Path, tag: str) -> list[tuple[subprocess.Popen, Path]]:
    """``cmd`` once per rank with the launcher variables ``torchrun`` sets (one thread each), output
    to ``log_dir/TAG-rankR.log``."""
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), LOCAL_RANK=str(r),
                   WORLD_SIZE=str(world))
        log = log_dir / f"{tag}-rank{r}.log"
        with open(log, "w") as f:
            procs.append((subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), log))
    return procs


def wait_ranks(procs, timeout: float = 600) -> list[tuple[int | None, str]]:
    """[(exit code, log text)] per rank; a rank still running after ``timeout`` s is killed (None)."""
    out = []
    end = time.time() + timeout
    for p, log in procs:
        try:
            code = p.wait(timeout=max(end - time.time(), 1))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            code = None
        out.append((code, log.read_text()))
    return out


def wait_step(procs, step: int, timeout: float = 600) -> bool:
    """Until rank 0's log shows ``step N/`` with N >= ``step``; False when a rank ended first."""
    end, pat = time.time() + timeout, re.compile(r"^step (\d+)/", re.M)
    log = procs[0][1]
    while time.time() < end:
        done = [int(m) for m in pat.findall(log.read_text())]
        if done and max(done) >= step:
            return True
        if any(p.poll() is not None for p, _ in procs):
            return False
        time.sleep(0.02)
    return False


def signal_cmd(world_data: Path, run: Path, stage: int) -> list[str]:
    return train_cmd(world_data, run, f"deepspeed.zero_stage={stage}", "run.log_every=1")  # a line per step


REFERENCES: dict[tuple[int, int], dict] = {}


def reference(world_data: Path, tmp: Path, world: int, stage: int) -> dict:
    """The final weights of an uninterrupted run of the signal cases' configuration (one per config)."""
    if (world, stage) not in REFERENCES:
        run = tmp / f"reference-{world}-{stage}"
        res = wait_ranks(start_ranks(signal_cmd(world_data, run, stage), world, tmp, run.name))
        assert all(c == 0 for c, _ in res), f"the uninterrupted reference run failed:\n{res[0][1][-2000:]}"
        REFERENCES[(world, stage)] = weights(run)
    return REFERENCES[(world, stage)]


def _stopped_cleanly(res, run: Path, signals: tuple[str, ...]) -> int | None:
    """The step of the one stop line when every rank exited 75 without a traceback and the checkpoint
    it names is the latest and verifies; else None."""
    text = "".join(t for _, t in res)
    lines = STOP_LINE.findall(text)
    if [c for c, _ in res] != [EXIT_STOPPED] * len(res) or len(lines) != 1 or "Traceback" in text:
        return None
    name, step, where = lines[0][0], int(lines[0][1]), Path(lines[0][2])
    ck = CheckpointManager(run)
    ok = (name in signals and ck.latest() == tag_for(step) and where == ck.dir / tag_for(step)
          and ck._verify(tag_for(step), raise_error=False)
          and not any(p.name.startswith(TMP_PREFIX) for p in ck.dir.iterdir()))
    return step if ok else None


def _rerun_and_judge(cmd, world: int, tmp: Path, run: Path, step: int | None, ref: dict, tag: str,
                     stopped: bool) -> tuple[bool, bool, bool]:
    again = wait_ranks(start_ranks(cmd, world, tmp, tag))
    resumed = step is not None and f"resuming from step {step}" in again[0][1]
    if any(c != 0 for c, _ in again):
        return False, CheckpointManager(run).latest() is None, False
    try:
        final = weights(run)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is the outcome being measured
        return False, True, False
    return stopped and resumed, False, not same_weights(final, ref)


def case_sigterm(world_data: Path, tmp: Path, world: int, stage: int, seed: int) -> tuple[bool, bool, bool]:
    rng = random.Random(seed)
    target, victim = rng.randint(1, STEPS - 3), rng.randrange(world)
    ref = reference(world_data, tmp, world, stage)
    run = tmp / f"sigterm-{world}-{stage}-{seed}"
    cmd = signal_cmd(world_data, run, stage)
    procs = start_ranks(cmd, world, tmp, run.name)
    hit = wait_step(procs, target)
    INTERRUPTED_SIGNALS.append(hit)
    if hit:
        procs[victim][0].send_signal(signal.SIGTERM)
    step = _stopped_cleanly(wait_ranks(procs), run, ("SIGTERM",))
    return _rerun_and_judge(cmd, world, tmp, run, step, ref, run.name + "-again", step is not None)


def case_sigterm_in_save(world_data: Path, tmp: Path, seed: int) -> tuple[bool, bool, bool]:
    rng = random.Random(1000 + seed)
    target = rng.randint(1, STEPS - 3)
    ref = reference(world_data, tmp, 1, 0)
    run = tmp / f"in-save-{seed}"
    cmd = signal_cmd(world_data, run, 0)
    procs = start_ranks(cmd, 1, tmp, run.name)
    proc = procs[0][0]
    hit = wait_step(procs, target)
    INTERRUPTED_SIGNALS.append(hit)
    if hit:
        proc.send_signal(signal.SIGTERM)
        end = time.time() + 120
        while proc.poll() is None and time.time() < end:  # during the save and until the process is gone
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    break
            time.sleep(0.01)
    step = _stopped_cleanly(wait_ranks(procs), run, ("SIGTERM", "SIGUSR1"))
    return _rerun_and_judge(cmd, 1, tmp, run, step, ref, run.name + "-again", step is not None)


def case_kill_rank(world_data: Path, tmp: Path, stage: int, seed: int) -> tuple[bool, bool, bool]:
    rng = random.Random(2000 + seed)
    target, victim = rng.randint(4, STEPS - 3), rng.randrange(2)  # after step 3's checkpoint
    run = tmp / f"kill-rank-{stage}-{seed}"
    procs = start_ranks(signal_cmd(world_data, run, stage), 2, tmp, run.name)
    if not wait_step(procs, target):
        wait_ranks(procs, 60)
        NOTES.append(f"kill-rank {seed}: the run ended before step {target}")
        return False, False, False
    t = time.time()
    procs[victim][0].kill()
    others = [p for r, (p, _) in enumerate(procs) if r != victim]
    end = t + 120
    while any(p.poll() is None for p in others) and time.time() < end:
        time.sleep(0.05)
    seconds = time.time() - t
    codes = [p.poll() for p in others]
    for p, _ in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    KILL_RANK_SECONDS.append(seconds if None not in codes else float("inf"))
    ck = CheckpointManager(run)
    lost = ck.latest() is None or not ck._verify(ck.latest(), raise_error=False)
    if not lost:
        try:
            weights(run)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is the outcome being measured
            lost = True
    return None not in codes and seconds <= 30, lost, 0 in codes


INTERRUPTED_SIGNALS: list[bool] = []
KILL_RANK_SECONDS: list[float] = []


# ----------------------------------------------------------------------------- a full disk

def can_mount(where: Path) -> str | None:
    """None when a tmpfs can be mounted in a private mount namespace (``unshare -r -m``), else why."""
    if not shutil.which("unshare"):
        return "no unshare command"
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"],
                       capture_output=True, text=True, timeout=60)
    return None if p.returncode == 0 else (p.stderr.strip() or f"exit {p.returncode}")[:200]


# ``transrec`` with a hook on the check before a checkpoint is written (argv[1]: a filler file; argv[2]:
# "fill", or "fail-first" / "fail-later" for a simulated full disk): "fill" takes all but half a
# checkpoint of the free space once a later save's check has passed, as another process writing to the
# same disk would; "fail-*" makes torch.save write half its bytes and raise ENOSPC in the first save
# or in the second one.
HOOK = """
import errno, os, sys
import torch
import transrec.engine.checkpoint as C
from transrec.cli import main
filler, mode = sys.argv.pop(1), sys.argv.pop(1)
real_short, real_save, saves = C.space_short, torch.save, []
def space_short(folder, needed):
    short = real_short(folder, needed)
    if mode == "fill" and needed and not short and not os.path.exists(filler):
        st = os.statvfs(folder)
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - needed // 2)
    saves.append(1)
    return short
def save(obj, f, *a, **k):
    due = (mode == "fail-first" and len(saves) == 1) or (mode == "fail-later" and len(saves) == 2)
    if due and C.TMP_PREFIX in str(f):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as h:
            h.truncate(os.path.getsize(f) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *a, **k)
C.space_short, torch.save = space_short, save
sys.exit(main(sys.argv[1:]))
"""


def _judge_write_failure(code: int, err: str, after: Path, previous: int | None) -> bool:
    """Exit 74, one error line of the write-failure form, no traceback, no temporary left, and the
    previous checkpoint (step ``previous``, if any) still the latest and loadable."""
    errors = [x for x in err.splitlines() if "error" in x.lower()]
    ok = code == EXIT_WRITE_FAILED and "Traceback" not in err and len(errors) == 1 and bool(
        WRITE_LINE.match(errors[0]))
    ck = CheckpointManager(after)
    if ck.dir.is_dir() and any(p.name.startswith(TMP_PREFIX) for p in ck.dir.iterdir()):
        return False
    if previous is None:
        return ok and ck.latest() is None
    return ok and ck.latest() == tag_for(previous)


def case_diskfull(world_data: Path, tmp: Path, ref: dict, size: int, kind: str,
                  mount: bool) -> tuple[bool, bool, bool]:
    """``kind``: first (the first checkpoint does not fit), check (a later one does not fit: the check
    before writing stops it), fill (the disk fills while a later one is written); without ``mount``
    (a writer failing with ENOSPC): first, or later (the second save)."""
    case = tmp / f"diskfull-{kind}"
    case.mkdir()
    mnt = case / "mnt" if mount else case
    mnt.mkdir(exist_ok=True)
    run, filler = mnt / "run", mnt / "filler"
    cmd = train_cmd(world_data, run)

    def step(name: str, argv: list[str]) -> str:
        err, rc = shlex.quote(str(case / f"{name}.err")), shlex.quote(str(case / f"{name}.rc"))
        return f"OMP_NUM_THREADS=1 {shlex.join(argv)} >/dev/null 2>{err}; echo $? >{rc}\n"

    def hooked(mode: str, argv: list[str]) -> list[str]:
        return [sys.executable, "-c", HOOK, str(filler), mode, *argv[len(CLI):]]

    def out(name: str) -> str:
        return f"cp -a {shlex.quote(str(run))} {shlex.quote(str(case / name))}\n"

    q = shlex.quote(str(mnt))
    if mount:
        bigger = f"mount -o remount,size={5 * size} {q} || exit 91\n"
        if kind == "fill":
            tmpfs_bytes = 5 * size
            script = (step("full", hooked("fill", cmd)) + out("after") + f"rm {shlex.quote(str(filler))}\n"
                      + step("again", cmd))
        else:  # first / check: a disk for a third of a checkpoint / for one and a half, then made larger
            tmpfs_bytes = size // 3 if kind == "first" else size * 3 // 2
            script = step("full", cmd) + out("after") + bigger + step("again", cmd)
        script = f"mount -t tmpfs -o size={tmpfs_bytes} tmpfs {q} || exit 90\n{script}{out('final')}"
        p = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True,
                           timeout=1800)
    else:
        mode = "fail-first" if kind == "first" else "fail-later"
        script = (step("full", hooked(mode, cmd)) + out("after") + step("again", cmd) + out("final"))
        p = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        NOTES.append(f"diskfull {kind}: the script failed ({p.returncode}): {p.stderr.strip()[-300:]}")
        return False, False, False
    code, err = int((case / "full.rc").read_text()), (case / "full.err").read_text()
    previous = None if kind == "first" else 3
    survived = _judge_write_failure(code, err, case / "after", previous)
    lost = False
    if previous is not None:
        try:
            consolidated_state_dict(case / "after")
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is the outcome being measured
            lost = True
    again_code, again = int((case / "again.rc").read_text()), (case / "again.err").read_text()
    if again_code != 0:
        return False, lost, False
    if previous is not None and f"resuming from step {previous}" not in again:
        survived = False
    return survived and not lost, lost, not same_weights(weights(case / "final"), ref)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--sigterms", type=int, default=10, help="SIGTERMs per configuration (default 10)")
    ap.add_argument("--in-save", type=int, default=5, help="sigterm-in-save cases (default 5)")
    ap.add_argument("--kill-ranks", type=int, default=4, help="kill-rank cases (default 4)")
    ap.add_argument("--only", default=",".join(KINDS), help="case kinds, comma-separated (default: all)")
    ap.add_argument("--results", default=str(RESULTS), help="the CSV the rows are appended to")
    ap.add_argument("--no-tmpfs", action="store_true",
                    help="diskfull: a writer failing with ENOSPC even where a tmpfs can be mounted")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - set(KINDS)
    if unknown:
        ap.error(f"--only: unknown case kind {sorted(unknown)[0]!r}")
    tmp = Path(tempfile.mkdtemp(prefix="transrec-faults-"))
    t0 = time.time()
    world = synthesize(tmp / "world", domain="source", n_users=160, n_items=80, seed=1, shard_size=20,
                       seq_shard_size=40)
    rows: dict[str, list[tuple[bool, bool, bool]]] = {}
    seconds: dict[str, float] = {}
    if {"kill", "diskfull"} & only:
        ref_run = tmp / "reference"
        t = time.time()
        assert train(world, ref_run).returncode == 0, "the uninterrupted reference run failed"
        duration = time.time() - t
        reference = weights(ref_run)
        ck = CheckpointManager(ref_run)
        ckpt_size = ck.size(ck.latest())
    if "kill" in only:
        rows["kill -9, then rerun"] = [case_kill(world, tmp, reference, seed, duration)
                                       for seed in range(args.kills)]
    if "corrupt" in only:
        rows["corrupted dataset"] = [case_corrupt(world, tmp, k) for k in CORRUPTIONS]
    if "nan" in only:
        rows["NaN from step 3"] = [case_nan(world, tmp)]
    if "writers" in only:
        rows["two writers, one folder"] = [case_writers(world, tmp)]
    if "crafted" in only:
        rows["crafted checkpoint"] = [case_crafted(world, tmp, name, stage) for stage, name in
                                      ((0, "mp_rank_00_model_states.pt"),
                                       (1, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                       (0, "rng-rank00000.pt"))]
    if "sigterm" in only:
        for label, (nranks, stage) in SIGNAL_CONFIGS.items():
            t = time.time()
            rows[f"SIGTERM, {label}, then rerun"] = [case_sigterm(world, tmp, nranks, stage, seed)
                                                     for seed in range(args.sigterms)]
            seconds[f"SIGTERM, {label}, then rerun"] = time.time() - t
    if "diskfull" in only:
        t = time.time()
        why = "--no-tmpfs" if args.no_tmpfs else can_mount(tmp / "probe")
        if why is None:
            name = "full disk (tmpfs): at the first save, at a later one, filling during one; then rerun"
        else:
            NOTES.append(f"diskfull: no tmpfs ({why}); simulated by a writer failing with ENOSPC")
            name = "full disk (simulated by a failing writer): at the first save, at a later one; then rerun"
        kinds = ("first", "check", "fill") if why is None else ("first", "later")
        rows[name] = [case_diskfull(world, tmp, reference, ckpt_size, kind, why is None) for kind in kinds]
        seconds[name] = time.time() - t
    if "sigterm-in-save" in only:
        t = time.time()
        name = "SIGTERM, then SIGUSR1 and SIGTERM during the save; then rerun"
        rows[name] = [case_sigterm_in_save(world, tmp, seed) for seed in range(args.in_save)]
        seconds[name] = time.time() - t
    if "kill-rank" in only:
        t = time.time()
        name = "kill -9 of one rank of two (ZeRO-0, ZeRO-2): the other exits within 30 s"
        rows[name] = [case_kill_rank(world, tmp, (0, 2)[seed % 2], seed) for seed in range(args.kill_ranks)]
        seconds[name] = time.time() - t
        if KILL_RANK_SECONDS:
            NOTES.append("kill-rank: the other rank exited after "
                         + ", ".join(f"{s:.1f}" for s in KILL_RANK_SECONDS)
                         + f" s (most {max(KILL_RANK_SECONDS):.1f} s)")
    print(f"\nfault injection, tiny preset, {stamp()['machine']}, {time.time() - t0:.0f} s\n")
    print("| fault | tried | survived | data lost | wrong result |\n|---|---|---|---|---|")
    out = []
    for name, res in rows.items():
        tried, surv = len(res), sum(r[0] for r in res)
        lost, wrong = sum(r[1] for r in res), sum(r[2] for r in res)
        print(f"| {name} | {tried} | {surv} | {lost} | {wrong} |")
        out.append({**stamp(), "fault": name,
                    "tried": tried, "survived": surv, "data_lost": lost, "wrong_result": wrong,
                    "seconds": round(seconds[name]) if name in seconds else ""})
    if INTERRUPTED:
        print(f"\nkills that hit a running process: {sum(INTERRUPTED)} of {len(INTERRUPTED)}")
    if INTERRUPTED_SIGNALS:
        print(f"signals that hit a running step: {sum(INTERRUPTED_SIGNALS)} of {len(INTERRUPTED_SIGNALS)}")
    for name, secs in seconds.items():
        print(f"{name}: {secs:.0f} s")
    for note in NOTES:
        print(note)
    append_rows(args.results, out)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(all(r[0] and not r[1] and not r[2] for r in res) for res in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
