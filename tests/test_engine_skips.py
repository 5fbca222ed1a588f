"""Skipped input is counted per loader: the training loaders' drops make the training skip rate that
``data.max_skip_rate`` limits; evaluation reads are reported in ``data.json`` beside it, never
counted against it."""

from __future__ import annotations

import json
import tarfile

import pytest

from transrec.config import build_config
from transrec.engine.skips import LoaderSkips
from transrec.engine.trainer import Trainer
from transrec.shards.dataset import Dataset
from transrec.shards.stats import SkipStats
from transrec.shards.synth import synthesize

pytestmark = pytest.mark.usefixtures("inprocess_group")  # see conftest

COMMON = ["model.user.layers=1", "model.user.max_len=8", "data.max_len=8", "model.text.max_len=12",
          "data.batch_size=8", "data.num_workers=0", "optim.warmup_steps=0", "run.progress=off",
          "run.tensorboard=false", "run.monitor=", "optim.steps=4", "eval.every=1", "run.log_every=1"]
N_BAD = 6  # corrupt sequences: 10% of the users, above the default data.max_skip_rate of 0.05


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("skips")
    return synthesize(root / "d", domain="source", n_users=60, n_items=30, seed=5, min_len=4, max_len=10)


def corrupt_sequences(path, n: int) -> list[str]:
    """Overwrite the JSON of the first ``n`` sequences in place (sizes unchanged); their keys."""
    done: list[str] = []
    for shard in Dataset.open(path).seq_shards:
        with tarfile.open(shard.path) as tf:
            spots = [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.name.endswith(".json")]
        with open(shard.path, "r+b") as f:
            for name, offset, size in spots[:n - len(done)]:
                f.seek(offset)
                f.write(b"!" * size)
                done.append(name)
        if len(done) == n:
            return done
    raise AssertionError(f"{path}: fewer than {n} sequences")


def test_loader_skips_add_up_the_loaders_of_a_split_and_check_the_rate():
    class Loader:
        def __init__(self):
            self.stats = SkipStats()

    skips, first, second = LoaderSkips("train"), Loader(), Loader()
    assert skips.follow(first) is first
    first.stats.add({"corrupt_sequence": 2, "unknown_item": 5})
    skips.follow(second)
    second.stats.add({"corrupt_sequence": 1})
    skips.rows(97)
    assert skips.counts == {"corrupt_sequence": 3, "unknown_item": 5} and skips.total == 8
    assert skips.reads == 2 and skips.dropped == 3 and skips.rate == pytest.approx(0.03)
    assert skips.violation(0.05) is None
    line = skips.violation(0.02)
    assert line.startswith("3.0% of sequences skipped as bad input (3 of 100; mostly corrupt_sequence: 3)")
    assert skips.reported() == {"reads": 2, "skipped": 3, "by_kind": {"corrupt_sequence": {"count": 3},
                                                                      "unknown_item": {"count": 5}}}
    windows = LoaderSkips("train", rows_per_sequence=4.0)
    windows.rows(8)
    assert windows.sequences_read == 2.0


def test_corrupt_rows_that_only_evaluation_reads_leave_the_training_skip_rate_alone(data, tmp_path, capsys):
    """The shards go bad after the training loader has read its epoch (one pass fills its shuffle
    buffer before the first batch): every evaluation from then on meets the corrupt rows, training
    does not. Counted together, four evaluations' drops would be 10-30% of the sequences trained on
    and stop the run at its second step."""
    run = tmp_path / "r"
    tr = Trainer(build_config("tiny", overrides=[f"data.path={data}", f"run.out={run}", *COMMON]), show=False)
    bad: list[str] = []
    tr.after_step.append(lambda t, step: bad.extend(corrupt_sequences(data, N_BAD)) if step == 1 else None)
    try:
        res = tr.fit()
        assert tr.skips.train.total == 0 and tr.skips.train.rate == 0.0
    finally:
        tr.close()
    assert res.step == 4 and len(bad) == N_BAD
    err = capsys.readouterr().err
    assert "skipped rows" not in err  # the step lines count the training loaders' skips only
    report = json.loads((run / "data.json").read_text())
    assert report["sequences"]["skipped"] == 0 and report["sequences"]["rate"] == 0.0
    assert report["sequences"]["read"] == 4 * 8
    # valid at steps 1, 2, 3 and in the final evaluation; test in the final evaluation
    assert report["evaluation"] == {
        "valid": {"reads": 4, "skipped": 4 * N_BAD, "by_kind": {"corrupt_sequence": {"count": 4 * N_BAD}}},
        "test": {"reads": 1, "skipped": N_BAD, "by_kind": {"corrupt_sequence": {"count": N_BAD}}}}
    assert json.loads((run / "eval.json").read_text())["data"] == report
