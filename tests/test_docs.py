"""The README and docs/: the configuration reference matches the config schema, every relative link
(and #anchor) resolves, the README stays a short front door that names every page, and the exit
codes the README and the reliability page list are the ones the command line returns."""

from __future__ import annotations

import argparse
import ast
import importlib
import re
from pathlib import Path

import pytest

from transrec import cli
from transrec.config.markdown import COMMAND, render
from transrec.engine.guard import DIVERGED_EXIT, Diverged
from transrec.engine.preempt import PeerLost, RunStopped
from transrec.errors import UserError
from transrec.storage import WriteFailed

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
MAX_README_LINES = 250


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks, inline code spans removed."""
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(```|~~~)", line)
        if m:
            fence = None if fence == m.group(1) else (fence or m.group(1))
            continue
        if fence is None:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text()):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def links(path: Path):
    for n, line in _prose_lines(path.read_text()):
        for m in LINK.finditer(re.sub(r"`[^`\n]*`", "", line)):  # [`x`](target) keeps its target
            yield n, m.group(2)


def test_configuration_reference_is_current():
    path = DOCS / "configuration.md"
    assert path.is_file(), f"docs/configuration.md is missing: generate it with `{COMMAND}`"
    assert path.read_text() == render(), (
        f"docs/configuration.md is stale (the config dataclasses changed): regenerate it with `{COMMAND}`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for n, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = f"{page.relative_to(ROOT)}:{n}: {target}"
        if not dest.exists():
            bad.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix != ".md":
            bad.append(f"{where}: an anchor into a file that is not Markdown")
    assert not bad, "\n".join(bad)


def test_readme_is_a_short_front_door():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines, at most {MAX_README_LINES}: move detail "
                                   "into docs/ and link it")


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_slug_follows_github():
    assert slug("GPU proof and benchmark") == "gpu-proof-and-benchmark"
    assert slug("Cold start: items never seen in training") == "cold-start-items-never-seen-in-training"
    assert slug("`model.text.lora`") == "modeltextlora"
    assert slug("Against the peers, one NVIDIA H200") == "against-the-peers-one-nvidia-h200"


# ----------------------------------------------------------------------------- exit codes
CLI_MODULES = ("transrec/cli.py", "engine/cli.py", "shards/cli.py", "inference/cli.py")
ROOMS = ("transrec", "engine", "inference", "models", "shards", "kernels")


def listed_exit_codes(page: Path, heading: str) -> dict[int, str]:
    """{code: meaning} of the table under ``heading`` on ``page`` (rows ``| code | meaning ...``)."""
    section = page.read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return {int(code): meaning for code, meaning in re.findall(r"^\| (\d+) \| ([^|]+) \|", section, re.M)}


def _literal_int(node) -> int | None:
    return node.value if isinstance(node, ast.Constant) and type(node.value) is int else None


def codes_in_source() -> set[int]:
    """Every exit code the code defines: the integers the command-line modules return or exit with,
    and the ``exit_code`` of every error class (its value read from the imported class)."""
    codes: set[int] = set()
    for rel in CLI_MODULES:
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, ast.Return) and _literal_int(node.value) is not None:
                codes.add(node.value.value)
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "exit" and node.args
                    and _literal_int(node.args[0]) is not None):
                codes.add(node.args[0].value)
    def sets_exit_code(cls: ast.ClassDef) -> bool:
        return any(getattr(x, "id", "") == "exit_code" for s in cls.body if isinstance(s, ast.Assign)
                   for x in s.targets)

    for path in sorted({p.resolve() for room in ROOMS for p in (ROOT / room).rglob("*.py")}):
        for cls in ast.walk(ast.parse(path.read_text())):
            if isinstance(cls, ast.ClassDef) and sets_exit_code(cls):
                rel = path.relative_to(ROOT).with_suffix("")
                name = ".".join(rel.parts if rel.parts[0] == "transrec" else ("transrec", *rel.parts))
                codes.add(getattr(importlib.import_module(name), cls.name).exit_code)
    return codes


def exit_code_of(monkeypatch, raised: BaseException) -> int:
    """What ``transrec`` returns when a subcommand raises ``raised``."""
    def func(args):
        raise raised

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=func)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    return cli.main([])


def test_exit_codes_listed_are_the_codes_the_code_defines():
    readme = listed_exit_codes(README, "## Command line")
    reliability = listed_exit_codes(DOCS / "reliability.md", "## Exit codes")
    assert set(readme) == set(reliability) == codes_in_source() | {130}, (sorted(readme), sorted(reliability))
    codes = {DIVERGED_EXIT, WriteFailed.exit_code, RunStopped.exit_code, PeerLost.exit_code, 0, 2, 130}
    assert codes == set(readme)


def test_exit_codes_are_what_the_command_line_returns(monkeypatch, capsys):
    readme = listed_exit_codes(README, "## Command line")
    cases = {UserError("a mistake"): "mistake", Diverged("non-finite"): "diverged",
             WriteFailed("disk full"): "write failed", RunStopped("stopped", "SIGTERM", 3): "signal",
             PeerLost("lost rank 1"): "peer rank was lost",
             KeyboardInterrupt(): "interrupted"}
    for raised, word in cases.items():
        code = exit_code_of(monkeypatch, raised)
        assert word in readme[code], (type(raised).__name__, code, readme[code])
    monkeypatch.undo()
    assert cli.main([]) == 2  # no subcommand: the help, exit 2
    assert "usage: transrec" in capsys.readouterr().out
