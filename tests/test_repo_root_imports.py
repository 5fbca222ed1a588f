"""Python started in the repo root: the project imports, and the bare names of its folders
(``engine``, ``kernels``, ``models``, ``shards``) mean the installed distributions of those names,
as in any other folder (transformers imports the ``kernels`` distribution for its hub kernels).

Every process here starts in the repo root the ways a user starts one there: ``python -c``,
``python -m transrec.cli``, ``python -m pytest`` and a benchmark script. The tree itself is the
package layout (``transrec/<folder>`` is a relative symlink to the folder at the top), so the root
imports ``transrec.*`` without an install too."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from transrec._toplevel import PACKAGES

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = "import transrec.models, transrec.engine, transrec.kernels, transrec.shards"


def _run(args: list[str], env_extra: dict[str, str] | None = None, timeout: int = 300, cwd: Path = ROOT):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _installed_kernels() -> Path:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the 'kernels' distribution is not installed (the locked set installs it)")
    return Path(dist.locate_file("kernels")).resolve()


def test_python_c_in_the_root_imports_the_project_and_the_installed_kernels():
    installed = _installed_kernels()
    out = _ok(_run(["-c", f"{IMPORTS}\nimport kernels, transformers.integrations.hub_kernels\n"
                          "print(kernels.__file__)"]))
    assert Path(out.strip().splitlines()[-1]).resolve().parent == installed


@pytest.mark.parametrize("name", PACKAGES)
def test_each_folder_is_a_subpackage_through_a_relative_symlink(name):
    link = ROOT / "transrec" / name
    assert link.is_symlink() and os.readlink(link) == f"../{name}", f"transrec/{name} must link to ../{name}"
    assert (link / "__init__.py").samefile(ROOT / name / "__init__.py")


def test_the_root_imports_the_project_without_an_install(tmp_path):
    # -S with site-packages on PYTHONPATH: the third-party packages import, but no .pth file is read,
    # so the editable install's finder is not there; transrec comes from the tree or from nowhere
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"]}
    code = (f"import sys\n{IMPORTS}, transrec.inference\n"
            "assert not [f for f in sys.meta_path if 'editable' in repr(f)], sys.meta_path\n"
            "print(transrec.inference.__file__)")
    here = _ok(_run(["-S", "-c", code], env)).strip().splitlines()[-1]
    assert Path(here) == ROOT / "transrec" / "inference" / "__init__.py"
    elsewhere = _run(["-S", "-c", "import transrec"], env, cwd=tmp_path)
    assert elsewhere.returncode != 0 and "No module named 'transrec'" in elsewhere.stderr, elsewhere.stderr


@pytest.mark.slow
def test_the_cli_in_the_root_trains_a_model(tmp_path):
    assert "usage: transrec" in _ok(_run(["-m", "transrec.cli", "--help"]))
    _ok(_run(["-m", "transrec.cli", "shards", "synth", "--domain", "target", "--out", str(tmp_path / "data"),
              "--users", "30", "--items", "40", "--quiet"]))
    out = _ok(_run(["-m", "transrec.cli", "train", "--data", str(tmp_path / "data"), "--out",
                    str(tmp_path / "run"), "--preset", "tiny", "optim.steps=1"]))
    assert '"step": 1' in out


@pytest.mark.slow
def test_pytest_in_the_root_collects_model_and_engine_tests():
    out = _ok(_run(["-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "tests/test_models.py",
                    "tests/test_engine_guard.py"]))
    assert "tests/test_models.py::" in out and "tests/test_engine_guard.py::" in out


@pytest.mark.slow
def test_a_benchmark_script_in_the_root_starts():
    # the script's folder comes first on sys.path: no module there may carry an installed name
    assert "cold" in _ok(_run(["benchmarks/cold_start.py", "--help"])).lower()


@pytest.mark.slow
def test_bare_names_are_the_installed_distributions(tmp_path):
    site = tmp_path / "site"
    names = [n for n in PACKAGES if n != "kernels"]  # transformers needs the real kernels: see above
    for name in names:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("ORIGIN = 'installed'\n")
    code = (f"import {', '.join(names)}\n"
            f"assert all(m.ORIGIN == 'installed' for m in ({', '.join(names)})), 'a folder answered'\n"
            f"{IMPORTS}\nfrom transrec.models import build_model\n"
            f"from transrec.kernels import inbatch_softmax\n"
            f"import transrec.engine as e\nassert e.__file__.startswith({str(ROOT)!r})\nprint('ok')")
    assert _ok(_run(["-c", code], {"PYTHONPATH": str(site)})).strip() == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in PACKAGES if n != "kernels"])
def test_a_bare_name_with_nothing_installed_is_not_found(name):
    code = (f"try:\n    import {name}\nexcept ModuleNotFoundError as exc:\n    print(exc)\n"
            f"else:\n    raise SystemExit('the folder {name}/ answered a bare import')\n"
            f"import sys\nassert {name!r} not in sys.modules\n{IMPORTS}")
    out = _ok(_run(["-c", code]))
    assert f"No module named {name!r}" in out and f"transrec.{name}" in out


def test_script_folders_hold_no_module_with_an_installed_or_standard_name():
    """A script's folder is first on sys.path: a module there named like an installed distribution
    or a standard module (once benchmarks/kernels.py) shadows it for every library the script uses."""
    taken = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names) | set(PACKAGES)
    clashes = [str(path.relative_to(ROOT))
               for folder in ("benchmarks", "benchmarks/peers", "tests")
               for path in sorted((ROOT / folder).glob("*.py"))
               if path.stem in taken and path.stem != "conftest"]
    assert not clashes, f"rename these modules: {clashes}"
