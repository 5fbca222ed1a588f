"""The README's examples run as written: the "Python API" snippet, each printed line checked against
the output its comment shows, and the command-line walk-through with "Recommending new items"."""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from transrec.shards.synth import synthesize

README = Path(__file__).resolve().parents[1] / "README.md"
ITEM_ID = re.compile(r"\b(?:t-i\d{6}|new-mug)\b")  # the pool's ids: the target world's and the new item
NUMBER = re.compile(r"-?\d+\.\d*(?:e[+-]?\d+)?")  # a figure with a decimal point (a score, a loss)


def _section(heading: str) -> str:
    return README.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _block(heading: str, lang: str) -> str:
    m = re.search(rf"```{lang}\n(.*?)```", _section(heading), re.S)
    assert m, f"README: no {lang} block under {heading!r}"
    return m.group(1)


def _snippet() -> str:
    return _block("Python API", "python")


def shown_outputs(snippet: str) -> list[str]:
    """What each ``print`` of the snippet is shown to print: the comment ending its line or, where
    there is none, the comment line right below it."""
    lines = snippet.splitlines()
    shown = []
    for i, line in enumerate(lines):
        if not line.startswith("print("):
            continue
        m = re.match(r"^print\(.*\)\s+# (.*)$", line)
        below = lines[i + 1] if i + 1 < len(lines) else ""
        assert m or below.startswith("# "), f"README: no output shown for {line!r}"
        shown.append(m.group(1) if m else below[2:])
    return shown


def shape(text: str) -> str:
    """``text`` with item ids and figures generalised (they vary from run to run), spacing normalised."""
    text = NUMBER.sub("#", ITEM_ID.sub("ID", text))
    return re.sub(r"\[ | \]", lambda m: m.group(0).strip(), re.sub(r"\s+", " ", text.strip()))


def same_shape(shown: str, printed: str) -> bool:
    """Whether ``printed`` has the shape of the README's ``shown`` (where ``...`` stands for anything)."""
    pattern = ".+?".join(re.escape(part) for part in shape(shown).split("..."))
    return re.fullmatch(pattern, shape(printed)) is not None


def test_shape_tells_real_outputs_apart():
    five = ("Recommendations([t-i000066:0.792, t-i000252:0.792, t-i000240:0.784, t-i000132:0.783, "
            "t-i000261:0.779])")
    assert same_shape("Recommendations([t-i000066:0.792, new-mug:0.701])",
                      "Recommendations([new-mug:0.9, t-i000001:0.1])")
    assert not same_shape("Recommendations([t-i000066:0.792, t-i000002:0.7])",
                          "Recommendations([t-i000066:0.792])")
    assert not same_shape("Recommendations([t-i000123:0.812, ... 5 in all])", five)
    assert same_shape(five, five.replace("t-i000240", "new-mug"))
    assert same_shape("[0.70531046 0.76196206]", "[-0.0123  0.5   ]")
    metrics = "Metrics(test: hr@10=... users=400)"
    assert same_shape(metrics, "Metrics(test: hr@10=0.0300 ndcg@10=0.0150 users=400)")
    assert not same_shape(metrics, "Metrics(test: hr@10=0.0300 users=300)")


@pytest.mark.slow
@pytest.mark.usefixtures("inprocess_group")  # the snippet trains in this process; see conftest
def test_readme_python_api_snippet_runs(tmp_path):
    synthesize(tmp_path / "data" / "target", domain="target")  # `transrec shards synth --domain target`
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(_snippet(), str(README), "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    # what training logs to stdout comes before the snippet's first print
    lines = out.getvalue().strip().splitlines()
    lines = lines[next((i for i, x in enumerate(lines) if x.startswith("TrainResult(")), 0):]
    shown = shown_outputs(_snippet())
    assert len(lines) == len(shown), lines
    for want, got in zip(shown, lines):
        assert same_shape(want, got), f"README shows {want!r}, the snippet printed {got!r}"
    assert all(len(x) < 200 for x in lines), lines


@pytest.mark.slow
def test_readme_command_line_walk_through_runs(tmp_path):
    """"Three ways in", step 2, as written, then "Recommending new items" on what it made: its
    ``demo_out/pretrained`` and ``demo_out/data/target`` (which ``make demo`` writes) are the
    walk-through's export of the source-pretrained model and its target world."""
    bin_dir = tmp_path / ".venv" / "bin"  # `transrec` on PATH and `.venv/bin/transrec`: this interpreter's
    bin_dir.mkdir(parents=True)
    (bin_dir / "transrec").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m transrec.cli "$@"\n')
    (bin_dir / "transrec").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}

    def sh(script: str) -> str:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, script + proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    steps = _block("Three ways in", "bash")
    out = sh(steps)
    assert "| scratch |" in out and "| full |" in out and "| id-sasrec |" in out, out[-3000:]
    (tmp_path / "demo_out" / "data").mkdir(parents=True)
    (tmp_path / "demo_out" / "pretrained").symlink_to(tmp_path / "exports" / "pre")
    (tmp_path / "demo_out" / "data" / "target").symlink_to(tmp_path / "data" / "target")
    top = sh(_block("Recommending new items", "bash")).strip().splitlines()
    assert top[0] == "user,rank,item,score" and len(top) == 11, top  # --k 10 for one history
    assert all(ITEM_ID.search(line) for line in top[1:]), top


def test_import_transrec_is_light():
    code = ("import sys, transrec; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert sorted(transrec.__all__) == "
            "['Recommender', 'build_config', 'evaluate', 'export', 'train']; "
            "print(transrec.build_config('tiny').preset)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "tiny", out.stderr
