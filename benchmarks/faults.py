"""Fault injection: does a run survive what a hostile user or a bad day does to it?

    .venv/bin/python benchmarks/faults.py                 # the whole matrix (a few minutes on 2 cores)
    .venv/bin/python benchmarks/faults.py --kills 3 --only kill,nan   # a smaller one

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

It prints a table (tried / survived / data lost / wrong result per case kind) and appends the rows
to ``benchmarks/results/faults.csv``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from bench_common import append_rows, cpu_name, git_sha

from transrec.engine.checkpoint import CheckpointManager, weights_only_loads
from transrec.engine.export import consolidated_state_dict
from transrec.shards.synth import synthesize

RESULTS = Path(__file__).resolve().parent / "results" / "faults.csv"
ARGS = ["--preset", "tiny", "optim.steps=12", "run.ckpt_every=3", "run.log_every=3", "run.progress=off",
        "run.tensorboard=false", "eval.every=0", "data.batch_size=16"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


CLI = [sys.executable, "-m", "transrec.cli"]
INTERRUPTED: list[bool] = []


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


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--only", default="kill,corrupt,nan,writers,crafted")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="transrec-faults-"))
    t0 = time.time()
    world = synthesize(tmp / "world", domain="source", n_users=160, n_items=80, seed=1, shard_size=20,
                       seq_shard_size=40)
    rows: dict[str, list[tuple[bool, bool, bool]]] = {}
    if "kill" in only:
        ref_run = tmp / "reference"
        t = time.time()
        assert train(world, ref_run).returncode == 0, "the uninterrupted reference run failed"
        duration = time.time() - t
        reference = weights(ref_run)
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
    print(f"\nfault injection, tiny preset, {cpu_name()}, {time.time() - t0:.0f} s\n")
    print("| fault | tried | survived | data lost | wrong result |\n|---|---|---|---|---|")
    out = []
    for name, res in rows.items():
        tried, surv = len(res), sum(r[0] for r in res)
        lost, wrong = sum(r[1] for r in res), sum(r[2] for r in res)
        print(f"| {name} | {tried} | {surv} | {lost} | {wrong} |")
        out.append({"date": time.strftime("%Y-%m-%d"), "machine": cpu_name(), "git": git_sha(), "fault": name,
                    "tried": tried, "survived": surv, "data_lost": lost, "wrong_result": wrong})
    if INTERRUPTED:
        print(f"\nkills that hit a running process: {sum(INTERRUPTED)} of {len(INTERRUPTED)}")
    append_rows(RESULTS, out)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(all(r[0] and not r[1] and not r[2] for r in res) for res in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
