"""A static checker follows every ``transrec.*`` import in the tree. ``transrec/engine``,
``transrec/inference``, ``transrec/kernels``, ``transrec/models`` and ``transrec/shards`` are
symlinks to the folders at the top, so the tree is the package layout: basedpyright (the dev extra),
given nothing but pyproject.toml, resolves what the import statements name, as an IDE's
go-to-definition does."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from transrec._toplevel import PACKAGES

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = (*PACKAGES, "transrec", "tests", "benchmarks")
# what basedpyright says of an import it cannot follow: the module (reportMissingImports), a name
# in it (reportAttributeAccessIssue, "... is unknown import symbol")
IMPORT_RULES = ("reportMissingImports", "reportMissingModuleSource", "reportAttributeAccessIssue")


def _transrec_import_lines(path: Path) -> set[int]:
    """The lines (1-based) of every import statement in ``path`` that names a transrec module."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name == "transrec" or name.startswith("transrec.") for name in names):
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def unresolved_transrec_imports(report: dict) -> list[str]:
    """``file:line: message`` for each transrec import that a basedpyright JSON report could not follow."""
    found = []
    for diag in report["generalDiagnostics"]:
        if diag.get("rule") not in IMPORT_RULES:
            continue
        path, line = Path(diag["file"]), diag["range"]["start"]["line"] + 1
        message = diag["message"]
        if ('"transrec' in message and diag["rule"] != "reportAttributeAccessIssue"
                or 'of module "transrec' in message or line in _transrec_import_lines(path)):
            where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            found.append(f"{where}:{line}: {message}")
    return found


def check(*paths: Path | str, timeout: int) -> dict:
    """basedpyright's JSON report on ``paths``, run in the repo root (its only configuration is
    pyproject.toml there) with this interpreter's site-packages for the third-party imports."""
    if importlib.util.find_spec("basedpyright") is None:
        pytest.skip("basedpyright is not installed (the dev extra, in the lock, installs it)")
    command = [sys.executable, "-m", "basedpyright", "--outputjson", "--pythonpath", sys.executable]
    proc = subprocess.run([*command, *map(str, paths)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"basedpyright exit {proc.returncode}, no JSON report:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}") from None


def test_the_checker_follows_the_folders_and_reports_a_broken_import(tmp_path):
    good = [f"import transrec.{name}" for name in PACKAGES] + [
        "from transrec.kernels.interface import IMPLS",
        "from transrec.models import build_model",
        "from transrec.shards.cache import BUNDLED_TOKENIZER",
        "from transrec.inference.recommender import Recommender",
        "from transrec.engine import trainer",
        "from transrec.config import build_config",
    ]
    bad = ["import transrec.engine.no_such_module",
           "from transrec.models import no_such_name",
           "from transrec.shards import (\n    no_such_either,\n)"]
    probe = tmp_path / "probe.py"
    probe.write_text("\n".join(good + bad) + "\n")
    report = check(probe, timeout=300)
    assert report["summary"]["filesAnalyzed"] == 1, report["summary"]
    first_bad = len(good) + 1
    expected = [f"{probe}:{line}:" for line in (first_bad, first_bad + 1, first_bad + 3)]
    assert [f"{msg.split(': ', 1)[0]}:" for msg in unresolved_transrec_imports(report)] == expected, (
        unresolved_transrec_imports(report))


def _sources() -> list[Path]:
    """The .py files of the tree's Python folders, each once: os.walk does not follow the symlinks
    transrec/<folder>, and the checker, named the files, enumerates nothing itself."""
    found = []
    for folder in FOLDERS:
        for parent, dirs, files in os.walk(ROOT / folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
            found += sorted(Path(parent, f) for f in files if f.endswith(".py"))
    return found


@pytest.mark.slow
def test_every_transrec_import_in_the_tree_resolves():
    sources = _sources()
    assert len(sources) > 100 and ROOT / "engine" / "trainer.py" in sources
    report = check(*(path.relative_to(ROOT) for path in sources), timeout=1500)
    assert report["summary"]["filesAnalyzed"] == len(sources), report["summary"]
    unresolved = unresolved_transrec_imports(report)
    assert not unresolved, "\n".join(unresolved)
