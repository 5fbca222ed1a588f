"""The README's "Python API" snippet runs as written, and every result it prints is one short line."""

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


def _snippet() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README: no python block under 'Python API'"
    return m.group(1)


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
    assert len(lines) == 5, lines
    assert lines[0].startswith("TrainResult(run='runs/api', step=30, loss=")
    assert lines[1].startswith("Metrics(test: hr@10=") and "users=400" in lines[1]
    assert lines[2].startswith("ExportInfo(") and "kind='full', step=30" in lines[2]
    assert lines[3].startswith("Recommendations([") and "5 in all" not in lines[3]
    assert lines[3].count(":") == 5 and lines[4].startswith("[") and len(lines[4].split()) == 2
    assert all(len(x) < 200 for x in lines), lines


def test_import_transrec_is_light():
    code = ("import sys, transrec; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert sorted(transrec.__all__) == "
            "['Recommender', 'build_config', 'evaluate', 'export', 'train']; "
            "print(transrec.build_config('tiny').preset)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "tiny", out.stderr
