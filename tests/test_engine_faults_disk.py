"""A real full disk under ``transrec train``: the run folder on a small tmpfs.

Each case mounts a tmpfs of a chosen size in a private mount namespace (``unshare -r -m``: as root,
or as any user where user namespaces are enabled) and runs the command line there, so the writes
meet a real ``ENOSPC``. Since the tmpfs vanishes with its namespace, the whole story of a case (the
failing run, freeing space, the rerun) is one shell script, which copies the run folder out after
each step for the checks. Where mounting is not permitted the cases are skipped, saying so; the
simulated failures of ``tests/test_engine_checkpoint_disk_full.py`` and ``tests/test_storage.py`` always
run.

Sizes: a checkpoint of this configuration (ZeRO-0, fp32) is about 21.5 MiB (measured below from a
run on an ordinary disk, so the sizes follow the model)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from transrec.config import build_config
from transrec.engine.checkpoint import TMP_PREFIX, CheckpointManager, tag_for
from transrec.engine.consolidate import consolidated_state_dict
from transrec.engine.data import open_data
from transrec.shards.synth import synthesize
from transrec.storage import EXIT_WRITE_FAILED

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--preset", "tiny", "optim.steps=6", "model.user.layers=1", "model.user.max_len=8", "data.max_len=8",
        "data.batch_size=16", "model.text.max_len=12", "optim.warmup_steps=2", "run.log_every=1",
        "run.progress=off", "run.tensorboard=false", "eval.every=0", "run.monitor=", "run.ckpt_every=2",
        "run.keep_last=2"]
MB = 1024 * 1024
SIZE = r"[\d.]+ (?:[KMGT]iB|B)"  # transrec.storage.human
FAILED = re.compile(rf"^transrec: error: saving checkpoint (step-\d+) in (\S+) failed: .+; (it needs about "
                    rf"{SIZE} \(the last one's size\)|{SIZE} were written before it failed), "
                    rf"{SIZE} free; nothing complete was changed$", re.M)
STOPPED_SHORT = re.compile(rf"^transrec: error: saving checkpoint (step-\d+) in (\S+) stopped before "
                           rf"writing: it needs about {SIZE} \(the last one's size\) and {SIZE} are free; "
                           r"free some space and run the same command again$", re.M)


def _can_mount(where: Path) -> str | None:
    """None when a tmpfs can be mounted in a private mount namespace, else why not."""
    if not shutil.which("unshare"):
        return "no unshare command"
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"],
                       capture_output=True, text=True, timeout=60)
    return None if p.returncode == 0 else f"mounting a tmpfs is not permitted ({p.stderr.strip()[:200]})"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(dataset with its item cache built, bytes of one checkpoint of this configuration)."""
    root = tmp_path_factory.mktemp("faults-disk")
    why = _can_mount(root / "probe")
    if why:
        pytest.skip(why)
    path = synthesize(root / "w", domain="source", n_users=160, n_items=64, seed=4, max_len=12)
    open_data(build_config("tiny", overrides=[f"data.path={path}", "model.text.max_len=12"]))  # item cache
    ref = root / "ref"
    p = subprocess.run(command(path, ref, "optim.steps=2"), capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = CheckpointManager(ref)
    size = ck.size(ck.latest())
    assert size and 10 * MB < size < 60 * MB, size  # the sizes below assume about 21.5 MiB
    return path, size


def command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "transrec.cli", "train", "--data", str(data), "--out", str(out), *ARGS,
            *extra]


