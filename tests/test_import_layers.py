"""Which package imports which: the kernels stand alone (no config, errors or command line of
transrec), the configuration names their implementations without loading torch, and the command
line's root imports the subcommand modules, never the other way round. Where imports sit: at the top
of each file, an import inside a function marked as an optional package or deliberate lazy loading."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("engine", "inference", "kernels", "models", "shards", "transrec")
# the folders whose function-local imports carry a mark (docs/development.md)
MARKED_FOLDERS = (*FOLDERS, "benchmarks", "tests")
MARK = re.compile(r"# (lazy|optional): \S")  # "# lazy: <why>", "# optional: <package> (what for)"


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, at any depth (function-level imports too), including
    ``importlib.import_module("...")`` with a literal name; ``from a import b`` yields a and a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_imported_modules_sees_nested_and_dynamic_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n"
                   "def f():\n    from transrec.errors import UserError\n"
                   "    import importlib\n    importlib.import_module('transrec.cli')\n")
    assert {"os", "transrec.errors", "transrec.errors.UserError", "transrec.cli"} <= imported_modules(src)


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_a_kernel_module_imports_nothing_of_transrec_outside_the_kernels(path):
    own = ("transrec.kernels", "transrec._toplevel")  # the package and its bare-name guard
    outside = sorted(m for m in imported_modules(path) if _under(m, ("transrec",)) and not _under(m, own))
    assert not outside, f"kernels/{path.name} imports {outside}"


def test_the_kernels_load_and_run_without_the_rest_of_transrec():
    code = ("import sys, torch\n"
            "from transrec.kernels import KernelInputError, inbatch_softmax\n"
            "q, k = torch.randn(3, 4), torch.randn(5, 4)\n"
            "inbatch_softmax(q, k, torch.tensor([0, 4, 2]), impl='chunked')\n"
            "try:\n    inbatch_softmax(q, k, torch.tensor([0, 5, 2]), impl='torch')\n"
            "except KernelInputError as exc:\n    assert isinstance(exc, ValueError)\n"
            "else:\n    raise SystemExit('no error for a target out of range')\n"
            "print(sorted(m for m in sys.modules if m.startswith('transrec.') and not "
            "m.startswith(('transrec.kernels', 'transrec._toplevel'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_the_config_takes_the_kernels_implementations_without_loading_torch():
    code = ("import sys, typing\n"
            "from transrec.config.model import LossConfig\n"
            "from transrec.kernels import IMPLS\n"
            "impl = typing.get_type_hints(LossConfig)['impl']\n"
            "print('torch' in sys.modules, typing.get_args(impl) == IMPLS)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True"], proc.stdout


def test_only_the_command_line_root_imports_it():
    importers = sorted(str(path.relative_to(ROOT)) for folder in FOLDERS
                       for path in (ROOT / folder).rglob("*.py")
                       if path != ROOT / "transrec" / "cli.py"
                       and any(_under(m, ("transrec.cli",)) for m in imported_modules(path)))
    assert not importers, f"these modules import transrec.cli: {importers}"


def own_files(folders: tuple[str, ...]) -> list[Path]:
    """Every .py file under ``folders``, each once: none through a symlink (transrec/engine -> ../engine)."""
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if not any((ROOT / part).is_symlink() for part in (rel, *rel.parents[:-1])):
                found.append(path)
    return found


def unmarked_local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each import statement inside a function, at any depth, none of whose lines
    carries a comment ``# lazy: <why>`` or ``# optional: <package>``."""
    src = path.read_text()
    lines = src.splitlines()
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(src).readline)
                if tok.type == tokenize.COMMENT}
    found: dict[int, str] = {}
    for fn in ast.walk(ast.parse(src, str(path))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not any(
                    MARK.search(comments.get(line, "")) for line in range(node.lineno, node.end_lineno + 1)):
                found[node.lineno] = lines[node.lineno - 1].strip()
    return sorted(found.items())


def test_unmarked_local_imports_finds_the_unmarked_ones_only(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n"
                   "if os.name:\n    import json\n"  # module level: not a function's
                   "def f():\n"
                   "    import csv\n"  # 5
                   "    from a import (  # lazy: fast --help\n        b,\n    )\n"
                   "    from c import (\n        d,  # optional: c (a peer kernel)\n    )\n"
                   "    class K:\n"
                   "        def g(self):\n"
                   "            from x import y\n"  # 14: nested, in a method
                   "    s = '# lazy: a string'; import z\n"  # 15: a string is no mark
                   "    import w  # lazy:\n"  # 16: a mark gives its reason
                   "async def h():\n"
                   "    import q  # noqa: F401\n"  # 18
                   "    import r  # lazy: after the set-up above  # noqa: F401\n")
    assert unmarked_local_imports(src) == [
        (5, "import csv"), (14, "from x import y"), (15, "s = '# lazy: a string'; import z"),
        (16, "import w  # lazy:"), (18, "import q  # noqa: F401")]


def test_own_files_skips_the_symlinked_folders():
    files = own_files(("transrec",))
    assert ROOT / "transrec" / "cli.py" in files
    assert not [p for p in files if p.relative_to(ROOT).parts[1] in ("engine", "kernels", "models")]


def test_every_function_local_import_is_marked():
    """Imports sit at the top of each file; one inside a function is an optional package or
    deliberate lazy loading and says so on its line (docs/development.md)."""
    unmarked = [f"{path.relative_to(ROOT)}:{line}: {text}" for path in own_files(MARKED_FOLDERS)
                for line, text in unmarked_local_imports(path)]
    assert not unmarked, ("function-local imports without '# lazy: <why>' or '# optional: <package> (what "
                          "for)': move each to the top of its file, or mark it\n" + "\n".join(unmarked))
