"""Console output of a run whose streams go to files (nohup, a scheduler, CI): the result alone on
stdout, plain step and evaluation lines on stderr, no carriage-return frames of progress bars."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from transrec.engine.tracking import bars_enabled, eval_line, read_metrics, step_line

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
STEP = re.compile(r"^step (\d+)/6  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d  seq/s \d+\.\d  eta \d+:\d\d:\d\d$")
EVAL = re.compile(r"^eval (valid|test) step (\d+)  ndcg@10 \d\.\d{4}  hr@10 \d\.\d{4}  mrr \d\.\d{4}$")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_auto_shows_bars_only_on_a_terminal():
    assert bars_enabled("auto", _Tty()) and not bars_enabled("auto", io.StringIO())
    assert bars_enabled("on", io.StringIO()) and not bars_enabled("off", _Tty())
    assert bars_enabled(True, io.StringIO()) and not bars_enabled(False, _Tty())


def test_lines_name_skipped_rows_and_steps_only_when_there_are_some():
    line = step_line(40, 100, loss=3.25, lr=3e-3, seq_per_s=410.24, eta_s=65.4)
    assert line == "step 40/100  loss 3.2500  lr 3.00e-03  seq/s 410.2  eta 0:01:05"
    line = step_line(40, 100, loss=3.25, lr=3e-3, seq_per_s=0.0, eta_s=float("inf"), skipped_rows=7,
                     skipped_steps=2)
    assert line.endswith("eta ?  skipped rows 7  skipped steps 2")
    assert eval_line("valid", 50, {"ndcg@10": 0.07123, "hr@10": 0.14, "mrr": 0.05, "users": 9}) == \
        "eval valid step 50  ndcg@10 0.0712  hr@10 0.1400  mrr 0.0500"
    assert eval_line("test", 40, {"ndcg@10": 0.08, "hr@10": 0.15}, best=True) == \
        "eval test best step 40  ndcg@10 0.0800  hr@10 0.1500"


def _run(argv, tmp_path, name):
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.run([sys.executable, "-m", "transrec.cli", *argv], stdout=fo, stderr=fe,
                              stdin=subprocess.DEVNULL, cwd=ROOT, env=ENV, timeout=300)
    text_out, text_err = out.read_bytes().decode(), err.read_bytes().decode()  # as written: \r kept
    assert proc.returncode == 0, text_err[-3000:]
    return text_out, text_err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logs")
    _run(["shards", "synth", "--domain", "target", "--out", str(tmp / "data"), "--users", "60",
          "--items", "40", "--quiet"], tmp, "synth")
    return tmp / "data"


TRAIN = ["--preset", "tiny", "optim.steps=6", "run.log_every=2", "eval.every=4", "data.batch_size=8",
         "run.tensorboard=false"]


@pytest.mark.slow
def test_redirected_train_gives_the_result_on_stdout_and_plain_lines_on_stderr(data, tmp_path):
    out, err = _run(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TRAIN], tmp_path, "train")
    assert out.endswith("\n") and out.count("\n") == 1, out
    result = json.loads(out)
    assert result["run"] == str(tmp_path / "run") and result["step"] == 6
    assert {"valid_ndcg@10", "test_ndcg@10", "test_mrr"} <= set(result)
    assert "\r" not in err
    lines = err.splitlines()
    steps = [int(m.group(1)) for m in map(STEP.match, lines) if m]
    assert steps == [2, 4, 6], err
    evals = [(m.group(1), int(m.group(2))) for m in map(EVAL.match, lines) if m]
    assert evals == [("valid", 4), ("valid", 6), ("test", 6)], err
    final_test = next(ln for ln in lines if ln.startswith("eval test step 6"))
    assert f"ndcg@10 {result['test_ndcg@10']:.4f}" in final_test


@pytest.mark.slow
def test_an_early_stop_and_the_best_steps_evaluations_are_lines_on_stderr_naming_that_step(data, tmp_path):
    # weights that do not move (a learning rate of 1e-30; the ID model has no BatchNorm statistics
    # either): no validation improves on the first, so step 2 is the best and patience 1 stops at 4
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), *TRAIN, "model.kind=id", "optim.lr=1e-30",
            "eval.every=2", "run.patience=1"]
    out, err = _run(argv, tmp_path, "best")
    assert json.loads(out)["step"] == 4 and "early stop" not in out
    lines = err.splitlines()
    evals = [ln for ln in lines if ln.startswith("eval ")]
    assert [ln.split("  ")[0] for ln in evals] == [
        "eval valid step 2", "eval valid step 4", "eval test step 4", "eval valid best step 2",
        "eval test best step 2"], err
    ev = json.loads((run / "eval.json").read_text())
    assert ev["step"] == 4 and ev["best"]["step"] == 2
    assert [ln for ln in lines if ln.startswith("early stop")] == [
        f"early stop at step 4: valid/ndcg@10 did not improve for 1 evaluations (run.patience=1; "
        f"best {ev['best']['value']:.4f} at step 2)"]
    # each line carries the figures recorded for its step (metrics.jsonl, eval.json)
    records = [r for r in read_metrics(run) if r["kind"] in ("eval", "eval_best")]
    assert [(r["kind"], r["step"], r["split"]) for r in records] == [
        ("eval", 2, "valid"), ("eval", 4, "valid"), ("eval", 4, "test"), ("eval_best", 2, "valid"),
        ("eval_best", 2, "test")]
    assert evals == [eval_line(r["split"], r["step"], r, best=r["kind"] == "eval_best") for r in records]
    assert evals[-1] == eval_line("test", 2, ev["best"]["test"], best=True)


@pytest.mark.slow
def test_progress_on_draws_bars_even_into_a_file_and_off_is_honoured_by_transfer(data, tmp_path):
    out, err = _run(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TRAIN, "optim.steps=2",
                     "eval.every=0", "run.progress=on"], tmp_path, "bars")
    assert json.loads(out)["step"] == 2
    assert "\r" in err and not any(STEP.match(ln) for ln in err.splitlines())
    _run(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "export")], tmp_path, "export")
    out, err = _run(["transfer", "--pretrained", str(tmp_path / "export"), "--data", str(data), "--mode",
                     "full", "--out", str(tmp_path / "full"), "--steps", "2", "data.batch_size=8",
                     "run.log_every=1", "run.progress=off"], tmp_path, "transfer")
    assert out.startswith("| mode |") and "| full |" in out
    assert "\r" not in err
    assert re.search(r"^step 2/2  loss ", err, re.M) and re.search(r"^eval test step 2  ", err, re.M), err