def in_tmpfs(mnt: Path, size: int, script: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the shell ``script`` with a tmpfs of ``size`` bytes mounted at ``mnt`` (gone afterwards)."""
    mnt.mkdir(parents=True, exist_ok=True)
    full = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mnt))} || exit 90\n{script}"
    p = subprocess.run(["unshare", "-r", "-m", "sh", "-c", full], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert p.returncode != 90, f"mounting failed: {p.stderr}"
    return p


def run_step(name: str, cmd: list[str], log_dir: Path) -> str:
    """A script line running ``cmd``, its stderr to ``log_dir/NAME.err`` and exit code to ``NAME.rc``."""
    err, rc = shlex.quote(str(log_dir / f"{name}.err")), shlex.quote(str(log_dir / f"{name}.rc"))
    return f"OMP_NUM_THREADS=1 {shlex.join(cmd)} >/dev/null 2>{err}; echo $? >{rc}\n"


def copy_out(src: Path, dst: Path) -> str:
    return f"cp -a {shlex.quote(str(src))} {shlex.quote(str(dst))}\n"


def outcome(log_dir: Path, name: str) -> tuple[int, str]:
    return int((log_dir / f"{name}.rc").read_text()), (log_dir / f"{name}.err").read_text()


def no_temporaries(run: Path) -> None:
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]
    assert not leftovers, leftovers


def stopped_on_a_write(log_dir: Path, name: str, line: re.Pattern) -> tuple[re.Match, str]:
    """The run ``name`` stopped on a failed write: exit 74, no traceback, one error line, of the form
    ``line``; (its match, the stderr)."""
    code, err = outcome(log_dir, name)
    assert code == EXIT_WRITE_FAILED, err[-3000:]
    assert "Traceback" not in err and len([x for x in err.splitlines() if "error" in x.lower()]) == 1, err
    m = line.search(err)
    assert m, err[-2000:]
    return m, err


def resumed_from_step_2_and_finished(log_dir: Path, final: Path) -> None:
    """The rerun ``again`` resumed from step 2 and finished: step 6 the latest, no temporary left."""
    code, err = outcome(log_dir, "again")
    assert code == 0 and "resuming from step 2" in err, err[-3000:]
    assert CheckpointManager(final).latest() == tag_for(6)
    no_temporaries(final)


@pytest.mark.slow
def test_the_first_checkpoint_does_not_fit(world, tmp_path):
    """A disk too small for the first checkpoint (no earlier size to check against): the write itself
    fails, exit 74 with one line reporting the space free again once the temporary folder is gone,
    and no checkpoint is taken as latest."""
    data, size = world
    mnt = tmp_path / "mnt"
    cmd = command(data, mnt / "run")
    script = run_step("first", cmd, tmp_path) + copy_out(mnt / "run", tmp_path / "after")
    p = in_tmpfs(mnt, size // 3, script)
    assert p.returncode == 0, p.stderr
    m, err = stopped_on_a_write(tmp_path, "first", FAILED)
    assert m[1] == tag_for(2) and Path(m[2]) == mnt / "run" / "checkpoints", err[-2000:]
    assert ", 0 B free;" not in err  # the free space is reported once the temporary's is released
    no_temporaries(tmp_path / "after")
    assert CheckpointManager(tmp_path / "after").latest() is None


@pytest.mark.slow
def test_a_later_checkpoint_that_cannot_fit_stops_before_writing_and_the_rerun_resumes(world, tmp_path):
    """A disk for about 1.5 checkpoints: the first save fits, the second is refused by the check before
    writing (exit 74, one line), step 2 stays the latest and loads; with the disk made larger the same
    command resumes from step 2 and finishes."""
    data, size = world
    mnt = tmp_path / "mnt"
    cmd = command(data, mnt / "run")
    script = (run_step("short", cmd, tmp_path) + copy_out(mnt / "run", tmp_path / "after")
              + f"mount -o remount,size={4 * size} {shlex.quote(str(mnt))} || exit 91\n"
              + run_step("again", cmd, tmp_path) + copy_out(mnt / "run", tmp_path / "final"))
    p = in_tmpfs(mnt, size * 3 // 2, script)
    assert p.returncode == 0, p.stderr
    m, err = stopped_on_a_write(tmp_path, "short", STOPPED_SHORT)
    assert m[1] == tag_for(4) and Path(m[2]) == mnt / "run" / "checkpoints", err[-2000:]
    after = tmp_path / "after"
    no_temporaries(after)
    ck = CheckpointManager(after)
    assert ck.latest() == tag_for(2) and (ck.dir / "latest").read_text().strip() == tag_for(2)
    consolidated_state_dict(after)  # loadable
    resumed_from_step_2_and_finished(tmp_path, tmp_path / "final")


@pytest.mark.slow
def test_a_disk_that_fills_during_a_later_save(world, tmp_path):
    """Another writer fills the disk between the check before writing and the write (a filler file
    leaving half a checkpoint free, made by a hook the moment a later save's check has passed; the
    first save has no earlier size to check against and is written): the save of step 4 fails
    part-way on the real ENOSPC, exit 74 with one line, step 2 stays the latest and loads; once the
    filler is deleted the same command resumes from step 2 and finishes."""
    data, size = world
    mnt = tmp_path / "mnt"
    run, filler = mnt / "run", mnt / "filler"
    cmd = command(data, run)
    hooked = [sys.executable, "-c", FILL_AFTER_CHECK, str(filler), *cmd[3:]]  # cmd[3:]: train ...
    script = (run_step("full", hooked, tmp_path) + copy_out(run, tmp_path / "after")
              + f"rm {shlex.quote(str(filler))} || exit 92\n"
              + run_step("again", cmd, tmp_path) + copy_out(run, tmp_path / "final"))
    p = in_tmpfs(mnt, 4 * size, script)  # keep_last=2: two checkpoints and the one being written
    assert p.returncode == 0, p.stderr
    m, err = stopped_on_a_write(tmp_path, "full", FAILED)
    assert m[1] == tag_for(4) and Path(m[2]) == run / "checkpoints", err[-2000:]
    after = tmp_path / "after"
    no_temporaries(after)
    assert CheckpointManager(after).latest() == tag_for(2)
    consolidated_state_dict(after)
    resumed_from_step_2_and_finished(tmp_path, tmp_path / "final")


# ``transrec`` with a hook on the check before a checkpoint is written: once a later save's check has
# passed, a filler file (argv[1]) takes all but half a checkpoint of the free space, as another
# process writing to the same disk would.
FILL_AFTER_CHECK = """
import os, sys
import transrec.engine.checkpoint as C
from transrec.cli import main
filler, real = sys.argv.pop(1), C.space_short
def space_short(folder, needed):
    short = real(folder, needed)
    if needed and not short and not os.path.exists(filler):
        st = os.statvfs(folder)
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - needed // 2)
    return short
C.space_short = space_short
sys.exit(main(sys.argv[1:]))
"""
