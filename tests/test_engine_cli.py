"""Engine CLI: every subcommand has help with an example; bad input is one line and exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from transrec.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "eval", "export", "transfer", "compare", "demo", "plot")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_has_help_with_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"transrec {cmd}" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "x", "--out", "y", "optim.lrr=1"],
     "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["train", "--data", "x", "--out", "y", "--preset", "huge"], "unknown preset 'huge'"),
    (["eval", "--run", "/nonexistent/run"], "/nonexistent/run: not a run folder"),
    (["export", "--run", "/nonexistent/run", "--out", "/tmp/x"], "/nonexistent/run: not a run folder"),
    (["transfer", "--pretrained", "/nonexistent/e", "--data", "d", "--mode", "full", "--out", "o"],
     "/nonexistent/e: not an export folder"),
    (["plot", "/nonexistent/run"], "/nonexistent/run: no metrics.jsonl"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("transrec: error: ") and message in err and "\n" not in err


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "transrec.cli", "train", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "deepspeed --num_gpus 2" in proc.stdout


def test_importing_the_engine_prints_nothing_on_stdout():
    """Commands print their results on stdout; loading DeepSpeed must not add a line there."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([sys.executable, "-c", "import transrec.engine.trainer"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == ""
