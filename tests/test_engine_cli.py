"""Engine CLI: every subcommand has help with an example; bad input is one line and exit 2."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from transrec.cli import main
from transrec.shards.format import sha256_file

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "eval", "export", "transfer", "compare", "demo", "plot", "bench")


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


@pytest.mark.slow
def test_importing_the_engine_prints_nothing_on_stdout():
    """Commands print their results on stdout; loading DeepSpeed must not add a line there."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([sys.executable, "-c", "import transrec.engine.trainer"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == ""


def _corrupt_images(data: Path, share: float) -> int:
    """Overwrite the bytes of the first ``share`` of the image members inside the item shards (the
    manifest is then made to agree, as a tool that rewrote the shards would); the count corrupted."""
    m = json.loads((data / "manifest.json").read_text())
    images = [(e["name"], mem.name) for e in m["item_shards"]
              for mem in tarfile.open(data / e["name"]).getmembers() if mem.name.endswith((".jpg", ".png"))]
    bad = images[:max(1, int(len(images) * share))]
    for name in {n for n, _ in bad}:
        path = data / name
        blob = bytearray(path.read_bytes())
        with tarfile.open(path) as tf:
            for mem in tf.getmembers():
                if (name, mem.name) in bad:
                    blob[mem.offset_data:mem.offset_data + mem.size] = b"\x07" * mem.size
        path.write_bytes(bytes(blob))
    for e in m["item_shards"]:
        p = data / e["name"]
        e["bytes"], e["sha256"] = p.stat().st_size, sha256_file(p)
    (data / "manifest.json").write_text(json.dumps(m))
    return len(bad)


def _cli(argv):
    return subprocess.run([sys.executable, "-m", "transrec.cli", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_corrupt_images_stop_the_run_above_the_threshold_and_are_reported_below(tmp_path):
    data = tmp_path / "data"
    assert _cli(["shards", "synth", "--domain", "target", "--out", str(data), "--users", "40", "--items",
                 "40", "--quiet"]).returncode == 0
    n_bad = _corrupt_images(data, 0.45)
    n_items = json.loads((data / "manifest.json").read_text())["n_items"]
    train = ["train", "--data", str(data), "--preset", "tiny", "optim.steps=2", "run.log_every=1",
             "eval.every=0", "data.batch_size=8", "run.tensorboard=false", "run.progress=off"]
    stop = _cli([*train, "--out", str(tmp_path / "stop")])
    assert stop.returncode == 2, stop.stderr[-3000:]
    err = stop.stderr.strip().splitlines()[-1]
    assert err.startswith("transrec: error: ") and f"{n_bad / n_items:.1%} of items skipped" in err
    assert "corrupt_image" in err and "data.max_skip_rate=" in err
    assert json.loads((tmp_path / "stop" / "data.json").read_text())["items"]["skipped"] == n_bad

    ok = _cli([*train[:3], "--out", str(tmp_path / "ok"), *train[3:], "data.max_skip_rate=0.6"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"data: {n_bad} of {n_items} items skipped as bad input" in ok.stderr
    assert re.search(r"^step 1/2 .*skipped rows \d+", ok.stderr, re.M), ok.stderr[-3000:]
    report = json.loads((tmp_path / "ok" / "data.json").read_text())
    assert report["items"]["by_kind"]["corrupt_image"]["count"] == n_bad
    assert report["items"]["rate"] == pytest.approx(n_bad / n_items)
    seq = report["sequences"]
    assert seq["read"] == 16 and seq["by_kind"]["item_without_content"]["count"] > 0
    assert json.loads((tmp_path / "ok" / "eval.json").read_text())["data"]["items"]["skipped"] == n_bad
